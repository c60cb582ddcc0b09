"""The control protocol without a socket: requests checked, workers' shares
merged, `set` values checked as the file is (proto/control.py,
server/control/daemon_verbs.py's limit_change), and the socket's handler fed by hand."""

from __future__ import annotations

import json
import socket

import pytest

from evd.config import loader
from evd.loop.reactor import Reactor
from evd.proto.control import (
    Answer,
    Request,
    merge_conns,
    merge_info,
    merge_services,
    merge_sources,
)
from evd.proto.framing import Decoder, encode
from evd.server.control.daemon_verbs import limit_change
from evd.server.control.verbs import parse


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ({"cmd": "info"}, Request("info")),
        ({"cmd": "conns", "args": ["echo"]}, Request("conns", ("echo",))),
        ({"cmd": "set", "args": ["echo", "rate", "5"]}, Request("set", ("echo", "rate", "5"))),
    ],
)
def test_parse_accepts(header, expected):
    assert parse(header) == expected


@pytest.mark.parametrize(
    ("header", "code", "message"),
    [
        ({}, "bad_request", "cmd (a string) is required"),
        ({"cmd": 3}, "bad_request", "cmd (a string) is required"),
        ({"cmd": "shutdown"}, "unknown_command", "no command 'shutdown'"),
        ({"cmd": "kill"}, "bad_request", "usage: kill CONN"),
        ({"cmd": "info", "args": ["x"]}, "bad_request", "usage: info"),
        ({"cmd": "kill", "args": [1]}, "bad_request", "args must be a list of strings"),
        ({"cmd": "kill", "args": ["1" * 300]}, "bad_request", "args must be a list of strings"),
    ],
)
def test_parse_refuses(header, code, message):
    answer = parse(header)
    assert isinstance(answer, Answer) and not answer.ok
    assert answer.code == code and answer.message is not None and answer.message.startswith(message)


def test_answers_round_trip_through_their_header():
    for answer in (Answer.done({"a": 1}), Answer.refused("no"), Answer.failed("bad", {"ok": False})):
        assert Answer.from_wire(answer.header(), answer.body) == answer


def test_merges_sum_the_shares():
    own = {"pid": 1, "connections": 0, "commands_running": 0, "workers": 2}
    shares = [{"connections": 3, "commands_running": 1}, {"connections": 2, "commands_running": 0}]
    assert merge_info(own, shares) == {"pid": 1, "connections": 5, "commands_running": 1, "workers": 2}
    described = {"echo": {"enabled": True, "listeners": ["tcp 127.0.0.1:7"], "limits": {}}}
    share = {"connections_current": 1, "connections_total": 4, "rejected": {"rate": 1}}
    merged = merge_services(described, [{"services": {"echo": share}}] * 2)
    assert merged["services"]["echo"] == {
        "enabled": True,
        "listeners": ["tcp 127.0.0.1:7"],
        "limits": {},
        "connections_current": 2,
        "connections_total": 8,
        "rejected": {"rate": 2},
    }
    # Listings: each worker's rows in order, merged lazily in the same order.
    conns = merge_conns([[{"conn": 1, "worker": 1}, {"conn": 4, "worker": 1}], [{"conn": 2, "worker": 0}]])
    assert [c["conn"] for c in conns] == [1, 2, 4]
    row = {
        "service": "echo",
        "ip": "10.0.0.1",
        "connections": 1,
        "rejected": 2,
        "tokens": 1.5,
        "banned_for_s": 3.0,
    }
    other = {**row, "tokens": 2.0, "banned_for_s": 9.0}
    later = {**row, "ip": "10.0.0.2"}
    rows = list(merge_sources([[row, later], [other]]))
    assert rows == [{**row, "connections": 2, "rejected": 4, "tokens": 3.5, "banned_for_s": 9.0}, later]


def test_set_is_checked_as_the_file_is():
    config = loader.load(None)
    ok = limit_change(config, "echo", "rate", "2.5")
    assert not isinstance(ok, Answer)
    service, body = ok
    assert service.limits.rate == 2.5 and body == {
        "service": "echo",
        "key": "rate",
        "value": 2.5,
        "was": 200.0,
    }
    assert not isinstance(limit_change(config, "echo", "burst", "7"), Answer)
    for args, message in (
        (("echo", "burst", "2.5"), "services.echo.burst: expected an integer, got float"),
        (("echo", "burst", "0"), "services.echo.burst: must be at least 1"),
        (("echo", "write_high", "100"), "services.echo.write_low: must be less than write_high (100)"),
        (("echo", "max_header", '"big"'), "services.echo.max_header: expected an integer, got string"),
        (("nosuch", "rate", "1"), "no service 'nosuch'"),
        (("command", "rate", "1"), "command has no listeners or limits of its own"),
    ):
        refused = limit_change(config, *args)
        assert isinstance(refused, Answer) and refused.code == "refused"
        assert refused.message is not None and refused.message.startswith(message), refused.message


class Later:
    """A backend that answers when told (as the supervisor's does)."""

    def __init__(self):
        self.waiting = []

    def handle(self, request, reply):
        self.waiting.append((request, reply))


def test_the_handler_takes_one_request_at_a_time():
    from evd.config.model import ServiceConfig
    from evd.handlers.service import Service
    from evd.net.transport import StreamTransport
    from evd.server.control.connection import Control

    reactor = Reactor()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.settimeout(5)
    backend = Later()
    service = Service(ServiceConfig(name="control", enabled=True), reactor)
    transport = StreamTransport(reactor, ours, Control(backend), service, None)
    transport.start(1)
    # Two requests in one write, the second a byte at a time after.
    data = encode({"cmd": "info"}) + encode({"cmd": "kill", "args": ["7"]})
    transport.protocol.data_received(data[:5])
    transport.protocol.data_received(data[5:])
    assert [r for r, _ in backend.waiting] == [Request("info")]  # the second waits
    backend.waiting.pop()[1](Answer.done({"pid": 1}))
    assert [r for r, _ in backend.waiting] == [Request("kill", ("7",))]
    backend.waiting.pop()[1](Answer.refused("no connection 7"))
    decoder = Decoder()
    frames = []
    while len(frames) < 2:
        decoder.feed(theirs.recv(65536))
        frames += list(decoder.frames())
    assert frames[0].header == {"ok": True, "len": frames[0].header["len"]}
    assert json.loads(frames[0].body) == {"pid": 1}
    assert frames[1].header["error"] == {"code": "refused", "message": "no connection 7"}
    # Not a frame: one error, then the connection closes.
    transport.protocol.data_received(b"\x00\x00\x00\x01{")
    assert transport.closed or transport.closing
    transport.close()
    theirs.close()
    reactor.close()
