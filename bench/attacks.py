"""Attacks and faults against a real evd, with the figures for docs/performance/index.md.

    python3 bench/attacks.py [--seconds 5]

For each attack: a fresh `evd run` with the reference limits (rate 200/s,
burst 400, per_source 64, ...) on free loopback ports; the attack runs from
127.0.0.1 for a few seconds while a well-behaved client on 127.0.0.3 makes
an echo round trip every 10 ms. Printed per attack: how evd answered (from
its own log), its RSS growth, its CPU use during the attack, and the
well-behaved client's p50/p99 latency and failures. Not part of the test
suite; every loop here is bounded in count and time.
"""

from __future__ import annotations

import argparse
import resource
import select
import socket
import struct
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from benchenv import ensure_venv

if __name__ == "__main__":
    ensure_venv(__file__)  # evd's dependencies live there, not in the system Python

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from support.daemon import EvdProcess

from evd.proto.framing import encode
from evd.tools.bench.probes import process_cpu, process_rss_kb

CONFIG = """\
[daemon]
pidfile = "{tmp}/evd.pid"
[log]
level = "info"
[services.echo]
tcp = ["127.0.0.1:0"]
udp = ["127.0.0.1:0"]
[services.daytime]
enabled = false
[services.time]
enabled = false
[services.timefmt]
enabled = false
[services.framed]
tcp = ["127.0.0.1:0"]
idle_timeout = 2.0
"""


