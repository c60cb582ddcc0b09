"""The TLS side of one service's running state.

A service with `tls` listeners has one `ServerTLS`, made by the daemon with
its first TLS listener and kept across reloads like the service itself:

- `context`: the server context new connections are made with.  Preflight
  builds a fresh one from the files at every reload (SIGHUP is how a
  certificate rotates) and the daemon puts it here; connections already
  open keep the session they have.
- `handshaking`: the connections whose handshake is under way.  The
  daemon's periodic sweep calls `sweep`, which ends those older than
  `handshake_timeout`: the set is small (a busy port finishes its
  handshakes in milliseconds), so the check costs nothing per byte and no
  timer per connection.
- `tls.fail`: one line per failed handshake, throttled like `conn.reject`
  (the first at once, then a count per reason once a second), and counted
  by reason in `failures`.
"""

from __future__ import annotations

import ssl
from collections import Counter
from typing import TYPE_CHECKING

from evd.config.addresses import peer_text
from evd.handlers.service import Service, ThrottledLog
from evd.loop.seams import Handler
from evd.net.tls import TLSTransport
from evd.net.transport import StreamSocket

if TYPE_CHECKING:
    from evd.loop.reactor import Reactor

Peer = tuple[str | None, int]


def _render_peer(peer: Peer) -> str:
    return peer_text(*peer)


class ServerTLS:
    """One service's TLS: the context new connections get (a reload puts
    the freshly read one here; open connections keep theirs), the
    handshakes under way (for `handshake_timeout`), and `tls.fail`."""

    def __init__(self, service: Service, context: ssl.SSLContext, reactor: Reactor):
        self.service = service
        self.context = context
        self.handshaking: set[TLSTransport] = set()
        self.failures: Counter[str] = Counter()  # by reason, for evd_tls_failures_total
        self.fails: ThrottledLog[Peer] = ThrottledLog("tls.fail", service.name, reactor, _render_peer)

    def transport(
        self,
        reactor: Reactor,
        sock: StreamSocket,
        protocol: Handler,
        service: Service,
        host: str | None,
        port: int,
    ) -> TLSTransport:
        """The listener's transport factory for a `tls` address."""
        return TLSTransport(reactor, sock, protocol, service, host, port, self)

    def failed(self, conn: TLSTransport, reason: str) -> None:
        self.failures[reason] += 1
        self.fails.note(reason, (conn.host, conn.port))

    def sweep(self, now: float) -> None:
        """The daemon's periodic sweep: end handshakes older than
        `handshake_timeout` (the handshaking set is small: a busy port
        finishes its handshakes within milliseconds)."""
        limit = self.service.config.limits.handshake_timeout
        for conn in [c for c in self.handshaking if now - c.opened > limit]:
            conn.fail("handshake_timeout")
