"""Every parser that meets untrusted bytes, under hypothesis: any input
gets an answer or a clean refusal, never an exception (issue 23, fuzzing).

- the frame decoder and the framed session, one request after another;
- the control protocol's request check, and its handler on a socketpair;
- the HTTP request side of /metrics, its handler on a socketpair;
- the log reader: the cutter, `summary` (fast and general path) and `show`;
- the TOML loader with drop-ins.

Sized to run in a few seconds in all (`FEW`).  The longer campaign, with
coverage-guided atheris, is bench/fuzz.py (docs/design/fuzzing.md)."""

from __future__ import annotations

import itertools
import json
import re
import socket
import string
import tomllib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.transport import Loop, make_service

from evd.config import loader
from evd.config.model import Config, ConfigError
from evd.loop.seams import Reason
from evd.net.transport import StreamTransport
from evd.proto.control import BAD_REQUEST, UNKNOWN_COMMAND, Answer, Request
from evd.proto.framing import Decoder, FrameError, encode
from evd.proto.rules import rules_for
from evd.proto.session import AuthFail, AuthOk, Close, Echo, Failure, Reply, Session, Start, Stats
from evd.server.control.connection import Control
from evd.server.control.verbs import parse
from evd.server.metrics.http import Scrape
from evd.tools.logs import reading
from evd.tools.logs.events import ts_key
from evd.tools.logs.show import Options, Selector
from evd.tools.logs.summary import Summary

FEW = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def chunks(data: st.DataObject, stream: bytes) -> list[bytes]:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    edges = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(edges)]


# -- the framed port: decoder, then session ---------------------------------------

FIELDS = st.sampled_from(["svc", "id", "name", "args", "fmt", "tz", "mac", "key", "len"])
SERVICES = st.sampled_from(["echo", "time", "command", "stats", "auth", "nosuch"])
framed_headers = st.dictionaries(FIELDS | st.text(max_size=4), json_values | SERVICES, max_size=5)
framed_stream = st.lists(
    st.tuples(framed_headers, st.binary(max_size=40)).map(lambda hb: encode(*hb)) | st.binary(max_size=24),
    max_size=5,
).map(b"".join)


@FEW
@given(framed_stream, st.data())
def test_framed_bytes_get_actions_or_a_frame_error(stream, data):
    rules = rules_for(loader.parse("[commands.greet]\nargv = ['echo', 'hello']\nargs = true\n"), {})
    session = Session(rules, bytes(32))
    decoder = Decoder(max_header=512, max_body=256)
    try:
        for chunk in chunks(data, stream):
            decoder.feed(chunk)
            while (request := decoder.next_request()) is not None:
                action, *events = session.receive(*request, 1e9)
                assert type(action) in (Reply, Echo, Failure, Start, Stats)
                assert all(type(e) in (AuthOk, AuthFail, Close) for e in events)
    except FrameError as exc:
        assert exc.code == "bad_frame" and str(exc)


# -- the control protocol ------------------------------------------------------------

control_headers = st.dictionaries(
    st.sampled_from(["cmd", "args", "len", "x"]),
    json_values | st.sampled_from(["info", "conns", "kill", "set", "reload"]),
    max_size=3,
)


@FEW
@given(control_headers)
def test_any_control_header_is_a_request_or_a_refusal(header):
    request = parse(header)
    if isinstance(request, Answer):
        assert not request.ok and request.code in (BAD_REQUEST, UNKNOWN_COMMAND) and request.message
    else:
        assert isinstance(request, Request) and all(isinstance(a, str) for a in request.args)


