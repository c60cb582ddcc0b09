"""What a log event looks like: the structlog chain, and a short cut for the
per-connection events.

Every event is a dict -- `timestamp`, `level`, `event`, `pid`, then the
caller's fields in the order given -- rendered as one JSON object, a console
line, or a journald entry (evd/log/journal.py).  structlog's processor
chain does that for every event; `fast_json` does the same for the events
logged once or twice per connection (`FAST_EVENTS`) without the chain's
generic machinery, since at level info those lines would otherwise cost as
much as serving the connection.  tests/unit/test_logline.py proves the two give
the same bytes.

The timestamp is always ISO 8601 UTC with microseconds and a `Z`: one
width, so the lines sort as text.  Its date-and-second part is formatted
once a second and reused.  While the loop runs (`hold_stamps`), the whole
timestamp is taken once per loop iteration: the lines of one iteration
share it, as they share the instant the loop woke for (the sink's flush,
at the end of each iteration, lets it go).  Reading the clock and
formatting the microseconds was a tenth of a connection's log cost.
"""

from __future__ import annotations

import functools
import json
import os
import time
import traceback
from collections.abc import Callable, Mapping, MutableMapping
from json.encoder import encode_basestring
from types import MappingProxyType
from typing import Any, Protocol

import structlog

from evd.log import journal

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("json", "console", "journal")
# Logged per connection, program or command (or per request at debug): worth
# a renderer of their own.
FAST_EVENTS = frozenset(
    {"conn.open", "conn.close", "request", "exec.start", "exec.end", "command.start", "command.end"}
)
# Fields the chain itself sets: a caller passing one takes the chain's path,
# so that the short cut never has to imitate how the chain overrides it.
_CHAIN_KEYS = frozenset({"timestamp", "level", "exc_info"})

EventDict = MutableMapping[str, Any]
Processor = Callable[[Any, str, EventDict], Any]

_pid = os.getpid()


def _refresh_pid() -> None:
    global _pid
    _pid = os.getpid()
    _heads.clear()
    _conn_heads.clear()
    _exec_heads.clear()


# getpid() is a system call; cache it, and refresh it in forked workers.
os.register_at_fork(after_in_child=_refresh_pid)

# The clock, a module attribute so that a test can hold time still.
clock: Callable[[], int] = time.time_ns
_second = -1
_prefix = ""


_holding = False  # while the loop runs: one timestamp per iteration
_held = ""  # that timestamp, once taken in this iteration


def stamp() -> str:
    """Now as `2024-05-01T12:00:00.123456Z` (the iteration's, while held)."""
    global _second, _prefix, _held
    if _held:
        return _held
    second, nanos = divmod(clock(), 1_000_000_000)
    if second != _second:
        _prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
        _second = second
    now = f"{_prefix}{nanos // 1000:06d}Z"
    if _holding:
        _held = now
    return now


def hold_stamps(on: bool) -> None:
    """While the loop runs: one timestamp per iteration (see the top)."""
    global _holding, _held
    _holding, _held = on, ""


def next_iteration() -> None:
    """The loop is about to sleep: the next line takes a new timestamp."""
    global _held
    _held = ""


# One encoder, built once: json.dumps with any keyword builds a new encoder
# per call.  Non-ASCII stays as it is (a lone surrogate too: the sink turns
# it into a `\ud800` escape when it encodes the line, see log/sink.py).
_encoder = json.JSONEncoder(default=repr, ensure_ascii=False)
_encode = _encoder.encode


def _dumps(obj: object, **_kw: object) -> str:
    return _encode(obj)


def add_timestamp(logger: object, method_name: str, event_dict: EventDict) -> EventDict:
    event_dict["timestamp"] = stamp()
    return event_dict


def render_exc_info(logger: object, method_name: str, event_dict: EventDict) -> EventDict:
    """`exc_info` becomes the formatted traceback text (SPEC: field exc_info)."""
    exc = event_dict.get("exc_info")
    if isinstance(exc, BaseException):
        event_dict["exc_info"] = "".join(traceback.format_exception(exc)).rstrip()
    elif exc is True:
        event_dict["exc_info"] = traceback.format_exc().rstrip()
    return event_dict


def order_keys(logger: object, method_name: str, event_dict: EventDict) -> EventDict:
    """timestamp, level, event, pid first: what an operator reads first."""
    pop = event_dict.pop
    return {
        "timestamp": pop("timestamp"),
        "level": pop("level"),
        "event": pop("event"),
        "pid": _pid,
        **event_dict,
    }


