"""Unit tests of the sans-IO frame codec: no sockets anywhere."""

import itertools
import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evd.proto.framing import (
    MAX_BODY,
    MAX_HEADER,
    Decoder,
    Frame,
    FrameError,
    encode,
    encode_parts,
    ok_header,
)

FEW = settings(max_examples=200, deadline=None)


def raw_frame(header_bytes: bytes, body: bytes = b"") -> bytes:
    """A frame built by hand, bypassing `encode`, so it can be wrong."""
    return struct.pack(">I", len(header_bytes)) + header_bytes + body


def decode(chunks, **limits) -> tuple[list[Frame], Decoder]:
    d = Decoder(**limits)
    out = []
    for chunk in chunks:
        d.feed(chunk)
        out.extend(d.frames())
    return out, d


def bad_frame(stream: bytes, **limits) -> FrameError:
    d = Decoder(**limits)
    d.feed(stream)
    with pytest.raises(FrameError) as info:
        d.next_frame()
    assert info.value.code == "bad_frame"
    return info.value


FRAMES = [
    ({"svc": "echo", "id": 1}, b"hello"),
    ({}, b""),
    ({"svc": "time", "fmt": "%H"}, b""),
    ({"id": "x"}, bytes(range(256))),
]
STREAM = b"".join(encode(h, b) for h, b in FRAMES)
EXPECTED = [Frame({**h, "len": len(b)}, b) for h, b in FRAMES]


# --- the three ways of feeding (h11) -------------------------------------------


def test_all_at_once():
    frames, d = decode([STREAM])
    assert frames == EXPECTED
    assert d.buffered == 0


def test_one_byte_at_a_time():
    frames, d = decode([STREAM[i : i + 1] for i in range(len(STREAM))])
    assert frames == EXPECTED
    assert d.buffered == 0


@pytest.mark.parametrize("cut", [1, 3, 4, 5, 12, len(encode({"a": 1}, b"xyz")) - 1])
def test_trailing_partial_frame_stays_buffered(cut):
    partial = encode({"a": 1}, b"xyz")[:cut]
    frames, d = decode([STREAM + partial])
    assert frames == EXPECTED
    assert d.buffered == cut
    assert d.next_frame() is None
    d.feed(encode({"a": 1}, b"xyz")[cut:])
    assert d.next_frame() == Frame({"a": 1, "len": 3}, b"xyz")
    assert d.buffered == 0


def test_need_more_data_returns_none():
    d = Decoder()
    assert d.next_frame() is None
    d.feed(b"\x00\x00")
    assert d.next_frame() is None
    assert d.buffered == 2


def test_len_defaults_to_zero_and_header_is_kept_as_sent():
    frames, _ = decode([raw_frame(b'{"svc":"stats"}') + raw_frame(b"{}")])
    assert frames == [Frame({"svc": "stats"}, b""), Frame({}, b"")]


def test_body_is_arbitrary_binary_including_fake_prefixes():
    # A body that looks like a prefix + header of another frame must stay body.
    body = raw_frame(b'{"len":3}', b"abc") + b"\x00\x00\x00\x00\xff\xff\xff\xff" + bytes(range(256))
    frames, _ = decode([encode({"svc": "echo"}, body) + encode({"n": 2})])
    assert frames == [Frame({"svc": "echo", "len": len(body)}, body), Frame({"n": 2, "len": 0}, b"")]


# --- every bad_frame case -------------------------------------------------------


@pytest.mark.parametrize("h", [0, 1])
def test_header_length_below_minimum(h):
    err = bad_frame(struct.pack(">I", h) + b"{}")
    assert str(err) == f"header length {h} is below the minimum of 2"


def test_header_length_over_limit_raises_on_the_prefix_alone():
    d = Decoder()
    d.feed(struct.pack(">I", 0xFFFFFFFF))  # claims 4 GiB; only 4 bytes fed
    with pytest.raises(FrameError, match=r"^header length 4294967295 exceeds max_header 65536$"):
        d.next_frame()
    err = bad_frame(struct.pack(">I", 70000))
    assert str(err) == "header length 70000 exceeds max_header 65536"


