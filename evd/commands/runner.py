"""The command service: the allow-listed programs that run, and how many.

Which command a request may run, with which arguments, is decided before it
gets here (proto/allowlist.py, called by the framed session).  The Runner
holds every running command of one daemon (`process.Run` runs one),
refuses more than `max_concurrent` (`busy`), counts runs by
outcome for metrics, reaps what could not be waited for, and at daemon exit
kills everything in a bounded time.
"""

from __future__ import annotations

import functools
import os
import select
import signal
import time
from collections import Counter
from collections.abc import Mapping

from evd.commands.child import Child, Launch, Process
from evd.commands.process import ENV, CommandError, Done, Result, Run
from evd.config.model import CommandSpec, ServiceConfig
from evd.loop.reactor import Reactor, Timer
from evd.system import children
from evd.system.children import Deathsig

__all__ = ["CommandError", "Result", "Run", "Runner"]

# At daemon exit, how long the SIGKILLed commands together may take to die.
SHUTDOWN_WAIT = 1.0
# How often a main process we could not wait for (no pidfd) is polled.
REAP_PERIOD = 0.1


class Runner:
    """Every running command of one daemon, and the rules they run under."""

    def __init__(
        self,
        reactor: Reactor,
        service_config: ServiceConfig,
        deathsig: Deathsig | None = None,
    ):
        self.reactor = reactor
        self.running: set[Run] = set()
        # Answered runs whose leftovers were SIGTERMed: SIGKILL due.
        self.lingering: set[Child] = set()
        # Main processes that ended after their answer, or never got a pidfd.
        self.unreaped: list[Process] = []
        self._reap_timer: Timer | None = None
        self.total = 0
        # (command name, outcome) -> runs; monotonic over reloads.
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.deathsig = _deathsig() if deathsig is None else deathsig
        self.config = service_config
        # The allow-list's entries, for their own settings (SPEC section 14),
        # and the identities preflight resolved ("commands.NAME" -> uid, gid);
        # the daemon sets both, and a reload replaces them.
        self.commands: Mapping[str, CommandSpec] = {}
        self.identities: Mapping[str, tuple[int | None, int | None]] = {}
        self.by_name: Counter[str] = Counter()  # running, per command

    def start(
        self,
        name: str,
        argv: list[str],
        stdin: bytes,
        done: Done,
        *,
        key: str | None = None,
        peer: str | None = None,
    ) -> Run:
        """Run argv; `done(result)` is called from the loop when it ends,
        unless the run was abandoned.  The command's own settings apply
        where its entry has them, the command service's elsewhere."""
        config = self.config
        if len(self.running) >= config.max_concurrent:
            raise CommandError("busy", f"{len(self.running)} commands running (max_concurrent)")
        spec = self.commands.get(name)
        if spec is not None and spec.max_concurrent is not None and self.by_name[name] >= spec.max_concurrent:
            raise CommandError("busy", f"{self.by_name[name]} {name} commands running (its max_concurrent)")
        run = Run(
            self,
            name,
            self._launch(spec, argv),
            stdin,
            done,
            timeout=config.timeout if spec is None or spec.timeout is None else spec.timeout,
            max_output=config.max_output,
            key=key,
            peer=peer,
        )
        self.running.add(run)
        self.by_name[name] += 1
        self.total += 1
        return run

    def _launch(self, spec: CommandSpec | None, argv: list[str]) -> Launch:
        if spec is None:  # today's behaviour
            return Launch(tuple(argv), ENV)
        uid, gid = self.identities.get(f"commands.{spec.name}", (None, None))
        return Launch(tuple(argv), ENV | dict(spec.env), spec.cwd, uid, gid)

    # -- what a Run asks of its owner (process.Owner, child.Owner) -------------------------

    def answered(self, run: Run) -> None:
        if run in self.running:
            self.running.discard(run)
            self.by_name[run.name] -= 1
            if not self.by_name[run.name]:
                del self.by_name[run.name]
        self.outcomes[(run.name, run.outcome())] += 1

    def linger(self, child: Child, lingering: bool) -> None:
        if lingering:
            self.lingering.add(child)
        else:
            self.lingering.discard(child)

    def reap_later(self, proc: Process) -> None:
        """Collect a SIGKILLed main process without waiting for it."""
        if proc.poll() is None:
            self.unreaped.append(proc)
            if self._reap_timer is None:
                self._reap_timer = self.reactor.call_later(REAP_PERIOD, self._reap)

    def _reap(self) -> float | None:
        self.unreaped = [proc for proc in self.unreaped if proc.poll() is None]
        if self.unreaped:
            return REAP_PERIOD
        self._reap_timer = None
        return None

    def kill_all(self) -> None:
        """At daemon exit: SIGKILL every command and what it left, give them
        SHUTDOWN_WAIT together to die (never more), and answer."""
        runs = list(self.running)
        for run in runs:
            run.kill_now()
        deadline = time.monotonic() + SHUTDOWN_WAIT
        waiting = {run.pidfd: run for run in runs if run.pidfd >= 0}
        poller = select.poll()
        for fd in waiting:
            poller.register(fd, select.POLLIN)
        while waiting and (left := deadline - time.monotonic()) > 0:
            for fd, _ in poller.poll(left * 1000):
                poller.unregister(fd)
                waiting.pop(fd).reaped()
        for run in runs:
            run.end_now()
        for child in list(self.lingering):
            child.kill_rest()
        for proc in self.unreaped:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._reap()


@functools.cache
def _deathsig() -> Deathsig:
    """Probed once per process, before the loop needs it."""
    return children.deathsig(ENV)
