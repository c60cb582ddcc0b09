"""Listings made a slice at a time (server/control/slices.py): the loop runs
other callbacks between two slices, and the answer still comes whole and in
order -- checked by counting turns of a real Reactor, never by timing."""

from __future__ import annotations

import itertools
import json
import socket

import pytest
from support.daemon import BASE_CONFIG

from evd.config.loader import parse
from evd.config.model import ServiceConfig
from evd.handlers.service import Service
from evd.loop.reactor import Reactor
from evd.net.transport import StreamTransport
from evd.proto.control import Request
from evd.proto.framing import Decoder, encode
from evd.server import preflight
from evd.server.control import slices
from evd.server.control.connection import Control
from evd.server.control.drivers import Local
from evd.server.daemon import Daemon
from evd.server.sockets import bind_slots, firsts

GUARD = 10.0  # seconds: the bound on every loop a test runs


def test_pace_lets_other_callbacks_run_between_slices():
    reactor = Reactor()
    seen: list[object] = []

    def tick() -> float:
        seen.append("tick")
        return 0.0

    reactor.call_later(0.0, tick)
    reactor.call_later(GUARD, reactor.stop)

    def done() -> None:
        seen.append("done")
        reactor.stop()

    rows = ({"n": n} for n in range(10))
    slices.pace(reactor, rows, lambda batch: seen.append([r["n"] for r in batch]), done, budget=0.0, batch=3)
    assert seen == [[0, 1, 2]]  # the first slice at once, then back to the loop
    reactor.run()
    reactor.close()
    batches = [s for s in seen if isinstance(s, list)]
    assert [n for batch in batches for n in batch] == list(range(10)) and seen[-1] == "done"
    between = [seen[seen.index(a) + 1 : seen.index(b)] for a, b in itertools.pairwise(batches)]
    assert all("tick" in gap for gap in between), seen  # the loop turned between every two slices


def test_a_small_listing_is_done_in_one_slice():
    reactor = Reactor()
    out: list[list[dict]] = []
    finished: list[bool] = []
    slices.pace(reactor, [{"n": 1}], out.append, lambda: finished.append(True))
    assert out == [[{"n": 1}]] and finished == [True]
    reactor.close()


def test_batches_encode_to_the_json_of_the_whole():
    rows = [{"conn": n, "peer": f"127.0.0.1:{n}", "tokens": None} for n in range(7)]
    chunks = [slices.encode_batch(rows[:3]), slices.encode_batch(rows[3:])]
    assert slices.encode("conns", chunks) == json.dumps({"conns": rows}).encode()
    assert json.loads(slices.encode("conns", [])) == {"conns": []}


@pytest.fixture
def daemon(tmp_path):
    config = parse(BASE_CONFIG.format(tmp=tmp_path))
    daemon = Daemon(config, preflight.Machine(), Reactor())
    daemon.open(firsts(bind_slots(config.listener_keys())))
    yield daemon
    daemon._close_everything()
    daemon.reactor.close()


def run_until(reactor: Reactor, condition) -> None:
    def look() -> float | None:
        if condition():
            reactor.stop()
            return None
        return 0.001

    guard = reactor.call_later(GUARD, reactor.stop)
    reactor.call_later(0.0, look)
    reactor.run()
    reactor.cancel(guard)
    assert condition(), "not within the guard"


def test_conns_over_many_connections_comes_whole_while_echo_is_served(daemon, monkeypatch):
    """One row per turn of the loop: an echo client sent its bytes just as
    the listing began and has its answer long before the listing ends."""
    reactor = daemon.reactor
    echo = next(lis for (name, a), lis in daemon.listeners.items() if name == "echo" and a.proto == "tcp")
    address = echo.sock.getsockname()
    clients = [socket.create_connection(address, timeout=GUARD) for _ in range(150)]
    try:
        run_until(reactor, lambda: len(daemon.services["echo"].connections) == 150)
        monkeypatch.setattr(slices, "SLICE", 0.0)
        monkeypatch.setattr(slices, "BATCH", 1)
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.setblocking(False)
        surface = Service(ServiceConfig(name="control", enabled=True), reactor)
        control = StreamTransport(reactor, ours, Control(Local(daemon)), surface, None)
        control.start(1)
        probe = clients[0]
        probe.setblocking(False)
        events: list[str] = []
        decoder = Decoder(1 << 16, 1 << 24)
        echoed = bytearray()

        def on_probe() -> None:
            echoed.extend(probe.recv(100))
            if echoed == b"ping":
                events.append("echo")

        def on_answer() -> None:
            decoder.feed(theirs.recv(1 << 20))
            if decoder.buffered == 0 or list(decoder.frames()):
                events.append("answer")

        reactor.add_reader(probe.fileno(), on_probe)
        reactor.add_reader(theirs.fileno(), on_answer)
        probe.sendall(b"ping")
        control.protocol.data_received(encode({"cmd": "conns", "args": ["echo"]}))
        run_until(reactor, lambda: "answer" in events)
        reactor.remove_reader(probe.fileno())
        reactor.remove_reader(theirs.fileno())
        assert events.index("echo") < events.index("answer")  # served meanwhile
    finally:
        for client in clients:
            client.close()


def test_the_listing_is_complete_and_in_order(daemon, monkeypatch):
    reactor = daemon.reactor
    echo = next(lis for (name, a), lis in daemon.listeners.items() if name == "echo" and a.proto == "tcp")
    clients = [socket.create_connection(echo.sock.getsockname(), timeout=GUARD) for _ in range(100)]
    try:
        run_until(reactor, lambda: len(daemon.services["echo"].connections) == 100)
        monkeypatch.setattr(slices, "SLICE", 0.0)
        answer = Local(daemon).answer(Request("conns", ("echo",)))
        assert answer.rows is not None
        key, rows = answer.rows
        chunks: list[bytes] = []
        finished: list[bool] = []
        slices.pace(
            reactor, rows, lambda b: chunks.append(slices.encode_batch(b)), lambda: finished.append(True)
        )
        run_until(reactor, lambda: bool(finished))
        listed = json.loads(slices.encode(key, chunks))["conns"]
        ids = [row["conn"] for row in listed]
        assert len(ids) == 100 and ids == sorted(ids)
        peers = {row["peer"] for row in listed}
        assert peers == {"{}:{}".format(*c.getsockname()) for c in clients}
    finally:
        for client in clients:
            client.close()
