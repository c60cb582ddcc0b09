"""Unit tests of the raw services' logic (evd/proto/classic.py): no sockets.

Every expected value is built here from the RFC's definition (datetime for
RFC 868, the printable-ASCII ring for RFC 864), never taken from the module.
"""

from __future__ import annotations

import os
import re
import struct
import time
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evd.proto import classic

EPOCH_1900 = datetime(1900, 1, 1, tzinfo=UTC)
EPOCH_1970 = datetime(1970, 1, 1, tzinfo=UTC)

WEEKDAYS = "Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday"
MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
# RFC 867 suggested form, as SPEC section 4 writes it:
# Weekday, Month DD, YYYY HH:MM:SS-ZONE\r\n
DAYTIME_RE = re.compile(
    rb"\A(" + WEEKDAYS.encode() + rb"), (" + MONTHS.encode() + rb") (0[1-9]|[12][0-9]|3[01]), "
    rb"[0-9]{4} ([01][0-9]|2[0-3]):[0-5][0-9]:[0-6][0-9]-[A-Za-z0-9+\-]+\r\n\Z"
)


def rfc868_expected(instant: datetime) -> bytes:
    seconds = int((instant - EPOCH_1900).total_seconds())
    return struct.pack(">I", seconds % 2**32)


def chargen_lines() -> list[bytes]:
    """RFC 864 from its definition: the 95 printable characters 32..126 in a
    ring; line i is the 72 characters starting at position i, then CRLF."""
    ring = [chr(c) for c in range(32, 127)]
    assert len(ring) == 95
    return ["".join(ring[(i + k) % 95] for k in range(72)).encode("ascii") + b"\r\n" for i in range(95)]


LINES = chargen_lines()


@pytest.fixture
def tz():
    """Switch the process's local time zone for one test, then restore it."""
    saved = os.environ.get("TZ")

    def set_tz(name: str) -> None:
        os.environ["TZ"] = name
        time.tzset()

    yield set_tz
    if saved is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = saved
    time.tzset()


# --- RFC 868 time -------------------------------------------------------------


def test_rfc868_unix_epoch_is_2208988800():
    assert (EPOCH_1970 - EPOCH_1900).total_seconds() == 2208988800  # the RFC's own figure
    assert classic.rfc868(0.0) == struct.pack(">I", 2208988800)
    assert classic.rfc868(0.0) == rfc868_expected(EPOCH_1970)


def test_rfc868_fraction_is_truncated_not_rounded():
    assert classic.rfc868(0.999) == struct.pack(">I", 2208988800)
    assert classic.rfc868(1.0) == struct.pack(">I", 2208988801)


def test_rfc868_wraps_at_2036():
    wrap = EPOCH_1900 + timedelta(seconds=2**32)  # 2036-02-07T06:28:16Z
    assert wrap == datetime(2036, 2, 7, 6, 28, 16, tzinfo=UTC)
    assert classic.rfc868(wrap.timestamp()) == b"\x00\x00\x00\x00"
    assert classic.rfc868(wrap.timestamp() - 1) == b"\xff\xff\xff\xff"
    after = datetime(2040, 1, 1, tzinfo=UTC)
    expected = int((after - EPOCH_1900).total_seconds()) - 2**32
    assert classic.rfc868(after.timestamp()) == struct.pack(">I", expected)


@settings(max_examples=200, deadline=None)
@given(st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2105, 12, 31)))
def test_rfc868_matches_datetime_arithmetic(naive):
    instant = naive.replace(microsecond=0, tzinfo=UTC)
    assert classic.rfc868(instant.timestamp()) == rfc868_expected(instant)


def test_datagram_time_is_now():
    before = datetime.now(UTC).replace(microsecond=0)
    reply = classic.datagram_handler("time")(b"anything")
    after = datetime.now(UTC)
    assert len(reply) == 4
    got = struct.unpack(">I", reply)[0]
    low = struct.unpack(">I", rfc868_expected(before))[0]
    high = struct.unpack(">I", rfc868_expected(after))[0]
    assert (got - low) % 2**32 <= (high - low) % 2**32


