"""Stream transports: one connected byte stream and its buffers.

The transport owns the bytes; the protocol (a connection handler) owns their
meaning.  The split is CPython's asyncio selector transport, minus futures.
Under the transport is the byte seam (loop/seams.py `ByteStream`): a plain
TCP or UNIX connection's stream is its socket itself, so plain bytes pay
nothing for the seam; a TLS connection's is its records (net/tls_records.py),
which keep the socket's contract.  So all that follows exists once, for both:

- Reading: the socket is watched for readability only while the protocol
  can take more.  Each readable event is one `recv_into` a buffer shared by
  every connection (one process, one thread: it is free again when the
  callback returns); the protocol gets a bytes copy of just what arrived.
  A `recv(64 KiB)` instead would malloc 64 KiB and shrink it on every read,
  and glibc's consolidation of small free chunks on each such large request
  showed in the echo path's profile.  An echo connection
  (`protocol.echoes`) skips the copy and the protocol: it sends straight
  from the shared buffer and copies only what the stream does not take.
  The two readers stay two functions, as in asyncio: they are the hot path.
- Writing: `write` and `writelines` try the stream at once; only what it
  did not take is queued (a deque of memoryviews, so a partial send copies
  nothing) and only then is the socket watched for writability.  A queue
  of many small chunks (pipelined replies) leaves in one `sendmsg`.  Three
  places call the stream's send, each with the same ladder and each
  counting what it took: `write` (one buffer, the common case: no tuple),
  `_send` (several: `writelines` and the queue's `_flush`) and the echo
  reader (inline: its one call per request that could be saved).
- Flow control: above `write_high` queued bytes the transport stops reading
  the peer (an echo client that never reads cannot make evd buffer without
  bound) and tells the protocol it is `write_paused`; below `write_low` it
  reads again and calls `protocol.resume_writing()` (chargen refills there).
- Half-close: on the peer's EOF the protocol decides (`eof_received` returns
  True to keep the connection); otherwise queued output is flushed and the
  connection closes.
- Errors: one ladder everywhere -- would-block: try later; OS error (or the
  stream's own failure, a TLS alert): this connection is finished; anything
  else raised by the protocol: a bug, logged with its traceback, and this
  connection (only) is closed.
- Closing: `close` is the single exit; it runs once (`connection_lost`
  exactly once), drops the descriptor's callbacks from the reactor (no
  epoll_ctl: closing the socket takes it out of epoll), closes the stream,
  tells the service (`service.closed`: the admission slot and the counters)
  and logs `conn.close`.

What TLS adds around this (net/tls.py) is its lifecycle, not its bytes: a
handshake before the handler is told, `tls.fail` instead of
`conn.open`/`conn.close` when that fails, and a close_notify at the end.
"""

from __future__ import annotations

import errno
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

from evd.config.addresses import peer_text
from evd.handlers.base import Handler as InertHandler
from evd.log.logger import log
from evd.loop.seams import Buffer, ByteStream, Handler, Reason, ServiceState

if TYPE_CHECKING:
    from evd.config.model import Limits
    from evd.loop.reactor import Reactor

# One recv per readable event; 64 KiB matches the loopback MTU and a typical
# socket buffer, so a busy peer is drained in few calls without big copies.
RECV_SIZE = 65536
# The receive buffer of the whole process (UDP endpoints use it too).
RECV_BUFFER = bytearray(RECV_SIZE)
RECV_VIEW = memoryview(RECV_BUFFER)
# Chunks joined into one sendmsg: far below IOV_MAX (1024), enough to send a
# whole pipelined batch of replies at once.
SENDMSG_CHUNKS = 64

# The output queue of a connection with nothing waiting: an empty deque is
# ~600 bytes (CPython allocates its first 64-slot block with it), most of an
# idle connection's memory, so one is made only when the stream does not
# take a write at once, and dropped once it drains.
_NO_QUEUE = ()

# Errors that mean "the peer is gone", as opposed to something to report.
PEER_GONE = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ETIMEDOUT, errno.ENOTCONN})

# What a closed transport points at instead of its handler: the reference
# cycle transport <-> handler is broken, and a late call does nothing.
_GONE: Handler = InertHandler()


