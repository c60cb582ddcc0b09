"""Listening sockets: binding, accepting stream connections, UDP endpoints.

Binding is separate from listening so that the daemon can bind everything
first (and report a port in use before it detaches or drops privileges), and
so that a reload or systemd can hand over an already bound socket.

The accept loop takes at most ACCEPT_BATCH connections per readable event, so
a connection storm on one port cannot starve the others.  When the process
runs out of descriptors (EMFILE/ENFILE) the pending connection cannot be
accepted and the socket stays readable: instead of spinning at 100% CPU the
listener stops watching for BACKOFF seconds and says so, at most once a
second.

UDP endpoints answer datagrams in batches of DATAGRAM_BATCH per readable
event and never answer a datagram that could be the echo of another small
service (the loop and reflection guard of SPEC section 4).

Admission is the service's (`Service.admit`, `release`, `opened`); a
listener only asks and reports.  On a service behind the PROXY protocol a
connection from a trusted proxy first reads its header (net/proxied.py),
then comes back to `serve` as the client the header names.  A UNIX socket's path is removed at close
only if it is still the file this process bound (`unlink_if_ours`): the path
may have been taken over by another daemon or a file since.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from evd.config.addresses import Address, fold_mapped, sockaddr_text
from evd.handlers.service import Service
from evd.log.logger import log
from evd.loop.seams import Buffer, Handler, HandlerFactory
from evd.net import proxied
from evd.net.transport import RECV_BUFFER, RECV_VIEW, StreamSocket, StreamTransport

if TYPE_CHECKING:
    from evd.loop.reactor import Reactor, Timer

try:  # the C socket type, to wrap accepted descriptors (see c_accept)
    from _socket import socket as CSocket
except ImportError:  # pragma: no cover - every CPython has it
    CSocket = None  # type: ignore[assignment,misc]

AF_INET6, AF_UNIX = int(socket.AF_INET6), int(socket.AF_UNIX)
SOCK_STREAM = int(socket.SOCK_STREAM)
IPPROTO_TCP, TCP_NODELAY = socket.IPPROTO_TCP, socket.TCP_NODELAY
INHERITS_NODELAY = sys.platform.startswith("linux")

ACCEPT_BATCH = 64
# At close, the backlog is taken in at most this many batches (a listen
# backlog is 4096 at most by default: somaxconn).
BACKLOG_BATCHES = 64
# Long enough to let descriptors free up, short enough that a recovered
# daemon serves again within a blink.
BACKOFF = 0.1
BACKLOG = 1024
DATAGRAM_BATCH = 64
# Source ports whose datagrams we never answer: 0 (invalid) and the classic
# small services, which would answer back (echo 7, discard 9, daytime 13,
# qotd 17, chargen 19, time 37).
GUARD_PORTS = frozenset({0, 7, 9, 13, 17, 19, 37})
_OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


# (st_dev, st_ino) of a UNIX socket file, as this process bound it.
Identity = tuple[int, int]
# Paths this process bound, and what it found there right after binding:
# what `Listener.close` (and the supervisor) may remove later.
_BOUND_UNIX: dict[str, Identity] = {}


# (reactor, socket, handler, service, peer host, peer port) -> its transport:
# StreamTransport, or a TLS listener's (net/tls.py ServerTLS.transport).
TransportFactory = Callable[["Reactor", StreamSocket, Handler, Service, str | None, int], StreamTransport]


class BindError(Exception):
    """A listener could not be opened; str() is the one-line message."""


def _ip_socket(address: Address, kind: int) -> tuple[socket.socket, tuple[str, int]]:
    if address.host == "*":
        try:
            sock = socket.socket(socket.AF_INET6, kind)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            return sock, ("::", address.port)
        except OSError:  # no IPv6 on this host: IPv4 only
            return socket.socket(socket.AF_INET, kind), ("0.0.0.0", address.port)
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    return socket.socket(family, kind), (address.host, address.port)


def _clear_stale_unix(path: str) -> None:
    """Remove a socket file left by a dead process; refuse a live one."""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise BindError(f"{path} exists and is not a socket")
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except OSError:
        return
    finally:
        probe.close()
    raise BindError(f"{path} is in use by another process")


def path_identity(path: str) -> Identity | None:
    """(st_dev, st_ino) of the socket file at `path`, None if there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISSOCK(st.st_mode) else None


