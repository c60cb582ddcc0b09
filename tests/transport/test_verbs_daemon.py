"""The verbs' `local` column on a real Daemon with real loopback sockets,
through the single-process driver and through the worker end (whose
`enable` sockets come with the request, bound by a supervisor)."""

from __future__ import annotations

import socket

import pytest
from support.daemon import BASE_CONFIG

from evd.config.loader import parse
from evd.loop.reactor import Reactor
from evd.proto.control import Request
from evd.server import preflight
from evd.server.control.drivers import Local, WorkerEnd
from evd.server.daemon import Daemon
from evd.server.sockets import bind_slots, firsts


@pytest.fixture
def daemon(tmp_path):
    config = parse(BASE_CONFIG.format(tmp=tmp_path))
    daemon = Daemon(config, preflight.Machine(), Reactor())
    slots = bind_slots(config.listener_keys())
    daemon.open(firsts(slots))
    yield daemon
    daemon._close_everything()
    daemon.reactor.close()


def port_of(daemon, name, proto="tcp"):
    found = [lis for (n, a), lis in daemon.listeners.items() if n == name and a.proto == proto]
    return found[0].sock.getsockname()[1]


@pytest.mark.parametrize(
    ("request_", "ok", "expected"),
    [
        (Request("kill", ("999999",)), False, "no connection 999999"),
        (Request("kill", ("x",)), False, "a connection id is a number, not 'x'"),
        (Request("conns", ("nosuch",)), False, "no service 'nosuch'"),
        (Request("sources", ("nosuch",)), False, "no service 'nosuch'"),
        (Request("disable", ("command",)), False, "command has no listeners or limits of its own"),
        (Request("enable", ("nosuch",)), False, "no service 'nosuch'"),
        (Request("set", ("echo", "rate", "x")), False, "services.echo.rate:"),
        (Request("conns", ()), True, {"conns": []}),
        (Request("sources", ("echo",)), True, {"sources": []}),
        (
            Request("set", ("echo", "rate", "5")),
            True,
            {"service": "echo", "key": "rate", "value": 5.0, "was": 0.0},
        ),
    ],
)
def test_each_verb_answers_as_the_table_says(daemon, request_, ok, expected):
    answer = Local(daemon).answer(request_)
    assert answer.ok is ok
    if answer.rows is not None:  # a listing: its rows made as they are taken
        key, rows = answer.rows
        assert {key: list(rows)} == expected
    elif ok:
        assert answer.body == expected
    else:
        assert answer.code == "refused" and (answer.message or "").startswith(expected), answer.message


def test_disable_then_enable_comes_back_on_the_same_port(daemon):
    local = Local(daemon)
    port = port_of(daemon, "echo")
    answer = local.answer(Request("disable", ("echo",)))
    assert answer.ok and f"tcp 127.0.0.1:{port}" in answer.body["listeners"]
    assert not any(n == "echo" for n, _ in daemon.listeners)
    answer = local.answer(Request("enable", ("echo",)))
    assert answer.ok and f"tcp 127.0.0.1:{port}" in answer.body["listeners"]
    assert port_of(daemon, "echo") == port
    info = local.answer(Request("services")).body["services"]["echo"]
    assert info["enabled"] is True and len(info["listeners"]) == 3


def test_enable_refuses_a_port_taken_and_binds_nothing(daemon):
    local = Local(daemon)
    port = port_of(daemon, "echo", "udp")
    assert local.answer(Request("disable", ("echo",))).ok
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind(("127.0.0.1", port))
        answer = local.answer(Request("enable", ("echo",)))
        assert answer.code == "refused" and f"udp 127.0.0.1:{port}" in (answer.message or "")
        assert not any(n == "echo" for n, _ in daemon.listeners)
        assert daemon.config.services["echo"].enabled is False
    assert local.answer(Request("enable", ("echo",))).ok  # the port is free again


def test_stopping_refuses_changes_of_the_configuration_but_answers_questions(daemon):
    daemon.stopping = True
    local = Local(daemon)
    for args in (("disable", "echo"), ("enable", "echo"), ("set", "echo", "rate", "1")):
        assert local.answer(Request(args[0], args[1:])).message == "evd is stopping"
    assert local.answer(Request("info")).ok


def test_the_worker_end_serves_the_sockets_its_supervisor_handed_it(daemon):
    """`enable` in a worker: the descriptors travel with the request."""
    local = Local(daemon)
    assert local.answer(Request("disable", ("discard",))).ok
    keys = [("discard", a) for a in daemon.config.services["discard"].addresses]
    handed = bind_slots(keys)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    end = WorkerEnd(daemon, ours)
    try:
        end.handed = {k: socket.socket(fileno=socks[0].detach()) for k, socks in handed.items()}
        answer = end._answer(Request("enable", ("discard",)))
        assert answer.ok and len(answer.body["listeners"]) == 2
        assert {k for k in daemon.listeners if k[0] == "discard"} == set(keys)
        assert end.handed == {}
    finally:
        end.link.close()
        theirs.close()
