"""Where the load goes, and where it comes from.

The address is resolved once (loopback only, unless told otherwise: a load
test aimed elsewhere is an attack).  The source addresses matter twice over
on loopback:

- TIME_WAIT.  The client closes first, so every connection leaves a
  TIME_WAIT socket on the client's address for a minute; a connect run makes
  tens of thousands.  Were they on the target's address (127.0.0.1, say),
  they would crowd the ports everyone else on the machine binds and connects
  from.  From other 127/8 addresses they are in nobody's way.
- Per-client limits.  A server's rate buckets and per_source count are per
  client IP: one generator address far over them is refused, which measures
  the refusal, not the service.  `sources = N` spreads connections and
  datagrams over N addresses of 127.64.0.0/10, so each stays a modest client.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any

from evd.proto.proxy import v2_header
from evd.tools.bench.options import BenchError, Options

Sockaddr = tuple[Any, ...] | str
# Each blocking step of a set-up (connect, a check's send or recv).
STEP_TIMEOUT = 5.0
# Stream connections come from these when no `sources` are asked for.
DEFAULT_SOURCES = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")
# `sources = N` uses N addresses from here on: clear of 127.0.0.0/16, where
# local resolvers (127.0.0.53) and other tests live.
SOURCE_BASE = ipaddress.IPv4Address("127.64.0.1")
# connect: source ports tried before a session counts as failed.
PORT_TRIES = 64
# Linux's IP_BIND_ADDRESS_NO_PORT (Python has the name from 3.12 on).
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


@dataclass(frozen=True)
class Target:
    family: int
    sockaddr: Sockaddr
    sources: tuple[str, ...]  # () = the kernel's choice
    cafile: str | None = None  # TLS: the CA ("": the system's); None: no TLS

    def tls(self) -> ssl.SSLContext | None:
        """A client context for this target (made in each worker: a context
        is not shared across fork), or None without TLS."""
        if self.cafile is None:
            return None
        context = ssl.create_default_context(cafile=self.cafile or None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context

    @property
    def server_name(self) -> str:
        """What the server's certificate must name: the address dialled."""
        return self.sockaddr if isinstance(self.sockaddr, str) else str(self.sockaddr[0])

    def source(self, i: int) -> str | None:
        """Where connection (or UDP socket) number i comes from."""
        return self.sources[i % len(self.sources)] if self.sources else None


def resolve(address: str, mode: str, allow_remote: bool = False) -> tuple[int, Sockaddr]:
    """ "HOST:PORT", "[V6]:PORT" or "unix:PATH" -> (family, sockaddr)."""
    if address.startswith("unix:"):
        if mode == "udp":
            raise BenchError("udp needs an IP address, not a UNIX socket")
        return socket.AF_UNIX, address[5:]
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise BenchError(f"bad address {address!r}: expected HOST:PORT, [V6]:PORT or unix:PATH")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    kind = socket.SOCK_DGRAM if mode == "udp" else socket.SOCK_STREAM
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(host or "127.0.0.1", int(port), 0, kind)[0]
    except socket.gaierror as exc:
        raise BenchError(f"cannot resolve {host!r}: {exc.strerror}") from None
    if not _is_loopback(str(sockaddr[0])) and not allow_remote:
        raise BenchError(f"refusing non-loopback target {sockaddr[0]} (give --allow-remote if you mean it)")
    return family, sockaddr


