"""The control socket and /metrics with workers, where their defects hid
(issue 23 items 1, 2, 2b, and the 413 of item 8): a real evd with
`workers = 2`, real clients."""

from __future__ import annotations

import os
import signal
import socket

import pytest
from support.ctl import WORKERS, ask
from support.daemon import SPREAD, WAIT, connect, recv_all
from support.metrics import scrape, value

UNIX_A = 'unix = ["{tmp}/echo.sock"]'
UNIX_B = 'unix = ["{tmp}/echo-b.sock"]'

# These tests set `workers` themselves (tests/conftest.py).
pytestmark = pytest.mark.no_workers_variant("sets workers itself")


def first_workers(evd) -> set[int]:
    return {evd.wait_for("worker.start", worker=i, generation=0)["worker_pid"] for i in (0, 1)}


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_reload_that_replaces_the_workers_always_answers(start_evd):
    """Item 2: `ctl reload` said a good reload failed when a retired worker
    left while the supervisor went through its channels."""
    evd = start_evd(WORKERS)
    first_workers(evd)
    text = WORKERS.format(tmp=evd.tmp)
    for i in range(20):  # each reload moves echo's UNIX listener: a new generation
        a, b = (UNIX_A, UNIX_B) if i % 2 == 0 else (UNIX_B, UNIX_A)
        text = text.replace(a.format(tmp=evd.tmp), b.format(tmp=evd.tmp))
        evd.config_path.write_text(text)
        answer = ask(evd, "reload")
        assert answer.ok, (i, answer)
        assert answer.body is not None and len(answer.body["added"]) == 1, answer.body
    assert ask(evd, "info").body["workers"] == 2
    assert evd.stop() == 0


def test_metrics_after_a_reload_that_switches_a_service_off(start_evd):
    """Item 1: a service known only from exited workers broke every scrape
    (KeyError), and each failed scrape leaked its connection."""
    evd = start_evd(WORKERS)
    first = first_workers(evd)
    with connect(evd.addr("discard")) as sock:
        sock.sendall(b"gone")
    evd.wait_for("conn.close", service="discard")
    mark = len(evd.drain_events())
    evd.config_path.write_text(
        evd.config_path.read_text().replace(
            "[services.discard]\nenabled = true", "[services.discard]\nenabled = false"
        )
    )
    evd.send(signal.SIGHUP)
    evd.wait_for_since(mark, "config.reload", ok=True)
    for pid in first:
        evd.wait_for_since(mark, "worker.exit", worker_pid=pid)
    status, _, text = scrape(evd.addr("metrics"))
    assert status == 200
    assert value(text, "evd_connections_total", service="discard") == 1  # kept: a counter
    assert value(text, "evd_connections_current", service="discard") == 0
    before = open_fds(evd.proc.pid)
    for _ in range(40):
        assert scrape(evd.addr("metrics"))[0] == 200
    assert open_fds(evd.proc.pid) <= before + 2  # flat: no connection left behind
    assert evd.stop() == 0


def test_cpu_seconds_never_go_back_when_workers_are_replaced(start_evd):
    """Item 2b: the CPU of retired workers vanished from the sum."""
    evd = start_evd(WORKERS)
    first = first_workers(evd)
    payload = b"x" * (4 << 20)
    for _ in range(6):  # some CPU in the workers that will retire
        with connect(evd.addr("echo")) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            assert len(recv_all(sock)) == len(payload)
    before = value(scrape(evd.addr("metrics"))[2], "process_cpu_seconds_total")
    mark = len(evd.drain_events())
    evd.config_path.write_text(
        evd.config_path.read_text().replace(UNIX_A.format(tmp=evd.tmp), UNIX_B.format(tmp=evd.tmp))
    )
    evd.send(signal.SIGHUP)
    for pid in first:
        evd.wait_for_since(mark, "worker.exit", worker_pid=pid)
    after = value(scrape(evd.addr("metrics"))[2], "process_cpu_seconds_total")
    assert after >= before, (before, after)
    assert evd.stop() == 0


def test_a_body_too_large_is_413_even_when_it_comes_with_the_head(start_evd):
    """Item 8: head and an oversized body in one write were answered 431."""
    evd = start_evd(WORKERS)
    body = b"a" * 20000
    with connect(evd.addr("metrics")) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 20000\r\n\r\n" + body)
        answer = recv_all(sock)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:60]
    with connect(evd.addr("metrics"), timeout=WAIT) as sock:  # a head too large is still 431
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + body + b"\r\n\r\n")
        assert recv_all(sock).startswith(b"HTTP/1.1 431 ")
    assert evd.stop() == 0


def test_listings_over_many_connections_come_whole_from_both_workers(start_evd):
    """Item 11: each worker sends its rows a slice at a time (part frames),
    the supervisor merges them lazily; the answer is whole and in order."""
    evd = start_evd(WORKERS)
    first_workers(evd)
    # From two client addresses: steering sends each to one worker.
    socks = [connect(evd.addr("echo"), source=SPREAD[i % 2]) for i in range(300)]
    try:
        for sock in socks:  # each one accepted and answering
            sock.sendall(b"x")
            assert sock.recv(1) == b"x"
        rows = ask(evd, "conns", "echo").body["conns"]
        ids = [row["conn"] for row in rows]
        assert len(ids) == 300 and ids == sorted(ids) and len(set(ids)) == 300
        assert {row["worker"] for row in rows} == {0, 1}
        assert {row["peer"] for row in rows} == {"{}:{}".format(*s.getsockname()) for s in socks}
        sources = ask(evd, "sources", "echo").body["sources"]
        assert sorted((r["ip"], r["connections"]) for r in sources) == [(SPREAD[0], 150), (SPREAD[1], 150)]
    finally:
        for sock in socks:
            sock.close()
    assert evd.stop() == 0
