"""A real `evd run` process on free ports, and real clients.

`EvdProcess` starts `python -m evd run -c FILE` with every listener on port 0
(the kernel picks), reads its JSON log from stderr on a thread, and learns
the actual addresses from the `listener.open` events.  Every wait is bounded;
every process is stopped by the fixture that started it.
"""

from __future__ import annotations

import json
import os
import queue
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis.configuration import set_hypothesis_home_dir

ROOT = Path(__file__).resolve().parents[2]

# Hypothesis keeps caches (its Unicode tables) in ./.hypothesis; under
# .pytest_cache they stay with pytest's own, out of the checkout's top level.
set_hypothesis_home_dir(str(ROOT / ".pytest_cache" / "hypothesis"))
WAIT = 10.0  # seconds: the bound on every wait for the daemon
# Start-up alone: a Python interpreter, every module, a supervisor and its
# workers.  On a shared 2-core machine under a load of 20+, that took
# longer than WAIT; a slow start is not what these tests test.
START_WAIT = 3 * WAIT


def services_off(*names: str) -> str:
    """TOML that turns the named services off: a test's configuration says
    only what it runs, and this the rest (the defaults enable them)."""
    return "".join(f"\n[services.{name}]\nenabled = false\n" for name in names)


BASE_CONFIG = """\
[daemon]
pidfile = "{tmp}/evd.pid"
shutdown_timeout = 5.0

[log]
level = "info"
format = "json"

[limits]
max_connections = 5000
per_source = 5000
rate = 0.0

[services.echo]
tcp = ["127.0.0.1:0"]
udp = ["127.0.0.1:0"]
unix = ["{tmp}/echo.sock"]

[services.discard]
enabled = true
tcp = ["127.0.0.1:0"]
udp = ["127.0.0.1:0"]

[services.chargen]
enabled = true
tcp = ["127.0.0.1:0"]
udp = ["127.0.0.1:0"]

[services.daytime]
tcp = ["127.0.0.1:0"]
udp = ["127.0.0.1:0"]

[services.time]
tcp = ["127.0.0.1:0"]
udp = ["127.0.0.1:0"]

[services.timefmt]
tcp = ["127.0.0.1:0"]
udp = ["127.0.0.1:0"]

[services.framed]
tcp = ["127.0.0.1:0"]
unix = ["{tmp}/framed.sock"]

[commands.greet]
argv = ["echo", "hello"]
args = true

[commands.sleep]
argv = ["sleep"]
args = true
"""


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (.ci/run installs it from Debian)")
    return path


class ConfigFile(type(Path())):
    """A daemon's configuration file.  What a test writes to it passes
    through `adjust` first, at start and for every reload after: the
    fixtures' `workers = 2` stays in a rewritten file (tests/conftest.py)."""

    def adjust(self, text: str) -> str:
        return text

    def write_text(self, data, *args, **kwargs):
        return super().write_text(self.adjust(data), *args, **kwargs)


def config_file(path: Path, adjust=None) -> ConfigFile:
    config = ConfigFile(path)
    if adjust is not None:
        config.adjust = adjust
    return config


