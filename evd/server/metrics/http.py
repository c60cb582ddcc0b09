"""`GET /metrics`: evd's figures in the Prometheus text format (0.0.4).

The HTTP side is h11's sans-IO state machine on the usual stream transport
(STYLE.md points at h11 as the model for every protocol here): bytes in,
events out, and h11 decides keep-alive, HTTP/1.0 and pipelining by the
book.  `Scrape` answers GET /metrics, 404 for any other path, 405 for any
other method.  A request is bounded like any peer input: MAX_REQUEST bytes
of head and body (past that 431/413 and the connection closes), the
service's idle_timeout for a request that trickles in, and one response at
a time -- a scraper that does not read its responses stops being read.

The figures come from a `Source`: the process itself, or, with workers,
the supervisor asking each worker (server/control/fanout.py), so `scrape` may
answer later; server/metrics/exposition.py renders them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

import h11

from evd import __version__
from evd.handlers.base import Handler
from evd.log.logger import log
from evd.loop.seams import Reason
from evd.server.metrics.exposition import CONTENT_TYPE, render
from evd.server.metrics.snapshot import Figures

# A scrape request is a line and a few headers; 16 KiB is what common
# servers allow for a whole request head, and bounds a client's hold on us.
MAX_REQUEST = 16384
PATH = b"/metrics"
REASONS = {
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    413: b"Content Too Large",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
}


class Source(Protocol):
    """Calls `done` with the figures of the whole daemon, now or later (None:
    they could not be gathered, and the reason is logged)."""

    def scrape(self, done: Callable[[Figures | None], None]) -> None: ...


class Scrape(Handler):
    __slots__ = ("source", "http", "request", "waiting", "received", "since")

    def __init__(self, source: Source):
        self.source = source
        self.http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
        self.request: h11.Request | None = None  # of the cycle being read
        self.waiting = False  # figures asked for, response not sent yet
        self.received = 0  # bytes of this cycle's request so far
        self.since: float | None = None  # when this cycle's first byte came

    def data_received(self, data: bytes) -> None:
        if self.since is None:
            self.since = self.transport.reactor.now
        self.received += len(data)
        if self.received > MAX_REQUEST:  # a head or body past the bound, or a deep pipeline
            self._refuse(self._too_large(data), "request too large")
            return
        self.http.receive_data(data)
        self._next()

    def eof_received(self) -> bool:
        self.http.receive_data(b"")
        self._next()
        return self.waiting  # stay to send the answer under way

    def resume_writing(self) -> None:
        self._next()

    def _next(self) -> None:
        transport = self.transport
        while not self.waiting and not transport.write_paused and not transport.closing:
            try:
                event = self.http.next_event()
            except h11.RemoteProtocolError as exc:
                self._refuse(exc.error_status_hint, str(exc))
                return
            if event is h11.NEED_DATA:
                return
            if isinstance(event, h11.Request):
                self.request = event
            elif isinstance(event, h11.EndOfMessage):
                self._answer()
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                transport.close_when_flushed(Reason.EOF)
                return

    def _answer(self) -> None:
        request = self.request
        assert request is not None  # h11: no EndOfMessage without a Request
        if request.method != b"GET":
            self._send(405, b"only GET is served here\n", [("Allow", "GET")])
        elif request.target.partition(b"?")[0] != PATH:
            self._send(404, b"not found: only /metrics is served here\n")
        else:
            self.waiting = True
            self.transport.pause_reading()
            try:
                self.source.scrape(self._scraped)
            except Exception as exc:  # a bug: this scraper still gets an answer
                log.error("error", where="metrics", exc_info=exc)
                self._scraped(None)

    def _scraped(self, figures: Figures | None) -> None:
        """The answer, whatever happened on the way: a connection left
        waiting with reading paused would never see its client go."""
        if not self.waiting:
            return  # answered already (a source that called twice)
        self.waiting = False
        if self.transport.closed:  # the scraper left meanwhile
            return
        body = None
        if figures is not None:
            try:
                body = render(figures)
            except Exception as exc:  # a bug: said once here, and a 500 there
                log.error("error", where="metrics", exc_info=exc)
        if body is None:
            self._refuse(500, "the figures could not be gathered: see the daemon's log", Reason.ERROR)
            return
        self._send(200, body, [("Content-Type", CONTENT_TYPE)])
        self.transport.resume_reading()
        self._next()

    def _send(self, status: int, body: bytes, headers: Iterable[tuple[str, str]] = ()) -> None:
        http = self.http
        head = [("Server", f"evd/{__version__}"), ("Content-Length", str(len(body))), *headers]
        if status not in (200, 404, 405):
            head.append(("Connection", "close"))
        response = h11.Response(status_code=status, headers=head, reason=REASONS.get(status, b""))
        if self.request is not None and self.request.method == b"HEAD":
            body = b""  # the length said, nothing sent (RFC 9110)
        try:
            data = b"".join(http.send(e) or b"" for e in (response, h11.Data(data=body), h11.EndOfMessage()))
        except h11.LocalProtocolError:
            self.transport.close(Reason.ERROR)
            return
        self.transport.write(data)
        self.received = 0
        self.request = None
        self.since = None
        if http.our_state is h11.DONE and http.their_state is h11.DONE:
            http.start_next_cycle()  # keep-alive: the next request may follow
        else:
            self.transport.close_when_flushed(Reason.DONE)

    def _too_large(self, data: bytes) -> int:
        """431 if the head itself is past the bound, 413 if a whole head came
        and the body is what is too large -- even when both arrived in one
        read, before h11 had seen the head."""
        if self.request is not None:
            return 413
        try:
            self.http.receive_data(data)
            event = self.http.next_event()
        except h11.ProtocolError:
            return 431
        if not isinstance(event, h11.Request):
            return 431
        head = self.received - len(self.http.trailing_data[0])  # what is left is body
        return 431 if head > MAX_REQUEST else 413

    def stalled(self, now: float, limit: float) -> bool:
        """A request that has trickled in for longer than idle_timeout, or
        whose answer has not come in that long (a source that never calls
        back must not hold the connection for ever)."""
        return self.since is not None and now - self.since > limit

    def _refuse(self, status: int, why: str, reason: Reason = Reason.BAD_FRAME) -> None:
        """Say why and close (the client's fault, unless `reason` says ours).
        Written directly, not through h11, which has no response to give
        before a whole request."""
        body = why.encode() + b"\n"
        head = f"HTTP/1.1 {status} {REASONS.get(status, b'').decode()}\r\n"
        head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        self.transport.write(head.encode() + body)
        self.transport.close_when_flushed(reason)
