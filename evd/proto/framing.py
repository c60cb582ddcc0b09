"""The frame codec: bytes in, frames out, and frames back to bytes.

Why a length prefix
-------------------
TCP delivers a stream, not messages: one `recv` may hold half a request or
three and a half.  A delimiter would forbid its byte in a body or force an
escaping scheme; a length prefix does neither.  A frame is `H` (uint32,
big-endian), H bytes of UTF-8 JSON object header, then `header["len"]`
(default 0) bytes of body -- so the body is arbitrary binary, never
re-encoded, and the reader always knows how many bytes it still awaits.

Why the limits are checked before buffering
-------------------------------------------
Every length in a frame comes from the peer.  If the decoder waited for the
whole header before looking at H, a four-byte prefix claiming 4 GiB would make
us buffer whatever the peer cares to send.  So H is checked the moment its
four bytes arrive, and `len` the moment the header is parsed, before a single
body byte is awaited.  The decoder's user (the framed handler,
handlers/framed.py; the control connection, server/control/connection.py)
feeds it one recv's bytes and takes every whole frame before the next; when
it stops taking them (its output is above write_high, or a control request
is being carried out) it stops its transport reading too.  So a connection
never holds more than one recv chunk plus one legal frame (4 + max_header +
max_body bytes).

A violation is the remote's fault: `FrameError` (code "bad_frame") names the
exact problem so the server can send it back in its one error frame before
closing that connection.  The decoder is then dead -- a stream that has lost
frame sync cannot be resynchronised -- and repeats the same error.

Why sans-IO
-----------
Like h11, this module never touches a socket, a clock or a log.  `Decoder`
takes bytes (`feed`) and hands out frames (`next_frame`, None meaning "need
more data"); `encode` turns a header and body into bytes.  Every edge case --
a prefix split across reads, a frame fed one byte at a time, garbage -- is
therefore a plain unit test, and the same codec serves the server, the test
client and any tool.

Invariants:
- `_buf[_pos:]` is exactly the unconsumed input; `_pending` is the parsed
  header whose body is still awaited (None between frames).
- consumed bytes are dropped when they are more than half the buffer, so
  decoding is O(total bytes) however many frames arrive in one chunk.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from evd.loop.seams import Buffer

# The length prefix: a uint32, big-endian (network order), 4 bytes.
_PREFIX = struct.Struct(">I")
PREFIX_LEN = _PREFIX.size
_unpack_prefix = _PREFIX.unpack_from
_pack_prefix = _PREFIX.pack
# The smallest JSON object is "{}": anything shorter cannot be a header.
MIN_HEADER = 2
# Headers carry a few small fields (svc, id, a command's args).  64 KiB is
# generous for those yet bounds what one peer can make us buffer and parse.
MAX_HEADER = 65536
# Bodies are echo payloads and command stdin.  1 MiB covers interactive use;
# larger transfers belong to a protocol with streaming, not to one frame.
MAX_BODY = 1048576
# Consumed input is compacted away only once it is at least this large (and
# more than half the buffer): small frames then cost no memmove at all.
_COMPACT_MIN = 65536
# How much of a bad `len` value to quote back in the error message.
_QUOTE_MAX = 40

_JSON_TYPE = {
    dict: "object",
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}

Header = dict[str, Any]  # a JSON object: any JSON value under each key


class FrameError(Exception):
    """The peer sent something that is not a frame (remote's fault); str = why."""

    code = "bad_frame"


@dataclass(slots=True)
class Frame:
    header: Header
    body: bytes


class Decoder:
    """Turns a byte stream into `Frame`s; see the module docstring."""

    def __init__(self, max_header: int = MAX_HEADER, max_body: int = MAX_BODY):
        if not MIN_HEADER <= max_header <= 0xFFFFFFFF:
            raise ValueError(f"max_header must be in [{MIN_HEADER}, 2**32-1], got {max_header}")
        if max_body < 0:
            raise ValueError(f"max_body must be >= 0, got {max_body}")
        self.max_header = max_header
        self.max_body = max_body
        self._buf = bytearray()
        self._pos = 0  # read offset into _buf
        self._pending: Header | None = None  # parsed header awaiting its body
        self._header_len = 0  # its H, for `buffered`
        self._body_len = 0  # its body's length
        self._error: FrameError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as (part of) a frame."""
        n = len(self._buf) - self._pos
        if self._pending is not None:  # its prefix and header are consumed
            n += PREFIX_LEN + self._header_len
        return n

    def feed(self, data: bytes) -> None:
        """Append received bytes; cheap, no parsing happens here."""
        if self._error is not None:
            raise self._error.with_traceback(None)
        self._buf += data

    def next_frame(self) -> Frame | None:
        """Return one whole frame, or None if more data is needed.

        Raises FrameError if the input is not a frame; the decoder is then dead.
        """
        request = self.next_request()
        return None if request is None else Frame(request[0], bytes(request[1]))

    def frames(self) -> Iterator[Frame]:
        """Yield every whole frame currently buffered."""
        while (frame := self.next_frame()) is not None:
            yield frame

    def next_request(self) -> tuple[Header, bytes | bytearray] | None:
        """`next_frame` for the server's hot path: (header, body) with the
        body a bytes-like copy (bytearray), no Frame object, one call per
        frame whatever it takes to parse it."""
        if self._error is not None:
            raise self._error.with_traceback(None)
        try:
            buf, pos = self._buf, self._pos
            header = self._pending
            if header is None:
                # The prefix, checked before the header arrives.
                if len(buf) - pos < PREFIX_LEN:
                    return None
                (h,) = _unpack_prefix(buf, pos)
                if h < MIN_HEADER or h > self.max_header:
                    raise FrameError(_bad_header_length(h, self.max_header))
                start = pos + PREFIX_LEN
                if len(buf) - start < h:
                    return None
                header = _parse_header(buf[start : start + h])
                # The body length, checked before the body arrives.
                n = header.get("len", 0)
                if type(n) is not int or n < 0 or n > self.max_body:  # bool is refused
                    raise FrameError(_bad_len(n, self.max_body))
                pos = start + h
                if len(buf) - pos < n:  # the body is not all here yet
                    self._pos = pos
                    self._pending, self._header_len, self._body_len = header, h, n
                    return None
            else:
                n = self._body_len
                if len(buf) - pos < n:
                    return None
                self._pending = None
            end = pos + n
            body = buf[pos:end] if n else b""
            if end == len(buf):  # all consumed: reuse the buffer
                buf.clear()
                end = 0
            elif end >= _COMPACT_MIN and end * 2 > len(buf):
                del buf[:end]  # moves < end bytes: amortised O(1)
                end = 0
            self._pos = end
            return header, body
        except FrameError as e:
            self._error = e
            self._buf = bytearray()  # nothing here will ever be used
            self._pos = 0
            self._pending = None
            raise


def _bad_header_length(h: int, max_header: int) -> str:
    if h < MIN_HEADER:
        return f"header length {h} is below the minimum of {MIN_HEADER}"
    return f"header length {h} exceeds max_header {max_header}"


def _bad_len(n: object, max_body: int) -> str:
    if type(n) is int and n > max_body:
        return f"len {n} exceeds max_body {max_body}"
    if isinstance(n, dict | list):
        # Named, not quoted: dumping an array nested a thousand deep would
        # raise RecursionError here, and its first 40 brackets say nothing.
        return f"len must be a non-negative integer, got an {_JSON_TYPE[type(n)]}"
    quoted = json.dumps(n)
    if len(quoted) > _QUOTE_MAX:
        quoted = quoted[:_QUOTE_MAX] + "..."
    return f"len must be a non-negative integer, got {quoted}"


def _parse_header(raw: bytearray) -> Header:
    try:
        text = raw.decode("utf-8")  # json.loads(bytes) would guess UTF-16/32
    except UnicodeDecodeError:
        raise FrameError("header is not valid UTF-8") from None
    # The scanner directly when the text is one object and nothing else
    # (the common case); the full decoder, with its errors, otherwise.
    scan = _scan
    if scan is not None and text[:1] == "{":
        try:
            header, end = scan(text, 0)
        except (StopIteration, ValueError, RecursionError):
            pass
        else:
            if end == len(text) and type(header) is dict:
                return header
    try:
        header = _DECODER.decode(text)
    except json.JSONDecodeError as e:
        raise FrameError(f"header is not JSON: {e.msg} at char {e.pos}") from None
    except RecursionError:  # "[[[[..." deeper than the C stack allows
        raise FrameError("header is not JSON: nested too deeply") from None
    except _Refused as e:  # NaN, Infinity, 1e400
        raise FrameError(f"header is not JSON: {e}") from None
    except ValueError:  # int(): over sys.get_int_max_str_digits() digits
        raise FrameError("header is not JSON: a number has too many digits") from None
    if type(header) is not dict:
        raise FrameError(f"header is a JSON {_JSON_TYPE[type(header)]}, not an object")
    return header


class _Refused(ValueError):
    """A JSON value the protocol refuses; str() says which, in its words."""


def _reject_constant(name: str) -> None:
    raise _Refused(f"{name} is not allowed")


def _finite_float(text: str) -> float:
    """JSON numbers beyond a double (1e400) would parse as infinity, which
    no response could carry back: refused like NaN and Infinity."""
    value = float(text)
    if value in (math.inf, -math.inf):
        raise _Refused(f"number {text[:_QUOTE_MAX]} is out of range")
    return value


# Built once: json.loads/json.dumps with any keyword argument build a new
# decoder/encoder on every call, and even a kept JSONEncoder builds its C
# encoder on every encode(): together half the cost of a small frame.
# Headers are written as ASCII (non-ASCII as \u escapes): any string a
# client sent, lone surrogates included, goes back out as valid JSON.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False)
# The decoder's scanner, called directly to parse a header without the
# whitespace and "extra data" checks of decode(); undocumented, so None
# (decode() alone) on a Python that lacks it.
_scan: Callable[[str, int], tuple[Any, int]] | None = getattr(_DECODER, "scan_once", None)
_quote: Callable[[str], str] = json.encoder.encode_basestring_ascii


def build_dumps(c_make_encoder: Callable[..., Any] | None) -> Callable[[Header], str]:
    """`_ENCODER.encode`, minus its per-call cost where CPython allows.

    json.encoder.c_make_encoder (CPython's C encoder; an internal whose
    signature may change) is built once here and called directly.  Without
    it, or if building or probing it fails, the public encoder does the same
    work: a Python that changes the internal loses speed, never bytes."""
    if c_make_encoder is not None:
        try:
            encoder = c_make_encoder(None, _ENCODER.default, _quote, None, ":", ",", False, False, False)

            def dumps(obj: Header) -> str:
                return "".join(encoder(obj, 0))

            probe: Header = {"id": "\u00e9\ud800", "n": [1, 2.5, None, True], "o": {}}
            if dumps(probe) == _ENCODER.encode(probe):
                return dumps
        except Exception:  # a changed internal: fall through to the public API
            pass
    return _ENCODER.encode


_dumps = build_dumps(getattr(json.encoder, "c_make_encoder", None))


def ok_header(rid: Any, length: int) -> bytes:
    """Prefix and header of a plain success, `{"id":ID,"ok":true,"len":N}`:
    the same bytes as `encode_parts({"id": rid, "ok": True}, body)[0]`,
    formatted directly when the id is an int or a string (the usual ids)
    instead of through a dict and the encoder -- a fifth of a framed echo."""
    kind = type(rid)
    if kind is int:
        raw = b'{"id":%d,"ok":true,"len":%d}' % (rid, length)
    elif kind is str:
        raw = b'{"id":%s,"ok":true,"len":%d}' % (_quote(rid).encode(), length)
    else:
        raw = _dumps({"id": rid, "ok": True, "len": length}).encode()
    return _pack_prefix(len(raw)) + raw


def encode_parts(header: Header, body: Buffer = b"") -> tuple[bytes, Buffer]:
    """Return (prefix + header, body), the body uncopied; `len` is set in a copy.

    ValueError/TypeError (not JSON, NaN, too long) is a local bug, not the peer's.
    """
    raw = _dumps({**header, "len": len(body)}).encode()
    if len(raw) > 0xFFFFFFFF:
        raise ValueError(f"header of {len(raw)} bytes does not fit the uint32 prefix")
    return _PREFIX.pack(len(raw)) + raw, body


def encode(header: Header, body: bytes = b"") -> bytes:
    """Return one whole frame as bytes; see `encode_parts`."""
    head, _ = encode_parts(header, body)
    return head + body
