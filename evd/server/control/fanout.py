"""Control and metrics with workers: the supervisor asks, each worker answers.

Why a socketpair per worker
---------------------------
The supervisor owns the control socket and the metrics port (one address
for the whole daemon, whichever worker the kernel would have picked), so
it needs to put a question to every worker and gather the answers.  A
UNIX socketpair made before each fork is the channel (server/control/link.py):
private to the two processes (nothing to bind, name or protect), ordered
(a `reload` sent before a `ping` is carried out before it is answered),
EOF when the worker dies however it dies, and able to carry descriptors,
which `enable` needs to hand each worker its copy of a re-bound socket.
Signals carry no answer; a shared memory segment would need locks between
processes that must never wait for each other.

The supervisor's loop never waits for a worker.  `ask` sends a request to
each worker and returns; answers arrive as frames on the loop, and the
gathering ends when all are in or WORKER_TIMEOUT has passed, whichever
comes first.  A control command that lacks a worker's answer fails and
says which worker (exit 1); a scrape uses that worker's last figures.

What the supervisor does for each verb, and how the answers merge, is
the verb table's (server/control/verbs.py); `handle` only drives it.

Counters stay monotonic although workers come and go (a reload that
changes listeners replaces them all): each worker's latest figures are
kept -- sent by the worker itself as it exits, else those of the last
scrape -- and folded into `departed` when its channel closes.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from evd.config.addresses import Address
from evd.log.logger import log
from evd.loop.reactor import Reactor, Timer
from evd.net.listeners import BindError
from evd.proto.control import Answer, Body, Reply, Request
from evd.server.control.link import Link
from evd.server.control.supervisor_verbs import Workers
from evd.server.control.verbs import VERBS, unknown
from evd.server.metrics.snapshot import Figures, LagProbe, add, total
from evd.server.reload_plan import ListenerKey
from evd.server.sockets import Slots, bind_slots

# How long a worker may take to answer: they answer from their loop, in
# microseconds, unless something blocks it -- which the answer then says.
WORKER_TIMEOUT = 3.0

Answers = dict[int, Answer]  # pid -> its answer


@dataclass
class Gathering:
    waiting: set[int]
    done: Callable[[Answers, list[int]], None]  # (answers, pids that did not answer)
    answers: Answers = field(default_factory=dict)
    parts: dict[int, list[Body]] = field(default_factory=dict)  # pid -> rows of a listing so far
    timer: Timer | None = None


class Fanout:
    def __init__(self, workers: Workers):
        self.workers = workers
        self.reactor: Reactor = workers.reactor
        self.started = time.time()
        self.lag = LagProbe(self.reactor)
        self.links: dict[int, Link] = {}
        self.pending: dict[int, Gathering] = {}
        self.ids = itertools.count(1)
        self.last: dict[int, Figures] = {}  # pid -> its latest figures
        self.departed: Figures = {}  # counts of workers gone
        self.disabled: dict[ListenerKey, Address] = {}  # where disabled listeners were bound

    # -- channels ---------------------------------------------------------------

    def pair(self) -> tuple[socket.socket, socket.socket]:
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def adopt(self, pid: int, sock: socket.socket) -> None:
        self.links[pid] = Link(
            self.reactor, sock, lambda h, b: self._frame(pid, h, b), lambda: self._gone(pid)
        )

    def close_in_child(self) -> None:
        """In a new worker: the other workers' channels are not its own."""
        for link in self.links.values():
            link.sock.close()
        self.links.clear()

    def _frame(self, pid: int, header: dict[str, Any], body: bytes) -> None:
        content = json.loads(body) if body else None
        if header.get("last"):  # the worker's figures as it exits
            self.last[pid] = content or {}
            return
        gathering = self.pending.get(header.get("id", 0))
        if gathering is None or pid not in gathering.waiting:
            return  # late: its gathering ended without it
        if header.get("part"):  # a slice of a listing: parsed now, a slice at a time
            gathering.parts.setdefault(pid, []).extend(content or [])
            return
        key = header.get("rows")
        if isinstance(key, str):  # the listing's end: its rows came before
            content = {key: gathering.parts.pop(pid, [])}
        answer = Answer.from_wire(header, content)
        if answer.ok and header.get("figures") and content is not None:
            self.last[pid] = content
        gathering.answers[pid] = answer
        gathering.waiting.discard(pid)
        if not gathering.waiting:
            self._finish(header["id"])

    def _gone(self, pid: int) -> None:
        self.links.pop(pid, None)
        add(self.departed, self.last.pop(pid, {}), gauges=False)
        for rid, gathering in list(self.pending.items()):
            if pid in gathering.waiting:
                gathering.waiting.discard(pid)
                if not gathering.waiting:
                    self._finish(rid)

    def ask(
        self,
        request: Body,
        done: Callable[[Answers, list[int]], None],
        pids: list[int] | None = None,
        fds: Callable[[int], list[int]] | None = None,
    ) -> None:
        """Send `request` to `pids` (every live worker) and call `done`
        once each has answered or WORKER_TIMEOUT has passed."""
        rid = next(self.ids)
        gathering = self.pending[rid] = Gathering(set(), done)
        # A snapshot: a send that fails closes that link, and its worker
        # leaves `links` (`_gone`) while we go through them.
        for pid in list(self.links) if pids is None else list(pids):
            link = self.links.get(pid)
            attached = fds(pid) if fds else None
            if link is not None and link.send({**request, "id": rid}, fds=attached):
                gathering.waiting.add(pid)
        if not gathering.waiting:
            self._finish(rid)
            return
        gathering.timer = self.reactor.call_later(WORKER_TIMEOUT, lambda: self._finish(rid))

    def _finish(self, rid: int) -> None:
        gathering = self.pending.pop(rid, None)
        if gathering is None:
            return
        self.reactor.cancel(gathering.timer)
        gathering.done(gathering.answers, sorted(gathering.waiting))

    def reload_workers(self) -> None:
        """Pass a reload on (answers are not waited for: `reload` pings)."""
        for link in list(self.links.values()):
            link.send({"cmd": "reload", "args": [], "id": 0})

    # -- the control backend ---------------------------------------------------------

    def handle(self, request: Request, reply: Reply) -> None:
        verb = VERBS.get(request.command)
        if verb is None or verb.own is None or verb.merge is None:
            reply(unknown(request.command))
            return
        if verb.reconfigures and self.workers.stopping:
            reply(Answer.refused("evd is stopping"))
            return
        own = verb.own(self, request.args)
        if isinstance(own, Answer):  # refused (or failed) before any worker is asked
            reply(own)
            return
        merge = verb.merge

        def done(answers: Answers, missing: list[int]) -> None:
            reply(merge(own, list(answers.values()), self._missing(missing) if missing else None))

        ask = own.ask if own.ask is not None else request.header()
        self.ask({**ask, **own.extra}, done, pids=own.pids, fds=own.fds)

    def bind(self, keys: list[ListenerKey], at: Mapping[ListenerKey, Address]) -> Slots | Answer:
        """`enable`: a copy of each listener per worker slot, or the refusal."""
        try:
            for name in {key[0] for key in keys}:
                self.workers.prepare_tls(name)
            return bind_slots(keys, self.workers.count, at=at)
        except BindError as exc:
            return Answer.refused(str(exc))

    def _missing(self, pids: list[int]) -> Answer:
        live = self.workers.live
        named = ", ".join(f"worker {live[p][0]} (pid {p})" if p in live else f"pid {p}" for p in pids)
        return Answer.failed(f"no answer from {named} within {WORKER_TIMEOUT:g} s")

    # -- metrics -----------------------------------------------------------------------

    def scrape(self, done: Callable[[Figures | None], None]) -> None:
        def gathered(answers: Answers, missing: list[int]) -> None:
            try:
                out = self.figures()
            except Exception as exc:  # a bug: logged, and the scraper answered
                log.error("error", where="metrics", exc_info=exc)
                done(None)
                return
            done(out)

        self.ask({"cmd": "figures", "args": [], "figures": True}, gathered)

    def figures(self) -> Figures:
        """The whole daemon's: the live workers' latest, what the departed
        counted, the supervisor's own."""
        parts = [self.last[pid] for pid in self.links if pid in self.last]
        out = add(total(parts), self.departed)
        own = {"lag": self.lag.figures(), "log_dropped": log.dropped_total}
        add(out, own)
        out["reloads"] = dict(self.workers.reloads.count)
        out["pids"] = [os.getpid(), *self.workers.live]
        out["cpu_departed"] = self.workers.cpu_departed
        return out
