"""`evd logs summary`: the aggregation, on hand-made logs whose expected
figures were worked out by hand (in the comments), never read off the code.

The lines are written the way evd writes them (json.dumps separators,
timestamp/level/event/pid first), so the fast path for evd's own lines is
what is tested; one test feeds the same events spelled differently and
expects the same answer from the general path.
"""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime

import pytest

from evd.tools.logs.events import TimeSpecError, parse_time_spec, peer_ip, ts_key
from evd.tools.logs.report import render
from evd.tools.logs.stats import nearest_rank
from evd.tools.logs.summary import Summary


def ts(second: float) -> str:
    """2026-03-01T10:00:SS.ffffffZ, as evd writes it."""
    whole = int(second)
    micro = round((second - whole) * 1_000_000)
    base = f"2026-03-01T10:{whole // 60:02d}:{whole % 60:02d}"
    return f"{base}.{micro:06d}Z" if micro else f"{base}Z"


def evd_line(second: float, level: str, event: str, separators=None, **fields) -> bytes:
    obj = {"timestamp": ts(second), "level": level, "event": event, "pid": 7, **fields}
    return json.dumps(obj, separators=separators).encode()


def close(second, service, peer, duration, bytes_in, bytes_out, reason, **kw) -> bytes:
    return evd_line(
        second,
        "info",
        "conn.close",
        service=service,
        peer=peer,
        conn=1,
        duration_ms=duration,
        bytes_in=bytes_in,
        bytes_out=bytes_out,
        reason=reason,
        **kw,
    )


def opened(second, service, peer, **kw) -> bytes:
    return evd_line(second, "info", "conn.open", service=service, peer=peer, conn=1, **kw)


def reject(second, service, peer, reason, count, **kw) -> bytes:
    return evd_line(
        second, "warning", "conn.reject", service=service, peer=peer, reason=reason, count=count, **kw
    )


def command_end(second, name, exit, signal, duration, timed_out=False, truncated=False, **kw) -> bytes:
    return evd_line(
        second,
        "info",
        "command.end",
        name=name,
        argv=[name],
        command_pid=99,
        exit=exit,
        signal=signal,
        timed_out=timed_out,
        truncated=truncated,
        duration_ms=duration,
        key="ops",
        **kw,
    )


