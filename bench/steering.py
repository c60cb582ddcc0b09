"""What steering clients to workers costs: `evd bench` tcp64 and connect against
workers = 2, this tree against an older one, in interleaved rounds of one run.

    .venv/bin/python bench/steering.py --before REV [--rounds 3] [--duration 5]

REV is a commit without the steering program (server/sockets.py `steer`);
its tree is exported to a temporary directory and run from there.  For TCP
the program runs once per connection (on the SYN), never for the bytes of an
established one, so tcp64 should not move and connect is the one to watch.
The generator uses its default sources (127.0.0.2-5), which steering spreads
over both workers.  Prints each round and the medians with after/before.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchenv import free_port

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

CONFIG = """\
[daemon]
pidfile = "{tmp}/evd.pid"
workers = 2

[log]
level = "warning"

[limits]
max_connections = 100000
per_source = 100000
rate = 0.0

[services.echo]
tcp = ["127.0.0.1:{port}"]
udp = []
"""


def round_of(tree: Path, modes: list[str], duration: float) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="evd-steer-"))
    port = free_port()
    (tmp / "evd.toml").write_text(CONFIG.format(tmp=tmp, port=port))
    evd = subprocess.Popen(
        [PY, "-m", "evd", "run", "-c", str(tmp / "evd.toml")], cwd=tree, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 30
        while True:  # serving once an echo comes back
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                    sock.sendall(b"x")
                    if sock.recv(1) == b"x":
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline and evd.poll() is None, "evd did not start"
            time.sleep(0.1)
        figures = {}
        for mode in modes:
            out = subprocess.run(
                [PY, "-m", "evd", "bench", mode, "--address", f"127.0.0.1:{port}", "-d", str(duration)]
                + ["-w", "1", "-s", "64", "--json"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            assert not result["errors"], result
            figures[mode] = float(result["req_s"])
        return figures
    finally:
        evd.terminate()
        evd.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="a commit without steering")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args()
    old = Path(tempfile.mkdtemp(prefix="evd-before-"))
    archive = subprocess.run(["git", "archive", args.before], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    modes = ["tcp", "connect"]
    runs: dict[str, dict[str, list[float]]] = {
        "before": {m: [] for m in modes},
        "after": {m: [] for m in modes},
    }
    for n in range(args.rounds):
        for name, tree in (
            (("before", old), ("after", ROOT)) if n % 2 == 0 else (("after", ROOT), ("before", old))
        ):
            figures = round_of(tree, modes, args.duration)
            for mode in modes:
                runs[name][mode].append(figures[mode])
            print(f"round {n + 1} {name:6s} " + "  ".join(f"{m} {figures[m]:9.0f} req/s" for m in modes))
    print("\nmedian req/s   before     after   after/before")
    for mode in modes:
        b, a = statistics.median(runs["before"][mode]), statistics.median(runs["after"][mode])
        print(f"{mode:10s} {b:9.0f} {a:9.0f}   {a / b:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
