"""The servers under test: evd (as configured for a load) and the peers.

Every server listens on port 0 and we read the real ports back: the peers
print "ready TCPPORT UDPPORT"; evd at log level warning logs nothing at start,
so its listening sockets are found in /proc (its descriptors' inodes matched
against /proc/net/{tcp,udp}; the service under test on 127.0.0.1, anything a
load adds on other loopback addresses), and one echo or hello proves it serves.
Every wait has a deadline; `start_server` is a context manager that always
stops what it started (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import certs

from evd.proto.proxy import v2_header
from evd.tools.bench.probes import process_tree

HERE = Path(__file__).resolve().parent
PEERS = HERE / "peers"
PY = sys.executable
SERVERS = ("evd", "asyncio", "uvloop", "twisted", "minimal")
EXTRA = ("evd-w2",)  # evd with workers = 2 (the workers2 load)
# evd as it was at an earlier commit (`run.py --baseline REV`): its code is
# unpacked here, and "evd-base" runs it with the same configuration.
BASELINE = "evd-base"
BASELINE_SRC: list[Path] = []
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
PRIME_CONNECTIONS = 4

# evd's configuration for a load: a head, its limits, the services.
HEAD = """\
# evd for the benchmark: {what}, one service listening.
[daemon]
pidfile = "{tmp}/evd.pid"
shutdown_timeout = 1.0
workers = {workers}

[log]
level = "{level}"
format = "json"
file = "{log_file}"
"""
# Every limit opened: what the server costs with nothing to check.
OPENED = """
[limits]
max_connections = 1000000
per_source = 1000000
rate = 0.0
"""
# The default limits are evd's own (no [limits] table at all: rate buckets,
# per_source, max_connections as `evd check-config` shows them), plus access
# lists as a site has them: an only_from that admits the generator and a
# no_access it does not match, both checked for every connection and datagram.
ACCESS = """\
only_from = ["127.0.0.0/8"]
no_access = ["192.0.2.0/24"]
"""
SERVICES = """
[services.echo]
enabled = {echo}
tcp = ["127.0.0.1:0"]
udp = ["127.0.0.1:0"]
{echo_extra}
[services.daytime]
enabled = false

[services.time]
enabled = false

[services.timefmt]
enabled = false