def sample(**kw) -> list[bytes]:
    """A small log (kw: extra json.dumps arguments, e.g. separators).
    44 lines: 38 events, 5 lines that are not events, 1 empty line."""
    return [
        evd_line(1, "info", "daemon.start", version="0.1.0", config="/etc/evd/evd.toml", **kw),
        # echo: 5 connections, durations 5,1,4,2,3 -> sorted 1..5
        opened(2, "echo", "192.0.2.1:1001", **kw),
        close(3, "echo", "192.0.2.1:1001", 5.0, 10, 1, "eof", **kw),
        opened(4, "echo", "192.0.2.1:1002", **kw),
        close(5, "echo", "192.0.2.1:1002", 1.0, 20, 2, "eof", **kw),
        opened(6, "echo", "192.0.2.1:1003", **kw),
        close(7, "echo", "192.0.2.1:1003", 4.0, 30, 3, "reset", **kw),
        opened(8, "echo", "[2001:db8::7]:1004", **kw),
        close(9, "echo", "[2001:db8::7]:1004", 2.0, 40, 4, "eof", **kw),
        opened(10, "echo", "unix", **kw),
        close(11, "echo", "unix", 3.0, 50, 5, "idle", **kw),
        # daytime: 2 connections, durations 0.0 and 0.5
        opened(12, "daytime", "198.51.100.2:2001", **kw),
        close(12.25, "daytime", "198.51.100.2:2001", 0.0, 0, 40, "done", **kw),
        opened(13, "daytime", "198.51.100.2:2002", **kw),
        close(13.5, "daytime", "198.51.100.2:2002", 0.5, 0, 40, "done", **kw),
        # refusals: one, then a throttled line standing for 40, then access
        reject(14, "echo", "192.0.2.9:3001", "rate", 1, **kw),
        reject(15, "echo", "192.0.2.9:3002", "rate", 40, **kw),
        reject(16, "echo", "192.0.2.1:3003", "access", 1, **kw),
        evd_line(17, "warning", "udp.drop", service="echo", peer="192.0.2.5:7", reason="loop", count=3, **kw),
        evd_line(18, "warning", "udp.drop", service="echo", peer="192.0.2.5:7", reason="loop", count=2, **kw),
        evd_line(19, "warning", "auth.fail", conn=12, peer="[2001:db8::7]:5000", **kw),
        evd_line(20, "warning", "auth.fail", conn=12, peer="[2001:db8::7]:5000", **kw),
        # greet: durations 10, 30, 20, 10000; exits 0, 0, 1, killed by 15
        evd_line(21, "info", "command.start", name="greet", argv=["greet"], command_pid=99, **kw),
        command_end(22, "greet", 0, None, 10.0, **kw),
        command_end(23, "greet", 0, None, 30.0, **kw),
        command_end(24, "greet", 1, None, 20.0, truncated=True, **kw),
        command_end(25, "greet", None, 15, 10000.0, timed_out=True, **kw),
        evd_line(26, "error", "error", where="echo.read", exc_info="Traceback ...", **kw),
        evd_line(27, "error", "error", where="echo.read", exc_info="Traceback ...", **kw),
        evd_line(28, "error", "error", where="log.reopen", exc_info="Traceback ...", **kw),
        evd_line(29, "info", "config.reload", ok=True, added=[], removed=[], changed=["echo"], **kw),
        evd_line(30, "error", "config.reload", ok=False, error="bad", added=[], removed=[], changed=[], **kw),
        evd_line(31, "info", "listener.close", service="echo", proto="tcp", address="127.0.0.1:7", **kw),
        evd_line(32, "debug", "request", conn=3, svc="echo", id=1, ok=True, duration_ms=0.1, **kw),
        evd_line(33, "info", "daemon.stop", reason="signal", signal="SIGTERM", **kw),
        evd_line(34, "info", "auth.ok", conn=13, peer="192.0.2.1:4000", key="ops", **kw),
        evd_line(35, "info", "ctl", command="kill", args=["3"], ok=True, **kw),
        evd_line(36, "info", "log.reopen", file="/var/log/evd.log", **kw),
        # not evd events: a traceback, half a JSON object, an array, an
        # object without event, an event whose timestamp is not a time
        b"Traceback (most recent call last):",
        b'{"timestamp": "2026-03-01T10:00:40Z", "le',
        b"[1, 2]",
        b'{"no": "event"}',
        b'{"timestamp": "yesterday", "level": "info", "event": "conn.open"}',
        b"",
    ]


def summarise(lines, **options) -> dict:
    summary = Summary(**options)
    summary.feed(lines)
    return summary.to_json()


def test_nearest_rank_by_hand():
    one_to_twenty = [float(v) for v in range(1, 21)]
    # rank = ceil(p/100 * n): 10th, 19th, 20th of 20
    assert [nearest_rank(one_to_twenty, p) for p in (50, 95, 99)] == [10.0, 19.0, 20.0]
    one_to_hundred = [float(v) for v in range(1, 101)]
    assert [nearest_rank(one_to_hundred, p) for p in (50, 95, 99)] == [50.0, 95.0, 99.0]
    assert [nearest_rank([7.5], p) for p in (50, 95, 99)] == [7.5, 7.5, 7.5]
    # 4 values: ranks ceil(2.0)=2, ceil(3.8)=4
    assert [nearest_rank([1.0, 2.0, 3.0, 4.0], p) for p in (50, 95)] == [2.0, 4.0]