# --- RFC 867 daytime ----------------------------------------------------------


def test_daytime_known_instant_in_utc(tz):
    tz("UTC")
    # 1970-01-01 was a Thursday.
    assert classic.daytime(0.0) == b"Thursday, January 01, 1970 00:00:00-UTC\r\n"
    instant = datetime(2024, 2, 29, 13, 5, 9, tzinfo=UTC)  # a Thursday too
    assert classic.daytime(instant.timestamp()) == b"Thursday, February 29, 2024 13:05:09-UTC\r\n"


def test_daytime_uses_the_local_zone(tz):
    tz("EST5EDT")
    # 0 UTC is 19:00 on Wednesday 31 December 1969 in New York (standard time).
    assert classic.daytime(0.0) == b"Wednesday, December 31, 1969 19:00:00-EST\r\n"
    summer = datetime(2023, 7, 4, 16, 0, 0, tzinfo=UTC)  # Tuesday, EDT = UTC-4
    assert classic.daytime(summer.timestamp()) == b"Tuesday, July 04, 2023 12:00:00-EDT\r\n"


@pytest.mark.parametrize("zone", ["UTC", "Europe/Berlin", "Asia/Kolkata", "America/Los_Angeles"])
def test_daytime_format_matches_rfc867_form(tz, zone):
    tz(zone)
    for instant in (0.0, 951782400.0, time.time(), 4102444799.0):
        line = classic.daytime(instant)
        assert DAYTIME_RE.match(line), line


def test_datagram_daytime_is_now(tz):
    tz("UTC")
    before = datetime.now(UTC)
    reply = classic.datagram_handler("daytime")(b"")
    after = datetime.now(UTC)
    assert DAYTIME_RE.match(reply), reply
    allowed = {d.strftime("%A, %B %d, %Y %H:%M:%S").encode() + b"-UTC\r\n" for d in (before, after)}
    assert reply in allowed


# --- timefmt ------------------------------------------------------------------


def test_timefmt_empty_request_uses_default_format(tz):
    tz("UTC")
    assert classic.timefmt(b"", 0.0) == b"1970-01-01 00:00:00"


def test_timefmt_formats_local_time(tz):
    tz("UTC")
    instant = datetime(2031, 12, 24, 18, 30, 5, tzinfo=UTC).timestamp()
    assert classic.timefmt(b"%Y/%m/%d %H-%M-%S", instant) == b"2031/12/24 18-30-05"
    assert classic.timefmt(b"literal text", instant) == b"literal text"
    assert classic.timefmt(b"%%", instant) == b"%"
    assert classic.timefmt("→%Y←".encode(), instant) == "→2031←".encode()


def test_timefmt_length_limit_is_256_bytes_inclusive():
    assert classic.timefmt(b"a" * 256, 0.0) == b"a" * 256
    assert classic.timefmt(b"a" * 257, 0.0) is None
    assert classic.timefmt(b"%Y" * 200, 0.0) is None  # 400 bytes
    # The limit is on bytes, not characters: 129 two-byte characters = 258 bytes.
    assert classic.timefmt("é".encode() * 129, 0.0) is None


@pytest.mark.parametrize("request_", [b"\xff", b"%Y\xc3", b"\xed\xa0\x80", b"abc\x80"])
def test_timefmt_invalid_utf8_is_none(request_):
    assert classic.timefmt(request_, 0.0) is None


@pytest.mark.parametrize("request_", [b"\x00", b"%Y\x00%m", b"abc\x00"])
def test_timefmt_nul_is_none(request_):
    assert classic.timefmt(request_, 0.0) is None


def test_datagram_timefmt_strips_line_ending(tz):
    tz("UTC")
    handler = classic.datagram_handler("timefmt")
    year = {str(datetime.now(UTC).year).encode(), str(datetime.now(UTC).year + 1).encode()}
    assert handler(b"%Y\r\n") in year
    assert handler(b"%Y\n") in year
    assert handler(b"plain") == b"plain"
    assert handler(b"x" * 300) is None
    assert re.fullmatch(rb"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}", handler(b""))


# --- RFC 864 chargen ----------------------------------------------------------


