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
"""

from __future__ import annotations

import _socket
import errno
import os
import socket
import stat
import sys

from evd.core.addresses import Address
from evd.core.log import log
from evd.handlers.service import conn_ids
from evd.net import transport as transport_mod
from evd.net.transport import RECV_BUFFER, RECV_VIEW, StreamTransport

AF_INET6, AF_UNIX = int(socket.AF_INET6), int(socket.AF_UNIX)
IPPROTO_TCP, TCP_NODELAY = socket.IPPROTO_TCP, socket.TCP_NODELAY
INHERITS_NODELAY = sys.platform.startswith("linux")

ACCEPT_BATCH = 64
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


class BindError(Exception):
    """A listener could not be opened; str() is the one-line message."""


def format_address(family: int, sockaddr) -> str:
    if family == socket.AF_UNIX:
        return sockaddr if isinstance(sockaddr, str) and sockaddr else "unix"
    host, port = sockaddr[0], sockaddr[1]
    if family == socket.AF_INET6:
        if host.startswith("::ffff:") and "." in host:
            return f"{host[7:]}:{port}"
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def _ip_socket(address: Address, kind: int) -> tuple[socket.socket, tuple]:
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


def bind(address: Address, reuse_port: bool = False) -> socket.socket:
    """A bound, non-blocking socket for `address` (listening if a stream)."""
    sock = None
    try:
        if address.proto == "unix":
            _clear_stale_unix(address.host)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(address.host)
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

    def __init__(self, reactor, sock: socket.socket, service, address: Address):
        self.reactor = reactor
        self.sock = sock
        self.service = service
        self.address = address  # as configured: the reload key
        self.proto = address.proto
        self.actual = format_address(sock.family, sock.getsockname())

    def open(self) -> None:
        self.reactor.add_reader(self.sock.fileno(), self._on_read)
        log.info("listener.open", service=self.service.name, proto=self.proto, address=self.actual)

    def close(self) -> None:
        self.reactor.remove_reader(self.sock.fileno())
        if self.proto == "unix" and self.owns_path:
            try:
                os.unlink(self.address.host)
            except OSError:
                pass
        self.sock.close()
        log.info("listener.close", service=self.service.name, proto=self.proto, address=self.actual)

    def _on_read(self) -> None:
        raise NotImplementedError


class StreamListener(Listener):
    def __init__(self, reactor, sock, service, address, handler_factory):
        super().__init__(reactor, sock, service, address)
        self.handler_factory = handler_factory
        self._family = int(sock.family)
        self._backoff_timer = None
        self._last_backoff_log = -1.0
        # Replies leave at once (no Nagle delay behind an unacknowledged
        # segment).  Linux gives accepted sockets the listener's TCP_NODELAY,
        # which saves a system call per connection; elsewhere each accepted
        # socket is set.
        self._nodelay_each = False
        if self.proto == "tcp":
            sock.setsockopt(IPPROTO_TCP, TCP_NODELAY, 1)
            self._nodelay_each = not INHERITS_NODELAY

    def close(self) -> None:
        if self._backoff_timer is not None:
            self.reactor.cancel(self._backoff_timer)
            self._backoff_timer = None
        super().close()

    def _on_read(self) -> None:
        # The C-level accept, and the C socket type for the connection:
        # socket.accept() converts family and type to enums for every
        # connection, and socket.socket adds Python-level __init__ and
        # close() wrappers (together ~6% of the connect path's CPU).
        accept = self.sock._accept
        family = self._family
        for _ in range(ACCEPT_BATCH):
            try:
                fd, sockaddr = accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_DESCRIPTORS:
                    self._back_off(exc)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue  # the client gave up before we got to it
                raise
            self._admit(_socket.socket(family, socket.SOCK_STREAM, 0, fd), sockaddr)

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

    def _admit(self, conn: socket.socket, sockaddr) -> None:
        service = self.service
        if self._family == AF_UNIX:
            host, port = None, 0
        else:
            host, port = sockaddr[0], sockaddr[1]
            if self._family == AF_INET6 and host.startswith("::ffff:") and "." in host:
                host = host[7:]  # an IPv4 client of a dual-stack socket
        reason = service.admission.connect(host, self.reactor.now)
        if reason is not None:
            conn.close()
            service.rejected += 1
            service.rejects.note(reason, transport_mod.peer_name(host, port))
            return
        conn.setblocking(False)
        if self._nodelay_each:
            conn.setsockopt(IPPROTO_TCP, TCP_NODELAY, 1)
        transport = StreamTransport(self.reactor, conn, self.handler_factory(), service, host, port)
        service.connections.add(transport)
        service.connections_total += 1
        conn_id = next(conn_ids)
        if log.info_on:
            log.info("conn.open", service=service.name, peer=transport.peer, conn=conn_id)
        transport.start(conn_id)


class DatagramEndpoint(Listener):
    def __init__(self, reactor, sock, service, address, handler, guard_ports: set):
        super().__init__(reactor, sock, service, address)
        self.handler = handler
        # Datagrams are received into the process's one buffer (recvfrom
        # would malloc 64 KiB for each); echo answers from it uncopied.
        # 64 KiB truncates none: the largest UDP payload is 65,507 bytes.
        self._echoes = getattr(handler, "echoes", False)
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
        buffer, view = RECV_BUFFER, RECV_VIEW
        checked = admission.filters or admission._rate
        # Counted in locals, added to the service once per batch.
        bytes_in = bytes_out = requests = 0
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
                    service.rejected += 1
                    service.drops.note("loop", format_address(sock.family, sockaddr))
                    continue
                if checked:
                    peer = format_address(sock.family, sockaddr)
                    reason = admission.datagram(peer.rpartition(":")[0].strip("[]"), self.reactor.now)
                    if reason is not None:
                        service.rejected += 1
                        service.drops.note(reason, peer)
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
                    service.drops.note("send_buffer_full", format_address(sock.family, sockaddr))
                except OSError as exc:
                    service.errors += 1
                    service.drops.note(f"send_errno_{exc.errno}", format_address(sock.family, sockaddr))
        finally:
            service.bytes_in += bytes_in
            service.bytes_out += bytes_out
            service.requests += requests
