"""evd's figures as Prometheus text (format 0.0.4), and the process metrics.

`render` builds prometheus_client metric families from a figures dict
(server/metrics/snapshot.py) and writes them with `generate_latest`: the library's
escaping and number formatting are what promtool checks against, and the
collector is ours, reading evd's own counters once per scrape.  Names and
labels are the contract of SPEC section 9.

The `process_*` metrics are read from /proc for every pid of the daemon
(the supervisor and its workers) and summed, as a scrape of evd means the
whole daemon.  prometheus_client's ProcessCollector covers one process,
and counts descriptors by listing /proc/PID/fd -- a walk over every open
connection, tens of milliseconds at 10,000 of them.  Linux gives that count
as the directory's size since 6.2; before, the listing it is.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

from evd import __version__
from evd.server.metrics.snapshot import LAG_BUCKETS, Figures

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RELOAD_RESULTS = ("ok", "failed")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# (metric, help, the service figure it reads): one sample per service.
PER_SERVICE_COUNTERS = (
    ("evd_connections", "Connections accepted (TCP, UNIX, TLS).", "connections_total"),
    ("evd_received_bytes", "Bytes received; a stream connection's count when it closes.", "bytes_in"),
    ("evd_sent_bytes", "Bytes sent; a stream connection's count when it closes.", "bytes_out"),
    ("evd_requests", "Requests served: framed requests, UDP datagrams answered.", "requests"),
    ("evd_errors", "Errors: handler bugs, OS errors, framed error answers.", "errors"),
)


class Collected:
    """The collector `generate_latest` reads: the families, built once."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def render(figures: Figures) -> bytes:
    return generate_latest(Collected(list(families(figures))))


def families(figures: Figures) -> Iterator[Metric]:
    build = GaugeMetricFamily("evd_build_info", "evd's version.", labels=["version"])
    build.add_metric([__version__], 1)
    yield build
    yield from service_families(figures.get("services", {}))
    yield GaugeMetricFamily(
        "evd_commands_running", "Commands running now.", figures.get("commands_running", 0)
    )
    commands = CounterMetricFamily(
        "evd_commands", "Commands run, by how they ended.", labels=["command", "outcome"]
    )
    for name, outcomes in sorted(figures.get("commands", {}).items()):
        for outcome, n in sorted(outcomes.items()):
            commands.add_metric([name, outcome], n)
    yield commands
    yield CounterMetricFamily(
        "evd_auth_failures", "Failed framed `auth` attempts.", figures.get("auth_failures", 0)
    )
    yield CounterMetricFamily(
        "evd_log_dropped_lines",
        "Log lines lost to a sink that would not take them.",
        figures.get("log_dropped", 0),
    )
    reloads = CounterMetricFamily(
        "evd_config_reloads", "Configuration reloads, by result.", labels=["result"]
    )
    for result in RELOAD_RESULTS:
        reloads.add_metric([result], figures.get("reloads", {}).get(result, 0))
    yield reloads
    yield lag_family(figures.get("lag"))
    yield from process_families(figures.get("pids", []), figures.get("cpu_departed", 0.0))


def service_families(services: Mapping[str, Mapping[str, Any]]) -> Iterator[Metric]:
    """Every figure read with a default: a service known only from workers
    that have exited (switched off by a reload) keeps its counters, which
    must go on rendering (SPEC 9: monotonic), and has no gauges (0 open)."""
    names = sorted(services)
    for metric, help_text, key in PER_SERVICE_COUNTERS:
        family = CounterMetricFamily(metric, help_text, labels=["service"])
        for name in names:
            family.add_metric([name], services[name].get(key, 0))
        yield family
    current = GaugeMetricFamily("evd_connections_current", "Connections open now.", labels=["service"])
    for name in names:
        current.add_metric([name], services[name].get("connections_current", 0))
    yield current
    for metric, help_text, key in (
        ("evd_rejected", "Connections refused, by reason (conn.reject).", "rejected"),
        ("evd_udp_drops", "Datagrams not answered, by reason (udp.drop).", "udp_drops"),
        ("evd_tls_failures", "TLS handshakes that failed, by reason (tls.fail).", "tls_failures"),
    ):
        family = CounterMetricFamily(metric, help_text, labels=["service", "reason"])
        for name in names:
            for reason, n in sorted(services[name].get(key, {}).items()):
                family.add_metric([name, reason], n)
        yield family


