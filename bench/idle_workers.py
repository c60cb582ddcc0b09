"""100,000 idle connections over workers (not part of the suite).

    .venv/bin/python bench/idle_workers.py --connections 100000 --workers 7

One process may hold at most the hard RLIMIT_NOFILE (20,000 here) descriptors,
so 100,000 connections need several workers, and a generator spread over
processes (`evd bench idle -P`).  The kernel steers each client IP to one
worker (server/sockets.py `steer`), so the generator spreads over many source
addresses (`--sources`, 127.64.0.0/10): each worker gets its share.

While they are held: echo p99 from another client (`evd bench tcp -n 1`), the
RSS summed over the supervisor and its workers (before and while held: per
connection), each worker's descriptors.  Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

CONFIG = """\
[daemon]
pidfile = "{tmp}/evd.pid"
workers = {workers}

[log]
file = "{tmp}/evd.log"
level = "warning"

[limits]
max_connections = 1000000
per_source = 1000000
rate = 0.0
idle_timeout = 3600.0

[services.echo]
tcp = ["127.0.0.1:{port}"]
udp = []
"""


def tree(pid: int) -> list[int]:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return [pid]
    return [pid, *map(int, kids)]


def rss_kib(pid: int) -> int:
    try:
        match = re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return 0
    return int(match.group(1)) if match else 0


def fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=7)
    parser.add_argument("--processes", type=int, default=6, help="generator processes")
    parser.add_argument("--sources", type=int, default=7000)
    parser.add_argument("--hold", type=float, default=40.0, help="seconds held (the probe runs meanwhile)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="evd-idle-"))
    # A port the kernel just gave out: the log is at warning (100,000
    # conn.open lines would be a benchmark of the log), so it names no port.
    with socket.socket() as probe_sock:
        probe_sock.bind(("127.0.0.1", 0))
        port = probe_sock.getsockname()[1]
    address = f"127.0.0.1:{port}"
    (tmp / "evd.toml").write_text(CONFIG.format(tmp=tmp, workers=args.workers, port=port))
    log = tmp / "evd.log"
    evd = subprocess.Popen(
        [PY, "-m", "evd", "run", "-c", str(tmp / "evd.toml")], cwd=ROOT, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while len(tree(evd.pid)) < args.workers + 1:
            assert time.monotonic() < deadline and evd.poll() is None, "evd did not start"
            time.sleep(0.2)
        time.sleep(1.0)  # the workers' start-up allocations done
        before = sum(rss_kib(p) for p in tree(evd.pid))
        idle = subprocess.Popen(
            [PY, "-m", "evd", "bench", "idle", "--address", address, "-n", str(args.connections)]
            + ["-P", str(args.processes), "--sources", str(args.sources), "-d", str(args.hold), "--json"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        # Held once the workers hold them: their descriptors tell.
        deadline = time.monotonic() + 600
        while sum(fds(p) for p in tree(evd.pid)[1:]) < args.connections and idle.poll() is None:
            assert time.monotonic() < deadline, "the connections were not all accepted"
            time.sleep(1.0)
        held_at = time.monotonic()
        probe = subprocess.run(
            [
                PY,
                "-m",
                "evd",
                "bench",
                "tcp",
                "--address",
                address,
                "-n",
                "1",
                "-d",
                "10",
                "-w",
                "1",
                "--json",
            ]
            + ["--sources", "1"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        pids = tree(evd.pid)
        during = sum(rss_kib(p) for p in pids)
        per_worker = {p: fds(p) for p in pids[1:]}
        out, _ = idle.communicate(timeout=args.hold + 600)
        result = json.loads(out.strip().splitlines()[-1])
        echo = json.loads(probe.stdout.strip().splitlines()[-1]) if probe.returncode == 0 else {}
        print(
            json.dumps(
                {
                    "connections": args.connections,
                    "workers": args.workers,
                    "held": result.get("held"),
                    "idle_errors": result.get("errors"),
                    "setup_s": result.get("setup_s"),
                    "probe_took_s": round(time.monotonic() - held_at, 1),
                    "echo_p50_us": echo.get("p50_us"),
                    "echo_p99_us": echo.get("p99_us"),
                    "echo_errors": echo.get("errors"),
                    "rss_before_kib": before,
                    "rss_held_kib": during,
                    "rss_per_conn_kib": round((during - before) / args.connections, 3),
                    "worker_fds": sorted(per_worker.values()),
                    "errors_logged": (log.read_text().count('"level": "error"')),
                    "backoffs_logged": log.read_text().count('"listener.backoff"'),
                }
            )
        )
    finally:
        evd.terminate()
        evd.wait(120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
