"""The counters of one service and of one command, and the nearest-rank
percentiles of their durations (the JSON shapes are jsonform.py's)."""

from __future__ import annotations

from array import array

from evd.tools.logs.jsonform import CommandJson, ServiceJson


def nearest_rank(ordered: list[float], percent: int) -> float:
    """The nearest-rank percentile of sorted values: the smallest value
    such that at least `percent`% of the values are at most it."""
    rank = max(1, -(-percent * len(ordered) // 100))
    return ordered[rank - 1]


def percentiles(values: array[float], percents: tuple[int, ...]) -> list[float | None]:
    """The nearest-rank `percents` of `values`, then their maximum."""
    if not values:
        return [None] * (len(percents) + 1)
    ordered = sorted(values)
    found: list[float | None] = [nearest_rank(ordered, p) for p in percents]
    return found + [ordered[-1]]


def add(table: dict[str, int], key: str, n: int = 1) -> None:
    table[key] = table.get(key, 0) + n


def merge_counts(into: dict[str, int], other: dict[str, int]) -> None:
    for key, n in other.items():
        into[key] = into.get(key, 0) + n


def by_count(table: dict[str, int]) -> dict[str, int]:
    """Largest first, then by name: the order a reader scans.  (Keys are
    text for JSON; a foreign line may have put a number or null there.)"""
    return {str(k): n for k, n in sorted(table.items(), key=lambda kv: (-kv[1], str(kv[0])))}


class ServiceStats:
    __slots__ = (
        "reasons",
        "durations",
        "bytes_in",
        "bytes_out",
        "rejected",
        "udp_drops",
        "tls_failures",
        "unix_connections",
    )

    def __init__(self) -> None:
        self.reasons: dict[str, int] = {}
        self.durations: array[float] = array("d")
        self.bytes_in = 0
        self.bytes_out = 0
        self.rejected: dict[str, int] = {}
        self.udp_drops: dict[str, int] = {}
        self.tls_failures = 0
        self.unix_connections = 0

    def merge(self, other: ServiceStats) -> None:
        self.durations.extend(other.durations)
        merge_counts(self.reasons, other.reasons)
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out
        merge_counts(self.rejected, other.rejected)
        merge_counts(self.udp_drops, other.udp_drops)
        self.tls_failures += other.tls_failures
        self.unix_connections += other.unix_connections

    def to_json(self) -> ServiceJson:
        p50, p95, p99, top = percentiles(self.durations, (50, 95, 99))
        return {
            "connections": len(self.durations),
            "reasons": by_count(self.reasons),
            "duration_ms": {"p50": p50, "p95": p95, "p99": p99, "max": top},
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "rejected": by_count(self.rejected),
            "udp_drops": by_count(self.udp_drops),
        }


class CommandStats:
    __slots__ = ("runs", "exit", "timed_out", "truncated", "durations", "keys")

    def __init__(self) -> None:
        self.runs = 0
        self.exit: dict[str, int] = {}
        self.timed_out = 0
        self.truncated = 0
        self.durations: array[float] = array("d")
        self.keys: dict[str, int] = {}

    def merge(self, other: CommandStats) -> None:
        self.runs += other.runs
        merge_counts(self.exit, other.exit)
        self.timed_out += other.timed_out
        self.truncated += other.truncated
        self.durations.extend(other.durations)
        merge_counts(self.keys, other.keys)

    def to_json(self) -> CommandJson:
        p50, p95, top = percentiles(self.durations, (50, 95))
        return {
            "runs": self.runs,
            "exit": by_count(self.exit),
            "timed_out": self.timed_out,
            "truncated": self.truncated,
            "duration_ms": {"p50": p50, "p95": p95, "max": top},
        }


def exit_key(exit_code: object, signal: object) -> str:
    """`exit` of the summary: the exit status as text ("0", "1"); a command
    killed by signal N is "-N", as Python's returncode says it."""
    if isinstance(exit_code, int):
        return str(exit_code)
    if isinstance(signal, int):
        return str(-signal)
    return "unknown"
