"""How a line looks (evd/log/render.py): the direct renderer of the
per-connection events gives the very bytes structlog's chain gives."""

from __future__ import annotations

import json
import math
import re

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from evd.config.addresses import peer_text
from evd.log import render
from evd.loop.seams import Reason

STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


@pytest.fixture(scope="module")
def monkeypatch_clock():
    """Time held still, so that the chain and the short cut stamp alike."""
    real = render.clock
    render.clock = lambda: 1_700_000_000_123_456_789
    yield
    render.clock = real


class Capture:
    def __init__(self):
        self.lines: list[str] = []

    def info(self, line: str) -> None:
        self.lines.append(line)

    debug = info


def through_the_chain(level: str, event: str, fields: dict) -> str:
    capture = Capture()
    logger = structlog.wrap_logger(
        capture,
        processors=render.processors("json", colors=False),
        wrapper_class=structlog.make_filtering_bound_logger(0),
        context_class=dict,
    ).bind()
    getattr(logger, level)(event, **fields)
    (line,) = capture.lines
    return line


scalars = (
    st.text() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.booleans() | st.none()
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
# Any key a caller could pass (no `event`: it is the positional argument),
# including `pid`, and ones that are not identifiers.
keys = st.text(min_size=1, max_size=12).filter(lambda k: k not in ("event", "timestamp", "level", "exc_info"))


@settings(max_examples=300, deadline=None)
@given(
    event=st.sampled_from(sorted(render.FAST_EVENTS)) | st.text(),
    fields=st.dictionaries(keys, values, max_size=8),
    level=st.sampled_from(["debug", "info"]),
)
def test_the_direct_renderer_gives_the_chains_bytes(monkeypatch_clock, event, fields, level):
    assert render.fast_json(level, event, fields) == through_the_chain(level, event, fields)


def test_the_events_of_a_connection_in_particular(monkeypatch_clock):
    cases = [
        ("conn.open", {"service": "echo", "peer": "127.0.0.1:40000", "conn": 17}),
        (
            "conn.close",
            {
                "service": "echo",
                "peer": "[::1]:40000",
                "conn": 17,
                "duration_ms": 0.123,
                "bytes_in": 64,
                "bytes_out": 64,
                "reason": "error",
                "error": 'recv: [Errno 104] "reset"',
            },
        ),
        (
            "request",
            {"conn": 1, "svc": "\ud800", "id": ["x", {"y": math.inf}], "ok": True, "duration_ms": -0.0},
        ),
    ]
    for event, fields in cases:
        assert render.fast_json("info", event, fields) == through_the_chain("info", event, fields)


class Conn:
    """What conn.open and conn.close read of a transport."""

    def __init__(self, host: str | None, port: int, conn_id: int, bytes_in: int, bytes_out: int):
        self.host, self.port, self.conn_id = host, port, conn_id
        self.bytes_in, self.bytes_out = bytes_in, bytes_out
        self.log_ident: str | None = None

    @property
    def peer(self) -> str:
        return peer_text(self.host, self.port)


extras = st.dictionaries(st.sampled_from(["proxy", "client_cn", "error"]), st.text(), max_size=2)


@settings(max_examples=300, deadline=None)
@given(
    service=st.text(min_size=1),
    host=st.none() | st.ip_addresses().map(str) | st.text(),
    port=st.integers(min_value=0, max_value=65535),
    conn_id=st.integers(min_value=0),
    sizes=st.tuples(st.integers(min_value=0), st.integers(min_value=0)),
    micros=st.integers(min_value=0, max_value=10**17),
    reason=st.sampled_from(list(Reason)) | st.text(),
    proto=st.sampled_from(["tcp", "unix", "tls"]),
    open_extra=extras,
    close_extra=extras,
    opened_at_info=st.booleans(),
)
def test_the_lines_of_a_connection_are_the_chains(
    monkeypatch_clock, service, host, port, conn_id, sizes, micros, reason, proto, open_extra, close_extra,
    opened_at_info,
):  # fmt: skip
    """log.conn_open / log.conn_close in JSON (the connection's part made once,
    at conn.open, and kept on it for conn.close) give the chain's bytes; a
    connection opened while the level was warning has no part kept."""
    written: list[str] = []
    conn_open, conn_close = render.json_conn_lines(written.append)
    conn = Conn(host, port, conn_id, *sizes)
    peer = peer_text(host, port)
    opened = {"service": service, "peer": peer, "conn": conn_id, "proto": proto, **open_extra}
    if opened_at_info:
        conn_open(conn, service, conn_id, proto, open_extra)
        assert written.pop(0) == through_the_chain("info", "conn.open", opened) + "\n"
        assert conn.log_ident is not None
    conn_close(conn, service, micros, reason, close_extra)
    closed = {
        "service": service, "peer": peer, "conn": conn_id, "duration_ms": micros / 1000,
        "bytes_in": sizes[0], "bytes_out": sizes[1], "reason": reason, **close_extra,
    }  # fmt: skip
    assert written == [through_the_chain("info", "conn.close", closed) + "\n"]


@given(st.integers(min_value=0, max_value=10**18))
def test_a_duration_in_microseconds_reads_as_the_floats_repr(micros):
    """conn.close's `duration_ms` is made from whole microseconds without
    float.__repr__ (render.ms_text): the same text, to 10**18 µs."""
    assert render.ms_text(micros) == repr(micros / 1000)


def test_every_fraction_of_a_millisecond_reads_as_the_floats_repr():
    for micros in (*range(0, 3000), *range(10**15 - 1000, 10**15 + 1000)):
        assert render.ms_text(micros) == repr(micros / 1000)


def test_a_close_reason_enum_is_its_text(monkeypatch_clock):
    """Transports close with `Reason`, a StrEnum: in a line and in a journal
    entry it reads as its text, as the chain renders it."""
    fields = {"service": "echo", "peer": "unix", "conn": 3, "reason": Reason.EOF}
    line = render.fast_json("info", "conn.close", fields)
    assert line == through_the_chain("info", "conn.close", fields)
    assert json.loads(line)["reason"] == "eof"
    entry = render.fast_journal("info", "conn.close", fields)
    assert entry == through_the_journal_chain("info", "conn.close", fields)
    assert b"\nEVD_REASON=eof\n" in entry


def test_callers_fields_named_like_the_chains_own_take_the_chain(monkeypatch_clock):
    written: list[str] = []
    capture = Capture()
    logger = structlog.wrap_logger(
        capture,
        processors=render.processors("json", colors=False),
        wrapper_class=structlog.make_filtering_bound_logger(0),
        context_class=dict,
    ).bind()
    emit = render.shortcut("info", logger.info, written.append, render.fast_json)
    emit("conn.open", conn=1)
    emit("conn.open", conn=2, level="mine", timestamp="mine")
    emit("daemon.start", version="1")
    assert len(written) == 1 and len(capture.lines) == 2
    assert json.loads(capture.lines[0])["level"] == "info"


def test_the_timestamp_has_one_width(monkeypatch):
    for nanos in (0, 1, 999_999_999, 1_700_000_000_000_000_000, 1_700_000_000_999_999_999):
        monkeypatch.setattr(render, "clock", lambda n=nanos: n)
        assert STAMP.match(render.stamp()), render.stamp()
    monkeypatch.setattr(render, "clock", lambda: 1_700_000_000_000_001_000)
    assert render.stamp() == "2023-11-14T22:13:20.000001Z"


def test_a_second_boundary_is_seen(monkeypatch):
    monkeypatch.setattr(render, "clock", lambda: 1_700_000_000_999_999_000)
    assert render.stamp() == "2023-11-14T22:13:20.999999Z"
    monkeypatch.setattr(render, "clock", lambda: 1_700_000_001_000_000_000)
    assert render.stamp() == "2023-11-14T22:13:21.000000Z"


def through_the_journal_chain(level: str, event: str, fields: dict) -> bytes:
    capture = Capture()
    logger = structlog.wrap_logger(
        capture,
        processors=render.processors("journal", colors=False),
        wrapper_class=structlog.make_filtering_bound_logger(0),
        context_class=dict,
    ).bind()
    getattr(logger, level)(event, **fields)
    (entry,) = capture.lines
    return entry


@settings(max_examples=200, deadline=None)
@given(
    event=st.sampled_from(sorted(render.FAST_EVENTS)) | st.text(),
    fields=st.dictionaries(keys, values, max_size=8),
    level=st.sampled_from(["debug", "info"]),
)
def test_the_direct_journal_entry_is_the_chains(monkeypatch_clock, event, fields, level):
    assert render.fast_journal(level, event, fields) == through_the_journal_chain(level, event, fields)


@settings(max_examples=300, deadline=None)
@given(
    service=st.text(min_size=1),
    conn_id=st.integers(min_value=0),
    argv=st.lists(st.text(), min_size=1, max_size=4).map(tuple),
    pid=st.integers(min_value=1),
    peer=st.text(),
    exit=st.none() | st.integers(min_value=0, max_value=255),
    signum=st.none() | st.integers(min_value=1, max_value=64),
    timed_out=st.booleans(),
    micros=st.integers(min_value=0, max_value=10**17),
    tail=st.text(),
)
def test_the_lines_of_a_program_are_the_chains(
    monkeypatch_clock, service, conn_id, argv, pid, peer, exit, signum, timed_out, micros, tail
):
    """log.exec_start / log.exec_end in JSON give the chain's bytes, line
    for line, twice (the second time from the cached head and argv)."""
    written: list[str] = []
    exec_start, exec_end = render.json_exec_lines(written.append)
    started = {"service": service, "conn": conn_id, "argv": list(argv), "exec_pid": pid, "peer": peer}
    ended = {
        "service": service, "conn": conn_id, "argv": list(argv), "peer": peer, "exec_pid": pid, "exit": exit,
        "signal": signum, "timed_out": timed_out, "duration_ms": micros / 1000, "stderr_tail": tail,
    }  # fmt: skip
    for _ in range(2):
        exec_start(service, conn_id, argv, pid, peer)
        exec_end(service, conn_id, argv, peer, pid, exit, signum, timed_out, micros, tail)
        assert written == [
            through_the_chain("info", "exec.start", started) + "\n",
            through_the_chain("info", "exec.end", ended) + "\n",
        ]
        written.clear()
