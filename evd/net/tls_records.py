"""TLS records over a connected socket: a byte stream with the socket's calls.

This is TLS's side of the byte seam (loop/seams.py `ByteStream`): the
stream transport (net/transport.py) reads and writes plaintext through it
exactly as it reads and writes a plain socket, so the output queue, flow
control and the error ladder are the transport's, once, for both.

Why SSLObject and two memory BIOs
---------------------------------
OpenSSL never touches the socket.  Each `recv_into` is one `recv` of
ciphertext, fed to the incoming BIO; every whole record is decrypted into
the caller's buffer; what OpenSSL writes (records, alerts) is collected
from the outgoing BIO and sent with one `send`.  That is asyncio's sslproto
and h11's sans-IO shape, and it was chosen by measurement: a non-blocking
SSLSocket lets OpenSSL read the socket itself, two `read`s per record (its
header, then its body) and one `write` per handshake record, where this
makes one `recv` and one `send` per request, as plain TCP does.  A memory
BIO never blocks, so OpenSSL never raises SSLWantWriteError here, and
SSLWantReadError only means "a record is not whole yet".

The socket's contract, kept
---------------------------
- `recv_into`: every whole record of one recv, in one answer (as one
  larger recv of a plain socket would be); BlockingIOError while no record
  is whole; 0 at the peer's close_notify or the kernel's EOF.  A kernel EOF
  in the middle of a record is ECONNRESET.  The recv is at most
  `CIPHER_SIZE`, so that a record begun earlier and all this recv brings
  usually decrypt into the caller's 64 KiB; when the buffer fills anyway,
  the transport is told to read again at once (`ended_after_data`), since
  the socket may bring nothing more.  Records that reading makes (TLS
  1.3 tickets, a key update's answer, an alert) are sent at once.
- `send`: plaintext is taken once its ciphertext is all in the kernel.  If
  the kernel takes only part of it, the rest waits in `cipher` and `send`
  answers 0: the plaintext stays in the transport's queue -- counted
  against `write_high`, keeping `close_when_flushed` waiting -- and the next
  `send`, which the queue makes with the same data at its head, first
  finishes the ciphertext and then answers that data taken.  That is
  SSL_write's own retry rule, and it is what lets the transport's write
  path serve TLS unchanged.
- Failures of TLS itself raise OSError with no errno and the text
  "tls: REASON" (`failure_reason`), which the transport's ladder logs.

What only TLS has -- when the stream ends or fails after records it has
already answered with, and when its own records wait for the kernel with no
plaintext queued -- it tells its transport through two callbacks
(`ended_after_data`, `records_wait`; net/tls.py).
"""

from __future__ import annotations

import errno
import ssl
from collections.abc import Callable, Sequence
from typing import Protocol, cast

from evd.loop.seams import Buffer, ByteStream

# A TLS record's ciphertext is at most 2^14 bytes of plaintext, 2048 of
# expansion (TLS 1.2 allows it) and a 5-byte header.
MAX_RECORD = 2**14 + 2048 + 5
# One recv of ciphertext: with the part of a record OpenSSL already holds
# (less than MAX_RECORD), everything whole decrypts into a 64 KiB buffer.
CIPHER_SIZE = 65536 - MAX_RECORD
CIPHER_BUFFER = bytearray(CIPHER_SIZE)  # shared, as net/transport.py's RECV_BUFFER
CIPHER_VIEW = memoryview(CIPHER_BUFFER)


class Records(Protocol):
    """What decrypts and encrypts a connection's records: SSLObject's read
    (given a buffer: the count) and write."""

    def read(self, len: int, buffer: bytearray | memoryview, /) -> int: ...
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


def tls_error(exc: ssl.SSLError) -> OSError:
    """The stream's own failure, as the transport's ladder reads it."""
    return OSError(f"tls: {failure_reason(exc)}")


# The peer's close_notify, as `TLSRecords.end` keeps it: recv_into's 0.
CLOSE_NOTIFY = OSError("tls: close_notify")


def _nothing() -> None:
    pass


