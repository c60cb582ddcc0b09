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
and the orphaned worker shuts down.  Each worker also has a socketpair to
the supervisor (server/control/link.py): ordered requests and answers, and
descriptors passed along, for runtime control and metrics.

The supervisor's loop serves the control socket and the metrics port for
the whole daemon (server/control/fanout.py: it asks every worker over its
socketpair and sums the answers without ever waiting for one), and handles
signals -- SIGCHLD among them, through the reactor's wakeup descriptor --
and timers:
- SIGCHLD: reap without waiting, then reconcile (below).
- SIGTERM/SIGINT: close our copies of the sockets, pass the signal on, wait
  for the workers up to shutdown_timeout + KILL_AFTER, then SIGKILL them.
- SIGHUP: re-read the configuration and carry out the plan of
  server/reload_plan.py, the same plan a single process follows.  Invalid, or a
  new listener or log file that cannot be opened: `config.reload ok=false`,
  nothing changes.  Same listeners: tell each worker over its socketpair;
  it re-reads the file and applies limits, access lists, commands and log
  settings without dropping anyone.
  Listeners added or removed: bind the new ones, start a new generation of
  workers, and retire the old one (SIGUSR2): it stops accepting and serves
  its open connections to their natural end.
- SIGUSR1: reopen the log file, every process in step so that a reader
  following it loses nothing (server/rotation.py).

