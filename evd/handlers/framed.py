"""The framed connection handler: the session's actions, on a transport.

One `Framed` handler per connection on a framed listener.  Bytes go into a
sans-IO `framing.Decoder`; each whole frame goes to the connection's sans-IO
`session.Session`, which says what to do.  This module does the rest: it
sends the replies (batched), starts commands on the runner and answers them
when they end, logs what the session reports, bans and closes when told, and
keeps time (the clocks for `time` and for slow frames).

`echo`, `time` and `stats` answer at once, so their responses leave in
request order; `command` answers when the command ends, matched by `id`.

Backpressure: frames are taken from the decoder only while the transport is
not `write_paused`.  A client that pipelines thousands of requests without
reading fills its output queue to `write_high`, the transport stops reading,
and the rest waits -- in the kernel, not in evd -- until the client reads and
`resume_writing` picks up where the loop stopped.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from typing import Any

from evd.commands.runner import CommandError, Result, Run, Runner
from evd.handlers.service import Service
from evd.log.logger import log
from evd.loop.seams import Buffer, Transport
from evd.proto.framing import Decoder, FrameError, Header, encode_parts, ok_header
from evd.proto.rules import Rules
from evd.proto.session import (
    ECHO,
    ECHOED,
    NONCE_BYTES,
    Action,
    AuthFail,
    AuthOk,
    Close,
    Failure,
    Hello,
    Reply,
    Session,
    Start,
    Stats,
    Steps,
    loggable,
)

# Responses collected before they are handed to the transport: one recv of
# pipelined requests is answered with one write, and no batch grows past
# what flow control would allow.
BATCH_MAX = 65536
# Up to this size a batch is joined and sent with one send: copying a few
# KiB costs less than sendmsg's per-buffer work on small responses.
JOIN_MAX = 4096
_SCALAR_TYPES = frozenset({str, int, float, bool, type(None)})
# The steps of a request whose serving raised (a bug): nothing more to do.
_NOTHING: tuple[()] = ()


class Context:
    """What framed connections share, kept current by the daemon: the
    command runner, the `Rules` (replaced whole by a reload) and where the
    `stats` figures come from."""

    def __init__(self, runner: Runner, stats: Callable[[], dict[str, Any]], rules: Rules):
        self.runner = runner
        self.rules = rules
        self._stats = stats
        self._stats_at = -1.0
        self._stats_body = b""

    def stats_body(self, now: float) -> bytes:
        """The `stats` body, made at most once per loop iteration (`now` is
        the reactor's, read once per iteration): summing the counters of
        every open connection costs O(connections), and a client
        pipelining thousands of `stats` would otherwise pay it thousands of
        times in one go while everyone else waits.  Within an iteration the
        figures could not have moved much anyway."""
        if now != self._stats_at:
            self._stats_body = json.dumps(self._stats()).encode()
            self._stats_at = now
        return self._stats_body


class Framed:
    __slots__ = (
        "transport",
        "service",
        "context",
        "decoder",
        "session",
        "runs",
        "last_out",
        "partial_since",
        "_batch",
        "_batch_size",
    )
    echoes = False
    exec_pid = None  # no program behind a framed connection
    transport: Transport
    session: Session

    def __init__(self, service: Service, context: Context):
        limits = service.config.limits
        self.service = service
        self.context = context
        self.decoder = Decoder(limits.max_header, limits.max_body)
        self.runs: dict[int, Run] = {}  # this connection's running commands
        self.last_out = 0  # size of the last response, for the request log
        self.partial_since: float | None = None  # when the frame now arriving began
        self._batch: list[Buffer] | None = None  # responses of the frames being processed
        self._batch_size = 0

    # -- transport events ---------------------------------------------------

    def connection_made(self, transport: Transport) -> None:
        self.transport = transport
        rules = self.context.rules
        nonce = os.urandom(NONCE_BYTES) if rules.secrets else b""
        # Over mutual TLS the transport calls this once the handshake has
        # verified the client's certificate: a key whose client_cn is its
        # CN authenticates the session from the hello on.
        cn = transport.client_cn
        self.session = Session(rules, nonce, rules.key_for_cn(cn) if cn else None)
        self._follow(self.session.opened())

    def data_received(self, data: bytes) -> None:
        self.decoder.feed(data)
        self._process()
        if self.session.draining:
            self._close_if_done()
        # A frame trickling in byte by byte keeps the connection from being
        # idle; this clock bounds how long one frame may take to arrive.
        if not self.decoder.buffered or self.transport.write_paused:
            self.partial_since = None
        elif self.partial_since is None:
            self.partial_since = self.transport.reactor.now

    def stalled(self, now: float, limit: float) -> bool:
        return self.partial_since is not None and now - self.partial_since > limit

    def resume_writing(self) -> None:
        self._process()

    def eof_received(self) -> bool:
        self._process()
        return self.session.peer_eof()

    def drain(self) -> None:
        """Stopping: answer what has arrived (a request may still be in the
        kernel's buffer, so keep reading), then close once nothing is half
        received or running."""
        self.session.drain()
        self._close_if_done()

    def connection_lost(self, reason: str) -> None:
        # Nobody is left to read what the running commands would answer:
        # they are killed (command.end reason=client_gone).
        runs, self.runs = self.runs, {}
        for run in runs.values():
            run.abandon()

    def _close_if_done(self) -> None:
        reason = self.session.close_reason(partial=bool(self.decoder.buffered))
        if reason is not None:
            self.transport.close_when_flushed(reason)

    # -- requests -------------------------------------------------------------

    def _process(self) -> None:
        """Answer every whole frame buffered, as one batch of writes: 16
        pipelined requests cost one send, not sixteen."""
        transport = self.transport
        session = self.session
        rules = self.context.rules
        if session.rules is not rules:  # a reload since the last batch
            session.update(rules)
        next_request = self.decoder.next_request
        receive = session.receive
        echoed = ECHOED  # the usual steps, compared by identity
        now = time.time()  # the wall clock of this batch, for `time`
        batch: list[Buffer] = []
        self._batch = batch
        try:
            while not transport.write_paused and not transport.closed:
                try:
                    request = next_request()
                except FrameError as exc:
                    self._follow(session.frame_error(exc))
                    return
                if request is None:
                    return
                transport.requests += 1
                header, body = request
                if log.debug_on:  # read per request: a reload may change it
                    steps = self._logged(header, body, now)
                else:
                    steps = _NOTHING
                    try:
                        steps = receive(header, body, now)
                        if steps is echoed:
                            # The usual answer: `_act` and `_send`, inlined.
                            head = ok_header(header.get("id"), len(body))
                            self.last_out = size = len(head) + len(body)
                            batch.append(head)
                            if body:
                                batch.append(body)
                            self._batch_size += size
                        else:
                            self._act(steps[0], header, body)
                    except Exception as exc:  # a bug: this request fails, the rest go on
                        self._internal(header, exc)
                if steps is not echoed and len(steps) > 1 and self._events(steps):
                    return  # closing: what follows is not answered
                if self._batch_size >= BATCH_MAX:
                    self._flush()  # lets write_paused see the queue
        finally:
            self._flush()
            self._batch = None

    def _logged(self, header: Header, body: bytes | bytearray, now: float) -> Steps | tuple[()]:
        """A request at level debug: served, then logged with its timing;
        its steps, for their events.  Only scalars of the client's reach the
        log, cut short."""
        started = time.monotonic()
        steps: Steps | tuple[()] = _NOTHING
        try:
            steps = self.session.receive(header, body, now)
            ok = self._act(steps[0], header, body)
        except Exception as exc:
            ok = self._internal(header, exc)
        log.debug(
            "request",
            conn=self.transport.conn_id,
            svc=loggable(header.get("svc")),
            id=loggable(header.get("id")),
            ok=ok,
            duration_ms=round((time.monotonic() - started) * 1000, 3),
            bytes_in=len(body),
            bytes_out=self.last_out,
        )
        return steps

    def _act(self, action: Action, header: Header | None = None, body: Buffer = b"") -> bool:
        """Carry out what the session answered a request (`header`, `body`)
        with; True if ok."""
        if action is ECHO:
            self._send(ok_header(header.get("id") if header is not None else None, len(body)), body)
            return True
        if type(action) is Reply:
            fields = action.fields
            if fields is None:
                self._send(ok_header(action.rid, len(action.body)), action.body)
            else:
                self._send(*encode_parts({"id": action.rid, "ok": True, **fields}, action.body))
            return True
        if type(action) is Stats:
            body = self.context.stats_body(self.transport.reactor.now)
            self._send(ok_header(action.rid, len(body)), body)
            return True
        if type(action) is Start:
            return self._start(action)
        if type(action) is Hello:
            self._send(*encode_parts(action.header))
            return True
        assert type(action) is Failure
        self._fail(action)
        return False

    def _fail(self, failure: Failure) -> None:
        self.service.errors += 1
        error = {"code": failure.code, "message": failure.message}
        self._send(*encode_parts({"id": failure.rid, "ok": False, "error": error}))

    def _internal(self, header: Header, exc: Exception) -> bool:
        """A bug while serving a request: logged with its traceback,
        answered `internal`, counted once."""
        log.error("error", where="framed.request", conn=self.transport.conn_id, exc_info=exc)
        rid = header.get("id")
        self._fail(Failure(rid if type(rid) in _SCALAR_TYPES else None, "internal", "internal error"))
        return False

    def _follow(self, steps: Steps) -> None:
        """Do all the session said: the action, then its events."""
        self._act(steps[0])
        if len(steps) > 1:
            self._events(steps)

    def _events(self, steps: Steps) -> bool:
        """Log, ban and close as the steps after the first say; True once
        closing."""
        transport = self.transport
        closing = False
        for event in steps[1:]:
            if isinstance(event, AuthOk):
                log.info("auth.ok", conn=transport.conn_id, peer=transport.peer, key=event.key, via=event.via)
            elif isinstance(event, AuthFail):
                fields = {} if event.key is None else {"key": event.key}
                log.warning(
                    "auth.fail", conn=transport.conn_id, peer=transport.peer, attempt=event.failures, **fields
                )
                self.service.auth_failures += 1  # evd_auth_failures_total
            else:  # Close: after everything answered so far, batched or queued
                assert type(event) is Close
                if event.ban:
                    self.service.admission.ban(transport.host, transport.reactor.now)
                self._flush()
                transport.close_when_flushed(event.reason)
                closing = True
        return closing

    # -- output ---------------------------------------------------------------

    def _send(self, head: bytes, body: Buffer) -> None:
        self.last_out = size = len(head) + len(body)
        batch = self._batch
        if batch is None:  # outside _process: a command's result
            self.transport.writelines((head, body) if body else (head,))
        else:
            batch.append(head)
            if body:
                batch.append(body)
            self._batch_size += size

    def _flush(self) -> None:
        batch = self._batch
        if batch:  # None outside _process
            if self._batch_size <= JOIN_MAX:
                self.transport.write(b"".join(batch))
            else:
                self.transport.writelines(batch)
            batch.clear()
        self._batch_size = 0

    # -- commands -------------------------------------------------------------

    def _start(self, start: Start) -> bool:
        token = id(start)
        try:
            run = self.context.runner.start(
                start.name,
                start.argv,
                start.stdin,
                functools.partial(self._command_done, token, start),
                key=start.key,
                peer=self.transport.peer,
            )
        except CommandError as exc:
            self._fail(self.session.start_failed(start, exc.code, str(exc)))
            return False
        self.runs[token] = run
        return True

    def _command_done(self, token: int, start: Start, result: Result) -> None:
        self.runs.pop(token, None)
        reply = self.session.finished(start, result)
        if self.transport.closing:  # gone, or going: nobody to answer
            return
        self._act(reply)
        self._close_if_done()
