"""Connection handlers for the raw stream services (the events a handler
gets are described in base.py).

The service logic itself lives in `proto/classic.py`; these classes only glue it
to a transport.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from evd.handlers.base import Handler
from evd.loop.seams import Reason
from evd.proto import classic

if TYPE_CHECKING:
    from evd.loop.reactor import Timer
    from evd.loop.seams import Transport

# timefmt over TCP: the longest line we wait for.  A format is at most
# TIMEFMT_MAX bytes; anything this long without a newline is not a client
# of this service.
TIMEFMT_LINE_MAX = 1024
# Chargen blocks written per refill before yielding to other connections when
# the kernel keeps taking everything (a fast local reader).
CHARGEN_BURST = 16


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
        transport.write(classic.daytime(time.time()))
        transport.close_when_flushed()


class Time(Handler):
    """RFC 868: four bytes on connect, then close."""

    __slots__ = ()

    def connection_made(self, transport: Transport) -> None:
        self.transport = transport
        transport.write(classic.rfc868(time.time()))
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
            transport.write(classic.CHARGEN_BLOCK)
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
            replies = [(classic.timefmt(line.rstrip(b"\r"), now) or b"") + b"\r\n" for line in lines]
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
