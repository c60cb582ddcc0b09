"""`evd bench`: a bounded load generator for evd's echo and framed ports.

What it is for
--------------
An operator's tool, the way redis-benchmark is Redis's: point it at an
address, get requests per second, latency percentiles and, given the
server's pid, what each request cost the server in CPU.  It is client side
only: its own `selectors` loops, nothing from the daemon but the frame codec.

How a run goes
--------------
The connections are spread over `processes` forked workers (one Python
process is roughly one core's worth of load).  Each worker sets up its
connections, says it is ready, and waits for one shared start time; then
every worker warms up for `warmup` seconds and measures for `duration`
seconds by the same (system-wide monotonic) clock, so the parent can sample
the server's CPU over exactly the measured window.  Requests completed in
the window are counted and their latencies kept; requests still in flight at
the end are dropped without blame.  Every wait has a deadline and every run
ends by itself.

Modes (each request is verified byte for byte; a wrong answer is an error):
- tcp      C connections, each sends S bytes and waits for them to come back.
- udp      C sockets, one datagram outstanding each; one not answered within
           UDP_LOST seconds is lost (and a late answer is ignored).
- connect  one connection per request: connect, S-byte echo, close; C in
           flight.
- framed   C framed connections, D echo requests in flight on each.
- idle     open C connections (each checked by one echo), hold them for
           `duration`, check that none was closed, echo-check a sample.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import multiprocessing
import os
import resource
import selectors
import socket
import struct
import time
from collections import Counter, deque
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_any

from evd.proto.framing import Decoder, FrameError, encode

MODES = ("tcp", "udp", "connect", "framed", "idle")
DEFAULT_CONNECTIONS = {"tcp": 50, "udp": 20, "connect": 20, "framed": 50, "idle": 1000}
# Bounded runs: a typo cannot make a benchmark run for an hour.
MAX_DURATION = 300.0
MAX_WARMUP = 60.0
MAX_SIZE = 65507  # the largest UDP payload; streams use the same cap
MAX_DEPTH = 1024
# A stream request unanswered this long is an error (the server stalled).
STALL = 2.0
# A datagram unanswered this long is lost; its answer, if late, is ignored.
UDP_LOST = 0.2
# Connection set-up (idle mode opens thousands) and each blocking step in it.
SETUP_TIMEOUT = 120.0
STEP_TIMEOUT = 5.0
# connect: source ports tried before a session counts as failed.
PORT_TRIES = 64
# idle: connections echo-checked after the hold.
IDLE_SAMPLE = 100
# Distinct payloads per run, used in turn, so a stale answer cannot pass.
VARIANTS = 256
# Linux's IP_BIND_ADDRESS_NO_PORT (Python has the name from 3.12 on).
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
_TICK = 0.05  # loop wake-up when nothing happens
_RECV = 65536
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """The run could not be set up (bad target, refused, too few fds)."""


@dataclass
class Options:
    mode: str = "tcp"
    address: str = "127.0.0.1:7007"
    connections: int = 0  # 0: the mode's default
    size: int = 64
    duration: float = 5.0
    warmup: float = 1.0
    processes: int = 1
    depth: int = 1
    server_pid: int = 0
    allow_remote: bool = False

    def check(self) -> None:
        if self.mode not in MODES:
            raise BenchError(f"unknown mode {self.mode!r}; one of {', '.join(MODES)}")
        if not self.connections:
            self.connections = DEFAULT_CONNECTIONS[self.mode]
        problems = [
            f"{name} must be in [{lo}, {hi}], got {value}"
            for name, value, lo, hi in (
                ("connections", self.connections, 1, 100000),
                ("size", self.size, 1, MAX_SIZE),
                ("duration", self.duration, 0.1, MAX_DURATION),
                ("warmup", self.warmup, 0, MAX_WARMUP),
                ("processes", self.processes, 1, 64),
                ("depth", self.depth, 1, MAX_DEPTH),
            )
            if not lo <= value <= hi
        ]
        if problems:
            raise BenchError("; ".join(problems))
        self.processes = min(self.processes, self.connections)


# -- the target ---------------------------------------------------------------


def resolve(address: str, mode: str, allow_remote: bool = False) -> tuple[int, object]:
    """ "HOST:PORT", "[V6]:PORT" or "unix:PATH" -> (family, sockaddr); only
    loopback unless `allow_remote` (a load test aimed elsewhere is an attack)."""
    if address.startswith("unix:"):
        if mode == "udp":
            raise BenchError("udp needs an IP address, not a UNIX socket")
        return socket.AF_UNIX, address[5:]
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise BenchError(f"bad address {address!r}: expected HOST:PORT, [V6]:PORT or unix:PATH")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    kind = socket.SOCK_DGRAM if mode == "udp" else socket.SOCK_STREAM
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(host or "127.0.0.1", int(port), 0, kind)[0]
    except socket.gaierror as exc:
        raise BenchError(f"cannot resolve {host!r}: {exc.strerror}") from None
    ip = ipaddress.ip_address(sockaddr[0].split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    if not ip.is_loopback and not allow_remote:
        raise BenchError(f"refusing non-loopback target {sockaddr[0]} (give --allow-remote if you mean it)")
    return family, sockaddr


# -- the server, seen from /proc -------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (a supervisor and its workers)."""
    pids, i = [pid], 0
    while i < len(pids):
        try:
            with open(f"/proc/{pids[i]}/task/{pids[i]}/children") as f:
                pids.extend(int(p) for p in f.read().split())
        except OSError:
            pass
        i += 1
    return pids


