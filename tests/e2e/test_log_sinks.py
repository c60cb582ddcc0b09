"""The real `evd run` with its log in trouble: stderr a pipe nobody reads, a
log directory that vanishes, the journal in place of stderr.  Serving must
go on throughout, and the log must say what it lost."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from support.daemon import ROOT, WAIT, services_off
from support.journal import FakeJournal, one

CONFIG = """\
[daemon]
pidfile = "{tmp}/evd.pid"
shutdown_timeout = 2.0

[log]
level = "info"
format = "json"
file = "{log_file}"
buffer = {buffer}
journal_socket = "{tmp}/journal.sock"

[limits]
max_connections = 5000
per_source = 5000
rate = 0.0

[services.echo]
tcp = ["127.0.0.1:0"]
udp = []
unix = ["{tmp}/echo.sock"]
"""
CONFIG += services_off("daytime", "time", "timefmt", "framed")


def start(tmp: Path, stderr: int, log_file: str = "", buffer: int = 65536, args=()) -> subprocess.Popen:
    config = tmp / "evd.toml"
    config.write_text(CONFIG.format(tmp=tmp, log_file=log_file, buffer=buffer))
    return subprocess.Popen(
        [sys.executable, "-m", "evd", "run", "-c", str(config), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        cwd=ROOT,
    )


def wait_connectable(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + WAIT
    while True:
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(str(path))
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("evd did not start listening") from None
            time.sleep(0.02)


def echo_once(path: Path, timeout: float = WAIT) -> float:
    """One connection: connect, echo 64 bytes, close.  Its duration."""
    started = time.monotonic()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(b"x" * 64)
        got = b""
        while len(got) < 64:
            chunk = sock.recv(64)
            assert chunk, "closed before the echo"
            got += chunk
    return time.monotonic() - started


def fdinfo_flags(pid: int, fd: int) -> int:
    for row in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
        if row.startswith("flags:"):
            return int(row.split()[1], 8)
    raise AssertionError("no flags")


def read_to_eof(fd: int, timeout: float = WAIT) -> bytes:
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([fd], [], [], 0.5)[0]:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    raise AssertionError("stderr did not close")


def test_a_stalled_stderr_pipe_stops_nobody(tmp_path):
    r, w = os.pipe()
    proc = start(tmp_path, stderr=w)
    os.close(w)
    try:
        wait_connectable(tmp_path / "echo.sock", proc)
        flags = fdinfo_flags(proc.pid, 2)
        served = 3000  # far more than the pipe (64 KiB) and the buffer hold
        slowest = max(echo_once(tmp_path / "echo.sock") for _ in range(served))
        assert slowest < 2.0  # nobody waited on the log
        assert fdinfo_flags(proc.pid, 2) == flags  # the shell's pipe is as it was
        assert not flags & os.O_NONBLOCK
        proc.send_signal(signal.SIGTERM)
        text = read_to_eof(r)  # the reader reads at last
        assert proc.wait(WAIT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(r)
    rows = [json.loads(line) for line in text.decode().splitlines()]  # whole lines only
    conn_lines = [row for row in rows if row["event"] in ("conn.open", "conn.close")]
    assert len({(row["event"], row["conn"]) for row in conn_lines}) == len(conn_lines)  # none twice
    notes = [row for row in rows if row["event"] == "log.dropped"]
    assert notes, "no log.dropped line"
    dropped = sum(note["count"] for note in notes)
    # Each line since the stall is there or counted: two per connection (and
    # the probe's that saw evd listen), and the two listeners' closing.
    closes = [row for row in rows if row["event"] == "listener.close"]
    assert len(conn_lines) + len(closes) + dropped == 2 * (served + 1) + 2
    assert all(note["level"] == "warning" and note["first"] for note in notes)
    assert rows[-1]["event"] == "daemon.stop"  # the exit drain wrote the rest


def holds(pid: int, path) -> bool:
    """Process `pid` has a descriptor on `path` (deleted or not)."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(str(path)):
                return True
        except OSError:  # closed meanwhile
            continue
    return False


