"""`evd logs` on the journal: `journalctl -o json` as a child of this client
(SPEC section 12).  journalctl is the journal's stable reader: its file
format is systemd's to change, its JSON output is the interface.

What journalctl is asked for:

- the entries of one unit (`-u`, default evd.service) -- or, for journal
  files named with `-D`/`--journal-file` and no unit, every entry evd sent
  (`SYSLOG_IDENTIFIER=evd`), whatever unit or process it came from: a copied
  journal or a test's;
- `--since`/`--until`, so it seeks instead of reading everything (the
  reader still applies them exactly, half-open as for files);
- `--all`, or it would print large fields (a traceback) as null;
- for `summary`, only the fields a summary reads (`--output-fields`): the
  rest of an entry (its command line, capabilities, boot id...) is most of
  its bytes, and neither side should spend time on them.

Its stderr goes to a temporary file, never a pipe nobody reads while its
stdout is being read; a failure is one line naming it.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, cast

from evd.tools.logs.reading import Input, InputError

DEFAULT_UNIT = "evd.service"
STOP_WAIT = 5.0  # seconds for journalctl to exit once told to (-f, a reader gone)
# What `summary` reads of an entry (summary.py and entries.py).
SUMMARY_FIELDS = (
    "EVD_EVENT", "EVD_TIMESTAMP", "EVD_LEVEL", "EVD_PID", "PRIORITY", "_PID",
    "EVD_SERVICE", "EVD_PEER", "EVD_DURATION_MS", "EVD_BYTES_IN", "EVD_BYTES_OUT", "EVD_REASON",
    "EVD_COUNT", "EVD_NAME", "EVD_EXIT", "EVD_SIGNAL", "EVD_TIMED_OUT", "EVD_TRUNCATED", "EVD_KEY",
    "EVD_WHERE", "EVD_OK",
)  # fmt: skip


class JournalError(InputError):
    """journalctl missing or failing: `evd logs` exits 1 with this line."""


@dataclass(frozen=True)
class Journal:
    unit: str | None = None  # None: DEFAULT_UNIT, or every evd entry of named files
    directory: str | None = None
    files: list[str] = field(default_factory=list)


def journal_time(key: str) -> str:
    """A time key (`2026-01-31T12:00:00.000000Z`) as journalctl reads it."""
    return key.replace("T", " ").rstrip("Z") + " UTC"


def argv(
    journal: Journal,
    since: str | None = None,
    until: str | None = None,
    *,
    fields: tuple[str, ...] = (),
    follow: bool = False,
    lines: int | None = None,
) -> list[str]:
    command = ["journalctl", "-o", "json", "--all", "--no-pager", "--quiet"]
    if journal.directory:
        command += ["--directory", journal.directory]
    for name in journal.files:
        command += ["--file", name]
    if journal.unit or not (journal.directory or journal.files):
        command += ["--unit", journal.unit or DEFAULT_UNIT]
    else:
        command.append("SYSLOG_IDENTIFIER=evd")
    if since:
        command += ["--since", journal_time(since)]
    if until:
        command += ["--until", journal_time(until)]
    if fields:
        command.append("--output-fields=" + ",".join(fields))
    if follow:
        command += ["--follow", f"--lines={lines if lines is not None else 'all'}"]
    return command


@contextlib.contextmanager
def entries(command: list[str]) -> Iterator[Input]:
    """journalctl's output as an input of `evd logs`.  JournalError if it
    cannot be started, or (on leaving) if it failed."""
    program = shutil.which(command[0])
    if program is None:
        raise JournalError(f"{command[0]}: not found (the journal is read through it)")
    with tempfile.TemporaryFile() as errors:
        try:
            proc = subprocess.Popen(
                [program, *command[1:]], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors
            )
        except OSError as exc:
            raise JournalError(f"{command[0]}: {exc.strerror or exc}") from None
        assert proc.stdout is not None
        finished = False
        try:
            yield Input("journalctl", cast(BinaryIO, proc.stdout))
            finished = True
        finally:
            proc.stdout.close()
            if not finished and proc.poll() is None:
                proc.terminate()  # ^C, a reader gone: it need not go on
            try:
                status = proc.wait(STOP_WAIT)
            except subprocess.TimeoutExpired:
                proc.kill()
                status = proc.wait()
        if status != 0:
            errors.seek(0)
            said = next((row for row in errors.read().decode(errors="replace").splitlines() if row), "")
            raise JournalError(f"{command[0]} failed (exit {status}){': ' + said if said else ''}")
