"""The verb table (server/control/verbs.py) and its three drivers: every row
complete, requests checked against it, the merges of workers' answers, and
an unknown verb refused by every driver -- never a fall-through."""

from __future__ import annotations

import json
import socket
from types import SimpleNamespace

import pytest

from evd.config import loader
from evd.loop.reactor import Reactor
from evd.proto.control import Answer, Request, arity
from evd.proto.framing import Decoder, encode
from evd.server.control import supervisor_verbs
from evd.server.control.drivers import Local, WorkerEnd
from evd.server.control.fanout import Fanout
from evd.server.control.supervisor_verbs import Own
from evd.server.control.verbs import PUBLIC, USAGE, VERBS, parse

CLIENT_VERBS = ["info", "services", "conns", "sources", "kill", "disable", "enable", "set", "reload"]


def test_the_table_names_every_client_verb_once_and_each_row_is_whole():
    assert list(PUBLIC) == CLIENT_VERBS
    assert USAGE.startswith("info | services | conns [SERVICE]")
    for name, verb in VERBS.items():
        assert verb.usage.split()[0] == name
        assert callable(verb.local)
        assert (verb.own is None) == (verb.merge is None), name  # both parts, or a supervisor's question
        assert not verb.reconfigures or verb.changes, name  # a reconfiguration is a change, logged
    assert [n for n, v in VERBS.items() if v.fds] == ["enable"]
    assert {n for n, v in VERBS.items() if v.changes} == {"kill", "disable", "enable", "set", "reload"}


@pytest.mark.parametrize(
    ("usage", "least", "most"),
    [("info", 0, 0), ("conns [SERVICE]", 0, 1), ("kill CONN", 1, 1), ("set SERVICE KEY VALUE", 3, 3)],
)
def test_arity_comes_from_the_usage_line(usage, least, most):
    assert arity(usage) == (least, most)


@pytest.mark.parametrize(
    ("header", "code"),
    [
        ({"cmd": "figures"}, "unknown_command"),  # the supervisor's question, not a client's
        ({"cmd": "ping"}, "unknown_command"),
        ({"cmd": "frobnicate"}, "unknown_command"),
        ({"cmd": "sources", "args": ["a", "b"]}, "bad_request"),
    ],
)
def test_a_client_may_ask_only_the_public_verbs(header, code):
    answer = parse(header)
    assert isinstance(answer, Answer) and answer.code == code


# -- merges -------------------------------------------------------------------------

REFUSED = Answer.refused("no connection 9")
MISSING = Answer.failed("no answer from worker 1 (pid 7) within 3 s")


@pytest.mark.parametrize(
    ("merge", "answers", "missing", "expected"),
    [
        (supervisor_verbs.every, [Answer.done({}), Answer.done({})], None, Answer.done({"own": 1})),
        (supervisor_verbs.every, [Answer.done({}), REFUSED], None, REFUSED),
        (supervisor_verbs.every, [Answer.done({})], MISSING, MISSING),
        (supervisor_verbs.anyone, [REFUSED, Answer.done({"conn": 9})], MISSING, Answer.done({"conn": 9})),
        (supervisor_verbs.anyone, [REFUSED], MISSING, MISSING),
        (supervisor_verbs.anyone, [REFUSED, REFUSED], None, REFUSED),
        (supervisor_verbs.anyone, [], None, Answer.refused("nobody")),  # no worker at all: `otherwise`
        (supervisor_verbs.conns_merge, [Answer.done({"conns": [{"conn": 2}]})], MISSING, MISSING),
        (supervisor_verbs.conns_merge, [REFUSED, Answer.done({"conns": []})], None, REFUSED),
        (
            supervisor_verbs.conns_merge,
            [Answer.done({"conns": [{"conn": 2}]}), Answer.done({"conns": [{"conn": 1}]})],
            None,
            Answer.done({"conns": [{"conn": 1}, {"conn": 2}]}),
        ),
    ],
)
def test_merges(merge, answers, missing, expected):
    own = Own({"own": 1}, otherwise=Answer.refused("nobody"))
    merged = merge(own, answers, missing)
    if merged.rows is not None:  # a listing: merged lazily
        key, rows = merged.rows
        merged = Answer.done({key: list(rows)})
    assert merged == expected


# -- an unknown verb, in every driver ---------------------------------------------------


def test_the_single_process_driver_refuses_an_unknown_verb():
    local = Local(SimpleNamespace(stopping=False, retiring=False))  # type: ignore[arg-type]
    for command in ("frobnicate", "figures", "ping"):
        answer = local.answer(Request(command))
        assert answer.code == "unknown_command" and f"no command {command!r}" in (answer.message or "")


def test_the_supervisor_driver_refuses_an_unknown_verb_without_asking_a_worker():
    reactor = Reactor()
    workers = SimpleNamespace(reactor=reactor, stopping=False, config=loader.load(None), live={})
    fanout = Fanout(workers)  # type: ignore[arg-type]
    asked: list[object] = []
    fanout.ask = lambda *a, **k: asked.append(a)  # type: ignore[method-assign]
    try:
        for command in ("frobnicate", "figures", "ping"):
            answers: list[Answer] = []
            fanout.handle(Request(command), answers.append)
            assert [a.code for a in answers] == ["unknown_command"] and not asked
        # Before the fix, anything unmatched was carried out as a reload.
        workers.reload = lambda: pytest.fail("an unknown verb reloaded")
        fanout.handle(Request("reboot"), lambda a: None)
    finally:
        reactor.close()


def test_the_worker_end_refuses_an_unknown_verb_and_says_so():
    reactor = Reactor()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.settimeout(5)
    daemon = SimpleNamespace(reactor=reactor)
    end = WorkerEnd(daemon, ours)  # type: ignore[arg-type]
    try:
        theirs.sendall(encode({"cmd": "frobnicate", "args": [], "id": 4}))
        end.link._on_read()
        decoder = Decoder()
        while not (frames := list(decoder.frames())):
            decoder.feed(theirs.recv(65536))
        header = frames[0].header
        assert header["id"] == 4 and header["ok"] is False
        assert header["error"]["code"] == "unknown_command"
        assert json.loads(frames[0].body or b"null") is None
    finally:
        end.link.close()
        theirs.close()
        reactor.close()


def test_the_supervisor_refuses_enable_before_binding_when_tls_cannot_serve():
    from evd.config.addresses import Address
    from evd.net.listeners import BindError

    def unreadable(name: str) -> None:
        raise BindError(f"services.{name}.tls_key: not readable")

    reactor = Reactor()
    workers = SimpleNamespace(reactor=reactor, count=2, prepare_tls=unreadable)
    try:
        answer = Fanout(workers).bind([("echo", Address("tls", "127.0.0.1", 0))], {})  # type: ignore[arg-type]
        assert isinstance(answer, Answer) and answer.message == "services.echo.tls_key: not readable"
    finally:
        reactor.close()
