"""`evd bench` against a real `evd run`: every mode, briefly.

Each run is one second with small counts: it must finish by itself, count
requests and see no errors.  The figures themselves are the benchmark's
business (bench/run.py), not the test suite's.
"""

from __future__ import annotations

import ipaddress
import multiprocessing
import socket
import time

import pytest
from support.bench import evd_bench, run_json
from support.daemon import services_off

from evd.tools.bench import measure, report
from evd.tools.bench.measure import Window
from evd.tools.bench.modes import ConnectMode
from evd.tools.bench.options import BenchError, Options
from evd.tools.bench.target import SOURCE_BASE, SourcePorts, Target, find

# evd's default limits (no [limits] table), per_source lowered so that a
# generator not spreading its connections over addresses is refused, and an
# access list that admits only the addresses `--sources` spreads over.
SPREAD_CONFIG = """\
[daemon]
pidfile = "{tmp}/evd.pid"
shutdown_timeout = 5.0

[log]
level = "info"
format = "json"

[services.echo]
tcp = ["127.0.0.1:0"]
udp = ["127.0.0.1:0"]
only_from = ["127.64.0.0/10"]
per_source = 2
"""
SPREAD_CONFIG += services_off("daytime", "time", "timefmt", "framed")


def address(evd, service: str, proto: str = "tcp") -> str:
    host, port = evd.addr(service, proto)
    return f"{host}:{port}"


@pytest.mark.parametrize(
    "mode, service, proto, extra",
    [
        ("tcp", "echo", "tcp", ["-n", "4", "-s", "100"]),
        ("udp", "echo", "udp", ["-n", "4"]),
        ("connect", "echo", "tcp", ["-n", "4"]),
        ("framed", "framed", "tcp", ["-n", "3", "-D", "4", "-P", "2"]),
    ],
)
def test_a_one_second_run_counts_requests_and_no_errors(evd, mode, service, proto, extra):
    result = run_json(
        mode,
        "--address",
        address(evd, service, proto),
        "-d",
        "1",
        "-w",
        "0",
        "--server-pid",
        str(evd.proc.pid),
        *extra,
    )
    assert result["mode"] == mode
    assert result["requests"] > 0 and result["req_s"] > 0
    assert result["errors"] == 0, result
    assert result["p50_us"] <= result["p99_us"] <= result["p999_us"]
    assert result["generator_cpu_s"] >= 0 and result["generator_cpu_us_per_req"] > 0
    assert result["server_cpu_us_per_req"] is not None


def test_idle_holds_connections_then_checks_them(evd):
    result = run_json(
        "idle", "--address", address(evd, "echo"), "-n", "200", "-d", "1", "--server-pid", str(evd.proc.pid)
    )
    assert result["held"] == 200
    assert result["requests"] > 0 and result["errors"] == 0, result
    assert result["rss_after_kb"] >= result["rss_before_kb"] > 0


