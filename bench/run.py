#!/usr/bin/env python3
"""The evd benchmark: evd against asyncio, uvloop, Twisted and a minimal
selectors loop, on one machine, in one run.  Not part of the test suite.

    python3 bench/run.py              # 3 rounds, ~12 minutes
    python3 bench/run.py --quick      # 1 round, 2 s per load: a smoke run
    python3 bench/run.py --only tcp64,udp64 --servers evd,uvloop
    python3 bench/run.py --generator loadgen   # cross-check with ../shared/bench/loadgen.c

Method (issue 6): on a 2-core machine the load generator is usually the
bottleneck, so requests per second alone cannot rank servers.  For every
server and load this records requests/s, p50/p99 latency and the server's CPU
per request (utime+stime from /proc/PID/stat over the measured window, read
by the generator), plus the generator's own CPU.  The server is pinned to
CPU 0 and the generator to CPU 1 (taskset), both at nice -10 when root (other
work on the machine then yields to them); every server is started fresh for
every measurement and warmed up; rounds are interleaved (A B C D E, A B C D E,
...) so drift hits everyone alike; the report gives medians over rounds and
ratios to a reference taken within the same round: asyncio; or, for evd's
own variants, evd itself (raw echo for the framed loads, every limit opened
for the default-limits loads, log level warning for the info load).

A load is one entry in LOADS: the generator's mode and counts, the servers,
evd's configuration (log level, limits, extra TOML), the generator's source
addresses and extra options, and what runs beside it while it is measured.

It creates and uses its own virtualenv, bench/.venv, with evd (editable,
this checkout) and bench/requirements.txt: uvloop, Twisted and
matplotlib are the benchmark's, never evd's.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from benchenv import HERE, ROOT, VENV_PY, ensure_venv

if __name__ == "__main__":
    ensure_venv(__file__)

# Inside the venv from here on.
import json
import platform
import signal
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

sys.path.insert(0, str(HERE))
import loadgen
import report
from loads import DEFAULT_LIMITS, DEFAULT_RATE, LOADS, RATE_MARGIN, SPECIAL, Load
from servers import (
    BASELINE,
    BASELINE_SRC,
    SERVERS,
    EvdSetup,
    ServerError,
    evd_config,
    start_server,
    startup_time,
    workers_fork,
)

# The loads `--baseline` compares: the opened echo, connect, TLS echo and
# framed ones (a baseline may predate the default-limit loads'
# configuration; tls64 needs one with `tls` listeners, 2026 on).
BASELINE_LOADS = ("tcp64", "tcp1k", "connect", "udp64", "tls64", "framed1", "framed16")


@dataclass
class Settings:
    rounds: int
    duration: float
    warmup: float
    idle_hold: float
    processes: int
    generator: str
    servers: tuple
    loads: list
    startup_runs: int
    server_cpus: str = "0"
    gen_cpus: str = "1"
    nice: bool = field(default_factory=lambda: os.geteuid() == 0)
    loadgen: str | None = None
    baseline: str | None = None  # a commit whose evd runs beside this one (evd-base)


def prefix(cpus: str, nice: bool) -> list[str]:
    """Pinned (and, when root, at nice -10): both exec, so the pid is the program's."""
    return (["nice", "-n", "-10"] if nice else []) + ["taskset", "-c", cpus]


def generate(load: Load, settings: Settings, address: str, pid: int, cafile: Path | None = None) -> dict:
    """One generator run against `address` (over TLS, trusting `cafile`,
    for a TLS load); the result in evd bench's terms."""
    hold = settings.idle_hold if load.mode == "idle" else settings.duration
    limit = hold + settings.warmup + 180
    pre = prefix(settings.gen_cpus, settings.nice)
    if (
        settings.generator == "loadgen"
        and not load.tls
        and load.mode in loadgen.LOADGEN_MODES
        and loadgen.can_run(load)
    ):
        host, _, port = address.rpartition(":")
        cmd = [
            settings.loadgen,
            loadgen.LOADGEN_MODES[load.mode],
            "--host",
            host,
            "--port",
            port,
            "-n",
            str(min(load.connections, 1000)),
            "-s",
            str(load.size),
            "-w",
            str(settings.warmup),
            "-d",
            str(hold),
            "--server-pid",
            str(pid),
        ]
        if load.mode == "idle":
            cmd[6:8] = ["-n", str(load.connections)]
        out = _run(pre + cmd, limit)
        return loadgen.from_loadgen(load.mode, json.loads(out))
    cmd = [
        str(VENV_PY),
        "-m",
        "evd",
        "bench",
        load.mode,
        "--address",
        address,
        "-n",
        str(load.connections),
        "-s",
        str(load.size),
        "-d",
        str(hold),
        "-w",
        str(settings.warmup),
        "-P",
        str(settings.processes),
        "-D",
        str(load.depth),
        "--server-pid",
        str(pid),
        "--json",
        *(["--sources", str(load.sources)] if load.sources else []),
        *(["--tls", "--cafile", str(cafile)] if load.tls and cafile else []),
        *load.bench_args,
    ]
    result = json.loads(_run(pre + cmd, limit))
    result["generator"] = "evd bench"
    return result


