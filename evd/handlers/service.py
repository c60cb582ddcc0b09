"""The running state of one configured service.

A `Service` is what listeners and transports share: the service's current
configuration (swapped on reload), its admission rules, its counters and the
set of its open connections.  Listeners come and go with reloads; the
`Service` object stays, so counters and open connections survive a reload.

Admission and counting happen here and nowhere else.  A connection's life,
as the listener and the transport report it:

    admit(host, port, now)  -> None: a slot is taken; or the refusal reason
    release(host)              the slot goes back unused (the handler or the
                               transport could not be built)
    opened(conn)            -> its conn id; counted, logged `conn.open`
                               (TLS: `announce`d after the handshake)
    closed(conn)               the transport's one way out: slot back,
                               byte counts folded in

and a datagram's: `admission.datagram(...)`, then `dropped(...)` when it
goes unanswered.

Behind the PROXY protocol (SPEC section 13) a connection has a life before
that: from a trusted proxy (`admission.from_proxy`, else `refused_proxy`),
it waits in `awaiting` for its header -- not admitted, not counted, not
logged -- then `admit`s the client the header names (or is `refused_proxy`
for a bad or late header: `sweep` ends those older than handshake_timeout).

Counters are cheap on the hot path: a connection keeps its own byte counts
and adds them to the service's totals once, when it closes; `snapshot` adds
the open connections' running counts.  The views at the end (connections,
refusals by reason, admission's sources) are for the runtime control and
metrics surfaces: read-only, computed when asked, never on the hot path.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from evd.config.addresses import SockAddr, fold_mapped, peer_text, sockaddr_text
from evd.config.model import ServiceConfig
from evd.log.logger import NOTHING_MORE, log
from evd.loop.seams import Connection, Reason
from evd.proto.admission import ACCESS, PROXY, RATE, Admission

if TYPE_CHECKING:
    from evd.loop.reactor import Reactor, Timer

# One sequence for the whole process, so a `conn` id names one connection in
# the logs whatever service it belongs to.
conn_ids = itertools.count(1)


# With workers, the ids of a slot's successive workers start this many
# steps apart: more connections than one worker ever sees.
IDS_PER_LIFE = 2**32


def number_connections(workers: int, index: int | None, life: int = 0) -> None:
    """Number this process's connections so that an id names one connection
    across the supervisor and all its workers, past and present: with
    `workers` > 1 each process counts on its own residue modulo workers + 1
    (worker `index`, or the supervisor's last one for None), and the
    `life`-th worker on a slot starts life * IDS_PER_LIFE steps on.  One
    process (workers = 1) counts 1, 2, 3, ..."""
    global conn_ids
    step = workers + 1 if workers > 1 else 1
    residue = workers if index is None else index
    conn_ids = itertools.count(life * IDS_PER_LIFE * step + residue + 1, step)


# `udp.drop` reasons for replies the kernel would not take: the datagram was
# admitted and answered, the answer was lost.  Every other drop reason is a
# refusal (loop, access, rate) and counts in `rejected` too.
SEND_FAILURES = ("send_buffer_full", "send_errno_")

# Datagram drops that admission decided (the rest: the loop guard, sends).
REFUSALS = frozenset({ACCESS, RATE})

P = TypeVar("P")


class Awaiting(Protocol):
    """A connection whose PROXY header has not all arrived (net/proxied.py)."""

    opened: float  # reactor time of the accept

    def expire(self) -> None: ...  # refuse it: its header is late


class ThrottledLog(Generic[P]):
    """Logs `event` (udp.drop, conn.reject) at most once per second per
    service, with a `count` of what happened since the last line: a flood of
    refused clients must not become a flood of log lines.  The peer is kept
    as the kernel gave it and `render`ed only for a line actually written."""

    __slots__ = ("event", "service", "reactor", "render", "pending", "timer")

    def __init__(self, event: str, service: str, reactor: Reactor, render: Callable[[P], str]):
        self.event = event
        self.service = service
        self.reactor = reactor
        self.render = render
        self.pending: dict[str, tuple[int, P]] = {}  # reason -> (count, last peer)
        self.timer: Timer | None = None

    def note(self, reason: str, peer: P) -> None:
        if self.timer is None:
            # The first one in a quiet second is said at once ...
            log.warning(self.event, service=self.service, peer=self.render(peer), reason=reason, count=1)
            self.timer = self.reactor.call_later(1.0, self._report)
            return
        # ... the rest are summed and said once a second while they last.
        entry = self.pending.get(reason)
        self.pending[reason] = (1 if entry is None else entry[0] + 1, peer)

    def _report(self) -> float | None:
        if not self.pending:
            self.timer = None
            return None
        pending, self.pending = self.pending, {}
        for reason, (count, peer) in pending.items():
            log.warning(self.event, service=self.service, peer=self.render(peer), reason=reason, count=count)
        return 1.0


def _render_peer(peer: tuple[str | None, int]) -> str:
    return peer_text(*peer)


def _render_sender(sender: tuple[int, SockAddr]) -> str:
    return sockaddr_text(*sender)


@dataclass(frozen=True, slots=True)
class ConnectionView:
    """One open connection, as `evd ctl conns` lists it."""

    conn: int
    service: str
    peer: str
    age_s: float
    idle_s: float
    bytes_in: int
    bytes_out: int
    exec_pid: int | None = None  # a program service's child (SPEC section 14)


class Service:
    def __init__(self, config: ServiceConfig, reactor: Reactor):
        self.name = config.name
        self.config = config
        self.reactor = reactor
        self.admission = Admission(config)
        self.drops: ThrottledLog[tuple[int, SockAddr]] = ThrottledLog(
            "udp.drop", config.name, reactor, _render_sender
        )
        self.rejects: ThrottledLog[tuple[str | None, int]] = ThrottledLog(
            "conn.reject", config.name, reactor, _render_peer
        )
        self.connections: set[Connection] = set()
        self.awaiting: set[Awaiting] = set()  # PROXY headers not complete yet
        # Totals of closed connections (TCP/UNIX) plus all datagrams (UDP).
        self.connections_total = 0
        self.rejected: Counter[str] = Counter()  # connections refused, by reason
        self.udp_drops: Counter[str] = Counter()  # datagrams not answered, by reason
        self.bytes_in = 0
        self.bytes_out = 0
        self.requests = 0
        self.errors = 0
        self.auth_failures = 0  # framed: wrong MACs (`auth.fail`)

    def apply(self, config: ServiceConfig) -> None:
        """A reload: new limits and access lists for new and open connections."""
        self.config = config
        self.admission.apply(config)
        for conn in self.connections:
            conn.apply_limits(config.limits)

    # -- a connection's life ---------------------------------------------------

    def admit(self, host: str | None, port: int, now: float) -> str | None:
        """A new connection from `host` (None: a UNIX peer): None when it
        may go on (its slot is taken), else the reason it was refused
        (counted and logged `conn.reject`)."""
        reason = self.admission.connect(host, now)
        if reason is not None:
            self.rejected[reason] += 1
            if host is not None:
                self.admission.refused(host)
            self.rejects.note(reason, (host, port))
        return reason

    def refused_proxy(self, host: str | None, port: int) -> None:
        """A connection turned away before admission: not from a trusted
        proxy, or without a valid PROXY header in time (counted and logged
        `conn.reject` `reason = "proxy"`, the proxy as the peer)."""
        self.rejected[PROXY] += 1
        if host is not None:
            self.admission.refused(host)
        self.rejects.note(PROXY, (host, port))

    def release(self, host: str | None) -> None:
        """Give back the slot `admit` took for a connection that never got
        a transport."""
        self.admission.disconnect(host)

    def opened(self, conn: Connection) -> int:
        """An admitted connection has its transport: count it, name it."""
        self.connections.add(conn)
        self.connections_total += 1
        conn_id = next(conn_ids)
        # A TLS connection is announced by its transport once the handshake
        # is done: its client is known then, and a failed handshake is
        # `tls.fail`, not a connection (net/tls.py).
        if log.info_on and (proto := conn.proto) != "tls":
            if conn.proxy is None:  # the common case: no `extra` to build
                log.conn_open(conn, self.name, conn_id, proto, NOTHING_MORE)
            else:
                self.announce(conn, conn_id)
        return conn_id

    def announce(self, conn: Connection, conn_id: int, **extra: object) -> None:
        """Log `conn.open` (`extra`: TLS adds `client_cn`; behind the PROXY
        protocol, `proxy` is the proxy's own IP:PORT)."""
        if log.info_on:
            if conn.proxy is not None:
                extra["proxy"] = conn.proxy
            log.conn_open(conn, self.name, conn_id, conn.proto, extra)

    def closed(self, conn: Connection) -> None:
        """The transport's close: the slot goes back, the counts fold in."""
        self.connections.discard(conn)
        self.admission.disconnect(conn.host)
        self.bytes_in += conn.bytes_in
        self.bytes_out += conn.bytes_out
        self.requests += conn.requests

    def dropped(self, reason: str, family: int, sender: SockAddr) -> None:
        """A datagram that goes unanswered: turned away by the loop guard or
        admission, or its answer not taken by the kernel (SEND_FAILURES)."""
        self.udp_drops[reason] += 1
        self.drops.note(reason, (family, sender))
        if reason in REFUSALS:  # admission's verdicts, by client (evd ctl sources)
            self.admission.refused(fold_mapped(sender[0]))

    # -- views -----------------------------------------------------------------

    def snapshot(self) -> dict[str, int]:
        bytes_in, bytes_out, requests = self.bytes_in, self.bytes_out, self.requests
        for conn in self.connections:
            bytes_in += conn.bytes_in
            bytes_out += conn.bytes_out
            requests += conn.requests
        return {
            "connections_current": len(self.connections),
            "connections_total": self.connections_total,
            "rejected": self.rejected_total(),
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            "requests": requests,
            "errors": self.errors,
        }

    def rejected_total(self) -> int:
        """Connections and datagrams refused: `stats` `rejected`."""
        refused = sum(n for reason, n in self.udp_drops.items() if not reason.startswith(SEND_FAILURES))
        return sum(self.rejected.values()) + refused

    def open_connections(self, now: float) -> list[ConnectionView]:
        """Every open connection, oldest first."""
        return [self.view(conn, now) for conn in sorted(self.connections, key=lambda c: c.conn_id)]

    def view(self, conn: Connection, now: float) -> ConnectionView:
        """One open connection as `evd ctl conns` lists it: the one place a
        row is made.  `idle_s` is as exact as the periodic sweep: traffic
        is noticed by comparing byte counts."""
        return ConnectionView(
            conn=conn.conn_id,
            service=self.name,
            peer=conn.peer,
            age_s=round(now - conn.opened, 3),
            idle_s=round(conn.idle_for(now), 3),
            bytes_in=conn.bytes_in,
            bytes_out=conn.bytes_out,
            exec_pid=conn.protocol.exec_pid,
        )

    def sweep(self, now: float) -> None:
        """Close connections silent for idle_timeout, and those that have
        kept a request half-sent that long (a slowloris); the daemon's one
        periodic timer calls this, so reads and writes pay nothing for it.
        PROXY headers not complete within handshake_timeout are refused."""
        if self.awaiting:
            late = now - self.config.limits.handshake_timeout
            for waiting in [w for w in self.awaiting if w.opened < late]:
                waiting.expire()
        limit = self.config.limits.idle_timeout
        if limit <= 0:
            return
        for conn in list(self.connections):
            if conn.idle_for(now) > limit:
                conn.close(Reason.IDLE)
            elif conn.protocol.stalled(now, limit):
                conn.close(Reason.FRAME_TIMEOUT)

    def kill(self, conn_id: int) -> bool:
        """Close connection `conn_id` (`reason = "killed"`); False if this
        service has no such connection."""
        for conn in self.connections:
            if conn.conn_id == conn_id:
                conn.close(Reason.KILLED)
                return True
        return False
