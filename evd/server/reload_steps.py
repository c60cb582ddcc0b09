"""Carrying out a reload: the steps a daemon and a supervisor share.

Both take the same steps before they change anything -- read the files
again, check what they name on the machine, plan (server/reload_plan.py), bind
what the plan adds, open the log -- and the same ones around the attempt:
systemd hears RELOADING=1 and then READY=1, the result is counted, logged as
`config.reload` (a worker's as `worker.reload`) and returned to whoever
asked (a signal, or `evd ctl reload`).  What differs, how the sockets are
bound and how the plan is carried out, is the caller's.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from evd.config import loader
from evd.config.model import Config, ConfigError
from evd.log.logger import log
from evd.net.listeners import BindError
from evd.server import preflight
from evd.server.reload_plan import ListenerKey, Overrides, Plan, Result, log_settings, plan
from evd.server.sockets import Slots, unbind
from evd.system.systemd import Notifier


@dataclass(slots=True)
class Prepared:
    """A reload that can no longer fail: what to carry out."""

    config: Config
    machine: preflight.Machine
    todo: Plan
    bound: Slots  # the sockets of todo.added
    reopen: bool  # the same log file: reopen it once committed (logrotate may have moved it)


def prepare(
    config: Config,
    machine: preflight.Machine,
    current: Iterable[ListenerKey],
    overrides: Overrides,
    bind: Callable[[Iterable[ListenerKey]], Slots],
    listeners_fixed: bool = False,
) -> Prepared | Result:
    """Everything that can fail, before anything changes: the Prepared
    reload, or the failed Result (nothing changed, nothing left bound).
    `listeners_fixed`: a worker's listeners are its supervisor's business."""
    try:
        new = loader.reread(config)
        new_machine = preflight.check(new)
    except ConfigError as exc:
        return Result.failed(str(exc))
    todo = plan(
        config,
        new,
        current,
        machine.secrets,
        new_machine.secrets,
        machine.certificates,
        new_machine.certificates,
    )
    if listeners_fixed:
        todo = replace(todo, added=(), removed=())
    try:
        bound = bind(todo.added)
    except BindError as exc:
        return Result.failed(str(exc))
    try:
        log.configure(
            *log_settings(new, overrides), buffer=new.log.buffer, journal_socket=new.log.journal_socket
        )
    except OSError as exc:
        unbind(bound)
        return Result.failed(f"cannot open log file {new.log.file}: [Errno {exc.errno}] {exc.strerror}")
    return Prepared(new, new_machine, todo, bound, reopen=new.log.file == config.log.file)


class Reloads:
    """The reloads of one process: counted, the last one remembered, each
    attempt wrapped in systemd's notifications and its log line."""

    def __init__(self, notifier: Notifier, event: str):
        self.notifier = notifier
        self.event = event  # "config.reload", or a worker's "worker.reload"
        self.count: Counter[str] = Counter()  # "ok" / "failed"
        self.last: tuple[float, bool] | None = None  # (time.time(), ok)

    def run(self, attempt: Callable[[], Result], stopping: bool, serving: Callable[[], str]) -> Result:
        """Carry out `attempt`, unless the process is `stopping` (a reload
        cannot undo a stop); `serving()` is the STATUS= systemd shows after."""
        if stopping:
            result = Result.failed("stopping: reload ignored")
            log.warning(self.event, **result.fields())
            return result
        self.notifier.reloading()
        try:
            result = attempt()
        except Exception as exc:  # a bug: still a failed reload, and said so
            log.error("error", where="reload", exc_info=exc)
            result = Result.failed(f"internal error: {exc.__class__.__name__}: {exc}")
        self.notifier.ready(serving())
        self.count["ok" if result.ok else "failed"] += 1
        self.last = (time.time(), result.ok)
        (log.info if result.ok else log.error)(self.event, **result.fields())
        return result
