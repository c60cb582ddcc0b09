"""Log input: files, `.gz` files and stdin, read in large blocks and cut
into lines.

Reading a block of a few hundred KiB and splitting it with one `bytes.split` costs
less per line than iterating a file object, and keeps memory bounded by
the block size whatever the file's size.  A block's last, unfinished line is
carried into the next block; the file's own unfinished last line (a file
being written) is handed over separately, as the *tail*, so that readers
can treat it as what it may be: half a line.
"""

from __future__ import annotations

import gzip
import os
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

# Large enough that per-block overhead vanishes, small enough that a block
# and the lines cut from it stay in the CPU's cache while they are used.
BLOCK = 1 << 18

STDIN = "-"

# The longest line kept.  evd's own lines are a few hundred bytes (a
# traceback a few KiB); past this a line is not one of them, and what was
# kept of it is let go at once: a crash-damaged log (a run of NUL bytes
# with no newline) or a foreign 100 MB line then costs one pass and this
# much memory, where keeping it cost memory in proportion and time in the
# square of its length (every block re-copied what came before).
MAX_LINE = 1 << 20
# What stands in the lines for an over-long one: a line never contains a
# newline, so no real line is equal to it.  Not JSON: every reader counts
# it as skipped, and can tell it (`line is OVERLONG`) to say why.
OVERLONG = b"\n(over-long line)"


class InputError(Exception):
    """A file that cannot be read: `evd logs` exits 1 (SPEC section 2)."""


@dataclass
class Input:
    name: str  # as given; "-" for stdin
    stream: BinaryIO

    def close(self) -> None:
        if self.name != STDIN:
            self.stream.close()


def is_gzip(name: str) -> bool:
    return name.endswith(".gz")


def open_input(name: str) -> Input:
    """Open one named input now, so that an unreadable file is reported
    before anything is printed.  A `.gz` file is checked for its magic."""
    if name == STDIN:
        return Input(name, sys.stdin.buffer)
    try:
        raw = open(name, "rb")  # closed by Input.close
    except OSError as exc:
        raise InputError(f"{name}: {exc.strerror or exc}") from None
    if not is_gzip(name):
        return Input(name, raw)
    if raw.read(2) != b"\x1f\x8b":
        raw.close()
        raise InputError(f"{name}: not a gzip file")
    raw.seek(0)
    return Input(name, gzip.GzipFile(fileobj=raw, mode="rb"))  # type: ignore[arg-type]


def open_inputs(names: list[str]) -> list[Input]:
    """Every input, opened in order; none left open if one fails."""
    opened: list[Input] = []
    try:
        for name in names or [STDIN]:
            opened.append(open_input(name))
    except InputError:
        for done in opened:
            done.close()
        raise
    return opened


def blocks(source: Input) -> Iterator[tuple[list[bytes], bytes]]:
    """(complete lines, b"") per block, then ([], tail) once at the end,
    the tail being the unterminated last line (b"" if there is none)."""
    # read1: at most one read underneath, so a truncated .gz gives up what
    # came before the damage, and a pipe what it has.
    return _split(source.stream.read1, source.name)  # type: ignore[attr-defined]


def range_blocks(path: str, start: int, end: int | None) -> Iterator[tuple[list[bytes], bytes]]:
    """`blocks` of the bytes [start, end) of a plain file; end None: to
    its end.  `start` and `end` must be line starts (`line_starts`)."""
    try:
        stream = open(path, "rb")
    except OSError as exc:
        raise InputError(f"{path}: {exc.strerror or exc}") from None
    with stream:
        stream.seek(start)
        left = [end - start] if end is not None else None

        def read(size: int) -> bytes:
            if left is None:
                return stream.read1(size)
            data = stream.read1(min(size, left[0]))
            left[0] -= len(data)
            return data

        yield from _split(read, path)


def line_starts(path: str, parts: int) -> list[int]:
    """Up to `parts` + 1 offsets cutting a plain file into about equal
    parts at line starts: [0, ..., size]."""
    size = os.path.getsize(path)
    cuts = [0]
    with open(path, "rb") as f:
        for i in range(1, parts):
            f.seek(max(i * size // parts, cuts[-1]))
            _past_newline(f)  # to the end of the line the cut fell in
            if f.tell() >= size:
                break
            if f.tell() > cuts[-1]:
                cuts.append(f.tell())
    return cuts + [size]


def _past_newline(f: BinaryIO) -> None:
    """Move `f` just past the next newline (or to its end), a block at a
    time: readline would hold a whole over-long line in memory."""
    while block := f.read(BLOCK):
        end = block.find(b"\n")
        if end >= 0:
            f.seek(end + 1 - len(block), os.SEEK_CUR)
            return


class Lines:
    """Cuts blocks of bytes into lines.  The unfinished line at the end of
    a block is carried into the next one, up to MAX_LINE bytes; a line
    longer than that comes out as OVERLONG, and nothing of it is kept."""

    def __init__(self) -> None:
        self.carry = b""
        self.overlong = False  # dropping the rest of an over-long line

    def cut(self, data: bytes) -> list[bytes]:
        """The lines that `data` completes."""
        lines = data.split(b"\n")  # only the new bytes: no byte is split twice
        rest = lines.pop()
        if lines:
            if self.overlong:
                lines[0] = OVERLONG
            elif self.carry:
                first = self.carry + lines[0]
                lines[0] = first if len(first) <= MAX_LINE else OVERLONG
            self.carry, self.overlong = b"", False
        if self.overlong:
            return lines
        if len(self.carry) + len(rest) > MAX_LINE:
            self.carry, self.overlong = b"", True
        elif rest:
            self.carry += rest  # at most MAX_LINE: a few copies of a bounded line
        return lines

    def rest(self) -> bytes:
        """The unfinished last line (b"" if none): what a file ends with
        when its writer has not finished the line (yet)."""
        return OVERLONG if self.overlong else self.carry


def _split(read: Callable[[int], bytes], name: str) -> Iterator[tuple[list[bytes], bytes]]:
    cutter = Lines()
    try:
        while True:
            data = read(BLOCK)
            if not data:
                break
            lines = cutter.cut(data)
            if lines:
                yield lines, b""
    except (OSError, EOFError, zlib.error) as exc:
        # A truncated or corrupt .gz, an I/O error: what was read counts,
        # and the caller reports the file as unreadable.
        raise InputError(f"{name}: {exc}") from None
    yield [], cutter.rest()
