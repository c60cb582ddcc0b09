"""Connection handlers for the raw stream services.

A handler (asyncio would say "protocol") gets events from its transport:
`connection_made(transport)`, `data_received(data)`, `eof_received()` (return
True to keep the connection open after the peer's EOF), `resume_writing()`
(the output queue drained below `write_low`) and `connection_lost(reason)`.
The service logic itself lives in `proto/services.py`; these classes only glue it
to a transport.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from evd.core.seams import Reason
from evd.proto import services

if TYPE_CHECKING:
    from evd.core.reactor import Timer
    from evd.core.seams import Transport

# timefmt over TCP: the longest line we wait for.  A format is at most
# TIMEFMT_MAX bytes; anything this long without a newline is not a client
# of this service.
TIMEFMT_LINE_MAX = 1024
# Chargen blocks written per refill before yielding to other connections when
# the kernel keeps taking everything (a fast local reader).
CHARGEN_BURST = 16


class Handler:
    """Default events: ignore input, close after the peer's EOF."""

    # Slots, not a __dict__: a handler per connection, 10,000 idle ones.
    __slots__ = ("transport",)
    echoes = False
    transport: Transport

    def connection_made(self, transport: Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False

    def resume_writing(self) -> None:
        pass

    def connection_lost(self, reason: str) -> None:
        pass

    def stalled(self, now: float, limit: float) -> bool:
        """True if the peer has kept a request half-sent for over `limit`
        seconds (a slowloris); checked by the daemon's periodic sweep."""
        return False

    def drain(self) -> None:
        """The daemon is stopping.  A raw stream has no request boundary, so
        the connection runs to its natural end (the client's EOF); whatever
        is still open at shutdown_timeout is closed by the daemon."""


class Echo(Handler):
    """RFC 862.  The hot path: `echoes` tells the transport to send back
    what it receives without calling us at all."""

    __slots__ = ()
    echoes = True

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class Discard(Handler):
    """RFC 863: the base class already ignores everything."""

    __slots__ = ()


class Daytime(Handler):
    """RFC 867: one line on connect, then close."""

    __slots__ = ()

    def connection_made(self, transport: Transport) -> None:
        self.transport = transport
        transport.write(services.daytime(time.time()))
        transport.close_when_flushed()


class Time(Handler):
    """RFC 868: four bytes on connect, then close."""

    __slots__ = ()

    def connection_made(self, transport: Transport) -> None:
        self.transport = transport
        transport.write(services.rfc868(time.time()))
        transport.close_when_flushed()


class Chargen(Handler):
    """RFC 864: the pattern, as fast as the client reads, never more than
    `write_high` queued (the transport's flow control says when to refill)."""

    __slots__ = ("_timer",)
    _timer: Timer | None

    def connection_made(self, transport: Transport) -> None:
        self.transport = transport
        self._timer = None
        self._fill()

    def resume_writing(self) -> None:
        self._fill()

    def _fill(self) -> None:
        transport = self.transport
        for _ in range(CHARGEN_BURST):
            if transport.write_paused or transport.closing:
                return
            transport.write(services.CHARGEN_BLOCK)
        if not transport.write_paused and not transport.closing and self._timer is None:
            # The kernel took everything: come back after other connections
            # have had their turn, rather than loop here.
            self._timer = transport.reactor.call_later(0, self._refill)

    def _refill(self) -> None:
        self._timer = None
        self._fill()

    def connection_lost(self, reason: str) -> None:
        if self._timer is not None:
            self.transport.reactor.cancel(self._timer)

    def drain(self) -> None:
        """Chargen never ends by itself: stop now, after what is queued."""
        self.transport.close_when_flushed(Reason.SHUTDOWN)


class Timefmt(Handler):
    """Each newline-terminated line is a strftime format; the reply is the
    formatted local time and CRLF.  An unusable format gets an empty line."""

    __slots__ = ("_buf",)
    _buf: bytes

    def connection_made(self, transport: Transport) -> None:
        self.transport = transport
        self._buf = b""

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data
        *lines, self._buf = buf.split(b"\n")
        if lines:
            now = time.time()
            replies = [(services.timefmt(line.rstrip(b"\r"), now) or b"") + b"\r\n" for line in lines]
            self.transport.requests += len(lines)
            self.transport.write(b"".join(replies))
        if len(self._buf) > TIMEFMT_LINE_MAX:
            self.transport.close(Reason.LINE_TOO_LONG)


STREAM_HANDLERS: dict[str, type[Handler]] = {
    "echo": Echo,
    "discard": Discard,
    "chargen": Chargen,
    "daytime": Daytime,
    "time": Time,
    "timefmt": Timefmt,
}