# What a listener accepts: socket.socket, or the C-level socket it accepts
# into; as it is, the byte stream of a plain connection.
StreamSocket = ByteStream


def _noop() -> None:
    pass


class StreamTransport:
    __slots__ = (
        "reactor",
        "sock",
        "fd",
        "protocol",
        "service",
        "conn_id",
        "host",
        "port",
        "proxy",
        "bytes_in",
        "bytes_out",
        "requests",
        "opened",
        "last_active",
        "_moved",
        "_out",
        "_out_size",
        "_high",
        "_low",
        "_reader",
        "_reading",
        "write_paused",
        "eof",
        "_closing",
        "closed",
        "close_reason",
        "log_ident",
        "__weakref__",
    )

    def __init__(
        self,
        reactor: Reactor,
        sock: ByteStream,
        protocol: Handler,
        service: ServiceState,
        host: str | None,
        port: int = 0,
    ):
        self.reactor = reactor
        self.sock = sock  # the byte stream: the socket, or TLS records over it
        self.fd = sock.fileno()
        self.protocol = protocol
        self.service = service
        self.conn_id = 0
        self.host = host  # the peer's IP (IPv4-mapped folded), None for UNIX
        self.port = port
        self.proxy: str | None = None  # the proxy's IP:PORT when a PROXY header named host (net/proxied.py)
        self.bytes_in = 0
        self.bytes_out = 0
        self.requests = 0
        self.opened = self.last_active = reactor.now
        self._moved = 0  # bytes_in + bytes_out at the last sweep
        self._out: deque[Buffer] | tuple[()] = _NO_QUEUE  # a deque only while bytes wait
        self._out_size = 0
        # A protocol that says `echoes = True` (RFC 862's echo: the hot path)
        # is not called for data: what arrives goes straight back.
        self._reader = self._on_read_echo if protocol.echoes else self._on_read
        self._reading = False
        self.write_paused = False
        self.eof = False  # the peer half-closed
        self._closing = False  # close once the queue is empty
        self.closed = False
        self.close_reason = Reason.DONE  # meaningful once closing
        self.log_ident: str | None = None  # the log's, from conn.open (log.conn_open)
        limits = service.config.limits
        self._high = limits.write_high
        self._low = limits.write_low

    # The subject CN of a verified TLS client certificate (net/tls.py).
    client_cn: str | None = None
    # conn.open was said, so conn.close is said too (a TLS connection whose
    # handshake failed says `tls.fail` instead, net/tls.py).
    announced = True

    @property
    def proto(self) -> str:
        """ "tcp" or "unix", as listeners name them (TLS says "tls").
        Behind the PROXY protocol the client has an IP whatever the
        listener; the proxy's side says which it was."""
        if self.proxy is not None:
            return "unix" if self.proxy == "unix" else "tcp"
        return "unix" if self.host is None else "tcp"

    @property
    def peer(self) -> str:
        """For logs: "127.0.0.1:5555", "[::1]:5555" or "unix" (made only
        when a line needs it, not for every connection)."""
        return peer_text(self.host, self.port)

    def apply_limits(self, limits: Limits) -> None:
        self._high = limits.write_high
        self._low = limits.write_low

    def start(self, conn_id: int) -> None:
        """Hand the connection to the protocol, then read from it (unless
        the protocol has paused or closed it meanwhile)."""
        self.conn_id = conn_id
        self._reading = True
        try:
            self.protocol.connection_made(self)
        except Exception as exc:
            self._bug("connection_made", exc)
            return
        if self._reading:  # closing stops reading too
            try:
                self.reactor.add_reader(self.fd, self._reader)
            except OSError as exc:  # ENOSPC: epoll's max_user_watches reached
                self._os_error("epoll_ctl", exc)

    def received(self, data: Buffer) -> None:
        """Bytes read before this transport existed -- they came in one
        read with a PROXY header (net/proxied.py) -- handled as if this
        transport had just read them.  `data` may be a view of the shared
        receive buffer: it is copied before anything else reads."""
        if self._closing or not data:
            return
        self.bytes_in += len(data)
        if self.protocol.echoes:
            self.write(bytes(data))
            return
        try:
            self.protocol.data_received(bytes(data))
        except Exception as exc:
            self._bug("data_received", exc)

    # -- reading ------------------------------------------------------------

    def _on_read(self) -> None:
        try:
            n = self.sock.recv_into(RECV_BUFFER)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._os_error("recv", exc)
            return
        if n:
            self.bytes_in += n
            try:
                self.protocol.data_received(RECV_VIEW[:n].tobytes())
            except Exception as exc:
                self._bug("data_received", exc)
            return
        self._on_eof()

    def _on_read_echo(self) -> None:
        try:
            n = self.sock.recv_into(RECV_BUFFER)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._os_error("recv", exc)
            return
        if not n:
            self._on_eof()
            return
        self.bytes_in += n
        if self._out:  # earlier output waits: queue behind it
            self._enqueue((RECV_VIEW[:n].tobytes(),))
            return
        # The send is inline rather than through `write`: this is the echo
        # path's one call per request that could be saved.
        try:
            sent = self.sock.send(RECV_VIEW[:n])
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._os_error("send", exc)
            return
        self.bytes_out += sent
        if sent != n:  # the buffer is reused: queue a copy of the rest
            self._enqueue((RECV_VIEW[sent:n].tobytes(),))

    def _on_eof(self) -> None:
        self.eof = True
        try:
            keep = self.protocol.eof_received()
        except Exception as exc:
            self._bug("eof_received", exc)
            return
        if keep:
            self._stop_reading()  # open a while yet; an EOF'd socket stays readable
        elif self._out:
            self.close_when_flushed(Reason.EOF)
        else:
            self.close(Reason.EOF)

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self.reactor.remove_reader(self.fd)

    def _start_reading(self) -> None:
        if not self._reading and not self.eof and not self._closing:
            self._reading = True
            self.reactor.add_reader(self.fd, self._reader)

    def hand_off(self) -> None:
        """The socket now belongs to a child process (a program service,
        handlers/program.py): stop watching it and close evd's descriptor.
        The connection stays open -- counted, listed -- until `close`,
        which then touches no descriptor (its number may be another
        connection's by then)."""
        self._reading = False
        # Unregistered, not forgotten: closing our descriptor does not take
        # it out of epoll while the child holds the same socket.
        self.reactor.remove_reader(self.fd)
        self.reactor.remove_writer(self.fd)
        try:
            self.sock.close()
        except OSError:
            pass
        self.fd = -1

    def pause_reading(self) -> None:
        """The protocol has enough to chew on (a running command, say)."""
        self._stop_reading()

    def resume_reading(self) -> None:
        if not self.write_paused:
            self._start_reading()

    # -- writing ------------------------------------------------------------

    def _send(self, chunks: Sequence[Buffer]) -> int | None:
        """Hand `chunks` to the stream in one call and count what it took:
        that many bytes (0 when it would block), or None when the send
        failed and the connection is closed."""
        try:
            sent = self.sock.send(chunks[0]) if len(chunks) == 1 else self.sock.sendmsg(chunks)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            self._os_error("send", exc)
            return None
        self.bytes_out += sent
        return sent

    def write(self, data: Buffer) -> None:
        if self._closing or not data:  # closed is closing too
            return
        if self._out:
            self._enqueue((data,))
            return
        # `_send`'s ladder for one buffer, inline: the common write (a framed
        # batch is one) pays no tuple, length test or extra call.
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._os_error("send", exc)
            return
        self.bytes_out += sent
        if sent != len(data):
            self._enqueue((memoryview(data)[sent:],))

    def writelines(self, chunks: Sequence[Buffer]) -> None:
        """Several chunks in one sendmsg when nothing is queued; what the
        stream does not take is queued as with `write`."""
        if self._closing:
            return
        if self._out or len(chunks) > SENDMSG_CHUNKS:
            self._enqueue(chunks)
            return
        sent = self._send(chunks)
        if sent is None:
            return
        for i, chunk in enumerate(chunks):
            if sent < len(chunk):
                rest = list(chunks[i:])
                if sent:
                    rest[0] = memoryview(chunk)[sent:]
                self._enqueue(rest)
                return
            sent -= len(chunk)

    def _enqueue(self, chunks: Sequence[Buffer]) -> None:
        """Queue what the stream did not take now: watch for writability,
        and stop reading the peer above write_high."""
        chunks = [c for c in chunks if c]  # an empty chunk would stall _flush
        out = self._out
        if not isinstance(out, deque):
            out = self._out = deque()
            self.reactor.add_writer(self.fd, self._on_write)
        out.extend(chunks)
        self._out_size += sum(map(len, chunks))
        if self._out_size > self._high and not self.write_paused:
            self.write_paused = True
            self._stop_reading()

    def idle_for(self, now: float) -> float:
        """Seconds without traffic either way, as seen by the daemon's
        periodic sweep: it compares the byte counters with their value at the
        previous sweep, so reads and writes pay nothing for idle tracking."""
        if self.fd < 0:  # handed off: its traffic is the child's, unseen
            return 0.0
        moved = self.bytes_in + self.bytes_out
        if moved != self._moved:
            self._moved = moved
            self.last_active = now
        return now - self.last_active

    @property
    def closing(self) -> bool:
        """Closed, or closing once the queue drains: writes are ignored."""
        return self._closing

    @property
    def buffered(self) -> int:
        return self._out_size

    def _flush(self) -> None:
        """Send as much of the queue as the stream takes now."""
        out = self._out
        while isinstance(out, deque) and out:
            sent = self._send(out if len(out) <= SENDMSG_CHUNKS else [out[i] for i in range(SENDMSG_CHUNKS)])
            if not sent:  # would block, or closed
                return
            self._out_size -= sent
            while sent:
                chunk = out[0]
                size = len(chunk)
                if size <= sent:
                    out.popleft()
                    sent -= size
                else:
                    out[0] = memoryview(chunk)[sent:]
                    return  # the kernel's buffer is full

    def _on_write(self) -> None:
        self._flush()
        if self.closed:
            return
        if not self._out:
            self._out = _NO_QUEUE
            self.reactor.remove_writer(self.fd)
            if self._closing:
                self.close(self.close_reason)
                return
        if self.write_paused and self._out_size <= self._low:
            self.write_paused = False
            self._start_reading()
            try:
                self.protocol.resume_writing()
            except Exception as exc:
                self._bug("resume_writing", exc)

    # -- closing ------------------------------------------------------------

    def close_when_flushed(self, reason: Reason = Reason.DONE) -> None:
        """Stop reading; close once everything queued has been sent."""
        if self.closed:
            return
        if not self._out:
            self.close(reason)
            return
        self._stop_reading()
        self._closing = True
        self.close_reason = reason

    def close(self, reason: Reason = Reason.DONE, **extra: object) -> None:
        """The one way out; runs once."""
        if self.closed:
            return
        self.closed = True
        self._closing = True
        self.close_reason = reason
        if self.fd >= 0:  # -1: handed off to a child
            self.reactor.forget(self.fd)
        self._reading = False
        self._out = _NO_QUEUE
        try:
            self.sock.close()
        except OSError:
            pass
        self.service.closed(self)
        try:
            self.protocol.connection_lost(reason)
        except Exception as exc:
            self._log_bug("connection_lost", exc)
        # Break the reference cycles (transport <-> protocol, and the bound
        # reader): a closed connection is then freed at once by reference
        # counting, and the cyclic GC has nothing to find on the connect path.
        self.protocol = _GONE
        self._reader = _noop
        if self.announced and log.info_on:
            micros = int((self.reactor.now - self.opened) * 1_000_000 + 0.5)
            log.conn_close(self, self.service.name, micros, reason, extra)

    # -- the error ladder ---------------------------------------------------

    def _os_error(self, syscall: str, exc: OSError) -> None:
        if exc.errno in PEER_GONE:
            self.close(Reason.RESET)
        elif exc.errno is None:  # the stream's own failure: its text says what
            self.close(Reason.ERROR, error=str(exc))
        else:
            self.close(Reason.ERROR, error=f"{syscall}: [Errno {exc.errno}] {exc.strerror}")

    def _bug(self, where: str, exc: Exception) -> None:
        self._log_bug(where, exc)
        self.close(Reason.ERROR)

    def _log_bug(self, where: str, exc: Exception) -> None:
        self.service.errors += 1
        log.error("error", where=f"{self.service.name}.{where}", conn=self.conn_id, exc_info=exc)
