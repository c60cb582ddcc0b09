"""tools/logs/entries.py: `journalctl -o json` entries read back as evd's
events (SPEC section 12), and such lines among evd's own in `summary` and
`show`, without a journal: bad input is counted or skipped, never fatal."""

from __future__ import annotations

import json

import orjson
import pytest

from evd.tools.logs import entries, journalctl
from evd.tools.logs.show import Options, Selector
from evd.tools.logs.summary import Summary

REALTIME = "1796610208611495"  # 2026-12-07T02:23:28.611495Z
CLOSE = {
    "__CURSOR": "s=1;i=3", "__REALTIME_TIMESTAMP": REALTIME, "__MONOTONIC_TIMESTAMP": "9", "_BOOT_ID": "b",
    "PRIORITY": "6", "_PID": "16745", "SYSLOG_IDENTIFIER": "evd",
    "MESSAGE": "conn.close service=echo peer=[::1]:5 conn=3 duration_ms=1.5 bytes_in=4 bytes_out=4 "
    "reason=eof",
    "EVD_REASON": "eof", "EVD_DURATION_MS": "1.5", "EVD_EVENT": "conn.close", "EVD_PEER": "[::1]:5",
    "EVD_CONN": "3", "EVD_SERVICE": "echo", "EVD_LEVEL": "info", "EVD_BYTES_OUT": "4", "EVD_BYTES_IN": "4",
    "EVD_TIMESTAMP": "2026-12-07T02:23:28.608293Z", "EVD_PID": "16745",
}  # fmt: skip
LINE = (
    '{"timestamp": "2026-12-07T02:23:28.611495Z", "level": "info", "event": "conn.close", "pid": 16745, '
    '"service": "echo", "peer": "[::1]:5", "conn": 3, "duration_ms": 1.5, "bytes_in": 4, "bytes_out": 4, '
    '"reason": "eof"}'
)


def test_an_entry_is_the_event_it_was():
    event = entries.to_event(CLOSE)
    assert event == json.loads(LINE)
    # the journal's own time, level and pid, not evd's copies of them
    assert event["timestamp"] == "2026-12-07T02:23:28.611495Z" and event["pid"] == 16745


def test_the_line_evd_would_have_written():
    assert entries.line_of(CLOSE) == LINE.encode()


@pytest.mark.parametrize(
    ("text", "value"),
    [("7", 7), ("-1.5", -1.5), ("true", True), ("false", False), ("null", None), ('["a b"]', ["a b"]),
     ('{"a": 1}', {"a": 1}), ("eof", "eof"), ("", ""), ("1.2.3.4:5", "1.2.3.4:5"), ("[::1]:5", "[::1]:5"),
     ("12abc", "12abc"), ('"quoted"', '"quoted"'), ("nope", "nope"), ("NaN", "NaN")],
)  # fmt: skip
def test_values_are_read_back(text, value):
    assert entries.value_of(text) == value


@pytest.mark.parametrize(
    ("priority", "level"),
    [("7", "debug"), ("6", "info"), ("4", "warning"), ("3", "error"), ("2", "critical"), ("5", "info"),
     ("0", "critical")],
)  # fmt: skip
def test_levels_from_priority(priority, level):
    assert entries.to_event({**CLOSE, "PRIORITY": priority})["level"] == level


def test_odd_values_journalctl_prints():
    odd = {**CLOSE, "EVD_SERVICE": [101, 99, 0xFF], "EVD_REASON": ["eof", "idle"], "EVD_NOTE": None}
    event = entries.to_event(odd)
    assert event["service"] == "ec\\xff"  # bytes that are not UTF-8: text all the same
    assert event["reason"] == "idle"  # a field given twice: the last
    assert "note" not in event  # left out by journalctl (too large without --all)


def test_not_an_evd_entry():
    assert entries.to_event({k: v for k, v in CLOSE.items() if k != "EVD_EVENT"}) is None
    assert entries.is_entry(CLOSE) and not entries.is_entry(json.loads(LINE))
    assert not entries.is_entry("__REALTIME_TIMESTAMP") and not entries.is_entry([CLOSE])


def line(entry: dict) -> bytes:
    return orjson.dumps(entry)


def test_summary_counts_or_skips_bad_entries_never_fails():
    summary = Summary()
    summary.feed(
        [
            line(CLOSE),
            line({**CLOSE, "EVD_WHATEVER": "x", "EVD_": "y"}),  # unknown fields: counted
            line({**CLOSE, "EVD_DURATION_MS": "slow"}),  # malformed: this conn.close is skipped
            line({**CLOSE, "EVD_BYTES_IN": "[1"}),  # likewise
            line({**CLOSE, "__REALTIME_TIMESTAMP": "soon"}),  # no time of its own: evd's copy
            line({**CLOSE, "__REALTIME_TIMESTAMP": "99999999999999999999999"}),  # beyond any date: likewise
            line({"__REALTIME_TIMESTAMP": REALTIME, "MESSAGE": "journald started"}),  # not evd's
            line({k: v for k, v in CLOSE.items() if k not in ("__REALTIME_TIMESTAMP", "EVD_TIMESTAMP")}),
            LINE.encode(),  # evd's own line among them
        ]
    )
    result = summary.to_json()
    assert result["lines"] == 5 and result["skipped"] == 4
    assert result["services"]["echo"]["connections"] == 5
    assert result["first"] == "2026-12-07T02:23:28.608293Z"


def test_show_prints_entries_as_evd_lines():
    selector = Selector(Options(files=[]))
    assert selector.select(line(CLOSE))["service"] == "echo"
    assert selector.entry == CLOSE
    assert selector.select(LINE.encode())["service"] == "echo" and selector.entry is None
    assert selector.select(line({**CLOSE, "EVD_EVENT": None})) is None and selector.skipped == 1


def test_journalctl_is_asked_for_the_unit_and_the_times():
    command = journalctl.argv(
        journalctl.Journal(), "2026-12-07T02:00:00.000000Z", "2026-12-07T03:00:00.500000Z"
    )
    assert command[:6] == ["journalctl", "-o", "json", "--all", "--no-pager", "--quiet"]
    assert command[6:] == ["--unit", "evd.service", "--since", "2026-12-07 02:00:00.000000 UTC",
                           "--until", "2026-12-07 03:00:00.500000 UTC"]  # fmt: skip
    files = journalctl.argv(journalctl.Journal(directory="/j", files=["a.journal"]), follow=True, lines=10)
    assert files[6:] == ["--directory", "/j", "--file", "a.journal", "SYSLOG_IDENTIFIER=evd", "--follow",
                         "--lines=10"]  # fmt: skip
    assert "--unit" in journalctl.argv(journalctl.Journal(unit="x.service", directory="/j"))
