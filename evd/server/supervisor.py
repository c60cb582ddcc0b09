"""The supervisor: `workers = N` processes serving the same ports.

Why it is shaped like this
--------------------------
Sockets.  Before any worker exists, the supervisor binds each TCP and UDP
listener once per worker slot, with SO_REUSEPORT: the first copy resolves
port 0, the others bind the port it got, and the kernel spreads connections
and datagrams over the copies.  Binding it all up front, rather than letting
each worker bind its own, keeps the rules of a single process: a port in use
or a privileged port fails at start, on the terminal, before detaching and
before the privilege drop -- and Linux only lets sockets of one user share a
port, so a worker restarted later as `daemon.user` could not bind anyway.
The supervisor keeps its copies: a restarted worker gets slot i's socket
back, and what the kernel queued on it meanwhile waits in its backlog
instead of being refused.  UNIX sockets (no SO_REUSEPORT) and sockets from
systemd are one socket shared by every worker; each accepts from it without
blocking, and the kernel gives every connection to exactly one.

Workers.  A worker is a fork (no exec) of the supervisor: it keeps slot i's
sockets, closes the rest of the supervisor's descriptors, and runs its own
Reactor and Daemon.  Its process group is its own, so a Ctrl-C reaches only
the supervisor, which passes signals on once.  A pipe nobody writes (the
lifeline) reaches end-of-file when the supervisor is gone, however it died,
and the orphaned worker shuts down.

The supervisor's loop has no connections, only signals -- SIGCHLD among
them, through the reactor's wakeup descriptor -- and timers:
- SIGCHLD: reap without waiting; a current worker that died is started
  again, after RESTART_DELAY if it lived less than that (a worker that
  crashes at once must not turn into a fork loop).
- SIGTERM/SIGINT: close our copies of the sockets, pass the signal on, wait
  for the workers up to shutdown_timeout + KILL_AFTER, then SIGKILL them.
- SIGHUP: re-read the configuration.  Invalid: `config.reload ok=false`,
  nothing changes.  Same listeners: pass SIGHUP on; each worker applies
  limits, access lists, commands and log settings without dropping anyone.
  Listeners added or removed: bind the new ones, start a new generation of
  workers, and retire the old one (SIGUSR2): it stops accepting and serves
  its open connections to their natural end.
- SIGUSR1: reopen our log file, pass it on.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import replace

from evd.core import config as config_mod
from evd.core.log import log
from evd.core.reactor import Reactor
from evd.net.listeners import BindError, bind, format_address
from evd.server import preflight
from evd.server.daemon import RETIRE, Daemon, listener_keys, other_changes, reread

# Between a worker that died young and its replacement.  Long enough that a
# worker failing at start costs little CPU, short enough to recover quickly.
RESTART_DELAY = 1.0
# After shutdown_timeout: the workers drain for that long themselves, so
# this is only slack for their exit before SIGKILL.
KILL_AFTER = 2.0
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
BLOCKED_FOR_FORK = (*FORWARDED, RETIRE, signal.SIGCHLD)


def bind_slots(keys, count: int, adopted: dict | None = None) -> dict:
    """{key: [socket per worker slot]}: TCP/UDP bound `count` times with
    SO_REUSEPORT (once, plainly, for a single process), UNIX and systemd's
    sockets once and shared.  All or nothing (BindError)."""
    slots: dict = {}
    try:
        for key in keys:
            address = key[1]
            if adopted and key in adopted:
                slots[key] = [adopted[key]] * count
            elif address.proto == "unix" or count == 1:
                slots[key] = [bind(address)] * count
            else:
                copies = slots[key] = [bind(address, reuse_port=True)]
                actual = replace(address, port=copies[0].getsockname()[1])
                for _ in range(count - 1):
                    copies.append(bind(actual, reuse_port=True))
    except BindError:
        close_sockets(slots.values())
        raise
    return slots


def close_sockets(socket_lists) -> None:
    for sock in {id(s): s for socks in socket_lists for s in socks}.values():
        sock.close()


class Worker:
    __slots__ = ("index", "pid", "generation", "started")

    def __init__(self, index: int, pid: int, generation: int, started: float):
        self.index, self.pid, self.generation, self.started = index, pid, generation, started


class Supervisor:
    def __init__(self, config, slots: dict, *, inherited=(), notifier=None, pidfile=None, log_overrides=None):
        self.config = config
        self.count = config.daemon.workers  # fixed for our life: see other_changes
        self.slots = slots
        self.inherited = set(inherited)
        self.notifier = notifier
        self.pidfile = pidfile
        self.log_overrides = log_overrides or {}
        self.reactor = Reactor()
        self.reactor.on_error = lambda where, exc: log.error("error", where=where, exc_info=exc)
        self.workers: dict[int, Worker] = {}
        self.generation = 0
        self.stopping = False
        self.stop_signal: str | None = None
        # Read end for the workers; the write end stays here only.
        self.lifeline_r, self.lifeline_w = os.pipe()

    # -- the supervisor's life ----------------------------------------------

    def run(self, on_ready=None) -> int:
        reactor = self.reactor
        for signum in (signal.SIGTERM, signal.SIGINT):
            reactor.add_signal_handler(signum, lambda s=signum: self.shutdown(s))
        reactor.add_signal_handler(signal.SIGHUP, self.reload)
        reactor.add_signal_handler(signal.SIGUSR1, self.reopen_log)
        reactor.add_signal_handler(signal.SIGCHLD, self.reap)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, BLOCKED_FOR_FORK)
        reactor.add_before_sleep(log.sink.flush)
        for key in self.slots:
            self._log_listener("listener.open", key)
        for index in range(self.count):
            self.spawn(index)
        log.info("daemon.ready", listeners=len(self.slots), workers=self.count)
        self.notifier.ready(f"{self.count} workers serving on {len(self.slots)} listeners")
        self.notifier.start_watchdog(self.reactor)
        if on_ready is not None:
            on_ready()
        with log.batched(reactor):
            reactor.run()
        reactor.close()
        self._close_all()
        warning = self.pidfile.release() if self.pidfile is not None else None
        if warning:
            log.warning("pidfile.remove", error=warning)
        log.info("daemon.stop", reason="signal", signal=self.stop_signal)
        return 0

    def _log_listener(self, event: str, key) -> None:
        sock = self.slots[key][0]
        log.info(
            event, service=key[0], proto=key[1].proto, address=format_address(sock.family, sock.getsockname())
        )

    def _close_all(self) -> None:
        """Our copies of every socket, and the UNIX paths we bound."""
        for key in list(self.slots):
            self._close_listener(key)
        os.close(self.lifeline_w)
        os.close(self.lifeline_r)

    def _close_listener(self, key) -> None:
        self._log_listener("listener.close", key)
        socks = self.slots.pop(key)
        if key[1].proto == "unix" and key not in self.inherited:
            try:
                os.unlink(key[1].host)
            except OSError:
                pass
        close_sockets([socks])

    # -- workers ---------------------------------------------------------------

    def spawn(self, index: int) -> None:
        """Fork worker `index` of the current generation."""
        if self.stopping:
            return
        log.sink.flush()  # else the child would write our pending lines again
        # Blocked across fork: a signal for the new worker must not reach it
        # before it has handlers of its own (its Daemon unblocks them).
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, BLOCKED_FOR_FORK)
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            log.error("worker.fork", worker=index, error=f"fork: [Errno {exc.errno}] {exc.strerror}")
            self.reactor.call_later(RESTART_DELAY, lambda: self.spawn(index))
            return
        if pid == 0:
            self._become_worker(index)  # never returns
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self.workers[pid] = Worker(index, pid, self.generation, time.monotonic())
        log.info("worker.start", worker=index, worker_pid=pid, generation=self.generation)

    def _become_worker(self, index: int) -> None:
        """The child side of `spawn`: shed the supervisor, serve, exit."""
        code = 1
        try:
            os.setpgid(0, 0)
            self.reactor.close_in_child()
            # Not handled here, and commands inherit the mask: unblock it.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
            os.close(self.lifeline_w)
            if self.pidfile is not None:
                self.pidfile.close()  # the lock stays with the supervisor's copy
            self.notifier.close()  # systemd hears from the main process only
            mine = {key: socks[index] for key, socks in self.slots.items()}
            keep = {id(s) for s in mine.values()}
            for socks in self.slots.values():
                for sock in socks:
                    if id(sock) not in keep:
                        sock.close()
            code = self._serve_worker(index, mine)
        except BaseException as exc:
            log.error("error", where="worker", worker=index, exc_info=exc)
        finally:
            log.sink.flush()
            os._exit(code)

    def _serve_worker(self, index: int, sockets: dict) -> int:
        reactor = Reactor()
        daemon = Daemon(self.config, reactor, worker=(index, os.getpid()), log_overrides=self.log_overrides)
        daemon.open(sockets)
        lifeline = self.lifeline_r

        def orphaned() -> None:
            reactor.remove_reader(lifeline)
            if not daemon.stopping:
                log.warning("worker.orphaned", worker=index)
                daemon.shutdown(signal.SIGTERM)

        reactor.add_reader(lifeline, orphaned)
        return daemon.serve()

    def reap(self) -> None:
        """SIGCHLD: collect every dead worker; replace the current ones."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            worker = self.workers.pop(pid, None)
            if worker is not None:
                self._worker_exited(worker, os.waitstatus_to_exitcode(status))
        if self.stopping and not self.workers:
            self.reactor.stop()

    def _worker_exited(self, worker: Worker, code: int) -> None:
        current = worker.generation == self.generation and not self.stopping
        delay = None
        if current:
            lived = time.monotonic() - worker.started
            delay = RESTART_DELAY if lived < RESTART_DELAY else 0.0
        fields = dict(
            worker=worker.index,
            worker_pid=worker.pid,
            generation=worker.generation,
            exit=code if code >= 0 else None,
            signal=-code if code < 0 else None,
            restart_in=delay,
        )
        if current:
            log.warning("worker.exit", **fields)
            index = worker.index
            self.reactor.call_later(delay, lambda: self.spawn(index))
        else:
            log.info("worker.exit", **fields)

    def _signal_workers(self, signum: int, workers=None) -> None:
        for worker in list(workers if workers is not None else self.workers.values()):
            try:
                os.kill(worker.pid, signum)
            except ProcessLookupError:
                pass  # dead, not reaped yet: reap() will see it

    # -- signals ---------------------------------------------------------------

    def shutdown(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.stopping:  # a second signal: pass it on; workers stop at once
            self._signal_workers(signum)
            return
        self.stopping = True
        self.stop_signal = name
        self.notifier.stopping(f"stopping on {name}: waiting for {len(self.workers)} workers")
        # New connections are refused once the workers close their copies.
        for key in list(self.slots):
            self._close_listener(key)
        self._signal_workers(signum)
        if not self.workers:
            self.reactor.stop()
            return
        self.reactor.call_later(
            self.config.daemon.shutdown_timeout + KILL_AFTER, lambda: self._signal_workers(signal.SIGKILL)
        )

    def reopen_log(self) -> None:
        log.reopen()
        self._signal_workers(signal.SIGUSR1)

    def reload(self) -> None:
        if self.stopping:  # a reload cannot undo a stop
            log.warning(
                "config.reload", ok=False, error="stopping: reload ignored", added=[], removed=[], changed=[]
            )
            return
        self.notifier.reloading()
        try:
            self._reload()
        finally:
            self.notifier.ready(f"{self.count} workers serving on {len(self.slots)} listeners")

    def _reload(self) -> None:
        try:
            new = reread(self.config)
            preflight.check(new)
            wanted = listener_keys(new)
            added = [k for k in wanted if k not in self.slots]
            bound = bind_slots(added, self.count)
        except (config_mod.ConfigError, BindError) as exc:
            log.error("config.reload", ok=False, error=str(exc), added=[], removed=[], changed=[])
            return
        removed = [k for k in self.slots if k not in set(wanted)]
        serving = {k[0] for k in wanted} | {k[0] for k in self.slots}
        changed = [
            name
            for name in new.services
            if name in serving and self.config.services[name] != new.services[name]
        ]
        changed += other_changes(self.config, new)
        self.config = new
        self._apply_log(new)
        if added or removed:
            self._new_generation(added, removed, bound)
        else:
            self._signal_workers(signal.SIGHUP)
        log.info(
            "config.reload",
            ok=True,
            added=[f"{k[0]} {k[1].proto} {k[1]}" for k in added],
            removed=[f"{k[0]} {k[1].proto} {k[1]}" for k in removed],
            changed=changed,
        )

    def _apply_log(self, new) -> None:
        try:
            log.sink.reopen()
            log.configure(
                self.log_overrides.get("level") or new.log.level,
                self.log_overrides.get("format") or new.log.format,
                new.log.file,
            )
        except OSError as exc:
            log.error("error", where="log.configure", exc_info=exc)

    def _new_generation(self, added, removed, bound) -> None:
        """Listeners changed: workers cannot be handed new sockets, so new
        workers get the new set and the old ones retire."""
        for key in removed:
            self._close_listener(key)
        self.slots.update(bound)
        for key in added:
            self._log_listener("listener.open", key)
        old = [w for w in self.workers.values() if w.generation == self.generation]
        self.generation += 1
        for index in range(self.count):
            self.spawn(index)
        self._signal_workers(RETIRE, old)
