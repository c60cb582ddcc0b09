"""Per-client protection across workers: the kernel steers every connection
and datagram of one client IP to one worker (server/sockets.py `steer`), so
per_source, rate and auth_ban hold exactly, and max_connections is the
whole service's, shared among the workers.

Clients come from several loopback addresses (127.0.0.2 .. 127.0.0.9);
`worker_for` predicts which worker each should land on.
"""

from __future__ import annotations

import resource
import select
import socket
import time

import pytest
from support.daemon import BASE_CONFIG, WAIT

from evd.proto.framing import Decoder, encode
from evd.server.sockets import worker_for

SOURCES = [f"127.0.0.{i}" for i in range(2, 10)]

# These tests set `workers` themselves (tests/conftest.py).
pytestmark = pytest.mark.no_workers_variant("sets workers itself")


def config(workers: int, limits: str = "", framed: str = "", echo: str = "") -> str:
    text = BASE_CONFIG.replace("shutdown_timeout = 5.0", f"shutdown_timeout = 5.0\nworkers = {workers}")
    text = text.replace("rate = 0.0\n", "rate = 0.0\n" + limits)
    text = text.replace("[services.echo]\n", "[services.echo]\n" + echo)
    return text.replace("[services.framed]\n", "[services.framed]\n" + framed)


def worker_pids(evd, workers: int) -> dict[int, int]:
    """pid -> slot of each first worker."""
    return {evd.wait_for("worker.start", worker=i)["worker_pid"]: i for i in range(workers)}


def connect_from(source: str, address) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(WAIT)
    sock.bind((source, 0))
    sock.connect(address)
    return sock


def echoes(sock: socket.socket) -> bool:
    """Whether the connection is served (True) or was refused: accepted and
    closed at once (False)."""
    try:
        sock.sendall(b"x")
        return sock.recv(1) == b"x"
    except (ConnectionResetError, BrokenPipeError):
        return False


def opened_by(evd, mark: int, source: str, count: int) -> set[int]:
    """The pids that logged the `count` echo conn.opens from `source`."""
    while True:
        pids = [
            e["pid"]
            for e in evd.drain_events()[mark:]
            if e.get("event") == "conn.open" and e.get("peer", "").startswith(f"{source}:")
        ]
        if len(pids) >= count:
            return set(pids)
        evd.wait_for_since(len(evd.events), "conn.open", service="echo")


@pytest.mark.parametrize("workers", [2, 3])
def test_every_connection_and_datagram_of_a_client_lands_on_one_worker(start_evd, workers):
    evd = start_evd(config(workers))
    pids = worker_pids(evd, workers)
    address = evd.addr("echo")
    for source in SOURCES:
        mark = len(evd.drain_events())
        for _ in range(6):
            with connect_from(source, address) as sock:
                assert echoes(sock)
        (pid,) = opened_by(evd, mark, source, 6)
        assert pids[pid] == worker_for(source, workers), source
    assert {worker_for(s, workers) for s in SOURCES} == set(range(workers))  # every worker had clients
    assert evd.stop() == 0


@pytest.mark.parametrize("workers", [2, 3])
def test_a_datagram_rate_holds_per_client_not_per_worker(start_evd, workers):
    """burst = 3 and a slow refill: a client's fourth datagram and later go
    unanswered, whichever source port they come from."""
    evd = start_evd(config(workers, echo="rate = 0.01\nburst = 3\n"))
    address = evd.addr("echo", "udp")
    for source in SOURCES[:3]:
        socks = []
        for _ in range(8):  # a new socket, so a new source port, each time
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((source, 0))
            sock.sendto(b"d", address)
            socks.append(sock)
        answered = 0
        deadline = time.monotonic() + WAIT
        while answered < 3 and time.monotonic() < deadline:
            ready, _, _ = select.select(socks, [], [], deadline - time.monotonic())
            for sock in ready:
                answered += sock.recv(10) == b"d"
                socks.remove(sock)
        # Three answers came; any more would come as fast (the window).
        extra, _, _ = select.select(socks, [], [], 0.3)
        assert (answered, len(extra)) == (3, 0), source
        for sock in socks:
            sock.close()
    assert evd.stop() == 0


