"""Access lists: may this address talk to a service, and which rule said so.

xinetd's `only_from` / `no_access`, with its order: an address must match
some `only_from` entry (when the list is not empty), and then must match no
`no_access` entry.  The first matching entry of a list is the rule that
decided.  Addresses that are not IP addresses (there are none from TCP or
UDP peers; a UNIX peer has no address at all) are allowed: access lists
speak of IP networks only.

IPv4-mapped IPv6 is folded to IPv4 on both sides: a dual-stack listener sees
an IPv4 client as ::ffff:10.1.2.3, and an operator who wrote 10.0.0.0/8 (or
::ffff:10.0.0.0/104) means that client either way.  An IPv4 network never
matches an IPv6 address or the other way round.

Pure: the daemon's admission (proto/admission.py) and `evd explain` ask the
same questions and must get the same answers.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

ONLY_FROM = "only_from"
NO_ACCESS = "no_access"

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def parse_ip(host: str) -> IP | None:
    """The peer's address, IPv4-mapped IPv6 folded to IPv4 (a "%scope"
    suffix dropped); None if it is not an IP address."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def fold_mapped(net: Network) -> Network:
    """An IPv4-mapped IPv6 network (::ffff:10.0.0.0/104) as the IPv4
    network it means."""
    if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(_MAPPED):
        return ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
    return net


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    rule: str | None  # "only_from CIDR", "no_access CIDR", or None: no entry decided

    @property
    def word(self) -> str:
        return "allow" if self.allowed else "deny"


class AccessList:
    """A service's only_from and no_access, folded once, asked many times."""

    __slots__ = ("_no_access", "_only_from")

    def __init__(self, only_from: Iterable[Network], no_access: Iterable[Network]) -> None:
        # (folded network to test, the entry as configured, to name it)
        self._only_from = tuple((fold_mapped(n), n) for n in only_from)
        self._no_access = tuple((fold_mapped(n), n) for n in no_access)

    def __bool__(self) -> bool:
        """Is there anything to check?  (Without lists, no address needs parsing.)"""
        return bool(self._only_from or self._no_access)

    def decide(self, host: str) -> Verdict:
        """The verdict for `host` and the entry that decided it.  Denied for
        not being in a non-empty only_from: no entry decided (rule None)."""
        ip = parse_ip(host)
        if ip is None:
            return Verdict(True, None)
        rule = None
        if self._only_from:
            entry = _first_match(ip, self._only_from)
            if entry is None:
                return Verdict(False, None)
            rule = f"{ONLY_FROM} {entry}"
        denied = _first_match(ip, self._no_access)
        if denied is not None:
            return Verdict(False, f"{NO_ACCESS} {denied}")
        return Verdict(True, rule)

    def allowed(self, host: str) -> bool:
        return self.decide(host).allowed


def first_match(host: str, nets: Iterable[Network]) -> Network | None:
    """The first of `nets` (as configured) that `host` is in, IPv4-mapped
    IPv6 folded on both sides; None if none is, or `host` is no IP address.
    (`proxy_from`: is this peer a trusted proxy, and by which entry.)"""
    ip = parse_ip(host)
    if ip is None:
        return None
    return _first_match(ip, tuple((fold_mapped(n), n) for n in nets))


def _first_match(ip: IP, nets: tuple[tuple[Network, Network], ...]) -> Network | None:
    for folded, configured in nets:
        if folded.version == ip.version and ip in folded:
            return configured
    return None
