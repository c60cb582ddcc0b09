"""GET /metrics (SPEC section 9): counts after known traffic, the exposition
as promtool and prometheus_client's parser read it, HTTP/1.1 behaviour
(keep-alive, 404, 405, bounds), a stalled scraper, workers, and the parts
(figures, the lag probe, process metrics) on their own."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.ctl import CONFIG, WORKERS, ask
from support.daemon import SPREAD, WAIT, connect, need, recv_all, recv_exactly
from support.metrics import scrape, value

from evd.loop.reactor import Reactor
from evd.server.metrics import exposition, snapshot
from evd.tools.client import Client


def echo(address: tuple[str, int], payload: bytes) -> None:
    with connect(address) as sock:
        sock.sendall(payload)
        assert recv_exactly(sock, len(payload)) == payload
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b""


def test_counts_after_known_traffic(start_evd, tmp_path):
    key = tmp_path / "framed.key"
    key.write_bytes(b"sesame")
    key.chmod(0o600)
    evd = start_evd(CONFIG.replace("[services.framed]\n", f'[services.framed]\nkey_file = "{key}"\n'))
    for _ in range(3):
        echo(evd.addr("echo"), b"12345")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(WAIT)
        for _ in range(2):
            udp.sendto(b"datagram", evd.addr("echo", "udp"))
            assert udp.recv(100) == b"datagram"
    with Client("{}:{}".format(*evd.addr("framed")), timeout=WAIT, key=b"sesame") as client:
        assert client.call("command", name="greet", args=["you"]).body == b"hello you\n"
    with Client("{}:{}".format(*evd.addr("framed")), timeout=WAIT) as client:
        client.send({"svc": "auth", "mac": "00" * 32})
        assert client.recv().header["ok"] is False
    for _ in range(3):
        evd.wait_for("conn.close", service="echo")
    evd.wait_for("command.end", name="greet")
    evd.wait_for("auth.fail")
    status, content_type, text = scrape(evd.addr("metrics"))
    assert status == 200 and content_type == "text/plain; version=0.0.4; charset=utf-8"
    assert value(text, "evd_connections_total", service="echo") == 3
    assert value(text, "evd_connections_current", service="echo") == 0
    assert value(text, "evd_received_bytes_total", service="echo") == 15 + 16
    assert value(text, "evd_sent_bytes_total", service="echo") == 15 + 16
    assert value(text, "evd_requests_total", service="echo") == 2  # datagrams answered
    assert value(text, "evd_commands_total", command="greet", outcome="exit0") == 1
    assert value(text, "evd_commands_running") == 0
    assert value(text, "evd_auth_failures_total") == 1
    assert value(text, "evd_build_info", version=evd.wait_for("daemon.start")["version"]) == 1
    assert value(text, "evd_config_reloads_total", result="ok") == 0
    assert value(text, "evd_loop_lag_seconds_count") >= 0
    assert value(text, "process_open_fds") > 10
    assert value(text, "process_max_fds") > 0
    assert value(text, "process_resident_memory_bytes") > 1e6
    assert abs(value(text, "process_start_time_seconds") - time.time()) < 600
    # A refusal: by reason, and refused datagrams are drops.
    assert ask(evd, "set", "echo", "max_connections", "1").ok
    with connect(evd.addr("echo")) as held, connect(evd.addr("echo")) as refused:
        assert recv_all(refused) == b""
        evd.wait_for("conn.reject", service="echo")
        held.close()
    evd.send(signal.SIGHUP)
    evd.wait_for("config.reload", ok=True)
    text = scrape(evd.addr("metrics"))[2]
    assert value(text, "evd_rejected_total", service="echo", reason="max_connections") == 1
    assert value(text, "evd_config_reloads_total", result="ok") == 1
    assert evd.stop() == 0


def test_promtool_checks_a_live_scrape(start_evd):
    promtool = need("promtool")
    evd = start_evd(CONFIG)
    echo(evd.addr("echo"), b"x")
    text = scrape(evd.addr("metrics"))[2]
    out = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=WAIT
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert evd.stop() == 0


def test_keep_alive_404_405_and_one_connection(start_evd):
    evd = start_evd(CONFIG)
    conn = http.client.HTTPConnection(*evd.addr("metrics"), timeout=WAIT)
    try:
        for method, path, status in (
            ("GET", "/metrics", 200),
            ("GET", "/", 404),
            ("POST", "/metrics", 405),
            ("GET", "/metrics?x=1", 200),
        ):
            conn.request(method, path)
            response = conn.getresponse()
            response.read()
            assert response.status == status, (method, path)
            if status == 405:
                assert response.getheader("Allow") == "GET"
            assert not response.will_close
    finally:
        conn.close()
    closed = evd.wait_for("conn.close", service="metrics")
    opened = [e for e in evd.drain_events() if e.get("event") == "conn.open" and e["service"] == "metrics"]
    assert len(opened) == 1 and closed["reason"] == "eof"
    assert evd.stop() == 0


def test_bounded_requests(start_evd):
    evd = start_evd(CONFIG)
    with connect(evd.addr("metrics")) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
        answer = recv_all(sock)
    assert answer.startswith(b"HTTP/1.1 431 ")
    with connect(evd.addr("metrics")) as sock:
        sock.sendall(b"BREW /metrics HTCPCP/1.0\r\n\r\n")
        assert recv_all(sock).startswith(b"HTTP/1.1 400 ")
    assert evd.stop() == 0


def test_a_stalled_scraper_blocks_no_one(start_evd):
    evd = start_evd(CONFIG)
    with connect(evd.addr("metrics")) as half, connect(evd.addr("metrics")) as greedy:
        half.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and never the end
        greedy.setblocking(False)
        burst = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 100
        sent = 0
        try:  # pipelined, never reading the answers: evd stops reading it,
            for _ in range(2000):  # or refuses a pipeline past MAX_REQUEST unanswered
                sent += greedy.send(burst)
        except (BlockingIOError, ConnectionResetError):
            pass
        assert sent < 2000 * len(burst)
        started = time.monotonic()
        status, _, text = scrape(evd.addr("metrics"))
        assert status == 200 and "evd_build_info" in text
        assert time.monotonic() - started < WAIT / 2
        assert value(text, "evd_connections_current", service="echo") == 0
    assert evd.stop() == 0


@pytest.mark.no_workers_variant("sets workers itself")
def test_workers_one_scrape_sums_all_and_counts_survive_a_new_generation(start_evd):
    evd = start_evd(WORKERS)
    first = {evd.wait_for("worker.start", worker=i)["worker_pid"] for i in (0, 1)}
    socks = [connect(evd.addr("echo"), source=SPREAD[i % 2]) for i in range(30)]
    try:
        for sock in socks:
            sock.sendall(b"hi")
            assert recv_exactly(sock, 2) == b"hi"
        conns = {c["worker"] for c in ask(evd, "conns", "echo").body["conns"]}
        assert conns == {0, 1}  # both workers hold some: the sum is over both
        text = scrape(evd.addr("metrics"))[2]
        assert value(text, "evd_connections_current", service="echo") == 30
        assert value(text, "evd_connections_total", service="echo") == 30
    finally:
        for sock in socks:
            sock.close()
    for _ in range(30):
        evd.wait_for("conn.close", service="echo")
    text = scrape(evd.addr("metrics"))[2]
    assert value(text, "evd_received_bytes_total", service="echo") == 60
    # A listener added: a new generation of workers; the old ones retire.
    mark = len(evd.drain_events())
    evd.config_path.write_text(
        evd.config_path.read_text().replace(
            '[services.time]\ntcp = ["127.0.0.1:0"]', '[services.time]\ntcp = ["127.0.0.1:0", "127.0.0.2:0"]'
        )
    )
    evd.send(signal.SIGHUP)
    evd.wait_for_since(mark, "config.reload", ok=True)
    for pid in first:
        evd.wait_for_since(mark, "worker.exit", worker_pid=pid)
    text = scrape(evd.addr("metrics"))[2]
    assert value(text, "evd_connections_total", service="echo") == 30  # not reset
    assert value(text, "evd_received_bytes_total", service="echo") == 60
    assert value(text, "evd_config_reloads_total", result="ok") == 1
    echo(evd.addr("echo"), b"new")
    evd.wait_for_since(mark, "conn.close", service="echo")
    text = scrape(evd.addr("metrics"))[2]
    assert value(text, "evd_connections_total", service="echo") == 31
    assert evd.stop() == 0


# -- the parts ------------------------------------------------------------------------


def test_the_lag_probe_sees_a_blocked_loop():
    reactor = Reactor()
    probe = snapshot.LagProbe(reactor)
    probe.start()
    reactor.call_later(0.3, lambda: time.sleep(0.6))  # a handler that blocks
    reactor.call_later(1.5, reactor.stop)
    reactor.run()
    reactor.close()
    lag = probe.figures()
    late = sum(lag["buckets"][snapshot.LAG_BUCKETS.index(0.25) + 1 :])
    assert late >= 1 and lag["sum"] >= 0.3
    assert lag["count"] == sum(lag["buckets"]) >= 4


def test_figures_add_sums_and_leaves_gauges_of_the_gone():
    a = {"services": {"echo": {"connections_current": 2, "connections_total": 5, "rejected": {"rate": 1}}}}
    b = {"services": {"echo": {"connections_current": 1, "connections_total": 1, "rejected": {"access": 2}}}}
    out = snapshot.add(snapshot.total([a]), b, gauges=False)
    assert out == {
        "services": {
            "echo": {"connections_current": 2, "connections_total": 6, "rejected": {"rate": 1, "access": 2}}
        }
    }
    lag = snapshot.add({"lag": {"buckets": [1, 2], "sum": 0.5}}, {"lag": {"buckets": [3, 4], "sum": 1.0}})
    assert lag == {"lag": {"buckets": [4, 6], "sum": 1.5}}


def test_render_has_the_spec_names_and_passes_promtool():
    promtool = need("promtool")
    figs = {
        "services": {
            "echo": {
                "connections_current": 1,
                "connections_total": 7,
                "rejected": {"rate": 2},
                "udp_drops": {"loop": 1},
                "bytes_in": 10,
                "bytes_out": 9,
                "requests": 3,
                "errors": 0,
                "auth_failures": 0,
            }
        },
        "commands_running": 1,
        "commands": {"greet": {"exit0": 2, "timeout": 1}},
        "auth_failures": 4,
        "log_dropped": 5,
        "lag": {"buckets": [1] * (len(snapshot.LAG_BUCKETS) + 1), "sum": 2.0, "count": 14},
        "reloads": {"ok": 1},
        "pids": [os.getpid()],
    }
    text = exposition.render(figs).decode()
    out = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=WAIT
    )
    assert out.returncode == 0, out.stdout + out.stderr
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {
        "evd_build_info", "evd_connections", "evd_connections_current", "evd_rejected", "evd_udp_drops",
        "evd_received_bytes", "evd_sent_bytes", "evd_requests", "evd_errors", "evd_commands_running",
        "evd_commands", "evd_auth_failures", "evd_log_dropped_lines", "evd_config_reloads",
        "evd_loop_lag_seconds", "process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds",
        "process_max_fds", "process_start_time_seconds",
    } <= names  # fmt: skip
    assert value(text, "evd_rejected_total", service="echo", reason="rate") == 2
    assert value(text, "evd_udp_drops_total", service="echo", reason="loop") == 1
    assert value(text, "evd_commands_total", command="greet", outcome="timeout") == 1
    assert value(text, "evd_config_reloads_total", result="failed") == 0
    assert value(text, "evd_log_dropped_lines_total") == 5
    assert value(text, "evd_loop_lag_seconds_bucket", le="+Inf") == 14  # cumulative
    assert value(text, "evd_loop_lag_seconds_bucket", le="0.001") == 1


@pytest.mark.parametrize("by_size", [True, False])
def test_open_descriptors_by_size_and_by_listing(by_size):
    """The directory's size where the kernel gives it (6.2 on), the listing
    otherwise: both count the same descriptors."""
    extra = [socket.socket() for _ in range(50)]
    try:
        counted = exposition.open_fds(os.getpid(), by_size)
        listed = len(os.listdir(f"/proc/{os.getpid()}/fd"))
        assert abs(counted - listed) <= 1  # the listing's own descriptor
        assert counted >= 50
    finally:
        for sock in extra:
            sock.close()
