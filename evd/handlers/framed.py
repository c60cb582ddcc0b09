"""The framed connection handler: hello, requests, dispatch, responses.

One `Framed` handler per connection on a framed listener.  Bytes go into a
sans-IO `framing.Decoder`; each whole frame is one request, answered by the
service named in its `svc`.  `echo`, `time` and `stats` answer at once, so
their responses leave in request order; `command` answers when the command
ends, matched by `id`.

Backpressure: frames are taken from the decoder only while the transport is
not `write_paused`.  A client that pipelines thousands of requests without
reading fills its output queue to `write_high`, the transport stops reading,
and the rest waits -- in the kernel, not in evd -- until the client reads and
`resume_writing` picks up where the loop stopped.
"""

from __future__ import annotations

import functools
import hmac
import json
import os
import time

from evd import __version__
from evd.core.log import log
from evd.handlers.commands import CommandError
from evd.handlers.raw import Handler
from evd.proto.framing import Decoder, FrameError, encode_parts, ok_header

TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
# strftime output grows with its input; 256 characters is plenty for a format.
TIME_FMT_MAX = 256
# Wrong MACs tolerated per connection before it is closed (SPEC section 5).
AUTH_ATTEMPTS = 3
NONCE_BYTES = 32
# Responses collected before they are handed to the transport: one recv of
# pipelined requests is answered with one write, and no batch grows past
# what flow control would allow.
BATCH_MAX = 65536
# Up to this size a batch is joined and sent with one send: copying a few
# KiB costs less than sendmsg's per-buffer work (measured: a 90-byte
# response in two parts, 1.01 vs 0.90 us per send and recv).
JOIN_MAX = 4096
_SCALARS = (str, int, float, bool, type(None))


class Context:
    """What framed connections share: built and kept current by the daemon."""

    def __init__(self, runner, stats, key: bytes | None, enabled: frozenset[str]):
        self.runner = runner  # commands.Runner, or None if command is off
        self.stats = stats  # () -> dict, the `stats` body
        self.key = key  # HMAC key, or None: no authentication
        self.enabled = enabled  # of command and stats, those switched on


