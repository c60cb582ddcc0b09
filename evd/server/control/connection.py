"""The control socket's connections: framed requests in, answers out.

One `Control` handler per connection on `control.unix`, over the same
stream transport as every service (non-blocking, bounded output, the one
error ladder).  It decodes requests with the frame codec, checks them
against the verb table (verbs.py), hands each to the backend -- `drivers.Local`
in a single process, `fanout.Fanout` in a supervisor, which may answer later --
and writes the answer back.  One request is carried out at a time: while
one is pending, or while the client is not reading its answers (above
`write_high`), the connection is not read, so a client that pipelines
requests and never reads holds at most one answer in evd's memory.

Every command that changes something is logged as `ctl` (`command`,
`args`, `ok`) once its answer is known: the who-changed-what of the daemon.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from evd.handlers.base import Handler
from evd.log.logger import log
from evd.loop.seams import Buffer, Reason
from evd.proto.control import MAX_REQUEST_HEADER, Answer, Reply, Request
from evd.proto.framing import Decoder, FrameError, encode_parts
from evd.server.control import slices
from evd.server.control.verbs import changes, parse

if TYPE_CHECKING:
    from evd.loop.reactor import Reactor


class Backend(Protocol):
    """Carries out a request and calls `reply` with its answer, now or later."""

    def handle(self, request: Request, reply: Reply) -> None: ...


def encode(answer: Answer) -> tuple[bytes, Buffer]:
    body = b"" if answer.body is None else json.dumps(answer.body).encode()
    return encode_parts(answer.header(), body)


def encode_rows(reactor: Reactor, answer: Answer, done: Callable[[tuple[bytes, Buffer]], None]) -> None:
    """A listing's frame, made a slice at a time (slices.py), to `done`."""
    assert answer.rows is not None
    key, rows = answer.rows
    chunks: list[bytes] = []

    def each(batch: list[slices.Row]) -> None:
        chunks.append(slices.encode_batch(batch))

    slices.pace(reactor, rows, each, lambda: done(encode_parts(answer.header(), slices.encode(key, chunks))))


class Control(Handler):
    __slots__ = ("backend", "decoder", "pending", "looping", "since")

    def __init__(self, backend: Backend):
        self.backend = backend
        self.decoder = Decoder(MAX_REQUEST_HEADER, 0)  # requests have no body
        self.pending: Request | None = None  # the request being carried out
        self.looping = False  # in _next: an answer given at once returns to it
        self.since: float | None = None  # when the request still incomplete began

    def data_received(self, data: bytes) -> None:
        self.decoder.feed(data)
        self._next()
        if not self.decoder.buffered:
            self.since = None
        elif self.since is None:
            self.since = self.transport.reactor.now

    def stalled(self, now: float, limit: float) -> bool:
        return self.since is not None and now - self.since > limit

    def resume_writing(self) -> None:
        self._next()

    def eof_received(self) -> bool:
        self._next()
        return self.pending is not None  # stay to give the answer

    def _next(self) -> None:
        self.looping = True
        try:
            self._take_requests()
        finally:
            self.looping = False

    def _take_requests(self) -> None:
        transport = self.transport
        while self.pending is None and not transport.write_paused and not transport.closing:
            try:
                frame = self.decoder.next_request()
            except FrameError as exc:
                transport.writelines(encode(Answer.refused(str(exc), "bad_request")))
                transport.close_when_flushed(Reason.BAD_FRAME)
                return
            if frame is None:
                if transport.eof:
                    transport.close_when_flushed(Reason.EOF)
                return
            transport.requests += 1
            request = parse(frame[0])
            if isinstance(request, Answer):
                transport.writelines(encode(request))
                continue
            self.pending = request
            transport.pause_reading()
            self.backend.handle(request, self._answered)

    def _answered(self, answer: Answer) -> None:
        request, self.pending = self.pending, None
        if request is not None and changes(request.command):
            log.info("ctl", command=request.command, args=list(request.args), ok=answer.ok)
        transport = self.transport
        if transport.closed:  # the client left while we worked
            return
        if answer.rows is not None:  # still pending: the rest of the loop goes on meanwhile
            self.pending = request
            encode_rows(transport.reactor, answer, self._write)
            return
        self._write(encode(answer))

    def _write(self, frame: tuple[bytes, Buffer]) -> None:
        self.pending = None
        transport = self.transport
        if transport.closed:  # the client left while we worked
            return
        transport.writelines(frame)
        transport.resume_reading()
        if not self.looping:  # a later answer (workers, a listing): look for the next request
            self._next()
