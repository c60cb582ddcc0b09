"""Protection under load, faults and bad input, against the real daemon.

A second loopback source address (127.0.0.2) stands in for "another client"
in the access and per-source cases; /proc/PID/status gives the daemon's RSS.
"""

from __future__ import annotations

import os
import re
import resource
import select
import socket
import struct
import time

import pytest
from support.daemon import BASE_CONFIG, WAIT, connect, recv_all, recv_exactly

from evd.proto.framing import Decoder, encode


def with_service(service: str, extra: str) -> str:
    """BASE_CONFIG with `extra` keys added to [services.SERVICE]."""
    header = f"[services.{service}]\n"
    assert header in BASE_CONFIG
    return BASE_CONFIG.replace(header, header + extra, 1)


def connect_from(source: str, address, timeout: float = WAIT) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect(address)
    return sock


def udp_from(source: str, address, payload: bytes, timeout: float) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.settimeout(timeout)
        sock.sendto(payload, address)
        try:
            return sock.recvfrom(65535)[0]
        except TimeoutError:
            return None


def assert_refused(sock: socket.socket) -> None:
    """Accepted and closed at once: nothing but EOF (or a reset)."""
    try:
        assert sock.recv(100) == b""
    except ConnectionResetError:
        pass
    finally:
        sock.close()


def assert_echoes(address, payload: bytes = b"still served") -> None:
    with connect(address) as sock:
        sock.sendall(payload)
        assert recv_exactly(sock, len(payload)) == payload


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- access control ---------------------------------------------------------------


def test_only_from_refuses_other_sources_tcp_and_udp(start_evd):
    evd = start_evd(with_service("echo", 'only_from = ["127.0.0.1/32"]\n'))
    assert_refused(connect_from("127.0.0.2", evd.addr("echo")))
    reject = evd.wait_for("conn.reject", service="echo")
    assert reject["reason"] == "access" and reject["peer"].startswith("127.0.0.2:")
    assert udp_from("127.0.0.2", evd.addr("echo", "udp"), b"x", 0.5) is None
    drop = evd.wait_for("udp.drop", service="echo", reason="access")
    assert drop["peer"].startswith("127.0.0.2:") and drop["count"] >= 1
    # the allowed source is served as before, over both protocols
    with connect_from("127.0.0.1", evd.addr("echo")) as ok:
        ok.sendall(b"hi")
        assert recv_exactly(ok, 2) == b"hi"
    assert udp_from("127.0.0.1", evd.addr("echo", "udp"), b"y", WAIT) == b"y"


def test_no_access_is_checked_after_only_from(start_evd):
    evd = start_evd(with_service("echo", 'only_from = ["127.0.0.0/8"]\nno_access = ["127.0.0.2"]\n'))
    assert_refused(connect_from("127.0.0.2", evd.addr("echo")))
    assert evd.wait_for("conn.reject", service="echo")["reason"] == "access"
    with connect_from("127.0.0.3", evd.addr("echo")) as ok:
        ok.sendall(b"ok")
        assert recv_exactly(ok, 2) == b"ok"


def test_ipv4_mapped_peers_on_a_dual_stack_listener_match_ipv4_rules(start_evd):
    config = BASE_CONFIG.replace(
        '[services.echo]\ntcp = ["127.0.0.1:0"]', '[services.echo]\nonly_from = ["127.0.0.1"]\ntcp = ["*:0"]'
    )
    evd = start_evd(config)
    port = evd.addr("echo")[1]
    with connect_from("127.0.0.1", ("127.0.0.1", port)) as ok:
        ok.sendall(b"v4")
        assert recv_exactly(ok, 2) == b"v4"
    assert evd.wait_for("conn.open", service="echo")["peer"].startswith("127.0.0.1:")
    assert_refused(connect_from("127.0.0.2", ("127.0.0.2", port)))
    assert evd.wait_for("conn.reject", service="echo")["reason"] == "access"
    if socket.has_ipv6:
        try:
            v6 = socket.create_connection(("::1", port), timeout=WAIT)
        except OSError:
            return  # no IPv6 loopback here
        assert_refused(v6)


# -- limits ------------------------------------------------------------------------


