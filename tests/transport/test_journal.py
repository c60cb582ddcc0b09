"""log.format = "journal" (evd/log/journal.py): native journald entries,
read back by a datagram socket this test binds in journald's place, and by
a real systemd-journald (in a journal namespace of its own) where it runs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from support import journald
from support.journal import FakeJournal, one, parse

from evd.log import journal, render
from evd.log.logger import Log

WAIT = 10.0


@pytest.fixture
def fake(tmp_path):
    journal_ = FakeJournal(tmp_path / "journal.sock")
    yield journal_
    journal_.close()


def test_an_entry_has_the_fields_the_spec_lists(fake):
    log = Log()
    log.configure("debug", "journal", journal_socket=str(fake.path))
    log.info("conn.open", service="echo", peer="127.0.0.1:40000", conn=7)
    entry = fake.receive()
    assert one(entry, "SYSLOG_IDENTIFIER") == "evd"
    assert one(entry, "PRIORITY") == "6"
    assert one(entry, "EVD_EVENT") == "conn.open"
    assert one(entry, "EVD_SERVICE") == "echo"
    assert one(entry, "EVD_PEER") == "127.0.0.1:40000"
    assert one(entry, "EVD_CONN") == "7"
    assert one(entry, "EVD_PID") == str(os.getpid())
    assert one(entry, "EVD_LEVEL") == "info"
    message = one(entry, "MESSAGE")
    assert "conn.open" in message and "service=echo" in message and "conn=7" in message
    assert one(entry, "EVD_TIMESTAMP") not in message  # journald stamps entries itself


def test_priorities_follow_the_level(fake):
    log = Log()
    log.configure("debug", "journal", journal_socket=str(fake.path))
    log.debug("request", conn=1)
    log.info("conn.open", conn=1)
    log.warning("conn.reject", reason="rate")
    log.error("error", where="test")
    assert [one(fake.receive(), "PRIORITY") for _ in range(4)] == ["7", "6", "4", "3"]


def test_values_are_text_lists_and_objects_json_and_newlines_binary_safe(fake):
    log = Log()
    log.configure("info", "journal", journal_socket=str(fake.path))
    log.info(
        "config.reload",
        ok=True,
        added=["echo tcp 127.0.0.1:7"],
        detail={"a": 1},
        signal=None,
        text="two\nlines",
        odd="\ud800",
        **{"odd-name.x": 1},
    )
    entry = fake.receive()
    assert one(entry, "EVD_OK") == "true"
    assert json.loads(one(entry, "EVD_ADDED")) == ["echo tcp 127.0.0.1:7"]
    assert json.loads(one(entry, "EVD_DETAIL")) == {"a": 1}
    assert one(entry, "EVD_SIGNAL") == "null"
    assert one(entry, "EVD_TEXT") == "two\nlines"
    assert one(entry, "EVD_ODD") == "\\ud800"
    assert one(entry, "EVD_ODD_NAME_X") == "1"


def test_an_entry_larger_than_a_datagram_goes_as_a_memfd(fake):
    log = Log()
    log.configure("info", "journal", journal_socket=str(fake.path))
    big = "x" * (1 << 20)  # far past any datagram
    log.error("error", where="test", exc_info_text=big)
    entry = fake.receive()
    assert fake.memfds == 1
    assert one(entry, "EVD_EXC_INFO_TEXT") == big


def test_a_journal_that_does_not_read_never_blocks(tmp_path):
    receiver = FakeJournal(tmp_path / "slow.sock", rcvbuf=4096)
    try:
        log = Log()
        log.configure("info", "journal", journal_socket=str(receiver.path), buffer=16 * 1024)
        with log.batched():
            started = time.monotonic()
            for i in range(3000):
                log.info("conn.open", service="echo", conn=i)
                log.sink.flush()
            assert time.monotonic() - started < 5.0
            assert log.dropped_total > 0
            received = []
            for _ in range(1000):  # read what is there, let the sink send more
                received += receiver.all_now()
                log.sink.flush()
                if not (log.sink._queue or log.sink._out or log.sink._dropped):
                    break
            received += receiver.all_now()
        conns = [entry for entry in received if one(entry, "EVD_EVENT") == "conn.open"]
        notes = [entry for entry in received if one(entry, "EVD_EVENT") == "log.dropped"]
        assert notes and all(one(note, "PRIORITY") == "4" for note in notes)
        dropped = sum(int(one(note, "EVD_COUNT")) for note in notes)
        assert dropped == log.dropped_total
        assert len(conns) + dropped == 3000
    finally:
        receiver.close()


def test_a_restarted_journal_is_found_again(tmp_path):
    path = tmp_path / "journal.sock"
    first = FakeJournal(path)
    log = Log()
    log.configure("info", "journal", journal_socket=str(path))
    log.info("one")
    assert one(first.receive(), "EVD_EVENT") == "one"
    first.close()
    path.unlink()
    second = FakeJournal(path)
    try:
        log.info("two")
        assert one(second.receive(), "EVD_EVENT") == "two"
    finally:
        second.close()


def test_no_journal_at_start_is_no_error_and_the_entries_wait(tmp_path):
    """SPEC section 12: a journal that is away never stops the log."""
    path = tmp_path / "none.sock"
    log = Log()
    log.configure("info", "journal", journal_socket=str(path))
    assert "No such file or directory" in log.journal_problem()
    log.info("one")  # waits, at most a second, for nothing to watch: not at all
    receiver = FakeJournal(path)
    try:
        log.sink._retry_at = 0.0  # the retry timer's moment, now
        log.info("two")
        assert [one(receiver.receive(), "EVD_EVENT") for _ in range(2)] == ["one", "two"]
    finally:
        receiver.close()


def test_field_names():
    assert journal.field_name("service") == "EVD_SERVICE"
    assert journal.field_name("exc_info") == "EVD_EXC_INFO"
    assert journal.field_name("a-b.c") == "EVD_A_B_C"
    assert len(journal.field_name("x" * 100)) == 64


# -- the real journald ---------------------------------------------------------


@pytest.fixture
def real_journald():
    with journald.real_journald() as running:
        yield running.namespace, running.socket


def journal_query(namespace: str, *matches: str, want: int = 1) -> list[dict]:
    return journald.Journald(namespace, Path()).query(*matches, want=want)


def test_the_real_journald_takes_the_entries(real_journald):
    namespace, sock = real_journald
    log = Log()
    log.configure("info", "journal", journal_socket=str(sock))
    log.warning("conn.reject", service="echo", peer="127.0.0.1:4", reason="rate")
    log.warning("conn.reject", service="time", peer="127.0.0.1:4", reason="rate")
    log.error("error", where="test", exc_info="Traceback\n  line\n" + "y" * 300_000)  # the memfd way
    found = journal_query(namespace, "EVD_EVENT=conn.reject", "EVD_SERVICE=echo", f"_PID={os.getpid()}")
    assert len(found) == 1
    entry = found[0]
    assert entry["PRIORITY"] == "4" and entry["SYSLOG_IDENTIFIER"] == "evd"
    assert entry["EVD_REASON"] == "rate" and entry["EVD_PEER"] == "127.0.0.1:4"
    assert "conn.reject" in entry["MESSAGE"]
    (big,) = journal_query(namespace, "EVD_EVENT=error", f"_PID={os.getpid()}")
    assert big["PRIORITY"] == "3" and big["EVD_EXC_INFO"].endswith("y" * 1000)
    assert len(big["EVD_EXC_INFO"]) == len("Traceback\n  line\n") + 300_000


def test_message_is_the_console_line_after_its_time_and_level():
    """SPEC section 8: MESSAGE is the console rendering of the line;
    journald keeps the time, the priority and the pid itself."""
    events = [
        {"timestamp": "2026-11-30T00:00:00.000000Z", "level": "warning", "event": "conn.reject", "pid": 9,
         "service": "echo", "peer": "[::1]:5", "reason": "rate", "count": 3, "note": "a b"},
        {"timestamp": "2026-11-30T00:00:00.000001Z", "level": "error", "event": "error", "pid": 9,
         "where": "echo.accept", "exc_info": "Traceback (most recent call last):\n  boom"},
    ]  # fmt: skip
    for event in events:
        line = render.render_console(None, event["level"], dict(event))
        stamp, rest = line.split(" ", 1)
        level, shown = rest.split(" ", 1)
        assert (stamp, level) == (event["timestamp"], event["level"])
        assert shown.lstrip() == one(parse(journal.entry(event)), "MESSAGE")
    first = render.render_console(None, "warning", dict(events[0]))
    assert first.endswith('conn.reject service=echo peer=[::1]:5 reason=rate count=3 note="a b"')
    assert render.render_console(None, "error", dict(events[1])).endswith(
        "\nTraceback (most recent call last):\n  boom"
    )
