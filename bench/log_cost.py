"""What logging costs per connection: the same evd at `info` (conn.open and
conn.close logged for every connection) and at `warning` (nothing logged),
server CPU per connection, side by side.

    gcc -O2 -Wall -o /tmp/loadgen ../shared/bench/loadgen.c -lm
    .venv/bin/python bench/log_cost.py                  # 3 interleaved rounds, both generators
    .venv/bin/python bench/log_cost.py --rounds 5 --duration 5 --generator loadgen

Two evd processes (one per level; log to a file, JSON, as an operator's
evd would), each serving echo on a port of its own, both pinned to CPU 0;
the generator on CPU 1: `loadgen tcp-connect -c 20` (connect, 64 bytes
echoed, close; 20 in flight) and `evd bench connect -n 20`.  Rounds
alternate info/warning so both see the same load on a shared machine; the
figure is the median over rounds of server CPU µs per connection (from
/proc, by the generator's --server-pid), and the ratio info / warning of
the medians and of each round.  Not part of the test suite.

`--micro` measures the log alone, in this process: the two lines of a
connection rendered and queued as the loop does (`log.batched`), written
to a file once per connection or once per 50, CPU µs per connection.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchenv import OTHERS_OFF, free_port

ROOT = Path(__file__).resolve().parents[1]
LOADGEN = Path(os.environ.get("LOADGEN", "/tmp/loadgen"))

CONFIG = """\
[daemon]
pidfile = "{tmp}/evd-{level}.pid"

[log]
level = "{level}"
format = "json"
file = "{tmp}/evd-{level}.log"

[limits]
max_connections = 5000
per_source = 5000
rate = 0.0

[services.echo]
tcp = ["127.0.0.1:{port}"]
udp = []
"""
CONFIG += OTHERS_OFF


def start(tmp: Path, level: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    config = tmp / f"evd-{level}.toml"
    config.write_text(CONFIG.format(tmp=tmp, level=level, port=port))
    proc = subprocess.Popen(
        ["taskset", "-c", "0", sys.executable, "-m", "evd", "run", "-c", str(config)],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"evd at {level} did not start") from None
            time.sleep(0.05)


def measure(generator: str, port: int, pid: int, duration: float) -> float:
    """Server CPU µs per connection for one run."""
    if generator == "loadgen":
        command = [str(LOADGEN), "tcp-connect", "--port", str(port), "-c", "20", "-w", "1",
                   "-d", str(duration), "--server-pid", str(pid)]  # fmt: skip
    else:
        command = [sys.executable, "-m", "evd", "bench", "connect", "--address", f"127.0.0.1:{port}",
                   "-n", "20", "-w", "1", "-d", str(duration), "--server-pid", str(pid),
                   "--json"]  # fmt: skip
    done = subprocess.run(
        ["taskset", "-c", "1", *command], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    if done.returncode != 0:
        raise SystemExit(f"{generator} failed: {done.stderr.strip()}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return cpu_per_request(result)


def cpu_per_request(result: dict) -> float:
    if "srv_cpu_pct" in result and result.get("rps"):  # loadgen: % of a CPU over the run
        return result["srv_cpu_pct"] * 1e4 / result["rps"]
    for key in ("server_cpu_us_per_req", "cpu_us_per_req", "server_us_per_req"):
        if key in result:
            return float(result[key])
    server = result.get("server") or {}
    for key in ("cpu_us_per_req", "cpu_us_per_request"):
        if key in server:
            return float(server[key])
    raise SystemExit(f"no server CPU per request in {result}")


def micro(connections: int = 50_000) -> None:
    sys.path.insert(0, str(ROOT))
    from evd.log.logger import Log

    class Loop:  # what the sink asks of the reactor; a regular file needs none of it
        def add_writer(self, fd: int, callback: object) -> None: ...
        def remove_writer(self, fd: int) -> None: ...
        def call_later(self, delay: float, callback: object) -> None: ...

    class Conn:  # what the two lines read of a transport
        host, port, peer, conn_id, bytes_in, bytes_out = "127.0.0.1", 40000, "127.0.0.1:40000", 0, 64, 64
        log_ident: str | None = None

    with tempfile.TemporaryDirectory() as folder:
        log = Log()
        log.configure("info", "json", f"{folder}/evd.log")
        for every in (1, 50, 1, 50):
            with log.batched(Loop()):
                started = time.process_time()
                for i in range(connections):
                    conn = Conn()
                    log.conn_open(conn, "echo", i, "tcp", {})
                    log.conn_close(conn, "echo", 123, "eof", {})
                    if i % every == 0:
                        log.sink.flush()
                spent = time.process_time() - started
            print(f"two lines per connection, a write per {every:2d}: {spent / connections * 1e6:.2f} µs CPU")
        log.sink.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--generator", choices=("loadgen", "evd-bench", "both"), default="both")
    parser.add_argument("--micro", action="store_true", help="the log alone, in this process")
    args = parser.parse_args()
    if args.micro:
        micro()
        return
    if args.generator != "evd-bench" and not LOADGEN.exists():
        raise SystemExit(f"build {LOADGEN} first: gcc -O2 -Wall -o {LOADGEN} ../shared/bench/loadgen.c -lm")
    if shutil.which("taskset") is None:
        raise SystemExit("taskset (util-linux) is needed to pin server and generator")
    generators = ("loadgen", "evd-bench") if args.generator == "both" else (args.generator,)
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        servers = {level: start(tmp, level) for level in ("info", "warning")}
        try:
            for generator in generators:
                figures: dict[str, list[float]] = {"info": [], "warning": []}
                for round_ in range(args.rounds):
                    order = ("info", "warning") if round_ % 2 == 0 else ("warning", "info")
                    for level in order:
                        proc, port = servers[level]
                        figures[level].append(measure(generator, port, proc.pid, args.duration))
                    time.sleep(1)  # let TIME_WAIT settle between rounds (loadgen's README)
                info, warning = statistics.median(figures["info"]), statistics.median(figures["warning"])
                each = [i / w for i, w in zip(figures["info"], figures["warning"], strict=True)]
                print(
                    f"{generator:9s} connect -c 20, server CPU µs/connection, median of {args.rounds}: "
                    f"info {info:.1f}, warning {warning:.1f}, info/warning {info / warning:.3f} "
                    f"(rounds: {', '.join(f'{r:.3f}' for r in each)})"
                )
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(10)


if __name__ == "__main__":
    main()