def test_chargen_cycle_is_the_rfc864_pattern():
    assert classic.CHARGEN_CYCLE == b"".join(LINES)
    assert len(classic.CHARGEN_CYCLE) == 95 * 74


def test_chargen_first_lines_spelled_out():
    # The first lines of RFC 864's own example.
    assert LINES[0] == b" !\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefg\r\n"
    assert LINES[1] == b"!\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefgh\r\n"
    assert LINES[94] == b"~ !\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdef\r\n"
    assert classic.CHARGEN_CYCLE.startswith(LINES[0] + LINES[1])


def test_chargen_block_is_whole_cycles_of_about_64k():
    block = classic.CHARGEN_BLOCK
    cycle = b"".join(LINES)
    assert len(block) % len(cycle) == 0
    assert 0 < len(block) <= 65536
    assert len(block) + len(cycle) > 65536  # as many whole cycles as fit in 64 KiB
    assert block == cycle * (len(block) // len(cycle))


@pytest.mark.parametrize("n", [0, 1, 2, 71, 72, 93, 94, 95, 96, 189, 190, 95 * 1000 + 7])
def test_chargen_line_wraps(n):
    assert classic.chargen_line(n) == LINES[n % 95]


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=10**9))
def test_chargen_line_any_n(n):
    line = classic.chargen_line(n)
    assert line == LINES[n % 95]
    assert len(line) == 74


def test_datagram_chargen_rotates_one_line_per_datagram():
    handler = classic.datagram_handler("chargen")
    replies = [handler(b"") for _ in range(200)]
    assert replies == [LINES[i % 95] for i in range(200)]


def test_datagram_chargen_ignores_payload_and_instances_are_independent():
    a = classic.datagram_handler("chargen")
    b = classic.datagram_handler("chargen")
    assert a is not b
    assert a(b"x" * 1000) == LINES[0]
    assert a(b"") == LINES[1]
    assert b(b"zzz") == LINES[0]
    assert a(b"\x00") == LINES[2]


# --- the datagram table -------------------------------------------------------


@pytest.mark.parametrize("payload", [b"", b"x", bytes(range(256)), b"\x00" * 65507])
def test_datagram_echo_returns_payload(payload):
    assert classic.datagram_handler("echo")(payload) == payload


@pytest.mark.parametrize("payload", [b"", b"hello", b"\x00" * 1000])
def test_datagram_discard_never_answers(payload):
    assert classic.datagram_handler("discard")(payload) is None


def test_datagram_handler_covers_every_raw_udp_service():
    for name in ("echo", "discard", "chargen", "daytime", "time", "timefmt"):
        assert callable(classic.datagram_handler(name)), name


# --- timefmt over UDP is no amplifier -------------------------------------------


@pytest.mark.parametrize("fmt", [b"%c", b"%c%c%c%c", b"%A%B%c%x%X", b"%c" * 64, b"", b"%Y", b"%c\n"])
def test_datagram_timefmt_reply_is_no_larger_than_the_request_or_the_floor(fmt, tz):
    # "%c" is 2 bytes and formats to 24: unchecked, a spoofed source could
    # get ~12 times what it sent aimed at a victim.
    tz("UTC")
    reply = classic.datagram_handler("timefmt")(fmt)
    assert reply is not None
    assert len(reply) <= max(len(fmt), classic.TIMEFMT_UDP_FLOOR)
    full = classic.timefmt(fmt.rstrip(b"\r\n"), time.time())
    assert full.startswith(reply)  # a prefix of the formatted time, nothing else


def test_datagram_timefmt_cut_keeps_whole_characters(tz):
    tz("UTC")
    fmt = ("%c" + "é" * 20 + "x").encode()  # 43 bytes in; 65 out, the cut falls inside an é
    reply = classic.datagram_handler("timefmt")(fmt)
    assert reply.decode("utf-8").endswith("é" * 9)  # never half a character
    assert len(reply) == 24 + 18


def test_tcp_timefmt_is_not_cut():
    assert len(classic.timefmt(b"%c" * 64, 0.0)) == 24 * 64
