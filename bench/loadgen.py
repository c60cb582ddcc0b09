"""--generator loadgen: ../shared/bench/loadgen.c for the tcp, udp and idle
loads (the C tool the issues measured with), its JSON in evd bench's terms."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from benchenv import ROOT
from loads import Load

# What --generator loadgen runs with the C tool; the rest stays on evd bench.
# Not connect: loadgen binds its source ports in the ephemeral range itself,
# and each such port, while its TIME_WAIT lasts (a minute), is skipped by
# every other process's connect() and bind(port 0) -- after one 5-second
# run, servers and other people's tests on the machine failed to start.
LOADGEN_MODES = {"tcp": "tcp-pingpong", "udp": "udp-pingpong", "idle": "tcp-idle"}


def can_run(load: Load) -> bool:
    """loadgen sends from one address: fine with every limit opened; under
    evd's default limits only evd bench's spread over sources is admitted."""
    return load.evd.limits == "opened" and not load.bench_args


def from_loadgen(mode: str, r: dict) -> dict:
    """loadgen's JSON in evd bench's field names."""
    if mode == "idle":
        return {
            "mode": mode,
            "requests": r.get("check_ok"),
            "errors": r.get("errors"),
            "held": r.get("held"),
            "rss_before_kb": r.get("before_rss_kb"),
            "rss_after_kb": r.get("held_rss_kb"),
            "rss_per_conn_kib": round(r["rss_bytes_per_conn"] / 1024, 3)
            if r.get("rss_bytes_per_conn")
            else None,
            "generator": "loadgen",
        }
    rps = r.get("rps") or 0.0

    def per_req(pct):
        return round(pct / 100 / rps * 1e6, 3) if pct is not None and rps else None

    return {
        "mode": mode,
        "requests": r.get("requests"),
        "req_s": rps,
        "p50_us": r.get("p50_us"),
        "p99_us": r.get("p99_us"),
        "p999_us": r.get("p999_us"),
        "errors": r.get("errors"),
        "server_cpu_us_per_req": per_req(r.get("srv_cpu_pct")),
        "generator_cpu_us_per_req": per_req(r.get("loadgen_cpu_pct")),
        "generator": "loadgen",
    }


def build() -> str:
    source = ROOT.parent / "shared" / "bench" / "loadgen.c"
    gcc = shutil.which("gcc")
    if not source.exists() or gcc is None:
        raise SystemExit(f"bench: --generator loadgen needs gcc and {source}")
    binary = Path(tempfile.gettempdir()) / "evd-bench-loadgen"
    subprocess.run([gcc, "-O2", "-Wall", "-o", str(binary), str(source), "-lm"], check=True, timeout=120)
    return str(binary)
