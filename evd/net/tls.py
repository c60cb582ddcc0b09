"""TLS over TCP: a stream transport whose bytes pass through OpenSSL.

Why SSLObject and two memory BIOs
---------------------------------
OpenSSL never touches the socket.  Each readable event is one `recv_into`
the process's receive buffer, fed to the incoming BIO; whole records are
decrypted and handed on; what OpenSSL writes (records, the handshake's
flights, alerts) is collected from the outgoing BIO and sent with one
`send`.  That is asyncio's sslproto and h11's sans-IO shape, and it was
chosen by measurement (README, "TLS"): a non-blocking SSLSocket lets
OpenSSL read the socket itself, two `read`s per record (its header, then
its body) and one `write` per handshake record, where this transport makes
one `recv` and one `send` per request, as plain TCP does.  A memory BIO
also never blocks, so OpenSSL never raises SSLWantWriteError here, and
SSLWantReadError only means "a record is not whole yet": the kernel's
would-block stays where it is for plain TCP, in this transport.

What StreamTransport's write path is told
-----------------------------------------
StreamTransport (net/transport.py) keeps its queue, flow control and close
path; this class replaces `_send` and the two readers.  `_send` encrypts the
chunks it is given and sends the ciphertext.  If the kernel takes only part
of it, the rest waits in `_cipher` and `_send` reports that it took nothing:
the plaintext stays queued -- counted against `write_high`, keeping
`close_when_flushed` waiting -- and the next `_send`, which the queue makes
with the same chunks at its head, first finishes the ciphertext and then
reports those chunks taken.  That is SSL_write's own retry rule; it is what
lets the shared write path work unchanged.

The handshake
-------------
The handler hears nothing until the handshake is done: a framed hello must
not leave before it, and `conn.open` carries the verified client's CN.
Until then the transport's protocol is a placeholder that ends the
connection when the daemon drains.  A connection closed before its
handshake finished -- an OpenSSL error, the peer's EOF, `handshake_timeout`
(enforced by the daemon's periodic sweep, net/tls_service.py), idle --
logs `tls.fail` with that reason, throttled like `conn.reject`, and no
`conn.open`/`conn.close` pair.

Reading and closing
-------------------
Every whole record of one recv is delivered, even if the handler paused
meanwhile (as one larger recv would have been); a partial record waits for
the rest.  A kernel EOF in the middle of a record is a reset.  Records that
reading produces (TLS 1.3 tickets, a key update, an alert) are sent at once.
On close a close_notify is written and offered to the kernel once, without
waiting, unless the connection failed or the peer is not reading; evd never
waits for the peer's close_notify.  Renegotiation is refused by the
context (system/certificates.py).
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol, cast

from evd.handlers.base import Handler as Ignoring
from evd.handlers.service import Service
from evd.loop.seams import Buffer, Handler, Reason
from evd.net.transport import RECV_BUFFER, RECV_SIZE, RECV_VIEW, StreamSocket, StreamTransport

if TYPE_CHECKING:
    from evd.loop.reactor import Reactor

# Decrypted records land here (one process, one thread: free again when the
# callback returns).  SSLObject.read without a buffer would allocate its
# whole length for every record, as recv(64 KiB) did (see net/transport.py).
# A TLS record holds at most 16 KiB, so one record always fits.
PLAIN_BUFFER = bytearray(RECV_SIZE)
PLAIN_VIEW = memoryview(PLAIN_BUFFER)


class ServiceTLS(Protocol):
    """What a TLS transport needs of its service's TLS state
    (net/tls_service.py): the context, the handshakes under way, and
    where a failed handshake is told."""

    service: Service
    context: ssl.SSLContext
    handshaking: set[TLSTransport]

    def failed(self, conn: TLSTransport, reason: str) -> None: ...


class Records(Protocol):
    """What decrypts and encrypts a connection's records: SSLObject's read
    (given a buffer: the count) and write."""

    def read(self, len: int, buffer: bytearray, /) -> int: ...
    def write(self, data: Buffer, /) -> int: ...


def records_of(obj: ssl.SSLObject) -> Records:
    """The C-level object SSLObject.read and .write call through (private:
    `_sslobj`), so that the echo path pays no Python frame for them; the
    SSLObject itself, same calls, where a Python has no such attribute."""
    inner = getattr(obj, "_sslobj", None)
    if (
        inner is not None
        and callable(getattr(inner, "read", None))
        and callable(getattr(inner, "write", None))
    ):
        return cast(Records, inner)
    return cast(Records, obj)


def failure_reason(exc: ssl.SSLError) -> str:
    """`tls.fail` reason for an OpenSSL error: its reason code in lower
    case ("wrong_version_number", "unsupported_protocol",
    "peer_did_not_return_a_certificate"), or what kind of error it was."""
    if exc.reason:
        return str(exc.reason).lower()
    if isinstance(exc, ssl.SSLEOFError):
        return "eof"
    return "ssl_error"


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
    __slots__ = (
        "tls",
        "client_cn",
        "_obj",
        "_incoming",
        "_outgoing",
        "_handler",
        "_records",
        "_cipher",
        "_inflight",
        "_partial",
        "_opened",
    )

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
        super().__init__(reactor, sock, protocol, service, host, port)
        self.tls = tls
        self.client_cn: str | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._obj = tls.context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._records = records_of(self._obj)
        self._handler: Handler | None = protocol  # told once the handshake is done
        self.protocol = _Handshaking(self)
        self._reader = self._on_handshake
        self._cipher: Buffer = b""  # ciphertext the kernel has not taken yet
        self._inflight = 0  # plaintext bytes whose ciphertext that is (0: records of our own)
        self._partial = False  # OpenSSL holds the start of a record
        self._opened = False  # the handshake is done and conn.open said

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
        if not self._pull():
            return
        try:
            self._obj.do_handshake()
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
        self._opened = True
        self.tls.handshaking.discard(self)
        cert = self._obj.getpeercert()
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
        if self._incoming.pending and not self._closing:
            self._on_read_echo() if handler.echoes else self._decrypt()

    def fail(self, reason: str) -> None:
        """End a connection whose handshake did not finish (`tls.fail`)."""
        self.close(Reason.ERROR, tls_fail=reason)

    # -- reading ------------------------------------------------------------

    def _pull(self) -> bool:
        """One recv into the incoming BIO; False if nothing came (would
        block) or the connection ended."""
        try:
            n = self.sock.recv_into(RECV_BUFFER)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self._os_error("recv", exc)
            return False
        if n:
            self._incoming.write(RECV_VIEW[:n])
            return True
        self._ended()
        return False

    def _ended(self) -> None:
        """The kernel's EOF."""
        if self._partial:  # the peer vanished in the middle of a record
            self.close(Reason.RESET)
        else:
            self._on_eof()

    def _on_read(self) -> None:
        if self._pull():
            self._decrypt()

    def _on_read_echo(self) -> None:
        """RFC 862 over TLS, the hot path, in one function as StreamTransport's
        echo reader is: one recv, then each whole record straight back --
        with nothing queued, one decrypt, one encrypt and one send; behind
        queued output, a copy queued (the plaintext buffer is reused).
        Also called when the handshake ends, for records that came with the
        client's Finished: the recv may then find nothing new."""
        incoming, outgoing, records, sock = self._incoming, self._outgoing, self._records, self.sock
        try:
            n = sock.recv_into(RECV_BUFFER)
        except (BlockingIOError, InterruptedError):
            if not incoming.pending:
                return
            n = -1
        except OSError as exc:
            self._os_error("recv", exc)
            return
        if n > 0:
            incoming.write(RECV_VIEW[:n])
        elif not n:
            self._ended()
            return
        while True:
            try:
                got = records.read(RECV_SIZE, PLAIN_BUFFER)
            except ssl.SSLWantReadError:
                self._partial = True
                if outgoing.pending:  # a record of our own (a key update's answer)
                    self._send_records()
                return
            except ssl.SSLError as exc:
                self._unreadable(exc)
                return
            if not got:
                self._unreadable(None)
                return
            self._partial = False
            self.bytes_in += got
            if self._out or self._cipher:
                self._enqueue((PLAIN_VIEW[:got].tobytes(),))
            else:
                records.write(PLAIN_VIEW[:got])
                data = outgoing.read()  # (with what reading wrote, if anything)
                try:
                    sent = sock.send(data)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError as exc:
                    self._os_error("send", exc)
                    return
                if sent == len(data):
                    self.bytes_out += got
                else:  # see _send: this plaintext is in flight until then
                    self._cipher = memoryview(data)[sent:]
                    self._inflight = got
                    self._enqueue((PLAIN_VIEW[:got].tobytes(),))
            if not incoming.pending:
                return

    def _record(self) -> int:
        """Decrypt the next whole record into PLAIN_BUFFER: its size; 0 when
        none is whole yet; -1 when the connection ended (the peer's
        close_notify, or an error)."""
        try:
            got = self._records.read(RECV_SIZE, PLAIN_BUFFER)
        except ssl.SSLWantReadError:
            # Only ever asked with bytes just received or still pending:
            # they began a record that is not whole yet.
            self._partial = True
            return 0
        except ssl.SSLError as exc:
            return self._unreadable(exc)
        if got:
            self._partial = False
            self.bytes_in += got
            return got
        return self._unreadable(None)

    def _unreadable(self, exc: ssl.SSLError | None) -> int:
        """read() gave no data: the peer's close_notify (0, or
        SSLZeroReturnError), its end of the stream; or an error.  -1."""
        self._send_records()  # our close_notify's answer, or an alert
        if exc is None or isinstance(exc, ssl.SSLZeroReturnError):
            self._on_eof()
        else:
            self.close(Reason.ERROR, error=f"tls: {failure_reason(exc)}")
        return -1

    def _decrypt(self) -> None:
        incoming = self._incoming
        while True:
            got = self._record()
            if got <= 0:
                break
            try:
                self.protocol.data_received(PLAIN_VIEW[:got].tobytes())
            except Exception as exc:
                self._bug("data_received", exc)
                return
            if self._closing or not incoming.pending:
                break
        if self._outgoing.pending and not self.closed:
            self._send_records()

    # -- writing ------------------------------------------------------------

    def _send_one(self, data: Buffer) -> int | None:
        return self._send((data,))

    def _send(self, chunks: Sequence[Buffer]) -> int | None:
        """See the module's docstring: plaintext is taken once its
        ciphertext is all in the kernel."""
        if self._inflight or self._cipher:
            if not self._push():
                return None if self.closed else 0
            taken, self._inflight = self._inflight, 0
            if taken:
                self.bytes_out += taken
                return taken
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        try:
            self._records.write(data)
        except ssl.SSLError as exc:
            self.close(Reason.ERROR, error=f"tls: {failure_reason(exc)}")
            return None
        size = len(data)
        if self._push():
            self.bytes_out += size
            return size
        if self.closed:
            return None
        self._inflight = size
        return 0

    def _push(self) -> bool:
        """Offer the waiting ciphertext and whatever OpenSSL wrote since to
        the kernel: True when all of it went."""
        data: Buffer = self._outgoing.read()
        if self._cipher:
            data = b"".join((self._cipher, data)) if data else self._cipher
        if not data:
            return True
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._os_error("send", exc)
            return False
        if sent == len(data):
            self._cipher = b""
            return True
        self._cipher = memoryview(data)[sent:]
        return False

    def _send_records(self) -> None:
        """Send records OpenSSL wrote on its own (handshake, tickets,
        alerts); if the kernel is full, watch for writability even when no
        plaintext is queued."""
        if not self._push() and not self.closed and not self._out:
            self.reactor.add_writer(self.fd, self._on_write)

    def _on_write(self) -> None:
        if self._cipher and not self._out and not self._push():
            return  # only records of our own wait, and still do
        super()._on_write()

    # -- closing ------------------------------------------------------------

    def close(self, reason: Reason = Reason.DONE, **extra: object) -> None:
        if self.closed:
            return
        if not self._opened:
            self.tls.handshaking.discard(self)
            if reason is not Reason.SHUTDOWN:
                self.tls.failed(self, str(extra.get("tls_fail") or extra.get("error") or reason))
        elif reason is not Reason.RESET and reason is not Reason.ERROR:
            self._close_notify()
        super().close(reason, **extra)

    def _close_notify(self) -> None:
        """Write close_notify and offer it to the kernel once.  Not when
        earlier records still wait: the peer is not reading."""
        if self._cipher:
            return
        try:
            self._obj.unwrap()
        except (ssl.SSLError, ValueError):
            pass  # SSLWantReadError: ours is written; theirs is not awaited
        data = self._outgoing.read()
        if data:
            try:
                self.sock.send(data)
            except OSError:
                pass

    def _log_close(self, reason: Reason, extra: dict[str, object]) -> None:
        if self._opened:  # else it was tls.fail, and never conn.open
            super()._log_close(reason, extra)
