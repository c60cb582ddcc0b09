"""The control socket and the metrics port: listeners of the daemon itself.

Both are bound at start-up with the services' listeners -- before
detaching and before the privilege drop, so a path or port in use is an
error on the terminal -- and served by the same loop, through the same
listener and transport classes as any service.  Each surface has a
`Service` of its own (named "control" and "metrics" in `listener.open`,
`conn.open` and `conn.close`), built with the `[limits]` defaults: its
connections are admitted, counted and bounded like any others, and an
idle or half-sent request is closed by this module's sweep after
idle_timeout.  Their figures stay out of `services` and /metrics, which
describe the configured services.

With workers the supervisor serves both, once, for the whole daemon; a
forked worker closes its inherited copies (`close_in_child`) without
touching the socket file, which stays the supervisor's.

The control socket is the whole authorization (SPEC section 9), so it is
created with mode 0600 whatever the umask -- the umask is tightened for
the bind -- and then given `control.mode`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING

from evd.config.addresses import Address
from evd.config.model import Config, Limits, ServiceConfig
from evd.handlers.service import Service
from evd.loop.reactor import Reactor, Timer
from evd.loop.seams import HandlerFactory, Reason
from evd.net.listeners import BindError, StreamListener, bind
from evd.server.control.connection import Backend, Control
from evd.server.sockets import bind_slots, firsts, unbind

if TYPE_CHECKING:
    from evd.server.metrics.http import Source

CONTROL, METRICS = "control", "metrics"
SurfaceKey = tuple[str, Address]
# Between two looks for idle surface connections: they are few, so a look
# is cheap, and a second late is nothing for an idle_timeout.
SWEEP_EVERY = 1.0


def keys(config: Config) -> list[SurfaceKey]:
    wanted = [(METRICS, address) for address in config.metrics.tcp]
    if config.control.unix:
        wanted.insert(0, (CONTROL, Address("unix", config.control.unix, 0)))
    return wanted


def bind_all(config: Config) -> dict[SurfaceKey, socket.socket]:
    """A socket for every surface of `config`, or BindError and none."""
    mode = config.control.mode_bits

    def bind_one(key: SurfaceKey, address: Address) -> socket.socket:
        return bind_control(address, mode) if key[0] == CONTROL else bind(address)

    return firsts(bind_slots(keys(config), bind_one=bind_one))


def bind_control(address: Address, mode: int) -> socket.socket:
    old = os.umask(0o177)  # born 0600: never a moment open to others
    try:
        sock = bind(address)
    finally:
        os.umask(old)
    try:
        os.chmod(address.host, mode)
    except OSError as exc:
        unbind({(CONTROL, address): [sock]})
        raise BindError(f"cannot chmod {address.host} to {mode:04o}: {exc.strerror}") from None
    return sock


class Surfaces:
    def __init__(
        self,
        reactor: Reactor,
        limits: Limits,
        socks: Mapping[SurfaceKey, socket.socket],
        backend: Backend,
        source: Source,
    ):
        self.reactor = reactor
        self.services: dict[str, Service] = {}
        self.listeners: list[StreamListener] = []
        factories: dict[str, HandlerFactory] = {CONTROL: lambda: Control(backend)}
        if any(name == METRICS for name, _ in socks):
            # HTTP and the exposition (h11, prometheus_client) are loaded
            # only by a daemon that serves /metrics: one that does not pays
            # nothing for them (what they cost a start-up that does, measured:
            # docs/performance/redesign.md).
            from evd.server.metrics.http import Scrape

            factories[METRICS] = lambda: Scrape(source)
        for (name, address), sock in socks.items():
            service = self.services.get(name)
            if service is None:
                config = ServiceConfig(name=name, enabled=True, limits=limits)
                service = self.services[name] = Service(config, reactor)
            self.listeners.append(StreamListener(reactor, sock, service, address, factories[name]))
        self._timer: Timer | None = None

    def open(self) -> None:
        for listener in self.listeners:
            listener.open()
        if self.listeners:
            self._timer = self.reactor.call_later(SWEEP_EVERY, self._sweep)

    def close(self) -> None:
        """At exit: stop listening (removing our socket file), close what
        is open."""
        self.reactor.cancel(self._timer)
        for listener in self.listeners:
            listener.close()
        self.listeners.clear()
        for service in self.services.values():
            for conn in list(service.connections):
                conn.close(Reason.SHUTDOWN)

    def close_in_child(self) -> None:
        """In a forked worker: let go of the descriptors, nothing else (the
        sockets and the file are the supervisor's)."""
        for listener in self.listeners:
            listener.sock.close()
        for service in self.services.values():
            for conn in service.connections:
                sock = getattr(conn, "sock", None)
                if sock is not None:
                    sock.close()

    def _sweep(self) -> float:
        now = self.reactor.now
        for service in self.services.values():
            service.sweep(now)
        return SWEEP_EVERY
