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
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from evd import __version__
from evd.config.addresses import Address, sockaddr_text
from evd.config.model import Config
from evd.log.logger import log
from evd.loop.reactor import Reactor, Timer
from evd.net.listeners import BindError
from evd.proto.control import (
    Answer,
    Body,
    Reply,
    Request,
    first_done,
    merge_conns,
    merge_info,
    merge_services,
    merge_sources,
)
from evd.server.control import verbs
from evd.server.control.link import Link
from evd.server.metrics.snapshot import Figures, LagProbe, add, figures, total
from evd.server.reload_plan import ListenerKey, Result
from evd.server.reload_steps import Reloads
from evd.server.sockets import Slots, bind_slots

# How long a worker may take to answer: they answer from their loop, in
# microseconds, unless something blocks it -- which the answer then says.
WORKER_TIMEOUT = 3.0
# A worker's last figures, as it exits, may wait this long for the socket.
LAST_WORDS = 1.0


class Workers(Protocol):
    """What the fanout needs of server/supervisor.py's Supervisor."""

    config: Config
    count: int
    slots: Slots
    generation: int
    reactor: Reactor
    stopping: bool
    reloads: Reloads

    @property
    def live(self) -> Mapping[int, tuple[int, int]]: ...  # pid -> (index, generation)

    def reload(self) -> Result: ...
    def close_listener(self, key: ListenerKey) -> None: ...
    def log_listener(self, event: str, key: ListenerKey) -> None: ...


Answers = dict[int, Answer]  # pid -> its answer


@dataclass
class Gathering:
    waiting: set[int]
    done: Callable[[Answers, list[int]], None]  # (answers, pids that did not answer)
    answers: Answers = field(default_factory=dict)
    timer: Timer | None = None


def _encode_address(key: ListenerKey) -> list[object]:
    return [key[0], key[1].proto, key[1].host, key[1].port]