def test_header_length_limit_is_configurable_and_inclusive():
    header = b'{"a":"' + b"x" * 10 + b'"}'
    assert decode([raw_frame(header)], max_header=len(header))[0] == [Frame({"a": "x" * 10}, b"")]
    err = bad_frame(raw_frame(header), max_header=len(header) - 1)
    assert str(err) == f"header length {len(header)} exceeds max_header {len(header) - 1}"


@pytest.mark.parametrize(
    "header, reason",
    [
        (b"\xff\xfe", "header is not valid UTF-8"),
        (b'{"a":"\xc3"}', "header is not valid UTF-8"),
        (b"\x00{", "header is not JSON: Expecting value at char 0"),
        (b"hello", "header is not JSON: Expecting value at char 0"),
        (b'{"a":1', "header is not JSON: Expecting ',' delimiter at char 6"),
        (b"{} {}", "header is not JSON: Extra data at char 3"),
        (b'{"a":NaN}', "header is not JSON: NaN is not allowed"),
        (b"[" * 5000, "header is not JSON: nested too deeply"),
        (b"[1,2]", "header is a JSON array, not an object"),
        (b'"{}"', "header is a JSON string, not an object"),
        (b"42", "header is a JSON number, not an object"),
        (b"true", "header is a JSON boolean, not an object"),
        (b"null", "header is a JSON null, not an object"),
    ],
)
def test_header_not_a_json_object(header, reason):
    err = bad_frame(raw_frame(header))
    if reason is None:
        assert str(err).startswith("header is not JSON: ")
    else:
        assert str(err) == reason


@pytest.mark.parametrize(
    "value, shown",
    [
        ("-1", "-1"),
        ("1.5", "1.5"),
        ("3.0", "3.0"),
        ("true", "true"),
        ("false", "false"),
        ('"5"', '"5"'),
        ("null", "null"),
        ("[1]", "an array"),
    ],
)
def test_len_must_be_a_non_negative_integer(value, shown):
    err = bad_frame(raw_frame(b'{"len":' + value.encode() + b"}"))
    assert str(err) == f"len must be a non-negative integer, got {shown}"


def test_bad_len_quote_is_truncated():
    err = bad_frame(raw_frame(json.dumps({"len": "x" * 1000}).encode()))
    assert len(str(err)) < 100 and str(err).endswith("...")


def test_len_over_max_body_raises_before_the_body_arrives():
    err = bad_frame(raw_frame(b'{"len":2000000}'))  # no body bytes fed at all
    assert str(err) == "len 2000000 exceeds max_body 1048576"
    assert decode([encode({}, b"abc")], max_body=3)[0] == [Frame({"len": 3}, b"abc")]
    assert str(bad_frame(encode({}, b"abcd"), max_body=3)) == "len 4 exceeds max_body 3"


def test_decoder_stays_dead_after_an_error():
    d = Decoder()
    d.feed(encode({"ok": 1}) + raw_frame(b"[]") + encode({"ok": 2}))
    assert d.next_frame() == Frame({"ok": 1, "len": 0}, b"")
    with pytest.raises(FrameError) as first:
        d.next_frame()
    assert d.buffered == 0  # the rest of the stream is dropped
    for call in (d.next_frame, lambda: list(d.frames()), lambda: d.feed(encode({"ok": 3}))):
        with pytest.raises(FrameError) as again:
            call()
        assert again.value is first.value
    assert str(first.value) == "header is a JSON array, not an object"


def test_invalid_limits_are_rejected():
    with pytest.raises(ValueError):
        Decoder(max_header=1)
    with pytest.raises(ValueError):
        Decoder(max_body=-1)


# --- encoding -------------------------------------------------------------------


