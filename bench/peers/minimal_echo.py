"""A minimal selectors echo loop, TCP and UDP: the baseline.

Everything evd adds (limits, access lists, logs, timers, stats, flow control
by water marks, the framed port) is missing here, so the distance from this
to evd is what those features cost.  It is still correct: a partial send
keeps the rest and stops reading that peer until it is flushed, and the
peer's EOF closes the connection once its echo is out.

Run with --port P (0: the kernel picks); prints "ready TCPPORT UDPPORT".
"""

from __future__ import annotations

import argparse
import resource
import selectors
import signal
import socket

READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


class Conn:
    __slots__ = ("sock", "out")

    def __init__(self, sock):
        self.sock, self.out = sock, None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sel = selectors.DefaultSelector()
    listener = socket.create_server(("127.0.0.1", args.port), backlog=1024)
    listener.setblocking(False)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", args.port))
    udp.setblocking(False)
    running = [True]
    signal.signal(signal.SIGTERM, lambda *_: running.clear())
    signal.signal(signal.SIGINT, lambda *_: running.clear())

    def close(conn):
        sel.unregister(conn.sock)
        conn.sock.close()

    def accept(_):
        for _ in range(64):
            try:
                sock, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            sock.setblocking(False)
            sel.register(sock, READ, Conn(sock))

    def datagrams(_):
        for _ in range(64):
            try:
                data, addr = udp.recvfrom(65535)
                udp.sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue

    def readable(conn):
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return close(conn)
        if not data:  # EOF: nothing is pending (we read only then)
            return close(conn)
        try:
            sent = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            return close(conn)
        if sent < len(data):  # keep the rest; stop reading until it is out
            conn.out = memoryview(data)[sent:]
            sel.modify(conn.sock, WRITE, conn)

    def writable(conn):
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return close(conn)
        conn.out = conn.out[sent:]
        if not conn.out:
            conn.out = None
            sel.modify(conn.sock, READ, conn)

    sel.register(listener, READ, accept)
    sel.register(udp, READ, datagrams)
    print("ready", listener.getsockname()[1], udp.getsockname()[1], flush=True)
    while running:
        try:
            events = sel.select(1.0)
        except InterruptedError:
            continue
        for key, mask in events:
            data = key.data
            if data is accept or data is datagrams:
                data(None)
            elif mask & WRITE:
                writable(data)
            else:
                readable(data)
    sel.close()


if __name__ == "__main__":
    main()
