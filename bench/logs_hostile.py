"""`evd logs` on hostile logs, two trees side by side (docs/performance/hardening.md).

    git archive a63ec65 | tar -x -C /tmp/before
    .venv/bin/python bench/logs_hostile.py --before /tmp/before [--rounds 3]

1. An over-long line (12 MB and 50 MB of NUL bytes after one event): the
   wall time and peak RSS of `evd logs summary --json`, per tree.
2. The per-line CPU of `Summary.feed` on 400,000 evd conn.open/conn.close
   lines (checking timestamps costs the fast path something: how much).

Rounds alternate between the trees, so both see the same load; compare the
ratios.  Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FEED = """
import sys, time
sys.path.insert(0, sys.argv[1])
from evd.tools.logs.summary import Summary
lines = open(sys.argv[2], "rb").read().split(b"\\n")
best = 1e9
for _ in range(3):
    s = Summary()
    t = time.process_time()
    s.feed(lines)
    best = min(best, time.process_time() - t)
print(best / len(lines) * 1e9)
"""


def long_log(path: Path, megabytes: int) -> None:
    start = {"timestamp": "2026-03-01T10:00:00.000000Z", "level": "info", "event": "daemon.start", "pid": 7}
    path.write_bytes(json.dumps(start).encode() + b"\n" + b"\0" * (megabytes << 20) + b"\n")


def busy_log(path: Path, lines: int) -> None:
    rng, moment = random.Random(1), datetime(2026, 3, 1, 10, tzinfo=UTC)
    with open(path, "w") as out:
        for conn in range(lines // 2):
            moment += timedelta(microseconds=rng.randint(100, 3000))
            head = {"timestamp": moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "level": "info"}
            who = {
                "service": rng.choice(["echo", "daytime", "framed"]),
                "peer": f"192.0.2.{rng.randint(1, 200)}:5",
            }
            out.write(json.dumps({**head, "event": "conn.open", "pid": 7, **who, "conn": conn}) + "\n")
            close = {"duration_ms": rng.random() * 10, "bytes_in": 5, "bytes_out": 5, "reason": "eof"}
            out.write(
                json.dumps({**head, "event": "conn.close", "pid": 7, **who, "conn": conn, **close}) + "\n"
            )


def summary_run(tree: Path, log: Path) -> str:
    out = subprocess.run(
        [
            "/usr/bin/time",
            "-f",
            "%e s, %M KiB",
            sys.executable,
            "-m",
            "evd",
            "logs",
            "summary",
            "--json",
            str(log),
        ],
        cwd=tree,
        capture_output=True,
        text=True,
    )
    return out.stderr.strip().splitlines()[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="a tree of evd to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    trees = {"before": args.before.resolve(), "after": ROOT}
    with tempfile.TemporaryDirectory() as tmp:
        for megabytes in (12, 50):
            long_log(Path(tmp) / f"long{megabytes}.log", megabytes)
        busy_log(Path(tmp) / "busy.log", 400_000)
        for n in range(1, args.rounds + 1):
            for megabytes in (12, 50):
                for side, tree in trees.items():
                    took = summary_run(tree, Path(tmp) / f"long{megabytes}.log")
                    print(f"round {n} {megabytes} MB line  {side:6}: {took}")
            feed = {}
            for side, tree in trees.items():
                run = [sys.executable, "-c", FEED, str(tree), str(Path(tmp) / "busy.log")]
                feed[side] = float(subprocess.run(run, capture_output=True, text=True, check=True).stdout)
            ratio = feed["after"] / feed["before"]
            before, after = feed["before"], feed["after"]
            print(f"round {n} Summary.feed: before {before:,.0f} ns/line, after {after:,.0f}, {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