def test_encode_is_compact_ascii_json_and_does_not_mutate_the_header():
    header = {"svc": "echo", "note": "héllo ✓", "len": 99}
    data = encode(header, b"body")
    raw = b'{"svc":"echo","note":"h\\u00e9llo \\u2713","len":4}'
    assert data == struct.pack(">I", len(raw)) + raw + b"body"
    assert json.loads(raw) == {**header, "len": 4}
    assert header["len"] == 99


def test_any_string_a_peer_sent_encodes_back_even_a_lone_surrogate():
    # JSON allows "\ud800"; Python parses it to a str no UTF-8 encoder takes.
    (frame,), _ = decode([raw_frame(b'{"id":"\\ud800"}')])
    assert frame.header == {"id": "\ud800"}
    head, _ = encode_parts(frame.header)
    assert json.loads(head[4:]) == {"id": "\ud800", "len": 0}
    assert json.loads(ok_header("\ud800", 3)[4:]) == {"id": "\ud800", "ok": True, "len": 3}


def test_a_number_beyond_a_double_is_not_a_header():
    # It would parse as infinity, which no response can carry back.
    with pytest.raises(FrameError, match=r"not JSON.*out of range"):
        decode([raw_frame(b'{"id":1e400}')])
    (frame,), _ = decode([raw_frame(b'{"id":1e300}')])
    assert frame.header == {"id": 1e300}


json_scalars = (
    st.none() | st.booleans() | st.integers() | st.text() | st.floats(allow_nan=False, allow_infinity=False)
)


@FEW
@given(json_scalars, st.integers(min_value=0, max_value=0xFFFFFFFF))
def test_ok_header_is_the_encoders_header(rid, length):
    class Sized:  # a body of any length without the bytes
        def __len__(self):
            return length

    assert ok_header(rid, length) == encode_parts({"id": rid, "ok": True}, Sized())[0]


def test_encode_parts_passes_the_body_through():
    body = bytearray(b"big body")
    head, out = encode_parts({"id": 7}, body)
    assert out is body
    assert head + out == encode({"id": 7}, bytes(body))


def test_encode_refuses_what_a_peer_would_reject():
    with pytest.raises(ValueError):
        encode({"x": float("nan")})
    with pytest.raises(TypeError):
        encode({"x": object()})


def test_defaults():
    d = Decoder()
    assert (d.max_header, d.max_body) == (MAX_HEADER, MAX_BODY) == (65536, 1048576)


def test_ten_thousand_frames_in_one_chunk():
    # Correctness of a large pipelined batch; it also guards against quadratic
    # consumption (re-slicing the buffer per frame would make this take minutes).
    stream = b"".join(encode({"id": i}, str(i).encode()) for i in range(10_000))
    frames, d = decode([stream])
    assert [f.header["id"] for f in frames] == list(range(10_000))
    assert all(f.body == str(i).encode() for i, f in enumerate(frames))
    assert d.buffered == 0


def test_consumed_input_is_released():
    # A steady stream that never ends on a frame boundary (every feed holds the
    # tail of one frame and the head of the next) must not grow the buffer
    # without bound: consumed bytes are compacted away.  Peeks at `_buf`.
    frame = encode({"svc": "echo"}, b"x" * 1000)
    half = len(frame) // 2
    d = Decoder()
    d.feed(frame[:half])
    for _ in range(2000):  # ~2 MB through the decoder
        d.feed(frame[half:] + frame[:half])
        assert [f.body for f in d.frames()] == [b"x" * 1000]
    assert d.buffered == half
    assert len(d._buf) < 4 * 65536


# --- properties -----------------------------------------------------------------

scalars = (
    st.none() | st.booleans() | st.integers() | st.text() | st.floats(allow_nan=False, allow_infinity=False)
)
headers = st.dictionaries(st.text(max_size=8).filter(lambda k: k != "len"), scalars, max_size=6)
frame_lists = st.lists(st.tuples(headers, st.binary(max_size=300)), max_size=8)


def split(data: st.DataObject, stream: bytes) -> list[bytes]:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    edges = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(edges)]