def lag_family(lag: Mapping[str, Any] | None) -> Metric:
    """The loop-lag histogram: figures keep per-bucket counts, Prometheus
    wants them cumulative."""
    counts = lag["buckets"] if lag else [0] * (len(LAG_BUCKETS) + 1)
    cumulative, running = [], 0
    for bound, n in zip([*map(floatToGoString, LAG_BUCKETS), "+Inf"], counts, strict=True):
        running += n
        cumulative.append((bound, float(running)))
    family = HistogramMetricFamily(
        "evd_loop_lag_seconds", "How late the event loop ran a timer due now (a blocked loop shows here)."
    )
    family.add_metric([], cumulative, lag["sum"] if lag else 0.0)
    return family


# -- process_* -----------------------------------------------------------------------


class HighWater:
    """A counter summed from parts that come and go never goes back.

    `process_cpu_seconds_total` with workers is the live workers' /proc
    figures plus what the reaped ones used (rusage).  A worker that exits
    between the list of pids and the read of its /proc entry is in neither
    sum for a moment, and the two clocks round differently (ticks against
    microseconds), so the plain sum can dip by a little.  The value exposed
    is the highest seen by this process.
    """

    __slots__ = ("seen",)

    def __init__(self) -> None:
        self.seen = 0.0

    def __call__(self, value: float) -> float:
        if value > self.seen:
            self.seen = value
        return self.seen


CPU_SECONDS = HighWater()


def process_families(pids: Iterable[int], cpu_departed: float = 0.0) -> Iterator[Metric]:
    """Summed over `pids`; the CPU also counts `cpu_departed`, what workers
    that have exited used (their pids are gone, their seconds are not: a
    counter never goes back)."""
    pids = list(pids)
    if not pids:
        return
    totals = {"cpu": cpu_departed, "rss": 0.0, "vsize": 0.0, "fds": 0.0}
    for pid in pids:
        try:
            for key, value in read_process(pid).items():
                totals[key] += value
        except OSError:  # a worker that exited a moment ago
            continue
    yield GaugeMetricFamily("process_virtual_memory_bytes", "Virtual memory size in bytes.", totals["vsize"])
    yield GaugeMetricFamily("process_resident_memory_bytes", "Resident memory size in bytes.", totals["rss"])
    yield GaugeMetricFamily(
        "process_start_time_seconds",
        "Start time of the process since unix epoch in seconds.",
        start_time(pids[0]),
    )
    yield CounterMetricFamily(
        "process_cpu_seconds", "Total user and system CPU time spent in seconds.", CPU_SECONDS(totals["cpu"])
    )
    yield GaugeMetricFamily("process_open_fds", "Number of open file descriptors.", totals["fds"])
    yield GaugeMetricFamily("process_max_fds", "Maximum number of open file descriptors.", max_fds())


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat from field 3 (state) on: the name before it may hold
    spaces and parentheses."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rpartition(b")")[2].decode().split()


def read_process(pid: int, by_size: bool = True) -> dict[str, float]:
    fields = _stat_fields(pid)  # field N of proc(5) is fields[N - 3]
    return {
        "cpu": (int(fields[11]) + int(fields[12])) / CLK_TCK,
        "vsize": int(fields[20]),
        "rss": int(fields[21]) * PAGE_SIZE,
        "fds": open_fds(pid, by_size),
    }


def open_fds(pid: int, by_size: bool = True) -> int:
    """Descriptors open in `pid`: the size of /proc/PID/fd where the kernel
    says it (Linux 6.2 on; 0 before), else by listing it."""
    path = f"/proc/{pid}/fd"
    size = os.stat(path).st_size if by_size else 0
    return size if size > 0 else len(os.listdir(path))


def start_time(pid: int) -> float:
    try:
        ticks = int(_stat_fields(pid)[19])
    except OSError:
        return 0.0
    return boot_time() + ticks / CLK_TCK


_BOOT_TIME: list[float] = []


def boot_time() -> float:
    if not _BOOT_TIME:
        with open("/proc/stat", "rb") as f:
            _BOOT_TIME.append(next((float(line.split()[1]) for line in f if line.startswith(b"btime ")), 0.0))
    return _BOOT_TIME[0]


def max_fds() -> int:
    """The soft descriptor limit, the same in every process of the daemon
    (workers are forks)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