def _run(cmd: list[str], timeout: float) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise ServerError(f"{Path(cmd[0]).name}... exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
    return proc.stdout.strip().splitlines()[-1]


def compile_bytecode(tree: Path) -> None:
    """Byte-compile a copy of evd as `pip install` does: with
    PYTHONDONTWRITEBYTECODE set (as here), every start would otherwise
    compile each module again, and the start-up time would measure that."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree)], check=True, timeout=120)


def snapshot_evd(tmp: Path) -> str:
    """Copy evd's code into the run's directory and make every evd process of
    the run (servers and generator) import that copy: the venv's evd is this
    checkout, editable, and others may commit to it while a run is under way.
    Returns a hash of the copy, for the report."""
    copy = tmp / "src" / "evd"
    shutil.copytree(ROOT / "evd", copy, ignore=shutil.ignore_patterns("__pycache__"))
    os.environ["PYTHONPATH"] = str(copy.parent)  # inherited by every child
    compile_bytecode(copy)
    digest = hashlib.sha256()
    for path in sorted(copy.rglob("*.py")):
        digest.update(str(path.relative_to(copy)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def measure(load: Load, server: str, settings: Settings, tmp: Path) -> dict:
    """Start `server` fresh, load it, stop it."""
    started = time.monotonic()
    try:
        with start_server(server, load, tmp, prefix(load.server_cpus, settings.nice)) as srv:
            if load.mode == "udp":
                address = f"127.0.0.1:{srv.udp_port}"
            else:
                address = f"127.0.0.1:{srv.tcp_port}"
            with load.during(srv) if load.during else nullcontext():
                result = generate(load, settings, address, srv.pid, srv.cafile)
    except (ServerError, subprocess.TimeoutExpired, ValueError, OSError) as exc:
        result = {"failed": str(exc)}
    result.update(load=load.name, server=server, wall_s=round(time.monotonic() - started, 2))
    return result


def machine() -> dict:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "memory_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30),
        "evd_commit": commit,
        "loadavg_start": os.getloadavg()[0],
    }


def run(settings: Settings, tmp: Path) -> dict:
    measurements: list[dict] = []
    startups: list[float] = []
    loads = [load for load in LOADS if load.name in settings.loads]
    if "workers2" in settings.loads and "evd" in settings.servers:
        forks = workers_fork(tmp, prefix("0,1", settings.nice))
        if forks is not True:
            print(f"bench: workers = 2: n/a ({forks})", file=sys.stderr)
            loads = [load for load in loads if load.name != "workers2"]
    total = sum(len(_servers(load, settings)) for load in loads) * settings.rounds
    done = 0
    for rnd in range(1, settings.rounds + 1):
        for load in loads:
            for server in _servers(load, settings):
                done += 1
                result = measure(load, server, settings, tmp)
                result["round"] = rnd
                measurements.append(result)
                _check_spread(load, result)
                print(
                    f"bench: [{done}/{total}] round {rnd} {load.name} {server}: {report.brief(result)}",
                    file=sys.stderr,
                    flush=True,
                )
        if "startup" in settings.loads and "evd" in settings.servers:
            for _ in range(settings.startup_runs):
                try:
                    startups.append(startup_time(tmp, prefix(settings.server_cpus, settings.nice)))
                except (ServerError, OSError) as exc:
                    print(f"bench: evd start-up FAILED: {exc}", file=sys.stderr)
            print(
                f"bench: round {rnd} evd run -> daemon.ready: "
                f"{', '.join(f'{s * 1000:.0f}' for s in startups[-settings.startup_runs :])} ms",
                file=sys.stderr,
                flush=True,
            )
    return {
        "measurements": measurements,
        "startup_s": startups,
        "loads": [_load_info(load) for load in loads],
        "workers2": "n/a"
        if "workers2" in settings.loads and not any(load.name == "workers2" for load in loads)
        else None,
    }


def _check_spread(load: Load, result: dict) -> None:
    """Flag a default-limits run whose source addresses came close to evd's
    default rate: its figure would soon measure refusals, not the service."""
    if load.evd.limits != "default" or load.mode not in ("connect", "udp") or not result.get("req_s"):
        return
    per_source = result["req_s"] / (load.sources or 1)
    result["per_source_rate"] = round(per_source, 1)
    if per_source > DEFAULT_RATE * RATE_MARGIN:
        print(
            f"bench: WARNING {load.name}: {per_source:.0f}/s per source address, near evd's default "
            f"rate ({DEFAULT_RATE:.0f}/s); raise its sources in LOADS",
            file=sys.stderr,
        )


def _servers(load: Load, settings: Settings) -> list[str]:
    wanted = load.servers or SERVERS
    if load.name == "workers2":
        return [s for s in wanted if "evd" in settings.servers]
    chosen = [s for s in wanted if s in settings.servers]
    if settings.baseline and load.name in BASELINE_LOADS and "evd" in chosen:
        chosen.insert(chosen.index("evd") + 1, BASELINE)
    return chosen


def unpack_baseline(rev: str, tmp: Path) -> str:
    """evd's code at `rev`, unpacked for the evd-base server; its short hash."""
    dest = tmp / "baseline"
    dest.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "evd"], capture_output=True, check=True, timeout=60
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True, timeout=60)
    BASELINE_SRC[:] = [dest]
    compile_bytecode(dest)
    return subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", rev], capture_output=True, text=True, check=True
    ).stdout.strip()


