"""A coverage-guided fuzzing campaign (atheris, libFuzzer for Python) on
every parser of evd that meets untrusted bytes.  Not part of the suite: the
suite's hypothesis properties (tests/unit/test_fuzz.py) run a few seconds;
this runs as long as you give it.

    .venv/bin/pip install atheris                      # bench/requirements.txt
    .venv/bin/python bench/fuzz.py --all 300           # every target, 300 s each
    .venv/bin/python bench/fuzz.py logs -max_total_time=60 -dict=...   # one, libFuzzer flags

A target takes the fuzzer's bytes, gives them to one parser, and accepts
only the outcomes the parser promises (an answer, or its own refusal: a
FrameError, a ConfigError, a skipped line, an HTTP 4xx and a close).  Any
other exception is a finding: libFuzzer stops, prints the traceback and
writes the input as crash-<sha1> in the working directory.  Findings and
what was done about them: docs/design/fuzzing.md.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

with atheris.instrument_imports(include=["evd", "h11", "tomllib"]):
    from evd.config import loader
    from evd.config.model import ConfigError
    from evd.loop.reactor import Reactor
    from evd.loop.seams import Reason
    from evd.proto.control import Answer, Request
    from evd.proto.framing import Decoder, FrameError, encode
    from evd.proto.proxy import NEED_MORE, Header, Refused, v1_header, v2_header
    from evd.proto.proxy import parse as parse_proxy
    from evd.proto.rules import rules_for
    from evd.proto.session import Session
    from evd.server.control.connection import Control
    from evd.server.control.verbs import parse
    from evd.server.metrics.http import Scrape
    from evd.tools.logs import reading
    from evd.tools.logs.events import ts_key
    from evd.tools.logs.show import Options, Selector
    from evd.tools.logs.summary import Summary

from evd.config.model import Limits, ServiceConfig  # noqa: E402  (after the instrumented imports)
from evd.handlers.service import Service  # noqa: E402
from evd.log.logger import log  # noqa: E402
from evd.net.transport import StreamTransport  # noqa: E402

RULES = rules_for(loader.parse("[commands.greet]\nargv = ['echo', 'hello']\nargs = true\n"), {})


def cuts(data: bytes) -> list[bytes]:
    """The input in up to three pieces, at places its first bytes choose."""
    if len(data) < 2:
        return [data]
    a, b = sorted((data[0] * len(data) // 256, data[1] * len(data) // 256))
    rest = data[2:]
    return [rest[:a], rest[a:b], rest[b:]]


def framed(data: bytes) -> None:
    session = Session(RULES, bytes(32))
    decoder = Decoder(max_header=512, max_body=256)
    try:
        for piece in cuts(data):
            decoder.feed(piece)
            while (request := decoder.next_request()) is not None:
                session.receive(*request, 1e9)
    except FrameError:
        pass


def proxy(data: bytes) -> None:
    """The PROXY header parser, as a connection's bytes arrive: every
    prefix gets a verdict, a header's length is within what was read, a
    header read stays that header and a refusal stays a refusal (its
    reason may name a later fault: the connection is closed at the first)."""
    verdict: object = NEED_MORE
    for end in range(len(data) + 1):
        result = parse_proxy(data[:end])
        assert result is NEED_MORE or isinstance(result, Header | Refused), result
        if isinstance(result, Header):
            assert 0 < result.length <= end
        if isinstance(verdict, Header):
            assert result == verdict, (verdict, result)
        elif isinstance(verdict, Refused):
            assert isinstance(result, Refused), (verdict, result)
        verdict = result


def control(data: bytes) -> None:
    try:
        header = json.loads(data)
    except (ValueError, RecursionError):
        return
    if isinstance(header, dict):
        answer = parse(header)
        assert isinstance(answer, Request) or (not answer.ok and answer.message)


def _serve(handler: Control | Scrape, data: bytes) -> None:
    """`handler` on a real socketpair in a real loop: the bytes, then EOF;
    the server must close by itself, and never for a bug (Reason.ERROR)."""
    reactor = Reactor()
    service = Service(ServiceConfig("fuzz", True, limits=Limits(rate=0.0)), reactor)
    server, client = socket.socketpair()
    lost: list[str] = handler.lost  # type: ignore[union-attr]
    service.admit(None, 0, reactor.now)
    transport = StreamTransport(reactor, server, handler, service, host=None)
    transport.start(service.opened(transport))
    client.setblocking(False)
    client.sendall(data[:100_000])  # fits the socket buffer: the loop reads it
    client.shutdown(socket.SHUT_WR)

    def read() -> None:
        try:
            if not client.recv(1 << 16):
                reactor.stop()
        except BlockingIOError:
            return
        except OSError:
            reactor.stop()

    reactor.add_reader(client.fileno(), read)
    guard = reactor.call_later(2.0, reactor.stop)
    reactor.run()
    reactor.cancel(guard)
    reactor.remove_reader(client.fileno())
    client.close()
    if not transport.closed:
        transport.close(Reason.SHUTDOWN)
        raise AssertionError("the server neither answered nor closed after EOF")
    assert Reason.ERROR not in lost, lost


class _Scrape(Scrape):
    """Says why it was closed (Scrape and Control have __slots__: a subclass)."""

    def __init__(self) -> None:
        super().__init__(_Figures())
        self.lost: list[str] = []

    def connection_lost(self, reason: str) -> None:
        self.lost.append(reason)


class _Control(Control):
    def __init__(self) -> None:
        super().__init__(_Backend())
        self.lost: list[str] = []

    def connection_lost(self, reason: str) -> None:
        self.lost.append(reason)


class _Figures:
    def scrape(self, done: Callable[[dict[str, object]], None]) -> None:
        done({})


class _Backend:
    def handle(self, request: Request, reply: Callable[[Answer], None]) -> None:
        reply(Answer.done({"command": request.command}))


def http(data: bytes) -> None:
    _serve(_Scrape(), data)


def control_socket(data: bytes) -> None:
    _serve(_Control(), data)


def logs(data: bytes) -> None:
    summary = Summary(since="2026-01-01T00:00:00.000000Z" if data[:1] == b"s" else None)
    selector = Selector(Options(files=[], peer="10.0.0.0/8", level="info"))
    cutter = reading.Lines()
    for piece in cuts(data):
        lines = cutter.cut(piece)
        summary.feed(lines)
        for line in lines:
            selector.select(line)
            ts_key(line.decode("utf-8", "replace"))
    summary.feed_tail(cutter.rest())
    json.dumps(summary.to_json())


_TMP = Path(tempfile.mkdtemp(prefix="evd-fuzz-"))


def config(data: bytes) -> None:
    """The main file and up to two drop-ins, cut at NUL bytes."""
    main, *dropins = data.split(b"\0", 2)
    for old in _TMP.glob("d/*"):
        old.unlink()
    (_TMP / "d").mkdir(exist_ok=True)
    (_TMP / "evd.toml").write_bytes(f'include = ["{_TMP}/d/*.toml"]\n'.encode() + main)
    for i, text in enumerate(dropins):
        (_TMP / "d" / f"{i}.toml").write_bytes(text)
    try:
        loader.load_all(str(_TMP / "evd.toml"))
    except ConfigError as exc:
        assert exc.errors


def _line(event: str, **fields: object) -> bytes:
    stamp = {"timestamp": "2026-03-01T10:00:00.000001Z", "level": "info", "event": event, "pid": 7}
    return json.dumps(stamp | fields).encode()


# Where each target starts: inputs that reach deep (a whole request, real
# log lines, the shipped configuration); libFuzzer mutates from there.
SEEDS: dict[str, list[bytes]] = {
    "framed": [
        encode({"svc": "echo", "id": 1}, b"hi") + encode({"svc": "time", "fmt": "%Y", "tz": "UTC"}),
        encode({"svc": "command", "name": "greet", "args": ["a"]}) + encode({"svc": "stats"}),
        encode({"svc": "auth", "key": "ops", "mac": "00" * 32}),
    ],
    "proxy": [
        v1_header(("192.0.2.1", 5), ("198.51.100.2", 7)) + b"hello",
        v2_header(("2001:db8::1", 5), tlvs=((0x01, b"h2"), (0x20, bytes(5)))) + b"hello",
        b"PROXY UNKNOWN\r\n",
    ],
    "control": [b'{"cmd": "info"}', b'{"cmd": "set", "args": ["echo", "rate", "5"]}', b'{"cmd": "conns"}'],
    "control_socket": [encode({"cmd": "info"}) + encode({"cmd": "kill", "args": ["1"]})],
    "http": [
        b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\nHEAD /metrics HTTP/1.0\r\n\r\n",
        b"POST /metrics HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nab",
        b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    ],
    "logs": [
        b"\n".join(
            [
                _line("conn.open", service="echo", peer="192.0.2.1:5", conn=1),
                _line("conn.close", service="echo", peer="[2001:db8::1]:5", conn=1, duration_ms=1.5)[:-1]
                + b', "bytes_in": 3, "bytes_out": 3, "reason": "eof"}',
                _line("conn.reject", service="echo", peer="192.0.2.1:5", reason="rate", count=3),
                _line("command.end", name="greet", exit=0, signal=None, duration_ms=2.0, key="ops"),
                _line("error", where="echo.read"),
                _line("config.reload", ok=True),
            ]
        )
    ],
    "config": [
        (ROOT / "etc" / "evd.toml").read_bytes().replace(b"include", b"#include")
        + b"\0[services.echo]\nenabled = false\n\0[commands.x]\nargv = ['true']\n"
    ],
}

TARGETS: dict[str, Callable[[bytes], None]] = {
    "framed": framed,
    "proxy": proxy,
    "control": control,
    "control_socket": control_socket,
    "http": http,
    "logs": logs,
    "config": config,
}


def campaign(seconds: int) -> int:
    """Every target in its own process for `seconds`; a summary at the end."""
    failed = []
    for name in TARGETS:
        started = time.monotonic()
        out = subprocess.run(
            [sys.executable, __file__, name, f"-max_total_time={seconds}", "-rss_limit_mb=1024"],
            capture_output=True,
            text=True,
            cwd=os.getcwd(),
        )
        tail = [line for line in out.stderr.splitlines() if line.startswith(("#", "Done", "=="))][-1:]
        took = time.monotonic() - started
        print(f"{name:15} exit {out.returncode}  {took:6.0f} s  {' '.join(tail)}", flush=True)
        if out.returncode != 0:
            failed.append(name)
            print(out.stderr[-3000:], file=sys.stderr)
    return 1 if failed else 0


def main() -> int:
    if len(sys.argv) >= 3 and sys.argv[1] == "--all":
        return campaign(int(sys.argv[2]))
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        print(
            f"usage: fuzz.py --all SECONDS | fuzz.py {{{','.join(TARGETS)}}} [libFuzzer flags]",
            file=sys.stderr,
        )
        return 2
    name = sys.argv[1]
    target = TARGETS[name]
    corpus = Path("fuzz-corpus") / name  # in the working directory: grows with what is found
    if not corpus.is_dir():
        corpus.mkdir(parents=True)
        for i, seed in enumerate(SEEDS[name]):
            (corpus / f"seed-{i}").write_bytes(seed)
    log.configure("error", "json")  # quiet: the conn.* lines of every input are not findings
    atheris.Setup([sys.argv[0], *sys.argv[2:], str(corpus)], lambda data: target(bytes(data)))
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
