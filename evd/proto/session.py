"""One framed connection's session, sans-IO: requests in, actions out.

Why a session apart from the handler
------------------------------------
A framed connection has state that outlives any one request: the hello it
was sent (services, nonce), whether and as whom it authenticated, how many
`auth` attempts failed, how many commands it has running, whether the peer
has gone and whether the daemon is draining.  Kept in one class that
never touches a socket, a clock or a log, every rule about that state is a
plain unit test -- the way h11's `Connection` is -- and the handler
(handlers/framed.py) is left with what only it can do: batching, flow
control, timing, logging, the transport and the command runner.

There is one way out, h11's: every call returns all the caller must do.
`receive(header, body, now)` takes one decoded frame and returns `Steps`, a
tuple whose first item is the one action that answers it -- a `Reply`,
`ECHO` (reply with the request's own id and body: the echo service, the hot
path, answered by one shared tuple, `ECHOED`), a `Failure` (an error
reply), `Start` (run a command; its reply comes from `finished` or
`start_failed`) or `Stats` (the handler has the daemon's figures) -- and
whose other items are the events that follow from it, in order:
`AuthOk`/`AuthFail` to log, and `Close`, which always comes last.
`opened()` is the connection's first steps (the `Hello`, and the `AuthOk`
of a verified client certificate), `frame_error` a lost frame sync's.
Every check of a request lives here, and every message a client can read is
written here, in the protocol's words (JSON, never Python reprs); so any
exception `receive` raises is a bug by construction.

Authentication (SPEC sections 5 and 10): a key (proto/rules.py) is proven
by `auth`, an HMAC-SHA256 of this connection's nonce, or -- a connection over
mutual TLS -- the session is created already authenticated as the key whose
`client_cn` the certificate carries.  The key then decides which commands
may run.  Three failed `auth` close the connection and ask for a ban of its
address.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

from evd import __version__
from evd.config.model import KeySpec
from evd.loop.seams import Reason
from evd.proto import allowlist
from evd.proto.allowlist import QUOTE_MAX, quote
from evd.proto.framing import FrameError
from evd.proto.rules import Rules

Scalar = str | int | float | bool | None
Header = dict[str, Any]  # a decoded JSON object: any JSON value per key
Body = bytes | bytearray

TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
# strftime output grows with its input; 256 characters is plenty for a format.
TIME_FMT_MAX = 256
RFC868_OFFSET = 2208988800
# Failed `auth` tolerated per connection before it is closed and its address
# banned (SPEC section 5): enough for a typo, too few for guessing.
AUTH_ATTEMPTS = 3
NONCE_BYTES = 32
# JSON scalars, as the decoder makes them (no subclasses ever come out of it).
_SCALAR_TYPES = frozenset({str, int, float, bool, type(None)})


# -- what the session says to do ------------------------------------------------


@dataclass(slots=True)
class Reply:
    """Answer `rid` with success: `fields` (None: only id/ok/len) and `body`."""

    rid: Scalar
    body: Body = b""
    fields: dict[str, Any] | None = None


@dataclass(slots=True)
class Failure:
    """Answer `rid` with `{"ok": false, "error": {"code", "message"}}`."""

    rid: Scalar
    code: str
    message: str


@dataclass(slots=True, eq=False)
class Start:
    """Run an allow-listed command; then call `finished` (or `start_failed`)
    with this object.  `key`: the key the connection authenticated as."""

    rid: Scalar
    name: str
    argv: list[str]
    stdin: bytes
    key: str | None


@dataclass(slots=True)
class Stats:
    """Answer `rid` with the daemon's `stats` body (only the handler has it)."""

    rid: Scalar


class Echo:
    """Answer the request with its own id and body (the hot path: one
    shared object, nothing built per request)."""

    __slots__ = ()


ECHO = Echo()


@dataclass(frozen=True, slots=True)
class Hello:
    """Send the connection's first frame, `header` (SPEC section 5)."""

    header: Header


Action = Reply | Echo | Failure | Start | Stats | Hello


@dataclass(frozen=True, slots=True)
class AuthOk:
    """Log `auth.ok`: the connection is now `key`, proven by `via` (hmac, tls)."""

    key: str
    via: str


@dataclass(frozen=True, slots=True)
class AuthFail:
    """Log `auth.fail`: the `failures`-th wrong attempt; `key` the name the
    client gave, if any (quoted safe for a log line)."""

    failures: int
    key: str | None


@dataclass(frozen=True, slots=True)
class Close:
    """Close once what was answered so far is sent.  `ban`: refuse the
    peer's address for the service's `auth_ban` too."""

    reason: Reason
    ban: bool = False


Event = AuthOk | AuthFail | Close

