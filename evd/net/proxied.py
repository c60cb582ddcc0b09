"""A connection's life before its PROXY header is complete (SPEC section 13).

On a service with `proxy_protocol = true` every stream connection comes
from a proxy and begins with a header naming the real client
(proto/proxy.py reads it).  Until that header is whole the connection is
nobody's: not admitted, not counted against any limit, not logged, not
handed to a handler or to TLS.  It waits here, in `Service.awaiting`:

- accepted from an address outside `proxy_from`: refused at once;
- one `recv_into` at once (`accepted`: the header is usually there
  already), then one per readable event, each the process's receive buffer,
  appended to what came before (at most proto/proxy.py's MAX_HEADER bytes:
  the parser refuses past that) and parsed again;
- a complete header: the client it names (the proxy itself for a v2 LOCAL
  or v1 UNKNOWN health check) is admitted as any direct client would be,
  the transport is made for that client, and the bytes that came in the
  same read after the header -- the client's first request, or the start
  of a TLS ClientHello -- are handed to it (`received`), so that a header
  costs one parse and no extra system call;
- a refusal, the peer's EOF or error before the header, or no complete
  header within `handshake_timeout` (the daemon's sweep, `Service.sweep`):
  `conn.reject` `reason = "proxy"`, the connection closed, nothing else
  affected.

A program service (SPEC section 14) hands the socket itself to its child,
so nothing after the header may be read by evd: there the bytes are peeked
(MSG_PEEK) and only the header's are taken off the socket -- a system call
more per connection, next to a fork.

The refusals name the proxy (it is the only peer known); everything after
the header names the client, and `conn.open` adds `proxy`.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Protocol

from evd.config.addresses import peer_text
from evd.net.transport import RECV_BUFFER, RECV_VIEW
from evd.proto.proxy import MAX_HEADER, Header, NeedMore, parse

if TYPE_CHECKING:
    from _socket import socket as CSocket

    from evd.handlers.service import Service
    from evd.loop.reactor import Reactor
    from evd.loop.seams import Buffer


class Listening(Protocol):
    """The listener that accepted the connection (net/listeners.py): where
    a connection goes once its header has named the client."""

    reactor: Reactor
    service: Service

    def serve(self, conn: CSocket, host: str | None, port: int, proxy: str | None, first: Buffer) -> None: ...


def accepted(listener: Listening, sock: CSocket, host: str | None, port: int) -> None:
    """A connection from a trusted proxy, just accepted (non-blocking).  A
    proxy sends its header as soon as it has connected, so by the time the
    connection is accepted the header -- often with the client's first
    request -- is usually there: one recv now, and a complete header goes
    straight to `serve`, with no waiting object, no second registration and
    no wait for a readable event.  Anything else waits in an AwaitingHeader."""
    if not listener.service.config.exec:
        try:
            n = sock.recv_into(RECV_BUFFER)
        except (BlockingIOError, InterruptedError):
            n = -1
        except OSError:
            n = 0
        if n > 0:
            data = RECV_VIEW[:n]
            result = parse(data)
            if isinstance(result, Header):
                complete(listener, sock, host, port, result, data[result.length :])
                return
            if not isinstance(result, NeedMore):
                sock.close()
                listener.service.refused_proxy(host, port)
                return
            waiting = AwaitingHeader(listener, sock, host, port)
            waiting._got = bytes(data)
            waiting.start()
            return
        if n == 0:  # EOF or an error before any header
            sock.close()
            listener.service.refused_proxy(host, port)
            return
    AwaitingHeader(listener, sock, host, port).start()


def complete(
    listener: Listening, sock: CSocket, host: str | None, port: int, header: Header, rest: Buffer
) -> None:
    """The header from the proxy at (host, port) is whole: from here on the
    connection is the client's (the proxy's own for LOCAL / UNKNOWN)."""
    proxy = peer_text(host, port)
    if header.source is not None:
        host, port = header.source
    listener.serve(sock, host, port, proxy, rest)


class AwaitingHeader:
    """One accepted connection reading its PROXY header."""

    __slots__ = ("listener", "reactor", "service", "sock", "fd", "host", "port", "opened", "_got", "_exact")

    def __init__(self, listener: Listening, sock: CSocket, host: str | None, port: int):
        self.listener = listener
        self.reactor: Reactor = listener.reactor
        self.service: Service = listener.service
        self.sock = sock
        self.fd = sock.fileno()
        self.host = host  # the proxy
        self.port = port
        self.opened = self.reactor.now
        self._got = b""  # the start of a header split over several reads
        # Read no byte past the header: the socket goes to a program as it is.
        self._exact = bool(self.service.config.exec)

    def start(self) -> None:
        self.service.awaiting.add(self)
        try:
            self.reactor.add_reader(self.fd, self._on_read)
        except OSError:  # ENOSPC: epoll's max_user_watches reached
            self._refuse()

    def _on_read(self) -> None:
        if self._exact:
            self._on_read_exact()
            return
        try:
            n = self.sock.recv_into(RECV_BUFFER)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # reset by the proxy before the header
            self._refuse()
            return
        if not n:  # EOF: no header will come
            self._refuse()
            return
        data = RECV_VIEW[:n] if not self._got else self._got + RECV_VIEW[:n]
        result = parse(data)
        if isinstance(result, Header):
            self._complete(result, data[result.length :])
        elif isinstance(result, NeedMore):
            self._got = bytes(data)  # bounded: the parser refuses past MAX_HEADER
        else:
            self._refuse()

    def _on_read_exact(self) -> None:
        """`_on_read` taking only the header's bytes off the socket: peek,
        parse, then take what was header (all of it while the header is not
        complete: none of it can be the client's yet)."""
        sock = self.sock
        try:
            n = sock.recv_into(RECV_BUFFER, MAX_HEADER - len(self._got), socket.MSG_PEEK)
            if n:
                data = self._got + RECV_VIEW[:n]
                result = parse(data)
                if isinstance(result, Header):
                    sock.recv_into(RECV_BUFFER, result.length - len(self._got))
                    self._complete(result, b"")
                    return
                if isinstance(result, NeedMore):
                    sock.recv_into(RECV_BUFFER, n)
                    self._got = bytes(data)
                    return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._refuse()  # EOF, an error, or not a header

    def _complete(self, header: Header, rest: Buffer) -> None:
        self.service.awaiting.discard(self)
        complete(self.listener, self.sock, self.host, self.port, header, rest)

    def _refuse(self) -> None:
        self.service.awaiting.discard(self)
        self.reactor.forget(self.fd)
        self.sock.close()
        self.service.refused_proxy(self.host, self.port)

    def expire(self) -> None:
        """No complete header within handshake_timeout."""
        self._refuse()