class TLSRecords:
    """One connection's TLS: the SSLObject, its BIOs and the socket."""

    __slots__ = (
        "sock",
        "obj",
        "incoming",
        "outgoing",
        "records",
        "cipher",
        "inflight",
        "partial",
        "end",
        "ended_after_data",
        "records_wait",
    )

    def __init__(self, sock: ByteStream, context: ssl.SSLContext):
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.records = records_of(self.obj)
        self.cipher: Buffer = b""  # ciphertext the kernel has not taken yet
        self.inflight = 0  # plaintext bytes whose ciphertext that is (0: records of our own)
        self.partial = False  # OpenSSL holds the start of a record
        # The stream's end (0) or failure, met after records already answered:
        # the next recv_into says it.
        self.end: OSError | None = None
        # Told, with no arguments: the end above is waiting (the socket may
        # never be readable again); records of our own wait for the kernel.
        self.ended_after_data: Callable[[], object] = _nothing
        self.records_wait: Callable[[], object] = _nothing

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.ended_after_data = self.records_wait = _nothing  # the transport's, a cycle
        self.sock.close()

    # -- bytes in -----------------------------------------------------------

    def pull(self) -> int:
        """One recv of ciphertext into the incoming BIO: its size, 0 at the
        kernel's EOF; raises as the socket does."""
        n = self.sock.recv_into(CIPHER_BUFFER)
        if n:
            self.incoming.write(CIPHER_VIEW[:n])
        return n

    def recv_into(self, buffer: bytearray) -> int:
        """Every whole record there is, decrypted into `buffer`: its size.
        Records left in the BIO by the handshake are read even when the
        socket has nothing new."""
        if self.end is not None:
            return self._ended()
        incoming = self.incoming
        try:
            n = self.sock.recv_into(CIPHER_BUFFER)
        except (BlockingIOError, InterruptedError):
            if not incoming.pending and not self.obj.pending():
                raise
            n = -1
        if n > 0:
            incoming.write(CIPHER_VIEW[:n])
        elif not n:
            if self.partial:  # the peer vanished in the middle of a record
                raise ConnectionResetError(errno.ECONNRESET, "EOF inside a TLS record")
            return 0
        # Decrypting is inline, not a method: this is the TLS echo's hot path.
        records = self.records
        got = 0
        end: OSError | None = None
        while True:
            try:
                n = records.read(len(buffer) - got, memoryview(buffer)[got:] if got else buffer)
            except ssl.SSLWantReadError:
                self.partial = True
                break
            except ssl.SSLZeroReturnError:
                n = 0
            except ssl.SSLError as exc:
                end = tls_error(exc)
                break
            if not n:  # the peer's close_notify: its end of the stream
                end = CLOSE_NOTIFY
                break
            got += n
            if got == len(buffer):
                # Full: a read of 0 more would look like close_notify.  What
                # is left (in the BIO, or decrypted inside OpenSSL) may have
                # no readable socket to bring it: read again at once.
                self.ended_after_data()
                break
            if not incoming.pending:  # spares the SSLWantReadError's cost
                self.partial = False
                break
        if self.outgoing.pending and not self.push():  # a key update's answer, an alert
            self.records_wait()
        if end is None and got:
            return got
        return self._end_with(got, end)

    def _end_with(self, got: int, end: OSError | None) -> int:
        """No record, or the stream's end after `got` bytes of them."""
        if end is None:
            raise BlockingIOError(errno.EAGAIN, "no whole TLS record yet")
        self.end = end
        if got:  # answer those first; the end comes with the next call
            self.ended_after_data()
            return got
        return self._ended()

    def _ended(self) -> int:
        end = self.end
        if end is CLOSE_NOTIFY:
            return 0
        assert end is not None
        raise end

    # -- bytes out ----------------------------------------------------------

    def send(self, data: Buffer) -> int:
        """All of `data` once its ciphertext is all in the kernel, else 0
        (see the module's docstring)."""
        if self.inflight or self.cipher:
            if not self.push():
                return 0
            taken, self.inflight = self.inflight, 0
            if taken:
                return taken
        try:
            self.records.write(data)
        except ssl.SSLError as exc:
            raise tls_error(exc) from exc
        # `push`, inline for the usual case (nothing waited): the hot path.
        cipher = self.outgoing.read()
        try:
            sent = self.sock.send(cipher)
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent == len(cipher):
            return len(data)
        self.cipher = memoryview(cipher)[sent:]
        self.inflight = len(data)
        return 0

    def sendmsg(self, buffers: Sequence[Buffer]) -> int:
        if self.inflight:  # these buffers' ciphertext is on its way already
            return self.send(b"")
        return self.send(buffers[0] if len(buffers) == 1 else b"".join(buffers))

    def push(self) -> bool:
        """Offer the waiting ciphertext and whatever OpenSSL wrote since to
        the kernel: True when all of it went; raises as the socket does."""
        data: Buffer = self.outgoing.read()
        if self.cipher:
            data = b"".join((self.cipher, data)) if data else self.cipher
        if not data:
            return True
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent == len(data):
            self.cipher = b""
            return True
        self.cipher = memoryview(data)[sent:]
        return False
