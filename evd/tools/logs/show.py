"""`evd logs show`: the selected lines, for a person or unchanged.

A line is selected when it is an evd event (a JSON object with an `event`
and an ISO 8601 `timestamp`) that passes every filter given.  Lines that
are not events are never shown; their number is said on stderr at the end.
With `--json` a selected line is written exactly as read; otherwise it is
rendered as `TIME LEVEL EVENT [PID] key=value ...`, coloured when stdout is
a terminal (not when piped, nor with NO_COLOR set or TERM=dumb), with a
traceback (`exc_info`) on the lines below.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase

import orjson

from evd.tools.logs import follow, journalctl, reading
from evd.tools.logs.entries import in_message_order, is_entry, line_of, to_event
from evd.tools.logs.events import LEVEL_RANK, line_service, peer_ip, ts_key

Event = dict[str, object]

# ANSI SGR codes, as structlog's console renderer uses them.
RESET, DIM, BOLD, CYAN = "\033[0m", "\033[2m", "\033[1m", "\033[36m"
LEVEL_COLOUR = {"debug": "\033[34m", "info": "\033[32m", "warning": "\033[33m", "error": "\033[1;31m"}
EVENT_WIDTH = 13  # "config.reload", the longest common event name
SHOWN_FIRST = ("timestamp", "level", "event", "pid", "exc_info")


class ShowError(Exception):
    """An input that cannot be read: exit 1."""


@dataclass(frozen=True)
class Options:
    files: list[str]
    events: list[str] | None = None
    service: str | None = None
    peer: str | None = None
    level: str | None = None
    since: str | None = None
    until: str | None = None
    json: bool = False
    follow: bool = False
    tail: int | None = None  # with follow: begin with this many selected lines
    journal: journalctl.Journal | None = None  # read the journal, not `files`


@functools.lru_cache(maxsize=4096)
def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def peer_matcher(spec: str) -> Callable[[str], bool]:
    """`--peer`: an IP (the same address however written), a CIDR, or
    "unix"; compared with the IP of a line's `peer`."""
    if spec == "unix":
        return lambda ip: ip == "unix"
    try:
        network = ipaddress.ip_network(spec.strip("[]"), strict=False)
    except ValueError:
        raise ShowError(f"--peer {spec!r}: not an IP address, a CIDR or 'unix'") from None

    def matches(ip: str) -> bool:
        address = _address(ip)
        return address is not None and address in network

    return matches


class Selector:
    """The filters of SPEC section 8, as one test per line."""

    def __init__(self, options: Options):
        self.events = options.events
        self.service = options.service
        self.peer = peer_matcher(options.peer) if options.peer else None
        self.rank = LEVEL_RANK[options.level] if options.level else None
        self.since, self.until = options.since, options.until
        self.skipped = 0
        self.overlong = 0  # of the skipped, those over reading.MAX_LINE
        self.entry: Event | None = None  # the journal entry the last line was, if it was one

    def select(self, line: bytes) -> Event | None:
        """The event of a selected line, else None (counting non-events)."""
        if not line.strip():
            return None
        self.entry = None
        try:
            event: Event = orjson.loads(line)
            if is_entry(event):  # a line of `journalctl -o json` (SPEC section 12)
                self.entry = event
                converted = to_event(event)
                event = in_message_order(converted, event.get("MESSAGE")) if converted else {}
            name, stamp = event["event"], event["timestamp"]
            key = ts_key(stamp) if isinstance(stamp, str) and isinstance(name, str) else None
        except (ValueError, KeyError, TypeError):
            key = None
        if key is None:
            self.skipped += 1
            self.overlong += line is reading.OVERLONG
            return None
        if (self.since and key < self.since) or (self.until and key >= self.until):
            return None
        if self.events and not any(fnmatchcase(str(name), glob) for glob in self.events):
            return None
        if self.service is not None and line_service(event) != self.service:
            return None
        if self.rank is not None and LEVEL_RANK.get(str(event.get("level")), 20) < self.rank:
            return None
        if self.peer is not None:
            peer = event.get("peer")
            if not isinstance(peer, str) or not self.peer(peer_ip(peer)):
                return None
        return event


def _value(value: object) -> str:
    """A field's value: bare when that reads unambiguously, else JSON
    (which escapes control characters)."""
    if isinstance(value, str):
        if value and not any(c in value for c in ' ="\\\n\t') and value.isprintable():
            return value
    return orjson.dumps(value, default=str).decode()


