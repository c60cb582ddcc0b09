#!/usr/bin/env python3
"""SSLObject + MemoryBIO or a non-blocking SSLSocket?  The two simplest
prototypes, measured the same way (issue 13: choose by measurement).

    python3 bench/tls_io.py               # 5 alternating rounds, 2 s each
    python3 bench/tls_io.py --rounds 9 --duration 3

Each prototype is a bare epoll echo server over TLS, written as evd's
transport would be (one recv per readable event, the reply sent at once):

- `sslsocket`: the accepted socket wrapped by `SSLContext.wrap_socket`,
  non-blocking; OpenSSL reads and writes the socket itself.  Per request:
  `recv_into` and `send` on the SSLSocket.
- `sslobject`: the raw socket, and an `SSLObject` between two `MemoryBIO`s
  (asyncio's sslproto, uvloop's and h11's sans-IO shape).  Per request:
  `recv_into` the raw socket, `incoming.write`, `SSLObject.read` while the
  incoming BIO holds bytes, `SSLObject.write`, `outgoing.read`, `send`.

The server is pinned to CPU 0 and runs in this process; the client (a
forked process pinned to CPU 1) drives it.  Two loads: `echo` (50
connections, 64-byte ping-pong; server CPU per request) and `handshake`
(connect, TLS handshake, one 64-byte echo, close, one at a time; server CPU
per connection).  Server CPU is this process's utime+stime over the measured
window.  Rounds alternate the prototypes; the medians are printed.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import certs as certs_mod

BUF = bytearray(65536)
VIEW = memoryview(BUF)
PAYLOAD = b"x" * 64
CONNECTIONS = 50


def server_context(c: certs_mod.Certs) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    ctx.load_cert_chain(c.cert, c.key)
    return ctx


def client_context(c: certs_mod.Certs) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(c.ca)
    return ctx


# -- the two server prototypes ---------------------------------------------------


class SocketConn:
    __slots__ = ("sock", "shaking")

    def __init__(self, raw: socket.socket, ctx: ssl.SSLContext):
        self.sock = ctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        self.shaking = True

    def event(self) -> bool:
        """False: close."""
        sock = self.sock
        if self.shaking:
            try:
                sock.do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return True
            except (ssl.SSLError, OSError):
                return False
            self.shaking = False
        try:
            n = sock.recv_into(BUF)
        except ssl.SSLWantReadError:
            return True
        except (ssl.SSLError, OSError):
            return False
        if not n:
            return False
        sock.send(VIEW[:n])  # 64 B on an idle socket: the kernel takes it
        return True

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


class ObjectConn:
    __slots__ = ("sock", "incoming", "outgoing", "obj", "shaking")

    def __init__(self, raw: socket.socket, ctx: ssl.SSLContext):
        self.sock = raw
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.shaking = True

    def event(self) -> bool:
        try:
            n = self.sock.recv_into(BUF)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not n:
            return False
        incoming, obj = self.incoming, self.obj
        incoming.write(VIEW[:n])
        if self.shaking:
            try:
                obj.do_handshake()
                self.shaking = False
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLError, OSError):
                return False
            self._flush()
            if self.shaking:
                return True
        # Read while whole records may be waiting: the common case costs no
        # exception (a partial record left behind raises SSLWantReadError).
        while incoming.pending:
            try:
                got = obj.read(65536, BUF)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                return False
            except ssl.SSLError:
                return False
            if not got:
                break
            obj.write(VIEW[:got])
        self._flush()
        return True

    def _flush(self) -> None:
        out = self.outgoing.read()
        if out:
            self.sock.send(out)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


PROTOTYPES = {"sslsocket": SocketConn, "sslobject": ObjectConn}


def serve(kind: str, lsock: socket.socket, ctx: ssl.SSLContext, stop_fd: int) -> None:
    conn_class = PROTOTYPES[kind]
    ep = select.epoll()
    ep.register(lsock.fileno(), select.EPOLLIN)
    ep.register(stop_fd, select.EPOLLIN)
    conns: dict[int, SocketConn | ObjectConn] = {}
    lfd = lsock.fileno()
    while True:
        for fd, _ in ep.poll():
            if fd == lfd:
                try:
                    raw, _ = lsock.accept()
                except BlockingIOError:
                    continue
                raw.setblocking(False)
                conn = conn_class(raw, ctx)
                conns[conn.fileno()] = conn
                ep.register(conn.fileno(), select.EPOLLIN)
            elif fd == stop_fd:
                for conn in conns.values():
                    conn.close()
                ep.close()
                return
            else:
                conn = conns[fd]
                if not conn.event():
                    ep.unregister(fd)
                    del conns[fd]
                    conn.close()


# -- the client (a forked process) ------------------------------------------------


def client_echo(port: int, ctx: ssl.SSLContext, deadline: float) -> None:
    socks = []
    for _ in range(CONNECTIONS):
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        s.setblocking(False)
        socks.append(s)
    ep = select.epoll()
    by_fd = {s.fileno(): s for s in socks}
    for s in socks:
        ep.register(s.fileno(), select.EPOLLIN)
        s.send(PAYLOAD)
    got = dict.fromkeys(by_fd, 0)
    while time.monotonic() < deadline:
        for fd, _ in ep.poll(0.1):
            s = by_fd[fd]
            try:
                data = s.recv(65536)
            except ssl.SSLWantReadError:
                continue
            got[fd] += len(data)
            if got[fd] >= len(PAYLOAD):
                got[fd] = 0
                s.send(PAYLOAD)
    for s in socks:
        s.close()


def client_handshake(port: int, ctx: ssl.SSLContext, deadline: float) -> None:
    while time.monotonic() < deadline:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                s.sendall(PAYLOAD)
                got = b""
                while len(got) < len(PAYLOAD):
                    chunk = s.recv(65536)
                    if not chunk:  # the server stopped at the window's end
                        return
                    got += chunk


# -- one measurement ---------------------------------------------------------------


def measure(kind: str, load: str, c: certs_mod.Certs, duration: float, warmup: float) -> tuple[float, float]:
    """(server CPU µs per request (echo) or per connection (handshake),
    requests or connections per second)."""
    lsock = socket.socket()
    # As evd's listeners: replies leave at once.  Without it a handshake
    # written record by record meets Nagle and the delayed ACK.
    lsock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1024)
    lsock.setblocking(False)
    port = lsock.getsockname()[1]
    stop_r, stop_w = os.pipe()
    start = time.monotonic() + 0.5
    pid = os.fork()
    if pid == 0:  # the client
        code = 1
        try:
            os.sched_setaffinity(0, {1})
            lsock.close()
            cctx = client_context(c)
            end = start + warmup + duration + 0.5
            time.sleep(max(0.0, start - time.monotonic()))
            (client_echo if load == "echo" else client_handshake)(port, cctx, end)
            code = 0
        finally:
            os._exit(code)
    ctx = server_context(c)
    # A thread reads this process's CPU time and the count of answers at
    # both ends of the window, then stops the loop.
    counted = Counter()
    window = (start + warmup, start + warmup + duration)
    result: dict[str, float] = {}

    def sampler() -> None:
        time.sleep(max(0.0, window[0] - time.monotonic()))
        t0, n0 = os.times(), counted.n
        time.sleep(max(0.0, window[1] - time.monotonic()))
        t1, n1 = os.times(), counted.n
        cpu = (t1.user - t0.user) + (t1.system - t0.system)
        result["us"] = cpu / max(1, n1 - n0) * 1e6
        result["rate"] = (n1 - n0) / duration
        os.write(stop_w, b"x")

    os.sched_setaffinity(0, {0})
    thread = threading.Thread(target=sampler)
    thread.start()
    counted.install(kind, load)
    try:
        serve(kind, lsock, ctx, stop_r)
    finally:
        counted.uninstall(kind)
        thread.join()
        os.waitpid(pid, 0)
        for fd in (stop_r, stop_w):
            os.close(fd)
        lsock.close()
    return result["us"], result["rate"]


class Counter:
    """Counts answered requests (echo) or finished connections (handshake)
    by wrapping the prototype's event handler: the same small cost for both."""

    def __init__(self) -> None:
        self.n = 0
        self._saved = None

    def install(self, kind: str, load: str) -> None:
        cls = PROTOTYPES[kind]
        self._saved = cls.event
        original = cls.event
        me = self

        if load == "echo":

            def event(conn):  # one readable event with a whole request is one answer
                ok = original(conn)
                me.n += 1
                return ok

        else:

            def event(conn):
                ok = original(conn)
                if not ok:
                    me.n += 1
                return ok

        cls.event = event

    def uninstall(self, kind: str) -> None:
        PROTOTYPES[kind].event = self._saved


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--loads", default="echo,handshake")
    parser.add_argument("--prototypes", default=",".join(PROTOTYPES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="evd-tls-io-") as tmp:
        c = certs_mod.make(Path(tmp))
        results: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for rnd in range(args.rounds):
            for load in args.loads.split(","):
                for kind in args.prototypes.split(","):
                    us, rate = measure(kind, load, c, args.duration, args.warmup)
                    results.setdefault((load, kind), []).append((us, rate))
                    print(f"round {rnd + 1} {load} {kind}: {us:.2f} µs, {rate:.0f}/s", file=sys.stderr)
        python = sys.version.split()[0]
        print(f"{ssl.OPENSSL_VERSION}, Python {python}, {args.rounds} rounds × {args.duration} s")
        print("| load | prototype | server CPU µs (median) | per second (median) | all rounds µs |")
        print("|---|---|--:|--:|---|")
        for (load, kind), runs in results.items():
            us = statistics.median(r[0] for r in runs)
            rate = statistics.median(r[1] for r in runs)
            every = ", ".join(f"{r[0]:.1f}" for r in runs)
            print(f"| {load} | {kind} | {us:.2f} | {rate:.0f} | {every} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