class EvdProcess:
    """`evd run` in the foreground.  `prefix` goes before the command (an
    exec wrapper, say), `pass_fds` are inherited by it; `adjust` rewrites
    every configuration written (ConfigFile)."""

    def __init__(self, tmp: Path, config: str, args=(), env=None, prefix=(), pass_fds=(), adjust=None):
        self.tmp = tmp
        self.config_path = config_file(tmp / "evd.toml", adjust)
        self.config_path.write_text(config.format(tmp=tmp))
        self.events: list[dict] = []
        self.raw: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        full_env = dict(os.environ, PYTHONUNBUFFERED="1")
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "evd", "run", "-c", str(self.config_path), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            env=full_env,
            pass_fds=pass_fds,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            text = line.decode("utf-8", "replace").rstrip("\n")
            self.raw.append(text)
            try:
                event = json.loads(text)
            except ValueError:
                continue
            self._queue.put(event)
        self._queue.put(None)

    def wait_for(self, event: str, timeout: float = WAIT, **fields) -> dict:
        """The first logged `event` whose fields match, waiting if need be."""
        return self.wait_for_since(0, event, timeout, **fields)

    def wait_for_since(self, mark: int, event: str, timeout: float = WAIT, **fields) -> dict:
        """Like wait_for, among the events from index `mark` of `events` on
        (take the mark with len(drain_events()) before causing the event)."""
        deadline = time.monotonic() + timeout
        index = mark
        while True:
            for seen in self.events[index:]:
                if seen.get("event") == event and all(seen.get(k) == v for k, v in fields.items()):
                    return seen
            index = max(index, len(self.events))
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"no {event} {fields} within {timeout}s; log:\n" + "\n".join(self.raw[-30:])
                )
            try:
                item = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if item is None:
                self._queue.put(None)
                raise AssertionError(
                    f"evd exited before {event} {fields}; log:\n" + "\n".join(self.raw[-30:])
                )
            self.events.append(item)

    def drain_events(self) -> list[dict]:
        """Every event logged so far (non-blocking)."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return self.events
            if item is None:
                self._queue.put(None)
                return self.events
            self.events.append(item)

    def ready(self) -> EvdProcess:
        self.wait_for("daemon.ready", timeout=START_WAIT)
        self.addresses = {}
        for ev in self.events:
            if ev.get("event") == "listener.open":
                self.addresses.setdefault((ev["service"], ev["proto"]), ev["address"])
        return self

    def addr(self, service: str, proto: str = "tcp") -> tuple[str, int]:
        host, _, port = self.addresses[(service, proto)].rpartition(":")
        return host.strip("[]"), int(port)

    def send(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = WAIT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(WAIT)
                raise AssertionError("evd did not stop in time") from None
        self._reader.join(WAIT)
        self.drain_events()
        return self.proc.returncode


# Client addresses that the kernel steers to different workers (see
# evd/server/sockets.py, worker_for): with workers = 2, 127.0.0.1 lands on
# worker 0 and 127.0.0.2 on worker 1.  Tests that need both workers busy
# connect from each in turn.
SPREAD = ("127.0.0.1", "127.0.0.2")


def connect(address: tuple[str, int], timeout: float = WAIT, source: str | None = None) -> socket.socket:
    """A TCP connection to `address`, from `source` (an IP) if given."""
    return socket.create_connection(address, timeout=timeout, source_address=(source, 0) if source else None)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(65536, n - got))
        if not chunk:
            raise AssertionError(f"connection closed after {got} of {n} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv_all(sock: socket.socket) -> bytes:
    """Everything until the server closes."""
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


# -- daemons started with `evd start` -------------------------------------------


def process_gone(pid: int, timeout: float = WAIT) -> bool:
    """Wait (bounded) for `pid` to exit, through a pidfd: readable at exit,
    zombie or not (this container's init does not reap orphans)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([pidfd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(pidfd)


class LogFile:
    """Follows a JSON log file that the daemon writes (and logrotate may
    rename): events are read as they are appended."""

    def __init__(self, path: Path):
        self.path = path
        self.events: list[dict] = []
        self._offset = 0

    def _read_new(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.splitlines():
            try:
                self.events.append(json.loads(line))
            except ValueError:
                pass

    def find(self, event: str, **fields) -> list[dict]:
        self._read_new()
        return [
            e
            for e in self.events
            if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
        ]

    def wait_for(self, event: str, timeout: float = WAIT, **fields) -> dict:
        """The first `event` with `fields`; polls the file (a log line is the
        event to wait for, and files offer no notification we can rely on)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.find(event, **fields)
            if found:
                return found[0]
            if time.monotonic() > deadline:
                tail = "\n".join(json.dumps(e) for e in self.events[-20:])
                raise AssertionError(f"no {event} {fields} in {self.path} within {timeout}s; tail:\n{tail}")
            time.sleep(0.02)

    def addresses(self) -> dict:
        found = {}
        for ev in self.find("listener.open"):
            found.setdefault((ev["service"], ev["proto"]), ev["address"])
        return found


class Control:
    """`evd start/stop/status/reload` on one configuration file; whatever it
    started is stopped at teardown (SIGTERM, then SIGKILL, by pid)."""

    def __init__(self, tmp: Path, adjust=None):
        self.tmp = tmp
        self.config_path = config_file(tmp / "evd.toml", adjust)  # workers = 2 for a [w2] test
        self.pidfile = tmp / "evd.pid"
        self.log = LogFile(tmp / "evd.log")
        self.pids: list[int] = []

    def write(self, config: str, **extra) -> Path:
        self.config_path.write_text(config.format(tmp=self.tmp, **extra))
        return self.config_path

    def __call__(self, *args, timeout: float = 3 * WAIT) -> subprocess.CompletedProcess:
        out = subprocess.run(
            [sys.executable, "-m", "evd", *args, "-c", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
        )
        if args[0] == "start" and out.returncode == 0:
            self.pids.append(int(out.stdout.split()[-1]))
        return out

    def start(self) -> int:
        out = self("start")
        assert out.returncode == 0, out.stderr
        return self.pids[-1]

    def cleanup(self) -> None:
        for pid in self.pids:
            try:  # still ours?  A stopped daemon's pid may be someone else's by now
                if b"evd" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                    continue
            except OSError:
                continue
            for signum in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    break
                if process_gone(pid):
                    break


def logged_config(config: str) -> str:
    """`config` with the log going to {tmp}/evd.log (for `evd start`)."""
    return config.replace("[log]\n", '[log]\nfile = "{tmp}/evd.log"\n', 1)


class NotifySocket:
    """What systemd listens on for sd_notify: a datagram socket that also
    learns the sender's pid (SO_PASSCRED), so a test can tell who spoke."""

    def __init__(self, address: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.sock.settimeout(WAIT)

    def expect(self, line: str) -> tuple[dict, int]:
        """The next message containing `line`: (its fields, the sender's pid)."""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            pid = next(
                (
                    struct.unpack("iII", d)[0]
                    for level, kind, d in ancillary
                    if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
                ),
                None,
            )
            lines = data.decode().split("\n")
            if line in lines:
                return dict(item.split("=", 1) for item in lines), pid
        raise AssertionError(f"no {line} within {WAIT}s")

    def close(self) -> None:
        self.sock.close()
