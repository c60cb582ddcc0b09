"""TLS over TCP: a stream transport whose byte stream is TLS records.

The bytes -- records in, records out, SSL_write's retry rule -- are
net/tls_records.py's, behind the byte seam (loop/seams.py `ByteStream`), so
the transport's queue, flow control and error ladder serve TLS unchanged.
What this class adds is TLS's lifecycle around them.

The handshake
-------------
The handler hears nothing until the handshake is done: a framed hello must
not leave before it, and `conn.open` carries the verified client's CN.
Until then the transport's protocol is a placeholder that ends the
connection when the daemon drains, and its reader is the handshake's.  A
connection closed before its handshake finished -- an OpenSSL error, the
peer's EOF, `handshake_timeout` (enforced by the daemon's periodic sweep,
net/tls_service.py), idle -- logs `tls.fail` with that reason, throttled
like `conn.reject`, and no `conn.open`/`conn.close` pair.

Records of its own, and the end
-------------------------------
Records TLS writes by itself (the handshake's flights, tickets, alerts) are
sent at once; if the kernel is full and no plaintext is queued, the socket
is watched for writability for them alone (`_send_records`).  An end or a
failure met in the same recv as records already answered (a client's
"bye" and close_notify together) is read again on the loop's next turn,
since the socket may never be readable again.
On close a close_notify is written and offered to the kernel once, without
waiting, unless the connection failed or the peer is not reading; evd never
waits for the peer's close_notify.  Renegotiation is refused by the
context (system/certificates.py).
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from evd.handlers.base import Handler as Ignoring
from evd.handlers.service import Service
from evd.loop.seams import Buffer, Handler, Reason
from evd.net.tls_records import TLSRecords, failure_reason
from evd.net.transport import StreamSocket, StreamTransport

if TYPE_CHECKING:
    from evd.loop.reactor import Reactor


class ServiceTLS(Protocol):
    """What a TLS transport needs of its service's TLS state
    (net/tls_service.py): the context, the handshakes under way, and
    where a failed handshake is told."""

    service: Service
    context: ssl.SSLContext
    handshaking: set[TLSTransport]

    def failed(self, conn: TLSTransport, reason: str) -> None: ...


def common_name(cert: Mapping[str, object]) -> str | None:
    """The subject's CN of a decoded certificate (`getpeercert()`); the
    last one if there are several, the most specific by X.509 convention."""
    found = None
    subject = cert.get("subject", ())
    assert isinstance(subject, tuple)
    for rdn in subject:
        for key, value in rdn:
            if key == "commonName":
                found = str(value)
    return found


class _Handshaking(Ignoring):
    """The protocol of a connection whose handshake is under way: the real
    handler has not been told of it yet.  A daemon that drains ends it (it
    has nothing in flight); everything else is ignored (Handler's
    defaults)."""

    __slots__ = ()

    def __init__(self, transport: TLSTransport):
        self.transport = transport

    def drain(self) -> None:
        self.transport.close(Reason.SHUTDOWN)


class TLSTransport(StreamTransport):
    __slots__ = ("tls", "client_cn", "records", "announced", "_handler")

    def __init__(
        self,
        reactor: Reactor,
        sock: StreamSocket,
        protocol: Handler,
        service: Service,
        host: str | None,
        port: int,
        tls: ServiceTLS,
    ):
        records = TLSRecords(sock, tls.context)
        super().__init__(reactor, records, protocol, service, host, port)
        self.records = records
        records.ended_after_data = self._read_again
        records.records_wait = self._records_wait
        self.tls = tls
        self.client_cn: str | None = None
        self.announced = False  # conn.open is said once the handshake is done
        self._handler: Handler | None = protocol  # told once the handshake is done
        self.protocol = _Handshaking(self)
        self._reader = self._on_handshake

    @property
    def proto(self) -> str:
        return "tls"

    def start(self, conn_id: int) -> None:
        """Wait for the client's hello; the handler comes later."""
        self.conn_id = conn_id
        self._reading = True
        self.tls.handshaking.add(self)
        try:
            self.reactor.add_reader(self.fd, self._reader)
        except OSError as exc:
            self._os_error("epoll_ctl", exc)

    # -- the handshake ------------------------------------------------------

    def _on_handshake(self) -> None:
        try:
            n = self.records.pull()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._os_error("recv", exc)
            return
        if not n:
            self._on_eof()  # the placeholder's answer: close, `tls.fail` "eof"
            return
        self._handshake()

    def received(self, data: Buffer) -> None:
        """The start of the ClientHello, read with a PROXY header before
        this transport existed (net/proxied.py)."""
        if data and not self._closing:
            self.records.incoming.write(data)
            self._handshake()

    def _handshake(self) -> None:
        """One step of the handshake with what the incoming BIO holds."""
        try:
            self.records.obj.do_handshake()
        except ssl.SSLWantReadError:
            self._send_records()  # the server's flight, if the client's was whole
            return
        except ssl.SSLError as exc:
            self._send_records()  # the alert tells the client why
            self.fail(failure_reason(exc))
            return
        self._send_records()  # the last flight; TLS 1.3 session tickets
        if not self.closed:
            self._established()

    def _established(self) -> None:
        """Hand the connection to its handler, as StreamTransport.start does
        for plain TCP, then deliver what came with the client's Finished."""
        self.announced = True
        self.tls.handshaking.discard(self)
        cert = self.records.obj.getpeercert()
        extra = {}
        if cert:  # only when tls_client_ca asked for one, and it was verified
            self.client_cn = common_name(cert)
            extra["client_cn"] = self.client_cn
        handler = self._handler
        assert handler is not None
        self._handler = None
        self.protocol = handler
        self._reader = self._on_read_echo if handler.echoes else self._on_read
        if self._reading:
            self.reactor.add_reader(self.fd, self._reader)  # replaces _on_handshake
        self.tls.service.announce(self, self.conn_id, **extra)
        try:
            handler.connection_made(self)
        except Exception as exc:
            self._bug("connection_made", exc)
            return
        if self.records.incoming.pending and not self._closing:
            self._reader()

    def fail(self, reason: str) -> None:
        """End a connection whose handshake did not finish (`tls.fail`)."""
        self.close(Reason.ERROR, tls_fail=reason)

    # -- what the records tell ----------------------------------------------

    def _read_again(self) -> None:
        self.reactor.call_later(0, self._read_end)

    def _read_end(self) -> None:
        if not self.closed:
            self._reader()  # the records' recv_into answers the end at once

    def _send_records(self) -> None:
        """Send records OpenSSL wrote on its own (the handshake's flights,
        alerts); also the writer that waits for them (`_records_wait`)."""
        try:
            done = self.records.push()
        except OSError as exc:
            self._os_error("send", exc)
            return
        if done:
            if not self._out:  # (no system call when it was not watching)
                self.reactor.remove_writer(self.fd)
        else:
            self._records_wait()

    def _records_wait(self) -> None:
        """Records of our own wait for the kernel: with plaintext queued,
        the queue's next send takes them first; else watch for them alone."""
        if not self._out and not self.closed:
            self.reactor.add_writer(self.fd, self._send_records)

    # -- closing ------------------------------------------------------------

    def close(self, reason: Reason = Reason.DONE, **extra: object) -> None:
        if self.closed:
            return
        if not self.announced:
            self.tls.handshaking.discard(self)
            if reason is not Reason.SHUTDOWN:
                self.tls.failed(self, str(extra.get("tls_fail") or extra.get("error") or reason))
        elif reason is not Reason.RESET and reason is not Reason.ERROR:
            self._close_notify()
        super().close(reason, **extra)

    def _close_notify(self) -> None:
        """Write close_notify and offer it to the kernel once.  Not when
        earlier records still wait: the peer is not reading."""
        records = self.records
        if records.cipher:
            return
        try:
            records.obj.unwrap()
        except (ssl.SSLError, ValueError):
            pass  # SSLWantReadError: ours is written; theirs is not awaited
        data = records.outgoing.read()
        if data:
            try:
                records.sock.send(data)
            except OSError:
                pass
