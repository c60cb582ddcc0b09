"""The running state of one configured service.

A `Service` is what listeners and transports share: the service's current
configuration (swapped on reload), its admission rules, its counters and the
set of its open connections.  Listeners come and go with reloads; the
`Service` object stays, so counters and open connections survive a reload.

Counters are cheap on the hot path: a connection keeps its own byte counts
and adds them to the service's totals once, when it closes; `snapshot` adds
the open connections' running counts.
"""

from __future__ import annotations

import itertools

from evd.core.config import ServiceConfig
from evd.core.log import log
from evd.proto.admission import Admission

# One sequence for the whole process, so a `conn` id names one connection in
# the logs whatever service it belongs to.
conn_ids = itertools.count(1)


class ThrottledLog:
    """Logs `event` (udp.drop, conn.reject) at most once per second per
    service, with a `count` of what happened since the last line: a flood of
    refused clients must not become a flood of log lines."""

    __slots__ = ("event", "service", "reactor", "pending", "timer")

    def __init__(self, event: str, service: str, reactor):
        self.event = event
        self.service = service
        self.reactor = reactor
        self.pending: dict[str, list] = {}  # reason -> [count, last peer]
        self.timer = None

    def note(self, reason: str, peer: str) -> None:
        if self.timer is None:
            # The first one in a quiet second is said at once ...
            log.warning(self.event, service=self.service, peer=peer, reason=reason, count=1)
            self.timer = self.reactor.call_later(1.0, self._report)
            return
        # ... the rest are summed and said once a second while they last.
        entry = self.pending.get(reason)
        if entry is None:
            self.pending[reason] = [1, peer]
        else:
            entry[0] += 1
            entry[1] = peer

    def _report(self) -> float | None:
        if not self.pending:
            self.timer = None
            return None
        pending, self.pending = self.pending, {}
        for reason, (count, peer) in pending.items():
            log.warning(self.event, service=self.service, peer=peer, reason=reason, count=count)
        return 1.0


class Service:
    def __init__(self, config: ServiceConfig, reactor):
        self.name = config.name
        self.config = config
        self.reactor = reactor
        self.admission = Admission(config)
        self.drops = ThrottledLog("udp.drop", config.name, reactor)
        self.rejects = ThrottledLog("conn.reject", config.name, reactor)
        self.connections: set = set()
        # Totals of closed connections (TCP/UNIX) plus all datagrams (UDP).
        self.connections_total = 0
        self.rejected = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.requests = 0
        self.errors = 0

    def apply(self, config: ServiceConfig) -> None:
        """A reload: new limits and access lists for new and open connections."""
        self.config = config
        self.admission.apply(config)
        for conn in self.connections:
            conn.apply_limits(config.limits)

    def snapshot(self) -> dict:
        bytes_in, bytes_out, requests = self.bytes_in, self.bytes_out, self.requests
        for conn in self.connections:
            bytes_in += conn.bytes_in
            bytes_out += conn.bytes_out
            requests += conn.requests
        return {
            "connections_current": len(self.connections),
            "connections_total": self.connections_total,
            "rejected": self.rejected,
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            "requests": requests,
            "errors": self.errors,
        }
