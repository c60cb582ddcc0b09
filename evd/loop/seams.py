"""The interfaces between layers, as `typing.Protocol`s.

A transport (net/) owns a connection's bytes; a handler (handlers/) owns
their meaning; under the transport, a byte stream is where the bytes come
from and go to (the socket itself, or TLS records over it); a service's
running state (handlers/service.py) is what transport and handler both
count into.  Each side sees the other only through the protocol written
here, so a handler can be tested with any object that walks like a
transport, and the layers never import each other upwards.

Close reasons are here too: every layer closes connections, and `conn.close`
`reason` is part of the log contract (SPEC section 6).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from evd.config.model import Limits, ServiceConfig
    from evd.loop.reactor import Reactor

Buffer = bytes | bytearray | memoryview


class Reason(enum.StrEnum):
    """Why a connection closed, as `conn.close` says it."""

    EOF = "eof"  # the peer closed its side and we flushed ours
    DONE = "done"  # the service finished (daytime, time)
    RESET = "reset"  # the peer reset the connection or vanished
    ERROR = "error"  # an OS error or a bug in the handler
    IDLE = "idle"  # no traffic for idle_timeout
    FRAME_TIMEOUT = "frame_timeout"  # a request trickled in for over idle_timeout
    SHUTDOWN = "shutdown"  # the daemon is stopping
    BAD_FRAME = "bad_frame"  # framed: the peer lost frame sync
    AUTH = "auth"  # framed: too many wrong MACs
    LINE_TOO_LONG = "line_too_long"  # timefmt: a line past its limit
    KILLED = "killed"  # `evd ctl kill`


class ByteStream(Protocol):
    """The byte seam: what a stream transport (net/transport.py) reads and
    writes.  A connected socket is one as it is; TLS (net/tls_records.py)
    is one over a socket.  Everything else -- the output queue, flow
    control, half-close, the error ladder, the close path -- is the
    transport's, once, for both.

    The contract is the non-blocking socket's:
    - `recv_into(buffer)`: how many bytes were put at the start of
      `buffer`; 0 at the end of the stream; BlockingIOError when there is
      nothing now.
    - `send(data)` / `sendmsg(chunks)`: how many bytes were taken from the
      front (0 or BlockingIOError: none; what was not taken is offered
      again, first, by the next call).
    - A failure raises OSError: the syscall's errno, or errno None for a
      failure of the layer itself, whose text says what it was
      ("tls: bad_record_mac").
    """

    def fileno(self) -> int: ...
    def recv_into(self, buffer: bytearray, /) -> int: ...
    def send(self, data: Buffer, /) -> int: ...
    def sendmsg(self, buffers: Sequence[Buffer], /) -> int: ...
    def close(self) -> None: ...


class Transport(Protocol):
    """What a handler may do with its connection."""

    reactor: Reactor
    conn_id: int
    fd: int  # the socket's descriptor; -1 once handed off
    host: str | None  # the peer's IP address; None for a UNIX peer
    port: int  # the peer's port; 0 for a UNIX peer
    requests: int
    write_paused: bool  # above write_high: stop producing until resume_writing
    eof: bool  # the peer half-closed
    closed: bool
    client_cn: str | None  # a verified TLS client certificate's subject CN

    @property
    def peer(self) -> str: ...
    @property
    def proto(self) -> str: ...
    @property
    def closing(self) -> bool: ...
    @property
    def buffered(self) -> int: ...
    @property
    def service(self) -> ServiceState: ...

    def write(self, data: Buffer) -> None: ...
    def writelines(self, chunks: Sequence[Buffer]) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def hand_off(self) -> None: ...  # the socket is a child's now (program services)
    def close_when_flushed(self, reason: Reason = Reason.DONE) -> None: ...
    def close(self, reason: Reason = Reason.DONE, **extra: object) -> None: ...


class Handler(Protocol):
    """What a transport tells the handler of its connection (asyncio's
    Protocol, minus futures)."""

    # True: the transport sends back what it receives without calling
    # data_received (RFC 862's echo, the hot path).
    echoes: bool

    @property
    def exec_pid(self) -> int | None: ...  # a program service's running child, for `evd ctl conns`

    def connection_made(self, transport: Transport) -> None: ...
    def data_received(self, data: bytes) -> None: ...
    def eof_received(self) -> bool: ...  # True: keep the connection open
    def resume_writing(self) -> None: ...
    def connection_lost(self, reason: str) -> None: ...
    def stalled(self, now: float, limit: float) -> bool: ...  # a request half-sent too long
    def drain(self) -> None: ...  # the daemon is stopping


HandlerFactory = Callable[[], Handler]


class Connection(Protocol):
    """What a service knows of each of its open connections: enough to
    count, list (`evd ctl conns`), re-limit and close them."""

    conn_id: int
    protocol: Handler  # the daemon's sweep and drain ask it (stalled, drain)
    host: str | None  # the peer's IP (IPv4-mapped folded); None for UNIX peers
    port: int  # the peer's port (0 for UNIX peers)
    proxy: str | None  # behind the PROXY protocol: the proxy's IP:PORT ("unix"); host is the client
    bytes_in: int
    bytes_out: int
    requests: int
    opened: float  # reactor time of the accept
    log_ident: str | None  # what the log made of it at conn.open (evd/log/logger.py)

    @property
    def peer(self) -> str: ...
    @property
    def proto(self) -> str: ...  # "tcp", "unix" or "tls", as listeners name them

    def idle_for(self, now: float) -> float: ...
    def apply_limits(self, limits: Limits) -> None: ...
    def close(self, reason: Reason = Reason.DONE, **extra: object) -> None: ...


class ServiceState(Protocol):
    """A service's running state, as transports and handlers count into it."""

    name: str
    config: ServiceConfig
    errors: int
    requests: int

    def closed(self, conn: Connection) -> None: ...  # a connection's one way out
