"""The daemon: services and listeners on one reactor, and their lifecycle.

`Daemon` turns a validated `Config` into running `Service`s and their
listeners, and handles the signals: SIGTERM/SIGINT drain and stop, SIGHUP
reloads, SIGUSR1 reopens the log file.  Signal handlers only record; the work
happens in the loop (gunicorn's arbiter, without its size).

Listeners are keyed by (service, configured address).  A reload binds what
is new first -- if anything fails, nothing changes -- then closes what is
gone and keeps the rest: the same socket, so there is no moment when a kept
port refuses connections.  Services outlive their listeners: connections of
a service whose listener was removed run to their natural end.

The same class runs a worker of a supervisor (`worker` set, see
server/supervisor.py): its sockets are shared with the supervisor, which owns the
listener set, the pidfile and systemd; a worker's reload applies the rest.
"""

from __future__ import annotations

import os
import resource
import signal
import time
from dataclasses import fields

from evd import __version__
from evd.core import config as config_mod
from evd.core import loader
from evd.core.addresses import Address

# Services that have listeners of their own (command and stats are reached
# through the framed dispatcher only).
from evd.core.config import (
    LISTENING,
)
from evd.core.log import log
from evd.core.reactor import Reactor
from evd.handlers.commands import Runner
from evd.handlers.framed import Context, Framed
from evd.handlers.raw import STREAM_HANDLERS
from evd.handlers.service import Service
from evd.net import transport as transport_mod
from evd.net.listeners import GUARD_PORTS, BindError, DatagramEndpoint, StreamListener, bind
from evd.proto.rules import rules_for
from evd.proto.services import datagram_handler
from evd.server import preflight
from evd.system.systemd import Notifier

# What the loop handles; a forked worker arrives with them blocked.
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
# From the supervisor to a worker replaced by a reload: see `retire`.
RETIRE = signal.SIGUSR2
# [daemon] keys a running daemon cannot take over: they shape its start.
RESTART_KEYS = ("pidfile", "user", "group", "workers")


def listener_keys(config) -> list[tuple[str, Address]]:
    return config.listener_keys()


def bind_all(keys) -> dict:
    """Bind every listener of `keys`, or none (BindError names the first
    that failed)."""
    bound = {}
    try:
        for key in keys:
            bound[key] = bind(key[1])
    except BindError:
        for sock in bound.values():
            sock.close()
        raise
    return bound


