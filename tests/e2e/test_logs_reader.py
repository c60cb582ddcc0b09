"""`evd logs summary` and `evd logs show` on logs a real `evd run` wrote:
N connections made, N counted; the same answer from a .gz file, stdin
and a log split in two files; the filters of `show`; `show -f` across a
logrotate rename."""

from __future__ import annotations

import gzip
import json
import os
import pty
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
from support.daemon import BASE_CONFIG, ROOT, WAIT, LogFile, logged_config, recv_all

ECHO_N = 12  # echo connections made, each sending PAYLOAD and reading it back
DAYTIME_N = 3  # daytime connections
PAYLOAD = b"ping\n"

# discard refuses everyone on loopback (conn.reject, level warning)
CONFIG = logged_config(BASE_CONFIG).replace(
    "[services.discard]\nenabled = true\n", '[services.discard]\nenabled = true\nonly_from = ["10.0.0.0/8"]\n'
)


def evd_logs(*args: str, stdin=None, timeout: float = 3 * WAIT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "evd", "logs", *args],
        capture_output=True,
        timeout=timeout,
        cwd=ROOT,
        stdin=stdin if stdin is not None else subprocess.DEVNULL,
    )


def start_logged(start_evd, tmp_path: Path):
    evd = start_evd(CONFIG, wait_ready=False)
    log = LogFile(tmp_path / "evd.log")
    log.wait_for("daemon.ready")
    return evd, log


def address(log: LogFile, service: str) -> tuple[str, int]:
    host, _, port = log.addresses()[(service, "tcp")].rpartition(":")
    return host.strip("[]"), int(port)


def echo_once(addr) -> None:
    with socket.create_connection(addr, timeout=WAIT) as sock:
        sock.sendall(PAYLOAD)
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == PAYLOAD


def daytime_once(addr) -> None:
    with socket.create_connection(addr, timeout=WAIT) as sock:
        assert recv_all(sock).endswith(b"\r\n")


def wait_count(log: LogFile, n: int, event: str, **fields) -> None:
    deadline = time.monotonic() + WAIT
    while len(log.find(event, **fields)) < n:
        assert time.monotonic() < deadline, f"fewer than {n} {event} {fields} in the log"
        time.sleep(0.02)


@pytest.fixture
def real_log(start_evd, tmp_path) -> Path:
    """A log written by `evd run`: ECHO_N echo and DAYTIME_N daytime
    connections, one refused discard connection, a clean stop."""
    evd, log = start_logged(start_evd, tmp_path)
    for _ in range(ECHO_N):
        echo_once(address(log, "echo"))
    for _ in range(DAYTIME_N):
        daytime_once(address(log, "daytime"))
    with socket.create_connection(address(log, "discard"), timeout=WAIT) as sock:
        recv_all(sock)  # refused: closed at once
    wait_count(log, ECHO_N, "conn.close", service="echo")
    wait_count(log, DAYTIME_N, "conn.close", service="daytime")
    log.wait_for("conn.reject", service="discard")
    assert evd.stop() == 0
    log.wait_for("daemon.stop")
    return tmp_path / "evd.log"


def events_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_summary_counts_what_was_done(real_log):
    out = evd_logs("summary", "--json", str(real_log))
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    events = events_of(real_log)
    assert (result["lines"], result["skipped"]) == (len(events), 0)
    first, last = (datetime.fromisoformat(result[k]) for k in ("first", "last"))
    assert first == datetime.fromisoformat(events[0]["timestamp"])
    assert last == datetime.fromisoformat(events[-1]["timestamp"])
    echo = result["services"]["echo"]
    assert echo["connections"] == ECHO_N
    assert echo["reasons"] == {"eof": ECHO_N}
    assert (echo["bytes_in"], echo["bytes_out"]) == (ECHO_N * len(PAYLOAD), ECHO_N * len(PAYLOAD))
    assert 0 <= echo["duration_ms"]["p50"] <= echo["duration_ms"]["p95"] <= echo["duration_ms"]["max"]
    daytime = result["services"]["daytime"]
    assert (daytime["connections"], daytime["reasons"]) == (DAYTIME_N, {"done": DAYTIME_N})
    assert result["services"]["discard"]["rejected"] == {"access": 1}
    assert result["peers"] == [
        {"peer": "127.0.0.1", "connections": ECHO_N + DAYTIME_N, "rejected": 1, "auth_failures": 0}
    ]
    assert (result["starts"], result["stops"], result["reloads"]) == (1, 1, {"ok": 0, "failed": 0})

    text = evd_logs("summary", str(real_log))
    assert text.returncode == 0
    rows: dict[str, list[str]] = {}
    for line in text.stdout.decode().splitlines():
        if line.startswith("  "):
            rows.setdefault(line.split()[0], line.split())  # the first table: services
    assert rows["echo"][1] == str(ECHO_N) and rows["daytime"][1] == str(DAYTIME_N)


