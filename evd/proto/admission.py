"""Who may talk to a service: access lists, connection limits, rates.

This is xinetd's only_from / no_access / instances / per_source / cps, done
in-process (the access lists' decision itself is proto/access.py's, shared
with `evd explain`).  It is pure bookkeeping (no sockets), asked once per new TCP
connection and once per UDP datagram, and told when a connection ends.

Rates are token buckets per client IP.  The bucket table is bounded: a sweep
drops buckets that have refilled completely (an idle client), and if the table
still reaches MAX_BUCKETS the oldest half goes -- an attacker cycling through
source addresses costs at most MAX_BUCKETS small entries.

Behind the PROXY protocol (SPEC section 13) a connection is first asked
`from_proxy(host)` -- is the peer one of `proxy_from` -- and, once its
header has named the client, `connect(client)`: every rule below then
speaks of the client, never of the proxy.

Bans (`auth_ban`, SPEC section 10) are a table of client IP -> end of ban,
bounded the same way: the sweep drops bans that have run out, and a full
table gives up its oldest ban for a new one.
"""

from __future__ import annotations

from dataclasses import dataclass

from evd.config.model import Limits, ServiceConfig
from evd.proto.access import AccessList, first_match

# About 100 bytes each: 64k buckets is a few MiB at worst, and far more
# distinct clients per `burst / rate` seconds than a small daemon serves.
MAX_BUCKETS = 65536
# Refusals counted per client IP, for `evd ctl sources`: a few dozen bytes
# each; past this many clients the oldest half is forgotten (as buckets).
MAX_REFUSED = 4096

# One address per entry, made only by three failed `auth` on one connection
# (each connection first passing every other limit): far more than a
# small daemon meets, and a few MiB at worst.
MAX_BANS = 65536

# Access-list verdicts remembered, one small entry per client address; the
# table starts afresh when full (and at every reload).
MAX_VERDICTS = 65536

# Reasons, as they appear in `conn.reject` and `udp.drop`.
ACCESS = "access"
MAX_CONNECTIONS = "max_connections"
PER_SOURCE = "per_source"
RATE = "rate"
BANNED = "banned"
PROXY = "proxy"  # not from a trusted proxy, or no valid PROXY header in time


# (slot, workers) of this process.  Per-client limits need no sharing: the
# kernel steers each client IP to one worker (server/sockets.py `steer`),
# so that worker's count is the client's count.  max_connections is the
# whole service's, so each worker takes its part of it.
_SLOT: tuple[int, int] = (0, 1)


def serve_as_worker(index: int, count: int) -> None:
    """This process is worker `index` of `count`: see share_of."""
    global _SLOT
    _SLOT = (index, count)