def test_the_default_address_comes_from_the_config(evd, tmp_path):
    config = tmp_path / "client.toml"  # the daemon's own file says port 0
    config.write_text(f'[services.echo]\ntcp = ["{address(evd, "echo")}"]\n')
    proc = evd_bench("tcp", "-c", str(config), "-n", "2", "-d", "0.3", "-w", "0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("tcp c=2 s=64") and "errors 0" in proc.stdout


def test_refuses_remote_targets_and_unbounded_runs():
    proc = evd_bench("tcp", "--address", "192.0.2.1:7", "-d", "1")
    assert proc.returncode == 1 and "non-loopback" in proc.stderr
    proc = evd_bench("tcp", "--address", "127.0.0.1:7", "-d", "301")
    assert proc.returncode == 1 and "duration" in proc.stderr


@pytest.mark.parametrize("mode", ["tcp", "connect"])
def test_a_closed_port_is_a_set_up_error_not_a_hang(mode):
    proc = evd_bench(mode, "--address", f"127.0.0.1:{_closed_port()}", "-d", "1")
    assert proc.returncode == 1 and "set-up" in proc.stderr


@pytest.mark.parametrize(
    "mode, proto, extra",
    [
        ("tcp", "tcp", ["-n", "8", "--sources", "4"]),  # 2 per address: per_source admits them
        ("connect", "tcp", ["-n", "4", "--sources", "64"]),
        # Enough addresses that none reaches the default rate (200/s, burst
        # 400) however fast the server answers.
        ("udp", "udp", ["-n", "4", "--sources", "2048"]),
    ],
)
def test_sources_spread_the_load_over_addresses_the_server_admits(start_evd, mode, proto, extra):
    evd = start_evd(SPREAD_CONFIG)
    result = run_json(mode, "--address", address(evd, "echo", proto), "-d", "0.5", "-w", "0", *extra)
    assert result["sources"] == int(extra[-1])
    assert result["requests"] > 0 and result["errors"] == 0, result
    # Admitted, all of it: evd refused nothing.  (A datagram the generator
    # counts as lost is one answered after 0.2 s, which a busy machine can
    # cause; a refusal would be in evd's log.)
    assert evd.stop() == 0
    # (A reply the kernel's send buffer had no room for is a drop too, but
    # not a refusal: a busy machine can cause it.)
    refused = [
        e
        for e in evd.events
        if e.get("event") == "conn.reject"
        or (e.get("event") == "udp.drop" and e["reason"] in ("access", "rate"))
    ]
    assert not refused, refused


def test_without_sources_the_generator_is_a_client_the_server_refuses(start_evd):
    evd = start_evd(SPREAD_CONFIG)
    result = run_json("udp", "--address", address(evd, "echo", "udp"), "-d", "0.5", "-w", "0", "-n", "2")
    assert "sources" not in result
    assert result["requests"] == 0 and result["lost"] > 0, result
    evd.wait_for("udp.drop", reason="access")


def test_sources_are_distinct_loopback_addresses_clear_of_the_target():
    opts = Options(mode="udp", address="127.64.0.2:7", sources=100)
    opts.check()
    sources = find(opts).sources
    assert len(sources) == len(set(sources)) == 100
    assert "127.64.0.2" not in sources and sources[0] == str(SOURCE_BASE)
    assert all(ipaddress.ip_address(a) in ipaddress.ip_network("127.64.0.0/10") for a in sources)
    # Without `sources`: streams from 127.0.0.2-5 (not the target), UDP the kernel's choice.
    assert find(Options(mode="tcp", address="127.0.0.3:7")).sources == ("127.0.0.2", "127.0.0.4", "127.0.0.5")
    assert find(Options(mode="udp", address="127.0.0.1:7")).sources == ()


@pytest.mark.parametrize("address", ["[::1]:7", "unix:/tmp/x.sock"])
def test_sources_need_an_ipv4_loopback_target(address):
    with pytest.raises(BenchError, match="sources"):
        find(Options(mode="tcp", address=address, sources=4))


def test_sources_are_bounded():
    with pytest.raises(BenchError, match="sources"):
        Options(sources=70000).check()


def test_connect_source_pairs_turn_the_address_fastest_and_keep_their_number():
    addresses = tuple(str(SOURCE_BASE + i) for i in range(1024))
    ports = SourcePorts(addresses)
    assert ports.usable and len(addresses) * (ports.hi - ports.lo + 1) == SourcePorts.PAIRS
    bound = []
    for _ in range(3):
        sock = socket.socket()
        try:
            ports.bind(sock)
            bound.append(sock.getsockname()[0])
        finally:
            sock.close()
    assert len(set(bound)) == 3, bound
    assert SourcePorts(addresses[:4]).hi - SourcePorts.FIRST + 1 >= 4096  # four: a wide range each


def _connect_run(target: Target, out) -> None:
    opts = Options(mode="connect", connections=2, duration=0.3, warmup=0)
    opts.check()
    mode = ConnectMode(opts, target, 0, 2)
    try:
        out.send(mode.run(Window(time.monotonic(), 0, 0.3)))
    finally:
        mode.close()


def test_connect_failing_at_once_ends_the_run_by_itself():
    """A connect() that fails at once (here ENETUNREACH: TCP to a multicast
    address never leaves the host) must be counted, retried next tick, and
    not keep the loop refilling forever."""
    ctx = multiprocessing.get_context("fork")
    mine, theirs = ctx.Pipe()
    child = ctx.Process(target=_connect_run, args=(Target(socket.AF_INET, ("224.0.0.1", 7), ()), theirs))
    child.start()
    try:
        assert mine.poll(10), "the connect run did not end"
        result = mine.recv()
    finally:
        child.kill()
        child.join(5)
    assert result["requests"] == 0 and result["errors"] >= 2, result
    assert any("unreachable" in why for why in result["why"]), result


def test_percentiles_of_a_histogram():
    histogram = {10: 50, 20: 49, 1000: 1}
    assert report.percentile(histogram, 100, 0.5) == 10
    assert report.percentile(histogram, 100, 0.99) == 20
    assert report.percentile(histogram, 100, 0.999) == 1000
    assert report.percentile({}, 0, 0.5) is None


def test_payloads_are_distinct_and_sized():
    for size in (1, 4, 64, 1024):
        payloads = measure.payloads(size)
        assert {len(p) for p in payloads} == {size}
    assert len(set(measure.payloads(64))) == measure.VARIANTS


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # bound, never listening: refused
