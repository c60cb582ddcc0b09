"""One class per mode, each on the loop of `loop.Mode` (framed's is in
`framed`, the one mode that speaks the frame codec).

Every answer is checked byte for byte against what was sent; a wrong one is
an error, a missing one a timeout (streams) or a loss (datagrams).
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
import time
from typing import Any

from evd.tools.bench.framed import FramedMode
from evd.tools.bench.loop import READ, STALL, WRITE, Mode, Stream, StreamMode
from evd.tools.bench.measure import VARIANTS
from evd.tools.bench.options import SETUP_TIMEOUT, BenchError, Options
from evd.tools.bench.target import PORT_TRIES, SourcePorts, Target, dial, recv_exactly

# A datagram unanswered this long is lost; its answer, if late, is ignored.
UDP_LOST = 0.2
# idle: connections echo-checked after the hold.
IDLE_SAMPLE = 100


class TcpMode(StreamMode):
    """Ping-pong: each connection sends S bytes and waits for them to come back."""

    read_exact = True

    def begin(self, s: Stream, now: int) -> None:
        s.sent_at = now
        self.send(s, self.payloads[0])

    def received(self, s: Stream, data: bytes) -> None:
        size = self.opts.size
        if s.buf or len(data) < size:
            s.buf += data
            if len(s.buf) < size:
                return
            data, s.buf = bytes(s.buf), bytearray()
        if data != self.payloads[s.idx]:
            self.drop(s, "mismatch")
            return
        s.sent_at = self.completed(s.sent_at)
        s.idx = (s.idx + 1) % VARIANTS
        self.send(s, self.payloads[s.idx])


class Slot:
    """One datagram in flight, sent from each of `socks` in turn."""

    __slots__ = ("socks", "turn", "idx", "sent_at")

    def __init__(self, socks: list[socket.socket]):
        self.socks = socks
        self.turn = 0
        self.idx = 0
        self.sent_at = 0


class UdpMode(Mode[tuple[socket.socket, Slot]]):
    """C slots, one datagram in flight each.

    With `sources`, slot i sends from sockets bound to source addresses
    i, i + C, i + 2C, ... in turn, so that each address carries 1/N of the
    datagrams and the server still sees C datagrams in flight.
    """

    def __init__(self, opts: Options, target: Target, first: int, count: int):
        super().__init__(opts, target, first, count)
        self.slots: list[Slot] = []
        self.known = set(self.payloads)
        self.bufsize = max(2048, opts.size + 1)

    def setup(self) -> None:
        target, total = self.target, self.opts.connections
        per_slot = max(1, -(-len(target.sources) // total))  # ceil
        for i in range(self.first, self.first + self.n):
            slot = Slot([])
            self.slots.append(slot)
            for j in range(per_slot):
                sock = socket.socket(target.family, socket.SOCK_DGRAM)
                slot.socks.append(sock)  # closed by close() from here on
                sock.setblocking(False)
                source = target.source(i + j * total)
                if source is not None:
                    sock.bind((source, 0))
                sock.connect(target.sockaddr)

    def close(self) -> None:
        for slot in self.slots:
            for sock in slot.socks:
                sock.close()
        super().close()

    def start(self, now: int) -> None:
        for slot in self.slots:
            for sock in slot.socks:
                self.sel.register(sock, READ, (sock, slot))
            slot.turn = len(slot.socks) - 1
            self._next(slot, now)

    def _next(self, slot: Slot, now: int) -> None:
        slot.idx = (slot.idx + 1) % VARIANTS
        slot.turn = (slot.turn + 1) % len(slot.socks)
        slot.sent_at = now
        try:
            slot.socks[slot.turn].send(self.payloads[slot.idx])
        except OSError:
            self.stats.error("send")

    def check(self, now: int) -> None:
        lost_ns = int(UDP_LOST * 1e9)
        for slot in self.slots:
            if now - slot.sent_at > lost_ns:
                self.stats.lost += self.window.open
                self._next(slot, now)

    def ready(self, item: tuple[socket.socket, Slot], mask: int) -> None:
        sock, slot = item
        try:
            data = sock.recv(self.bufsize)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.stats.error("recv")  # e.g. ECONNREFUSED: nobody listens
            return
        if data != self.payloads[slot.idx]:
            if data not in self.known:
                self.stats.error("mismatch")
            return  # else: a late answer, already lost
        self._next(slot, self.completed(slot.sent_at))


class Session:
    """connect mode: one connection, one request."""

    __slots__ = ("sock", "idx", "started", "got", "secure", "first")

    def __init__(self, sock: socket.socket, idx: int, started: int, first: bytes):
        self.sock, self.idx, self.started, self.got = sock, idx, started, b""
        self.secure = False  # TLS: the handshake is done
        self.first = first  # what is sent: the request (after a PROXY header with --proxy-v2)


class ConnectMode(Mode[Session]):
    """Connect, S-byte echo, close; C sessions in flight.  With TLS, a
    handshake comes between the connect and the request: the load that
    measures what a handshake costs the server."""

    def __init__(self, opts: Options, target: Target, first: int, count: int):
        super().__init__(opts, target, first, count)
        self.live: set[Session] = set()
        self.seq = 0
        self.ports = SourcePorts(target.sources)

    def setup(self) -> None:
        """One connection, closed at once: a port nobody listens on is a
        set-up error here, as in the other stream modes, not a run of errors."""
        dial(self.target, self.target.source(self.first), tls=self.tls).close()

    def close(self) -> None:
        for session in list(self.live):
            self._end(session)
        super().close()

    def start(self, now: int) -> None:
        for _ in range(self.n):
            self._begin(now)

    def _begin(self, now: int) -> None:
        for _ in range(PORT_TRIES):
            sock = socket.socket(self.target.family, socket.SOCK_STREAM)
            sock.setblocking(False)
            source = self.ports.bind(sock)
            err = sock.connect_ex(self.target.sockaddr)
            if err in (0, errno.EINPROGRESS):
                break
            sock.close()
            if err != errno.EADDRNOTAVAIL or not self.ports.usable:
                break  # EADDRNOTAVAIL: a TIME_WAIT too young; next pair
        else:
            err = errno.EADDRNOTAVAIL
        if err not in (0, errno.EINPROGRESS):
            self.stats.error(f"connect: {os.strerror(err)}")
            return
        payload = self.payloads[self.seq]
        # --proxy-v2: the header and the request leave in one send, as a
        # proxy that has both at hand writes them.
        first = payload if self.proxy is None else self.proxy(source, sock) + payload
        session = Session(sock, self.seq, now, first)
        self.live.add(session)
        self.seq = (self.seq + 1) % VARIANTS
        if self.tls is not None:
            self.sel.register(sock, WRITE, session)  # connected: the handshake
            return
        # On loopback the handshake has usually finished inside connect():
        # send at once, and wait for writability only if it had not.
        try:
            sock.send(first)
            self.sel.register(sock, READ, session)
        except OSError:  # EAGAIN/ENOTCONN: still connecting
            self.sel.register(sock, WRITE, session)

    def _end(self, session: Session, why: str | None = None) -> None:
        self.sel.unregister(session.sock)
        session.sock.close()
        self.live.discard(session)
        if why:
            self.stats.error(why)

    def check(self, now: int) -> None:
        limit = STALL * 1e9
        for session in [x for x in self.live if now - x.started > limit]:
            self._end(session, "timeout")
        while len(self.live) < self.n:  # replace failed sessions, later
            before = len(self.live)
            self._begin(now)
            if len(self.live) == before:
                break  # could not connect: try again next tick

    def finish(self) -> None:
        for session in list(self.live):
            self._end(session)

    def ready(self, session: Session, mask: int) -> None:
        if self.tls is not None and not session.secure:
            self._handshake(session)
            return
        sock = session.sock
        if mask & WRITE:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._end(session, f"connect: {os.strerror(err)}")
                return
            try:
                sock.send(session.first)
            except OSError:
                self._end(session, "send")
                return
            self.sel.modify(sock, READ, session)
            return
        size = self.opts.size
        try:
            data = sock.recv(size - len(session.got))
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
            return  # TLS: the session tickets came first
        except OSError:
            self._end(session, "recv")
            return
        if not data:
            self._end(session, "closed")
            return
        session.got += data
        if len(session.got) < size:
            return
        if session.got != self.payloads[session.idx]:
            self._end(session, "mismatch")
            return
        done = self.completed(session.started)
        self._end(session)
        self._begin(done)

    def _handshake(self, session: Session) -> None:
        """TLS, one step at a time: wrap once connected, then drive the
        handshake on readability or writability; send the request at its end."""
        assert self.tls is not None
        sock = session.sock
        if not isinstance(sock, ssl.SSLSocket):
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._end(session, f"connect: {os.strerror(err)}")
                return
            self.sel.unregister(sock)  # wrapping moves the descriptor to a new object
            try:
                sock = self.tls.wrap_socket(
                    sock, server_hostname=self.target.server_name, do_handshake_on_connect=False
                )
            except OSError:
                sock.close()
                self.live.discard(session)
                self.stats.error("tls")
                return
            session.sock = sock
            self.sel.register(sock, WRITE, session)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self.sel.modify(sock, READ, session)
            return
        except ssl.SSLWantWriteError:
            self.sel.modify(sock, WRITE, session)
            return
        except OSError:
            self._end(session, "tls handshake")
            return
        session.secure = True
        try:
            sock.send(self.payloads[session.idx])
        except OSError:
            self._end(session, "send")
            return
        self.sel.modify(sock, READ, session)


class IdleMode(Mode[socket.socket]):
    """Hold C connections (each checked by one echo), then echo-check a sample."""

    def __init__(self, opts: Options, target: Target, first: int, count: int):
        super().__init__(opts, target, first, count)
        self.socks: list[socket.socket] = []

    def setup(self) -> None:
        deadline = time.monotonic() + SETUP_TIMEOUT
        payload = self.payloads[0]
        for i in range(self.n):
            if time.monotonic() > deadline:
                raise BenchError(f"idle set-up took over {SETUP_TIMEOUT:.0f}s")
            sock = dial(self.target, self.target.source(self.first + i), tls=self.tls)
            self.socks.append(sock)
            # Client side, outside the measured window, on a socket with a
            # timeout: a blocking send is bounded and harmless.
            sock.sendall(payload)
            if recv_exactly(sock, len(payload)) != payload:
                raise BenchError("idle set-up: the echo came back wrong")

    def close(self) -> None:
        for sock in self.socks:
            sock.close()
        super().close()

    def start(self, now: int) -> None:
        for sock in self.socks:
            self.sel.register(sock, READ, sock)

    def ready(self, sock: socket.socket, mask: int) -> None:
        # Nothing is asked while held: a readable connection was closed (EOF).
        self.stats.error("closed while idle")
        self.sel.unregister(sock)

    def finish(self) -> None:
        """Held connections must still answer."""
        step = max(1, len(self.socks) // IDLE_SAMPLE)
        payload = self.payloads[1]
        for sock in self.socks[::step]:
            started = time.monotonic_ns()
            try:
                sock.sendall(payload)  # bounded by the socket's timeout
                ok = recv_exactly(sock, len(payload)) == payload
            except OSError:
                ok = False
            if not ok:
                self.stats.error("check")
                continue
            self.stats.requests += 1
            self.stats.latencies.append(time.monotonic_ns() - started)


MODE_CLASSES: dict[str, type[Mode[Any]]] = {
    "tcp": TcpMode,
    "udp": UdpMode,
    "connect": ConnectMode,
    "framed": FramedMode,
    "idle": IdleMode,
}
