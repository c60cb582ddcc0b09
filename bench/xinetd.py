"""evd against xinetd at xinetd's own job: a program started per connection.

    .venv/bin/python bench/xinetd.py                 # 5 interleaved rounds of 5 s
    .venv/bin/python bench/xinetd.py --rounds 3 --duration 3 --conns 20

Both servers run `/bin/cat` for each connection on a loopback port, started
fresh by this script in the foreground with their own configuration (xinetd
`-dontfork -f FILE`: never the system service), both logging each
connection to a file.  The load is ../shared/bench/loadgen.c in
`tcp-connect` mode (connect, send 64 bytes, read them back, close; `--conns`
in flight), built on first use.  Rounds alternate which server goes first;
each line is one round, and the ratio is evd's rate over xinetd's in that
round.  CPU per connection is the server's whole process tree (the daemon
plus the children it reaped: utime+stime+cutime+cstime), as loadgen samples
it with --server-pid.  With `taskset` present, servers run on CPU 0 and the
generator on CPU 1 (the method of loadgen's README).

Prints a Markdown table: per round and the medians.  Exits 1 if a server
did not start or a run had errors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchenv import free_port

ROOT = Path(__file__).resolve().parent.parent
# ../shared/bench/loadgen.c from the main checkout; two levels up from a worktree.
LOADGEN_SOURCES = [up / "shared" / "bench" / "loadgen.c" for up in (ROOT.parent, ROOT.parent.parent)]
PROGRAM = "/bin/cat"
START_WAIT = 10.0

XINETD_CONF = """\
defaults
{{
    instances = UNLIMITED
    per_source = UNLIMITED
    cps = 1000000 1
    log_type = FILE {tmp}/xinetd.log
}}
service evdbench
{{
    type = UNLISTED
    port = {port}
    bind = 127.0.0.1
    socket_type = stream
    protocol = tcp
    wait = no
    user = {user}
    server = {program}
}}
"""

EVD_CONF = """\
[daemon]
pidfile = "{tmp}/evd.pid"
[log]
file = "{tmp}/evd.log"
[limits]
max_connections = 5000
per_source = 5000
rate = 0.0
{off}
[services.cat]
exec = ["{program}"]
tcp = ["127.0.0.1:{port}"]
"""
BUILT_IN = ("echo", "discard", "chargen", "daytime", "time", "timefmt", "framed")


def wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_WAIT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)  # a benchmark's start-up, not a test
    raise SystemExit(f"nothing listening on {port} after {START_WAIT}s")


def pinned(cpu: int) -> list[str]:
    taskset = shutil.which("taskset")
    return [taskset, "-c", str(cpu)] if taskset and (os.cpu_count() or 1) > 1 else []


def start(name: str, tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A fresh server: (its process, its port)."""
    port = free_port()
    fill = {"tmp": tmp, "port": port, "program": PROGRAM}
    if name == "xinetd":
        conf = tmp / "xinetd.conf"
        user = "root" if os.geteuid() == 0 else os.environ.get("USER", "nobody")
        conf.write_text(XINETD_CONF.format(user=user, **fill))
        xinetd = shutil.which("xinetd") or "/usr/sbin/xinetd"
        argv = [xinetd, "-dontfork", "-f", str(conf), "-pidfile", str(tmp / "xinetd.pid")]
    else:
        conf = tmp / "evd.toml"
        off = "".join(f"[services.{s}]\nenabled = false\n" for s in BUILT_IN)
        conf.write_text(EVD_CONF.format(off=off, **fill))
        argv = [sys.executable, "-m", "evd", "run", "-c", str(conf)]
    # cwd "/": where systemd and `evd start` run a daemon.  (evd's spawner
    # starts the programs from any cwd: posix_spawn enters theirs.)
    proc = subprocess.Popen([*pinned(0), *argv], cwd="/", stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, proc)
    return proc, port


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def loadgen(path: str, port: int, pid: int, args: argparse.Namespace, label: str) -> dict[str, float]:
    argv = [*pinned(1), path, "tcp-connect", "--port", str(port), "-c", str(args.conns)]
    argv += ["-d", str(args.duration), "-w", "1", "--server-pid", str(pid), "--label", label]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=args.duration + 60, check=False)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["errors"]:
        raise SystemExit(f"{label}: {result['errors']} errors: {out.stderr.strip()}")
    cpu_s = result["srv_cpu_pct"] / 100 * result["duration_s"]
    return {"rps": result["rps"], "cpu_us": cpu_s * 1e6 / max(1, result["sessions"])}


def build_loadgen(tmp: Path) -> str:
    out = tmp / "loadgen"
    source = next((p for p in LOADGEN_SOURCES if p.exists()), None)
    if source is None:
        raise SystemExit(f"no loadgen.c in {[str(p) for p in LOADGEN_SOURCES]}; give --loadgen")
    cmd = ["gcc", "-O2", "-Wall", "-o", str(out), str(source), "-lm"]
    subprocess.run(cmd, check=True, timeout=120)
    return str(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--conns", type=int, default=20)
    parser.add_argument("--loadgen", help="a built loadgen (default: build ../shared/bench/loadgen.c)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="evd-xinetd-") as name:
        tmp = Path(name)
        gen = args.loadgen or build_loadgen(tmp)
        rows: list[dict[str, dict[str, float]]] = []
        for n in range(args.rounds):
            order = ("xinetd", "evd") if n % 2 == 0 else ("evd", "xinetd")
            row = {}
            for server in order:
                proc, port = start(server, tmp)
                try:
                    row[server] = loadgen(gen, port, proc.pid, args, server)
                finally:
                    stop(proc)
            rows.append(row)
            print(f"round {n + 1}: " + json.dumps(row), file=sys.stderr)
    report(rows, args)
    return 0


def report(rows: list[dict[str, dict[str, float]]], args: argparse.Namespace) -> None:
    print(f"tcp-connect, {PROGRAM} per connection, {args.conns} in flight, {args.duration:g} s per run\n")
    print("| round | xinetd conn/s | evd conn/s | evd / xinetd | xinetd CPU µs/conn | evd CPU µs/conn |")
    print("|---|---|---|---|---|---|")
    ratios = []
    for n, row in enumerate(rows, 1):
        x, e = row["xinetd"], row["evd"]
        ratios.append(e["rps"] / x["rps"])
        rates = f"{x['rps']:.0f} | {e['rps']:.0f} | {ratios[-1]:.2f}×"
        print(f"| {n} | {rates} | {x['cpu_us']:.0f} | {e['cpu_us']:.0f} |")

    def med(server: str, key: str) -> float:
        return statistics.median(r[server][key] for r in rows)

    print(
        f"| median | {med('xinetd', 'rps'):.0f} | {med('evd', 'rps'):.0f} | {statistics.median(ratios):.2f}× "
        f"| {med('xinetd', 'cpu_us'):.0f} | {med('evd', 'cpu_us'):.0f} |"
    )


if __name__ == "__main__":
    sys.exit(main())
