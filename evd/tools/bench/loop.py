"""The loop every mode runs on, and the stream connections tcp and framed share.

A mode is set up first (blocking calls are fine there: every socket has a
timeout, and nothing is being measured), then runs one loop until the
shared window closes:

    start(now)               the first requests
    every TICK: check(now)   stalls, losses, replacements
    each event: ready(item, mask), item being what the socket was
                registered with

The generator is on the measurement's critical path (on two cores it is as
busy as the server), so the loop stays flat: one select, one call per event.
"""

from __future__ import annotations

import selectors
import socket
import ssl
import time
from collections import deque
from typing import Generic, TypeVar

from evd.tools.bench.measure import Stats, Window, payloads
from evd.tools.bench.options import Options
from evd.tools.bench.target import ProxyV2, Target, dial

TICK = 0.05  # loop wake-up when nothing happens (s)
TICK_NS = int(TICK * 1e9)
# A stream request unanswered this long is an error (the server stalled).
STALL = 2.0
RECV = 65536
READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE

T = TypeVar("T")


class Mode(Generic[T]):
    """One worker's share of a mode: connections first..first+count-1."""

    window: Window  # the run's, from run() on

    def __init__(self, opts: Options, target: Target, first: int, count: int):
        self.opts, self.target = opts, target
        self.first, self.n = first, count
        self.payloads = payloads(opts.size)
        self.sel = selectors.DefaultSelector()
        self.stats = Stats()
        self.tls = target.tls()  # None: plain TCP
        self.proxy = ProxyV2(target) if opts.proxy_v2 else None  # --proxy-v2: a header first

    def setup(self) -> None:
        """Before the shared start: open what the mode holds."""

    def start(self, now: int) -> None:
        """The first requests."""

    def check(self, now: int) -> None:
        """Every TICK: what has taken too long."""

    def ready(self, item: T, mask: int) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """After the window."""

    def close(self) -> None:
        self.sel.close()

    def completed(self, sent_at: int) -> int:
        """A request answered now: counted if the window is open.  Returns now."""
        done = time.monotonic_ns()
        if self.window.open:
            self.stats.requests += 1
            self.stats.latencies.append(done - sent_at)
        return done

    def run(self, window: Window) -> dict[str, object]:
        self.window = window
        stats, select, ready = self.stats, self.sel.select, self.ready
        clock = time.monotonic_ns
        now = clock()
        self.start(now)
        next_check = now
        while window.tick(now := clock(), stats):
            if now >= next_check:
                self.check(now)
                next_check = now + TICK_NS
            for key, mask in select(TICK):
                ready(key.data, mask)
        self.finish()
        return stats.result()


class Stream:
    """A client stream: its socket, what it waits for, what it still has to send."""

    __slots__ = ("sock", "idx", "sent_at", "buf", "out", "pending", "mask")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.idx = 0
        self.sent_at = 0
        self.buf = bytearray()
        self.out = b""
        self.pending: deque[tuple[int, int]] = deque()  # framed: (idx, sent_at) in order
        self.mask = READ


class StreamMode(Mode[Stream]):
    """Long-lived connections with requests in flight: tcp and framed.

    A subclass says what to send first (`begin`) and what to make of bytes
    received (`received`); reading, writing what the kernel did not take,
    stalls and errors are here, once.
    """

    # tcp reads exactly what the one answer in flight still lacks (a 64 KiB
    # recv costs a 64 KiB allocation each time); framed reads what is there.
    # Over TLS a record is read whole: what OpenSSL keeps back (`pending`)
    # would wake no select.
    read_exact = False

    def __init__(self, opts: Options, target: Target, first: int, count: int):
        super().__init__(opts, target, first, count)
        self.streams: list[Stream] = []
        self.exact = self.read_exact and self.tls is None

    def setup(self) -> None:
        for i in range(self.n):
            sock = dial(self.target, self.target.source(self.first + i), tls=self.tls)
            self.streams.append(Stream(sock))  # closed by close() from here on
            if self.proxy is not None:
                sock.sendall(self.proxy(None, sock))
            self.greet(sock)
            sock.setblocking(False)

    def greet(self, sock: socket.socket) -> None:
        """What a new connection expects first (framed: the hello)."""

    def close(self) -> None:
        for s in self.streams:
            s.sock.close()
        super().close()

    def start(self, now: int) -> None:
        for s in self.streams:
            self.sel.register(s.sock, READ, s)
            self.begin(s, now)

    def begin(self, s: Stream, now: int) -> None:
        raise NotImplementedError

    def received(self, s: Stream, data: bytes) -> None:
        raise NotImplementedError

    def check(self, now: int) -> None:
        limit = int(STALL * 1e9)
        for s in [s for s in self.streams if now - s.sent_at > limit]:
            self.drop(s, "timeout")

    def ready(self, s: Stream, mask: int) -> None:
        if mask & WRITE:
            self.flush(s)
        if not mask & READ or s.sock.fileno() < 0:
            return
        try:
            data = s.sock.recv(self.opts.size - len(s.buf) if self.exact else RECV)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return  # TLS: a record not whole yet, or one that was not data
        except OSError:
            self.drop(s, "recv")
            return
        if not data:
            self.drop(s, "closed")
            return
        self.received(s, data)
        sock = s.sock
        if self.tls is not None and isinstance(sock, ssl.SSLSocket) and sock.fileno() >= 0 and sock.pending():
            self.ready(s, READ)

    def send(self, s: Stream, data: bytes) -> None:
        """Send now; queue what the kernel did not take (watching writability)."""
        if s.out:
            s.out += data
            return
        try:
            sent = s.sock.send(data)
        except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            sent = 0  # TLS: to be sent again, the same bytes
        except OSError:
            self.drop(s, "send")
            return
        if sent < len(data):
            s.out = data[sent:]
            self.watch(s, READ | WRITE)

    def flush(self, s: Stream) -> None:
        try:
            sent = s.sock.send(s.out)
        except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return
        except OSError:
            self.drop(s, "send")
            return
        s.out = s.out[sent:]
        if not s.out:
            self.watch(s, READ)

    def watch(self, s: Stream, mask: int) -> None:
        if mask != s.mask:
            s.mask = mask
            self.sel.modify(s.sock, mask, s)

    def drop(self, s: Stream, why: str) -> None:
        """Count the error and close the stream, once: a dropped stream has no more errors."""
        if s in self.streams:
            self.stats.error(why)
            self.streams.remove(s)
            self.sel.unregister(s.sock)
            s.sock.close()
