"""What a log line means, apart from any one report: time bounds, the
service a line is about, the client IP of a `peer`, the order of levels.

Timestamps are compared as *keys*: the timestamp in evd's own spelling,
`YYYY-MM-DDTHH:MM:SS.ffffffZ` (27 ASCII bytes, UTC), which sorts as text in
time order.  evd writes exactly that, except that Python leaves the
fraction out when the microsecond is 0 (`...:05Z`, one line in a million);
`ts_key` folds every other ISO 8601 spelling to the same form, so a text (or,
for lines never decoded, byte) comparison is a time comparison and the summary's hot loop never builds a
datetime for evd's own lines.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

# Key length: "2026-01-01T00:00:00.000000Z".
KEY_LEN = 27
# A key's shape once every digit is a 0: what `is_key` checks first, with
# one C call (bytes.translate) instead of a regular expression, which
# costs twice as much as the rest of the check.
ZEROS = bytes.maketrans(b"123456789", b"000000000")
SHAPE = b"0000-00-00T00:00:00.000000Z"

# debug < info < warning < error: `--level warning` shows warning and error.
# structlog may also say "critical"/"exception" (above error); anything
# unknown counts as info so that it is never hidden by `--level info`.
LEVEL_RANK = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50, "exception": 40}

# Lines without a `service` field that still belong to one service: the
# authentication and the framed requests happen on the framed port, the
# command runner is the `command` service (SPEC sections 5 and 6).
EVENT_SERVICE = {
    "auth.fail": "framed",
    "auth.ok": "framed",
    "request": "framed",
    "command.start": "command",
    "command.end": "command",
    "command.stdin": "command",
}

_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])", re.ASCII)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class TimeSpecError(ValueError):
    pass


def key_of(moment: datetime) -> str:
    """The comparable key of an aware datetime; OverflowError if it is
    outside years 1 to 9999 in UTC.  (isoformat, not strftime: "%Y" drops
    the leading zeros of years before 1000, and the key must keep its width
    to sort right.)"""
    utc = moment.astimezone(UTC).replace(tzinfo=None)
    return utc.isoformat(timespec="microseconds") + "Z"


def is_key(ts: bytes) -> bool:
    """Is `ts` a timestamp in evd's own spelling, with digits where the
    digits go and a date and time that exist (no 2026-02-30, no 24:00)?"""
    if ts.translate(ZEROS) != SHAPE:
        return False
    try:
        datetime.fromisoformat(ts.decode("ascii"))
    except ValueError:
        return False
    return True


def ts_key(ts: str) -> str | None:
    """The key of a log line's timestamp, or None if it is not ISO 8601
    or, in UTC, outside years 1 to 9999.  A timestamp without an offset is
    taken as UTC (evd writes UTC)."""
    if len(ts) == KEY_LEN and ts[-1] == "Z" and ts[19] == ".":
        try:
            return ts if is_key(ts.encode("ascii")) else None
        except UnicodeEncodeError:
            return None
    try:
        moment = datetime.fromisoformat(ts)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return key_of(moment)
    except (ValueError, OverflowError):  # 9999-12-31T23:59:59-23:59 is in year 10000 in UTC
        return None


def parse_time_spec(text: str, now: datetime | None = None) -> str:
    """`--since`/`--until`: ISO 8601 (`2026-01-01`, `2026-01-01T12:00`,
    `...Z`, `...+02:00`; no offset means UTC, as in the log) or a span
    before now: `30m`, `2h`, `7d`, also `45s`, `1w`, `1h30m`."""
    spec = text.strip()
    spans = _RELATIVE.findall(spec)
    if spans and _RELATIVE.sub("", spec) == "":
        seconds = sum(float(n) * _UNIT_SECONDS[unit] for n, unit in spans)
        try:
            return key_of((now or datetime.now(UTC)) - timedelta(seconds=seconds))
        except OverflowError:  # 99999999999d: before year 1
            raise TimeSpecError(f"{text!r} reaches back before year 1") from None
    key = ts_key(spec)
    if key is None:
        raise TimeSpecError(f"{text!r} is neither ISO 8601 (2026-01-31T12:00:00Z) nor a span (30m, 2h, 7d)")
    return key


def peer_ip(peer: str) -> str:
    """The client IP of a `peer` field: "1.2.3.4:5" -> "1.2.3.4",
    "[2001:db8::1]:5" -> "2001:db8::1"; "unix" (and anything without a
    port) stays as it is; a port without an address (":5", "[]:5") gives
    "", which no reader takes for a client."""
    if peer[:1] == "[":
        end = peer.find("]")
        if end < 0:  # "[::1:5": no address can be told
            return ""
        return peer[1:end] if peer[end + 1 : end + 2] == ":" else peer
    host, sep, _ = peer.rpartition(":")
    return host if sep and ":" not in host else peer


def line_service(event: dict[str, object]) -> object:
    """The service a line is about: its `service` field, else the one its
    event belongs to (auth.* framed, command.* command), else the service
    named first in an `error` line's `where` ("echo.read"); None for
    daemon-wide lines (start, stop, reload, ...)."""
    service = event.get("service")
    if service is not None:
        return service
    name = event.get("event")
    if name == "error":
        where = event.get("where")
        return where.partition(".")[0] if isinstance(where, str) else None
    return EVENT_SERVICE.get(name) if isinstance(name, str) else None