def raise_nofile_limit() -> None:
    """Use every descriptor we are allowed: each connection costs one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def _describe(key) -> str:
    name, address = key
    return f"{name} {address.proto} {address}"


def reread(config):
    """The configuration `config` was read from, read again (ConfigError if
    it is no longer valid).  The embedded default stays the embedded
    default: a file appearing at /etc/evd/evd.toml later does not count."""
    return loader.reread(config)


def other_changes(old, new) -> list[str]:
    """What a reload changes besides services, for `config.reload`."""
    changed = [
        f"daemon.{f.name}" + (" (at the next start)" if f.name in RESTART_KEYS else "")
        for f in fields(old.daemon)
        if getattr(old.daemon, f.name) != getattr(new.daemon, f.name)
    ]
    if old.log != new.log:
        changed.append("log")
    if old.commands != new.commands or old.services["command"] != new.services["command"]:
        changed.append("commands")
    if old.services["stats"] != new.services["stats"]:
        changed.append("stats")
    return changed


class Daemon:
    def __init__(
        self,
        config,
        reactor: Reactor | None = None,
        *,
        notifier: Notifier | None = None,
        pidfile=None,
        worker: tuple[int, int] | None = None,
        log_overrides: dict | None = None,
    ):
        self.config = config
        self.notifier = notifier or Notifier(None)
        self.pidfile = pidfile  # ours to remove at exit, or None
        self.worker = worker  # (index, pid) under a supervisor
        self.log_overrides = log_overrides or {}  # `evd run --log-level/--log-format`
        self.inherited: set[tuple] = set()  # listener keys whose socket systemd owns
        self.reactor = reactor or Reactor()
        self.reactor.on_error = self._loop_error
        self.services: dict[str, Service] = {}
        self.listeners: dict[tuple, object] = {}
        self.guard_ports: set[int] = set(GUARD_PORTS)
        self.started = time.time()
        self.stopping = False  # draining for shutdown_timeout, then out
        self.retiring = False  # serving what is open to its end, then out
        self.stop_signal: str | None = None
        self._sweep_timer = None
        self.runner = Runner(self.reactor, config.services["command"], config.commands)
        self.context = Context(self.runner, self.stats, rules_for(config, preflight.check(config).secrets))

    def stats(self) -> dict:
        """The framed `stats` body."""
        return {
            "uptime": round(time.time() - self.started, 3),
            "pid": os.getpid(),
            "version": __version__,
            "services": {name: svc.snapshot() for name, svc in self.services.items()},
            "commands": {"running": len(self.runner.running), "total": self.runner.total},
            "worker": {"index": self.worker[0], "pid": self.worker[1]} if self.worker else None,
        }

    def _event(self, what: str) -> str:
        """The whole daemon's ready/stop/reload events; a worker's are worker.*."""
        if self.worker:
            return f"worker.{what}"
        return "config.reload" if what == "reload" else f"daemon.{what}"

    # -- start ----------------------------------------------------------------

    def bind(self, keys=None) -> dict:
        """Bind every listener of `keys` (default: the whole config) or none."""
        return bind_all(keys if keys is not None else listener_keys(self.config))

    def open(self, sockets: dict, inherited=()) -> None:
        """Create the services and start listening on the bound `sockets`
        (those of `inherited` came from systemd: their paths are not ours)."""
        self.inherited.update(inherited)
        for svc in self.config.services.values():
            if svc.enabled and svc.name in LISTENING:
                self.services[svc.name] = Service(svc, self.reactor)
        for key, sock in sockets.items():
            self._open_listener(key, sock)
        self._update_guard_ports()
        self._schedule_sweep()

    def _open_listener(self, key, sock) -> None:
        name, address = key
        service = self.services[name]
        if address.proto == "udp":
            listener = DatagramEndpoint(
                self.reactor, sock, service, address, datagram_handler(name), self.guard_ports
            )
        else:
            listener = StreamListener(self.reactor, sock, service, address, self._factory(name))
        # A UNIX path belongs to whoever bound it: not to systemd's sockets'
        # adopters, not to a worker sharing the supervisor's socket.
        listener.owns_path = key not in self.inherited and self.worker is None
        self.listeners[key] = listener
        listener.open()

    def _factory(self, name: str):
        if name == "framed":
            service, context = self.services[name], self.context
            return lambda: Framed(service, context)
        return STREAM_HANDLERS[name]

    def _update_guard_ports(self) -> None:
        self.guard_ports.clear()
        self.guard_ports.update(GUARD_PORTS)
        self.guard_ports.update(
            int(listener.actual.rpartition(":")[2])
            for listener in self.listeners.values()
            if listener.proto == "udp"
        )

    def serve(self, on_ready=None) -> int:
        """Run until stopped by a signal; the exit status.  `on_ready()` is
        called once listening (`evd start` reports to its terminal there)."""
        reactor = self.reactor
        for signum in (signal.SIGTERM, signal.SIGINT):
            reactor.add_signal_handler(signum, lambda s=signum: self.shutdown(s))
        reactor.add_signal_handler(signal.SIGHUP, self.reload)
        reactor.add_signal_handler(signal.SIGUSR1, log.reopen)
        if self.worker:
            reactor.add_signal_handler(RETIRE, self.retire)
        # Handlers are in place: whatever came while blocked is delivered now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        reactor.add_before_sleep(self._before_sleep)
        self.notifier.start_watchdog(self.reactor)
        with log.batched():
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
        idle = min((s.config.limits.idle_timeout for s in self.services.values()), default=300.0)
        period = max(0.05, min(1.0, idle / 4))
        self.reactor.cancel(self._sweep_timer)
        self._sweep_timer = self.reactor.call_later(period, lambda: self._sweep(period))

    def _sweep(self, period: float) -> float:
        """Close idle connections and expire idle rate buckets; one timer for
        everything, so a busy connection costs nothing per byte."""
        now = self.reactor.now
        for service in self.services.values():
            limit = service.config.limits.idle_timeout
            if limit > 0:
                for conn in list(service.connections):
                    if conn.idle_for(now) > limit:
                        conn.close(transport_mod.IDLE)
                    elif conn.protocol.stalled(now, limit):
                        conn.close(transport_mod.FRAME_TIMEOUT)
            service.admission.expire(now)
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
        self.stop_signal = signal.Signals(RETIRE).name
        self._close_listeners()

    def _close_listeners(self) -> None:
        for listener in self.listeners.values():
            listener.close()
        self.listeners.clear()

    def _close_everything(self) -> None:
        self.runner.kill_all()
        for listener in self.listeners.values():
            listener.close()
        self.listeners.clear()
        for service in self.services.values():
            for conn in list(service.connections):
                conn.close(transport_mod.SHUTDOWN)

    def reload(self) -> None:
        """SIGHUP: re-read the configuration; apply it whole, or not at all.
        systemd hears RELOADING=1 first and READY=1 after, either way."""
        if self.stopping or self.retiring:  # a reload cannot undo a stop
            log.warning(
                self._event("reload"),
                ok=False,
                error="stopping: reload ignored",
                added=[],
                removed=[],
                changed=[],
            )
            return
        self.notifier.reloading()
        try:
            self._reload()
        finally:
            self.notifier.ready(f"serving on {len(self.listeners)} listeners")

    def _reload(self) -> None:
        event = self._event("reload")
        try:
            new = reread(self.config)
            # A worker's listeners are the supervisor's business: it has
            # already started new workers if they changed.
            wanted = list(self.listeners) if self.worker else listener_keys(new)
            added = [k for k in wanted if k not in self.listeners]
            secrets = preflight.check(new).secrets
            bound = self.bind(added)
        except (config_mod.ConfigError, BindError) as exc:
            log.error(event, ok=False, error=str(exc), added=[], removed=[], changed=[])
            return
        removed = [k for k in self.listeners if k not in set(wanted)]
        changed = self._apply(new, bound, removed, secrets)
        log.info(
            event,
            ok=True,
            added=[_describe(k) for k in added],
            removed=[_describe(k) for k in removed],
            changed=changed,
        )

    def _apply(self, new, bound: dict, removed: list, secrets: dict[str, bytes]) -> list[str]:
        for key in removed:
            self.listeners.pop(key).close()
        changed = []
        for svc in new.services.values():
            if svc.name not in LISTENING:
                continue
            current = self.services.get(svc.name)
            if svc.enabled and current is None:
                self.services[svc.name] = Service(svc, self.reactor)
            elif current is not None and current.config != svc:
                changed.append(svc.name)
                current.apply(svc)
        for key, sock in bound.items():
            self._open_listener(key, sock)
        changed += other_changes(self.config, new)
        self.config = new
        self.runner.apply(new.services["command"], new.commands)
        self.context.rules = rules_for(new, secrets)
        self._update_guard_ports()
        self._schedule_sweep()
        log.reopen()
        try:
            log.configure(
                self.log_overrides.get("level") or new.log.level,
                self.log_overrides.get("format") or new.log.format,
                new.log.file,
            )
        except OSError as exc:
            log.error("error", where="log.configure", exc_info=exc)
        return changed
