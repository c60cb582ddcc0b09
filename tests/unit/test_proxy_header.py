"""The PROXY header parser (proto/proxy.py), h11-style: every valid header
whole, byte by byte and at every split, with trailing data; the examples of
HAProxy's proxy-protocol.txt; every refusal; and a property: any bytes give
a header, "need more" or a refusal, never an exception."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from evd.proto.proxy import (
    MAX_HEADER,
    MAX_V1,
    MAX_V2_LENGTH,
    NEED_MORE,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_UNIQUE_ID,
    V2_SIGNATURE,
    Header,
    Refused,
    parse,
    v1_header,
    v2_header,
)

# The spec's v1 examples (section 2.1) and its worst cases.
V1_TCP4 = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
V1_TCP4_LONGEST = b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n"
V1_TCP6_LONGEST = (
    b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    b" ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"
)
V1_UNKNOWN = b"PROXY UNKNOWN\r\n"
V1_UNKNOWN_LONGEST = (
    b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    b" ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"
)
# What HAProxy sends with send-proxy-v2 (172.19.0.1:42578 -> 172.19.0.3:80),
# as a packet capture shows it.
V2_CAPTURED = bytes.fromhex("0d0a0d0a000d0a515549540a2111000cac130001ac130003a6520050")
FULL = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"

VALID = [
    (V1_TCP4, Header(1, len(V1_TCP4), source=("192.168.0.1", 56324), destination=("192.168.0.11", 443))),
    (
        V1_TCP4_LONGEST,
        Header(1, 56, source=("255.255.255.255", 65535), destination=("255.255.255.255", 65535)),
    ),
    (V1_TCP6_LONGEST, Header(1, 104, source=(FULL, 65535), destination=(FULL, 65535))),
    (V1_UNKNOWN, Header(1, 15, local=True)),
    (V1_UNKNOWN_LONGEST, Header(1, 107, local=True)),
    (
        b"PROXY TCP6 ::ffff:10.1.2.3 ::1 0 7\r\n",
        Header(1, 36, source=("10.1.2.3", 0), destination=("::1", 7)),
    ),
    (
        V2_CAPTURED,
        Header(2, 28, source=("172.19.0.1", 42578), destination=("172.19.0.3", 80)),
    ),
    (v2_header(None), Header(2, 16, local=True)),
    (
        v2_header(("2001:db8::1", 1234), ("2001:db8::2", 7007)),
        Header(2, 52, source=("2001:db8::1", 1234), destination=("2001:db8::2", 7007)),
    ),
    (
        v2_header(("127.0.0.2", 5), ("127.0.0.1", 7), ((PP2_TYPE_AUTHORITY, b"evd.example"), (0xE0, b""))),
        Header(
            2,
            28 + 14 + 3,
            source=("127.0.0.2", 5),
            destination=("127.0.0.1", 7),
            tlvs=((PP2_TYPE_AUTHORITY, b"evd.example"), (0xE0, b"")),
        ),
    ),
]


@pytest.mark.parametrize(("header", "expected"), VALID)
def test_a_whole_header(header, expected):
    assert parse(header) == expected


@pytest.mark.parametrize(("header", "expected"), VALID)
def test_every_prefix_needs_more(header, expected):
    """Byte at a time: every proper prefix asks for more, never refuses."""
    for end in range(len(header)):
        assert parse(header[:end]) is NEED_MORE, header[:end]
    assert parse(header) == expected


@pytest.mark.parametrize(("header", "expected"), VALID)
def test_trailing_data_at_every_split(header, expected):
    """Whatever follows the header is not the header's: its length says
    where the stream begins, wherever the reads happened to split it."""
    stream = header + b"GET / HTTP/1.1\r\n\r\n\x16\x03\x01"
    for split in range(1, len(stream) + 1):
        result = parse(stream[:split])
        if split < len(header):
            assert result is NEED_MORE
        else:
            assert result == expected
            assert stream[result.length :] == stream[len(header) :]


def test_memoryview_and_bytearray_are_fine():
    assert parse(memoryview(V1_TCP4)) == parse(bytearray(V1_TCP4)) == parse(V1_TCP4)


def test_writers_round_trip():
    assert parse(v1_header(("10.0.0.1", 1), ("10.0.0.2", 2))).source == ("10.0.0.1", 1)
    assert parse(v1_header(("::1", 3), ("::2", 4))).destination == ("::2", 4)
    assert parse(v2_header(("::ffff:10.0.0.9", 9))).source == ("10.0.0.9", 9)


REFUSED = [
    (b"GET / HTTP/1.1\r\n", "no PROXY header"),
    (b"\x16\x03\x01\x02\x00", "no PROXY header"),  # a TLS ClientHello
    (b"PROXYTCP4", "no PROXY header"),
    (b"proxy TCP4 1.2.3.4 1.2.3.4 1 1\r\n", "no PROXY header"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "v1: not a line of printable ASCII"),
    (b"PROXY TCP4 1.2.3.4\x00", "v1: not a line of printable ASCII"),
    (b"PROXY " + b"A" * (MAX_V1 - 6), f"v1: no CRLF within {MAX_V1} bytes"),
    (b"PROXY\r\n", "v1: malformed"),
    (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "v1: malformed"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "v1: malformed"),
    (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "v1: malformed"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "v1: malformed"),
    (b"PROXY TCP4 ::1 ::1 1 2\r\n", "v1: bad TCP4 address or port"),
    (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "v1: bad TCP6 address or port"),
    (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "v1: bad TCP4 address or port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "v1: bad TCP4 address or port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n", "v1: bad TCP4 address or port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 +80 2\r\n", "v1: bad TCP4 address or port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "v1: bad TCP4 address or port"),
    (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "v1: bad TCP6 address or port"),
    (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "v1: bad TCP4 address or port"),
    (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "v1: bad TCP4 address or port"),
    (b"PROXY TCP6 ::g ::1 1 2\r\n", "v1: bad TCP6 address or port"),
    (b"\r\n\r\n\x00\r\nQUIX", "no PROXY header"),
    (V2_SIGNATURE + b"\x11\x11\x00\x0c", "v2: unsupported version 1"),
    (V2_SIGNATURE + b"\x22\x11\x00\x0c", "v2: unsupported command 2"),
    (V2_SIGNATURE + b"\x21\x11" + (MAX_V2_LENGTH + 1).to_bytes(2, "big"), "v2: header of"),
    (V2_SIGNATURE + b"\x21\x00\x00\x00", "v2: unsupported address family 0x00"),  # PROXY + UNSPEC
    (V2_SIGNATURE + b"\x21\x31\x00\x00", "v2: unsupported address family 0x31"),  # AF_UNIX
    (V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12), "v2: unsupported address family 0x12"),  # UDP
    (V2_SIGNATURE + b"\x21\x11\x00\x08" + bytes(8), "v2: address block of 8 bytes"),
    (V2_SIGNATURE + b"\x21\x11\x00\x0e" + bytes(14), "v2: truncated TLV block"),
    (V2_SIGNATURE + b"\x21\x11\x00\x10" + bytes(12) + b"\x02\x00\x05x", "v2: truncated TLV block"),
]


@pytest.mark.parametrize(("data", "reason"), REFUSED)
def test_refusals_name_the_problem(data, reason):
    result = parse(data)
    assert isinstance(result, Refused), result
    assert result.reason.startswith(reason)


def test_refused_at_the_first_byte_that_cannot_start_a_header():
    """A peer that is not a proxy is turned away at once, not at the timeout."""
    assert isinstance(parse(b"G"), Refused)
    assert isinstance(parse(b"PROXz"), Refused)
    assert isinstance(parse(b"\r\n\r\n\x01"), Refused)
    assert parse(b"") is NEED_MORE


def test_an_oversized_v2_header_is_refused_from_its_length_field():
    assert isinstance(parse(V2_SIGNATURE + b"\x21\x11\xff\xff"), Refused)
    biggest = v2_header(("10.0.0.1", 1), tlvs=((0xE0, bytes(MAX_V2_LENGTH - 12 - 3)),))
    assert len(biggest) == MAX_HEADER
    assert isinstance(parse(biggest), Header)


@given(st.binary(max_size=200))
def test_any_bytes_give_a_verdict_never_an_exception(data):
    result = parse(data)
    assert result is NEED_MORE or isinstance(result, Header | Refused)
    if isinstance(result, Header):
        assert 0 < result.length <= len(data)


@given(st.binary(max_size=120))
def test_any_bytes_after_a_signature_give_a_verdict(data):
    for prefix in (V2_SIGNATURE, b"PROXY ", V2_SIGNATURE + b"\x21\x11", V2_SIGNATURE + b"\x21\x21"):
        result = parse(prefix + data)
        assert result is NEED_MORE or isinstance(result, Header | Refused)


@given(
    st.ip_addresses(),
    st.integers(0, 65535),
    st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=4),
    st.binary(max_size=20),
)
def test_any_v2_header_reads_back(ip, port, tlvs, rest):
    """A header the writer makes, with any TLVs and any stream after it,
    reads back as what was written."""
    header = v2_header((str(ip), port), tlvs=tuple(tlvs))
    result = parse(header + rest)
    assert isinstance(result, Header)
    assert result.length == len(header)
    assert result.source is not None and result.source[1] == port
    assert result.tlvs == tuple(tlvs)


def test_unique_id_tlv_is_kept():
    header = v2_header(("10.0.0.1", 1), tlvs=((PP2_TYPE_UNIQUE_ID, b"abc"),))
    result = parse(header)
    assert isinstance(result, Header)
    assert result.tlvs == ((PP2_TYPE_UNIQUE_ID, b"abc"),)