def test_gz_stdin_and_split_files_give_the_same_answer(real_log, tmp_path):
    expected = json.loads(evd_logs("summary", "--json", str(real_log)).stdout)
    data = real_log.read_bytes()
    packed = tmp_path / "evd.log.1.gz"
    packed.write_bytes(gzip.compress(data))
    assert json.loads(evd_logs("summary", "--json", str(packed)).stdout) == expected
    for args in (("-",), ()):
        with open(real_log, "rb") as stdin:
            out = evd_logs("summary", "--json", *args, stdin=stdin)
        assert out.returncode == 0 and json.loads(out.stdout) == expected
    # rotated: the older half compressed, the newer plain, given newest first
    lines = data.splitlines(keepends=True)
    older, newer = tmp_path / "evd.log.2.gz", tmp_path / "evd.log.1"
    older.write_bytes(gzip.compress(b"".join(lines[: len(lines) // 2])))
    newer.write_bytes(b"".join(lines[len(lines) // 2 :]))
    assert json.loads(evd_logs("summary", "--json", str(newer), str(older)).stdout) == expected


def test_a_file_being_written_and_foreign_lines(real_log, tmp_path):
    expected = json.loads(evd_logs("summary", "--json", str(real_log)).stdout)
    growing = tmp_path / "growing.log"
    half = b'{"timestamp": "2030-01-01T00:00:00.000000Z", "level": "info", "event": "conn.cl'
    growing.write_bytes(b"Traceback (most recent call last):\n" + real_log.read_bytes() + half)
    out = evd_logs("summary", "--json", str(growing))
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["skipped"] == 2  # the traceback line and the half line
    assert {k: v for k, v in result.items() if k != "skipped"} == {
        k: v for k, v in expected.items() if k != "skipped"
    }


def test_unreadable_files_exit_1(real_log, tmp_path):
    for verb in ("summary", "show"):
        out = evd_logs(verb, str(real_log), str(tmp_path / "missing.log"))
        assert out.returncode == 1
        assert out.stdout == b""
        assert b"missing.log" in out.stderr
    fake = tmp_path / "fake.gz"
    fake.write_bytes(b"not gzip")
    out = evd_logs("summary", str(fake))
    assert (out.returncode, out.stdout) == (1, b"") and b"not a gzip file" in out.stderr
    truncated = tmp_path / "cut.gz"
    truncated.write_bytes(gzip.compress(real_log.read_bytes())[:-30])
    out = evd_logs("summary", "--json", str(truncated))
    assert out.returncode == 1 and b"cut.gz" in out.stderr
    assert json.loads(out.stdout)["lines"] > 0  # what could be read is reported


def test_show_filters(real_log):
    raw = real_log.read_bytes().splitlines()
    events = events_of(real_log)

    def shown(*args: str) -> list[bytes]:
        out = evd_logs("show", "--json", *args, str(real_log))
        assert out.returncode == 0, out.stderr
        return out.stdout.splitlines()

    def expected(keep) -> list[bytes]:
        return [line for line, event in zip(raw, events, strict=True) if keep(event)]

    assert shown() == raw  # --json: the lines unchanged
    assert shown("--event", "conn.*") == expected(lambda e: e["event"].startswith("conn."))
    assert len(shown("--event", "conn.close")) == ECHO_N + DAYTIME_N
    assert shown("--event", "conn.open", "--event", "daemon.*") == expected(
        lambda e: e["event"] == "conn.open" or e["event"].startswith("daemon.")
    )
    assert shown("--service", "daytime") == expected(lambda e: e.get("service") == "daytime")
    assert shown("--peer", "127.0.0.1") == expected(lambda e: e.get("peer", "").startswith("127.0.0.1:"))
    assert shown("--peer", "127.0.0.0/8") == shown("--peer", "127.0.0.1")
    assert shown("--peer", "::1") == []
    assert shown("--level", "warning") == expected(lambda e: e["level"] in ("warning", "error"))
    assert len(shown("--level", "warning")) == 1  # the refused discard connection
    middle = events[len(events) // 2]["timestamp"]
    assert shown("--since", middle) == expected(lambda e: e["timestamp"] >= middle)
    assert shown("--until", middle) == expected(lambda e: e["timestamp"] < middle)
    out = evd_logs("show", "--peer", "nonsense", str(real_log))
    assert out.returncode == 2 and b"--peer" in out.stderr


def test_show_renders_for_a_person(real_log):
    piped = evd_logs("show", "--event", "conn.close", "--service", "echo", str(real_log))
    lines = piped.stdout.decode().splitlines()
    assert len(lines) == ECHO_N
    assert b"\033[" not in piped.stdout  # plain when piped
    first = lines[0].split()
    assert datetime.fromisoformat(f"{first[0]}T{first[1]}")  # "2026-01-01 10:00:00.123456"
    assert first[2:4] == ["info", "conn.close"]
    assert "service=echo" in first and "bytes_in=5" in first and "reason=eof" in first

    # on a terminal: colours (NO_COLOR unset)
    main, sub = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"} | {"TERM": "xterm"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "evd", "logs", "show", "--event", "conn.close", str(real_log)],
        stdout=sub,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
        env=env,
    )
    os.close(sub)
    output = b""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        ready, _, _ = select.select([main], [], [], deadline - time.monotonic())
        if not ready:
            break
        try:
            chunk = os.read(main, 65536)
        except OSError:  # EIO: the other side is closed
            break
        if not chunk:
            break
        output += chunk
    os.close(main)
    assert proc.wait(WAIT) == 0
    assert b"\033[32minfo" in output and b"conn.close" in output
    assert output.count(b"conn.close") == ECHO_N + DAYTIME_N


class Show:
    """`evd logs show -f --json ...` running, its output lines queued."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "evd", "logs", "show", "-f", "--json", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
        )
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def next(self) -> dict:
        item = self.lines.get(timeout=WAIT)
        assert item is not None, self.proc.stderr.read().decode()
        return item

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(WAIT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(WAIT)


@pytest.mark.no_workers_variant(
    "conn ids step by workers + 1; test_workers_lifecycle follows rotations with workers"
)
def test_follow_across_a_logrotate_rename(start_evd, tmp_path):
    evd, log = start_logged(start_evd, tmp_path)
    echo = address(log, "echo")
    for _ in range(12):
        echo_once(echo)
    wait_count(log, 12, "conn.close", service="echo")
    conns = [e["conn"] for e in log.find("conn.close", service="echo")]
    show = Show("--event", "conn.close", str(tmp_path / "evd.log"))
    try:
        # like tail -f: the last 10 selected lines first
        assert [show.next()["conn"] for _ in range(10)] == conns[-10:]
        echo_once(echo)
        assert show.next()["conn"] == conns[-1] + 1  # a line as it is written
        # logrotate: rename; evd writes to the renamed file until SIGUSR1
        os.rename(tmp_path / "evd.log", tmp_path / "evd.log.1")
        echo_once(echo)
        assert show.next()["conn"] == conns[-1] + 2
        evd.send(signal.SIGUSR1)
        reopened = LogFile(tmp_path / "evd.log")
        reopened.wait_for("log.reopen")
        echo_once(echo)
        echo_once(echo)
        assert [show.next()["conn"], show.next()["conn"]] == [conns[-1] + 3, conns[-1] + 4]
        assert reopened.find("conn.close", conn=conns[-1] + 4)  # it came from the new file
        # and again, the new file moved away in turn
        os.rename(tmp_path / "evd.log", tmp_path / "evd.log.2")
        evd.send(signal.SIGUSR1)
        LogFile(tmp_path / "evd.log").wait_for("log.reopen")
        echo_once(echo)
        assert show.next()["conn"] == conns[-1] + 5
    finally:
        status = show.stop()
        evd.stop()
    assert status == 0
    assert show.lines.get(timeout=WAIT) is None  # nothing more than that


def test_a_reader_that_leaves_early(real_log, tmp_path):
    """`evd logs show | head -1`: no traceback, exit 0."""
    big = tmp_path / "big.log"
    big.write_bytes(real_log.read_bytes() * 400)  # far more than a pipe holds
    for verb in ("show", "summary --top 0"):
        proc = subprocess.Popen(
            [sys.executable, "-m", "evd", "logs", *verb.split(), str(big)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
        )
        assert proc.stdout.readline()
        proc.stdout.close()
        assert proc.wait(WAIT) == 0
        assert proc.stderr.read() == b""
        proc.stderr.close()


def test_follow_on_stdin_shows_it_whole(real_log):
    """-f follows files; stdin is read to its end and shown whole, not
    cut to the last lines that -f begins a followed file with."""
    with open(real_log, "rb") as stdin:
        out = evd_logs("show", "-f", "--json", stdin=stdin)
    assert out.returncode == 0
    assert out.stdout.splitlines() == real_log.read_bytes().splitlines()
    assert len(out.stdout.splitlines()) > 10
