"""Reload the running daemon and learn how it went (`evd enable --now`).

A SIGHUP carries no answer.  The daemon writes its verdict as one
`config.reload` line (SPEC section 6), so with `log.file` set and JSON
lines we note where the file ends, signal, and read what is appended until
that line from the daemon's pid arrives -- bounded by a timeout.  Without a
log file we can read (stderr, the journal, console lines) the signal is
still sent, and we say where to look.

The control socket (SPEC section 9) answers `reload` with the result
itself, which is better: no log to read, and no chance of reporting a
reload someone else asked for a moment earlier.  So with `control.unix`
configured, `reload` goes that way.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

from evd.config.model import Config
from evd.proto.control import Request
from evd.system.pidfile import PidfileError, probe
from evd.tools import ctl

EX_OK = 0
EX_FAIL = 1
POLL = 0.05  # seconds between looks at the log file: a client waiting, not the daemon


@dataclass(frozen=True)
class Outcome:
    status: int  # EX_OK or EX_FAIL
    message: str


def reload(config: Config, timeout: float) -> Outcome:
    """Reload the daemon of `config` and report the result: through the
    control socket when one is configured, else by SIGHUP and the log."""
    if config.control.unix:
        return _by_control(config.control.unix, timeout)
    return _by_signal(config, timeout)


def _by_control(path: str, timeout: float) -> Outcome:
    try:
        answer = ctl.request(path, Request("reload"), timeout)
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
    if not state.locked or state.pid is None:
        return Outcome(EX_FAIL, f"cannot reload: evd is not running (pidfile {config.daemon.pidfile})")
    pid = state.pid
    log_file = config.log.file if config.log.format == "json" else ""
    offset = _size(log_file) if log_file else 0
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        return Outcome(EX_FAIL, f"cannot reload: pid {pid} is gone")
    except PermissionError:
        return Outcome(EX_FAIL, f"cannot reload: not allowed to signal pid {pid}")
    if not log_file:
        return Outcome(
            EX_OK,
            f"reload signal sent to pid {pid}; its result is in the daemon's log (set log.file with "
            'format = "json" for evd to read and print it here)',
        )
    event = _wait_for_reload(log_file, offset, pid, timeout)
    if event is None:
        return Outcome(
            EX_FAIL,
            f"reload signal sent to pid {pid}, but no config.reload in {log_file} within {timeout:g} s",
        )
    return _outcome(event, pid)


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