def test_summary_by_hand():
    result = summarise(sample())
    assert result["lines"] == 38
    assert result["skipped"] == 5
    assert result["first"] == "2026-03-01T10:00:01.000000Z"
    assert result["last"] == "2026-03-01T10:00:36.000000Z"
    echo = result["services"]["echo"]
    assert echo["connections"] == 5
    assert echo["reasons"] == {"eof": 3, "idle": 1, "reset": 1}
    # sorted 1,2,3,4,5: p50 rank 3, p95 and p99 rank 5
    assert echo["duration_ms"] == {"p50": 3.0, "p95": 5.0, "p99": 5.0, "max": 5.0}
    assert (echo["bytes_in"], echo["bytes_out"]) == (150, 15)
    assert echo["rejected"] == {"rate": 41, "access": 1}
    assert echo["udp_drops"] == {"loop": 5}
    daytime = result["services"]["daytime"]
    assert daytime["connections"] == 2
    # 0.0, 0.5: p50 rank 1, p95 rank 2
    assert daytime["duration_ms"] == {"p50": 0.0, "p95": 0.5, "p99": 0.5, "max": 0.5}
    assert (daytime["bytes_in"], daytime["bytes_out"], daytime["reasons"]) == (0, 80, {"done": 2})
    assert daytime["rejected"] == {} and daytime["udp_drops"] == {}
    assert set(result["services"]) == {"echo", "daytime"}
    assert result["peers"] == [
        {"peer": "192.0.2.1", "connections": 3, "rejected": 1, "auth_failures": 0},
        {"peer": "198.51.100.2", "connections": 2, "rejected": 0, "auth_failures": 0},
        {"peer": "2001:db8::7", "connections": 1, "rejected": 0, "auth_failures": 2},
        {"peer": "192.0.2.9", "connections": 0, "rejected": 41, "auth_failures": 0},
    ]
    greet = result["commands"]["greet"]
    assert greet["runs"] == 4
    assert greet["exit"] == {"0": 2, "-15": 1, "1": 1}
    assert (greet["timed_out"], greet["truncated"]) == (1, 1)
    # 10, 20, 30, 10000: p50 rank 2, p95 rank 4
    assert greet["duration_ms"] == {"p50": 20.0, "p95": 10000.0, "max": 10000.0}
    assert result["errors"] == {"echo.read": 2, "log.reopen": 1}
    assert result["reloads"] == {"ok": 1, "failed": 1}
    assert (result["starts"], result["stops"]) == (1, 1)


def test_schema_is_exactly_the_spec():
    result = summarise(sample())
    assert list(result) == [
        "lines",
        "skipped",
        "first",
        "last",
        "services",
        "peers",
        "commands",
        "errors",
        "reloads",
        "starts",
        "stops",
    ]
    assert set(result["services"]["echo"]) == {
        "connections",
        "reasons",
        "duration_ms",
        "bytes_in",
        "bytes_out",
        "rejected",
        "udp_drops",
    }
    assert set(result["services"]["echo"]["duration_ms"]) == {"p50", "p95", "p99", "max"}
    assert set(result["peers"][0]) == {"peer", "connections", "rejected", "auth_failures"}
    assert set(result["commands"]["greet"]) == {"runs", "exit", "timed_out", "truncated", "duration_ms"}
    assert set(result["commands"]["greet"]["duration_ms"]) == {"p50", "p95", "max"}
    assert set(result["reloads"]) == {"ok", "failed"}


def test_other_spellings_give_the_same_answer():
    """The same events without evd's exact layout (compact separators, so
    no byte test applies) go through the general path: same figures."""
    assert summarise(sample(separators=(",", ":"))) == summarise(sample())


def test_blocks_and_order_do_not_matter():
    """Lines fed in several blocks, and files given newest first (as a
    shell glob `evd.log*` does): first/last are the earliest and latest."""
    lines = sample()
    whole = summarise(lines)
    summary = Summary()
    summary.feed(lines[20:])
    summary.feed(lines[:7])
    summary.feed(lines[7:20])
    assert summary.to_json() == whole


def test_a_timestamp_without_fraction_sorts_right():
    """Python writes no fraction when the microsecond is 0: "...:05Z" is
    still before "...:05.5Z" and after "...:04.9Z"."""
    lines = [
        opened(5.5, "echo", "192.0.2.1:1"),
        opened(5, "echo", "192.0.2.1:2"),
        opened(4.9, "echo", "192.0.2.1:3"),
    ]
    result = summarise(lines)
    assert (result["first"], result["last"]) == ("2026-03-01T10:00:04.900000Z", "2026-03-01T10:00:05.500000Z")
    assert summarise(lines, since=ts_key(ts(5)))["lines"] == 2


