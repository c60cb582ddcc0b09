"""From the benchmark's measurements to medians, ratios, the issue's targets,
a Markdown table and a PNG.

Ratios are taken within a round (a server against its reference measured
minutes apart, on the same machine state), then the median over rounds.
"""

from __future__ import annotations

import statistics

ORDER = ("evd", "evd-base", "evd-w2", "asyncio", "uvloop", "twisted", "minimal")
COLOURS = {
    "evd": "#d62728",
    "evd-base": "#e377c2",
    "evd-w2": "#ff7f0e",
    "asyncio": "#1f77b4",
    "uvloop": "#2ca02c",
    "twisted": "#9467bd",
    "minimal": "#7f7f7f",
}
METRICS = (
    "req_s",
    "p50_us",
    "p99_us",
    "p999_us",
    "server_cpu_us_per_req",
    "server_core_us_per_req",
    "generator_cpu_us_per_req",
    "rss_per_conn_kib",
    "rss_before_kb",
    "rss_after_kb",
)
STARTUP_TARGET_MS = 150.0


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def brief(r: dict) -> str:
    """One line for the progress log."""
    if "failed" in r:
        return f"FAILED: {r['failed']}"
    if r.get("mode") == "idle":
        return f"{r.get('rss_per_conn_kib')} KiB/conn, errors {r.get('errors')}"
    return (
        f"{r.get('req_s') or 0:.0f} req/s, server {r.get('server_cpu_us_per_req')} us/req, "
        f"generator {r.get('generator_cpu_us_per_req')} us/req, p99 {r.get('p99_us')} us, "
        f"errors {r.get('errors')}"
    )


class Index:
    def __init__(self, measurements: list[dict]):
        self.by_round = {(m["round"], m["load"], m["server"]): m for m in measurements if "failed" not in m}
        self.rounds = sorted({m["round"] for m in measurements})

    def values(self, load: str, server: str, metric: str) -> list:
        return [m.get(metric) for (rnd, ld, sv), m in self.by_round.items() if (ld, sv) == (load, server)]

    def ratio(self, load: str, server: str, ref_load: str, ref_server: str, metric: str):
        """Median over rounds of metric(load, server) / metric(ref) in the same round."""
        ratios = []
        for rnd in self.rounds:
            a = self.by_round.get((rnd, load, server), {}).get(metric)
            b = self.by_round.get((rnd, ref_load, ref_server), {}).get(metric)
            if a is not None and b:
                ratios.append(a / b)
        return round(_median(ratios), 3) if ratios else None


def summarise(data: dict) -> dict:
    idx = Index(data["measurements"])
    rows = []
    for load in data["loads"]:
        name = load["name"]
        ref_load = name if load["reference"][0] == "same" else load["reference"][0]
        ref_server = load["reference"][1]
        servers = sorted({m["server"] for m in data["measurements"] if m["load"] == name}, key=ORDER.index)
        for server in servers:
            runs = [m for m in data["measurements"] if (m["load"], m["server"]) == (name, server)]
            row = {
                "load": name,
                "server": server,
                "runs": len(runs),
                "failed": [m["failed"] for m in runs if "failed" in m],
                "errors": sum(m.get("errors") or 0 for m in runs),
                "lost": sum(m.get("lost") or 0 for m in runs),
            }
            for metric in METRICS:
                value = _median(idx.values(name, server, metric))
                row[metric] = round(value, 3) if value is not None else None
            if (ref_load, ref_server) != (name, server):
                row["reference"] = f"{ref_server} {ref_load}" if ref_load != name else ref_server
                row["cpu_x_ref"] = idx.ratio(name, server, ref_load, ref_server, "server_cpu_us_per_req")
                row["req_s_x_ref"] = idx.ratio(name, server, ref_load, ref_server, "req_s")
                if load["mode"] == "idle":
                    row["rss_x_ref"] = idx.ratio(name, server, ref_load, ref_server, "rss_per_conn_kib")
            rows.append(row)
    startup = data.get("startup_s") or []
    summary = {
        "rows": rows,
        "startup_ms": round(statistics.median(startup) * 1000, 1) if startup else None,
        "startup_samples_ms": [round(s * 1000, 1) for s in startup],
    }
    summary["targets"] = targets(idx, rows, summary["startup_ms"])
    return summary


