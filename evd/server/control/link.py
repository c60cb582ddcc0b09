"""A framed channel between the supervisor and one worker, on the loop.

Each worker is forked with one end of a UNIX stream socketpair; the
supervisor keeps the other.  Frames (proto/framing.py) go both ways:
requests down, answers and a worker's last figures up.  Descriptors ride
along (SCM_RIGHTS) when the supervisor hands a worker the listening
sockets of a service it has just re-enabled.

Neither end ever waits.  Writes go out at once when the kernel takes them;
the rest is queued and sent when the socket is writable, up to
MAX_QUEUE bytes -- past that the peer is not reading, and `send` says so
instead of buffering more (the supervisor then counts that worker as not
answering).  Reads take what is there, and each descriptor received is
kept in order until the frame that names it is handled.  EOF or an error
closes the channel once and says so (`on_close`): for the supervisor, a
worker that has gone.
"""

from __future__ import annotations

import array
import os
import socket
from collections import deque
from collections.abc import Callable
from typing import Any

from evd.loop.reactor import Reactor
from evd.proto.framing import Decoder, FrameError, encode

# A worker's answer lists its connections; 64 MiB holds a few hundred
# thousand of them, and bounds what a confused peer can make us hold.
MAX_BODY = 64 * 1024 * 1024
MAX_HEADER = 65536
MAX_QUEUE = 2 * MAX_BODY
# Descriptors accepted per read: a service's listeners, a few at a time.
MAX_FDS = 64
READ_SIZE = 262144

Frame = tuple[dict[str, Any], bytes]


class Link:
    def __init__(
        self,
        reactor: Reactor,
        sock: socket.socket,
        on_frame: Callable[[dict[str, Any], bytes], None],
        on_close: Callable[[], None],
    ):
        sock.setblocking(False)
        self.reactor = reactor
        self.sock = sock
        self.fd = sock.fileno()
        self.on_frame = on_frame
        self.on_close = on_close
        self.decoder = Decoder(MAX_HEADER, MAX_BODY)
        self.out: deque[tuple[memoryview, list[int]]] = deque()
        self.queued = 0
        self.fds: deque[int] = deque()  # received, not yet taken
        self.closed = False
        reactor.add_reader(self.fd, self._on_read)

    def send(self, header: dict[str, Any], body: bytes = b"", fds: list[int] | None = None) -> bool:
        """Queue one frame (with `fds` attached); False if the channel is
        closed (now or by this send) or its peer has left MAX_QUEUE bytes
        unread."""
        data = encode(header, body)
        if self.closed or self.queued + len(data) > MAX_QUEUE:
            return False
        was_idle = not self.out
        self.out.append((memoryview(data), list(fds or ())))
        self.queued += len(data)
        if was_idle:
            self._flush()
            if self.out and not self.closed:
                self.reactor.add_writer(self.fd, self._flush)
        # A peer that has just gone (EPIPE at once) closed us on the way:
        # then nothing was sent, and no answer is to be waited for.
        return not self.closed

    def _flush(self) -> None:
        while self.out:
            data, fds = self.out[0]
            try:
                if fds:
                    sent = self.sock.sendmsg(
                        [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                    )
                else:
                    sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.close()
                return
            self.queued -= sent
            if sent < len(data):
                self.out[0] = (data[sent:], [])  # the descriptors went with the first byte
                return
            self.out.popleft()
        self.reactor.remove_writer(self.fd)

    def _on_read(self) -> None:
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, READ_SIZE, MAX_FDS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        self.fds.extend(fds)
        if not data:
            self.close()
            return
        try:
            self.decoder.feed(data)
            while not self.closed and (frame := self.decoder.next_request()) is not None:
                self.on_frame(frame[0], bytes(frame[1]))
        except FrameError:
            self.close()

    def take_fds(self, count: int) -> list[int]:
        """The next `count` descriptors received, in the order sent."""
        return [self.fds.popleft() for _ in range(min(count, len(self.fds)))]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.reactor.forget(self.fd)
        self.sock.close()
        while self.fds:
            os.close(self.fds.popleft())
        self.out.clear()
        self.on_close()

    def send_last(self, header: dict[str, Any], body: bytes, timeout: float) -> None:
        """At a worker's exit, its loop gone: one frame, waiting for the
        socket at most `timeout` seconds in all."""
        data = memoryview(encode(header, body))
        self.sock.settimeout(timeout)
        try:
            self.sock.sendall(data)  # the loop is gone: bounded by the timeout above
        except OSError:
            pass  # the supervisor is gone or not reading: nothing to do