def serve(handler, stream: list[bytes], limit: float = 5.0) -> tuple[bytes, list[str]]:
    """`handler` on a real socketpair in a real loop: the client sends
    `stream`, then its EOF, and reads everything until the server closes.
    What the client read, and why the server closed (connection_lost)."""
    loop = Loop()
    service = make_service(loop.reactor, "fuzz")
    server, client = socket.socketpair()
    client.setblocking(False)
    got, lost = bytearray(), []
    handler.lost = lost
    assert service.admit(None, 0, loop.reactor.now) is None
    transport = StreamTransport(loop.reactor, server, handler, service, host=None)
    transport.start(service.opened(transport))
    out = memoryview(b"".join(stream))

    def write() -> None:
        nonlocal out
        try:
            out = out[client.send(out) :]
        except BlockingIOError:
            return
        except OSError:  # the server closed first: it refused what came
            out = out[:0]
        if not out:
            loop.reactor.remove_writer(client.fileno())
            client.shutdown(socket.SHUT_WR)

    def read() -> None:
        try:
            data = client.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            got.extend(data)
        else:
            loop.reactor.remove_reader(client.fileno())
            lost.append("client saw the end")

    loop.reactor.add_writer(client.fileno(), write)
    loop.reactor.add_reader(client.fileno(), read)
    try:
        loop.run_until(lambda: "client saw the end" in lost and len(lost) > 1, limit)
    finally:
        if out:
            loop.reactor.remove_writer(client.fileno())
        client.close()
        if not transport.closed:
            transport.close(Reason.SHUTDOWN)
    return bytes(got), [r for r in lost if r != "client saw the end"]


class Backend:
    def handle(self, request: Request, reply) -> None:
        reply(
            Answer.done({"command": request.command}) if request.command != "kill" else Answer.refused("no")
        )


class RecordingControl(Control):
    def connection_lost(self, reason: str) -> None:
        self.lost.append(reason)
        super().connection_lost(reason)


control_stream = st.lists(
    st.tuples(control_headers, st.binary(max_size=8)).map(lambda hb: encode(*hb)) | st.binary(max_size=16),
    max_size=4,
)


@FEW
@given(control_stream, st.data())
def test_the_control_handler_answers_or_refuses_any_bytes(stream, data):
    sent, lost = serve(RecordingControl(Backend()), chunks(data, b"".join(stream)))
    assert lost and lost[0] in (Reason.EOF, Reason.BAD_FRAME), lost
    decoder = Decoder(max_header=1 << 16, max_body=1 << 16)
    decoder.feed(sent)
    for frame in decoder.frames():  # every answer a whole frame the client can read
        answer = Answer.from_wire(frame.header, json.loads(frame.body) if frame.body else None)
        assert answer.ok or answer.message


# -- the HTTP request side of /metrics ------------------------------------------------


class Figures:
    def scrape(self, done) -> None:
        done({})


class RecordingScrape(Scrape):
    def connection_lost(self, reason: str) -> None:
        self.lost.append(reason)
        super().connection_lost(reason)


HTTP_PIECES = st.sampled_from(
    [
        b"GET /metrics HTTP/1.1\r\n",
        b"GET /metrics?x=1 HTTP/1.0\r\n",
        b"HEAD /metrics HTTP/1.1\r\n",
        b"POST / HTTP/1.1\r\n",
        b"GET http://x/metrics HTTP/1.1\r\n",
        b"Host: a\r\n",
        b"Host: a\r\nHost: b\r\n",
        b"Content-Length: 3\r\n",
        b"Content-Length: -1\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"Connection: close\r\n",
        b"Expect: 100-continue\r\n",
        b"\r\n",
        b"abc",
        b"3\r\nabc\r\n0\r\n\r\n",
        b"X: " + b"y" * 9000 + b"\r\n",
    ]
)
http_stream = st.lists(HTTP_PIECES | st.binary(max_size=12), max_size=10)
STATUS = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


@FEW
@given(http_stream, st.data())
def test_the_metrics_handler_answers_or_refuses_any_bytes(stream, data):
    sent, lost = serve(RecordingScrape(Figures()), chunks(data, b"".join(stream)))
    assert lost and lost[0] in (Reason.EOF, Reason.DONE, Reason.BAD_FRAME), lost
    statuses = {int(s) for s in STATUS.findall(sent)}
    assert statuses <= {200, 400, 404, 405, 413, 414, 431, 501, 505}, sent[:300]
    if sent:
        assert STATUS.match(sent), sent[:100]


# -- the log reader --------------------------------------------------------------------

stamps = st.sampled_from(
    [
        "2026-03-01T10:00:00.000000Z",
        "2026-03-01T10:00:00Z",
        "9999-12-31T23:59:59-23:59",
        "0001-01-01T00:00:00+00:01",
        "2026-02-30T10:00:00.000000Z",
    ]
) | st.text(max_size=30)
PEERS = st.sampled_from([":5", "[]:5", "[::1]:5", "[::1", "1.2.3.4:5", "unix", "::1", "["]) | json_values
EVENTS = st.sampled_from(["conn.open", "conn.close", "conn.reject", "auth.fail", "command.end", "udp.drop"])