def targets(idx: Index, rows: list[dict], startup_ms) -> list[dict]:
    """The issues' targets for evd, each with its measured value."""
    out = []

    def add(issue, what, value, limit, at_most=True):
        if value is None:
            return
        out.append(
            {
                "issue": issue,
                "target": what,
                "measured": value,
                "limit": limit,
                "ok": value <= limit if at_most else value >= limit,
            }
        )

    def cpu(load, server, ref_load, ref_server):
        return idx.ratio(load, server, ref_load, ref_server, "server_cpu_us_per_req")

    for load in ("tcp64", "tcp1k"):
        add(6, f"{load}: CPU/req ≤ 1.0× uvloop", cpu(load, "evd", load, "uvloop"), 1.0)
        add(6, f"{load}: CPU/req ≤ 0.95× asyncio", cpu(load, "evd", load, "asyncio"), 0.95)
        add(
            6,
            f"{load}: req/s ≥ 0.95× uvloop",
            idx.ratio(load, "evd", load, "uvloop", "req_s"),
            0.95,
            at_most=False,
        )
    add(6, "udp64: CPU/datagram ≤ 0.95× uvloop", cpu("udp64", "evd", "udp64", "uvloop"), 0.95)
    add(6, "connect (warning): CPU/conn ≤ 1.0× uvloop", cpu("connect", "evd", "connect", "uvloop"), 1.0)
    add(6, "connect (info): CPU/conn ≤ 1.0× asyncio", cpu("connect_info", "evd", "connect", "asyncio"), 1.0)
    add(
        10, "connect: CPU/conn at info ≤ 1.25× at warning", cpu("connect_info", "evd", "connect", "evd"), 1.25
    )
    add(
        9,
        "udp64: CPU/datagram with default limits ≤ 1.05× opened",
        cpu("udp64_default", "evd", "udp64", "evd"),
        1.05,
    )
    add(
        20,
        "connect: CPU/conn through the PROXY protocol ≤ 1.05× without",
        cpu("connect_proxy", "evd", "connect", "evd"),
        1.05,
    )
    add(13, "tls64: CPU/req ≤ 1.0× uvloop", cpu("tls64", "evd", "tls64", "uvloop"), 1.0)
    add(13, "tls64: CPU/req ≤ 0.8× asyncio", cpu("tls64", "evd", "tls64", "asyncio"), 0.8)
    for load in ("tcp64", "framed1", "framed16"):  # against evd before this round (--baseline)
        add(9, f"{load}: CPU/req no worse than evd-base (≤ 1.0×)", cpu(load, "evd", load, "evd-base"), 1.0)
    add(6, "framed depth 1: CPU/req ≤ 2× raw echo", cpu("framed1", "evd", "tcp64", "evd"), 2.0)
    add(6, "framed depth 16: CPU/req ≤ 1× raw echo", cpu("framed16", "evd", "tcp64", "evd"), 1.0)
    idle = [r for r in rows if (r["load"], r["server"]) == ("idle", "evd")]
    if idle:
        add(6, "10,000 idle: RSS ≤ 1 KiB/conn", idle[0]["rss_per_conn_kib"], 1.0)
    add(6, "evd run → daemon.ready ≤ 150 ms", startup_ms, STARTUP_TARGET_MS)
    return out


def _num(value, digits=1) -> str:
    if value is None:
        return "–"
    if abs(value) >= 10000:
        return f"{value / 1000:.0f}k"
    return f"{value:.{digits}f}"


GENERATORS = {"loadgen": "loadgen.c (tcp, udp, idle) and evd bench (connect, framed)"}
TABLE_HEAD = (
    "| load | server | req/s | p50 µs | p99 µs | server CPU µs/req | ×ref CPU | ×ref req/s | ref "
    "| generator CPU µs/req | errors |"
)