def process_cpu(pid: int) -> float:
    """utime + stime of pid and its live descendants, in seconds."""
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _CLK_TCK


def process_rss_kb(pid: int) -> int:
    """VmRSS of pid and its live descendants, in KiB."""
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total


def _core_of(pid: int) -> int | None:
    try:
        cpus = os.sched_getaffinity(pid)
    except OSError:
        return None
    return next(iter(cpus)) if len(cpus) == 1 else None


def core_busy(cpu: int) -> float:
    """Busy seconds of one CPU (user+nice+system+irq+softirq) from /proc/stat:
    the whole cost of a server pinned there, kernel loopback work included."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                v = [int(x) for x in line.split()[1:8]]
                return (v[0] + v[1] + v[2] + v[5] + v[6]) / _CLK_TCK
    return 0.0


class ServerProbe:
    """Samples the server's CPU over the measured window (if given a pid)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.core = _core_of(pid) if pid else None
        self.cpu0 = self.busy0 = 0.0

    def start(self) -> None:
        if self.pid:
            self.cpu0 = process_cpu(self.pid)
            if self.core is not None:
                self.busy0 = core_busy(self.core)

    def stop(self, requests: int) -> dict:
        if not self.pid:
            return {}
        cpu = process_cpu(self.pid) - self.cpu0
        out = {
            "server_pid": self.pid,
            "server_cpu_s": round(cpu, 3),
            "server_cpu_us_per_req": _per_req(cpu, requests),
        }
        if self.core is not None:
            busy = core_busy(self.core) - self.busy0
            out.update(
                server_core=self.core,
                server_core_busy_s=round(busy, 3),
                server_core_us_per_req=_per_req(busy, requests),
            )
        return out


def _per_req(seconds: float, requests: int) -> float | None:
    return round(seconds / requests * 1e6, 3) if requests else None


# -- payloads -------------------------------------------------------------------


