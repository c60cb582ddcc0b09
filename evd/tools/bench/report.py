"""A run's figures: the workers' results merged, one human line, one JSON line.

The JSON fields are a contract: bench/run.py and scripts read them.
Fields are only ever added (and `sources` appears only when asked for).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from typing import Any

from evd.tools.bench.options import Options
from evd.tools.bench.probes import per_req


def percentile(histogram: Mapping[int, int], total: int, q: float) -> float | None:
    """The q-quantile (0..1) of a {microseconds: count} histogram."""
    if not total:
        return None
    rank, seen = q * total, 0
    for us in sorted(histogram):
        seen += histogram[us]
        if seen >= rank:
            return float(us)
    return float(max(histogram))


def summary(
    opts: Options, results: list[dict[str, Any]], extra: Mapping[str, object], sources: int = 0
) -> dict[str, object]:
    """The merged result of every worker, plus `extra` (the server's figures)."""
    histogram: Counter[int] = Counter()
    why: Counter[str] = Counter()
    for r in results:
        histogram.update({int(k): v for k, v in r["histogram"].items()})
        why.update(r["why"])
    requests = sum(int(r["requests"]) for r in results)
    cpu = sum(float(r["cpu"]) for r in results)
    measured = opts.duration if opts.mode != "idle" else None
    out: dict[str, object] = {
        "mode": opts.mode,
        "address": opts.address,
        "connections": opts.connections,
        "size": opts.size,
        "depth": opts.depth if opts.mode == "framed" else None,
        "processes": opts.processes,
        "duration_s": opts.duration,
        "requests": requests,
        "req_s": round(requests / measured, 1) if measured else None,
        "p50_us": percentile(histogram, requests, 0.5),
        "p99_us": percentile(histogram, requests, 0.99),
        "p999_us": percentile(histogram, requests, 0.999),
        "errors": sum(int(r["errors"]) for r in results),
        "lost": sum(int(r["lost"]) for r in results),
        "generator_cpu_s": round(cpu, 3) if measured else None,
        "generator_cpu_us_per_req": per_req(cpu, requests) if measured else None,
    }
    if sources:
        out["sources"] = sources
    if opts.tls:
        out["tls"] = True
    if why:
        out["error_kinds"] = dict(why)
    out.update(extra)
    return out


def describe(result: Mapping[str, Any]) -> str:
    """One human line for a result."""
    r = result
    if r["mode"] == "idle":
        text = (
            f"idle: held {r['held']} connections (set up in {r['setup_s']}s), "
            f"checked {r['requests']}, errors {r['errors']}"
        )
        if "rss_per_conn_kib" in r:
            text += (
                f"; server RSS {r['rss_before_kb']} -> {r['rss_after_kb']} KiB "
                f"({r['rss_per_conn_kib']} KiB per connection)"
            )
        return text
    depth = f" depth {r['depth']}" if r["depth"] else ""
    sources = f" sources={r['sources']}" if r.get("sources") else ""
    tls = "+tls" if r.get("tls") else ""
    text = (
        f"{r['mode']}{tls} c={r['connections']} s={r['size']}{depth} p={r['processes']}{sources}: "
        f"{r['req_s']:.0f} req/s  p50 {r['p50_us']} us  p99 {r['p99_us']} us  "
        f"p999 {r['p999_us']} us  errors {r['errors']}"
    )
    if r["lost"]:
        text += f"  lost {r['lost']}"
    text += f"  generator CPU {r['generator_cpu_us_per_req']} us/req"
    if "server_cpu_us_per_req" in r:
        text += f"  server CPU {r['server_cpu_us_per_req']} us/req"
    if "server_core_us_per_req" in r:
        text += f" (its core {r['server_core_us_per_req']})"
    return text


def to_json(result: Mapping[str, object]) -> str:
    return json.dumps(result, separators=(",", ":"))
