"""SPEC section 12: with format = "journal", a journal that is not there --
its socket missing, or refusing (journald stopped or restarting), at start
or while evd runs -- never stops evd.  One warning line on stderr; entries
wait in log.buffer, past it they are dropped and counted; once a socket
takes datagrams again, the first entry delivered is log.dropped.

A datagram socket of our own stands in for journald (support/journal.py):
binding it is journald coming back, closing and removing it is journald
going away."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.daemon import ROOT, WAIT
from support.journal import FakeJournal, one

CONFIG = """\
[daemon]
pidfile = "{tmp}/evd.pid"
shutdown_timeout = 2.0

[log]
level = "info"
format = "journal"
buffer = 4096
journal_socket = "{tmp}/journal.sock"

[services.echo]
tcp = []
udp = []
unix = ["{tmp}/echo.sock"]

[services.daytime]
enabled = false
[services.time]
enabled = false
[services.timefmt]
enabled = false
[services.framed]
enabled = false
"""
# 4096 bytes (the least log.buffer may be) hold a handful of entries: a
# few connections while the journal is away overflow it.
CONNECTIONS = 12


@pytest.fixture
def evd_journal(tmp_path):
    started: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        config = tmp_path / "evd.toml"
        config.write_text(CONFIG.format(tmp=tmp_path))
        proc = subprocess.Popen(
            [sys.executable, "-m", "evd", "run", "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )
        started.append(proc)
        wait_serving(tmp_path / "echo.sock", proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(WAIT)
        if proc.stderr:
            proc.stderr.close()


def wait_serving(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + WAIT
    while True:
        try:
            echo_once(path)
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("evd does not serve") from None
            time.sleep(0.02)


def echo_once(path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(WAIT)
        sock.connect(str(path))
        sock.sendall(b"x" * 64)
        got = b""
        while len(got) < 64:
            chunk = sock.recv(64)
            assert chunk, "closed before the echo"
            got += chunk


def refusing(path: Path) -> None:
    """A socket file nobody reads: what a stopped journald leaves."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))


def entries_until(receiver: FakeJournal, event: str, **fields: str) -> list[dict[str, list[bytes]]]:
    """What the receiver gets up to the first entry of `event` with these
    `EVD_` fields (evd retries an absent journal every second)."""
    entries: list[dict[str, list[bytes]]] = []
    deadline = time.monotonic() + WAIT
    while True:
        assert time.monotonic() < deadline, [one(e, "EVD_EVENT") for e in entries]
        entries.append(receiver.receive(timeout=WAIT))
        last = entries[-1]
        if one(last, "EVD_EVENT") == event and all(
            one(last, "EVD_" + name.upper()) == value for name, value in fields.items()
        ):
            return entries


def stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(WAIT) == 0
    assert proc.stderr is not None
    return proc.stderr.read().decode()


def check_came_back(proc: subprocess.Popen, path: Path, served: int) -> list[str]:
    """journald is back at `path`: the first entry is log.dropped, and what
    arrives plus what it counts is every connection's two entries."""
    receiver = FakeJournal(path)
    try:
        entries = entries_until(receiver, "log.dropped")
        echo_once(path.parent / "echo.sock")  # connection served + 1: after everything kept
        entries += entries_until(receiver, "conn.close", conn=str(served + 1))
    finally:
        receiver.close()
    events = [one(e, "EVD_EVENT") for e in entries]
    assert events[0] == "log.dropped", events
    assert one(entries[0], "PRIORITY") == "4"
    dropped = int(one(entries[0], "EVD_COUNT"))
    assert dropped > 0
    conn_lines = sum(name in ("conn.open", "conn.close") for name in events)
    assert conn_lines + dropped >= 2 * served  # start-up lines may be among the lost
    return events


def test_a_missing_journal_at_start_warns_once_and_serves(tmp_path, evd_journal):
    proc = evd_journal()
    for _ in range(CONNECTIONS):
        echo_once(tmp_path / "echo.sock")
    check_came_back(proc, tmp_path / "journal.sock", CONNECTIONS + 1)
    err = stop(proc).splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("evd: warning: cannot reach the journal at ")
    assert "No such file or directory" in err[0]


def test_a_refusing_journal_at_start_warns_once_and_serves(tmp_path, evd_journal):
    path = tmp_path / "journal.sock"
    refusing(path)
    proc = evd_journal()
    for _ in range(CONNECTIONS):
        echo_once(tmp_path / "echo.sock")
    path.unlink()  # journald restarting: a new socket in the old one's place
    check_came_back(proc, path, CONNECTIONS + 1)
    err = stop(proc).splitlines()
    assert len(err) == 1 and "Connection refused" in err[0], err


def test_a_journal_that_goes_away_and_comes_back(tmp_path, evd_journal):
    path = tmp_path / "journal.sock"
    first = FakeJournal(path)
    try:
        proc = evd_journal()
        entries_until(first, "conn.close", conn="1")  # the start-up probe's: it is there
    finally:
        first.close()
    path.unlink()
    for _ in range(CONNECTIONS):
        echo_once(tmp_path / "echo.sock")
    refusing(path)  # away still, but refusing now
    echo_once(tmp_path / "echo.sock")
    path.unlink()
    check_came_back(proc, path, CONNECTIONS + 2)
    assert stop(proc) == ""  # nothing on stderr: it was there at start