class Prober(threading.Thread):
    """The well-behaved client: one echo round trip every 10 ms."""

    def __init__(self, address):
        super().__init__(daemon=True)
        self.address = address
        self.latencies: list[float] = []
        self.failures = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.perf_counter()
            try:
                with socket.socket() as sock:
                    sock.settimeout(2.0)
                    sock.bind(("127.0.0.3", 0))
                    sock.connect(self.address)
                    sock.sendall(b"probe")
                    sock.shutdown(socket.SHUT_WR)
                    if sock.recv(16) != b"probe":
                        raise OSError("bad echo")
                self.latencies.append(time.perf_counter() - started)
            except OSError:
                self.failures += 1
            self.stop.wait(0.01)

    def figures(self) -> tuple[float, float]:
        data = sorted(self.latencies) or [float("nan")]
        return data[len(data) // 2] * 1e3, data[min(len(data) - 1, int(len(data) * 0.99))] * 1e3


def until(deadline: float) -> bool:
    return time.monotonic() < deadline


# -- the attacks: each runs for `seconds` against a ready evd -----------------------


def never_reads(evd, seconds):
    """Sends 200 MiB to echo and never reads."""
    sock = socket.create_connection(evd.addr("echo"))
    sock.setblocking(False)
    chunk, sent, deadline = b"x" * 65536, 0, time.monotonic() + seconds
    while sent < 200 << 20 and until(deadline):
        if select.select([], [sock], [], 0.1)[1]:
            try:
                sent += sock.send(chunk)
            except BlockingIOError:
                pass
    sock.close()
    return f"took {sent >> 20} MiB of 200 MiB offered, then stopped reading"


def pipelines_without_reading(evd, seconds):
    """Pipelines 10,000 framed echo requests and never reads."""
    sock = socket.create_connection(evd.addr("framed"))
    sock.setblocking(False)
    data = memoryview(b"".join(encode({"svc": "echo", "id": i}, b"p" * 1024) for i in range(10_000)))
    deadline = time.monotonic() + seconds
    closed = ""
    while data and until(deadline):
        if select.select([], [sock], [], 0.1)[1]:
            try:
                data = data[sock.send(data) :]
            except BlockingIOError:
                pass
            except OSError as exc:
                closed = f"; closed by evd: {exc.strerror}"
                break
    sock.close()
    return f"{len(data) >> 10} KiB of 10.3 MiB not taken{closed}"


def connection_flood(evd, seconds):
    """Opens and closes connections as fast as one thread can."""
    n, deadline = 0, time.monotonic() + seconds
    while until(deadline):
        try:
            with socket.create_connection(evd.addr("echo"), timeout=1) as sock:
                sock.sendall(b"x")
        except OSError:
            pass
        n += 1
    return f"{n} connections attempted"


def cycling_sources(evd, seconds):
    """UDP datagrams from 50,000 distinct source addresses (127.1.x.y)."""
    address, n, deadline = evd.addr("echo", "udp"), 0, time.monotonic() + seconds
    socks = []
    for i in range(50_000):
        if not until(deadline):
            break
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((f"127.1.{i // 250}.{i % 250 + 1}", 0))
            sock.sendto(b"x", address)
            n += 1
        finally:
            sock.close()
    del socks
    return f"{n} sources"


def slowloris(evd, seconds):
    """300 framed connections, each trickling a frame at a byte per 0.5 s."""
    frame = encode({"svc": "echo"}, b"s" * 200)
    socks = [socket.create_connection(evd.addr("framed")) for _ in range(300)]
    sent, deadline = 0, time.monotonic() + seconds
    while until(deadline) and sent < len(frame):
        for sock in socks:
            try:
                sock.send(frame[sent : sent + 1])
            except OSError:
                pass
        sent += 1
        time.sleep(0.5)  # the attacker's pace
    for sock in socks:
        sock.close()
    return "300 trickling connections"


def descriptor_exhaustion(evd, seconds):
    """RLIMIT_NOFILE lowered to 64, then 200 connections held."""
    resource.prlimit(evd.proc.pid, resource.RLIMIT_NOFILE, (64, 64))
    socks, deadline = [], time.monotonic() + seconds
    for _ in range(200):
        try:
            socks.append(socket.create_connection(evd.addr("echo"), timeout=1))
        except OSError:
            break
    while until(deadline):
        time.sleep(0.1)  # holding them
    for sock in socks:
        sock.close()
    return "200 connections against 64 descriptors"


def resets(evd, seconds):
    """Connections that send 256 KiB and reset (SO_LINGER 0) mid-transfer."""
    n, deadline = 0, time.monotonic() + seconds
    while until(deadline):
        sock = socket.create_connection(evd.addr("echo"))
        sock.setblocking(False)
        try:
            sock.send(b"r" * 262144)
        except BlockingIOError:
            pass
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        n += 1
    return f"{n} resets"


def loop_guard(evd, seconds):
    """UDP datagrams claiming to come from port 7 (echo): a reflection loop."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 7))
        n, deadline = 0, time.monotonic() + seconds
        while until(deadline):
            sock.sendto(b"loop", evd.addr("echo", "udp"))
            n += 1
    return f"{n} datagrams from port 7"


ATTACKS = [
    never_reads,
    pipelines_without_reading,
    connection_flood,
    cycling_sources,
    slowloris,
    descriptor_exhaustion,
    resets,
    loop_guard,
]


def answered(evd) -> str:
    """How evd answered, from its log."""
    counts = Counter()
    for e in evd.drain_events():
        name = e.get("event")
        if name in ("conn.reject", "udp.drop"):
            counts[f"{name} {e.get('reason')}"] += e.get("count", 1)
        elif name == "conn.close" and e.get("reason") not in ("eof",):
            counts[f"close {e.get('reason')}"] += 1
        elif name in ("listener.backoff", "error"):
            counts[name] += 1
    return ", ".join(f"{k} ×{v}" for k, v in counts.most_common(4)) or "served"


def run(attack, seconds: float, tmp: Path) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    evd = EvdProcess(tmp, CONFIG).ready()
    try:
        prober = Prober(evd.addr("echo"))
        prober.start()
        time.sleep(0.5)  # a baseline for the prober
        rss0, cpu0, t0 = (
            process_rss_kb(evd.proc.pid, tree=False),
            process_cpu(evd.proc.pid, tree=False),
            time.monotonic(),
        )
        peak = rss0
        result = {}
        worker = threading.Thread(target=lambda: result.setdefault("note", attack(evd, seconds)))
        worker.start()
        while worker.is_alive():
            peak = max(peak, process_rss_kb(evd.proc.pid, tree=False))
            worker.join(0.1)
        elapsed = time.monotonic() - t0
        cpu = (process_cpu(evd.proc.pid, tree=False) - cpu0) / elapsed
        prober.stop.set()
        prober.join(5)
        p50, p99 = prober.figures()
        return {
            "attack": attack.__doc__.strip().rstrip("."),
            "note": result.get("note", ""),
            "answer": answered(evd),
            "rss_growth_mib": (peak - rss0) / 1024,
            "cpu_pct": cpu * 100,
            "p50_ms": p50,
            "p99_ms": p99,
            "probe_failures": prober.failures,
            "probes": len(prober.latencies),
        }
    finally:
        evd.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--tmp", default="/tmp/evd-attacks")
    args = parser.parse_args()
    print("| attack | how evd answered | RSS growth | evd CPU | well-behaved p50 / p99 | probe failures |")
    print("|---|---|---|---|---|---|")
    for i, attack in enumerate(ATTACKS):
        r = run(attack, args.seconds, Path(args.tmp) / str(i))
        print(
            f"| {r['attack']} ({r['note']}) | {r['answer']} | {r['rss_growth_mib']:.1f} MiB | "
            f"{r['cpu_pct']:.0f}% | {r['p50_ms']:.2f} / {r['p99_ms']:.2f} ms | "
            f"{r['probe_failures']} of {r['probes'] + r['probe_failures']} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
