"""systemd integration in plain Python: sd_notify and socket activation.

libsystemd is not needed for either; both are small, stable protocols
(sd_notify(3), sd_listen_fds(3)):

- Notification: one datagram of "KEY=VALUE" lines to the AF_UNIX socket named
  by $NOTIFY_SOCKET (a path, or "@name" for the abstract namespace).  The
  socket is non-blocking and a failed send is dropped: telling systemd is
  never worth stalling the loop for.
- Activation: systemd passes listening sockets as descriptors 3, 4, ...
  ($LISTEN_FDS of them) to the process whose pid is $LISTEN_PID, optionally
  named by $LISTEN_FDNAMES (colon-separated).  We match each to a configured
  listener: by name "SERVICE-PROTO" (e.g. "echo-tcp", set with
  FileDescriptorName=), else by the address it is bound to.  The variables
  are removed once read, so nothing we start inherits them.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import time
from collections.abc import Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING

from evd.config.addresses import Address, fold_mapped, sockaddr_text
from evd.log.logger import log

if TYPE_CHECKING:
    from evd.loop.reactor import Reactor

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START


# A listener's key: (service name, configured address).
ListenerKey = tuple[str, Address]


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """sd_notify for one process; every method is a no-op without
    $NOTIFY_SOCKET."""

    def __init__(self, address: str | None = None):
        self.address = ""
        self.sock: socket.socket | None = None
        self._warned = False
        if not address:
            return
        # "@name" is the abstract namespace: a leading NUL byte on the wire.
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setblocking(False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Notifier:
        return cls(env.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    def notify(self, *lines: str) -> bool:
        if self.sock is None:
            return False
        try:
            self.sock.sendto("\n".join(lines).encode(), self.address)
            return True
        except OSError as exc:
            if not self._warned:  # once: systemd gone is not news every second
                self._warned = True
                log.warning(
                    "systemd.notify", error=f"sendto {self.address!r}: [Errno {exc.errno}] {exc.strerror}"
                )
            return False

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        self.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}", "STATUS=reloading")

    def stopping(self, status: str) -> None:
        self.notify("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def start_watchdog(self, reactor: Reactor) -> None:
        """Ping now and every half $WATCHDOG_USEC from a reactor timer, so a
        loop that stops turning stops pinging."""
        period = watchdog_period() if self.enabled else None
        if period is not None:
            every = period

            def ping() -> float:
                self.watchdog()
                return every

            ping()
            reactor.call_later(period, ping)

    def fileno(self) -> int | None:
        return self.sock.fileno() if self.sock is not None else None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def watchdog_period(env: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC, as
    sd_watchdog_enabled(3) advises), or None if the watchdog is off or meant
    for another process."""
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2e6


# -- socket activation -------------------------------------------------------


def listen_fds(env: MutableMapping[str, str] = os.environ) -> list[tuple[socket.socket, str]]:
    """The inherited sockets with their names ("" when unnamed), and the
    LISTEN_* variables removed.  Empty unless they are meant for us."""
    pid, count = env.pop("LISTEN_PID", ""), env.pop("LISTEN_FDS", "")
    names = env.pop("LISTEN_FDNAMES", "")
    if not pid.isdigit() or int(pid) != os.getpid() or not count.isdigit():
        return []
    names_list = names.split(":") if names else []
    inherited = []
    for i in range(int(count)):
        fd = LISTEN_FDS_START + i
        os.set_inheritable(fd, False)  # ours now; commands must not get it
        name = names_list[i] if i < len(names_list) else ""
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            log.warning(
                "systemd.socket", fd=fd, name=name, error=f"not a socket: [Errno {exc.errno}] {exc.strerror}"
            )
            os.close(fd)
            continue
        sock.setblocking(False)
        inherited.append((sock, name))
    return inherited


def _proto(sock: socket.socket) -> str | None:
    if sock.type == socket.SOCK_STREAM:
        return "unix" if sock.family == socket.AF_UNIX else "tcp"
    if sock.type == socket.SOCK_DGRAM and sock.family != socket.AF_UNIX:
        return "udp"
    return None


def _bound_to(sock: socket.socket, address: Address) -> bool:
    """Is `sock` bound where `address` (as configured) says?  Port 0 matches
    nothing: it asks evd to let the kernel pick, so only a name can give
    such a listener a socket."""
    name = sock.getsockname()
    if address.proto == "unix":
        return bool(name == address.host)
    host, port = name[0], name[1]
    if address.port != port:
        return False
    if address.host == "*":
        return host in ("::", "0.0.0.0")
    try:
        return ipaddress.ip_address(fold_mapped(host.split("%")[0])) == ipaddress.ip_address(address.host)
    except ValueError:
        return False


def match(
    inherited: Sequence[tuple[socket.socket, str]], keys: Sequence[ListenerKey]
) -> tuple[dict[ListenerKey, socket.socket], list[tuple[socket.socket, str]]]:
    """Assign inherited sockets to listener keys (service, Address):
    ({key: socket}, [(socket, name) matched to nothing]).  A name
    "SERVICE-PROTO" picks among that service's listeners of that protocol
    (the one at the socket's address if there is one, else the first free);
    an unnamed socket, or one whose name fits nothing, goes by address."""
    adopted: dict[ListenerKey, socket.socket] = {}
    leftover: list[tuple[socket.socket, str]] = []
    for sock, name in inherited:
        proto = _proto(sock)
        free = [k for k in keys if k not in adopted and k[1].proto == proto]
        named = [k for k in free if f"{k[0]}-{proto}" == name]
        at_address = [k for k in (named or free) if _bound_to(sock, k[1])]
        chosen = at_address or named
        if chosen:
            adopted[chosen[0]] = sock
        else:
            leftover.append((sock, name))
    return adopted, leftover


def describe(sock: socket.socket) -> str:
    """Where an inherited socket is bound, for the logs; it may be no
    socket we can name at all."""
    try:
        return sockaddr_text(sock.family, sock.getsockname())
    except OSError as exc:
        return f"? ({errno.errorcode.get(exc.errno or 0, exc.errno)})"