def render_journal(logger: object, method_name: str, event_dict: EventDict) -> bytes:
    return journal.entry(event_dict)


def processors(fmt: str, colors: bool) -> list[Processor]:
    chain: list[Processor] = [structlog.processors.add_log_level, add_timestamp, render_exc_info, order_keys]
    if fmt == "json":
        chain.append(structlog.processors.JSONRenderer(serializer=_dumps))
    elif fmt == "journal":
        chain.append(render_journal)
    else:
        chain.append(functools.partial(render_console, colors=colors))
    return chain


# Levels on a terminal: what needs a look stands out.
_COLOURS = {"error": "\x1b[31;1m", "warning": "\x1b[33m", "info": "\x1b[32m", "debug": "\x1b[2m"}
_RESET = "\x1b[0m"


def render_console(logger: object, method_name: str, event_dict: EventDict, colors: bool = False) -> str:
    """`TIMESTAMP LEVEL EVENT key=value ...` for a person: after the level
    comes exactly what a journal entry's MESSAGE holds (journal.message),
    so the console and the journal read alike.  (structlog's ConsoleRenderer
    sorts and pads and costs several times a JSON line: this one is made
    like the journal's, once per event.)"""
    level = str(event_dict.get("level", ""))
    shown = f"{_COLOURS.get(level, '')}{level:<7}{_RESET}" if colors else f"{level:<7}"
    return f"{event_dict.get('timestamp', '')} {shown} {journal.message(event_dict)}"


def run_chain(chain: list[Processor], level: str, event: str, fields: Mapping[str, Any]) -> Any:
    """What structlog does between a call and the sink, for the lines the
    log writes itself (log.dropped), whatever the level filter says."""
    event_dict: Any = {**fields, "event": event}
    for processor in chain:
        event_dict = processor(None, level, event_dict)
    return event_dict


def fast_json(level: str, event: str, fields: dict[str, Any]) -> str:
    """The JSON line the chain would render for `event`, built directly.
    Only for fields without `_CHAIN_KEYS` (see `shortcut`)."""
    if "pid" in fields:  # the chain keeps pid's place but takes the caller's value
        return _encode({"timestamp": stamp(), "level": level, "event": event, "pid": _pid, **fields})
    head = _heads.get((level, event)) or _head(level, event)
    return '{"timestamp": "' + stamp() + head + _fields(fields) + "}"


def _head(level: str, event: str) -> str:
    """`", "level": …, "event": …, "pid": …` for (level, event), made once."""
    head = _heads.get((level, event))
    if head is None:
        head = _heads[level, event] = (
            f'", "level": "{level}", "event": {encode_basestring(event)}, "pid": {_pid}'
        )
    return head


def _fields(fields: Mapping[str, Any]) -> str:
    """`, "key": value` for each field, as the chain's encoder writes it."""
    line = ""
    keys = _keys
    for key, value in fields.items():
        kind = type(value)
        if kind is str:
            text = encode_basestring(value)
        elif kind is int:
            text = repr(value)
        elif kind is float and -_INF < value < _INF:
            text = repr(value)
        elif value is None:
            text = "null"
        elif kind is bool:
            text = "true" if value else "false"
        elif isinstance(value, str):  # a StrEnum, such as a close reason
            text = encode_basestring(value)
        elif kind is list and all(type(item) is str for item in value):  # an argv
            text = "[" + ", ".join(map(encode_basestring, value)) + "]"
        else:  # NaN and infinities, other containers, others
            text = _encode(value)
        prefix = keys.get(key)
        if prefix is None:
            prefix = keys[key] = ", " + encode_basestring(key) + ": "
        line += prefix + text  # one string grown in place: no list, no join
    return line


# -- conn.open and conn.close in JSON: a line per connection each -----------------
#
# Every connection logs both, so they are made from the connection's own
# part, `"service": …, "peer": …, "conn": …`, rendered once at conn.open
# (`ident`) and reused by conn.close, then the few fields of each event in
# a fixed order.  Same bytes as the chain (tests/unit/test_logline.py).