@FEW
@given(frame_lists, st.data())
def test_any_split_decodes_to_the_same_frames(frames, data):
    stream = b"".join(encode(h, b) for h, b in frames)
    decoded, d = decode(split(data, stream))
    assert decoded == [Frame({**h, "len": len(b)}, b) for h, b in frames]
    assert d.buffered == 0


@FEW
@given(st.binary(max_size=2000), st.data())
def test_garbage_raises_only_frame_error(garbage, data):
    # Small limits so random prefixes sometimes pass the length checks.
    d = Decoder(max_header=64, max_body=64)
    try:
        for chunk in split(data, garbage):
            d.feed(chunk)
            for frame in d.frames():
                assert isinstance(frame.header, dict) and isinstance(frame.body, bytes)
    except FrameError as e:
        assert e.code == "bad_frame" and str(e)


@FEW
@given(st.dictionaries(st.text(), st.text() | st.lists(st.text(), max_size=3), max_size=5), st.binary())
def test_round_trip_with_unicode(header, body):
    frames, _d = decode([encode(header, body)])
    assert frames == [Frame({**header, "len": len(body)}, body)]


# --- issue 9: depth, Python's words, the encoder's fallback -----------------------


def test_deeply_nested_len_is_a_bad_frame_at_any_depth():
    # `len` nested just short of what the parser takes used to reach
    # json.dumps in the error message and raise RecursionError instead.  The
    # depth at which parsing gives up depends on the stack, so try them all.
    for depth in range(900, 1001, 3):
        header = b'{"svc":"echo","len":' + b"[" * depth + b"]" * depth + b"}"
        err = bad_frame(raw_frame(header))  # a FrameError, never RecursionError
        assert str(err).startswith(("len must be a non-negative integer, got ", "header is not JSON: ")), (
            depth
        )


def test_bad_len_names_containers_by_their_json_type():
    assert (
        str(bad_frame(raw_frame(b'{"len":{"a":[1]}}'))) == "len must be a non-negative integer, got an object"
    )
    assert str(bad_frame(raw_frame(b'{"len":[]}'))) == "len must be a non-negative integer, got an array"


def test_an_overlong_integer_is_named_without_pythons_words():
    err = bad_frame(raw_frame(b'{"a":' + b"9" * 5000 + b"}"))
    assert str(err) == "header is not JSON: a number has too many digits"


def test_the_public_encoder_fallback_gives_the_same_bytes(monkeypatch):
    # framing.py formats headers with json.encoder.c_make_encoder, a CPython
    # internal; without it (another Python, or a changed signature) the
    # public JSONEncoder must do, byte for byte.
    from evd.proto import framing

    fast = framing.build_dumps(json.encoder.c_make_encoder)
    slow = framing.build_dumps(None)
    broken = framing.build_dumps(lambda *args: 1 / 0)  # a changed internal
    samples = [
        {"id": 1, "ok": True, "len": 3},
        {"id": "\ud800 é", "ok": False, "error": {"code": "x", "message": "y"}},
        {"id": None, "epoch": 1.5, "rfc868": 7, "list": [1, "a", None]},
    ]
    for sample in samples:
        assert fast(sample) == slow(sample) == broken(sample) == json.dumps(sample, separators=(",", ":"))
    monkeypatch.setattr(framing, "_dumps", slow)
    assert json.loads(framing.encode({"a": [1, 2]})[4:]) == {"a": [1, 2], "len": 0}
    assert json.loads(framing.ok_header(1.5, 9)[4:]) == {"id": 1.5, "ok": True, "len": 9}
    with pytest.raises(ValueError):
        framing.encode({"x": float("nan")})


def test_the_public_decoder_fallback_parses_the_same(monkeypatch):
    # scan_once (the C scanner, called directly) is not documented either.
    from evd.proto import framing

    monkeypatch.setattr(framing, "_scan", None)
    frames, _ = decode([STREAM])
    assert frames == EXPECTED
    assert str(bad_frame(raw_frame(b"[1]"))) == "header is a JSON array, not an object"
