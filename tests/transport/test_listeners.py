"""Listeners (evd/net/listeners.py) with the real Service, a real Reactor
and real loopback sockets: admission around accept, the UDP admission path,
UNIX socket paths, and the public-API fallback for the private accept.

The clients are plain blocking sockets with timeouts; the loop runs until a
condition holds, bounded by a guard timer.
"""

from __future__ import annotations

import os
import socket
import stat

import pytest
from support.transport import LIMIT, LogRecorder

from evd.config.addresses import Address
from evd.config.model import Limits, ServiceConfig
from evd.handlers import raw
from evd.handlers.service import Service
from evd.net import listeners
from evd.proto.classic import datagram_handler


@pytest.fixture
def log(monkeypatch):
    import evd.handlers.service as service_mod
    import evd.net.transport as transport_mod

    return LogRecorder.record(monkeypatch, listeners, transport_mod, service_mod)


@pytest.fixture
def reactor(loop):
    return loop.reactor


def service_of(name="echo", **limits):
    config = ServiceConfig(name, True, limits=Limits(**{"rate": 0.0, **limits}))
    return config


def stream_listener(reactor, service, factory, address=None):
    address = address or Address("tcp", "127.0.0.1", 0)
    listener = listeners.StreamListener(reactor, listeners.bind(address), service, address, factory)
    listener.open()
    return listener


def client(listener, timeout=LIMIT):
    sock = socket.create_connection(listener.sock.getsockname()[:2], timeout=timeout)
    return sock


# --- a handler that cannot be built (issue 9, defect 4) -----------------------


def test_a_failing_handler_factory_gives_back_what_admission_took(reactor, log, loop):
    """Building the handler raises after admission counted the connection:
    the count comes back, that connection is closed, an `error` is logged,
    and the listener keeps accepting (asyncio's _accept_connection2)."""
    loop_errors = []
    reactor.on_error = lambda where, exc: loop_errors.append((where, exc))
    service = Service(service_of(per_source=1, max_connections=5), reactor)
    calls = []

    def factory():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("cannot build a handler")
        return raw.Echo()

    listener = stream_listener(reactor, service, factory)
    try:
        first = client(listener)
        loop.run_until(lambda: calls, what="the first accept")
        # The refused connection is closed: the client reads EOF (or a reset).
        loop.run_until(lambda: service.admission.current == 0 and not service.connections)
        try:
            assert first.recv(10) == b""
        except ConnectionResetError:
            pass
        first.close()
        errors = log.fields("error")
        assert len(errors) == 1 and isinstance(errors[0]["exc_info"], RuntimeError)
        assert errors[0]["where"] == "echo.accept"
        assert service.errors == 1
        assert loop_errors == []  # handled where it happened, not by the loop
        # per_source = 1: this client IP is admitted again.
        second = client(listener)
        second.sendall(b"still accepting")
        loop.run_until(lambda: service.bytes_in + sum(c.bytes_in for c in service.connections) >= 15)
        assert second.recv(100) == b"still accepting"
        second.close()
        loop.run_until(lambda: not service.connections)
        assert service.admission.current == 0
    finally:
        listener.close()


# --- the UDP admission path (issue 9, defect 10) --------------------------------


def test_admitted_datagrams_are_not_formatted_to_text(reactor, log, monkeypatch, loop):
    """The rate bucket is keyed by the sender's host as the kernel gives it:
    no "HOST:PORT" text is made and parsed back for a datagram that passes."""
    service = Service(service_of(rate=1000.0, burst=1000), reactor)
    address = Address("udp", "127.0.0.1", 0)
    endpoint = listeners.DatagramEndpoint(
        reactor,
        listeners.bind(address),
        service,
        address,
        datagram_handler("echo"),
        set(listeners.GUARD_PORTS),
    )
    formatted = []
    for name in ("format_address", "sockaddr_text", "peer_text"):
        if hasattr(listeners, name):
            real = getattr(listeners, name)
            monkeypatch.setattr(listeners, name, lambda *a, _real=real: formatted.append(a) or _real(*a))
    endpoint.open()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(LIMIT)
            for i in range(20):
                sock.sendto(b"%d" % i, endpoint.sock.getsockname())
                loop.run_until(lambda i=i: service.requests > i)
                assert sock.recv(100) == b"%d" % i
        assert [s.host for s in service.admission.sources(reactor.now)] == ["127.0.0.1"]
        assert formatted == []
    finally:
        endpoint.close()


