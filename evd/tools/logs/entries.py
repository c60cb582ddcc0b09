"""A journal entry, as `journalctl -o json` prints it, read back as the evd
event it was (SPEC section 12).

evd sends each event as a native entry (evd/log/journal.py): `EVD_EVENT`,
and every field as `EVD_` + its name in upper case, values as text (lists
and objects as JSON).  Read back:

- `EVD_EVENT` -> `event`; an entry without it is not an evd event (skipped);
- `timestamp` from `__REALTIME_TIMESTAMP` (microseconds since the epoch,
  written as evd writes its own: `2026-01-31T12:00:00.000000Z`), `level`
  from `PRIORITY`, `pid` from `_PID` -- the journal's own facts, which is
  also what journalctl's `--since`/`--until` select on.  evd's copies of
  them (`EVD_TIMESTAMP`, `EVD_LEVEL`, `EVD_PID`) fill in only where the
  journal's are missing;
- every other `EVD_NAME` -> `name` in lower case, its value read back:
  numbers, booleans and null, lists and objects from their JSON; any other
  text stays text.  A value journalctl prints as bytes (not UTF-8) or as
  several values (a field repeated) becomes text too: never an error.

The fields keep the order the entry's MESSAGE shows them in (evd wrote
MESSAGE in the order logged; journalctl prints fields in no set order), so
`show --json` prints the line evd would have written to a file.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import orjson

Event = dict[str, object]

# The field every journalctl -o json line has, and evd's lines never have
# at their top level: how a journal entry is told from an evd line.
MARK = "__REALTIME_TIMESTAMP"
PREFIX = "EVD_"
# syslog priorities (journald's PRIORITY) to evd's levels: evd writes 7, 6,
# 4, 3 (2 for critical); notice reads as info, the rest as critical.
LEVEL_OF = {"7": "debug", "6": "info", "5": "info", "4": "warning", "3": "error"}
OWN = {"EVD_EVENT": "event", "EVD_TIMESTAMP": "timestamp", "EVD_LEVEL": "level", "EVD_PID": "pid"}
# The first character of a JSON value that is not a string.
_NOT_TEXT = frozenset("-0123456789tfn[{")
# evd's own spelling of a line (render.py): json's default separators.
_line = json.JSONEncoder(ensure_ascii=False, default=str).encode


def is_entry(obj: object) -> bool:
    """A parsed JSON value that is a journal entry, not an evd line."""
    return type(obj) is dict and MARK in obj and "event" not in obj


def text(value: object) -> str | None:
    """A field's text: journalctl prints a string, bytes as a list of
    numbers, a repeated field as a list of those (the last one counts),
    and null for a value it left out (too large without --all)."""
    if type(value) is str:
        return value
    if type(value) is list and value:
        if all(type(b) is int and 0 <= b < 256 for b in value):
            return bytes(value).decode("utf-8", "backslashreplace")
        return text(value[-1])
    return None


def value_of(string: str) -> object:
    """A field's value: what its text spells in JSON unless that is a
    string (evd wrote strings as they are)."""
    if string[:1] in _NOT_TEXT:
        try:
            value = orjson.loads(string)
        except orjson.JSONDecodeError:
            return string
        return string if type(value) is str else value
    return string


def timestamp(micros: str) -> str | None:
    """`__REALTIME_TIMESTAMP` as evd's timestamp; None if it is not one."""
    try:
        count = int(micros)
        seconds, fraction = divmod(count, 1_000_000)
        moment = datetime.fromtimestamp(seconds, UTC)
    except (ValueError, OverflowError, OSError):
        return None
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{fraction:06d}Z"


def to_event(entry: dict[str, object]) -> Event | None:
    """The evd event of a journal entry, None if it is not one."""
    name = text(entry.get("EVD_EVENT"))
    if name is None:
        return None
    stamp = text(entry.get(MARK))
    when = timestamp(stamp) if stamp is not None else None
    if when is None:
        when = text(entry.get("EVD_TIMESTAMP"))
        if when is None:
            return None
    priority = text(entry.get("PRIORITY"))
    level = LEVEL_OF.get(priority or "", "critical") if priority else text(entry.get("EVD_LEVEL")) or "info"
    pid_text = text(entry.get("_PID")) or text(entry.get("EVD_PID"))
    event: Event = {"timestamp": when, "level": level, "event": name}
    if pid_text is not None:
        event["pid"] = value_of(pid_text)
    for key, raw in entry.items():
        if key.startswith(PREFIX) and key not in OWN:
            string = text(raw)
            if string is not None:
                event[key[len(PREFIX) :].lower()] = value_of(string)
    return event


def in_message_order(event: Event, message: object) -> Event:
    """`event` with its fields after the first four in the order MESSAGE
    shows them (`EVENT key=value ...`); fields it does not show last."""
    shown = text(message) or ""
    head: Event = {key: event[key] for key in ("timestamp", "level", "event", "pid") if key in event}
    rest = [key for key in event if key not in head]
    places = {key: shown.find(f" {key}=") for key in rest}
    rest.sort(key=lambda key: (places[key] < 0, places[key], key))
    return {**head, **{key: event[key] for key in rest}}


def line_of(entry: dict[str, object]) -> bytes | None:
    """The JSON line evd would have written to a file for this entry."""
    event = to_event(entry)
    if event is None:
        return None
    return _line(in_message_order(event, entry.get("MESSAGE"))).encode("utf-8", "backslashreplace")