@pytest.mark.no_workers_variant(
    "max_connections is split among workers and one client reaches one worker (docs/guide/workers.md)"
)
def test_max_connections(start_evd):
    evd = start_evd(with_service("echo", "max_connections = 3\n"))
    address = evd.addr("echo")
    held = [connect(address) for _ in range(3)]
    for sock in held:  # all three really admitted
        sock.sendall(b"a")
        assert recv_exactly(sock, 1) == b"a"
    assert_refused(connect(address))
    assert evd.wait_for("conn.reject", service="echo")["reason"] == "max_connections"
    held.pop().close()
    evd.wait_for("conn.close", service="echo")
    assert_echoes(address)
    for sock in held:
        sock.close()


def test_per_source(start_evd):
    evd = start_evd(with_service("echo", "per_source = 2\n"))
    address = evd.addr("echo")
    held = [connect_from("127.0.0.1", address) for _ in range(2)]
    for sock in held:
        sock.sendall(b"a")
        assert recv_exactly(sock, 1) == b"a"
    assert_refused(connect_from("127.0.0.1", address))
    assert evd.wait_for("conn.reject", service="echo")["reason"] == "per_source"
    with connect_from("127.0.0.2", address) as other:
        other.sendall(b"b")
        assert recv_exactly(other, 1) == b"b"
    for sock in held:
        sock.close()


def test_connection_rate_token_bucket(start_evd):
    evd = start_evd(with_service("echo", "rate = 0.5\nburst = 3\n"))
    address = evd.addr("echo")
    admitted = 0
    for _ in range(6):
        with connect(address) as sock:
            try:
                sock.sendall(b"r")
                sock.shutdown(socket.SHUT_WR)  # admitted ones end after the echo
                admitted += recv_all(sock) == b"r"
            except OSError:  # refused: reset, broken pipe or not connected
                pass
    # 0.5 tokens/s refill cannot add a whole token within this quick loop
    assert admitted == 3
    assert evd.wait_for("conn.reject", service="echo")["reason"] == "rate"


def test_datagram_rate_token_bucket(start_evd):
    evd = start_evd(with_service("echo", "rate = 0.5\nburst = 4\n"))
    address = evd.addr("echo", "udp")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.5)
        for i in range(10):
            sock.sendto(b"%d" % i, address)
        replies = []
        while True:
            try:
                replies.append(sock.recvfrom(100)[0])
            except TimeoutError:
                break
    assert replies == [b"0", b"1", b"2", b"3"]
    assert evd.wait_for("udp.drop", service="echo", reason="rate")


def test_idle_timeout_closes_silent_connections_only(start_evd):
    evd = start_evd(with_service("echo", "idle_timeout = 0.6\n"))
    address = evd.addr("echo")
    silent = connect(address)
    with connect(address) as chatty:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:  # traffic every 0.2 s keeps it open
            chatty.sendall(b".")
            assert recv_exactly(chatty, 1) == b"."
            time.sleep(0.2)  # pacing the client, not synchronisation
        closed = evd.wait_for("conn.close", service="echo", reason="idle")
        assert_refused(silent)
        chatty.sendall(b"!")
        assert recv_exactly(chatty, 1) == b"!"
    assert closed["duration_ms"] >= 600


def test_slowloris_frame_is_closed(start_evd):
    evd = start_evd(with_service("framed", "idle_timeout = 0.8\n"))
    frame = encode({"svc": "echo"}, b"x" * 100)
    with connect(evd.addr("framed")) as sock:
        sock.recv(65536)  # hello
        closed = None
        for byte in frame:  # one byte every 0.2 s: never idle, never done
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.2)  # pacing the attacker
            closed = next(
                (e for e in evd.drain_events() if e["event"] == "conn.close" and e["service"] == "framed"),
                None,
            )
            if closed:
                break
    assert closed and closed["reason"] == "frame_timeout"


# -- backpressure and memory ---------------------------------------------------------


def flood_without_reading(address, total: int, chunk: bytes) -> tuple[socket.socket, int]:
    """Send up to `total` bytes, never reading, until the daemon stops taking
    them (its kernel buffers are full). The socket and the bytes sent."""
    sock = connect(address)
    sock.setblocking(False)
    sent = 0
    deadline = time.monotonic() + WAIT
    while sent < total and time.monotonic() < deadline:
        # Writable within 0.2 s, or the daemon has stopped reading us.
        if not select.select([], [sock], [], 0.2)[1]:
            break
        try:
            sent += sock.sendall(chunk) or len(chunk)
        except BlockingIOError:
            break
    return sock, sent