Reconciling, not scheduling (gunicorn's `manage_workers`).  Nothing is ever
"scheduled to start later": after every reap, after a reload and on a
timer, `manage` compares what runs with what should -- one live worker of
the current generation on each slot -- and starts what is missing.  A slot
whose worker died young (under RESTART_DELAY) is held back until then, so a
worker that crashes at once does not become a fork loop.  Because the
answer is computed from the live workers each time, no sequence of deaths,
restarts and reloads can leave two workers of the current generation on
one slot, or a slot empty for longer than the hold and the timer.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from evd.config.addresses import sockaddr_text
from evd.config.model import Config
from evd.handlers.service import number_connections
from evd.log.logger import log
from evd.loop.reactor import Reactor
from evd.net.listeners import bound_identity, unlink_if_ours
from evd.proto import admission
from evd.server import preflight, reload_steps, signals
from evd.server.control.drivers import WorkerEnd
from evd.server.control.endpoints import SurfaceKey, Surfaces
from evd.server.control.fanout import Fanout
from evd.server.daemon import Daemon, read_tls
from evd.server.reload_plan import ListenerKey, Overrides, Plan, Result
from evd.server.rotation import SupervisorRotation, WorkerRotation
from evd.server.sockets import Slots, bind_slots, close_sockets
from evd.system.pidfile import Pidfile
from evd.system.systemd import Notifier

# Between a worker that died young and its replacement.  Long enough that a
# worker failing at start costs little CPU, short enough to recover quickly.
RESTART_DELAY = 1.0
# How often `manage` runs even if no worker died: it fills slots whose hold
# ran out or whose fork failed.  A timer that wakes an idle supervisor once
# a second costs nothing measurable.
MANAGE_EVERY = 1.0
# After shutdown_timeout: the workers drain for that long themselves, so
# this is only slack for their exit before SIGKILL.
KILL_AFTER = 2.0
# Blocked across fork: a signal for a new worker must wait until it has
# handlers of its own (its Daemon releases them), and SIGCHLD is ours.
BLOCKED_FOR_FORK = signals.HANDLED | {signal.SIGCHLD}


@dataclass(slots=True)
class Worker:
    index: int  # its slot: which copy of each socket it serves
    pid: int
    generation: int  # bumped by every reload that changes the listeners
    started: float  # time.monotonic()


def missing(
    workers: Iterable[Worker], generation: int, count: int, held: Mapping[int, float], now: float
) -> list[int]:
    """The slots to start a worker on now: those with no live worker of
    `generation`, unless held back until a time still to come."""
    filled = {w.index for w in workers if w.generation == generation}
    return [i for i in range(count) if i not in filled and held.get(i, 0.0) <= now]


class Supervisor:
    def __init__(
        self,
        config: Config,
        machine: preflight.Machine,
        slots: Slots,
        *,
        inherited: Iterable[ListenerKey] = (),
        notifier: Notifier | None = None,
        pidfile: Pidfile | None = None,
        log_overrides: Overrides | None = None,
        surfaces: Mapping[SurfaceKey, socket.socket] | None = None,
    ):
        self.config = config
        self.machine = machine
        self.count = config.daemon.workers  # fixed for our life: "(at the next start)"
        self.slots = slots
        self.inherited = set(inherited)
        self.notifier = notifier or Notifier(None)
        self.pidfile = pidfile
        self.log_overrides: Overrides = log_overrides or {}
        self.reactor = Reactor()
        self.reactor.on_error = lambda where, exc: log.error("error", where=where, exc_info=exc)
        self.workers: dict[int, Worker] = {}  # by pid: alive, or dead and not reaped yet
        self.generation = 0
        self.held: dict[int, float] = {}  # slot -> not restarted before this monotonic time
        self.stopping = False
        self.stop_signal: str | None = None
        # Read end for the workers; the write end stays here only.
        self.lifeline_r, self.lifeline_w = os.pipe()
        # The runtime control and metrics (server/control/fanout.py, control/endpoints.py).
        self.fanout = Fanout(self)
        self.surfaces = Surfaces(self.reactor, config.limits, surfaces or {}, self.fanout, self.fanout)
        self.reloads = reload_steps.Reloads(self.notifier, "config.reload")
        self.lives: Counter[int] = Counter()  # slot -> workers started on it
        # CPU seconds of every worker reaped: process_cpu_seconds_total keeps
        # them, as a counter must (their pids are gone from /proc).
        self.cpu_departed = 0.0
        self.rotation = SupervisorRotation(self.reactor, self._signal_pids, self.manage)

    @property
    def live(self) -> dict[int, tuple[int, int]]:
        """pid -> (slot, generation) of every worker not yet reaped."""
        return {pid: (w.index, w.generation) for pid, w in self.workers.items()}

    # -- the supervisor's life ----------------------------------------------

    def run(self, on_ready: Callable[[], None] | None = None) -> int:
        reactor = self.reactor
        for signum in (signal.SIGTERM, signal.SIGINT):
            reactor.add_signal_handler(signum, functools.partial(self.shutdown, signum))
        reactor.add_signal_handler(signal.SIGHUP, self.reload)
        reactor.add_signal_handler(signal.SIGUSR1, self.reopen_log)
        reactor.add_signal_handler(signal.SIGCHLD, self.reap)
        signals.release(BLOCKED_FOR_FORK)
        reactor.add_before_sleep(log.sink.flush)
        for key in self.slots:
            self.log_listener("listener.open", key)
        number_connections(self.count, None)
        self.surfaces.open()
        self.fanout.lag.start()
        self.manage()
        reactor.call_later(MANAGE_EVERY, self._tick)
        log.info("daemon.ready", listeners=len(self.slots), workers=self.count)
        self.notifier.ready(f"{self.count} workers serving on {len(self.slots)} listeners")
        self.notifier.start_watchdog(self.reactor)
        if on_ready is not None:
            on_ready()
        with log.batched(reactor):
            reactor.run()
            self.surfaces.close()
        reactor.close()
        self._close_all()
        warning = self.pidfile.release() if self.pidfile is not None else None
        if warning:
            log.warning("pidfile.remove", error=warning)
        log.info("daemon.stop", reason="signal", signal=self.stop_signal)
        return 0

    def prepare_tls(self, name: str) -> None:
        """`evd ctl enable` of a service off at the start: its TLS files read
        now, before anything is bound (workers forked later inherit them)."""
        read_tls(self.machine, self.config.services[name])

    def log_listener(self, event: str, key: ListenerKey) -> None:
        sock = self.slots[key][0]
        log.info(
            event, service=key[0], proto=key[1].proto, address=sockaddr_text(sock.family, sock.getsockname())
        )

    def _close_all(self) -> None:
        """Our copies of every socket, and the UNIX paths we bound."""
        for key in list(self.slots):
            self.close_listener(key)
        os.close(self.lifeline_w)
        os.close(self.lifeline_r)
        self.rotation.close()

    def close_listener(self, key: ListenerKey) -> None:
        self.log_listener("listener.close", key)
        socks = self.slots.pop(key)
        if key[1].proto == "unix" and key not in self.inherited:
            unlink_if_ours(key[1].host, bound_identity(key[1].host))
        close_sockets([socks])

    # -- workers ---------------------------------------------------------------

    def manage(self) -> None:
        """Start a worker on every slot of the current generation that has
        none (see the module's docstring)."""
        if self.stopping or self.rotation.running:
            return
        for index in missing(self.workers.values(), self.generation, self.count, self.held, time.monotonic()):
            self.spawn(index)

    def _tick(self) -> float | None:
        self.manage()
        return None if self.stopping else MANAGE_EVERY

    def spawn(self, index: int) -> None:
        """Fork worker `index` of the current generation."""
        log.sink.write_all()  # else the child would write our pending lines again
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, BLOCKED_FOR_FORK)
        ours, theirs = self.fanout.pair()
        try:
            pid = os.fork()
        except OSError as exc:
            ours.close()
            theirs.close()
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            log.error("worker.fork", worker=index, error=f"fork: [Errno {exc.errno}] {exc.strerror}")
            self.held[index] = time.monotonic() + RESTART_DELAY
            return
        if pid == 0:
            ours.close()
            self._become_worker(index, theirs)  # never returns
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        theirs.close()
        self.fanout.adopt(pid, ours)
        self.workers[pid] = Worker(index, pid, self.generation, time.monotonic())
        self.lives[index] += 1
        log.info("worker.start", worker=index, worker_pid=pid, generation=self.generation)

    def _become_worker(self, index: int, link: socket.socket) -> None:
        """The child side of `spawn`: shed the supervisor, serve, exit."""
        code = 1
        try:
            os.setpgid(0, 0)
            self.reactor.close_in_child()
            self.surfaces.close_in_child()
            self.fanout.close_in_child()
            # Not handled here, and commands inherit the mask: unblock it.
            signals.release(frozenset({signal.SIGCHLD}))
            os.close(self.lifeline_w)
            acks = self.rotation.close_in_child()
            if self.pidfile is not None:
                self.pidfile.close()  # the lock stays with the supervisor's copy
            self.notifier.close()  # systemd hears from the main process only
            mine = {key: socks[index] for key, socks in self.slots.items()}
            keep = {id(s) for s in mine.values()}
            for socks in self.slots.values():
                for sock in socks:
                    if id(sock) not in keep:
                        sock.close()
            code = self._serve_worker(index, mine, link, acks)
        except BaseException as exc:
            log.error("error", where="worker", worker=index, exc_info=exc)
        finally:
            log.sink.write_all()
            os._exit(code)

    def _serve_worker(
        self, index: int, sockets: dict[ListenerKey, socket.socket], link: socket.socket, acks: int
    ) -> int:
        number_connections(self.count, index, self.lives[index])
        admission.serve_as_worker(index, self.count)
        reactor = Reactor()
        daemon = Daemon(
            self.config, self.machine, reactor, worker=(index, os.getpid()), log_overrides=self.log_overrides
        )
        daemon.open(sockets)
        daemon.on_usr1 = WorkerRotation(reactor, acks).signalled
        lifeline = self.lifeline_r

        def orphaned() -> None:
            reactor.remove_reader(lifeline)
            if not daemon.stopping:
                log.warning("worker.orphaned", worker=index)
                daemon.shutdown(signal.SIGTERM)

        reactor.add_reader(lifeline, orphaned)
        end = WorkerEnd(daemon, link)
        code = daemon.serve()
        if not end.link.closed:  # else the supervisor is gone: nobody to tell
            end.last_words()
        return code

    def reap(self) -> None:
        """SIGCHLD: collect every dead worker, then fill what is missing."""
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            worker = self.workers.pop(pid, None)
            self.rotation.gone(pid)
            if worker is not None:
                self.cpu_departed += usage.ru_utime + usage.ru_stime
                self._worker_exited(worker, os.waitstatus_to_exitcode(status))
        if self.stopping and not self.workers:
            self.reactor.stop()
        self.manage()

    def _worker_exited(self, worker: Worker, code: int) -> None:
        current = worker.generation == self.generation and not self.stopping
        delay = None
        if current:
            lived = time.monotonic() - worker.started
            delay = RESTART_DELAY if lived < RESTART_DELAY else 0.0
            if delay:
                self.held[worker.index] = time.monotonic() + delay
                self.reactor.call_later(delay, self.manage)
        fields: dict[str, object] = dict(
            worker=worker.index,
            worker_pid=worker.pid,
            generation=worker.generation,
            exit=code if code >= 0 else None,
            signal=-code if code < 0 else None,
            restart_in=delay,
        )
        if current:
            log.warning("worker.exit", **fields)
        else:
            log.info("worker.exit", **fields)

    def _signal_workers(self, signum: int, workers: Iterable[Worker] | None = None) -> None:
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
            self.close_listener(key)
        self._signal_workers(signum)
        if not self.workers:
            self.reactor.stop()
            return
        self.reactor.call_later(
            self.config.daemon.shutdown_timeout + KILL_AFTER, lambda: self._signal_workers(signal.SIGKILL)
        )

    def reopen_log(self) -> None:
        self.rotation.start(self.workers)

    def _signal_pids(self, signum: int, pids: Iterable[int]) -> None:
        self._signal_workers(signum, [self.workers[pid] for pid in pids if pid in self.workers])

    def reload(self) -> Result:
        """SIGHUP: the same plan as a single process's reload; logged and
        returned."""
        return self.reloads.run(
            self._reload,
            stopping=self.stopping,
            serving=lambda: f"{self.count} workers serving on {len(self.slots)} listeners",
        )

    def _reload(self) -> Result:
        ready = reload_steps.prepare(
            self.config,
            self.machine,
            self.slots,
            self.log_overrides,
            functools.partial(bind_slots, count=self.count),
        )
        if isinstance(ready, Result):
            return ready
        new, machine, todo, bound = ready.config, ready.machine, ready.todo, ready.bound
        self.config, self.machine = new, machine
        if todo.added or todo.removed:
            self._new_generation(todo, bound)
        else:
            self.fanout.reload_workers()
        if ready.reopen:
            log.reopen()
        return todo.result()

    def _new_generation(self, todo: Plan, bound: Slots) -> None:
        """Listeners changed: workers cannot be handed new sockets, so new
        workers get the new set and the old ones retire."""
        for key in todo.removed:
            self.close_listener(key)
        self.slots.update(bound)
        for key in todo.added:
            self.log_listener("listener.open", key)
        old = [w for w in self.workers.values() if w.generation == self.generation]
        self.generation += 1
        self.held.clear()  # a new generation starts at once
        self.manage()
        self._signal_workers(signals.RETIRE, old)