class Logged(Protocol):
    """A connection, as its conn.open and conn.close lines see it."""

    # What the log made of the connection at conn.open (JSON: its part of
    # both lines, `"127.0.0.1:5555", "conn": 7`: the peer's value and the
    # conn); None until then.
    log_ident: str | None
    host: str | None  # the client's IP, None for a UNIX client
    port: int

    @property
    def peer(self) -> str: ...  # its text for the log: made of host and port
    @property
    def conn_id(self) -> int: ...
    @property
    def bytes_in(self) -> int: ...
    @property
    def bytes_out(self) -> int: ...


# conn.open or conn.close with no fields beyond its own.
NOTHING_MORE: Mapping[str, Any] = MappingProxyType({})
ConnOpen = Callable[[Logged, str, int, str, Mapping[str, Any]], None]
# conn.close takes its duration in whole microseconds: the line's
# `duration_ms` is micros / 1000, which the chain writes as that float's
# repr.
ConnClose = Callable[[Logged, str, int, str, Mapping[str, Any]], None]

# `.123`, `.12`, `.1`, `.0`: the end of repr(k / 1000) for k % 1000 (the
# shortest text of the float nearest k/1000 is that decimal, trailing
# zeros cut, below 1e16).  float.__repr__ and round(x, 3) each cost as much
# as the rest of the line.
_MS_FRACTION = [f".{k:03d}".rstrip("0").ljust(2, "0") for k in range(1000)]
_MS_EXACT = 10**15  # below it, every k / 1000 reads as its decimal


def ms_text(micros: int) -> str:
    """repr(micros / 1000) for a duration in whole microseconds."""
    if 0 <= micros < _MS_EXACT:
        return f"{micros // 1000}{_MS_FRACTION[micros % 1000]}"
    return repr(micros / 1000)


def json_conn_lines(write: Callable[[str], None]) -> tuple[ConnOpen, ConnClose]:
    """`log.conn_open` and `log.conn_close` in JSON, each line with its
    newline (a stream's line: JSON never goes to the journal), to `write`.

    Each is one f-string, with everything it needs at hand (this module's
    globals, the held timestamp): `!r` of an int is what the chain's
    encoder writes for it, and the duration's text is `ms_text`'s."""

    def conn_open(conn: Logged, service: str, conn_id: int, proto: str, extra: Mapping[str, Any]) -> None:
        heads = _conn_heads.get(service) or _conn_head(service)
        host = conn.host  # conn.peer, without its calls:
        peer = (
            '"unix"'
            if host is None
            else encode_basestring(f"[{host}]:{conn.port}" if ":" in host else f"{host}:{conn.port}")
        )
        made = conn.log_ident = f'{peer}, "conn": {conn_id!r}'
        more = _fields(extra) if extra else ""
        proto = encode_basestring(proto)
        write(f'{{"timestamp": "{_held or stamp()}{heads[0]}{made}, "proto": {proto}{more}}}\n')

    def conn_close(conn: Logged, service: str, micros: int, reason: str, extra: Mapping[str, Any]) -> None:
        heads = _conn_heads.get(service) or _conn_head(service)
        made = conn.log_ident
        if made is None:  # opened while the level was above info
            made = f'{encode_basestring(conn.peer)}, "conn": {conn.conn_id!r}'
        more = _fields(extra) if extra else ""
        # ms_text(micros), without the call:
        ms = f"{micros // 1000}{_MS_FRACTION[micros % 1000]}" if 0 <= micros < _MS_EXACT else ms_text(micros)
        write(
            f'{{"timestamp": "{_held or stamp()}{heads[1]}{made}, "duration_ms": {ms}, '
            f'"bytes_in": {conn.bytes_in!r}, "bytes_out": {conn.bytes_out!r}, '
            f'"reason": {encode_basestring(reason)}{more}}}\n'
        )

    return conn_open, conn_close


# Per service, conn.open's and conn.close's text from after the timestamp
# to the peer's value (`", "level": "info", "event": "conn.open", "pid": 7,
# "service": "echo", "peer": `): a handful, seen on every connection.  They
# hold the pid, so a forked worker starts afresh.
_conn_heads: dict[str, tuple[str, str]] = {}


def _service_heads(
    made: dict[str, tuple[str, str]], service: str, events: tuple[str, str], after: str = ""
) -> tuple[str, str]:
    """Two info events' text after the timestamp through `"service": …`
    and `after`, kept in `made`."""
    name = encode_basestring(service)
    first, second = (f'{_head("info", event)}, "service": {name}{after}' for event in events)
    heads = made[service] = (first, second)
    return heads