def test_ipv4_senders_of_a_dual_stack_endpoint_share_their_ipv4_bucket(reactor, log, loop):
    """A datagram from 127.0.0.1 to a "*" endpoint arrives as
    ::ffff:127.0.0.1: its bucket is 127.0.0.1's, and once it is empty the
    datagrams are dropped (`udp.drop reason=rate`, counted by reason)."""
    service = Service(service_of(rate=0.001, burst=2), reactor)
    address = Address("udp", "*", 0)
    sock = listeners.bind(address)
    if sock.family != socket.AF_INET6:
        sock.close()
        pytest.skip("no IPv6 on this host: no dual-stack socket")
    endpoint = listeners.DatagramEndpoint(
        reactor, sock, service, address, datagram_handler("echo"), set(listeners.GUARD_PORTS)
    )
    endpoint.open()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(LIMIT)
            target = ("127.0.0.1", sock.getsockname()[1])
            for i in range(3):
                client.sendto(b"%d" % i, target)
                loop.run_until(lambda i=i: service.requests + service.udp_drops["rate"] > i)
            assert client.recv(10) == b"0" and client.recv(10) == b"1"
            (source,) = service.admission.sources(reactor.now)
            assert source.host == "127.0.0.1" and source.connections == 0
            assert source.tokens is not None and source.tokens < 1
            assert service.udp_drops == {"rate": 1}
            assert service.snapshot()["rejected"] == 1
            (drop,) = log.fields("udp.drop")
            assert drop["reason"] == "rate" and drop["peer"] == f"127.0.0.1:{client.getsockname()[1]}"
    finally:
        endpoint.close()


# --- UNIX socket paths (issue 9, defect 18) -------------------------------------


def unix_listener(reactor, tmp_path, name="s.sock"):
    address = Address("unix", str(tmp_path / name), 0)
    service = Service(service_of(), reactor)
    listener = listeners.StreamListener(reactor, listeners.bind(address), service, address, raw.Echo)
    listener.open()
    return listener, address.host


def test_close_removes_the_socket_it_bound(reactor, log, tmp_path):
    listener, path = unix_listener(reactor, tmp_path)
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    listener.close()
    assert not os.path.exists(path)


def test_close_leaves_a_regular_file_put_at_its_path(reactor, log, tmp_path):
    listener, path = unix_listener(reactor, tmp_path)
    other = tmp_path / "other"
    other.write_text("not evd's")
    os.replace(other, path)  # a new inode, whatever the file system reuses
    listener.close()
    assert open(path).read() == "not evd's"


def test_close_leaves_another_daemons_socket_at_its_path(reactor, log, tmp_path):
    listener, path = unix_listener(reactor, tmp_path)
    theirs = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        theirs.bind(str(tmp_path / "theirs.sock"))
        theirs.listen()
        os.replace(tmp_path / "theirs.sock", path)
        listener.close()
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(LIMIT)
            probe.connect(path)  # still theirs, still reachable
    finally:
        theirs.close()


# --- the private accept and its public fallback ----------------------------------


@pytest.mark.parametrize("private", [True, False], ids=["c_accept", "public_accept"])
def test_accept_with_and_without_the_private_c_level_calls(reactor, log, monkeypatch, private, loop):
    """`sock._accept` and `_socket.socket` are CPython internals: where they
    are missing the listener uses `socket.accept`, with the same result."""
    if not private:
        monkeypatch.setattr(listeners, "CSocket", None)
    service = Service(service_of(), reactor)
    listener = stream_listener(reactor, service, raw.Echo)
    try:
        assert (listener._c_accept is not None) == private
        with client(listener) as sock:
            sock.sendall(b"ping")
            loop.run_until(lambda: service.connections, what="the connection accepted")
            (t,) = service.connections
            # The private path wraps the descriptor in the C type only.
            assert (type(t.sock) is not socket.socket) == private
            assert isinstance(t.sock, socket.socket) != private
            loop.run_until(lambda: t.bytes_out >= 4)
            assert sock.recv(10) == b"ping"
            assert t.host == "127.0.0.1" and t.peer == f"127.0.0.1:{sock.getsockname()[1]}"
        loop.run_until(lambda: not service.connections)
        assert service.connections_total == 1 and service.admission.current == 0
    finally:
        listener.close()


