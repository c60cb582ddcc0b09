"""Issue 23 item 9: with workers, a terminal on hold must never get torn
lines.  A real pty (python's `pty`) is evd's stderr, `workers = 2` both
write to it, the reader stops reading (what Ctrl-S does to a terminal:
writes take part of a line, or nothing) and then reads again: every line
is whole."""

from __future__ import annotations

import json
import os
import pty
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from support.daemon import ROOT, SPREAD, WAIT

CONFIG = """\
[daemon]
pidfile = "{tmp}/evd.pid"
shutdown_timeout = 2.0
workers = 2

[log]
level = "info"
format = "json"

[limits]
rate = 0.0

[services.echo]
tcp = ["127.0.0.1:0"]
udp = []

[services.discard]
enabled = false
[services.daytime]
enabled = false
[services.time]
enabled = false
[services.timefmt]
enabled = false
[services.framed]
enabled = false
"""
CONNECTIONS = 600  # ~1,200 lines, ~200 KB: far past what a pty holds unread
CLIENTS = 4


class Terminal:
    """The master side of a pty whose slave is evd's stderr."""

    def __init__(self) -> None:
        self.master, self.slave = pty.openpty()
        self.data = b""

    def read_for(self, until) -> None:
        """Read until `until(data)` says enough (bounded by WAIT)."""
        deadline = time.monotonic() + WAIT
        while not until(self.data):
            left = deadline - time.monotonic()
            assert left > 0, self.data[-2000:]
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    self.data += os.read(self.master, 65536)
                except OSError:  # EIO: every slave closed
                    return

    def lines(self) -> list[bytes]:
        return self.data.replace(b"\r\n", b"\n").split(b"\n")

    def close(self) -> None:
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass


def echo(address: tuple[str, int], count: int, source: str) -> None:
    for _ in range(count):
        with socket.create_connection(address, timeout=WAIT, source_address=(source, 0)) as sock:
            sock.sendall(b"x" * 32)
            got = b""
            while len(got) < 32:
                chunk = sock.recv(64)
                assert chunk
                got += chunk


def test_two_workers_on_a_terminal_on_hold_write_whole_lines(tmp_path: Path):
    config = tmp_path / "evd.toml"
    config.write_text(CONFIG.format(tmp=tmp_path))
    tty = Terminal()
    proc = subprocess.Popen(
        [sys.executable, "-m", "evd", "run", "-c", str(config)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=tty.slave, cwd=ROOT,
    )  # fmt: skip
    try:
        tty.read_for(lambda data: data.count(b'"daemon.ready"') >= 1
                     and data.count(b'"listener.open"') >= 1)  # fmt: skip
        opened = next(json.loads(line) for line in tty.lines() if b'"listener.open"' in line)
        host, _, port = opened["address"].rpartition(":")
        address = (host, int(port))
        # The reader stops: the terminal's buffer fills, writes go part way.
        # Clients from both SPREAD addresses, so that both workers write
        # (the kernel steers one client address to one worker).
        clients = [
            threading.Thread(target=echo, args=(address, CONNECTIONS // CLIENTS, SPREAD[i % 2]))
            for i in range(CLIENTS)
        ]
        for client in clients:
            client.start()
        for client in clients:
            client.join(3 * WAIT)
        # ... and reads again: every line evd wrote comes, whole.
        tty.read_for(lambda data: data.count(b'"conn.close"') >= CONNECTIONS)
    finally:
        proc.terminate()
        proc.wait(WAIT)
        tty.close()
    lines = tty.lines()[:-1]
    torn = [line for line in lines if not _whole(line)]
    assert not torn, torn[:5]
    pids = {json.loads(line)["pid"] for line in lines if b'"conn.close"' in line}
    assert len(pids) == 2  # both workers wrote


def _whole(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False