@st.composite
def log_lines(draw) -> bytes:
    event = {"timestamp": draw(stamps), "level": "info", "event": draw(EVENTS | json_values), "pid": 7}
    fields = ["service", "peer", "duration_ms", "bytes_in", "bytes_out", "reason", "count", "name", "exit"]
    for name in draw(st.lists(st.sampled_from(fields), max_size=9)):
        event[name] = draw(PEERS if name == "peer" else json_values | st.sampled_from(["echo", "eof", 3]))
    line = json.dumps(event).encode()  # evd's own separators: the fast path
    if draw(st.booleans()):
        line = json.dumps(event, separators=(",", ":")).encode()  # the general path
    if draw(st.integers(0, 9)) == 0:
        cut = draw(st.integers(0, len(line)))
        line = line[:cut] + draw(st.binary(max_size=8)) + line[cut:]
    return line


@FEW
@given(st.lists(log_lines() | st.binary(max_size=40), max_size=12), st.booleans())
def test_any_log_line_is_counted_or_skipped(lines, timed):
    since = "2026-01-01T00:00:00.000000Z" if timed else None
    summary = Summary(since=since)
    summary.feed([line.replace(b"\n", b"") for line in lines])
    result = summary.to_json()
    assert result["lines"] + result["skipped"] <= len(lines)
    json.dumps(result)  # and it can be printed
    selector = Selector(Options(files=[], peer="10.0.0.0/8", since=since, level="info"))
    for line in lines:
        selector.select(line.replace(b"\n", b""))


@FEW
@given(st.lists(st.binary(max_size=64) | st.sampled_from([b"\n", b"x" * 300]), max_size=20))
def test_the_cutter_gives_the_lines_of_any_blocks(blocks):
    reading_max = reading.MAX_LINE
    reading.MAX_LINE = 256  # small, so that over-long lines come up
    try:
        cutter = reading.Lines()
        lines = [line for block in blocks for line in cutter.cut(block)] + [cutter.rest()]
    finally:
        reading.MAX_LINE = reading_max
    expected = [line if len(line) <= 256 else reading.OVERLONG for line in b"".join(blocks).split(b"\n")]
    assert lines == expected


@FEW
@given(st.text(max_size=40))
def test_any_timestamp_is_a_key_or_none(text):
    key = ts_key(text)
    assert key is None or (len(key) == 27 and ts_key(key) == key)


# -- the TOML loader with drop-ins ----------------------------------------------------

KEYS = st.sampled_from(["services", "echo", "enabled", "tcp", "limits", "include", "control", "unix", "x"])
toml_scalars = st.booleans() | st.integers(-5, 70000) | st.text(string.printable, max_size=8)
toml_values = st.recursive(
    toml_scalars | st.lists(toml_scalars, max_size=3),
    lambda inner: st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=8,
)
documents = st.dictionaries(KEYS, toml_values, max_size=4)


def toml_text(document: dict) -> str:
    """A TOML document for `document`, inline tables and all."""

    def value(v) -> str:
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + "}"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return "true" if v is True else "false" if v is False else json.dumps(v)

    return "".join(f"{json.dumps(k)} = {value(v)}\n" for k, v in document.items())


@FEW
@given(documents, st.lists(documents | st.text(max_size=30), max_size=3))
def test_any_configuration_and_drop_ins_load_or_are_refused(tmp_path_factory, main, dropins):
    tmp = tmp_path_factory.mktemp("fuzz")
    (tmp / "d").mkdir()
    main_text = toml_text(main)
    if "include" not in main:
        main_text = f'include = ["{tmp}/d/*.toml"]\n' + main_text
    (tmp / "evd.toml").write_text(main_text)
    for i, dropin in enumerate(dropins):
        (tmp / "d" / f"{i:02d}.toml").write_text(dropin if isinstance(dropin, str) else toml_text(dropin))
    try:
        loaded = loader.load_all(str(tmp / "evd.toml"))
    except ConfigError as exc:
        assert exc.errors and all(isinstance(e, str) and e for e in exc.errors)
    else:
        assert isinstance(loaded.config, Config)
    tomllib.loads(main_text)  # the generator itself wrote TOML