def test_c_accept_is_none_without_the_private_method():
    class Plain:
        pass

    assert listeners.c_accept(Plain()) is None


def test_unlink_if_ours_as_the_supervisor_calls_it(tmp_path):
    path = str(tmp_path / "sup.sock")
    sock = listeners.bind(Address("unix", path, 0))
    try:
        identity = listeners.bound_identity(path)
        assert identity == listeners.path_identity(path) and identity is not None
        assert listeners.unlink_if_ours(path, None) is False  # not bound here: never
        assert listeners.unlink_if_ours(path, identity) is True
        assert not os.path.exists(path)
        assert listeners.bound_identity(path) is None
        assert listeners.unlink_if_ours(path, identity) is False  # already gone
    finally:
        sock.close()


# --- the running state's views (runtime control, metrics) ------------------------


def test_connections_view_refusals_by_reason_and_kill(reactor, log, loop):
    service = Service(service_of(per_source=2, max_connections=10), reactor)
    listener = stream_listener(reactor, service, raw.Discard)
    clients = []
    try:
        for _ in range(3):
            clients.append(client(listener))
        loop.run_until(lambda: len(service.connections) == 2 and service.rejected["per_source"] == 1)
        clients[0].sendall(b"x" * 100)
        loop.run_until(lambda: sum(c.bytes_in for c in service.connections) == 100)
        views = service.open_connections(reactor.now)
        assert [v.service for v in views] == ["echo", "echo"]
        assert views[0].conn < views[1].conn
        assert {v.peer for v in views} == {f"127.0.0.1:{c.getsockname()[1]}" for c in clients[:2]}
        assert sorted(v.bytes_in for v in views) == [0, 100]
        assert all(v.age_s >= 0 and v.idle_s >= 0 and v.bytes_out == 0 for v in views)
        assert service.rejected == {"per_source": 1}
        assert service.snapshot()["rejected"] == 1
        (reject,) = log.fields("conn.reject")
        assert reject["reason"] == "per_source" and reject["peer"].startswith("127.0.0.1:")
        (source,) = service.admission.sources(reactor.now)
        assert source.host == "127.0.0.1" and source.connections == 2 and source.tokens is None
        # Close one by its id, as `evd ctl kill` will.
        assert service.kill(views[0].conn) is True
        assert service.kill(views[0].conn) is False  # gone now
        assert service.kill(10**9) is False
        assert [f["reason"] for f in log.fields("conn.close")] == ["killed"]
        assert clients[0].recv(10) == b""
        assert [v.conn for v in service.open_connections(reactor.now)] == [views[1].conn]
        assert service.admission.per_source("127.0.0.1") == 1
    finally:
        for c in clients:
            c.close()
        listener.close()


# --- closing while clients wait in the backlog ---------------------------------


def test_closing_serves_the_connections_the_kernel_already_accepted(reactor, log, loop):
    """A listener closed with connections in its backlog (SIGTERM, a
    reload, a retiring worker) takes them first and serves them: closed
    unaccepted, each would be reset, a lost request for a client behind a
    proxy that had already connected."""
    service = Service(service_of(), reactor)
    listener = stream_listener(reactor, service, raw.Echo)
    clients = [client(listener) for _ in range(5)]  # the loop never ran: all in the backlog
    try:
        for n, sock in enumerate(clients):
            sock.sendall(b"request %d" % n)
        listener.close()
        assert len(service.connections) == 5
        for sock in clients:
            sock.shutdown(socket.SHUT_WR)
        loop.run_until(lambda: not service.connections, what="the five echoes")
        for n, sock in enumerate(clients):
            assert sock.recv(100) == b"request %d" % n
    finally:
        for sock in clients:
            sock.close()
