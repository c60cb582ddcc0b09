"""`evd bench` against a real `evd run`: every mode, briefly.

Each run is one second with small counts: it must finish by itself, count
requests and see no errors.  The figures themselves are the benchmark's
business (tests/bench/run.py), not the test suite's.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
from conftest import ROOT

from evd.tools import bench


def evd_bench(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "evd", "bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )


def run_json(*args: str) -> dict:
    proc = evd_bench(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])


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


def test_a_closed_port_is_a_set_up_error_not_a_hang():
    proc = evd_bench("tcp", "--address", f"127.0.0.1:{_closed_port()}", "-d", "1")
    assert proc.returncode == 1 and "set-up" in proc.stderr


def test_percentiles_of_a_histogram():
    histogram = {10: 50, 20: 49, 1000: 1}
    assert bench.percentile(histogram, 100, 0.5) == 10
    assert bench.percentile(histogram, 100, 0.99) == 20
    assert bench.percentile(histogram, 100, 0.999) == 1000
    assert bench.percentile({}, 0, 0.5) is None


def test_payloads_are_distinct_and_sized():
    for size in (1, 4, 64, 1024):
        payloads = bench.payloads(size)
        assert {len(p) for p in payloads} == {size}
    assert len(set(bench.payloads(64))) == bench.VARIANTS


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # bound, never listening: refused