# Everything the caller must do, in order: the action first, then its events.
Steps = tuple[Action, *tuple[Event, ...]]
# The echo request's steps: one shared tuple, nothing built per request.
ECHOED: Steps = (ECHO,)


class Outcome(Protocol):
    """What a finished command reports (commands/runner.py's Result)."""

    @property
    def exit(self) -> int | None: ...
    @property
    def signal(self) -> int | None: ...
    @property
    def timed_out(self) -> bool: ...
    @property
    def truncated(self) -> bool: ...
    @property
    def stdout(self) -> Body: ...
    @property
    def stderr(self) -> Body: ...


# -- the session ----------------------------------------------------------------


class Session:
    """See the module docstring.  `nonce`: random bytes for this connection
    (sent in the hello when an HMAC key exists); `tls_key`: the key a verified
    client certificate already proved, or None."""

    __slots__ = (
        "rules",
        "nonce",
        "key",
        "failures",
        "pending",
        "draining",
        "_hmac",
        "_offered",
        "_auth_required",
    )

    def __init__(self, rules: Rules, nonce: bytes = b"", tls_key: str | None = None):
        self.key: KeySpec | None = None  # authenticated as; None: not (yet)
        self.failures = 0  # failed `auth` on this connection
        self.pending = 0  # commands started and not yet answered
        self.draining = False  # the daemon is stopping
        # The hello offers HMAC only with a nonce to sign: a connection
        # opened without one cannot authenticate by MAC, whatever a reload
        # adds later.
        self._hmac = bool(rules.secrets) and bool(nonce)
        self.nonce = nonce if self._hmac else b""
        self._use(rules)
        if tls_key is not None and tls_key in rules.keys:
            self.key = rules.keys[tls_key]  # `opened` says auth.ok

    def _use(self, rules: Rules) -> None:
        self.rules = rules
        self._offered = rules.services
        self._auth_required = rules.auth_required

    def update(self, rules: Rules) -> None:
        """A reload: new services, commands and keys apply to the next
        request.  A key that is gone takes its connections' authentication
        with it (that is what removing a key in a rotation means); a key that
        stays keeps them, under its new scope."""
        self._use(rules)
        if self.key is not None:
            self.key = rules.keys.get(self.key.name)

    def opened(self) -> Steps:
        """The connection's first steps: the hello, then -- a verified
        client certificate that names a key -- that key's `auth.ok`.  Called
        once, before any request."""
        hello = Hello(self.hello())
        if self.key is not None:
            return (hello, AuthOk(self.key.name, "tls"))
        return (hello,)

    def hello(self) -> Header:
        """The first frame of the connection (SPEC section 5)."""
        hello: Header = {
            "evd": 1,
            "server": f"evd/{__version__}",
            "services": list(self._offered),
            "auth": "hmac-sha256" if self._hmac else "none",
        }
        if self._hmac:
            hello["nonce"] = self.nonce.hex()
        if self.key is not None:
            hello["key"] = self.key.name
        return hello

    # -- requests ---------------------------------------------------------------

    def receive(self, header: Header, body: Body, now: float) -> Steps:
        """What to do for one request: its answer, then the events that
        follow (module docstring); `now` is the wall clock (`time`)."""
        rid = header.get("id")
        svc = header.get("svc")
        if (
            type(svc) is str
            and svc in self._offered
            and type(rid) in _SCALAR_TYPES
            and (self.key is not None or svc not in self._auth_required)
        ):
            if svc == "echo":  # the hot path: nothing to check, nothing made
                return ECHOED
            return (_SERVICES[svc](self, rid, header, body, now),)
        return self._refuse(rid, svc, header)

    def frame_error(self, exc: FrameError) -> Steps:
        """The decoder lost frame sync: one error frame, then close."""
        return (Failure(None, "bad_frame", str(exc)), Close(Reason.BAD_FRAME))

    def _refuse(self, rid: Any, svc: Any, header: Header) -> Steps:
        """Every request that is not simply served: the error it gets, or
        the `auth` exchange (not a service of the dispatch list)."""
        if type(rid) not in _SCALAR_TYPES:
            return (Failure(None, "bad_request", "id must be a string, a number, a boolean or null"),)
        if type(svc) is not str:
            return (Failure(rid, "bad_request", "svc (a string) is required"),)
        if svc == "auth":
            return self._auth(rid, header)
        if svc not in self._offered:
            return (Failure(rid, "unknown_service", f"no service {quote(svc)} here"),)
        return (Failure(rid, "unauthorized", f"{svc} needs an authenticated connection"),)

    def _time(self, rid: Scalar, header: Header, body: Body, now: float) -> Action:
        fmt = header.get("fmt", TIME_FORMAT)
        tz = header.get("tz", "utc")
        if type(fmt) is not str or len(fmt) > TIME_FMT_MAX:
            return Failure(rid, "bad_request", f"fmt must be a string of at most {TIME_FMT_MAX} characters")
        if tz != "utc" and tz != "local":
            return Failure(rid, "bad_request", 'tz must be "utc" or "local"')
        if "\0" in fmt:
            return Failure(rid, "bad_request", "fmt must not contain a NUL character")
        try:
            text = time.strftime(fmt, time.gmtime(now) if tz == "utc" else time.localtime(now))
        except ValueError:  # UnicodeEncodeError included: a lone surrogate
            return Failure(rid, "bad_request", "fmt holds a character that cannot be formatted")
        fields = {"epoch": now, "rfc868": (int(now) + RFC868_OFFSET) & 0xFFFFFFFF}
        return Reply(rid, text.encode("utf-8", "replace"), fields)

    def _stats(self, rid: Scalar, header: Header, body: Body, now: float) -> Action:
        return Stats(rid)

    def _command(self, rid: Scalar, header: Header, body: Body, now: float) -> Action:
        name = header.get("name")
        key = self.key
        try:
            spec = allowlist.command(self.rules.commands, name)
            if key is not None and not key.may_run(spec.name):
                return Failure(rid, "unauthorized", f"key {quote(key.name)} may not run {quote(spec.name)}")
            argv = allowlist.argv(spec, header.get("args"))
        except allowlist.Refusal as refusal:
            return Failure(rid, refusal.code, refusal.message)
        self.pending += 1
        return Start(rid, spec.name, argv, bytes(body), key.name if key is not None else None)

    # -- commands ---------------------------------------------------------------

    def start_failed(self, start: Start, code: str, message: str) -> Failure:
        """The runner refused `start` (busy, or it could not run)."""
        self.pending -= 1
        return Failure(start.rid, code, message)

    def finished(self, start: Start, outcome: Outcome) -> Reply:
        """A command of this connection ended: its reply (SPEC section 5)."""
        self.pending -= 1
        fields = {
            "exit": outcome.exit,
            "signal": outcome.signal,
            "timed_out": outcome.timed_out,
            "truncated": outcome.truncated,
            "stdout_len": len(outcome.stdout),
            "stderr_len": len(outcome.stderr),
        }
        return Reply(start.rid, bytes(outcome.stdout) + bytes(outcome.stderr), fields)

    # -- authentication ---------------------------------------------------------

    def _auth(self, rid: Scalar, header: Header) -> Steps:
        if not self._hmac or not self.rules.secrets:
            return (Failure(rid, "bad_request", "authentication is not configured"),)
        named = header.get("key")
        if named is not None and type(named) is not str:
            return (Failure(rid, "bad_request", "key must be the name of a key (a string)"),)
        matched = self.rules.match(self.nonce, header.get("mac"), named)
        if matched is not None:
            self.key = self.rules.keys[matched]
            return (Reply(rid, b"", {"key": matched}), AuthOk(matched, "hmac"))
        self.failures += 1
        # The same words whatever was wrong: a key name that does not exist
        # is not told apart from a wrong MAC.
        wrong = Failure(rid, "unauthorized", "wrong mac")
        logged = AuthFail(self.failures, None if named is None else loggable_text(named))
        if self.failures >= AUTH_ATTEMPTS:
            return (wrong, logged, Close(Reason.AUTH, ban=True))
        return (wrong, logged)

    # -- the connection's end ---------------------------------------------------

    def peer_eof(self) -> bool:
        """The peer closed its side: True to keep the connection open.  It
        never is: what was received has been answered by now, except running
        commands, and a closed TCP connection and a half-closed one look
        the same to us -- so the client is taken to be gone, and its
        commands with it (the handler abandons them)."""
        return False

    def drain(self) -> None:
        """The daemon is stopping: answer what is in flight, then close."""
        self.draining = True

    def close_reason(self, partial: bool) -> Reason | None:
        """Whether the connection is done now (`partial`: part of a frame is
        buffered): the daemon is draining and nothing is in flight."""
        if self.draining and not self.pending and not partial:
            return Reason.SHUTDOWN
        return None


_SERVICES = {
    "time": Session._time,
    "stats": Session._stats,
    "command": Session._command,
}


def loggable_text(text: str) -> str:
    """`loggable` for a string."""
    text = text if len(text) <= QUOTE_MAX else text[:QUOTE_MAX] + "..."
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode("utf-8")


def loggable(value: object) -> Scalar:
    """A client's value as a log field: a scalar as it is (a string cut to
    QUOTE_MAX, a lone surrogate escaped), anything else only named -- an
    array nested a thousand deep must not reach the log's renderer."""
    if type(value) is str:
        return loggable_text(value)
    if value is None or isinstance(value, int | float):  # bool is an int
        return value
    return "<object>" if type(value) is dict else "<array>"