@pytest.mark.parametrize("service", ["echo", "framed"])
def test_a_client_that_never_reads_is_throttled(start_evd, service):
    evd = start_evd()
    address = evd.addr(service)
    before = rss_kib(evd.proc.pid)
    # framed: whole echo frames, so the daemon has real work to queue
    chunk = encode({"svc": "echo"}, b"f" * 65000) if service == "framed" else b"f" * 65536
    sock, sent = flood_without_reading(address, 200 << 20, chunk)
    try:
        grown = rss_kib(evd.proc.pid) - before
        assert sent < 200 << 20, "the daemon took 200 MiB from a client that never reads"
        assert grown < 32 * 1024, f"RSS grew {grown} KiB"
        started = time.monotonic()
        assert_echoes(evd.addr("echo"))
        assert time.monotonic() - started < 0.5
    finally:
        sock.close()


def test_chargen_reader_that_stops_reading_keeps_memory_bounded(evd):
    before = rss_kib(evd.proc.pid)
    with connect(evd.addr("chargen")) as sock:
        sock.recv(1000)
        evd.wait_for("conn.open", service="chargen")
        assert_echoes(evd.addr("echo"))  # a loop turn later the queue is full
        assert rss_kib(evd.proc.pid) - before < 32 * 1024


# -- descriptor exhaustion -----------------------------------------------------------


@pytest.mark.no_workers_variant("limits the supervisor's descriptors; test_workers_steering starves a worker")
def test_descriptor_exhaustion_backs_off_and_recovers(evd):
    address = evd.addr("echo")
    first = connect(address)
    first.sendall(b"1")
    assert recv_exactly(first, 1) == b"1"
    resource.prlimit(evd.proc.pid, resource.RLIMIT_NOFILE, (64, 64))
    crowd = []
    try:
        for _ in range(80):  # more than 64 descriptors' worth
            crowd.append(connect(address))
        backoff = evd.wait_for("listener.backoff", service="echo")
        assert "Errno 24" in backoff["error"]
        first.sendall(b"2")  # connections it has are still served
        assert recv_exactly(first, 1) == b"2"
        # One second of exhaustion with a connection pending: a loop that
        # spins on the readable listener would burn ~1 s of CPU here.
        cpu_before = cpu_seconds(evd.proc.pid)
        time.sleep(1.0)  # the measurement window, not synchronisation
        used = cpu_seconds(evd.proc.pid) - cpu_before
        assert used < 0.2, f"{used:.2f} s of CPU in 1 s of exhaustion"
        backoffs = [e for e in evd.drain_events() if e["event"] == "listener.backoff"]
        assert len(backoffs) <= 3
    finally:
        for sock in crowd:
            sock.close()
    # the crowd's connections close, descriptors free up, accepting resumes
    assert_echoes(address)
    first.close()


# -- abrupt peers --------------------------------------------------------------------


def test_vanishing_and_resetting_mid_frame_disturb_nobody(evd):
    address = evd.addr("framed")
    frame = encode({"svc": "echo", "id": 1}, b"z" * 1000)
    with connect(address) as bystander:
        bystander.recv(65536)
        vanish = connect(address)
        vanish.recv(65536)  # the hello: closing with it unread would be a reset
        vanish.sendall(frame[:30])
        vanish.close()
        evd.wait_for("conn.close", service="framed", reason="eof")
        reset = connect(address)
        reset.sendall(frame[:500])
        reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        reset.close()
        evd.wait_for("conn.close", service="framed", reason="reset")
        bystander.sendall(frame)
        decoder = Decoder()
        while (reply := decoder.next_frame()) is None:
            decoder.feed(bystander.recv(65536))
    assert reply.header["id"] == 1 and reply.body == b"z" * 1000


def test_two_thousand_concurrent_connections(evd):
    address = evd.addr("echo")
    socks = []
    try:
        for _ in range(2000):
            socks.append(connect(address))
        for i, sock in enumerate(socks):
            sock.sendall(b"%05d" % i)
        for i, sock in enumerate(socks):
            assert recv_exactly(sock, 5) == b"%05d" % i
    finally:
        for sock in socks:
            sock.close()
