"""The PROXY protocol's header (HAProxy's proxy-protocol.txt, v1 and v2), sans-IO.

A proxy in front of evd (HAProxy `send-proxy`/`send-proxy-v2`, nginx
`proxy_protocol on`, a cloud load balancer) begins each connection with one
header that names the client it accepted.  This module reads that header and
nothing else: `parse(data)` takes the bytes received so far and answers

    a `Header`     -- complete; `length` bytes of `data` were the header,
                      whatever follows is the proxied stream's own first bytes
    NEED_MORE      -- a prefix of a header that may still become valid
    a `Refused`    -- not a header we accept (the peer's fault), with why

and never raises, whatever the bytes (a property test holds it to that).  It
keeps no state: the caller keeps the bytes (at most MAX_HEADER of them) and
asks again when more arrive, as h11 re-reads its buffer.  Both versions are
accepted on one listener: the first byte tells them apart ("P" or "\\r").

A refusal comes as early as the bytes allow -- the first byte that cannot
start either header, a v1 line past its longest legal length, a v2 length
field past our bound -- so a peer that is not speaking the protocol is
turned away at once rather than at the timeout.

`Header.local` is a connection of the proxy's own (v2 `LOCAL`, v1 `PROXY
UNKNOWN`: health checks): no client is named, and the caller serves it as a
connection from the proxy itself.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from socket import inet_ntoa
from typing import Final, NamedTuple

# -- limits, with the reasoning for each ----------------------------------------

# v1: the spec's longest line, "PROXY UNKNOWN" with two full IPv6 addresses
# and ports, CRLF included.  A receiver must read at most this far for CRLF.
MAX_V1 = 107
# v2: 16 fixed bytes, then `length` bytes of addresses and TLVs.  Addresses
# take at most 216 bytes (AF_UNIX); the TLVs proxies send (ALPN, authority
# i.e. SNI up to 255, unique id up to 128, SSL version/cipher/CN, a cloud's
# endpoint id) fit in a few hundred more.  4 KiB leaves room for all of them
# and keeps what one not-yet-admitted connection may make us hold small; the
# protocol itself would allow 64 KiB.
MAX_V2_LENGTH = 4096
V2_FIXED = 16
# The most bytes the caller ever needs to hold before a verdict.
MAX_HEADER = V2_FIXED + MAX_V2_LENGTH

V1_PREFIX: Final = b"PROXY "
_NOT_PRINTABLE = re.compile(rb"[^\x20-\x7e]")  # a v1 line is printable ASCII
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"

# v2 byte 13: version (high nibble, 2) and command (low nibble).
V2_LOCAL = 0x0
V2_PROXY = 0x1
# v2 byte 14: address family (high nibble) and transport (low nibble); the
# two a stream service can be told about: TCP over IPv4 and over IPv6.
TCP4 = 0x11
TCP6 = 0x21
# A v2 PROXY header for TCP over IPv4 without TLVs: 16 fixed bytes (the
# length field says 12: two addresses of 4 bytes and two ports), 28 in all.
_V2_TCP4_NO_TLVS = V2_SIGNATURE + bytes([0x20 | V2_PROXY, TCP4, 0, 12])
V2_TCP4_LENGTH = V2_FIXED + 12
_ADDRESSES = {TCP4: (socket.AF_INET, 4), TCP6: (socket.AF_INET6, 16)}  # family, address size

# TLV types (section 2.2), for callers that want them.
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20


class Header(NamedTuple):
    """A complete header: who the client is, and how long the header was.
    (A named tuple, not a dataclass: one is made per proxied connection,
    and a tuple is made several times faster.)"""

    version: int  # 1 or 2
    length: int  # bytes of the input that were the header
    local: bool = False  # the proxy's own connection (v2 LOCAL, v1 UNKNOWN): no client named
    source: tuple[str, int] | None = None  # the client: (IP as text, port)
    destination: tuple[str, int] | None = None  # the address the client connected to
    tlvs: tuple[tuple[int, bytes], ...] = ()  # v2: (type, value), in order


@dataclass(frozen=True, slots=True)
class Refused:
    """Not a header we accept: `reason` says what was wrong (the peer's fault)."""

    reason: str


class NeedMore:
    """The input so far is a prefix of a header that may still be valid."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_MORE"


NEED_MORE: Final = NeedMore()

Result = Header | NeedMore | Refused


def parse(data: bytes | bytearray | memoryview) -> Result:
    """The verdict on the bytes a proxied connection has sent so far."""
    head = bytes(data[:V2_TCP4_LENGTH])
    if len(head) == V2_TCP4_LENGTH and head[:16] == _V2_TCP4_NO_TLVS:
        # The common case, what HAProxy's send-proxy-v2 sends for an IPv4
        # client without TLVs: 28 bytes, read without the general path.
        return Header(
            2,
            V2_TCP4_LENGTH,
            False,
            (inet_ntoa(head[16:20]), (head[24] << 8) | head[25]),
            (inet_ntoa(head[20:24]), (head[26] << 8) | head[27]),
            (),
        )
    data = bytes(data[:MAX_HEADER])
    if not data:
        return NEED_MORE
    if data[0] == V1_PREFIX[0]:
        return _v1(data)
    if data[0] == V2_SIGNATURE[0]:
        return _v2(data)
    return Refused("no PROXY header")


# -- version 1: one text line ------------------------------------------------------


def _v1(data: bytes) -> Result:
    end = data.find(b"\r\n", 0, MAX_V1)
    line = data[: MAX_V1 if end < 0 else end]
    if end < 0 and line.endswith(b"\r") and len(line) == len(data):
        line = line[:-1]  # the CR of a CRLF still to come
    if not V1_PREFIX.startswith(line[:6]):
        return Refused("no PROXY header")
    if _NOT_PRINTABLE.search(line):
        return Refused("v1: not a line of printable ASCII")
    if end < 0:
        if len(data) >= MAX_V1:
            return Refused(f"v1: no CRLF within {MAX_V1} bytes")
        return NEED_MORE
    length = end + 2
    fields = line.split(b" ")
    if len(fields) < 2 or fields[0] != b"PROXY":
        return Refused("v1: malformed")
    if fields[1] == b"UNKNOWN":  # the rest of the line is to be ignored
        return Header(1, length, local=True)
    if fields[1] not in (b"TCP4", b"TCP6") or len(fields) != 6:
        return Refused("v1: malformed")
    version = 4 if fields[1] == b"TCP4" else 6
    source = _v1_endpoint(fields[2], fields[4], version)
    destination = _v1_endpoint(fields[3], fields[5], version)
    if source is None or destination is None:
        return Refused(f"v1: bad TCP{version} address or port")
    return Header(1, length, source=source, destination=destination)


def _v1_endpoint(address: bytes, port: bytes, version: int) -> tuple[str, int] | None:
    """(canonical IP text, port), or None: an address of the wrong family, a
    port out of range or written with a sign or a leading zero.  inet_pton
    is the strict reader (no leading zeros in IPv4, no IPv6 scope id) and
    is many times cheaper than the ipaddress module."""
    if not port.isdigit() or len(port) > 5 or (len(port) > 1 and port[0] == 0x30):
        return None  # "0" itself is a port; "080" and "+80" are not
    number = int(port)
    if number > 65535 or b"%" in address:  # a scope id names the proxy's interface, not a client
        return None
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    try:
        text = socket.inet_ntop(family, socket.inet_pton(family, address.decode("ascii")))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return (_folded(text) if version == 6 else text), number


def _folded(text: str) -> str:
    """inet_ntop's text (already canonical), an IPv4-mapped IPv6 address
    as its IPv4 form."""
    if text.startswith("::ffff:") and "." in text:
        return text[7:]
    return text


# -- version 2: binary -------------------------------------------------------------


def _v2(data: bytes) -> Result:
    head = data[: len(V2_SIGNATURE)]
    if head != V2_SIGNATURE[: len(head)]:
        return Refused("no PROXY header")
    if len(data) < V2_FIXED:
        return NEED_MORE
    if data[12] >> 4 != 2:
        return Refused(f"v2: unsupported version {data[12] >> 4}")
    command = data[12] & 0x0F
    if command not in (V2_LOCAL, V2_PROXY):
        return Refused(f"v2: unsupported command {command}")
    family = data[13]
    size = int.from_bytes(data[14:16], "big")
    if size > MAX_V2_LENGTH:
        return Refused(f"v2: header of {V2_FIXED + size} bytes, more than {MAX_HEADER}")
    length = V2_FIXED + size
    if len(data) < length:
        return NEED_MORE
    if command == V2_LOCAL:  # addresses and TLVs are to be ignored
        return Header(2, length, local=True)
    if family not in _ADDRESSES:
        return Refused(f"v2: unsupported address family 0x{family:02x}")
    af, width = _ADDRESSES[family]
    body = data[V2_FIXED:length]
    if size < 2 * width + 4:
        return Refused(f"v2: address block of {size} bytes, too short for its family")
    tlvs = _tlvs(body[2 * width + 4 :])
    if tlvs is None:
        return Refused("v2: truncated TLV block")
    ports = 2 * width
    source = (_folded(socket.inet_ntop(af, body[:width])), int.from_bytes(body[ports : ports + 2], "big"))
    destination = (
        _folded(socket.inet_ntop(af, body[width:ports])),
        int.from_bytes(body[ports + 2 : ports + 4], "big"),
    )
    return Header(2, length, source=source, destination=destination, tlvs=tlvs)


def _tlvs(block: bytes) -> tuple[tuple[int, bytes], ...] | None:
    """The TLVs after the addresses, or None if one runs past the block."""
    found = []
    at = 0
    while at < len(block):
        if at + 3 > len(block):
            return None
        size = int.from_bytes(block[at + 1 : at + 3], "big")
        if at + 3 + size > len(block):
            return None
        found.append((block[at], block[at + 3 : at + 3 + size]))
        at += 3 + size
    return tuple(found)


# -- writing (the benchmark's generator and the tests speak as a proxy) ---------------


def v1_header(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A v1 line for a TCP connection from `source` to `destination`."""
    version = ipaddress.ip_address(source[0]).version
    return b"PROXY TCP%d %s %s %d %d\r\n" % (
        version,
        source[0].encode(),
        destination[0].encode(),
        source[1],
        destination[1],
    )


def v2_header(
    source: tuple[str, int] | None,
    destination: tuple[str, int] | None = None,
    tlvs: tuple[tuple[int, bytes], ...] = (),
) -> bytes:
    """A v2 header: PROXY for a TCP connection from `source` to
    `destination` (default: the same family's unspecified address, port 0),
    or LOCAL when `source` is None."""
    extra = b"".join(bytes([kind]) + len(value).to_bytes(2, "big") + value for kind, value in tlvs)
    if source is None:
        return V2_SIGNATURE + bytes([0x20 | V2_LOCAL, 0x00]) + len(extra).to_bytes(2, "big") + extra
    ip = ipaddress.ip_address(source[0])
    family = TCP4 if ip.version == 4 else TCP6
    dst = destination or ("0.0.0.0" if ip.version == 4 else "::", 0)
    body = (
        ip.packed
        + ipaddress.ip_address(dst[0]).packed
        + source[1].to_bytes(2, "big")
        + dst[1].to_bytes(2, "big")
        + extra
    )
    return V2_SIGNATURE + bytes([0x20 | V2_PROXY, family]) + len(body).to_bytes(2, "big") + body
