"""The operator's side of a running daemon: `evd stop`, `status` (and
`reload`, in reload_answer.py).

They find the daemon through its pidfile and trust the lock, not the
pid (see system/pidfile.py): locked means running, present but unlocked means
stale.  They are clients, so they may wait -- always with a bound.

Waiting for a stop uses a pidfd: it becomes readable when the process exits,
whoever its parent is and whether or not anyone reaps it (a daemon orphaned
in a container whose init does not reap stays a zombie, and "kill -0 PID"
would call it alive forever).
"""

from __future__ import annotations

import json
import os
import select
import signal

from evd.system.pidfile import probe
from evd.tools.client import Client

EX_OK = 0
EX_FAIL = 1
EX_NOT_RUNNING = 3  # LSB: "program is not running"
STATS_TIMEOUT = 2.0  # status must answer quickly even if the daemon does not
# The longest `stop` waits: 30 days, the bound of every duration in the
# configuration, and a number select() takes.
MAX_WAIT = 30 * 86400.0


def _running_pid(path: str) -> tuple[int | None, str]:
    """(pid, "") of the running daemon, or (None, why not)."""
    state = probe(path)
    if not state.exists:
        return None, "not running"
    if not state.locked:
        return None, f"not running (stale pidfile {path}, pid {state.pid})"
    if state.pid is None:
        return None, f"pidfile {path} is locked but holds no pid (starting?)"
    return state.pid, ""


def stop(pidfile: str, timeout: float) -> tuple[int, str]:
    if not 0 <= timeout <= MAX_WAIT:  # NaN too: before anything is signalled
        return EX_FAIL, f"cannot wait {timeout} s: a timeout is 0 to {MAX_WAIT:.0f} s"
    pid, why = _running_pid(pidfile)
    if pid is None:
        return (EX_OK if why.startswith("not running") else EX_FAIL), why
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return EX_OK, "not running"
    try:
        os.kill(pid, signal.SIGTERM)
        readable, _, _ = select.select([pidfd], [], [], timeout)
    except ProcessLookupError:
        return EX_OK, f"stopped, pid {pid}"
    finally:
        os.close(pidfd)
    if not readable:
        return EX_FAIL, f"pid {pid} did not stop within {timeout:g} s"
    return EX_OK, f"stopped, pid {pid}"


def status(pidfile: str, address: str | None, key: bytes | None) -> tuple[int, list[str]]:
    """`running, pid N` (and live figures when the framed port answers)."""
    state = probe(pidfile)
    if not state.exists:
        return EX_NOT_RUNNING, ["not running"]
    if not state.locked:
        return EX_FAIL, [f"not running, stale pidfile {pidfile} (pid {state.pid} is gone)"]
    lines = [f"running, pid {state.pid if state.pid is not None else '?'}"]
    if address is not None:
        lines += _figures(address, key)
    return EX_OK, lines


def _figures(address: str, key: bytes | None) -> list[str]:
    """A few numbers from `stats`; a note instead if they cannot be had
    quickly: status never fails for want of figures."""
    try:
        with Client(address, timeout=STATS_TIMEOUT, key=key) as client:
            stats = json.loads(client.call("stats").body)
        services = stats["services"].values()
        lines = [
            f"uptime {_duration(stats['uptime'])}, version {stats['version']}",
            f"connections: {sum(s['connections_current'] for s in services)} open (this query included), "
            f"{sum(s['connections_total'] for s in services)} total, "
            f"{sum(s['rejected'] for s in services)} rejected",
            f"commands: {stats['commands']['running']} running, {stats['commands']['total']} run",
        ]
        if stats.get("worker"):
            lines.append(f"(figures of worker {stats['worker']['index']}, pid {stats['worker']['pid']})")
        return lines
    except Exception as exc:  # refused, timed out, auth, a different evd: all just "no figures"
        return [f"(no live figures: {exc.__class__.__name__}: {exc})"]


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    parts = [f"{days}d"] if days else []
    if days or hours:
        parts.append(f"{hours}h")
    if days or hours or minutes:
        parts.append(f"{minutes}m")
    parts.append(f"{seconds}s")
    return " ".join(parts)
