"""Reload the running daemon and learn how it went: `evd reload`, and
`evd enable|disable --now` (SPEC sections 2 and 12).  systemd's
`ExecReload=` runs `evd reload`, so `systemctl reload evd` fails when the
configuration did not apply.

The control socket (SPEC section 9) answers `reload` with the result
itself, which is best: no log to read, and no chance of reporting a reload
someone else asked for a moment earlier.  So with `control.unix`
configured, `reload` goes that way (and if nothing answers there, the way
below).

A SIGHUP carries no answer.  The daemon writes its verdict as one
`config.reload` event (SPEC section 6), so we look for it where the log
goes: with `log.file` and JSON lines we note where the file ends, signal,
and read what is appended until that line from the daemon's pid arrives;
with the journal, `journalctl --follow` from the moment before the signal,
for that pid's `config.reload` entry.  Both bounded by a timeout.  With no
log we can read (stderr, console lines, a journal socket journalctl cannot
name) the signal is still sent, and we say where to look.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from evd.config.model import Config
from evd.proto.control import Request
from evd.system.pidfile import PidfileError, probe
from evd.tools import ctl
from evd.tools.logs.entries import is_entry, to_event

EX_OK = 0
EX_FAIL = 1
POLL = 0.05  # seconds between looks at the log file: a client waiting, not the daemon
SYSTEM_JOURNAL = "/run/systemd/journal/socket"
# journald's socket in a namespace of its own (systemd-journald@NAME).
NAMESPACED = re.compile(r"/run/systemd/journal\.([^/]+)/socket")
# Not worth waiting for: the daemon is not there (no socket, nobody listening).
_NOBODY = (FileNotFoundError, ConnectionRefusedError)


@dataclass(frozen=True)
class Outcome:
    status: int  # EX_OK or EX_FAIL
    message: str


def reload(config: Config, timeout: float) -> Outcome:
    """Reload the daemon of `config` and report the result: through the
    control socket when one is configured, else by SIGHUP and the log."""
    if config.control.unix:
        outcome = _by_control(config.control.unix, timeout)
        if outcome is not None:
            return outcome
    return _by_signal(config, timeout)


def _by_control(path: str, timeout: float) -> Outcome | None:
    """The control socket's answer; None if nobody listens there (a daemon
    started before control.unix was set, or none at all: the pidfile says)."""
    try:
        answer = ctl.request(path, Request("reload"), timeout)
    except _NOBODY:
        return None
    except OSError as exc:
        return Outcome(EX_FAIL, f"cannot reload through {path}: {exc.strerror or exc}")
    if answer.body is None:  # refused before it was tried (evd is stopping, say)
        return Outcome(EX_FAIL, f"reload refused: {answer.message}")
    return _outcome(answer.body, None)


def _by_signal(config: Config, timeout: float) -> Outcome:
    try:
        state = probe(config.daemon.pidfile)
    except PidfileError as exc:
        return Outcome(EX_FAIL, f"cannot reload: {exc}")
    if not state.locked:
        socket = f"nothing listens at {config.control.unix}, " if config.control.unix else ""
        return Outcome(
            EX_FAIL, f"cannot reload: evd is not running ({socket}pidfile {config.daemon.pidfile})"
        )
    if state.pid is None:  # never signal a pid left in a file its new owner has not written yet
        return Outcome(
            EX_FAIL, f"cannot reload: pidfile {config.daemon.pidfile} is locked but holds no pid (starting?)"
        )
    pid = state.pid
    log_file = config.log.file if config.log.format == "json" else ""
    offset = _size(log_file) if log_file else 0
    journal = _follow_journal(config, pid) if config.log.format == "journal" else None
    try:
        os.kill(pid, signal.SIGHUP)
    except (ProcessLookupError, PermissionError) as exc:
        _stop(journal)
        gone = isinstance(exc, ProcessLookupError)
        return Outcome(
            EX_FAIL, f"cannot reload: {'pid {pid} is gone' if gone else f'not allowed to signal pid {pid}'}"
        )
    if journal is not None:
        where = "the journal"
        event = _wait_in_journal(journal, timeout)
    elif log_file:
        where = log_file
        event = _wait_for_reload(log_file, offset, pid, timeout)
    else:
        return Outcome(
            EX_OK,
            f"reload signal sent to pid {pid}; its result is in the daemon's log (set control.unix, or "
            'log.file with format = "json", or log to the journal, for evd to read and print it here)',
        )
    if event is None:
        return Outcome(
            EX_FAIL,
            f"reload signal sent to pid {pid}, but no config.reload in {where} within {timeout:g} s",
        )
    return _outcome(event, pid)


def _follow_journal(config: Config, pid: int) -> subprocess.Popen[bytes] | None:
    """journalctl following `pid`'s config.reload entries from now on
    (started before the signal: nothing can slip between); None if the
    journal cannot be read (journalctl missing, a socket it cannot name)."""
    program = shutil.which("journalctl")
    socket_path = config.log.journal_socket
    named = NAMESPACED.fullmatch(socket_path)
    if program is None or not (named or socket_path == SYSTEM_JOURNAL):
        return None
    now = time.time()
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d} UTC"
    command = [program, "-o", "json", "--all", "--quiet", "--no-pager", "--follow", "--lines=all"]
    if named:
        command.append(f"--namespace={named[1]}")
    command += ["--since", since, f"_PID={pid}", "EVD_EVENT=config.reload"]
    try:
        return subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
    except OSError:
        return None


def _wait_in_journal(journal: subprocess.Popen[bytes], timeout: float) -> dict[str, Any] | None:
    """The first config.reload entry journalctl prints, within `timeout`."""
    assert journal.stdout is not None
    deadline = time.monotonic() + timeout
    pending = b""
    try:
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([journal.stdout], [], [], left)
            if not ready:
                continue
            data = os.read(journal.stdout.fileno(), 65536)
            if not data:
                return None  # journalctl ended (cannot read the journal)
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                entry = _event(line)
                event = to_event(entry) if entry is not None and is_entry(entry) else None
                if event is not None and event.get("event") == "config.reload":
                    return event
        return None
    finally:
        _stop(journal)


def _stop(journal: subprocess.Popen[bytes] | None) -> None:
    if journal is None:
        return
    journal.terminate()
    try:
        journal.wait(5)
    except subprocess.TimeoutExpired:
        journal.kill()
        journal.wait()
    if journal.stdout is not None:
        journal.stdout.close()


def _outcome(event: dict[str, Any], pid: int | None) -> Outcome:
    """The result of a reload, from its `config.reload` line or its
    control answer (the same five fields); `pid` when known."""
    whose = f", pid {pid}" if pid is not None else ""
    if not event.get("ok"):
        return Outcome(EX_FAIL, f"reload failed{whose}: {event.get('error')}")
    parts = [
        f"{what}: {', '.join(event.get(what) or []) or 'nothing'}" for what in ("added", "removed", "changed")
    ]
    return Outcome(EX_OK, f"reloaded{whose}; " + "; ".join(parts))


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _wait_for_reload(path: str, offset: int, pid: int, timeout: float) -> dict[str, Any] | None:
    """The first `config.reload` event of `pid` appended after `offset`."""
    deadline = time.monotonic() + timeout
    pending = b""
    while True:
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size < offset:  # rotated and started afresh
                    offset, pending = 0, b""
                f.seek(offset)
                data = f.read()
        except OSError:
            data = b""
        offset += len(data)
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            event = _event(line)
            if event is not None and event.get("event") == "config.reload" and event.get("pid") == pid:
                return event
        if time.monotonic() >= deadline:
            return None
        time.sleep(POLL)  # a client reading a log file, bounded by `deadline`


def _event(line: bytes) -> dict[str, Any] | None:
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None