[services.framed]
enabled = {framed}
tcp = ["127.0.0.1:0"]
{framed_extra}"""
# Where the service under test listens; a load's own listeners (a metrics
# port, say) take other loopback addresses, so they are told apart in /proc.
SERVICE_HOST = "127.0.0.1"


class ServerError(Exception):
    pass


@dataclass(frozen=True)
class EvdSetup:
    """How evd is configured for a load (the peers have no configuration)."""

    level: str = "warning"
    limits: str = "opened"  # or "default"
    service: str = ""  # TOML lines for the service under test's table
    tables: str = ""  # TOML tables appended to the file
    tls: bool = False  # echo on a TLS listener instead of TCP (the TLS loads)


def evd_config(
    tmp: Path,
    setup: EvdSetup,
    echo: bool,
    framed: bool,
    workers: int = 1,
    log_file: str | None = None,
) -> str:
    if setup.limits not in ("opened", "default"):
        raise ValueError(f"limits: opened or default, not {setup.limits!r}")
    default = setup.limits == "default"
    extra = (ACCESS if default else "") + (setup.service + "\n" if setup.service else "")
    head = HEAD.format(
        what="default limits" if default else "every limit opened",
        tmp=tmp,
        level=setup.level,
        workers=workers,
        log_file=f"{tmp}/evd.log" if log_file is None else log_file,
    )
    services = SERVICES.format(
        echo=str(echo).lower(),
        framed=str(framed).lower(),
        echo_extra=extra if echo else "",
        framed_extra=extra if framed else "",
    )
    if setup.tls:  # the one stream listener of the service is TLS
        services = services.replace(
            'enabled = true\ntcp = ["127.0.0.1:0"]',
            f'enabled = true\ntcp = []\ntls = ["127.0.0.1:0"]\ntls_cert = "{tmp}/server.pem"\n'
            f'tls_key = "{tmp}/server.key"',
            1,
        )
    return head + ("" if default else OPENED) + services + (setup.tables and "\n" + setup.tables)


@dataclass
class Running:
    name: str
    proc: subprocess.Popen
    tcp_port: int = 0
    udp_port: int = 0
    # evd: every listening (proto, host, port), the service's and a load's own
    listeners: frozenset[tuple[str, str, int]] = frozenset()
    cafile: Path | None = None  # a TLS load: the CA the generator trusts

    @property
    def pid(self) -> int:
        return self.proc.pid


def _read_line(proc: subprocess.Popen, stream, want, timeout: float) -> str:
    """The first line of `stream` for which want(line) is true, within `timeout`."""
    deadline = time.monotonic() + timeout
    buf, seen = b"", []
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        while True:
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                text = line.decode("utf-8", "replace")
                if want(text):
                    return text
                seen.append(text)
            left = deadline - time.monotonic()
            if left <= 0:
                raise ServerError(f"no ready line within {timeout:.0f}s")
            if sel.select(left):
                chunk = os.read(stream.fileno(), 65536)
                if not chunk:
                    raise ServerError(
                        f"exited ({proc.wait(5)}) before it was ready: "
                        + " | ".join((seen + [buf.decode("utf-8", "replace")])[-2:])
                    )
                buf += chunk


def listening_ports(pid: int) -> set[tuple[str, str, int]]:
    """(proto, host, port) of every TCP listening and UDP bound socket of pid
    and its descendants (IPv4 only: the benchmark's servers use 127/8)."""
    inodes = set()
    for p in process_tree(pid):
        try:
            fds = os.listdir(f"/proc/{p}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{p}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(int(link[8:-1]))
    found = set()
    for proto, state in (("tcp", "0A"), ("udp", "07")):  # LISTEN; UDP's "closed" = bound
        with open(f"/proc/net/{proto}") as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[3] == state and int(parts[9]) in inodes:
                    host, port = parts[1].split(":")
                    # the address in network order, printed as a host-order word
                    ip = socket.inet_ntoa(int(host, 16).to_bytes(4, sys.byteorder))
                    found.add((proto, ip, int(port, 16)))
    return found


def _wait_evd(srv: Running, echo: bool, workers: int, stderr_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if srv.proc.poll() is not None:
            raise ServerError(f"evd exited {srv.proc.returncode}: {_tail(stderr_path)}")
        listeners = listening_ports(srv.pid)
        tcp = {port for proto, host, port in listeners if (proto, host) == ("tcp", SERVICE_HOST)}
        udp = {port for proto, host, port in listeners if (proto, host) == ("udp", SERVICE_HOST)}
        children = len(process_tree(srv.pid)) - 1
        if len(tcp) == 1 and len(udp) == (1 if echo else 0) and (workers == 1 or children >= workers):
            break
        if time.monotonic() > deadline:
            raise ServerError(
                f"evd not listening within {START_TIMEOUT:.0f}s (tcp {tcp}, udp {udp}, "
                f"{children} children): {_tail(stderr_path)}"
            )
        time.sleep(0.02)  # polling /proc for a condition, under a deadline
    srv.tcp_port = tcp.pop()
    srv.udp_port = udp.pop() if udp else 0
    srv.listeners = frozenset(listeners)


def prime(tcp_port: int, udp_port: int, echo: bool, cafile: Path | None = None, header: bytes = b"") -> None:
    """Warm a fresh server the same way for everyone: a few connections that
    echo and close (or take the framed hello and close), and a datagram.

    It also proves the loop serves, not just that the port is bound.  And it
    matters for asyncio: its transports recv(256 KiB), above glibc's mmap
    threshold, so until some connection reads EOF -- freeing one such buffer
    unshrunk, which raises glibc's dynamic threshold -- every recv costs an
    mmap, mremap and munmap (a fresh asyncio UDP echo runs at a quarter of its
    speed).  A long-running server has seen many closes; so has a primed one.
    Behind the PROXY protocol each connection sends `header` first.
    """
    tls = ssl.create_default_context(cafile=str(cafile)) if cafile else None
    for _ in range(PRIME_CONNECTIONS):
        sock = socket.create_connection(("127.0.0.1", tcp_port), timeout=START_TIMEOUT)
        try:
            if header:
                sock.sendall(header)
            if tls:
                sock = tls.wrap_socket(sock, server_hostname="127.0.0.1")
            if echo:
                sock.sendall(b"prime")
                _recv_all(sock, 5, "echo", tcp_port)
                if isinstance(sock, ssl.SSLSocket):  # TLS's EOF first: close_notify both ways
                    sock = sock.unwrap()
                sock.shutdown(socket.SHUT_WR)
                _recv_all(sock, 0, "close after EOF", tcp_port)
            else:
                _recv_all(sock, 4, "framed hello", tcp_port)
        finally:
            sock.close()
    if udp_port:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(START_TIMEOUT)
            sock.connect(("127.0.0.1", udp_port))
            sock.send(b"prime")
            if sock.recv(64) != b"prime":
                raise ServerError(f"UDP echo on port {udp_port} answered wrong")


def _recv_all(sock, n: int, what: str, port: int) -> None:
    """Read n bytes (n = 0: until EOF) or fail naming what was expected."""
    got = b""
    while n == 0 or len(got) < n:
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    if len(got) < n or (n == 0 and got):
        raise ServerError(f"port {port}: no {what} (got {got[:40]!r})")


def _tail(path: Path) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-3:])
    except OSError:
        return ""


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


@contextlib.contextmanager
def start_server(name: str, load, tmp: Path, prefix: list[str]):
    """Start `name` fresh for `load` (pinned by `prefix`); yield a Running."""
    cafile = certs.make(tmp).ca if load.tls else None
    if name in ("evd", "evd-w2", BASELINE):
        workers = 2 if name == "evd-w2" else 1
        echo = load.mode != "framed"
        config = tmp / "evd.toml"
        setup = replace(load.evd, tls=True) if load.tls else load.evd
        config.write_text(evd_config(tmp, setup, echo=echo, framed=not echo, workers=workers))
        stderr_path = tmp / "evd.stderr"
        env = dict(os.environ, PYTHONPATH=str(BASELINE_SRC[0])) if name == BASELINE else None
        with open(stderr_path, "wb") as err:
            proc = subprocess.Popen(
                prefix + [PY, "-m", "evd", "run", "-c", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                cwd=tmp,
                env=env,
            )
        srv = Running(name, proc, cafile=cafile)
        try:
            _wait_evd(srv, echo, workers, stderr_path)
            header = v2_header(("127.0.0.1", 1)) if "--proxy-v2" in load.bench_args else b""
            prime(srv.tcp_port, srv.udp_port, echo, cafile, header)
            yield srv
        finally:
            _stop(proc)
            for leftover in ("evd.log", "evd.stderr"):
                with contextlib.suppress(OSError):
                    os.unlink(tmp / leftover)
        return
    script = PEERS / f"{name}_tls_echo.py" if load.tls else PEERS / f"{name}_echo.py"
    tls_args = ["--cert", str(tmp / "server.pem"), "--key", str(tmp / "server.key")] if load.tls else []
    proc = subprocess.Popen(
        prefix + [PY, "-u", str(script), "--port", "0", *tls_args],
        cwd=PEERS,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        line = _read_line(proc, proc.stdout, lambda text: text.startswith("ready "), START_TIMEOUT)
        _, tcp, udp = line.split()
        prime(int(tcp), int(udp), echo=True, cafile=cafile)
        yield Running(name, proc, int(tcp), int(udp), cafile=cafile)
    finally:
        _stop(proc)


def startup_time(tmp: Path, prefix: list[str]) -> float:
    """Seconds from spawning `evd run` (echo + framed, log info on stderr) to
    reading its `daemon.ready` line."""
    config = tmp / "evd-startup.toml"
    config.write_text(evd_config(tmp, EvdSetup(level="info"), echo=True, framed=True, log_file=""))
    started = time.monotonic()
    proc = subprocess.Popen(
        prefix + [PY, "-m", "evd", "run", "-c", str(config)],
        cwd=tmp,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _read_line(proc, proc.stderr, lambda text: _event(text) == "daemon.ready", START_TIMEOUT)
        return time.monotonic() - started
    finally:
        _stop(proc)


def _event(line: str) -> str | None:
    try:
        return json.loads(line).get("event")
    except (ValueError, AttributeError):
        return None


def workers_fork(tmp: Path, prefix: list[str]) -> bool | str:
    """True if evd accepts workers = 2 and really forks two workers; else why not."""
    config = tmp / "evd-workers.toml"
    config.write_text(evd_config(tmp, EvdSetup(), echo=True, framed=False, workers=2))
    check = subprocess.run(
        [PY, "-m", "evd", "check-config", "-c", str(config)], capture_output=True, text=True, timeout=60
    )
    if check.returncode != 0:
        return f"check-config refuses workers = 2: {check.stderr.strip()[:200]}"
    proc = subprocess.Popen(
        prefix + [PY, "-m", "evd", "run", "-c", str(config)],
        cwd=tmp,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    srv = Running("evd-w2", proc)
    try:
        _wait_evd(srv, True, 2, tmp / "none")
        return True
    except ServerError as exc:
        return f"evd with workers = 2 did not fork two listening workers: {exc}"
    finally:
        _stop(proc)