def share_of(total: int) -> int:
    """This worker's part of a max_connections of `total`: the floor of an
    even split, the remainder one each to the first slots, so the parts add
    up to `total` exactly -- but never 0, or the clients steered to that
    worker could never connect (with max_connections < workers the service
    takes one per worker)."""
    index, count = _SLOT
    return max(1, total // count + (1 if index < total % count else 0))


@dataclass(frozen=True, slots=True)
class SourceView:
    """One client IP as admission sees it (`evd ctl sources`)."""

    host: str
    connections: int  # open now
    tokens: float | None  # left in its rate bucket now; None: no rate limit
    rejected: int = 0  # connections and datagrams refused (as far as remembered)


class Admission:
    def __init__(self, service: ServiceConfig):
        self.current = 0
        self._per_source: dict[str, int] = {}
        self._buckets: dict[str, list[float]] = {}  # ip -> [tokens, last]
        self._bans: dict[str, float] = {}  # ip -> when its ban ends
        self._verdicts: dict[str, bool] = {}  # ip -> may it talk to us (the access lists)
        self._refused: dict[str, int] = {}  # ip -> refusals (bounded: MAX_REFUSED)
        self._trusted: dict[str, bool] = {}  # ip -> is it one of proxy_from (bounded: MAX_VERDICTS)
        self.apply(service)

    def apply(self, service: ServiceConfig) -> None:
        """Take new rules (a reload); counts of open connections carry over."""
        self._access = AccessList(service.only_from, service.no_access)
        self._verdicts.clear()
        # Connections on stream listeners begin with a PROXY header (SPEC 13).
        self.proxied = service.proxy_protocol
        self._proxy_from = service.proxy_from
        self._trusted.clear()
        limits: Limits = service.limits
        self._max = share_of(limits.max_connections)
        self._per_source_max = limits.per_source
        self._rate = limits.rate
        self._burst = float(limits.burst)
        self._ban_time = limits.auth_ban
        if not self._ban_time:  # bans switched off: lift those in force
            self._bans.clear()
        # With no access lists, the address never needs parsing.
        self.filters = bool(self._access)
        # Whether a datagram needs asking about at all: with neither lists
        # nor a rate, the UDP path skips admission entirely.
        self.checks_datagrams = self.filters or self._rate > 0

    def _allowed(self, host: str) -> bool:
        """The access lists' verdict, remembered per host: parsing an
        address costs microseconds, and a UDP client asks per datagram."""
        allowed = self._verdicts.get(host)
        if allowed is None:
            if len(self._verdicts) >= MAX_VERDICTS:
                self._verdicts.clear()
            allowed = self._verdicts[host] = self._access.allowed(host)
        return allowed

    def from_proxy(self, host: str | None) -> bool:
        """May `host` send us a PROXY header (is it in `proxy_from`)?  A
        UNIX peer has no address: whoever may open the socket file is
        trusted, as for the access lists."""
        if host is None:
            return True
        trusted = self._trusted.get(host)
        if trusted is None:
            if len(self._trusted) >= MAX_VERDICTS:
                self._trusted.clear()
            trusted = self._trusted[host] = first_match(host, self._proxy_from) is not None
        return trusted

    def _take_token(self, key: str, now: float) -> bool:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self.expire(now, force=True)
            self._buckets[key] = [self._burst - 1.0, now]
            return True
        tokens = min(self._burst, bucket[0] + (now - bucket[1]) * self._rate)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True

    def expire(self, now: float, force: bool = False) -> None:
        """Drop buckets that have refilled (their client has been quiet),
        and bans that have run out."""
        if self._bans:
            for host in [h for h, end in self._bans.items() if end <= now]:
                del self._bans[host]
        if not self._rate:
            self._buckets.clear()
            return
        full = self._burst / self._rate
        stale = [k for k, (_, last) in self._buckets.items() if now - last >= full]
        for key in stale:
            del self._buckets[key]
        if force and len(self._buckets) >= MAX_BUCKETS:
            for key in list(self._buckets)[: len(self._buckets) // 2]:
                del self._buckets[key]

    @property
    def buckets(self) -> int:
        return len(self._buckets)

    @property
    def bans(self) -> int:
        return len(self._bans)

    def ban(self, host: str | None, now: float) -> bool:
        """Refuse `host` for `auth_ban` seconds from `now`; False if bans are
        off (or the peer has no IP address to ban)."""
        if host is None or not self._ban_time:
            return False
        bans = self._bans
        if host not in bans and len(bans) >= MAX_BANS:
            self.expire(now)
            if len(bans) >= MAX_BANS:
                del bans[next(iter(bans))]  # the oldest
        bans.pop(host, None)  # re-inserted: the table stays oldest first
        bans[host] = now + self._ban_time
        return True

    def banned_for(self, host: str, now: float) -> float:
        """Seconds left of `host`'s ban (0.0: not banned)."""
        return max(0.0, self._bans.get(host, now) - now)

    def connect(self, host: str | None, now: float) -> str | None:
        """A new connection from `host` (None for UNIX peers): None to admit
        (and count it), or the reason to refuse."""
        if host is not None and self.filters and not self._allowed(host):
            return ACCESS
        if host is not None and self._bans:
            end = self._bans.get(host)
            if end is not None:
                if now < end:
                    return BANNED
                del self._bans[host]
        if self.current >= self._max:
            return MAX_CONNECTIONS
        if host is not None:
            if self._per_source.get(host, 0) >= self._per_source_max:
                return PER_SOURCE
            if self._rate and not self._take_token(host, now):
                return RATE
            self._per_source[host] = self._per_source.get(host, 0) + 1
        self.current += 1
        return None

    def disconnect(self, host: str | None) -> None:
        self.current -= 1
        if host is not None:
            left = self._per_source[host] - 1
            if left:
                self._per_source[host] = left
            else:
                del self._per_source[host]

    def datagram(self, host: str, now: float) -> str | None:
        """A datagram from `host` (the sender's IP as the kernel gave it,
        IPv4-mapped folded): None to answer, or the reason to drop it.

        This runs for every datagram, so the common case -- a known client
        with tokens left -- is `_take_token` inlined: one call, no min()."""
        if self.filters and not self._allowed(host):
            return ACCESS
        rate = self._rate
        if rate:
            bucket = self._buckets.get(host)
            if bucket is None:
                self._take_token(host, now)  # a new client: a full bucket
                return None
            tokens = bucket[0] + (now - bucket[1]) * rate
            if tokens > self._burst:
                tokens = self._burst
            bucket[1] = now
            if tokens < 1.0:
                bucket[0] = tokens
                return RATE
            bucket[0] = tokens - 1.0
        return None

    # -- views (runtime control; not on the hot path) ------------------------

    def per_source(self, host: str) -> int:
        """Open connections from `host` now."""
        return self._per_source.get(host, 0)

    def tokens(self, host: str, now: float) -> float | None:
        """Tokens `host` has now (a client without a bucket has a full
        one), or None when there is no rate limit."""
        if not self._rate:
            return None
        bucket = self._buckets.get(host)
        if bucket is None:
            return self._burst
        return min(self._burst, bucket[0] + (now - bucket[1]) * self._rate)

    def refused(self, host: str) -> None:
        """`host` was refused a connection or a datagram (counted per IP
        for `sources`; the service counts by reason)."""
        refused = self._refused
        if host not in refused and len(refused) >= MAX_REFUSED:
            for key in list(refused)[: len(refused) // 2]:
                del refused[key]
        refused[host] = refused.get(host, 0) + 1

    def sources(self, now: float) -> list[SourceView]:
        """Every client IP admission keeps state for: open connections, a
        rate bucket not yet refilled and expired, refusals, or a ban."""
        hosts = dict.fromkeys([*self._per_source, *self._buckets, *self._refused, *self._bans])
        return [
            SourceView(h, self.per_source(h), self.tokens(h, now), self._refused.get(h, 0)) for h in hosts
        ]