def test_a_vanished_log_directory_is_told_once_it_is_back(tmp_path):
    folder = tmp_path / "logs"
    folder.mkdir()
    log_file = folder / "evd.log"
    proc = start(tmp_path, stderr=subprocess.DEVNULL, log_file=str(log_file), buffer=8192)
    try:
        wait_connectable(tmp_path / "echo.sock", proc)
        deadline = time.monotonic() + WAIT
        while b'"conn.close"' not in log_file.read_bytes():  # the probe's lines are in the old file
            assert time.monotonic() < deadline, "the probe's conn.close was never written"
            time.sleep(0.05)
        shutil.rmtree(folder)
        proc.send_signal(signal.SIGUSR1)  # reopen: no directory
        # Until evd has tried it, lines still go to the deleted file; once it
        # has, it lets that file go: wait for that before counting lines.
        deadline = time.monotonic() + WAIT
        while holds(proc.pid, log_file):
            assert time.monotonic() < deadline, "evd kept the deleted log file after SIGUSR1"
            time.sleep(0.05)
        served = 200  # more than 8 KiB of lines: some are dropped
        for _ in range(served):
            echo_once(tmp_path / "echo.sock")
        folder.mkdir()
        proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + WAIT
        while not (log_file.exists() and b'"log.reopen", "pid"' in log_file.read_bytes()):
            assert time.monotonic() < deadline, "no log file after the directory came back"
            time.sleep(0.05)
        echo_once(tmp_path / "echo.sock")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(WAIT)
    rows = [json.loads(line) for line in log_file.read_text().splitlines()]
    events = [row["event"] for row in rows]
    failed = [row for row in rows if row["event"] == "log.reopen" and row["ok"] is False]
    assert len(failed) == 1 and "No such file or directory" in failed[0]["error"]
    assert "exc_info" not in failed[0]
    notes = [row for row in rows if row["event"] == "log.dropped"]
    assert len(notes) == 1 and events[0] == "log.dropped"  # the first line of the new file
    conn_lines = [e for e in events if e in ("conn.open", "conn.close")]
    # Each connection since the failed reopen is there or counted (the
    # probe's lines went to the file that was deleted).
    assert len(conn_lines) + notes[0]["count"] == 2 * (served + 1)
    assert "daemon.stop" in events


def test_evd_run_log_format_journal(tmp_path):
    receiver = FakeJournal(tmp_path / "journal.sock")
    proc = start(tmp_path, stderr=subprocess.PIPE, args=("--log-format", "journal"))
    try:
        wait_connectable(tmp_path / "echo.sock", proc)
        echo_once(tmp_path / "echo.sock")
        entries = []
        deadline = time.monotonic() + WAIT
        while sum(one(e, "EVD_EVENT") == "conn.close" for e in entries) < 2:  # the probe's, ours
            assert time.monotonic() < deadline
            entries.append(receiver.receive())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0
        assert proc.stderr is not None and proc.stderr.read() == b""  # nothing on stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        receiver.close()
    events = [one(e, "EVD_EVENT") for e in entries]
    assert events[0] == "daemon.start" and "daemon.ready" in events
    opened = entries[events.index("conn.open")]
    assert one(opened, "EVD_SERVICE") == "echo" and one(opened, "PRIORITY") == "6"
    assert one(opened, "SYSLOG_IDENTIFIER") == "evd" and one(opened, "EVD_PID") == str(proc.pid)
    closed = entries[len(events) - 1 - events[::-1].index("conn.close")]  # not the probe's
    assert one(closed, "EVD_REASON") == "eof" and one(closed, "EVD_BYTES_IN") == "64"


def test_evd_start_keeps_logging_to_the_journal_after_detaching(tmp_path):
    """Detaching closes every descriptor it was not told to keep, the
    journal socket among them: the daemon must find the journal again, and
    never write into whatever reuses the number."""
    receiver = FakeJournal(tmp_path / "journal.sock")
    config = tmp_path / "evd.toml"
    config.write_text(CONFIG.format(tmp=tmp_path, log_file="", buffer=65536).replace('"json"', '"journal"'))
    evd = [sys.executable, "-m", "evd"]
    try:
        started = subprocess.run(
            [*evd, "start", "-c", str(config)], capture_output=True, timeout=30, cwd=ROOT
        )
        assert started.returncode == 0, started.stderr
        echo_once(tmp_path / "echo.sock")
        events: list[tuple[str, str]] = []
        deadline = time.monotonic() + WAIT
        while ("conn.close", "echo") not in events:
            assert time.monotonic() < deadline, events
            entry = receiver.receive()
            events.append(
                (one(entry, "EVD_EVENT"), one(entry, "EVD_SERVICE") if "EVD_SERVICE" in entry else "")
            )
    finally:
        subprocess.run([*evd, "stop", "-c", str(config)], capture_output=True, timeout=30, cwd=ROOT)
        receiver.close()
    names = [name for name, _ in events]
    assert names[0] == "daemon.start" and "daemon.ready" in names and "conn.open" in names
