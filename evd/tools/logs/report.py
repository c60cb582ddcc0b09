"""The text form of `evd logs summary`: what an operator reads first, as
aligned tables with units, built from the same object `--json` prints,
plus the few figures that object has no place for (clients on UNIX
sockets, failed TLS handshakes, the keys commands ran under)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

from evd.tools.logs.jsonform import CommandJson, Extras, PeerJson, ServiceJson, SummaryJson
from evd.tools.logs.reading import MAX_LINE

MISSING = "-"


def count(n: int) -> str:
    return f"{n:,}"


def size(n: int) -> str:
    """Bytes in the largest binary unit that keeps the figure at least 1."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def millis(ms: float | None) -> str:
    """A duration given in ms: "0.31 ms", "12.4 ms", "1.52 s", "3.1 min"."""
    if ms is None:
        return MISSING
    if ms < 10:
        return f"{ms:.2f} ms"
    if ms < 1000:
        return f"{ms:.1f} ms"
    if ms < 60_000:
        return f"{ms / 1000:.2f} s"
    return f"{ms / 60_000:.1f} min"


def span(first: str, last: str) -> str:
    """How long the log covers: "3 d 4 h", "2 h 5 min", "4 min 2 s", "1.5 s"."""
    try:
        seconds = (datetime.fromisoformat(last) - datetime.fromisoformat(first)).total_seconds()
    except ValueError:
        return "?"
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{seconds:.1f} s"


def counts(table: Mapping[str, int] | None) -> str:
    """{"eof": 3, "reset": 1} -> "eof=3  reset=1"."""
    if not table:
        return MISSING
    return "  ".join(f"{key}={count(n)}" for key, n in table.items())


def columns(header: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> list[str]:
    """A table: each column as wide as its widest cell, aligned by `align`
    ("l" text, "r" numbers), two spaces between columns."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = (
            cell.ljust(width) if how == "l" else cell.rjust(width)
            for cell, width, how in zip(cells, widths, align, strict=True)
        )
        return "  " + "  ".join(padded).rstrip()

    return [line(header), *(line(row) for row in rows)]


def _services(services: dict[str, ServiceJson], extras: Extras) -> list[str]:
    rows = []
    for name, s in services.items():
        d = s["duration_ms"]
        rows.append(
            [
                name,
                count(s["connections"]),
                *(millis(v) for v in (d["p50"], d["p95"], d["p99"], d["max"])),
                size(s["bytes_in"]),
                size(s["bytes_out"]),
                count(sum(s["rejected"].values())),
                count(sum(s["udp_drops"].values())),
            ]
        )
    header = ("service", "connections", "p50", "p95", "p99", "max", "in", "out", "rejected", "udp drops")
    out = [
        "Services: connections closed, their duration and bytes; connections refused, UDP datagrams dropped",
        *columns(header, rows, "lrrrrrrrrr"),
    ]
    for title, field in (
        ("Connections closed, by reason", "reasons"),
        ("Connections refused, by reason", "rejected"),
        ("UDP datagrams dropped, by reason", "udp_drops"),
    ):
        tables = {name: s[field] for name, s in services.items()}  # type: ignore[literal-required]
        out += by_reason(title, tables)
    others = [
        (what, extra)
        for what, extra in (
            ("Connections over UNIX sockets (no client IP)", extras["unix_connections"]),
            ("TLS handshakes failed", extras["tls_failures"]),
        )
        if extra
    ]
    for what, extra in others:
        out += ["", what, *columns(("service", "count"), [[k, count(n)] for k, n in extra.items()], "lr")]
    return out


def by_reason(title: str, tables: dict[str, dict[str, int]]) -> list[str]:
    """One row per service, one column per reason (the commonest first)."""
    totals: dict[str, int] = {}
    for table in tables.values():
        for reason, n in table.items():
            totals[reason] = totals.get(reason, 0) + n
    if not totals:
        return []
    reasons = sorted(totals, key=lambda r: (-totals[r], r))
    rows = [[name, *(count(t.get(r, 0)) for r in reasons)] for name, t in tables.items() if t]
    return ["", title, *columns(("service", *reasons), rows, "l" + "r" * len(reasons))]


def _peers(peers: list[PeerJson], top: int) -> list[str]:
    rows = [
        [p["peer"], count(p["connections"]), count(p["rejected"]), count(p["auth_failures"])] for p in peers
    ]
    title = "Clients by connections" if top <= 0 else f"Top {top} clients by connections"
    return [title, *columns(("client IP", "connections", "rejected", "auth failures"), rows, "lrrr")]


def _commands(commands: dict[str, CommandJson], extras: Extras) -> list[str]:
    rows = []
    for name, c in commands.items():
        d = c["duration_ms"]
        rows.append(
            [
                name,
                count(c["runs"]),
                counts(c["exit"]),
                count(c["timed_out"]),
                count(c["truncated"]),
                *(millis(v) for v in (d["p50"], d["p95"], d["max"])),
                counts(extras["command_keys"].get(name)),
            ]
        )
    header = ("command", "runs", "exit status", "timed out", "truncated", "p50", "p95", "max", "keys")
    return ["Commands (exit status=runs; -N: killed by signal N)", *columns(header, rows, "lrlrrrrrl")]


def render(result: SummaryJson, extras: Extras, top: int) -> str:
    head = f"{count(result['lines'])} log lines"
    if result["skipped"]:
        head += f" (and {count(result['skipped'])} other lines, skipped"
        if extras["overlong"]:
            head += f", {count(extras['overlong'])} of them over {MAX_LINE >> 20} MiB"
        head += ")"
    if result["first"] is not None and result["last"] is not None:
        head += f", {result['first']} to {result['last']} ({span(result['first'], result['last'])})"
    out = [head]
    if result["services"]:
        out += ["", *_services(result["services"], extras)]
    if result["peers"]:
        out += ["", *_peers(result["peers"], top)]
    if result["commands"]:
        out += ["", *_commands(result["commands"], extras)]
    if result["errors"]:
        rows = [[where, count(n)] for where, n in result["errors"].items()]
        out += ["", "Errors by where", *columns(("where", "count"), rows, "lr")]
    reloads = result["reloads"]
    out += [
        "",
        f"Daemon: started {count(result['starts'])}, stopped {count(result['stops'])}; "
        f"reloads ok {count(reloads['ok'])}, failed {count(reloads['failed'])}",
    ]
    return "\n".join(out)