def _conn_head(service: str) -> tuple[str, str]:
    return _service_heads(_conn_heads, service, ("conn.open", "conn.close"), ', "peer": ')


# The start of a line after its timestamp, per (level, event); it holds the
# pid, so a forked worker starts afresh.
_heads: dict[tuple[str, str], str] = {}
# `, "key": ` per field name: the few names of the per-connection events.
_keys: dict[str, str] = {}


# -- exec.start and exec.end in JSON: a line each per program connection ---------
#
# A program service logs both for every connection, beside its conn.open and
# conn.close: one f-string each, from the service's head and the program's
# argv, each rendered once.  Same bytes as the chain (tests/unit/test_logline.py).

# service, conn, argv, exec_pid, peer
ExecStart = Callable[[str, int, tuple[str, ...], int, str], None]
# service, conn, argv, peer, exec_pid, exit, signal, timed_out, duration in
# whole microseconds (`duration_ms` = micros / 1000), stderr_tail
ExecEnd = Callable[[str, int, tuple[str, ...], str, int, int | None, int | None, bool, int, str], None]

# Per service: exec.start's and exec.end's text after the timestamp up to
# the service's value (pid inside: a forked worker starts afresh).
_exec_heads: dict[str, tuple[str, str]] = {}
# Each program's argv as a JSON list: a handful, from the configuration.
_argvs: dict[tuple[str, ...], str] = {}


def _exec_head(service: str) -> tuple[str, str]:
    return _service_heads(_exec_heads, service, ("exec.start", "exec.end"))


def _argv(argv: tuple[str, ...]) -> str:
    text = _argvs[argv] = "[" + ", ".join(map(encode_basestring, argv)) + "]"
    return text


def json_exec_lines(write: Callable[[str], None]) -> tuple[ExecStart, ExecEnd]:
    """`log.exec_start` and `log.exec_end` in JSON, each line with its
    newline, to `write` (as `json_conn_lines`)."""

    def exec_start(service: str, conn_id: int, argv: tuple[str, ...], pid: int, peer: str) -> None:
        heads = _exec_heads.get(service) or _exec_head(service)
        write(
            f'{{"timestamp": "{_held or stamp()}{heads[0]}, "conn": {conn_id!r}, '
            f'"argv": {_argvs.get(argv) or _argv(argv)}, "exec_pid": {pid!r}, '
            f'"peer": {encode_basestring(peer)}}}\n'
        )

    def exec_end(
        service: str,
        conn_id: int,
        argv: tuple[str, ...],
        peer: str,
        pid: int,
        exit: int | None,
        signal: int | None,
        timed_out: bool,
        micros: int,
        stderr_tail: str,
    ) -> None:
        heads = _exec_heads.get(service) or _exec_head(service)
        ms = ms_text(micros)
        write(
            f'{{"timestamp": "{_held or stamp()}{heads[1]}, "conn": {conn_id!r}, '
            f'"argv": {_argvs.get(argv) or _argv(argv)}, "peer": {encode_basestring(peer)}, '
            f'"exec_pid": {pid!r}, "exit": {"null" if exit is None else repr(exit)}, '
            f'"signal": {"null" if signal is None else repr(signal)}, '
            f'"timed_out": {"true" if timed_out else "false"}, "duration_ms": {ms}, '
            f'"stderr_tail": {encode_basestring(stderr_tail)}}}\n'
        )

    return exec_start, exec_end


_INF = float("inf")
LogMethod = Callable[..., Any]


def fast_journal(level: str, event: str, fields: dict[str, Any]) -> bytes:
    """The journal entry the chain would send for `event`, without the chain."""
    return journal.entry({"timestamp": stamp(), "level": level, "event": event, "pid": _pid, **fields})


def shortcut(
    level: str, chain_method: LogMethod, write: Callable[[Any], None], render: Callable[[str, str, Any], Any]
) -> LogMethod:
    """`log.info` (or debug): FAST_EVENTS by `render` (`fast_json` or
    `fast_journal`), everything else through structlog's chain."""

    def emit(event: str, /, **fields: Any) -> Any:
        # Three `in` tests cost a third of a set operation on the fields.
        if (
            event in FAST_EVENTS
            and "exc_info" not in fields
            and "timestamp" not in fields
            and "level" not in fields
        ):
            write(render(level, event, fields))
            return None
        return chain_method(event, **fields)

    return emit