def _is_loopback(host: str) -> bool:
    ip = ipaddress.ip_address(host.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def find(opts: Options) -> Target:
    """The run's target and its source addresses."""
    family, sockaddr = resolve(opts.address, opts.mode, opts.allow_remote)
    on_loopback4 = family == socket.AF_INET and _is_loopback(str(sockaddr[0]))
    if opts.sources and not on_loopback4:
        raise BenchError("sources: spreading over 127.64.0.0/10 needs an IPv4 loopback target")
    cafile = opts.cafile if opts.tls else None
    if not on_loopback4:
        return Target(family, sockaddr, (), cafile)
    if opts.sources:
        pool = (str(SOURCE_BASE + i) for i in range(opts.sources + 1))
        sources = tuple(a for a in pool if a != sockaddr[0])[: opts.sources]
    elif opts.mode == "udp":
        sources = ()  # as before `sources` existed: the kernel's choice
    else:
        sources = tuple(a for a in DEFAULT_SOURCES if a != sockaddr[0])
    return Target(family, sockaddr, sources, cafile)


def dial(
    target: Target, source: str | None, timeout: float = STEP_TIMEOUT, tls: ssl.SSLContext | None = None
) -> socket.socket:
    """A connected stream socket with `timeout` on every blocking call
    (with `tls`, an SSLSocket whose handshake is done)."""
    sock = socket.socket(target.family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        if source is not None:
            # The address now, the port at connect(): a port bound here would
            # be barred from everyone's connect() while it lives.
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
        sock.connect(target.sockaddr)
        if target.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=target.server_name)
    except BaseException:
        sock.close()
        raise
    return sock


class ProxyV2:
    """`--proxy-v2`: the header HAProxy's send-proxy-v2 would put before a
    connection from a client at (address, port) -- here the generator's own
    source, so a server behind the PROXY protocol sees the same clients as
    one without it.  Built from a prefix per source address: a header costs
    the generator a concatenation, not a pack."""

    def __init__(self, target: Target):
        if target.family == socket.AF_UNIX or not isinstance(target.sockaddr, tuple):
            self.destination: tuple[str, int] = ("0.0.0.0", 0)
        else:
            self.destination = (str(target.sockaddr[0]), int(target.sockaddr[1]))
        self._prefixes: dict[str, tuple[bytes, bytes]] = {}

    def __call__(self, source: tuple[str, int] | None, sock: socket.socket) -> bytes:
        if source is None:  # the kernel chose: ask it
            name = sock.getsockname()
            source = (name[0], name[1]) if isinstance(name, tuple) else ("127.0.0.1", 0)
        address, port = source
        parts = self._prefixes.get(address)
        if parts is None:
            same_family = (":" in address) == (":" in self.destination[0])
            whole = v2_header((address, 0), self.destination if same_family else None)
            at = len(whole) - 4  # the source port's two bytes, then the destination's
            parts = self._prefixes[address] = (whole[:at], whole[at + 2 :])
        return parts[0] + port.to_bytes(2, "big") + parts[1]


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """n bytes from a socket with a timeout (each recv is bounded by it)."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed by the server")
        data += chunk
    return data


class SourcePorts:
    """connect mode's source (address, port) pairs, chosen by us.

    With tens of thousands of TIME_WAIT sockets, connect()'s own search for a
    free ephemeral port stalls for milliseconds (it doubled our CPU per
    connection and put 90 ms into p999).  So, like ../shared/bench/loadgen.c,
    each socket is bound (SO_REUSEADDR) to the next pair, and the next one is
    tried when connect() says EADDRNOTAVAIL (a TIME_WAIT younger than a
    second; older ones are reused on loopback, net.ipv4.tcp_tw_reuse).  Unlike
    loadgen, the ports lie *below* the ephemeral range: a port bound
    explicitly is skipped by every other process's connect() while its
    TIME_WAIT lasts, and a whole range of them made everyone's connect() on
    the machine fail with EADDRNOTAVAIL for a minute.

    The address turns fastest, so consecutive connections come from
    different addresses and each address sees 1/N of the connection rate.
    However many addresses, the pairs number PAIRS (fewer ports per address
    when there are more addresses): a pair is taken again after PAIRS
    connections, so the TIME_WAIT sockets a run leaves stay as many as with
    four addresses, instead of filling the kernel's TIME_WAIT table.
    """

    FIRST = 16384  # clear of the well-known service ports below
    PAIRS = 65536
    MIN_PORTS = 16

    def __init__(self, addresses: tuple[str, ...]):
        self.addresses = addresses
        try:
            with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
                ephemeral_lo = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            ephemeral_lo = 32768
        below = ephemeral_lo - self.FIRST  # the ports we may use
        ports = min(below, max(self.MIN_PORTS, self.PAIRS // max(1, len(addresses))))
        self.lo, self.hi = self.FIRST, self.FIRST + ports - 1
        self.usable = bool(addresses) and ports >= self.MIN_PORTS and len(addresses) * ports >= 4096
        self.port = self.lo + (os.getpid() * 7919 + time.monotonic_ns() // 1000) % max(1, ports)
        self.which = os.getpid() % max(1, len(addresses))

    def bind(self, sock: socket.socket) -> tuple[str, int] | None:
        """Bind to the next free pair and say which (or leave it to connect(): None)."""
        if not self.usable:
            return None
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        for _ in range(PORT_TRIES):
            address, port = self.addresses[self.which], self.port
            self.which += 1
            if self.which == len(self.addresses):
                self.which = 0
                self.port = self.port + 1 if self.port < self.hi else self.lo
            try:
                sock.bind((address, port))
                return address, port
            except OSError:
                continue
        return None