class Fanout:
    def __init__(self, workers: Workers):
        self.workers = workers
        self.reactor = workers.reactor
        self.started = time.time()
        self.lag = LagProbe(workers.reactor)
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
        for pid in self.links if pids is None else pids:
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
        for link in self.links.values():
            link.send({"cmd": "reload", "args": [], "id": 0})

    # -- the control backend ---------------------------------------------------------

    def handle(self, request: Request, reply: Reply) -> None:
        command, args = request.command, request.args
        if command in ("disable", "enable", "set") and self.workers.stopping:
            reply(Answer.refused("evd is stopping"))
        elif command == "info":
            self._gather(request, reply, lambda shares: merge_info(self._info(), shares))
        elif command == "services":
            self._gather(request, reply, lambda shares: merge_services(self._services(), shares))
        elif command in ("conns", "sources"):
            if args and args[0] not in self.workers.config.services:
                reply(Answer.refused(f"no service {args[0]!r}"))
                return
            merge = merge_conns if command == "conns" else merge_sources
            self._gather(request, reply, merge)
        elif command == "kill":
            self._kill(request, reply)
        elif command == "set":
            self._set(request, reply)
        elif command == "disable":
            self._disable(request, reply)
        elif command == "enable":
            self._enable(request, reply)
        else:
            self._reload(reply)

    def _gather(self, request: Request, reply: Reply, merge: Callable[[list[Body]], Body]) -> None:
        def done(answers: Answers, missing: list[int]) -> None:
            refused = next((a for a in answers.values() if not a.ok), None)
            if refused is not None:
                reply(refused)
            elif missing:
                reply(self._missing(missing))
            else:
                reply(Answer.done(merge([a.body or {} for a in answers.values()])))

        self.ask(request.header(), done)

    def _missing(self, pids: list[int]) -> Answer:
        live = self.workers.live
        named = ", ".join(f"worker {live[p][0]} (pid {p})" if p in live else f"pid {p}" for p in pids)
        return Answer.failed(f"no answer from {named} within {WORKER_TIMEOUT:g} s")

    def _after_all(self, request: Request, reply: Reply, answer: Answer) -> None:
        """Carry `request` out in every worker, then give `answer`."""

        def done(answers: Answers, missing: list[int]) -> None:
            failed = next((a for a in answers.values() if not a.ok), None)
            reply(failed or (self._missing(missing) if missing else answer))

        self.ask(request.header(), done)

    def _kill(self, request: Request, reply: Reply) -> None:
        def done(answers: Answers, missing: list[int]) -> None:
            unknown = Answer.refused(f"no connection {request.args[0]}")
            reply(first_done(list(answers.values()), self._missing(missing) if missing else unknown))

        self.ask(request.header(), done)

    def _info(self) -> Body:
        workers = self.workers
        return {
            "pid": os.getpid(),
            "version": __version__,
            "uptime": round(time.time() - self.started, 3),
            "config": workers.config.source,
            "workers": workers.count,
            "connections": 0,
            "commands_running": 0,
            "last_reload": verbs.last_reload(workers.reloads.last),
        }

    def _services(self) -> dict[str, Body]:
        listeners: dict[str, list[str]] = {}
        for key, socks in self.workers.slots.items():
            sock = socks[0]
            listeners.setdefault(key[0], []).append(
                f"{key[1].proto} {sockaddr_text(sock.family, sock.getsockname())}"
            )
        return verbs.described(self.workers.config, listeners)

    def _set(self, request: Request, reply: Reply) -> None:
        change = verbs.limit_change(self.workers.config, *request.args)
        if isinstance(change, Answer):
            reply(change)
            return
        service, body = change
        self.workers.config = verbs.with_service(self.workers.config, service)
        self._after_all(request, reply, Answer.done(body))

    def _disable(self, request: Request, reply: Reply) -> None:
        workers, name = self.workers, request.args[0]
        service = verbs.switchable(workers.config, name)
        if isinstance(service, Answer):
            reply(service)
            return
        closed = []
        for key in [k for k in workers.slots if k[0] == name]:
            sock = workers.slots[key][0]
            closed.append(f"{key[1].proto} {sockaddr_text(sock.family, sock.getsockname())}")
            self.disabled[key] = verbs.resolved(key[1], sock)
            workers.close_listener(key)
        workers.config = verbs.with_service(workers.config, replace(service, enabled=False))
        body = {"service": name, "enabled": False, "listeners": closed}
        self._after_all(request, reply, Answer.done(body))

    def _enable(self, request: Request, reply: Reply) -> None:
        workers, name = self.workers, request.args[0]
        service = verbs.switchable(workers.config, name)
        if isinstance(service, Answer):
            reply(service)
            return
        keys = [(name, a) for a in service.addresses if (name, a) not in workers.slots]
        try:  # where each was, port 0 resolved; keyed as configured
            bound = bind_slots([(name, self.disabled.get(k, k[1])) for k in keys], workers.count)
        except BindError as exc:
            reply(Answer.refused(str(exc)))
            return
        slots = dict(zip(keys, bound.values(), strict=True))
        workers.slots.update(slots)
        for key in keys:
            workers.log_listener("listener.open", key)
        workers.config = verbs.with_service(workers.config, replace(service, enabled=True))
        opened = list(self._services()[name]["listeners"])
        header = {**request.header(), "keys": [_encode_address(k) for k in keys]}
        current = {pid: index for pid, (index, gen) in workers.live.items() if gen == workers.generation}

        def done(answers: Answers, missing: list[int]) -> None:
            failed = next((a for a in answers.values() if not a.ok), None)
            body = {"service": name, "enabled": True, "listeners": opened}
            reply(failed or (self._missing(missing) if missing else Answer.done(body)))

        self.ask(
            header,
            done,
            pids=list(current),
            fds=lambda pid: [slots[k][current[pid]].fileno() for k in keys],
        )

    def _reload(self, reply: Reply) -> None:
        self.disabled.clear()
        result = self.workers.reload()
        if not result.ok:
            reply(Answer.failed(f"reload failed: {result.error}", result.answer()))
            return
        # The workers got `reload` first on their channel: a ping answered
        # means it has been carried out.
        self._after_all(Request("ping"), reply, Answer.done(result.answer()))

    # -- metrics -----------------------------------------------------------------------

    def scrape(self, done: Callable[[Figures], None]) -> None:
        def gathered(answers: Answers, missing: list[int]) -> None:
            parts = [self.last[pid] for pid in self.links if pid in self.last]
            out = add(total(parts), self.departed)
            own = {"lag": self.lag.figures(), "log_dropped": log.dropped_total}
            add(out, own)
            out["reloads"] = dict(self.workers.reloads.count)
            out["pids"] = [os.getpid(), *self.workers.live]
            done(out)

        self.ask({"cmd": "figures", "args": [], "figures": True}, gathered)


# -- the worker's end ------------------------------------------------------------------


class WorkerEnd:
    """A worker's side of its channel: each request carried out with
    server/verbs.py, as a single process would, and answered."""

    def __init__(self, daemon: verbs.Served, sock: socket.socket):
        self.daemon = daemon
        self.link = Link(daemon.reactor, sock, self._frame, lambda: None)

    def _frame(self, header: dict[str, Any], body: bytes) -> None:
        request = Request(str(header.get("cmd")), tuple(header.get("args") or ()))
        answer = self._answer(request, header)
        if header.get("id"):
            reply = {"id": header["id"], **answer.header(), "figures": header.get("figures", False)}
            self.link.send(reply, b"" if answer.body is None else json.dumps(answer.body).encode())

    def _answer(self, request: Request, header: dict[str, Any]) -> Answer:
        daemon, command, args = self.daemon, request.command, request.args
        if command == "kill":
            return verbs.kill(daemon, args[0])
        if command == "disable":
            return verbs.disable(daemon, args[0])[0]
        if command == "enable":
            keys = [(k[0], Address(k[1], k[2], k[3])) for k in header.get("keys", [])]
            socks = {
                key: socket.socket(fileno=fd)
                for key, fd in zip(keys, self.link.take_fds(len(keys)), strict=False)
            }
            return verbs.enable(daemon, args[0], socks)
        if command == "set":
            return verbs.set_limit(daemon, args)
        if command == "reload":
            return verbs.reload(daemon)
        return verbs.query(daemon, request)

    def last_words(self) -> None:
        """At exit: this worker's final counts, for the supervisor's totals."""
        self.link.send_last({"last": True}, json.dumps(figures(self.daemon)).encode(), LAST_WORDS)
