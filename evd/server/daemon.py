"""The daemon: services and listeners on one reactor, and their lifecycle.

`Daemon` turns a validated `Config` into running `Service`s and their
listeners, and handles the signals: SIGTERM/SIGINT drain and stop, SIGHUP
reloads, SIGUSR1 reopens the log file.  Signal handlers only record; the work
happens in the loop (gunicorn's arbiter, without its size).

Listeners are keyed by (service, configured address).  A reload carries out
the plan of server/reload_plan.py: everything that can fail -- reading and
checking the file, binding what is new, opening a new log file -- comes
first, and if anything fails nothing changes; then it closes what is gone
and keeps the rest: the same socket, so there is no moment when a kept port
refuses connections.  Services outlive their listeners: connections of a
service whose listener was removed run to their natural end.  `reload`
returns its `Result` (the runtime control answers with it) as well as
logging it.

The same class runs a worker of a supervisor (`worker` set, see
server/supervisor.py): its sockets are shared with the supervisor, which owns
the listener set, the pidfile and systemd; a worker's reload applies the rest.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import time
from collections.abc import Callable, Iterable, Mapping

from evd import __version__
from evd.commands.runner import Runner
from evd.commands.spawner import Spawner
from evd.config.addresses import Address
from evd.config.model import Config, ServiceConfig
from evd.handlers.framed import Context, Framed
from evd.handlers.program import Program, Programs
from evd.handlers.raw import STREAM_HANDLERS
from evd.handlers.service import Service
from evd.log.logger import log
from evd.loop.reactor import Reactor, Timer
from evd.loop.seams import HandlerFactory, Reason
from evd.net.listeners import GUARD_PORTS, BindError, DatagramEndpoint, Listener, StreamListener
from evd.net.tls_service import ServerTLS
from evd.proto.classic import datagram_handler
from evd.proto.rules import rules_for
from evd.server import preflight, reload_steps, signals, sockets
from evd.server.metrics import snapshot
from evd.server.metrics.snapshot import Figures, LagProbe
from evd.server.reload_plan import ListenerKey, Overrides, Plan, Result
from evd.system.certificates import CertificateError, server_context
from evd.system.pidfile import Pidfile
from evd.system.systemd import Notifier

# The sweep (idle connections, stalled frames, rate buckets, TLS handshakes)
# runs at a quarter of the shortest positive idle_timeout (or, with TLS or
# the PROXY protocol, handshake_timeout), so a connection is closed within a quarter of its
# limit late, but never more often than FASTEST -- a sweep walks every
# connection -- nor less often than SLOWEST, so rate buckets expire even
# when no service has an idle limit (0 = never).
SWEEP_FASTEST = 0.05
SWEEP_SLOWEST = 1.0


def read_tls(machine: preflight.Machine, svc: ServiceConfig) -> None:
    """The TLS context of `svc`, read into `machine` if it is not there yet
    (a service that was off when preflight ran).  BindError naming the key
    if its files cannot serve."""
    if svc.tls and svc.name not in machine.tls:
        try:
            machine.tls[svc.name] = server_context(svc.tls_cert, svc.tls_key, svc.tls_client_ca)
        except CertificateError as exc:
            raise BindError(f"services.{svc.name}.{exc.key}: {exc}") from None


def sweep_period(idle_timeouts: Iterable[float]) -> float:
    positive = [t for t in idle_timeouts if t > 0]
    if not positive:
        return SWEEP_SLOWEST
    return max(SWEEP_FASTEST, min(SWEEP_SLOWEST, min(positive) / 4))


class Daemon:
    def __init__(
        self,
        config: Config,
        machine: preflight.Machine,
        reactor: Reactor | None = None,
        *,
        notifier: Notifier | None = None,
        pidfile: Pidfile | None = None,
        worker: tuple[int, int] | None = None,
        log_overrides: Overrides | None = None,
    ):
        self.config = config
        self.machine = machine  # what preflight read for `config`: key secrets, credentials
        self.notifier = notifier or Notifier(None)
        self.pidfile = pidfile  # ours to remove at exit, or None
        self.worker = worker  # (index, pid) under a supervisor
        self.log_overrides: Overrides = log_overrides or {}
        self.inherited: set[ListenerKey] = set()  # listener keys whose socket systemd owns
        self.reactor = reactor or Reactor()
        self.reactor.on_error = self._loop_error
        self.services: dict[str, Service] = {}
        self.listeners: dict[ListenerKey, Listener] = {}
        self.tls: dict[str, ServerTLS] = {}  # by service: the contexts preflight built
        self.guard_ports: set[int] = set(GUARD_PORTS)
        self.started = time.time()
        self.stopping = False  # draining for shutdown_timeout, then out
        self.retiring = False  # serving what is open to its end, then out
        self.stop_signal: str | None = None
        self.sweep_every = SWEEP_SLOWEST
        self._sweep_timer: Timer | None = None
        self.runner = Runner(self.reactor, config.services["command"])
        self.runner.commands, self.runner.identities = config.commands, self.machine.identities
        self.context = Context(self.runner, self.stats, rules_for(config, self.machine.secrets))
        # Program services' children share the runner's reaping and kill-on-exit.
        self.programs = Programs(self.runner, self.machine.identities, Spawner(self.reactor))
        # For the runtime control and metrics (server/control/verbs.py, metrics/snapshot.py).
        self.lag = LagProbe(self.reactor)
        self.reloads = reload_steps.Reloads(self.notifier, self._event("reload"))
        # Where listeners `evd ctl disable` closed were bound (server/control/daemon_verbs.py).
        self.disabled: dict[ListenerKey, Address] = {}
        self.closers: list[Callable[[], None]] = []  # at exit, while the loop is still there
        # SIGUSR1: reopen the log; a worker's takes part in the supervisor's
        # rotation instead (server/rotation.py).
        self.on_usr1: Callable[[], None] = log.reopen

    def stats(self) -> dict[str, object]:
        """The framed `stats` body."""
        return {
            "uptime": round(time.time() - self.started, 3),
            "pid": os.getpid(),
            "version": __version__,
            "services": {name: svc.snapshot() for name, svc in self.services.items()},
            "commands": {"running": len(self.runner.running), "total": self.runner.total},
            "worker": {"index": self.worker[0], "pid": self.worker[1]} if self.worker else None,
        }

    def figures(self) -> Figures:
        """What this process counts (server/metrics/snapshot.py)."""
        return snapshot.figures(self)

    def _event(self, what: str) -> str:
        """The whole daemon's ready/stop/reload events; a worker's are worker.*."""
        if self.worker:
            return f"worker.{what}"
        return "config.reload" if what == "reload" else f"daemon.{what}"

    def _update_context(self) -> None:
        """What framed connections read: the services offered, the keys and
        the secrets preflight read."""
        self.context.rules = rules_for(self.config, self.machine.secrets)

    # -- start ----------------------------------------------------------------

    def open(self, bound: Mapping[ListenerKey, socket.socket], inherited: Iterable[ListenerKey] = ()) -> None:
        """Create the services and start listening on the `bound` sockets
        (those of `inherited` came from systemd: their paths are not ours)."""
        self.inherited.update(inherited)
        for svc in self.config.services.values():
            if svc.enabled and svc.listens:
                self.services[svc.name] = Service(svc, self.reactor)
        self._update_tls(self.machine)
        for key, sock in bound.items():
            self.open_listener(key, sock)
        self._update_guard_ports()
        self._schedule_sweep()

    def open_listener(self, key: ListenerKey, sock: socket.socket) -> None:
        name, address = key
        service = self.services[name]
        listener: Listener
        if address.proto == "udp":
            listener = DatagramEndpoint(
                self.reactor, sock, service, address, datagram_handler(name), self.guard_ports
            )
        elif address.proto == "tls":
            transport = self._tls(name).transport
            listener = StreamListener(self.reactor, sock, service, address, self._factory(name), transport)
        else:
            listener = StreamListener(self.reactor, sock, service, address, self._factory(name))
        # A UNIX path belongs to whoever bound it: not to systemd's sockets'
        # adopters, not to a worker sharing the supervisor's socket.
        listener.owns_path = key not in self.inherited and self.worker is None
        self.listeners[key] = listener
        listener.open()

    def _factory(self, name: str) -> HandlerFactory:
        if name == "framed":
            service, context = self.services[name], self.context
            return lambda: Framed(service, context)
        # The service's own config: during a reload, self.config is still the old one.
        if self.services[name].config.exec:
            service, programs = self.services[name], self.programs
            return lambda: Program(service, programs)
        factory: HandlerFactory = STREAM_HANDLERS[name]
        return factory

    def apply_service(self, svc: ServiceConfig) -> None:
        """Serve `svc` as configured now: its running state, made or updated
        (open connections take the new limits)."""
        current = self.services.get(svc.name)
        if current is None:
            self.services[svc.name] = Service(svc, self.reactor)
        elif current.config != svc:
            current.apply(svc)

    def refresh(self) -> None:
        """Listeners or limits changed at run time (evd ctl): the UDP loop
        guard and the sweep's pace follow."""
        self._update_guard_ports()
        self._schedule_sweep()

    def _tls(self, name: str) -> ServerTLS:
        """The service's TLS state, made with its first TLS listener."""
        tls = self.tls.get(name)
        if tls is None:
            tls = self.tls[name] = ServerTLS(self.services[name], self.machine.tls[name], self.reactor)
        return tls

    def _update_tls(self, machine: preflight.Machine) -> None:
        """The TLS contexts preflight just built (at start, and re-read by
        every reload: certificate rotation) for new connections; open ones
        keep the session they have."""
        for name, context in machine.tls.items():
            if name in self.tls:
                self.tls[name].context = context

    def prepare_tls(self, name: str) -> None:
        """A service switched on at run time (`evd ctl enable`) that was off
        when preflight ran: read its certificate and key now.  BindError
        (naming the key) if they cannot serve."""
        read_tls(self.machine, self.config.services[name])

    def _update_guard_ports(self) -> None:
        self.guard_ports.clear()
        self.guard_ports.update(GUARD_PORTS)
        self.guard_ports.update(
            int(listener.sock.getsockname()[1])
            for listener in self.listeners.values()
            if listener.proto == "udp"
        )

    def serve(self, on_ready: Callable[[], None] | None = None) -> int:
        """Run until stopped by a signal; the exit status.  `on_ready()` is
        called once listening (`evd start` reports to its terminal there)."""
        reactor = self.reactor
        for signum in (signal.SIGTERM, signal.SIGINT):
            reactor.add_signal_handler(signum, functools.partial(self.shutdown, signum))
        reactor.add_signal_handler(signal.SIGHUP, self.reload)
        reactor.add_signal_handler(signal.SIGUSR1, self.on_usr1)
        if self.worker:
            reactor.add_signal_handler(signals.RETIRE, self.retire)
        # Handlers are in place: whatever came while held is delivered now.
        signals.release()
        reactor.add_before_sleep(self._before_sleep)
        self.notifier.start_watchdog(self.reactor)
        self.lag.start()
        with log.batched(reactor):
            log.info(self._event("ready"), listeners=len(self.listeners))
            self.notifier.ready(f"serving on {len(self.listeners)} listeners")
            if on_ready is not None:
                on_ready()
            reactor.run()
        self._close_everything()
        reactor.close()
        warning = self.pidfile.release() if self.pidfile is not None else None
        if warning:
            log.warning("pidfile.remove", error=warning)
        retired = self.retiring and not self.stopping
        log.info(self._event("stop"), reason="retired" if retired else "signal", signal=self.stop_signal)
        return 0

    # -- the loop's housekeeping -----------------------------------------------

    def _before_sleep(self) -> None:
        log.sink.flush()
        if (
            (self.stopping or self.retiring)
            and not self.runner.running
            and not any(s.connections for s in self.services.values())
        ):
            self.reactor.stop()

    def _schedule_sweep(self) -> None:
        services = self.services
        period = self.sweep_every = sweep_period(
            [s.config.limits.idle_timeout for s in services.values()]
            + [services[name].config.limits.handshake_timeout for name in self.tls]
            + [s.config.limits.handshake_timeout for s in services.values() if s.config.proxy_protocol]
        )
        self.reactor.cancel(self._sweep_timer)
        self._sweep_timer = self.reactor.call_later(period, lambda: self._sweep(period))

    def _sweep(self, period: float) -> float:
        """Close idle connections and expire idle rate buckets; one timer for
        everything, so a busy connection costs nothing per byte."""
        now = self.reactor.now
        for service in self.services.values():
            service.sweep(now)
            service.admission.expire(now)
        for tls in self.tls.values():
            tls.sweep(now)
        return period

    def _loop_error(self, where: str, exc: BaseException) -> None:
        log.error("error", where=where, exc_info=exc)

    # -- signals ---------------------------------------------------------------

    def shutdown(self, signum: int) -> None:
        """First signal: stop accepting, let connections finish for up to
        shutdown_timeout.  A second one: stop now."""
        name = signal.Signals(signum).name
        if self.stopping:
            self.reactor.stop()
            return
        self.stopping = True
        self.stop_signal = name
        open_connections = sum(len(s.connections) for s in self.services.values())
        self.notifier.stopping(
            f"stopping on {name}: {open_connections} connections, "
            f"{len(self.runner.running)} commands to finish"
        )
        self._close_listeners()
        for service in self.services.values():
            for conn in list(service.connections):
                conn.protocol.drain()
        self.reactor.call_later(self.config.daemon.shutdown_timeout, self.reactor.stop)

    def retire(self) -> None:
        """A worker whose listeners a reload changed: new workers took over,
        so stop accepting, but let open connections and commands run to
        their natural end (idle_timeout still applies) -- a reload drops
        nobody.  A SIGTERM meanwhile drains as usual."""
        if self.stopping or self.retiring:
            return
        self.retiring = True
        self.stop_signal = signal.Signals(signals.RETIRE).name
        self._close_listeners()

    def _close_listeners(self) -> None:
        for listener in self.listeners.values():
            listener.close()
        self.listeners.clear()

    def _close_everything(self) -> None:
        for close in self.closers:
            close()
        self.runner.kill_all()
        self._close_listeners()
        for service in self.services.values():
            for conn in list(service.connections):
                conn.close(Reason.SHUTDOWN)

    # -- SIGHUP ----------------------------------------------------------------

    def reload(self) -> Result:
        """Re-read the configuration; apply it whole, or not at all (logged
        and returned)."""
        return self.reloads.run(
            self._reload,
            stopping=self.stopping or self.retiring,
            serving=lambda: f"serving on {len(self.listeners)} listeners",
        )

    def _reload(self) -> Result:
        ready = reload_steps.prepare(
            self.config,
            self.machine,
            self.listeners,
            self.log_overrides,
            sockets.bind_slots,
            listeners_fixed=self.worker is not None,
        )
        if isinstance(ready, Result):
            return ready
        self._commit(ready.config, ready.machine, ready.todo, ready.bound)
        if ready.reopen:
            log.reopen()
        return ready.todo.result()

    def _commit(self, new: Config, machine: preflight.Machine, todo: Plan, bound: sockets.Slots) -> None:
        """Carry out `todo`: nothing in here is expected to fail."""
        for key in todo.removed:
            self.listeners.pop(key).close()
        for svc in new.services.values():
            if svc.listens and (svc.enabled or svc.name in self.services):
                self.apply_service(svc)
        self._update_tls(machine)
        for key, socks in bound.items():
            self.open_listener(key, socks[0])
        self.config, self.machine = new, machine
        self.programs.identities = machine.identities
        self.runner.config = new.services["command"]
        self.runner.commands, self.runner.identities = new.commands, machine.identities
        self._update_context()
        self._update_guard_ports()
        self._schedule_sweep()
