"""The raw services' logic, sans I/O: bytes and clocks in, bytes out.

Nothing here touches a socket, so each RFC's details are unit-tested
directly.  `handlers/raw.py` wraps these for streams; `net/listeners.py` calls the
`DATAGRAM` functions for UDP.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable

# RFC 868: seconds from 1900-01-01 to 1970-01-01.
RFC868_OFFSET = 2208988800
_U32 = struct.Struct("!I")

# RFC 867 suggests "Weekday, Month Day, Year Time-Zone".
DAYTIME_FORMAT = "%A, %B %d, %Y %H:%M:%S-%Z"

# timefmt: the format when the request is empty, and the longest format we
# accept (strftime output grows with its input; 256 matches framed `time`).
TIMEFMT_DEFAULT = "%Y-%m-%d %X"
TIMEFMT_MAX = 256
# UDP timefmt answers at most as many bytes as the request carried, or this
# many if the request was shorter: "%c" is 2 bytes and formats to 24, so
# uncapped, a spoofed source could aim ~12 times what it sent at a victim.
# 32 bytes still carry the default format (19) and "%c" whole; with the 28
# bytes of IPv4 and UDP headers on each datagram, no reply is more than
# about twice its request on the wire.
TIMEFMT_UDP_FLOOR = 32

# RFC 864: lines of 72 printable ASCII characters, each starting one further
# along the 95-character ring of codes 32..126.
CHARGEN_LINE = 72
_RING = bytes(range(32, 127))
CHARGEN_CYCLE = b"".join((_RING + _RING)[i : i + CHARGEN_LINE] + b"\r\n" for i in range(len(_RING)))
# What a TCP chargen writes per call: whole cycles (so every chunk ends where
# the next begins) adding up to about 64 KiB.
CHARGEN_BLOCK = CHARGEN_CYCLE * (65536 // len(CHARGEN_CYCLE))
_CHARGEN_LINE_BYTES = CHARGEN_LINE + 2


def rfc868(now: float) -> bytes:
    """4 bytes: seconds since 1900, unsigned big-endian, modulo 2**32."""
    return _U32.pack((int(now) + RFC868_OFFSET) & 0xFFFFFFFF)


def daytime(now: float) -> bytes:
    return time.strftime(DAYTIME_FORMAT, time.localtime(now)).encode("ascii", "replace") + b"\r\n"


def timefmt(request: bytes, now: float) -> bytes | None:
    """The local time formatted by `request` (strftime), or None if the
    request is not a usable format (too long, not UTF-8, a NUL byte)."""
    if len(request) > TIMEFMT_MAX:
        return None
    try:
        fmt = request.decode("utf-8")
        if not fmt:
            fmt = TIMEFMT_DEFAULT
        return time.strftime(fmt, time.localtime(now)).encode("utf-8", "replace")
    except (UnicodeDecodeError, ValueError):
        return None


def chargen_line(n: int) -> bytes:
    """The n-th line of the pattern (n counts from 0, wraps at 95)."""
    start = (n % len(_RING)) * _CHARGEN_LINE_BYTES
    return CHARGEN_CYCLE[start : start + _CHARGEN_LINE_BYTES]


class DatagramChargen:
    """UDP chargen: one 74-byte line per datagram, the next line each time.
    (RFC 864 allows 0-512 characters; one line keeps amplification at ~74:1
    for an empty datagram -- which is why it is off by default.)"""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, payload: bytes) -> bytes:
        line = chargen_line(self.n)
        self.n += 1
        return line


class DatagramEcho:
    """UDP echo: `echoes` tells the endpoint it may answer each datagram from
    its receive buffer without calling this at all."""

    echoes = True

    def __call__(self, payload: bytes) -> bytes:
        return payload


datagram_echo = DatagramEcho()


def datagram_discard(payload: bytes) -> None:
    return None


def datagram_daytime(payload: bytes) -> bytes:
    return daytime(time.time())


def datagram_time(payload: bytes) -> bytes:
    return rfc868(time.time())


def datagram_timefmt(payload: bytes) -> bytes | None:
    reply = timefmt(payload.rstrip(b"\r\n"), time.time())
    cap = max(len(payload), TIMEFMT_UDP_FLOOR)
    if reply is None or len(reply) <= cap:
        return reply
    # Cut at a character boundary: a UTF-8 continuation byte (0b10xxxxxx)
    # at the cut means the character before it is cut in half.
    while cap and reply[cap] & 0xC0 == 0x80:
        cap -= 1
    return reply[:cap]


DatagramHandler = Callable[[bytes], bytes | None]


def datagram_handler(service: str) -> DatagramHandler:
    """The function answering one datagram for `service`: payload -> reply
    bytes, or None for no reply.  (The clock is read only by the services
    that tell the time, not on the echo path.)"""
    if service == "chargen":
        return DatagramChargen()
    return _DATAGRAM[service]


_DATAGRAM: dict[str, DatagramHandler] = {
    "echo": datagram_echo,
    "discard": datagram_discard,
    "daytime": datagram_daytime,
    "time": datagram_time,
    "timefmt": datagram_timefmt,
}
