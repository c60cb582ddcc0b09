"""The benchmark's loads: one entry in LOADS each.

A load says what the generator does (evd bench's mode and counts, its source
addresses, more options), to which servers, with evd configured how (log
level, limits, extra TOML), what its ratios are taken to, and what runs
beside it while it is measured.  A new load -- TLS echo, tcp64 while
/metrics is scraped every second -- is one more entry here.
"""

from __future__ import annotations

import contextlib
import http.client
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from servers import EvdSetup, Running

# What the generator's load comes from when evd's default limits are on:
# per-client rate buckets (200/s, burst 400) would refuse one address far
# over them, so connections and datagrams are spread over this many loopback
# addresses, each then a modest client (see `evd bench --sources`).  The
# opened loads use the same spread, so each pair differs only in evd's
# configuration.  Enough for about 50k connections/s and 400k datagrams/s
# at half the default rate per address; run.py warns when a run comes close.
CONNECT_SOURCES = 1024
UDP_SOURCES = 4096
DEFAULT_LIMITS = EvdSetup(limits="default")
# connect_proxy: echo behind the PROXY protocol, the generator as the proxy
# (`evd bench --proxy-v2`: a v2 header before each request, in the same send).
PROXIED = EvdSetup(service='proxy_protocol = true\nproxy_from = ["127.0.0.0/8"]')


@dataclass(frozen=True)
class Load:
    """One row group of the table: what the generator does, to which servers,
    with evd configured how, and what its ratios are taken to."""

    name: str
    title: str
    mode: str  # evd bench mode
    connections: int
    size: int = 64
    depth: int = 1
    servers: tuple[str, ...] | None = None  # None: every server
    reference: tuple[str, str] = ("same", "asyncio")  # (load, server) its ratios are taken to
    server_cpus: str = "0"
    evd: EvdSetup = field(default_factory=EvdSetup)  # evd's log level, limits, extra configuration
    sources: int = 0  # evd bench --sources (0: its default)
    bench_args: tuple[str, ...] = ()  # more evd bench options
    # Something running while the load is measured (a /metrics scraper, say):
    # called with the started server, a context manager around the run.
    during: Callable[[Running], AbstractContextManager[object]] | None = None
    # TLS: evd's echo on a `tls` listener, the peers' *_tls_echo.py, and the
    # generator with --tls (certificates made at run time: certs.py).
    tls: bool = False


# tcp64_scraped: evd's /metrics on its own loopback address (servers.py
# tells the service's listeners from a load's own by address).
METRICS_HOST = "127.0.0.2"
SCRAPE_EVERY = 1.0
SCRAPED = EvdSetup(tables=f'[metrics]\ntcp = ["{METRICS_HOST}:0"]\n')


@contextlib.contextmanager
def scraped(srv: Running) -> Iterator[None]:
    """GET /metrics every SCRAPE_EVERY seconds while the load runs, as
    Prometheus does (one kept-alive connection); every scrape must answer."""
    port = next(p for proto, host, p in srv.listeners if (proto, host) == ("tcp", METRICS_HOST))
    stop = threading.Event()
    failures: list[str] = []

    def scrape() -> None:
        conn = http.client.HTTPConnection(METRICS_HOST, port, timeout=5.0)
        try:
            while not stop.wait(SCRAPE_EVERY):
                conn.request("GET", "/metrics")
                response = conn.getresponse()
                if response.status != 200 or b"evd_connections_total" not in response.read():
                    failures.append(f"status {response.status}")
        except OSError as exc:
            failures.append(str(exc))
        finally:
            conn.close()

    thread = threading.Thread(target=scrape, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10.0)
    if failures:
        raise OSError(f"/metrics scrapes failed during the load: {failures[:3]}")


EVD = ("evd",)
TLS_SERVERS = ("evd", "asyncio", "uvloop")
LOADS = [
    Load("tcp64", "TCP ping-pong 50 × 64 B", "tcp", 50),
    Load(
        "tcp64_default",
        "TCP ping-pong 50 × 64 B, evd default limits",
        "tcp",
        50,
        servers=EVD,
        reference=("tcp64", "evd"),
        evd=DEFAULT_LIMITS,
    ),
    Load(
        "tcp64_scraped",
        "TCP ping-pong 50 × 64 B, /metrics scraped every second",
        "tcp",
        50,
        servers=EVD,
        reference=("tcp64", "evd"),
        evd=SCRAPED,
        during=scraped,
    ),
    Load("tcp1k", "TCP ping-pong 50 × 1 KiB", "tcp", 50, 1024),
    Load("lat64", "TCP 1 × 64 B (latency)", "tcp", 1, 64),
    Load(
        "connect",
        "connect/echo/close, 20 in flight (evd: log warning)",
        "connect",
        20,
        sources=CONNECT_SOURCES,
    ),
    Load(
        "connect_info",
        "connect/echo/close, 20 in flight, evd log info",
        "connect",
        20,
        servers=EVD,
        reference=("connect", "evd"),
        evd=EvdSetup(level="info"),
        sources=CONNECT_SOURCES,
    ),
    Load(
        "connect_default",
        "connect/echo/close, 20 in flight, evd default limits (log warning)",
        "connect",
        20,
        servers=EVD,
        reference=("connect", "evd"),
        evd=DEFAULT_LIMITS,
        sources=CONNECT_SOURCES,
    ),
    Load(
        "connect_proxy",
        "connect/echo/close, 20 in flight, a PROXY v2 header first (log warning)",
        "connect",
        20,
        servers=EVD,
        reference=("connect", "evd"),
        evd=PROXIED,
        sources=CONNECT_SOURCES,
        bench_args=("--proxy-v2",),
    ),
    Load("udp64", "UDP ping-pong 20 × 64 B", "udp", 20, sources=UDP_SOURCES),
    Load(
        "udp64_default",
        "UDP ping-pong 20 × 64 B, evd default limits",
        "udp",
        20,
        servers=EVD,
        reference=("udp64", "evd"),
        evd=DEFAULT_LIMITS,
        sources=UDP_SOURCES,
    ),
    Load("framed1", "framed echo 50 × 64 B, depth 1", "framed", 50, servers=EVD, reference=("tcp64", "evd")),
    Load(
        "framed16",
        "framed echo 50 × 64 B, depth 16",
        "framed",
        50,
        depth=16,
        servers=EVD,
        reference=("tcp64", "evd"),
    ),
    Load("tls64", "TLS echo 50 × 64 B", "tcp", 50, servers=TLS_SERVERS, tls=True),
    Load(
        "tls_connect",
        "TLS connect/handshake/echo/close, 20 in flight (evd: log warning)",
        "connect",
        20,
        servers=TLS_SERVERS,
        sources=CONNECT_SOURCES,
        tls=True,
    ),
    Load("idle", "10,000 idle connections", "idle", 10000),
    # workers: both evds may use both cores, which the generator shares.
    Load(
        "workers2",
        "TCP 50 × 64 B, evd workers=1 vs 2 on CPUs 0-1",
        "tcp",
        50,
        servers=("evd", "evd-w2"),
        reference=("same", "evd"),
        server_cpus="0,1",
    ),
]
# The default rate per client address (SPEC section 3): default-limit runs
# whose sources come within RATE_MARGIN of it are flagged.
DEFAULT_RATE = 200.0
RATE_MARGIN = 0.75
# Measured beside the table: `evd run` to its daemon.ready line.
SPECIAL = ("startup",)