def test_top():
    summary = Summary()
    summary.feed(sample())
    assert [p["peer"] for p in summary.to_json(top=2)["peers"]] == ["192.0.2.1", "198.51.100.2"]
    assert len(summary.to_json(top=0)["peers"]) == 4  # 0: all of them


def test_time_window():
    # [10:00:05, 10:00:10): the lines at seconds 5, 6, 7, 8, 9
    result = summarise(sample(), since=parse_time_spec("2026-03-01T10:00:05Z"), until=ts_key(ts(10)))
    assert result["lines"] == 5
    assert (result["first"], result["last"]) == ("2026-03-01T10:00:05.000000Z", "2026-03-01T10:00:09.000000Z")
    assert result["services"]["echo"]["connections"] == 3  # closes at 5, 7 and 9: 1.0, 4.0, 2.0 ms
    assert result["services"]["echo"]["duration_ms"]["max"] == 4.0
    assert result["skipped"] == 5  # not events, whatever their time


def test_service_filter():
    framed = summarise(sample(), service="framed")
    # auth.fail x2 and auth.ok belong to the framed port, request too
    assert framed["lines"] == 4
    assert framed["services"] == {}
    assert framed["peers"] == [{"peer": "2001:db8::7", "connections": 0, "rejected": 0, "auth_failures": 2}]
    command = summarise(sample(), service="command")
    assert command["lines"] == 5 and command["commands"]["greet"]["runs"] == 4
    daytime = summarise(sample(), service="daytime")
    assert daytime["lines"] == 4 and set(daytime["services"]) == {"daytime"}
    assert daytime["peers"][0]["peer"] == "198.51.100.2"
    assert (daytime["starts"], daytime["errors"]) == (0, {})


def test_truncated_last_line_is_skipped_not_fatal():
    summary = Summary()
    summary.feed(sample()[:3])
    whole = close(40, "echo", "192.0.2.1:9", 1.0, 1, 1, "eof")
    summary.feed_tail(whole[:60])  # a file being written: half a line
    after_half = summary.to_json()
    assert (after_half["lines"], after_half["skipped"]) == (3, 1)
    assert after_half["services"]["echo"]["connections"] == 1
    summary.feed_tail(whole)  # a whole line that only lacks its newline
    assert summary.to_json()["services"]["echo"]["connections"] == 2
    summary.feed_tail(b"")
    assert summary.to_json()["skipped"] == 1


def test_a_malformed_close_is_skipped_whole():
    bad = close(3, "echo", "192.0.2.1:1", 5.0, "ten", 1, "eof")
    also_bad = close(4, "echo", "192.0.2.1:1", "slow", 10, 1, "eof")
    no_peer = evd_line(
        5, "info", "conn.close", service="echo", duration_ms=1.0, bytes_in=1, bytes_out=1, reason="x"
    )
    result = summarise([bad, also_bad, no_peer, close(6, "echo", "192.0.2.1:1", 2.0, 10, 1, "eof")])
    assert (result["lines"], result["skipped"]) == (1, 3)
    assert result["services"]["echo"]["connections"] == 1
    assert result["services"]["echo"]["duration_ms"]["max"] == 2.0
    assert result["peers"][0]["connections"] == 1


def test_nothing_selected():
    result = summarise([b"hello", b""])
    assert (result["lines"], result["skipped"], result["first"], result["last"]) == (0, 1, None, None)
    assert result["services"] == {} and result["peers"] == []


def test_refusals_only_leave_percentiles_null():
    result = summarise([reject(1, "time", "192.0.2.3:4", "per_source", 7)])
    assert result["services"]["time"]["connections"] == 0
    assert result["services"]["time"]["duration_ms"] == {"p50": None, "p95": None, "p99": None, "max": None}
    assert result["services"]["time"]["rejected"] == {"per_source": 7}


def test_peer_ip():
    assert peer_ip("192.0.2.1:5") == "192.0.2.1"
    assert peer_ip("[2001:db8::1]:5") == "2001:db8::1"
    assert peer_ip("[::1]:0") == "::1"
    assert peer_ip("unix") == "unix"