def markdown(data: dict) -> str:
    s, m, st = data["summary"], data["machine"], data["settings"]
    lines = [
        f"### evd benchmark, {data['started']}",
        "",
        f"Machine: {m['cpus']} × {m['cpu']}, {m['memory_gib']} GiB, Linux {m['kernel']}, "
        f"Python {m['python']}, evd {m['evd_commit']} (code copied at the start, sha256 "
        f"{m.get('evd_source', '?')}); load average {m['loadavg_start']:.2f} at start, "
        f"{m['loadavg_end']:.2f} at end."
        + (f" evd-base is evd at {m['baseline']}, the same configuration." if m.get("baseline") else ""),
        f"Command: `{data['command']}` — generator "
        f"{GENERATORS.get(st['generator'], 'evd bench')} "
        f"({st['processes']} process{'es' if st['processes'] != 1 else ''}), "
        f"{st['rounds']} round(s) × {st['duration']} s (+{st['warmup']} s warm-up); server on CPU "
        f"{st['server_cpus']}, generator on CPU {st['gen_cpus']}"
        f"{', both at nice -10' if st['nice'] else ''}; "
        f"medians over rounds, ratios taken within a round.",
        "",
        TABLE_HEAD,
        "|---|---|--:|--:|--:|--:|--:|--:|---|--:|--:|",
    ]
    titles = {load["name"]: load["title"] for load in data["loads"]}
    for r in s["rows"]:
        if r["load"] == "idle":
            continue
        errors = str(r["errors"]) + (f" (+{r['lost']} lost)" if r["lost"] else "")
        if r["failed"]:
            errors += f", {len(r['failed'])} failed run(s)"
        lines.append(
            f"| {titles[r['load']]} | {r['server']} | {_num(r['req_s'], 0)} | {_num(r['p50_us'], 0)} | "
            f"{_num(r['p99_us'], 0)} | **{_num(r['server_cpu_us_per_req'], 2)}** | "
            f"{_num(r.get('cpu_x_ref'), 2)} | "
            f"{_num(r.get('req_s_x_ref'), 2)} | {r.get('reference', '')} | "
            f"{_num(r['generator_cpu_us_per_req'], 2)} | {errors} |"
        )
    idle = [r for r in s["rows"] if r["load"] == "idle"]
    if idle:
        lines += [
            "",
            "| 10,000 idle connections | RSS KiB/conn | ×asyncio | server RSS before → held (MiB) | errors |",
            "|---|--:|--:|---|--:|",
        ]
        for r in idle:
            before, after = r["rss_before_kb"], r["rss_after_kb"]
            span = f"{before / 1024:.1f} → {after / 1024:.1f}" if before and after else "–"
            lines.append(
                f"| {r['server']} | **{_num(r['rss_per_conn_kib'], 2)}** | {_num(r.get('rss_x_ref'), 2)} | "
                f"{span} | {r['errors']} |"
            )
    lines.append("")
    if s["startup_ms"] is not None:
        lines.append(
            f"`evd run` → `daemon.ready` (spawn to the log line): median **{s['startup_ms']} ms** "
            f"of {len(s['startup_samples_ms'])} starts ({', '.join(map(str, s['startup_samples_ms']))})."
        )
    if data.get("workers2") == "n/a":
        lines.append("`workers = 2`: n/a (evd does not fork workers here).")
    if s["targets"]:
        lines += ["", "| evd target | issue | measured | met? |", "|---|--:|--:|---|"]
        for t in s["targets"]:
            met = "yes" if t["ok"] else "**no**"
            lines.append(f"| {t['target']} | {t.get('issue', 6)} | {t['measured']} | {met} |")
    return "\n".join(lines)


def plot(data: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["summary"]["rows"]
    loads = [ld["name"] for ld in data["loads"] if ld["mode"] != "idle"]
    idle = [r for r in rows if r["load"] == "idle"]
    fig, axes = plt.subplots(
        3 if idle else 2,
        1,
        figsize=(13, 12 if idle else 8.5),
        gridspec_kw={"height_ratios": [3, 3, 2] if idle else [1, 1]},
    )
    panels = [
        ("req_s", "requests/s (thousands)", 1e-3),
        ("server_cpu_us_per_req", "server CPU µs per request", 1),
    ]
    seen = set()
    for ax, (metric, label, scale) in zip(axes, panels, strict=False):
        ticks = []
        for i, load in enumerate(loads):
            group = [r for r in rows if r["load"] == load]
            width = 0.8 / max(len(group), 3)
            left = i - width * len(group) / 2
            for j, r in enumerate(group):
                value = r[metric]
                if value is None:
                    continue
                x = left + width * (j + 0.5)
                ax.bar(
                    x,
                    value * scale,
                    width * 0.95,
                    color=COLOURS[r["server"]],
                    label=r["server"] if r["server"] not in seen else None,
                )
                seen.add(r["server"])
                ax.text(
                    x,
                    value * scale,
                    f"{value * scale:.0f}" if value * scale >= 100 else f"{value * scale:.1f}",
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
            ticks.append(load)
        # evd's variants (connect_info, udp64_default, ...) have long names
        ax.set_xticks(range(len(ticks)), ticks, rotation=20, ha="right", fontsize=9)
        ax.set_ylim(top=ax.get_ylim()[1] * 1.08)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    fig.legend(ncol=6, loc="upper center", bbox_to_anchor=(0.5, 0.975), fontsize=9, frameon=False)
    if idle:
        ax = axes[2]
        names = [r["server"] for r in idle]
        values = [r["rss_per_conn_kib"] or 0 for r in idle]
        ax.bar(names, values, color=[COLOURS[n] for n in names])
        for x, v in enumerate(values):
            ax.text(x, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
        ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
        ax.set_ylabel("KiB RSS per idle connection\n(10,000 held; dashed: target)")
        ax.grid(axis="y", alpha=0.3)
    m, st = data["machine"], data["settings"]
    fig.suptitle(
        f"evd vs peers: {m['cpus']} × {m['cpu']}, server CPU {st['server_cpus']}, generator CPU "
        f"{st['gen_cpus']} ({st['generator']}), median of {st['rounds']} round(s) × {st['duration']} s, "
        f"{data['started']}",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.955))
    fig.savefig(path, dpi=110)
    plt.close(fig)
