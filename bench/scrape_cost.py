"""What a /metrics scrape costs evd, with few and with many open connections.

    python3 bench/scrape_cost.py                  # 0 and 10,000 idle connections
    python3 bench/scrape_cost.py --connections 0,1000,10000 --scrapes 200

Starts `evd run` (from this checkout, with the running Python) with an echo
service and a metrics port, opens N idle connections to echo, then times
`--scrapes` GET /metrics on one kept-alive connection.  The time from the
request's send to the response's last byte, on loopback, bounds the loop
time the scrape took (it includes the client's own work too).  Prints one
line per N: median, p95 and max in milliseconds, and the response size.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import http.client
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchenv import OTHERS_OFF, free_port

ROOT = Path(__file__).resolve().parent.parent
CONFIG = """\
[daemon]
pidfile = "{tmp}/evd.pid"
[log]
level = "warning"
file = "{tmp}/evd.log"
[limits]
max_connections = 100000
per_source = 100000
rate = 0.0
[metrics]
tcp = ["127.0.0.1:{metrics}"]
[services.echo]
tcp = ["127.0.0.1:{echo}"]
udp = []
"""
CONFIG += OTHERS_OFF


def wait_connectable(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
            return
        except OSError:
            time.sleep(0.05)  # a client polling for the daemon's port, bounded
    raise SystemExit(f"nothing listens on {port}")


def measure(conn: http.client.HTTPConnection, scrapes: int) -> tuple[list[float], int]:
    times, size = [], 0
    for _ in range(scrapes):
        started = time.perf_counter()
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        size = len(response.read())
        times.append((time.perf_counter() - started) * 1000)
    return times, size


def main() -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--connections", default="0,10000")
    parser.add_argument("--scrapes", type=int, default=100)
    args = parser.parse_args()
    counts = [int(n) for n in args.connections.split(",")]
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory() as tmp:
        echo, metrics = free_port(), free_port()
        path = Path(tmp) / "evd.toml"
        path.write_text(CONFIG.format(tmp=tmp, echo=echo, metrics=metrics))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen([sys.executable, "-m", "evd", "run", "-c", str(path)], env=env, cwd=ROOT)
        held: list[socket.socket] = []
        try:
            wait_connectable(metrics, time.monotonic() + 30)
            for count in counts:
                while len(held) < count:
                    held.append(socket.create_connection(("127.0.0.1", echo), timeout=10.0))
                conn = http.client.HTTPConnection("127.0.0.1", metrics, timeout=10.0)
                measure(conn, 5)  # warm
                times, size = measure(conn, args.scrapes)
                conn.close()
                times.sort()
                print(
                    f"{count:>6} open connections: scrape median {statistics.median(times):.2f} ms, "
                    f"p95 {times[int(len(times) * 0.95) - 1]:.2f} ms, max {times[-1]:.2f} ms "
                    f"({size} bytes, {args.scrapes} scrapes)"
                )
        finally:
            for sock in held:
                sock.close()
            proc.terminate()
            proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