def _load_info(load: Load) -> dict:
    return {
        "name": load.name,
        "title": load.title,
        "mode": load.mode,
        "connections": load.connections,
        "size": load.size,
        "depth": load.depth,
        "reference": list(load.reference),
        "evd_log_level": load.evd.level,
        "evd_limits": load.evd.limits,
        "sources": load.sources,
        "server_cpus": load.server_cpus,
    }


def parse_args(argv=None) -> tuple[Settings, argparse.Namespace]:
    names = [load.name for load in LOADS] + list(SPECIAL)
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per load (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--idle-hold", type=float, default=2.0, help="seconds the idle connections are held")
    parser.add_argument("--quick", action="store_true", help="1 round, 2 s per load: a smoke run")
    parser.add_argument("--only", help=f"loads, comma-separated: {','.join(names)}")
    parser.add_argument("--servers", default=",".join(SERVERS), help=f"default {','.join(SERVERS)}")
    parser.add_argument(
        "--generator",
        choices=("evd", "loadgen"),
        default="evd",
        help="evd bench (default) or, for tcp, udp and idle loads, the C loadgen of "
        "../shared/bench (connect and framed loads stay on evd bench)",
    )
    parser.add_argument("--gen-cpus", default="1", help="CPUs the generator is pinned to (default 1)")
    parser.add_argument(
        "--processes",
        type=int,
        help="evd bench processes (default: one per generator CPU; more processes "
        "than CPUs only measure the scheduler's time slice as latency)",
    )
    parser.add_argument("--startup-runs", type=int, default=3, help="evd starts timed per round")
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="also run evd as it was at commit REV (server evd-base) on the opened "
        f"{', '.join(BASELINE_LOADS)} loads: a change judged against what it changed, in one run",
    )
    parser.add_argument(
        "--out",
        default=str(HERE / "results"),
        help="results path without extension: writes .json and .png (default bench/results)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup, args.idle_hold = 1, 2.0, 0.5, 1.0
    loads = args.only.split(",") if args.only else names
    servers = tuple(s for s in args.servers.split(",") if s)
    unknown = (set(loads) - set(names)) | (set(servers) - set(SERVERS))
    if unknown:
        parser.error(f"unknown: {', '.join(sorted(unknown))}")
    if not 1 <= args.rounds <= 20 or not 0.5 <= args.duration <= 60:
        parser.error("--rounds must be 1..20 and --duration 0.5..60")
    gen_cpus = _cpu_list(args.gen_cpus)
    if not gen_cpus:
        parser.error(f"bad --gen-cpus {args.gen_cpus!r}")
    settings = Settings(
        rounds=args.rounds,
        duration=args.duration,
        warmup=args.warmup,
        idle_hold=args.idle_hold,
        processes=args.processes or len(gen_cpus),
        generator=args.generator,
        servers=servers,
        loads=loads,
        startup_runs=args.startup_runs,
        gen_cpus=args.gen_cpus,
        baseline=args.baseline,
    )
    return settings, args


def _cpu_list(text: str) -> set[int]:
    """taskset's list syntax: "1", "0,1", "0-3"."""
    cpus = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        return set()
    return cpus


def main(argv=None) -> int:
    settings, args = parse_args(argv)
    if shutil.which("taskset") is None:
        raise SystemExit("bench: needs taskset (util-linux)")
    if settings.generator == "loadgen":
        settings.loadgen = loadgen.build()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # finally-blocks stop the servers
    info = machine()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="evd-bench-") as tmp:
        info["evd_source"] = snapshot_evd(Path(tmp))
        if settings.baseline:
            info["baseline"] = unpack_baseline(settings.baseline, Path(tmp))
        data = run(settings, Path(tmp))
    info["loadavg_end"] = os.getloadavg()[0]
    data.update(
        machine=info,
        started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        wall_s=round(time.time() - started, 1),
        command="python3 bench/run.py " + " ".join(sys.argv[1:]),
        settings={k: v for k, v in vars(settings).items() if k != "loads"} | {"loads": settings.loads},
        evd_config_example=evd_config(Path("/tmp/evd-bench-XXXX"), EvdSetup(), echo=True, framed=False),
        evd_config_default_limits=evd_config(
            Path("/tmp/evd-bench-XXXX"), DEFAULT_LIMITS, echo=True, framed=False
        ),
    )
    data["summary"] = report.summarise(data)
    text = report.markdown(data)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    report.plot(data, out.with_suffix(".png"))
    print(f"\nbench: wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