@pytest.mark.parametrize("workers", [2, 3])
def test_per_source_holds_exactly_across_workers(start_evd, workers):
    evd = start_evd(config(workers, echo="per_source = 3\n"))
    address = evd.addr("echo")
    held = []
    for source in SOURCES[:4]:
        mine = [connect_from(source, address) for _ in range(3)]
        assert all(echoes(sock) for sock in mine), source
        held += mine
        for _ in range(6):  # over the limit, however the ports fall
            with connect_from(source, address) as sock:
                assert not echoes(sock), source
    evd.wait_for("conn.reject", service="echo", reason="per_source")
    for sock in held:
        sock.close()
    assert evd.stop() == 0


def test_max_connections_is_the_whole_services_shared_among_workers(start_evd):
    """max_connections = 5 with two workers: 3 on worker 0, 2 on worker 1."""
    evd = start_evd(config(2, echo="max_connections = 5\n"))
    address = evd.addr("echo")
    by_worker = {w: [s for s in SOURCES if worker_for(s, 2) == w] for w in (0, 1)}
    held = []
    for worker, share in ((0, 3), (1, 2)):
        sources = by_worker[worker]
        for i in range(share):
            held.append(connect_from(sources[i % len(sources)], address))
            assert echoes(held[-1])
        with connect_from(sources[-1], address) as sock:
            assert not echoes(sock), f"worker {worker} took more than {share}"
    evd.wait_for("conn.reject", service="echo", reason="max_connections")
    for sock in held:
        sock.close()
    assert evd.stop() == 0


def framed_from(source: str, address) -> socket.socket:
    """A framed connection from `source`, past its hello (or refused: EOF)."""
    sock = connect_from(source, address)
    decoder = Decoder(1 << 20, 1 << 24)
    while not list(decoder.frames()):
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            sock.close()
            raise ConnectionError("refused")
        decoder.feed(data)
    return sock


BAN = 2.0


def test_an_auth_ban_holds_on_every_worker_for_its_full_time(tmp_path, start_evd):
    (tmp_path / "k.key").write_bytes(b"secret\n")
    (tmp_path / "k.key").chmod(0o600)
    evd = start_evd(config(2, limits=f"auth_ban = {BAN}\n", framed='key_file = "{tmp}/k.key"\n'))
    address = evd.addr("framed")
    source = SOURCES[0]
    with framed_from(source, address) as sock:
        sock.sendall(b"".join(encode({"svc": "auth", "mac": "00"}) for _ in range(3)))
        while sock.recv(65536):  # three answers, then the close
            pass
    banned_at = time.monotonic()
    evd.wait_for("conn.close", service="framed", reason="auth")
    tries = 0
    while time.monotonic() - banned_at < BAN - 0.3:  # the ban's time, less slack for the log
        with pytest.raises(ConnectionError):
            framed_from(source, address).close()
        tries += 1
    assert tries >= 10
    with framed_from(SOURCES[1], address):  # another client is welcome meanwhile
        pass
    deadline = time.monotonic() + WAIT
    while True:  # and the banned one again, once the ban is over
        try:
            framed_from(source, address).close()
            break
        except ConnectionError:
            assert time.monotonic() < deadline, "the ban never ended"
    assert evd.stop() == 0


def test_a_worker_out_of_descriptors_says_so_and_the_service_goes_on(start_evd):
    """SPEC 5: EMFILE in one worker is logged (at most once a second) and
    every connection it has, and the other worker, go on being served."""
    evd = start_evd(config(2))
    pids = {slot: pid for pid, slot in worker_pids(evd, 2).items()}
    address = evd.addr("echo")
    starved = next(s for s in SOURCES if worker_for(s, 2) == 0)
    other = next(s for s in SOURCES if worker_for(s, 2) == 1)
    first = connect_from(starved, address)
    assert echoes(first)
    resource.prlimit(pids[0], resource.RLIMIT_NOFILE, (64, 64))
    crowd = []
    try:
        for _ in range(80):  # more than 64 descriptors' worth, all on worker 0
            crowd.append(connect_from(starved, address))
        backoff = evd.wait_for("listener.backoff", service="echo", pid=pids[0])
        assert "Errno 24" in backoff["error"]
        assert echoes(first)
        with connect_from(other, address) as sock:
            assert echoes(sock)
    finally:
        for sock in crowd:
            sock.close()
    deadline = time.monotonic() + WAIT
    while True:  # the crowd is gone: worker 0 accepts again
        with connect_from(starved, address) as sock:
            if echoes(sock):
                break
        assert time.monotonic() < deadline, "worker 0 never recovered"
    first.close()
    assert evd.stop() == 0
