"""Workers at the edges of their life: a supervisor that dies, and a log
file that logrotate renames while every process writes to it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
from support.daemon import BASE_CONFIG, ROOT, SPREAD, WAIT, LogFile, connect, process_gone, recv_exactly

WORKERS = BASE_CONFIG.replace("shutdown_timeout = 5.0", "shutdown_timeout = 5.0\nworkers = 2")

# These tests set `workers` themselves (tests/conftest.py).
pytestmark = pytest.mark.no_workers_variant("sets workers itself")


def test_orphaned_workers_leave_quietly_with_one_line_saying_why(start_evd):
    evd = start_evd(WORKERS)
    pids = [evd.wait_for("worker.start", worker=i)["worker_pid"] for i in (0, 1)]
    with connect(evd.addr("echo")) as sock:  # serving, with a connection open
        sock.sendall(b"hi")
        assert recv_exactly(sock, 2) == b"hi"
        os.kill(evd.proc.pid, signal.SIGKILL)
        evd.proc.wait(WAIT)
        assert sock.recv(10) == b""  # the orphan drains and closes it
    for pid in pids:
        assert process_gone(pid), f"worker {pid} outlived its supervisor"
    evd.stop()  # the log reader sees the workers' last lines
    for pid in pids:
        lines = [e for e in evd.events if e.get("pid") == pid]
        assert [e for e in lines if e["event"] == "worker.orphaned"], pid
        assert not [e for e in lines if e["level"] == "error"], lines[-3:]


LOGGED = WORKERS.replace("[log]\n", '[log]\nfile = "{tmp}/evd.log"\n', 1)
ROTATIONS = 10


class Traffic:
    """Echo connections from both workers' clients, back to back, on a
    thread: every one is a conn.open and a conn.close line in the log."""

    def __init__(self, address):
        self.address = address
        self.done = threading.Event()
        self.count = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.is_set():
            with connect(self.address, source=SPREAD[self.count % 2]) as sock:
                sock.sendall(b"x")
                assert recv_exactly(sock, 1) == b"x"
            self.count += 1

    def stop(self) -> None:
        self.done.set()
        self.thread.join(WAIT)


def test_show_f_sees_every_line_once_across_rotations_with_workers(start_evd, tmp_path):
    evd = start_evd(LOGGED, wait_ready=False)
    log = LogFile(tmp_path / "evd.log")
    log.wait_for("daemon.ready")
    host, _, port = log.addresses()[("echo", "tcp")].rpartition(":")
    show = subprocess.Popen(
        [sys.executable, "-m", "evd", "logs", "show", "-f", "--json", "--since", "1d", str(log.path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
    )
    shown: list[str] = []
    reader = threading.Thread(target=lambda: shown.extend(show.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + WAIT
    while not shown:  # show -f has the file open and reads along
        assert time.monotonic() < deadline, "show -f showed nothing"
        time.sleep(0.02)
    traffic = Traffic((host, int(port)))
    try:
        for n in range(1, ROTATIONS + 1):
            count = traffic.count
            while traffic.count < count + 20:  # lines flowing from both workers
                time.sleep(0.01)
            os.rename(log.path, tmp_path / f"evd.log.{n}")
            evd.send(signal.SIGUSR1)
            reopened = LogFile(log.path).wait_for("log.reopen", pid=evd.proc.pid)
            # show -f follows a name: let it reach this file before the next
            # rename, or it never sees this one (as tail -F would not).
            deadline = time.monotonic() + WAIT
            while canonical(json.dumps(reopened)) not in {canonical(line) for line in shown}:
                assert time.monotonic() < deadline, "show -f did not reach the new file"
                time.sleep(0.02)
    finally:
        traffic.stop()
        evd.stop()
        last = LogFile(log.path).wait_for("daemon.stop", pid=evd.proc.pid)
        deadline = time.monotonic() + WAIT
        while not any(json.loads(line) == last for line in shown[-5:]):  # show -f caught up
            assert time.monotonic() < deadline, "show -f never showed the last line"
            time.sleep(0.02)
        show.send_signal(signal.SIGINT)
        show.wait(WAIT)
        reader.join(WAIT)
    written = [
        line
        for path in [*(tmp_path / f"evd.log.{n}" for n in range(1, ROTATIONS + 1)), log.path]
        for line in path.read_bytes().decode().splitlines()
    ]
    assert traffic.count > 20 * ROTATIONS
    seen = Counter(canonical(line) for line in shown)
    missing = [line for line in written if canonical(line) not in seen]
    assert not missing, f"{len(missing)} of {len(written)} lines never shown: {missing[:3]}"
    assert max(seen.values()) == 1 and len(shown) == len(written)


def canonical(line: str | bytes) -> str:
    return json.dumps(json.loads(line), sort_keys=True)
