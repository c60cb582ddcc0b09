"""What a big control answer costs everyone else: echo latency while
`evd ctl conns` runs against many idle connections (issue 23 item 11).

    python3 bench/control_answers.py --before REV [--after REV] [--connections 18000] [--rounds 3]

One evd at a time (`git archive` of each revision: `after` defaults to HEAD),
each in the same interleaved rounds: N idle TCP connections to echo, then a
probe process pings echo with one byte at a time (a fresh ping as soon as
the answer is in) while this process asks `conns` over the control socket
K times.  Printed per variant: how long `conns` took, its size, and the
probe's round trips *during* the `conns` requests (p50, p99, max), with the
after/before ratio of the same round.  Not a test: figures, not verdicts.
The machine may be shared: read the ratios, not the absolutes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchenv import OTHERS_OFF, free_port

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evd.proto.control import Request  # noqa: E402
from evd.tools import ctl  # noqa: E402

CONFIG = """\
[daemon]
pidfile = "{tmp}/evd.pid"
[log]
level = "warning"
[limits]
max_connections = 100000
per_source = 100000
rate = 0.0
idle_timeout = 3600.0
[control]
unix = "{tmp}/ctl.sock"
[services.echo]
tcp = ["127.0.0.1:{port}"]
udp = []
"""
CONFIG += OTHERS_OFF


def start(src: Path, tmp: Path) -> tuple[subprocess.Popen[bytes], tuple[str, int]]:
    """evd from `src`, logging warnings only (18,000 conn.open lines would
    be part of what is measured); ready once its control socket answers."""
    port = free_port()
    (tmp / "evd.toml").write_text(CONFIG.format(tmp=tmp, port=port))
    proc = subprocess.Popen(
        [sys.executable, "-m", "evd", "run", "-c", str(tmp / "evd.toml")],
        cwd=src,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            ctl.request(str(tmp / "ctl.sock"), Request("info"), 5)
            return proc, ("127.0.0.1", port)
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"evd from {src} did not start")


def probe(address: tuple[str, int], stop: Any, out: multiprocessing.Queue) -> None:
    """Ping-pong one byte until `stop` is set; (when, round trip) of each."""
    samples = []
    with socket.create_connection(address, timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while not stop.is_set():
            now = time.monotonic()
            sock.sendall(b"x")
            sock.recv(1)
            samples.append((now, time.monotonic() - now))
            time.sleep(0.0005)
    out.put(samples)


def measure(src: Path, count: int, asks: int) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="evd-ctl-bench-"))
    proc, address = start(src, tmp)
    idle: list[socket.socket] = []
    try:
        for _ in range(count):
            idle.append(socket.create_connection(address, timeout=10))
        path = str(tmp / "ctl.sock")
        while ctl.request(path, Request("info"), 30).body["connections"] < count:  # type: ignore[index]
            time.sleep(0.05)
        queue: multiprocessing.Queue = multiprocessing.Queue()
        stop = multiprocessing.Event()
        prober = multiprocessing.Process(target=probe, args=(address, stop, queue))
        windows, took, size = [], [], 0
        prober.start()
        time.sleep(0.5)  # the probe's own warm-up
        for _ in range(asks):
            began = time.monotonic()
            answer = ctl.request(path, Request("conns"), 60)
            ended = time.monotonic()
            windows.append((began, ended))
            took.append(ended - began)
            size = len(json.dumps(answer.body))
            time.sleep(0.2)
        stop.set()
        samples = queue.get(timeout=60)
        prober.join(30)
    finally:
        for sock in idle:
            sock.close()
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)
    return {"conns_s": statistics.median(took), "bytes": size, **_during(samples, windows)}


def _during(samples: list[tuple[float, float]], windows: list[tuple[float, float]]) -> dict[str, float]:
    rtts = sorted(rtt for when, rtt in samples if any(a <= when <= b for a, b in windows))
    if not rtts:
        return {"probes": 0, "p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    pick = lambda q: rtts[min(len(rtts) - 1, int(q * len(rtts)))] * 1000  # noqa: E731
    return {"probes": len(rtts), "p50_ms": pick(0.5), "p99_ms": pick(0.99), "max_ms": rtts[-1] * 1000}


def unpack(rev: str) -> Path:
    """`git archive REV` in a fresh directory: evd's code as it was there."""
    where = Path(tempfile.mkdtemp(prefix="evd-bench-src-"))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive.stdout, check=True)
    return where


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", required=True, metavar="REV", help="git revision to compare with")
    parser.add_argument("--after", default="HEAD", metavar="REV", help="git revision measured (HEAD)")
    parser.add_argument("--connections", type=int, default=18000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--asks", type=int, default=3, help="`conns` requests per measurement")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    count = min(args.connections, hard - 200)
    variants = {"before": unpack(args.before), "after": unpack(args.after)}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    try:
        for round_no in range(args.rounds):
            for name, src in variants.items():  # interleaved: the machine's mood hits both
                results[name].append(measure(src, count, args.asks))
                print(f"round {round_no + 1} {name}: {results[name][-1]}", file=sys.stderr)
    finally:
        for src in variants.values():
            shutil.rmtree(src, ignore_errors=True)
    print(f"{count} idle connections, `conns` asked {args.asks} times per round, {args.rounds} rounds")
    print("| variant | conns (s) | answer (MB) | echo p50 (ms) | echo p99 (ms) | echo max (ms) | probes |")
    print("|---|---|---|---|---|---|---|")
    for name, rows in results.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        print(
            f"| {name} | {med['conns_s']:.3f} | {med['bytes'] / 1e6:.2f} | {med['p50_ms']:.2f} | "
            f"{med['p99_ms']:.2f} | {med['max_ms']:.1f} | {int(med['probes'])} |"
        )
    ratios = [a["p99_ms"] / b["p99_ms"] for a, b in zip(results["after"], results["before"], strict=True)]
    print(f"echo p99 after/before, per round: {', '.join(f'{r:.3f}' for r in ratios)}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