def test_time_specs():
    now = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_time_spec("30m", now) == "2026-03-01T11:30:00.000000Z"
    assert parse_time_spec("2h", now) == "2026-03-01T10:00:00.000000Z"
    assert parse_time_spec("7d", now) == "2026-02-22T12:00:00.000000Z"
    assert parse_time_spec("1h30m", now) == "2026-03-01T10:30:00.000000Z"
    assert parse_time_spec("2026-03-01") == "2026-03-01T00:00:00.000000Z"
    assert parse_time_spec("2026-03-01T12:00:00+02:00") == "2026-03-01T10:00:00.000000Z"
    assert parse_time_spec("2026-03-01T10:00:00.25Z") == "2026-03-01T10:00:00.250000Z"
    assert parse_time_spec("2026-03-01 10:00") == "2026-03-01T10:00:00.000000Z"  # no offset: UTC
    for bad in ("yesterday", "30x", "", "m30"):
        with pytest.raises(TimeSpecError):
            parse_time_spec(bad)


def test_text_report_is_aligned_tables_with_units():
    summary = Summary()
    summary.feed(sample())
    text = render(summary.to_json(), summary.extras(), top=10)
    lines = text.splitlines()
    assert lines[0] == (
        "38 log lines (and 5 other lines, skipped), "
        "2026-03-01T10:00:01.000000Z to 2026-03-01T10:00:36.000000Z (35.0 s)"
    )
    start = lines.index(
        "Services: connections closed, their duration and bytes; connections refused, UDP datagrams dropped"
    )
    table = lines[start + 1 : start + 4]
    assert table[0].split() == [
        "service",
        "connections",
        "p50",
        "p95",
        "p99",
        "max",
        "in",
        "out",
        "rejected",
        "udp",
        "drops",
    ]
    # right-aligned numbers: every row ends where the header ends
    assert len({len(row) for row in table}) == 1
    assert table[2].split() == [
        "echo",
        "5",
        "3.00",
        "ms",
        "5.00",
        "ms",
        "5.00",
        "ms",
        "5.00",
        "ms",
        "150",
        "B",
        "15",
        "B",
        "42",
        "5",
    ]
    unix = lines.index("Connections over UNIX sockets (no client IP)")
    assert lines[unix + 2].split() == ["echo", "1"]
    assert lines[lines.index("Connections refused, by reason") + 2].split() == ["echo", "41", "1"]
    greet = lines[lines.index("Commands (exit status=runs; -N: killed by signal N)") + 2]
    assert greet.split() == [
        "greet",
        "4",
        "0=2",
        "-15=1",
        "1=1",
        "1",
        "1",
        "20.0",
        "ms",
        "10.00",
        "s",
        "10.00",
        "s",
        "ops=4",
    ]
    assert lines[-1] == "Daemon: started 1, stopped 1; reloads ok 1, failed 1"


def test_several_processes_give_the_same_answer(tmp_path):
    """The log cut into byte ranges at line starts, summarised by forked
    workers and merged: the same object as one process reading it all."""
    from evd.tools.logs import runner

    lines = sample() * 40  # 1,760 lines
    path = tmp_path / "evd.log"
    path.write_bytes(b"\n".join(lines) + b"\n" + lines[2][:50])  # and half a line at the end
    cuts = runner.plan([str(path)], workers=4, split_min=path.stat().st_size // 8)
    assert len(cuts) == 8 and cuts[0].start == 0 and cuts[-1].end is None  # two per worker
    assert all(a.end == b.start for a, b in itertools.pairwise(cuts))
    assert all(path.read_bytes()[c.start - 1 : c.start] == b"\n" for c in cuts[1:])  # line starts
    alone, errors = runner.summarise([str(path)], runner.Selection(), workers=1)
    shared, shared_errors = runner.summarise(
        [str(path)], runner.Selection(), workers=4, split_min=path.stat().st_size // 8
    )
    assert errors == shared_errors == []
    assert shared.to_json() == alone.to_json()
    result = alone.to_json()
    assert (result["lines"], result["skipped"]) == (38 * 40, 5 * 40 + 1)
    assert result["services"]["echo"]["connections"] == 5 * 40
    # each of 1,2,3,4,5 forty times: p50 is the 100th of 200 values, 3.0
    assert result["services"]["echo"]["duration_ms"]["p50"] == 3.0
