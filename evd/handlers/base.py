"""The base connection handler: what a connection does when nothing is said.

A handler (asyncio would say "protocol") gets events from its transport:
`connection_made(transport)`, `data_received(data)`, `eof_received()` (return
True to keep the connection open after the peer's EOF), `resume_writing()`
(the output queue drained below `write_low`) and `connection_lost(reason)`.
`Handler` ignores input and closes after the peer's EOF; the raw services
(raw.py), the framed port (framed.py), the control socket and the metrics
port all build on it, and a transport uses it as the inert handler of a
connection not yet handed to its service.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from evd.loop.seams import Transport


class Handler:
    """Default events: ignore input, close after the peer's EOF."""

    # Slots, not a __dict__: a handler per connection, 10,000 idle ones.
    __slots__ = ("transport",)
    echoes = False

    @property
    def exec_pid(self) -> int | None:
        """A program service's running child (handlers/program.py)."""
        return None

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