class Framed(Handler):
    def __init__(self, service, context: Context):
        config = service.config
        self.context = context
        self.decoder = Decoder(config.limits.max_header, config.limits.max_body)
        self.services = offered(config.dispatch, context.enabled)
        self.key = context.key if config.key_file else None
        self.auth_required = set(config.auth_required) if self.key else set()
        self.nonce = os.urandom(NONCE_BYTES) if self.key else b""
        self.authenticated = False
        self.auth_failures = 0
        self.pending = 0  # commands running for this connection
        self.draining = False
        self.debug = log.enabled("debug")
        self.last_out = 0  # size of the last response, for the request log
        self.partial_since = None  # when the frame now being assembled began
        self._batch = None  # responses of the frames being processed
        self._batch_size = 0

    # -- transport events ---------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        hello = {
            "evd": 1,
            "server": f"evd/{__version__}",
            "services": list(self.services),
            "auth": "hmac-sha256" if self.key else "none",
        }
        if self.key:
            hello["nonce"] = self.nonce.hex()
        transport.writelines(encode_parts(hello))

    def data_received(self, data: bytes) -> None:
        self.decoder.feed(data)
        self._process()
        if self.draining:
            self._close_if_idle()
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
        return self.pending > 0  # stay to deliver running commands' results

    def drain(self) -> None:
        """Stopping: answer what has arrived (a request may still be in the
        kernel's buffer, so keep reading), then close once nothing is half
        received or running."""
        self.draining = True
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        if self.draining and not self.pending and not self.decoder.buffered:
            self.transport.close_when_flushed("shutdown")

    # -- requests -------------------------------------------------------------

    def _process(self) -> None:
        """Answer every whole frame buffered, as one batch of writes: 16
        pipelined requests cost one sendmsg, not sixteen sends."""
        transport = self.transport
        next_request = self.decoder.next_request
        self._batch = []
        try:
            while not transport.write_paused and not transport.closed:
                try:
                    request = next_request()
                except FrameError as exc:
                    self._error(None, "bad_frame", str(exc))
                    self._close("bad_frame")
                    return
                if request is None:
                    return
                transport.requests += 1
                self._request(*request)
                if self._batch_size >= BATCH_MAX:
                    self._flush()  # lets write_paused see the queue
        finally:
            self._flush()
            self._batch = None

    def _flush(self) -> None:
        batch = self._batch
        if batch:  # None outside _process
            if self._batch_size <= JOIN_MAX:
                self.transport.write(b"".join(batch))
            else:
                self.transport.writelines(batch)
            batch.clear()
        self._batch_size = 0

    def _request(self, header: dict, body: bytes) -> None:
        started = time.monotonic() if self.debug else 0.0
        rid = header.get("id")
        svc = header.get("svc")
        if (
            type(svc) is str
            and svc in self.services
            and isinstance(rid, _SCALARS)
            and (self.authenticated or svc not in self.auth_required)
        ):
            try:
                ok = _SERVICES[svc](self, rid, header, body)
            except Exception as exc:  # a bug: this request fails, the rest go on
                self.transport.service.errors += 1
                log.error("error", where=f"framed.{svc}", conn=self.transport.conn_id, exc_info=exc)
                ok = self._error(rid, "internal", "internal error")
        else:
            ok = self._refuse(rid, svc, header)
        if self.debug:
            log.debug(
                "request",
                conn=self.transport.conn_id,
                svc=svc,
                id=rid,
                ok=ok,
                duration_ms=round((time.monotonic() - started) * 1000, 3),
                bytes_in=len(body),
                bytes_out=self.last_out,
            )

    def _refuse(self, rid, svc, header) -> bool:
        """Every request that is not simply served: the error it gets, or
        the `auth` exchange (which is not a service of the dispatch list)."""
        if not isinstance(rid, _SCALARS):
            return self._error(None, "bad_request", "id must be a JSON scalar")
        if not isinstance(svc, str):
            return self._error(rid, "bad_request", "svc (a string) is required")
        if svc == "auth":
            return self._auth(rid, header)
        if svc not in self.services:
            return self._error(rid, "unknown_service", f"no service {svc!r} here")
        return self._error(rid, "unauthorized", f"{svc} needs an authenticated connection")

    def _reply(self, rid, body: bytes = b"", **fields) -> bool:
        if fields:
            self._send(encode_parts({"id": rid, "ok": True, **fields}, body))
        else:
            self._send((ok_header(rid, len(body)), body))
        return True

    def _error(self, rid, code: str, message: str) -> bool:
        self.transport.service.errors += 1
        self._send(encode_parts({"id": rid, "ok": False, "error": {"code": code, "message": message}}))
        return False

    def _close(self, reason: str) -> None:
        """Close after everything answered so far, batched or queued."""
        self._flush()
        self.transport.close_when_flushed(reason)

    def _send(self, parts) -> None:
        self.last_out = size = len(parts[0]) + len(parts[1])
        if self._batch is None:  # outside _process: a command's result
            self.transport.writelines(parts)
        else:
            self._batch.extend(parts)
            self._batch_size += size

    # -- services -------------------------------------------------------------

    def _svc_echo(self, rid, header, body) -> bool:
        self._send((ok_header(rid, len(body)), body))  # _reply without the call
        return True

    def _svc_time(self, rid, header, body) -> bool:
        fmt = header.get("fmt", TIME_FORMAT)
        tz = header.get("tz", "utc")
        if not isinstance(fmt, str) or len(fmt) > TIME_FMT_MAX:
            return self._error(
                rid, "bad_request", f"fmt must be a string of at most {TIME_FMT_MAX} characters"
            )
        if tz not in ("utc", "local"):
            return self._error(rid, "bad_request", 'tz must be "utc" or "local"')
        now = time.time()
        try:
            text = time.strftime(fmt, time.gmtime(now) if tz == "utc" else time.localtime(now))
        except ValueError as exc:
            return self._error(rid, "bad_request", f"bad fmt: {exc}")
        return self._reply(
            rid, text.encode("utf-8", "replace"), epoch=now, rfc868=(int(now) + 2208988800) & 0xFFFFFFFF
        )

    def _svc_stats(self, rid, header, body) -> bool:
        return self._reply(rid, json.dumps(self.context.stats()).encode())

    def _svc_command(self, rid, header, body) -> bool:
        runner = self.context.runner
        name = header.get("name")
        try:
            argv = runner.argv(name, header.get("args"))
            runner.start(name, argv, body, lambda result: self._command_done(rid, result))
        except CommandError as exc:
            return self._error(rid, exc.code, str(exc))
        self.pending += 1
        return True

    def _command_done(self, rid, result) -> None:
        self.pending -= 1
        self._reply(
            rid,
            bytes(result.stdout) + bytes(result.stderr),
            exit=result.exit,
            signal=result.signal,
            timed_out=result.timed_out,
            truncated=result.truncated,
            stdout_len=len(result.stdout),
            stderr_len=len(result.stderr),
        )
        if not self.pending and self.transport.eof:
            self.transport.close_when_flushed("eof")
        self._close_if_idle()

    def _auth(self, rid, header) -> bool:
        if not self.key:
            return self._error(rid, "bad_request", "authentication is not configured")
        mac = header.get("mac")
        expected = hmac.new(self.key, self.nonce, "sha256").hexdigest()
        if isinstance(mac, str) and hmac.compare_digest(mac.lower().encode(), expected.encode()):
            self.authenticated = True
            return self._reply(rid)
        self.auth_failures += 1
        log.warning("auth.fail", conn=self.transport.conn_id, peer=self.transport.peer)
        self.transport.service.auth_failures += 1  # evd_auth_failures_total
        self._error(rid, "unauthorized", "wrong mac")
        if self.auth_failures >= AUTH_ATTEMPTS:
            self._close("auth")
        return False


_SERVICES = {
    "echo": Framed._svc_echo,
    "time": Framed._svc_time,
    "stats": Framed._svc_stats,
    "command": Framed._svc_command,
}


@functools.lru_cache(maxsize=64)
def offered(dispatch: tuple[str, ...], enabled: frozenset[str]) -> tuple[str, ...]:
    """The services a connection offers, in `dispatch` order: echo and time
    always, command and stats when switched on.  Shared by every connection
    (a tuple: `in` on four names is as quick as a set)."""
    return tuple(s for s in dispatch if s in ("echo", "time") or s in enabled)