def bound_identity(path: str) -> Identity | None:
    """The identity of the socket file this process bound at `path`, or
    None if it bound none there (systemd's sockets, say)."""
    return _BOUND_UNIX.get(path)


def unlink_if_ours(path: str, identity: Identity | None) -> bool:
    """Remove `path` if it is still the socket file `identity` names: a
    file or another daemon's socket put there since is left alone.  True if
    removed.  (A check-then-unlink race remains with whoever replaces the
    file in between; it needs a process that deletes our socket anyway.)"""
    if identity is None or path_identity(path) != identity:
        return False
    try:
        os.unlink(path)
    except OSError:
        return False
    if _BOUND_UNIX.get(path) == identity:
        del _BOUND_UNIX[path]
    return True


def bind(address: Address, reuse_port: bool = False) -> socket.socket:
    """A bound, non-blocking socket for `address` (listening if a stream)."""
    sock = None
    try:
        if address.proto == "unix":
            _clear_stale_unix(address.host)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(address.host)
            identity = path_identity(address.host)
            if identity is not None:
                _BOUND_UNIX[address.host] = identity
        else:
            kind = socket.SOCK_DGRAM if address.proto == "udp" else socket.SOCK_STREAM
            sock, sockaddr = _ip_socket(address, kind)
            if kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(sockaddr)
        if address.proto != "udp":
            sock.listen(BACKLOG)
        sock.setblocking(False)
        return sock
    except OSError as exc:
        if sock is not None:
            sock.close()
        raise BindError(f"cannot listen on {address.proto} {address}: {exc.strerror or exc}") from None


class Listener:
    """What stream listeners and UDP endpoints share: a bound socket that
    belongs to a service, opened and closed with a log line."""

    # Remove a UNIX socket's path on close.  False when the socket is someone
    # else's to clean up: systemd's (socket activation) or a supervisor's.
    owns_path = True

    def __init__(self, reactor: Reactor, sock: socket.socket, service: Service, address: Address):
        self.reactor = reactor
        self.sock = sock
        self.service = service
        self.address = address  # as configured: the reload key
        self.proto = address.proto
        self._family = int(sock.family)
        self.actual = sockaddr_text(sock.family, sock.getsockname())
        # The socket file bound for this listener (None: not bound here).
        self.identity = bound_identity(address.host) if address.proto == "unix" else None

    def open(self) -> None:
        self.reactor.add_reader(self.sock.fileno(), self._on_read)
        log.info("listener.open", service=self.service.name, proto=self.proto, address=self.actual)

    def close(self) -> None:
        self.reactor.remove_reader(self.sock.fileno())
        if self.proto == "unix" and self.owns_path:
            unlink_if_ours(self.address.host, self.identity)
        self.sock.close()
        log.info("listener.close", service=self.service.name, proto=self.proto, address=self.actual)

    def _on_read(self) -> None:
        raise NotImplementedError


def c_accept(sock: socket.socket) -> Callable[[], tuple[int, Any]] | None:
    """The C-level accept of `sock` -- (fd, sockaddr), no Python socket
    object made -- or None where this Python lacks it (it is private API):
    the listener then uses the public `accept`, slower, same result."""
    accept = getattr(sock, "_accept", None)
    if CSocket is None or not callable(accept):
        return None
    return accept  # type: ignore[no-any-return]


