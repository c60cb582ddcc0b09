"""`evd logs` on hostile input (issue 23, items 4, 7, 8): lines that used to
end in a traceback are skipped, timestamps are checked for real, and an
over-long line costs bounded memory.  The command-line side (exit 2 for a
bad option, one line) is in tests/e2e/test_logs_cli_hostile.py."""

from __future__ import annotations

import json
import tracemalloc

import pytest

from evd.tools.logs import reading
from evd.tools.logs.events import TimeSpecError, is_key, parse_time_spec, ts_key
from evd.tools.logs.report import render
from evd.tools.logs.runner import Selection, summarise
from evd.tools.logs.show import Options, Selector
from evd.tools.logs.summary import Summary

TS = "2026-03-01T10:00:00.000000Z"


def evd_line(event: str, ts: str = TS, **fields) -> bytes:
    """As evd writes it (json.dumps separators, the fast path's prefix)."""
    return json.dumps({"timestamp": ts, "level": "info", "event": event, "pid": 7, **fields}).encode()


def close(peer: str, ts: str = TS, **kw) -> bytes:
    fields = {"service": "echo", "peer": peer, "conn": 1, "duration_ms": 1.5}
    fields |= {"bytes_in": 3, "bytes_out": 3, "reason": "eof"} | kw
    return evd_line("conn.close", ts, **fields)


def summary_of(lines: list[bytes], **selection) -> dict:
    s = Summary(**selection)
    s.feed(lines)
    return dict(s.to_json())


@pytest.mark.parametrize("peer", [":5", "[]:5", "[:5"])
@pytest.mark.parametrize("spelling", ["evd", "other"])
def test_a_port_without_an_address_is_skipped(peer, spelling):
    line = close(peer)
    if spelling == "other":  # the general path
        line = json.dumps(json.loads(line), separators=(",", ":")).encode()
    result = summary_of([line, close("192.0.2.1:7")])
    assert result["skipped"] == 1 and result["lines"] == 1
    assert result["services"]["echo"]["connections"] == 1  # nothing of the bad line counted
    assert [p["peer"] for p in result["peers"]] == ["192.0.2.1"]


def test_a_reject_from_no_address_leaves_nothing_behind():
    line = evd_line("conn.reject", level="warning", service="ssh", peer=":5", reason="rate", count=2)
    result = summary_of([line])
    assert result["skipped"] == 1 and result["services"] == {} and result["peers"] == []


OUT_OF_RANGE = [
    "9999-12-31T23:59:59-23:59",  # year 10000 in UTC
    "0001-01-01T00:00:00+01:00",  # year 0 in UTC
]
NOT_TIMESTAMPS = [
    "2026-03-01T10:00:00.aaaaaaZ",  # 27 characters, "." at 19, "Z" at the end
    "zzzz-zz-zzTzz:zz:zz.zzzzzzZ",
    "2026-02-30T10:00:00.000000Z",  # no such day
    "2026-03-01T24:00:00.000000Z",
    "2026-03-01T10:60:00.000000Z",
    "2026-03-01 10:00:00.000000Z",  # ISO 8601, but not the key's spelling: would sort wrong
    "2026-W09-1T10:00:00.000000Z",
    "2026-03-01T10:00:00.00000\u0661Z",  # an Arabic-Indic digit
]


@pytest.mark.parametrize("stamp", OUT_OF_RANGE + NOT_TIMESTAMPS)
def test_timestamps_are_checked(stamp):
    assert ts_key(stamp) is None
    opened = evd_line("conn.open", stamp, service="echo", peer="192.0.2.1:7", conn=1)
    for line in (evd_line("daemon.start", stamp), close("192.0.2.1:7", stamp), opened):
        assert summary_of([line])["skipped"] == 1
        assert summary_of([line], since="2026-01-01T00:00:00.000000Z")["skipped"] == 1
        selector = Selector(Options(files=[]))
        assert selector.select(line) is None and selector.skipped == 1


def test_good_timestamps_still_count():
    assert ts_key("2026-03-01T10:00:00.123456Z") == "2026-03-01T10:00:00.123456Z"
    assert ts_key("2026-03-01T11:00:00+01:00") == "2026-03-01T10:00:00.000000Z"
    assert ts_key("0999-03-01T10:00:00") == "0999-03-01T10:00:00.000000Z"  # keeps its width
    assert is_key(b"2024-02-29T23:59:59.999999Z") and not is_key(b"2026-02-29T23:59:59.999999Z")
    # The fast path remembers the second it checked: the next line of that
    # second with a broken fraction is still refused.
    lines = [
        close("192.0.2.1:7", "2026-03-01T10:00:00.000001Z"),
        close("192.0.2.1:7", "2026-03-01T10:00:00.00000xZ"),
    ]
    result = summary_of(lines)
    assert result["lines"] == 1 and result["skipped"] == 1


def test_time_specs_out_of_range_are_refused():
    for spec in ("99999999999d", "1" * 400 + "s", "9999-12-31T23:59:59-23:59"):
        with pytest.raises(TimeSpecError):
            parse_time_spec(spec)


def over_long_log(path, size: int) -> None:
    with open(path, "wb") as f:
        f.write(evd_line("daemon.start") + b"\n")
        chunk = b"\0" * (1 << 20)
        for _ in range(size >> 20):  # a crash-damaged log: a run of NUL bytes
            f.write(chunk)
        f.write(b"\n" + close("192.0.2.1:7") + b"\n")
        f.write(b"x" * (3 << 20))  # and an over-long unterminated last line


def test_an_over_long_line_costs_bounded_memory(tmp_path):
    path = tmp_path / "damaged.log"
    over_long_log(path, 50 << 20)
    tracemalloc.start()
    try:
        summary, errors = summarise([str(path)], Selection(), workers=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not errors
    # A block, the longest line kept and their copies: a few MiB, not the
    # 50 MiB line (nor its square in time: every block re-copied it before).
    assert peak < 8 * reading.MAX_LINE, peak
    result = summary.to_json()
    assert (result["lines"], result["skipped"], summary.overlong) == (2, 2, 2)
    assert "2 other lines, skipped, 2 of them over 1 MiB" in render(result, summary.extras(), 10)


def test_the_longest_line_kept_is_kept_whole():
    fits = close("192.0.2.1:7", note="a" * (reading.MAX_LINE - 300))
    fits = fits[: reading.MAX_LINE - 2] + b'"}' if len(fits) > reading.MAX_LINE else fits
    cutter = reading.Lines()
    # fed in small pieces: the carried line grows up to the limit and no further
    lines = [line for i in range(0, len(fits), 4096) for line in cutter.cut(fits[i : i + 4096])]
    lines += cutter.cut(b"\n")
    assert lines == [fits]
    too_long = b"y" * (reading.MAX_LINE + 1)
    assert cutter.cut(too_long[:10]) == [] and cutter.cut(too_long[10:]) == []
    assert cutter.rest() is reading.OVERLONG
    assert cutter.cut(b"\nz\n") == [reading.OVERLONG, b"z"] and cutter.rest() == b""


def test_line_starts_never_read_a_whole_line(tmp_path):
    path = tmp_path / "cut.log"
    over_long_log(path, 8 << 20)
    tracemalloc.start()
    try:
        cuts = reading.line_starts(str(path), 4)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * reading.MAX_LINE, peak
    data = path.read_bytes()
    assert cuts[0] == 0 and cuts[-1] == len(data)
    assert all(data[c - 1 : c] == b"\n" for c in cuts[1:-1])