def payloads(size: int) -> list[bytes]:
    """VARIANTS distinct payloads of `size` bytes, each starting with its index."""
    pattern = bytes(range(33, 127)) * (size // 94 + 2)
    return [
        struct.pack(">I", i)[-min(4, size) :] + pattern[i % 94 : i % 94 + max(0, size - 4)]
        for i in range(VARIANTS)
    ]


# -- one worker's loops -------------------------------------------------------------


class Stats:
    """What a worker measured: completions in the window and their latencies."""

    def __init__(self):
        self.requests = 0
        self.errors = 0
        self.lost = 0
        self.latencies: list[int] = []  # ns
        self.cpu = 0.0
        self.why: Counter = Counter()  # error kinds, for the human line

    def error(self, why: str) -> None:
        self.errors += 1
        self.why[why] += 1

    def result(self) -> dict:
        histogram = Counter(ns // 1000 for ns in self.latencies)
        return {
            "requests": self.requests,
            "errors": self.errors,
            "lost": self.lost,
            "cpu": self.cpu,
            "histogram": dict(histogram),
            "why": dict(self.why),
        }


class Window:
    """The shared timeline: warm-up until `start`, measure until `end` (ns)."""

    def __init__(self, t0: float, warmup: float, duration: float):
        self.start = int((t0 + warmup) * 1e9)
        self.end = int((t0 + warmup + duration) * 1e9)
        self.open = False
        self._cpu0 = 0.0

    def tick(self, now: int, stats: Stats) -> bool:
        """False once the run is over; opens the window when its time comes."""
        if not self.open and now >= self.start:
            self.open = True
            self._cpu0 = time.process_time()
        if now >= self.end:
            stats.cpu = time.process_time() - self._cpu0 if self.open else 0.0
            return False
        return True


def source_addresses(family: int, sockaddr) -> list[str]:
    """Where our TCP connections come from: for a 127/8 target, other 127/8
    addresses than the target's; else [] (the kernel's choice).

    The client closes first, so every connection leaves a TIME_WAIT socket on
    the client's address for a minute; a connect run makes tens of thousands.
    Were they on the target's address (127.0.0.1, say), they would crowd the
    ports everyone else on the machine binds and connects from.  From
    127.0.0.2-5 they are in nobody's way.
    """
    if family != socket.AF_INET or not ipaddress.ip_address(sockaddr[0]).is_loopback:
        return []
    return [a for a in ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5") if a != sockaddr[0]]


class SourcePorts:
    """connect mode's source (address, port) pairs, chosen by us.

    With tens of thousands of TIME_WAIT sockets, connect()'s own search for a
    free ephemeral port stalls for milliseconds (it doubled our CPU per
    connection and put 90 ms into p999).  So, like ../shared/bench/loadgen.c,
    each socket is bound (SO_REUSEADDR) to the next pair, and the next one is
    tried when connect() says EADDRNOTAVAIL (a TIME_WAIT younger than a
    second; older ones are reused on loopback, net.ipv4.tcp_tw_reuse).  Unlike
    loadgen, the ports lie *below* the ephemeral range: a port bound
    explicitly is skipped by every other process's connect() while its
    TIME_WAIT lasts, and a whole range of them made everyone's connect() on
    the machine fail with EADDRNOTAVAIL for a minute.
    """

    FIRST = 16384  # clear of the well-known service ports below

    def __init__(self, addresses: list[str]):
        self.addresses = addresses
        try:
            with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
                ephemeral_lo = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            ephemeral_lo = 32768
        self.lo, self.hi = self.FIRST, ephemeral_lo - 1
        self.usable = bool(addresses) and self.hi - self.lo >= 4096
        span = max(1, self.hi - self.lo + 1)
        self.port = self.lo + (os.getpid() * 7919 + time.monotonic_ns() // 1000) % span
        self.which = os.getpid() % max(1, len(addresses))

    def bind(self, sock: socket.socket) -> None:
        """Bind to the next free pair (or leave it to connect())."""
        if not self.usable:
            return
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        for _ in range(PORT_TRIES):
            port = self.port
            if port < self.hi:
                self.port += 1
            else:
                self.port = self.lo
                self.which = (self.which + 1) % len(self.addresses)
            try:
                sock.bind((self.addresses[self.which], port))
                return
            except OSError:
                continue


def _connect(
    family: int, sockaddr, timeout: float = STEP_TIMEOUT, source: str | None = None
) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if source is not None:
            # The address now, the port at connect(): a port bound here would
            # be barred from everyone's connect() while it lives.
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
        sock.settimeout(timeout)
        sock.connect(sockaddr)
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed by the server")
        data += chunk
    return data


class Stream:
    """A client stream: its socket, what it waits for, what it still has to send."""

    __slots__ = ("sock", "idx", "sent_at", "buf", "out", "pending", "mask")

    def __init__(self, sock):
        self.sock = sock
        self.idx = 0
        self.sent_at = 0
        self.buf = bytearray()
        self.out = b""
        self.pending: deque = deque()  # framed: (idx, sent_at) in order
        self.mask = selectors.EVENT_READ


class Worker:
    """One process's share of the connections, and the mode's loop."""

    def __init__(self, opts: Options, family: int, sockaddr, connections: int):
        self.opts, self.family, self.sockaddr, self.n = opts, family, sockaddr, connections
        self.payloads = payloads(opts.size)
        self.sel = selectors.DefaultSelector()
        self.stats = Stats()
        self.sources = source_addresses(family, sockaddr)
        self.source = self.sources[0] if self.sources else None
        self.streams: list[Stream] = []
        self.socks: list[socket.socket] = []

    def close(self) -> None:
        for s in self.streams:
            s.sock.close()
        for s in self.socks:
            s.close()
        self.sel.close()

    # set-up, before the shared start

    def setup(self) -> None:
        mode = self.opts.mode
        if mode in ("tcp", "framed"):
            for _ in range(self.n):
                sock = _connect(self.family, self.sockaddr, source=self.source)
                if mode == "framed":
                    self._hello(sock)
                sock.setblocking(False)
                self.streams.append(Stream(sock))
        elif mode == "udp":
            for _ in range(self.n):
                sock = socket.socket(self.family, socket.SOCK_DGRAM)
                sock.connect(self.sockaddr)
                sock.setblocking(False)
                self.socks.append(sock)
        elif mode == "idle":
            self._open_idle()

    def _hello(self, sock) -> None:
        decoder = Decoder(1 << 20, 1 << 20)
        while (frame := decoder.next_frame()) is None:
            chunk = sock.recv(_RECV)
            if not chunk:
                raise ConnectionError("closed before its hello")
            decoder.feed(chunk)
        if "echo" not in frame.header.get("services", []) or decoder.buffered:
            raise BenchError(f"not a framed echo port: hello {frame.header}")

    def _open_idle(self) -> None:
        deadline = time.monotonic() + SETUP_TIMEOUT
        payload = self.payloads[0]
        for _ in range(self.n):
            if time.monotonic() > deadline:
                raise BenchError(f"idle set-up took over {SETUP_TIMEOUT:.0f}s")
            sock = _connect(self.family, self.sockaddr, source=self.source)
            self.socks.append(sock)
            # Client side, outside the measured window, on a socket with a
            # timeout (STEP_TIMEOUT): a blocking send is bounded and harmless.
            sock.sendall(payload)
            if _recv_exactly(sock, len(payload)) != payload:
                raise BenchError("idle set-up: the echo came back wrong")

    # the measured run

    def run(self, window: Window) -> dict:
        getattr(self, "_run_" + self.opts.mode)(window)
        return self.stats.result()

    def _send(self, s: Stream, data) -> bool:
        """Send now; queue what the kernel did not take (watching writability)."""
        if s.out:
            s.out += data
            return True
        try:
            sent = s.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._drop(s, "send")
            return False
        if sent < len(data):
            s.out = bytes(data[sent:])
            self._watch(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
        return True

    def _flush(self, s: Stream) -> None:
        try:
            sent = s.sock.send(s.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(s, "send")
            return
        s.out = s.out[sent:]
        if not s.out:
            self._watch(s, selectors.EVENT_READ)

    def _watch(self, s: Stream, mask: int) -> None:
        if mask != s.mask:
            s.mask = mask
            self.sel.modify(s.sock, mask, s)

    def _drop(self, s: Stream, why: str) -> None:
        if s in self.streams:  # once: a dropped stream has no more errors
            self.stats.error(why)
            self.streams.remove(s)
            self.sel.unregister(s.sock)
            s.sock.close()

    def _stalled(self, now: int) -> None:
        limit = int(STALL * 1e9)
        for s in [s for s in self.streams if now - s.sent_at > limit]:
            self._drop(s, "timeout")

    def _run_tcp(self, window: Window) -> None:
        stats, payloads, sel = self.stats, self.payloads, self.sel
        lat, size = stats.latencies, self.opts.size
        clock = time.monotonic_ns
        now = clock()
        for s in self.streams:
            sel.register(s.sock, selectors.EVENT_READ, s)
            s.sent_at = now
            self._send(s, payloads[0])
        next_check = now
        while window.tick(now := clock(), stats):
            if now >= next_check:
                self._stalled(now)
                next_check = now + int(_TICK * 1e9)
            for key, mask in sel.select(_TICK):
                s = key.data
                if mask & selectors.EVENT_WRITE:
                    self._flush(s)
                if not mask & selectors.EVENT_READ or s.sock.fileno() < 0:
                    continue
                try:
                    data = s.sock.recv(size - len(s.buf))
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    self._drop(s, "recv")
                    continue
                if not data:
                    self._drop(s, "closed")
                    continue
                if s.buf or len(data) < size:
                    s.buf += data
                    if len(s.buf) < size:
                        continue
                    data, s.buf = bytes(s.buf), bytearray()
                if data != payloads[s.idx]:
                    self._drop(s, "mismatch")
                    continue
                done = clock()
                if window.open:
                    stats.requests += 1
                    lat.append(done - s.sent_at)
                s.idx = (s.idx + 1) % VARIANTS
                s.sent_at = done
                self._send(s, payloads[s.idx])

    def _run_framed(self, window: Window) -> None:
        stats, sel, depth = self.stats, self.sel, self.opts.depth
        lat = stats.latencies
        requests = [encode({"svc": "echo", "id": i}, p) for i, p in enumerate(self.payloads)]
        # What evd sends today; anything else is decoded and checked properly.
        expected = [encode({"id": i, "ok": True}, p) for i, p in enumerate(self.payloads)]
        clock = time.monotonic_ns
        now = clock()
        for s in self.streams:
            sel.register(s.sock, selectors.EVENT_READ, s)
            batch = []
            for _ in range(depth):
                s.pending.append((s.idx, now))
                batch.append(requests[s.idx])
                s.idx = (s.idx + 1) % VARIANTS
            s.sent_at = now
            self._send(s, b"".join(batch))
        next_check = now
        while window.tick(now := clock(), stats):
            if now >= next_check:
                self._stalled(now)
                next_check = now + int(_TICK * 1e9)
            for key, mask in sel.select(_TICK):
                s = key.data
                if mask & selectors.EVENT_WRITE:
                    self._flush(s)
                if not mask & selectors.EVENT_READ or s.sock.fileno() < 0:
                    continue
                try:
                    data = s.sock.recv(_RECV)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    self._drop(s, "recv")
                    continue
                if not data:
                    self._drop(s, "closed")
                    continue
                s.buf += data
                done = clock()
                answered = self._responses(s, expected, done, window.open, lat)
                if answered < 0:
                    continue
                if answered:
                    batch = []
                    for _ in range(answered):
                        s.pending.append((s.idx, done))
                        batch.append(requests[s.idx])
                        s.idx = (s.idx + 1) % VARIANTS
                    s.sent_at = s.pending[0][1]
                    self._send(s, b"".join(batch))

    def _responses(self, s: Stream, expected, done: int, counting: bool, lat) -> int:
        """Consume every whole response in s.buf; their number, or -1 (dropped)."""
        buf, pos, answered = s.buf, 0, 0
        while pos < len(buf):
            if not s.pending:
                self._drop(s, "unasked")
                return -1
            idx, sent_at = s.pending[0]
            want = expected[idx]
            if buf.startswith(want, pos):
                pos += len(want)
            else:
                used = self._check_frame(buf, pos, idx)
                if used == 0:
                    break
                if used < 0:
                    self._drop(s, "mismatch")
                    return -1
                pos += used
            s.pending.popleft()
            answered += 1
            if counting:
                self.stats.requests += 1
                lat.append(done - sent_at)
        del buf[:pos]
        return answered

    def _check_frame(self, buf: bytearray, pos: int, idx: int) -> int:
        """The slow path: bytes used by one whole, correct echo response at
        `pos`; 0 if it has not all arrived; -1 if it is wrong."""
        if len(buf) - pos < 4:
            return 0
        h = int.from_bytes(buf[pos : pos + 4], "big")
        decoder = Decoder(max(2, min(h, 1 << 20)), MAX_SIZE)
        decoder.feed(bytes(buf[pos:]))
        try:
            frame = decoder.next_frame()
        except FrameError:
            return -1
        if frame is None:
            return 0
        header = frame.header
        if header.get("ok") is not True or header.get("id") != idx or frame.body != self.payloads[idx]:
            return -1
        return 4 + h + len(frame.body)

    def _run_udp(self, window: Window) -> None:
        stats, payloads, sel = self.stats, self.payloads, self.sel
        lat = stats.latencies
        known = {p: i for i, p in enumerate(payloads)}
        bufsize = max(2048, self.opts.size + 1)
        lost_ns = int(UDP_LOST * 1e9)
        clock = time.monotonic_ns
        now = clock()
        state = {}
        for sock in self.socks:
            state[sock] = st = [0, now]  # [idx, sent_at]
            sel.register(sock, selectors.EVENT_READ, st)
            sock.send(payloads[0])
        next_check = now
        while window.tick(now := clock(), stats):
            if now >= next_check:
                for sock, st in state.items():
                    if now - st[1] > lost_ns:
                        stats.lost += window.open
                        st[0] = (st[0] + 1) % VARIANTS
                        st[1] = now
                        self._udp_send(sock, payloads[st[0]])
                next_check = now + int(_TICK * 1e9)
            for key, _ in sel.select(_TICK):
                sock, st = key.fileobj, key.data
                try:
                    data = sock.recv(bufsize)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    stats.error("recv")  # e.g. ECONNREFUSED: nobody listens
                    continue
                if data != payloads[st[0]]:
                    if data not in known:
                        stats.error("mismatch")
                    continue  # else: a late answer, already lost
                done = clock()
                if window.open:
                    stats.requests += 1
                    lat.append(done - st[1])
                st[0] = (st[0] + 1) % VARIANTS
                st[1] = done
                self._udp_send(sock, payloads[st[0]])

    def _udp_send(self, sock, data) -> None:
        try:
            sock.send(data)
        except OSError:
            self.stats.error("send")

    def _run_connect(self, window: Window) -> None:
        stats, sel, size = self.stats, self.sel, self.opts.size
        lat, payloads = stats.latencies, self.payloads
        clock = time.monotonic_ns
        seq = 0
        live: dict = {}  # sock -> [idx, started, got]

        ports = SourcePorts(self.sources)

        def begin(now):
            nonlocal seq
            for _ in range(PORT_TRIES):
                sock = socket.socket(self.family, socket.SOCK_STREAM)
                sock.setblocking(False)
                ports.bind(sock)
                err = sock.connect_ex(self.sockaddr)
                if err in (0, errno.EINPROGRESS):
                    break
                sock.close()
                if err != errno.EADDRNOTAVAIL or not ports.usable:
                    break  # EADDRNOTAVAIL: a TIME_WAIT too young; next port
            else:
                err = errno.EADDRNOTAVAIL
            if err not in (0, errno.EINPROGRESS):
                stats.error(f"connect: {os.strerror(err)}")
                return
            live[sock] = [seq, now, b""]
            # On loopback the handshake has usually finished inside connect():
            # send at once, and wait for writability only if it had not.
            try:
                sock.send(payloads[seq])
                sel.register(sock, selectors.EVENT_READ, None)
            except OSError:  # EAGAIN/ENOTCONN: still connecting
                sel.register(sock, selectors.EVENT_WRITE, None)
            seq = (seq + 1) % VARIANTS

        def end(sock, why=None):
            sel.unregister(sock)
            sock.close()
            del live[sock]
            if why:
                stats.error(why)

        now = clock()
        for _ in range(self.n):
            begin(now)
        next_check = now
        while window.tick(now := clock(), stats):
            if now >= next_check:
                for sock in [k for k, v in live.items() if now - v[1] > STALL * 1e9]:
                    end(sock, "timeout")
                while len(live) < self.n:  # replace failed sessions, later
                    begin(now)
                next_check = now + int(_TICK * 1e9)
            for key, mask in sel.select(_TICK):
                sock = key.fileobj
                st = live[sock]
                if mask & selectors.EVENT_WRITE:
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        end(sock, f"connect: {os.strerror(err)}")
                        continue
                    try:
                        sock.send(payloads[st[0]])
                    except OSError:
                        end(sock, "send")
                        continue
                    sel.modify(sock, selectors.EVENT_READ, None)
                    continue
                try:
                    data = sock.recv(size - len(st[2]))
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    end(sock, "recv")
                    continue
                if not data:
                    end(sock, "closed")
                    continue
                st[2] += data
                if len(st[2]) < size:
                    continue
                if st[2] != payloads[st[0]]:
                    end(sock, "mismatch")
                    continue
                done = clock()
                end(sock)
                if window.open:
                    stats.requests += 1
                    lat.append(done - st[1])
                begin(done)
        for sock in list(live):
            end(sock)

    def _run_idle(self, window: Window) -> None:
        stats = self.stats
        while window.tick(time.monotonic_ns(), stats):
            # Holding idle connections is waiting out a span of time in the
            # generator's own process; nothing here serves anyone.
            time.sleep(min(_TICK, max(0.0, (window.end - time.monotonic_ns()) / 1e9)))
        window.open = True
        # Held connections must still be there: a closed one reads as EOF.
        poll = selectors.DefaultSelector()
        for sock in self.socks:
            poll.register(sock, selectors.EVENT_READ)
        for _key, _ in poll.select(0):
            stats.error("closed while idle")
        poll.close()
        step = max(1, len(self.socks) // IDLE_SAMPLE)
        payload = self.payloads[1]
        for sock in self.socks[::step]:
            started = time.monotonic_ns()
            try:
                sock.sendall(payload)  # the post-hold check: bounded by the socket timeout
                ok = _recv_exactly(sock, len(payload)) == payload
            except OSError:
                ok = False
            if not ok:
                stats.error("check")
                continue
            stats.requests += 1
            stats.latencies.append(time.monotonic_ns() - started)


def _worker_main(opts: Options, family: int, sockaddr, connections: int, pipe) -> None:
    """A forked worker: set up, report ready, wait for the start, run, report."""
    worker = Worker(opts, family, sockaddr, connections)
    try:
        try:
            worker.setup()
        except (OSError, BenchError) as exc:
            pipe.send(("error", f"set-up: {exc}"))
            return
        pipe.send(("ready", None))
        if not pipe.poll(SETUP_TIMEOUT + 10):
            return
        try:
            message, t0 = pipe.recv()
        except EOFError:  # the parent gave up
            return
        if message != "go":
            return
        pipe.send(("result", worker.run(Window(t0, opts.warmup, opts.duration))))
    finally:
        worker.close()
        pipe.close()


# -- the parent: fork, synchronise, sample, merge ----------------------------------------


def _raise_nofile(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if needed > hard:
        raise BenchError(f"{needed} connections need more descriptors than RLIMIT_NOFILE allows ({hard})")


def _receive(pipes: list, kind: str, timeout: float) -> list:
    """One `kind` message from every worker, within `timeout`."""
    deadline = time.monotonic() + timeout
    got: dict = {}
    while len(got) < len(pipes):
        left = deadline - time.monotonic()
        ready = wait_any([p for p in pipes if p not in got], max(0.0, left))
        if not ready:
            raise BenchError(f"workers did not report {kind} within {timeout:.0f}s")
        for p in ready:
            try:
                message, payload = p.recv()
            except EOFError:
                raise BenchError("a worker died") from None
            if message == "error":
                raise BenchError(payload)
            got[p] = payload
    return [got[p] for p in pipes]


def percentile(histogram: dict, total: int, q: float) -> float | None:
    """The q-quantile (0..1) of a {microseconds: count} histogram."""
    if not total:
        return None
    rank, seen = q * total, 0
    for us in sorted(histogram):
        seen += histogram[us]
        if seen >= rank:
            return float(us)
    return float(max(histogram))


def run(opts: Options) -> dict:
    """Run one bounded benchmark; the result as a JSON-able dict."""
    opts.check()
    family, sockaddr = resolve(opts.address, opts.mode, opts.allow_remote)
    _raise_nofile(opts.connections + 64)
    shares = [
        opts.connections // opts.processes + (i < opts.connections % opts.processes)
        for i in range(opts.processes)
    ]
    ctx = multiprocessing.get_context("fork")
    probe = ServerProbe(opts.server_pid)
    rss_before = process_rss_kb(opts.server_pid) if opts.server_pid else 0
    procs, pipes = [], []
    try:
        for share in shares:
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(opts, family, sockaddr, share, theirs), daemon=True)
            proc.start()
            theirs.close()
            procs.append(proc)
            pipes.append(mine)
        setup_started = time.monotonic()
        _receive(pipes, "ready", SETUP_TIMEOUT + 10)
        setup_s = time.monotonic() - setup_started
        t0 = time.monotonic() + 0.02
        for p in pipes:
            p.send(("go", t0))
        extra = {}
        if opts.mode == "idle":
            _sleep_until(t0 + opts.duration)  # the hold: sample RSS while held
            if opts.server_pid:
                rss = process_rss_kb(opts.server_pid)
                extra = {
                    "rss_before_kb": rss_before,
                    "rss_after_kb": rss,
                    "rss_per_conn_kib": round((rss - rss_before) / opts.connections, 3),
                }
            extra.update(
                held=opts.connections,
                setup_s=round(setup_s, 3),
                connections_per_s=round(opts.connections / setup_s, 1) if setup_s else None,
            )
        else:
            _sleep_until(t0 + opts.warmup)
            probe.start()
            _sleep_until(t0 + opts.warmup + opts.duration)
        results = _receive(pipes, "result", 30 + (opts.duration if opts.mode == "idle" else 0))
        requests = sum(r["requests"] for r in results)
        if opts.mode != "idle":
            extra = probe.stop(requests)
    finally:
        for proc in procs:
            proc.join(2)
            if proc.is_alive():
                proc.kill()
                proc.join(2)
        for p in pipes:
            p.close()
    return _summary(opts, results, extra)


def _sleep_until(when: float) -> None:
    """The measured window is a span of time: waiting out a span is timing, not sync."""
    left = when - time.monotonic()
    if left > 0:
        time.sleep(left)


def _summary(opts: Options, results: list, extra: dict) -> dict:
    histogram: Counter = Counter()
    why: Counter = Counter()
    for r in results:
        histogram.update({int(k): v for k, v in r["histogram"].items()})
        why.update(r["why"])
    requests = sum(r["requests"] for r in results)
    cpu = sum(r["cpu"] for r in results)
    measured = opts.duration if opts.mode != "idle" else None
    out = {
        "mode": opts.mode,
        "address": opts.address,
        "connections": opts.connections,
        "size": opts.size,
        "depth": opts.depth if opts.mode == "framed" else None,
        "processes": opts.processes,
        "duration_s": opts.duration,
        "requests": requests,
        "req_s": round(requests / measured, 1) if measured else None,
        "p50_us": percentile(histogram, requests, 0.5),
        "p99_us": percentile(histogram, requests, 0.99),
        "p999_us": percentile(histogram, requests, 0.999),
        "errors": sum(r["errors"] for r in results),
        "lost": sum(r["lost"] for r in results),
        "generator_cpu_s": round(cpu, 3) if measured else None,
        "generator_cpu_us_per_req": _per_req(cpu, requests) if measured else None,
    }
    if why:
        out["error_kinds"] = dict(why)
    out.update(extra)
    return out


def describe(result: dict) -> str:
    """One human line for a result."""
    r = result
    if r["mode"] == "idle":
        text = (
            f"idle: held {r['held']} connections (set up in {r['setup_s']}s), "
            f"checked {r['requests']}, errors {r['errors']}"
        )
        if "rss_per_conn_kib" in r:
            text += (
                f"; server RSS {r['rss_before_kb']} -> {r['rss_after_kb']} KiB "
                f"({r['rss_per_conn_kib']} KiB per connection)"
            )
        return text
    depth = f" depth {r['depth']}" if r["depth"] else ""
    text = (
        f"{r['mode']} c={r['connections']} s={r['size']}{depth} p={r['processes']}: "
        f"{r['req_s']:.0f} req/s  p50 {r['p50_us']} us  p99 {r['p99_us']} us  "
        f"p999 {r['p999_us']} us  errors {r['errors']}"
    )
    if r["lost"]:
        text += f"  lost {r['lost']}"
    text += f"  generator CPU {r['generator_cpu_us_per_req']} us/req"
    if "server_cpu_us_per_req" in r:
        text += f"  server CPU {r['server_cpu_us_per_req']} us/req"
    if "server_core_us_per_req" in r:
        text += f" (its core {r['server_core_us_per_req']})"
    return text


def to_json(result: dict) -> str:
    return json.dumps(result, separators=(",", ":"))