class StreamListener(Listener):
    def __init__(
        self,
        reactor: Reactor,
        sock: socket.socket,
        service: Service,
        address: Address,
        handler_factory: HandlerFactory,
        transport_factory: TransportFactory = StreamTransport,
    ):
        super().__init__(reactor, sock, service, address)
        self.handler_factory = handler_factory
        self.transport_factory = transport_factory
        # socket.accept() converts family and type to enums for every
        # connection, and socket.socket adds Python-level __init__ and
        # close() wrappers: the C-level accept and socket type skip both,
        # a measurable share of the connect path (figures in docs/performance).
        self._c_accept = c_accept(sock)
        self._backoff_timer: Timer | None = None
        self._last_backoff_log = -1.0
        # Replies leave at once (no Nagle delay behind an unacknowledged
        # segment).  Linux gives accepted sockets the listener's TCP_NODELAY,
        # which saves a system call per connection; elsewhere each accepted
        # socket is set.
        self._nodelay_each = False
        if self.proto in ("tcp", "tls"):
            sock.setsockopt(IPPROTO_TCP, TCP_NODELAY, 1)
            self._nodelay_each = not INHERITS_NODELAY

    def close(self) -> None:
        """Stop listening.  What the kernel accepted meanwhile is taken
        first and served like any open connection (a SIGTERM lets it
        finish): closed in the backlog, each would be reset, and a proxy
        that had connected could not send its request elsewhere."""
        if self._backoff_timer is not None:
            self.reactor.cancel(self._backoff_timer)
            self._backoff_timer = None
        else:
            for _ in range(BACKLOG_BATCHES):
                if not self._accept_batch():
                    break
        super().close()

    def _on_read(self) -> None:
        self._accept_batch()

    def _accept_batch(self) -> bool:
        """Accept up to ACCEPT_BATCH connections; True if more may wait."""
        c_accept = self._c_accept
        family = self._family
        conn: CSocket
        for _ in range(ACCEPT_BATCH):
            try:
                if c_accept is not None:
                    fd, sockaddr = c_accept()
                    conn = CSocket(family, SOCK_STREAM, 0, fd)
                else:
                    conn, sockaddr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:
                if exc.errno in _OUT_OF_DESCRIPTORS:
                    self._back_off(exc)
                    return False
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue  # the client gave up before we got to it
                raise
            self._admit(conn, sockaddr)
        return True

    def _back_off(self, exc: OSError) -> None:
        now = self.reactor.now
        if now - self._last_backoff_log >= 1.0:
            self._last_backoff_log = now
            log.warning(
                "listener.backoff",
                service=self.service.name,
                proto=self.proto,
                address=self.actual,
                error=f"accept: [Errno {exc.errno}] {exc.strerror}",
                pause=BACKOFF,
            )
        self.reactor.remove_reader(self.sock.fileno())
        self._backoff_timer = self.reactor.call_later(BACKOFF, self._resume)

    def _resume(self) -> None:
        self._backoff_timer = None
        self.reactor.add_reader(self.sock.fileno(), self._on_read)

    def _admit(self, conn: CSocket, sockaddr: Any) -> None:
        if self._family == AF_UNIX:
            host, port = None, 0
        else:
            host, port = sockaddr[0], sockaddr[1]
            if self._family == AF_INET6:
                host = fold_mapped(host)  # an IPv4 client of a dual-stack socket
        admission = self.service.admission
        if admission.proxied:
            self._await_header(conn, host, port)
        else:
            self.serve(conn, host, port)

    def _await_header(self, conn: CSocket, host: str | None, port: int) -> None:
        """PROXY protocol: from a trusted proxy, wait for the header, not
        admitted meanwhile -- but no more of them at once than the service
        takes connections."""
        service = self.service
        if (
            not service.admission.from_proxy(host)
            or len(service.awaiting) >= service.config.limits.max_connections
        ):
            conn.close()
            service.refused_proxy(host, port)
            return
        try:
            conn.setblocking(False)
            if self._nodelay_each:
                conn.setsockopt(IPPROTO_TCP, TCP_NODELAY, 1)
        except OSError:
            conn.close()
            return
        proxied.accepted(self, conn, host, port)

    def serve(
        self,
        conn: CSocket,
        host: str | None,
        port: int,
        proxy: str | None = None,
        first: Buffer = b"",
    ) -> None:
        """Admit a connection from `host` and hand it to its transport.
        Behind the PROXY protocol (net/proxied.py) `host` is the client the
        header named, `proxy` the proxy's IP:PORT, and `first` what came
        after the header in the same read: the socket is non-blocking and
        watched already."""
        service = self.service
        reactor = self.reactor
        if service.admit(host, port, reactor.now) is not None:
            if proxy is not None:
                reactor.forget(conn.fileno())
            conn.close()
            return
        # From here the service holds a slot for this connection: whatever
        # fails before the transport exists gives it back (asyncio's
        # _accept_connection2), and the listener goes on accepting.
        try:
            if proxy is None:
                conn.setblocking(False)
                if self._nodelay_each:
                    conn.setsockopt(IPPROTO_TCP, TCP_NODELAY, 1)
            transport = self.transport_factory(reactor, conn, self.handler_factory(), service, host, port)
        except Exception as exc:
            if proxy is not None:
                reactor.forget(conn.fileno())
            conn.close()
            service.release(host)
            service.errors += 1
            log.error("error", where=f"{service.name}.accept", exc_info=exc)
            return
        if proxy is not None:
            transport.proxy = proxy
        transport.start(service.opened(transport))
        if first:
            transport.received(first)


