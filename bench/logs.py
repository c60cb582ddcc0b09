"""`evd logs summary --json` against `jq -c . FILE`, side by side.

    .venv/bin/python bench/logs.py                  # 1,000,000 lines, 5 rounds
    .venv/bin/python bench/logs.py --lines 200000 --rounds 1   # a smoke run
    .venv/bin/python bench/logs.py --generate-only --file /tmp/evd-1m.log

Generates a realistic evd log (the events, fields and separators a real
`evd run` writes, see tests/e2e/test_logs_reader.py for the real thing) of
`--lines` lines, about 200 bytes each, once per `--file` (kept, so later
runs reuse it), then times `jq -c . FILE > /dev/null` (jq only parsing,
the least an operator's pipeline does) and `evd logs summary --json FILE`
alternately, round after round: the machine is shared, so the two see the
same load, and the medians are compared.  Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What a busy evd logs, by share of lines: connections open and close in
# pairs and are most of it; refusals, drops, auth failures and commands are
# the rest; daemon-level events are rare.
SERVICES = (("echo", 40), ("daytime", 15), ("time", 15), ("framed", 25), ("timefmt", 5))
REASONS = (("eof", 80), ("done", 10), ("reset", 5), ("idle", 3), ("bad_frame", 1), ("auth", 1))
REJECTS = (("rate", 50), ("per_source", 20), ("access", 20), ("max_connections", 5), ("banned", 5))
COMMANDS = ("uptime", "greet", "df", "backup")


def _weighted(pairs: tuple[tuple[str, int], ...]) -> tuple[list[str], list[int]]:
    return [p[0] for p in pairs], [p[1] for p in pairs]


class Generator:
    """Lines as evd's JSON renderer writes them (json.dumps separators,
    timestamp/level/event/pid first), with a timestamp that advances."""

    def __init__(self, seed: int = 11):
        self.rng = random.Random(seed)
        self.now = 1_767_225_600.0  # 2026-01-01T00:00:00Z
        self.conn = 0
        self.pid = 4242
        v4 = [
            f"{self.rng.randrange(1, 224)}.{self.rng.randrange(256)}.{self.rng.randrange(256)}.{i % 250 + 1}"
            for i in range(5000)
        ]
        v6 = [
            f"2001:db8:{self.rng.randrange(65536):x}:{i:x}::{self.rng.randrange(65536):x}" for i in range(800)
        ]
        self.peers = v4 + v6
        # A few clients make most connections (Zipf-like), as in real traffic.
        self.peer_weights = [1.0 / (rank + 1) ** 1.1 for rank in range(len(self.peers))]
        self.services = _weighted(SERVICES)
        self.reasons = _weighted(REASONS)
        self.rejects = _weighted(REJECTS)
        self.open: list[tuple[int, str, str, float]] = []

    def _ts(self) -> str:
        self.now += self.rng.expovariate(2000.0)
        micro = int(self.now * 1_000_000)
        sec, us = divmod(micro, 1_000_000)
        base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return f"{base}.{us:06d}Z" if us else f"{base}Z"

    def _line(self, level: str, event: str, **fields: object) -> str:
        return json.dumps(
            {"timestamp": self._ts(), "level": level, "event": event, "pid": self.pid, **fields}
        )

    def _peer(self) -> str:
        ip = self.rng.choices(self.peers, self.peer_weights)[0]
        port = self.rng.randrange(1024, 65536)
        return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"

    def lines(self, count: int):
        rng = self.rng
        made = 0
        while made < count:
            roll = rng.random()
            if roll < 0.46 or (roll < 0.92 and not self.open):
                self.conn += 1
                svc = rng.choices(*self.services)[0]
                peer = self._peer()
                self.open.append((self.conn, svc, peer, self.now))
                yield self._line("info", "conn.open", service=svc, peer=peer, conn=self.conn)
            elif roll < 0.92:
                conn, svc, peer, _ = self.open.pop(rng.randrange(len(self.open)))
                size = int(rng.expovariate(1 / 600))
                yield self._line(
                    "info",
                    "conn.close",
                    service=svc,
                    peer=peer,
                    conn=conn,
                    duration_ms=round(rng.lognormvariate(1.5, 1.4), 3),
                    bytes_in=size,
                    bytes_out=size if svc == "echo" else rng.randrange(4, 4000),
                    reason=rng.choices(*self.reasons)[0],
                )
            elif roll < 0.955:
                times = 1 if rng.random() < 0.7 else rng.randrange(2, 200)
                yield self._line(
                    "warning",
                    "conn.reject",
                    service=rng.choices(*self.services)[0],
                    peer=self._peer(),
                    reason=rng.choices(*self.rejects)[0],
                    count=times,
                )
            elif roll < 0.965:
                yield self._line(
                    "warning",
                    "udp.drop",
                    service="echo",
                    peer=self._peer(),
                    reason="loop",
                    count=rng.randrange(1, 30),
                )
            elif roll < 0.975:
                yield self._line("warning", "auth.fail", conn=self.conn, peer=self._peer())
            elif roll < 0.995:
                name = rng.choice(COMMANDS)
                argv = [name, "-h"]
                cpid = rng.randrange(10_000, 99_999)
                yield self._line("info", "command.start", name=name, argv=argv, command_pid=cpid, key="ops")
                made += 1
                timed_out = rng.random() < 0.02
                yield self._line(
                    "info",
                    "command.end",
                    name=name,
                    argv=argv,
                    command_pid=cpid,
                    exit=None if timed_out else rng.choice((0, 0, 0, 0, 1, 2)),
                    signal=15 if timed_out else None,
                    timed_out=timed_out,
                    truncated=rng.random() < 0.01,
                    duration_ms=round(rng.lognormvariate(3, 1), 3),
                    key="ops",
                )
            elif roll < 0.999:
                yield self._line(
                    "error",
                    "error",
                    where=rng.choice(("echo.read", "framed.command", "log.reopen")),
                    exc_info="Traceback (most recent call last):\n  ...\nOSError: [Errno 5] I/O error",
                )
            else:
                ok = rng.random() < 0.8
                yield self._line(
                    "info", "config.reload", ok=ok, added=[], removed=[], changed=["echo"] if ok else []
                )
            made += 1


def generate(path: Path, count: int) -> None:
    tmp = path.with_suffix(path.suffix + ".part")
    with open(tmp, "w", encoding="utf-8") as out:
        out.write(
            json.dumps(
                {
                    "timestamp": "2025-12-31T23:59:59.000001Z",
                    "level": "info",
                    "event": "daemon.start",
                    "pid": 4242,
                    "version": "0.1.0",
                    "config": "/etc/evd/evd.toml",
                }
            )
            + "\n"
        )
        batch: list[str] = []
        for line in Generator().lines(count - 2):
            batch.append(line)
            if len(batch) == 10_000:
                out.write("\n".join(batch) + "\n")
                batch.clear()
        if batch:
            out.write("\n".join(batch) + "\n")
        out.write(
            json.dumps(
                {
                    "timestamp": "2026-01-02T00:00:00.000001Z",
                    "level": "info",
                    "event": "daemon.stop",
                    "pid": 4242,
                    "reason": "signal",
                    "signal": "SIGTERM",
                }
            )
            + "\n"
        )
    os.replace(tmp, path)


def timed(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command and its children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--file", type=Path, help="the log to make (kept); default /tmp/evd-bench-N.log")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--generate-only", action="store_true")
    args = parser.parse_args()
    path = args.file or Path(f"/tmp/evd-bench-{args.lines}.log")
    if not path.exists():
        print(f"generating {args.lines:,} lines into {path} ...", flush=True)
        generate(path, args.lines)
    size = path.stat().st_size
    print(f"{path}: {args.lines:,} lines, {size / 1e6:.0f} MB")
    if args.generate_only:
        return 0
    jq = shutil.which("jq")
    if jq is None:
        print("jq is not installed", file=sys.stderr)
        return 1
    with open(path, "rb") as f:  # into the page cache, so neither side pays the disk
        while f.read(1 << 24):
            pass
    commands = {
        "jq": [jq, "-c", ".", str(path)],
        "evd": [sys.executable, "-m", "evd", "logs", "summary", "--json", str(path)],
    }
    wall: dict[str, list[float]] = {name: [] for name in commands}
    cpu: dict[str, list[float]] = {name: [] for name in commands}
    for rnd in range(args.rounds):
        for name, argv in commands.items():  # alternately: both see the same load
            w, c = timed(argv)
            wall[name].append(w)
            cpu[name].append(c)
        print(
            f"round {rnd + 1}: jq {wall['jq'][-1]:.2f} s ({cpu['jq'][-1]:.2f} s CPU), "
            f"evd {wall['evd'][-1]:.2f} s ({cpu['evd'][-1]:.2f} s CPU)",
            flush=True,
        )
    jq_wall, evd_wall = statistics.median(wall["jq"]), statistics.median(wall["evd"])
    jq_cpu, evd_cpu = statistics.median(cpu["jq"]), statistics.median(cpu["evd"])
    n = args.rounds
    print(
        f"median of {n}, wall: jq {jq_wall:.2f} s, evd {evd_wall:.2f} s: evd {jq_wall / evd_wall:.1f}× faster"
    )
    print(f"median of {n}, CPU:  jq {jq_cpu:.2f} s, evd {evd_cpu:.2f} s: evd {jq_cpu / evd_cpu:.1f}× less")
    rate = f"{args.lines / evd_wall / 1e6:.2f} M lines/s, {size / evd_wall / 1e6:.0f} MB/s"
    print(f"  evd {rate}; {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
