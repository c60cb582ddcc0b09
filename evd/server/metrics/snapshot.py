"""What one process counts, as one plain object: the source of /metrics.

Metrics are read, never pushed: nothing on the connection or datagram path
knows they exist.  A scrape asks each process for its `figures` -- a
JSON-able dict built from the counters the services, the command runner
and the log already keep -- and with workers the supervisor adds the
workers' dicts together (`add`).  Building one costs a few dict lookups
per service: no walk over open connections, so a scrape costs the same
with 10 or 10,000 of them.  The price: bytes and requests of a TCP or UNIX
connection are counted when it closes (UDP at once); `evd ctl conns` shows
what open connections have moved so far.

Every figure is a number, or a dict or list of them, so that adding two
processes' figures is one recursive function, and so that a worker can
send its figures to the supervisor as JSON.

`LagProbe` measures how late the loop runs timers: a timer that asks to
run every PROBE_EVERY seconds notes how long after its due time it ran.
A handler that blocks the loop for half a second makes the next probe run
half a second late, whatever the traffic; the probe costs one timer per
period, nothing per event.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from evd.handlers.service import SEND_FAILURES, Service
from evd.log.logger import log

if TYPE_CHECKING:
    from evd.commands.runner import Runner
    from evd.loop.reactor import Reactor, Timer
    from evd.net.tls_service import ServerTLS

Figures = dict[str, Any]

# Four looks a second: a stall of a quarter second or more is always seen,
# and an idle daemon wakes four times a second more, which costs nothing.
PROBE_EVERY = 0.25
# Upper bounds of the lag histogram's buckets, seconds.  epoll's timeout has
# a millisecond's grain, so the first bucket is the "on time" one.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Figures that are a state, not a count: they are not kept for a worker
# that has gone (its connections and commands went with it).
GAUGES = frozenset({"connections_current", "commands_running"})


class LagProbe:
    """A histogram of how late a periodic timer runs (see the module's
    docstring).  `counts[i]` is the number of looks no later than
    LAG_BUCKETS[i] (not cumulative; the last slot is +Inf)."""

    def __init__(self, reactor: Reactor):
        self.reactor = reactor
        self.counts = [0] * (len(LAG_BUCKETS) + 1)
        self.sum = 0.0
        self.timer: Timer | None = None

    def start(self) -> None:
        if self.timer is None:
            self.timer = self.reactor.call_later(PROBE_EVERY, self._look)

    def stop(self) -> None:
        self.reactor.cancel(self.timer)
        self.timer = None

    def _look(self) -> float:
        # The clock, not reactor.now: timers run after the I/O callbacks of
        # an iteration, and a slow callback is exactly what is measured.
        assert self.timer is not None
        late = max(0.0, time.monotonic() - self.timer.when)
        self.counts[bisect.bisect_left(LAG_BUCKETS, late)] += 1
        self.sum += late
        return PROBE_EVERY

    def figures(self) -> Figures:
        return {"buckets": list(self.counts), "sum": self.sum, "count": sum(self.counts)}


class Counted(Protocol):
    """What `figures` reads of a daemon (server/daemon.py's Daemon)."""

    services: dict[str, Service]
    tls: dict[str, ServerTLS]
    runner: Runner
    lag: LagProbe


def service_figures(service: Service) -> Figures:
    refused = {r: n for r, n in service.udp_drops.items() if not r.startswith(SEND_FAILURES)}
    return {
        "connections_current": len(service.connections),
        "connections_total": service.connections_total,
        "rejected": dict(service.rejected),
        "udp_drops": dict(service.udp_drops),
        "datagrams_refused": refused,  # by reason: `evd ctl services` counts them as `rejected`
        "bytes_in": service.bytes_in,
        "bytes_out": service.bytes_out,
        "requests": service.requests,
        "errors": service.errors,
        "auth_failures": service.auth_failures,
    }


def figures(daemon: Counted) -> Figures:
    """Everything this process counts (see the module's docstring)."""
    commands: dict[str, dict[str, int]] = {}
    for (name, outcome), n in daemon.runner.outcomes.items():
        commands.setdefault(name, {})[outcome] = n
    services = {name: service_figures(svc) for name, svc in daemon.services.items()}
    for name, tls in daemon.tls.items():
        if name in services:
            services[name]["tls_failures"] = dict(tls.failures)
    return {
        "services": services,
        "commands_running": len(daemon.runner.running),
        "commands": commands,
        "auth_failures": sum(s["auth_failures"] for s in services.values()),
        "log_dropped": log.dropped_total,
        "lag": daemon.lag.figures(),
    }


def add(total: Figures, part: Mapping[str, Any], gauges: bool = True) -> Figures:
    """`part` added into `total` (which is changed and returned): numbers
    summed, dicts merged key by key, lists element by element.  Without
    `gauges`, GAUGES are left out (a worker that has gone)."""
    for key, value in part.items():
        if not gauges and key in GAUGES:
            continue
        if isinstance(value, Mapping):
            total[key] = add(dict(total.get(key) or {}), value, gauges)
        elif isinstance(value, list):
            mine = total.get(key) or [0] * len(value)
            total[key] = [a + b for a, b in zip(mine, value, strict=True)]
        elif isinstance(value, int | float) and not isinstance(value, bool):
            total[key] = total.get(key, 0) + value
    return total


def total(parts: Iterable[Mapping[str, Any]]) -> Figures:
    out: Figures = {}
    for part in parts:
        add(out, part)
    return out