# payload -> reply, or None: no reply (proto/classic.py)
DatagramHandler = Callable[[bytes], bytes | None]


class DatagramEndpoint(Listener):
    def __init__(
        self,
        reactor: Reactor,
        sock: socket.socket,
        service: Service,
        address: Address,
        handler: DatagramHandler,
        guard_ports: set[int],
    ):
        super().__init__(reactor, sock, service, address)
        self.handler = handler
        # Datagrams are received into the process's one buffer (recvfrom
        # would malloc 64 KiB for each); echo answers from it uncopied.
        # 64 KiB truncates none: the largest UDP payload is 65,507 bytes.
        self._echoes = bool(getattr(handler, "echoes", False))
        # Shared with every endpoint of this daemon: GUARD_PORTS plus each
        # port evd itself receives UDP on (kept current by the daemon).
        self.guard_ports = guard_ports

    def _on_read(self) -> None:
        sock = self.sock
        service = self.service
        admission = service.admission
        guard = self.guard_ports
        handler = self.handler
        echoes = self._echoes
        family = self._family
        # A dual-stack socket's IPv4 senders arrive as ::ffff:a.b.c.d; their
        # rate bucket is their IPv4 address's, as for connections.
        mapped = family == AF_INET6
        buffer, view = RECV_BUFFER, RECV_VIEW
        checked = admission.checks_datagrams
        now = self.reactor.now
        # Counted in locals, added to the service once per batch.
        bytes_in = bytes_out = requests = 0
        reply: bytes | memoryview | None
        try:
            for _ in range(DATAGRAM_BATCH):
                try:
                    n, sockaddr = sock.recvfrom_into(buffer)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    # An ICMP error for an earlier reply (ECONNREFUSED):
                    # nothing to do for this socket but read on.
                    continue
                bytes_in += n
                if sockaddr[1] in guard:
                    service.dropped("loop", family, sockaddr)
                    continue
                if checked:
                    # The bucket is keyed by the host as the kernel gave it:
                    # no text is made for a datagram that passes.
                    host = sockaddr[0]
                    if mapped and host.startswith("::ffff:"):
                        host = fold_mapped(host)
                    reason = admission.datagram(host, now)
                    if reason is not None:
                        service.dropped(reason, family, sockaddr)
                        continue
                requests += 1
                if echoes:  # straight back from the receive buffer
                    reply = view[:n]
                else:
                    try:
                        reply = handler(view[:n].tobytes())
                    except Exception as exc:
                        service.errors += 1
                        log.error("error", where=f"{service.name}.datagram", exc_info=exc)
                        continue
                    if reply is None:
                        continue
                try:
                    bytes_out += sock.sendto(reply, sockaddr)
                except (BlockingIOError, InterruptedError):
                    service.dropped("send_buffer_full", family, sockaddr)
                except OSError as exc:
                    service.errors += 1
                    service.dropped(f"send_errno_{exc.errno}", family, sockaddr)
        finally:
            service.bytes_in += bytes_in
            service.bytes_out += bytes_out
            service.requests += requests
