"""Addresses: the one parser and the one formatter.

Three spellings meet here, and each has one function:

- configured listeners, `"HOST:PORT"`, `"[V6]:PORT"`, `"*:PORT"` or a UNIX
  path (`parse`, giving an `Address`; `str(address)` writes it back);
- what a client dials, the same plus `"unix:PATH"` (`dial`);
- what the kernel reports, a family and a sockaddr (`sockaddr_text`, for
  `listener.open`), and a peer's host and port (`peer_text`, for `peer` in
  the logs).

IPv4 clients of a dual-stack socket arrive as `::ffff:a.b.c.d`; every
function here folds them to `a.b.c.d`, so a peer reads the same whichever
socket it came through (access lists fold the same way, see
proto/admission.py).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass

# sun_path is 108 bytes including the terminating NUL.
UNIX_PATH_MAX = 107
# Listener protocols.  "tls" is TLS over TCP: it shares TCP's port space.
PROTOS = ("tcp", "udp", "unix", "tls")

SockAddr = tuple[str, int] | tuple[str, int, int, int] | str


@dataclass(frozen=True, slots=True)
class Address:
    proto: str  # one of PROTOS
    host: str  # IP literal without brackets, "*" for all IPv4+IPv6, or the UNIX path
    port: int  # 0 for unix

    def __str__(self) -> str:
        if self.proto == "unix":
            return self.host
        return host_port(self.host, self.port)

    @property
    def port_space(self) -> str:
        """Which kernel namespace the address lives in: two listeners clash
        only within one ("tcp" for TCP and TLS, "udp", "unix")."""
        return "tcp" if self.proto == "tls" else self.proto


def host_port(host: str, port: int) -> str:
    """ "1.2.3.4:5", "[::1]:5" (brackets for IPv6)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def fold_mapped(host: str) -> str:
    """ "::ffff:1.2.3.4" -> "1.2.3.4"; anything else unchanged."""
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host


def parse(proto: str, text: str) -> Address:
    """One configured address, or ValueError saying what is wrong."""
    if proto == "unix":
        if not os.path.isabs(text):
            raise ValueError("must be an absolute path")
        if len(os.fsencode(text)) > UNIX_PATH_MAX:
            raise ValueError(f"longer than {UNIX_PATH_MAX} bytes, the UNIX socket limit")
        return Address("unix", text, 0)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not port.isascii() or int(port) > 65535:
        raise ValueError("expected HOST:PORT with PORT an integer 0..65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            return Address(proto, str(ipaddress.IPv6Address(host[1:-1])), int(port))
        except ValueError:
            raise ValueError(f"{host} is not an IPv6 literal") from None
    if host == "*":
        return Address(proto, "*", int(port))
    if ":" in host:
        raise ValueError("an IPv6 host needs brackets: [ADDR]:PORT")
    try:
        return Address(proto, str(ipaddress.IPv4Address(host)), int(port))
    except ValueError:
        raise ValueError("host must be an IP literal or * (no hostnames)") from None


def dialable(address: Address) -> str:
    """How a client on this host reaches a listener: "unix:PATH", or
    HOST:PORT with the wildcard "*" dialled as 127.0.0.1."""
    if address.proto == "unix":
        return f"unix:{address.host}"
    return host_port("127.0.0.1" if address.host == "*" else address.host, address.port)


def dial(text: str) -> tuple[socket.AddressFamily, SockAddr]:
    """What a client dials ("HOST:PORT", "[V6]:PORT", "unix:PATH") as
    (family, sockaddr) for socket.connect, or ValueError."""
    if text.startswith("unix:"):
        return socket.AF_UNIX, text[5:]
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not port.isascii() or int(port) > 65535:
        raise ValueError(f"bad address {text!r}: expected HOST:PORT, [V6]:PORT or unix:PATH")
    if host.startswith("[") and host.endswith("]"):
        return socket.AF_INET6, (host[1:-1], int(port))
    if host in ("", "*"):
        host = "127.0.0.1"
    return (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, int(port))


def sockaddr_text(family: int, sockaddr: object) -> str:
    """What the kernel reports for a socket (getsockname, recvfrom) as text:
    "1.2.3.4:5", "[::1]:5", a UNIX path, or "unix" for an unnamed one."""
    if family == socket.AF_UNIX:
        return sockaddr if isinstance(sockaddr, str) and sockaddr else "unix"
    assert isinstance(sockaddr, tuple)
    host, port = sockaddr[0], sockaddr[1]
    return host_port(fold_mapped(host), port)


def peer_text(host: str | None, port: int) -> str:
    """A connection's peer for the logs: "1.2.3.4:5", "[::1]:5", or "unix"
    (host None: a UNIX client, which has no address worth printing)."""
    return "unix" if host is None else host_port(host, port)