def printable(text: str) -> str:
    """`text` with control characters escaped: a log line may carry what a
    client sent, and a terminal must not take it for escape sequences."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class Renderer:
    def __init__(self, colour: bool):
        self.colour = colour

    def __call__(self, event: Event) -> str:
        c = self.colour
        stamp = printable(str(event.get("timestamp", "")))
        level = printable(str(event.get("level", "")))
        name = printable(str(event.get("event", "")))
        when = stamp.replace("T", " ").rstrip("Z")
        fields = " ".join(
            f"{CYAN if c else ''}{printable(key)}{RESET if c else ''}={_value(value)}"
            for key, value in event.items()
            if key not in SHOWN_FIRST
        )
        pid = event.get("pid")
        parts = [
            f"{DIM}{when}{RESET}" if c else when,
            f"{LEVEL_COLOUR.get(level, '')}{level:<7}{RESET}" if c else f"{level:<7}",
            f"{BOLD}{name:<{EVENT_WIDTH}}{RESET}" if c else f"{name:<{EVENT_WIDTH}}",
        ]
        if pid is not None:
            parts.append(f"[{_value(pid)}]")
        if fields:
            parts.append(fields)
        text = " ".join(parts)
        exc = event.get("exc_info")
        if exc:
            trace = exc if isinstance(exc, str) else _value(exc)
            text += "\n" + "\n".join("    " + printable(row) for row in trace.splitlines())
        return text


def stdout_gone() -> None:
    """The reader of stdout left (`| head`): what is still buffered has
    nowhere to go, so let the exit's flush write it to /dev/null instead
    of raising BrokenPipeError again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def use_colour() -> bool:
    return sys.stdout.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


class Printer:
    """Selects and writes lines; with `hold`, keeps only the last `hold`
    selected lines until `release` (the start of `-f`)."""

    def __init__(self, options: Options, hold: int | None = None):
        self.selector = Selector(options)
        self.json = options.json
        self.render = Renderer(use_colour() and not options.json)
        self.held: deque[tuple[bytes, Event]] | None = None if hold is None else deque(maxlen=hold)

    def lines(self, lines: Iterable[bytes]) -> None:
        for line in lines:
            event = self.selector.select(line)
            if event is None:
                continue
            if self.selector.entry is not None and self.json:
                line = line_of(self.selector.entry) or line  # the line evd would have written
            if self.held is not None:
                self.held.append((line, event))
            else:
                self._write(line, event)

    def tail(self, line: bytes) -> None:
        """A file's unterminated last line: shown if it is a whole event."""
        if line.strip():
            self.lines([line])

    def release(self) -> None:
        held, self.held = self.held, None
        for line, event in held or ():
            self._write(line, event)
        sys.stdout.flush()

    def _write(self, line: bytes, event: Event) -> None:
        if self.json:
            sys.stdout.buffer.write(line.rstrip(b"\r") + b"\n")
        else:
            sys.stdout.write(self.render(event) + "\n")


def run(options: Options) -> int:
    if options.journal is not None:
        return _run_journal(options, options.journal)
    names = options.files or [reading.STDIN]
    # -f follows the plain files; stdin and .gz files are read once.
    followed = [n for n in names if options.follow and n != reading.STDIN and not reading.is_gzip(n)]
    printer = Printer(options, hold=options.tail if followed else None)
    status = 0
    try:
        status = _read_all(printer, [n for n in names if n not in followed])
        if followed:
            _follow(printer, followed)
        printer.release()
    except BrokenPipeError:
        stdout_gone()
    except KeyboardInterrupt:
        printer.release()
    skipped, overlong = printer.selector.skipped, printer.selector.overlong
    if skipped:
        longest = f", {overlong} of them over {reading.MAX_LINE >> 20} MiB" if overlong else ""
        print(f"evd: {skipped} lines were not evd events (skipped{longest})", file=sys.stderr)
    return status


def _run_journal(options: Options, journal: journalctl.Journal) -> int:
    """The journal's entries through journalctl; with -f, as they come
    (journalctl starts with the last `tail` entries unless --since)."""
    command = journalctl.argv(
        journal, options.since, options.until, follow=options.follow, lines=options.tail
    )
    printer = Printer(options)
    try:
        with journalctl.entries(command) as source:
            for lines, tail in reading.blocks(source):
                printer.lines(lines)
                printer.tail(tail)
                if options.follow:
                    sys.stdout.flush()
    except journalctl.JournalError as exc:
        sys.stdout.flush()
        raise ShowError(str(exc)) from None
    except BrokenPipeError:
        stdout_gone()
    except KeyboardInterrupt:
        pass
    if printer.selector.skipped:
        print(f"evd: {printer.selector.skipped} lines were not evd events (skipped)", file=sys.stderr)
    return 0


def _read_all(printer: Printer, names: list[str]) -> int:
    """The inputs that are read once, in order; 1 if one could not be."""
    try:
        inputs = reading.open_inputs(names) if names else []
    except reading.InputError as exc:
        raise ShowError(str(exc)) from None
    status = 0
    for source in inputs:
        try:
            for lines, tail in reading.blocks(source):
                printer.lines(lines)
                printer.tail(tail)
        except reading.InputError as exc:
            print(f"evd: {exc}", file=sys.stderr)
            status = 1
        finally:
            source.close()
    return status


def _follow(printer: Printer, names: list[str]) -> None:
    """Read the files, show the held lines, then follow (until ^C)."""
    watch = follow.watcher()
    files: list[follow.Followed] = []
    try:
        for name in names:
            files.append(follow.Followed(name, watch))
    except reading.InputError as exc:
        for done in files:
            done.close()
        watch.close()
        raise ShowError(str(exc)) from None
    try:
        for file in files:
            for lines in file.read():
                printer.lines(lines)
        printer.release()
        while True:
            watch.wait()
            for file in files:
                for lines in file.read():
                    printer.lines(lines)
            sys.stdout.flush()
    finally:
        for file in files:
            file.close()
        watch.close()
