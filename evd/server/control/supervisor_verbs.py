"""What each control verb does in a supervisor, and how its workers' answers
make one.

With workers, a verb has two parts (the `own` and `merge` columns of the
table in server/control/verbs.py).  The supervisor first does its own
part: it owns the listening sockets, the configuration in force and the
reload, so `disable` closes its copies, `enable` binds new ones (handed to
the workers with the request), `set` checks the value, `reload` reloads;
`info` and `services` say what only it knows.  That part may refuse, and
then no worker is asked.  Then every worker carries the request out as a
single process would (daemon_verbs.py), and `merge` makes the one answer:
figures summed, connection lists joined, a change done only if every
worker did it.  A worker that did not answer is said so, by name.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

from evd import __version__
from evd.config.addresses import Address, sockaddr_text
from evd.config.model import Config
from evd.proto.control import (
    Answer,
    Body,
    merge_conns,
    merge_info,
    merge_services,
    merge_sources,
)
from evd.server.control import daemon_verbs
from evd.server.control.daemon_verbs import Reloads
from evd.server.reload_plan import ListenerKey, Result

if TYPE_CHECKING:
    from evd.loop.reactor import Reactor

Args = tuple[str, ...]
Slots = dict[ListenerKey, list[socket.socket]]  # as server/sockets.py binds them


class Workers(Protocol):
    """What the supervisor's part needs of server/supervisor.py's Supervisor."""

    config: Config
    count: int
    slots: Slots
    generation: int
    reactor: Reactor
    stopping: bool
    cpu_departed: float  # CPU seconds of the workers reaped so far

    @property
    def reloads(self) -> Reloads: ...

    @property
    def live(self) -> Mapping[int, tuple[int, int]]: ...  # pid -> (index, generation)

    def reload(self) -> Result: ...
    def close_listener(self, key: ListenerKey) -> None: ...
    def log_listener(self, event: str, key: ListenerKey) -> None: ...
    def prepare_tls(self, name: str) -> None: ...  # BindError: its TLS files cannot serve


class Whole(Protocol):
    """The supervisor's side of the control (server/control/fanout.py's Fanout)."""

    workers: Workers
    started: float
    # Where listeners that `disable` closed were bound (port 0 resolved).
    disabled: dict[ListenerKey, Address]

    def bind(self, keys: list[ListenerKey], at: Mapping[ListenerKey, Address]) -> Slots | Answer:
        """A copy of each listener per worker slot, or the refusal."""


@dataclass(slots=True)
class Own:
    """The supervisor's part done: its share of the answer and what to ask
    the workers."""

    body: Body
    ask: Body | None = None  # the request the workers get; None: the client's
    pids: list[int] | None = None  # the workers asked; None: every live one
    fds: Callable[[int], list[int]] | None = None  # descriptors sent to each pid
    otherwise: Answer | None = None  # `anyone`: the answer when no worker says yes
    extra: Body = field(default_factory=dict)  # added to the request's header


OwnPart = Callable[[Whole, Args], "Own | Answer"]
# (the supervisor's share, the workers' answers, who did not answer) -> the answer
Merge = Callable[[Own, list[Answer], "Answer | None"], Answer]


# -- merges ------------------------------------------------------------------------


def summed(combine: Callable[[Body, list[Body]], Body]) -> Merge:
    """Figures: any refusal, else any worker missing, else the shares combined."""

    def merge(own: Own, answers: list[Answer], missing: Answer | None) -> Answer:
        refused = next((a for a in answers if not a.ok), None)
        if refused is not None:
            return refused
        if missing is not None:
            return missing
        return Answer.done(combine(own.body, [a.body or {} for a in answers]))

    return merge


def every(own: Own, answers: list[Answer], missing: Answer | None) -> Answer:
    """A change: done when every worker has done it."""
    failed = next((a for a in answers if not a.ok), None)
    return failed or missing or Answer.done(own.body)


def anyone(own: Own, answers: list[Answer], missing: Answer | None) -> Answer:
    """`kill`: the worker that had the connection says yes."""
    done = next((a for a in answers if a.ok), None)
    refused = answers[0] if answers else own.otherwise
    return done or missing or refused or Answer.refused("no worker answered")


def listed(key: str, combine: Callable[[list[list[Body]]], Iterator[Body]]) -> Merge:
    """A listing: any refusal, else any worker missing, else the workers'
    rows merged lazily (the driver takes them a slice at a time)."""

    def merge(own: Own, answers: list[Answer], missing: Answer | None) -> Answer:
        refused = next((a for a in answers if not a.ok), None)
        if refused is not None:
            return refused
        if missing is not None:
            return missing
        return Answer.listing(key, combine([(a.body or {}).get(key, []) for a in answers]))

    return merge


info_merge = summed(merge_info)
services_merge = summed(merge_services)
conns_merge = listed("conns", merge_conns)
sources_merge = listed("sources", merge_sources)


# -- the supervisor's parts --------------------------------------------------------------


def info(whole: Whole, args: Args) -> Own:
    workers = whole.workers
    body = {
        "pid": os.getpid(),
        "version": __version__,
        "uptime": round(time.time() - whole.started, 3),
        "config": workers.config.source,
        "workers": workers.count,
        "connections": 0,
        "commands_running": 0,
        "last_reload": daemon_verbs.last_reload(workers.reloads.last),
    }
    return Own(body)


def listening(workers: Workers) -> dict[str, list[str]]:
    """Each service's listeners, as `services` lists them."""
    listeners: dict[str, list[str]] = {}
    for key, socks in workers.slots.items():
        listeners.setdefault(key[0], []).append(_where(key, socks[0]))
    return listeners


def _where(key: ListenerKey, sock: socket.socket) -> str:
    return f"{key[1].proto} {sockaddr_text(sock.family, sock.getsockname())}"


def services(whole: Whole, args: Args) -> Own:
    return Own(daemon_verbs.described(whole.workers.config, listening(whole.workers)))


def service_named(whole: Whole, args: Args) -> Own | Answer:
    """`conns`/`sources`: an unknown service is refused before asking."""
    config = whole.workers.config
    if args and args[0] not in config.services:
        return daemon_verbs.unknown_service(config, args[0])
    return Own({})


def kill(whole: Whole, args: Args) -> Own:
    return Own({}, otherwise=Answer.refused(f"no connection {args[0]}"))


def set_limit(whole: Whole, args: Args) -> Own | Answer:
    workers = whole.workers
    change = daemon_verbs.limit_change(workers.config, *args)
    if isinstance(change, Answer):
        return change
    service, body = change
    workers.config = daemon_verbs.with_service(workers.config, service)
    return Own(body)


def disable(whole: Whole, args: Args) -> Own | Answer:
    workers, name = whole.workers, args[0]
    service = daemon_verbs.switchable(workers.config, name)
    if isinstance(service, Answer):
        return service
    closed = []
    for key in [k for k in workers.slots if k[0] == name]:
        sock = workers.slots[key][0]
        closed.append(_where(key, sock))
        whole.disabled[key] = daemon_verbs.resolved(key[1], sock)
        workers.close_listener(key)
    workers.config = daemon_verbs.with_service(workers.config, replace(service, enabled=False))
    return Own({"service": name, "enabled": False, "listeners": closed})


def encode_key(key: ListenerKey) -> list[object]:
    return [key[0], key[1].proto, key[1].host, key[1].port]


def decode_key(raw: list[object]) -> ListenerKey:
    name, proto, host, port = raw
    return (str(name), Address(str(proto), str(host), int(str(port))))


def enable(whole: Whole, args: Args) -> Own | Answer:
    """Bind the service's listeners (where they were, port 0 resolved),
    one copy per worker slot; each current worker gets its copies."""
    workers, name = whole.workers, args[0]
    service = daemon_verbs.switchable(workers.config, name)
    if isinstance(service, Answer):
        return service
    keys = daemon_verbs.to_open(workers.config, name, lambda key: key in workers.slots)
    slots = whole.bind(keys, whole.disabled)
    if isinstance(slots, Answer):
        return slots
    workers.slots.update(slots)
    for key in keys:
        workers.log_listener("listener.open", key)
    workers.config = daemon_verbs.with_service(workers.config, replace(service, enabled=True))
    current = {pid: index for pid, (index, gen) in workers.live.items() if gen == workers.generation}
    return Own(
        {"service": name, "enabled": True, "listeners": listening(workers).get(name, [])},
        pids=list(current),
        fds=lambda pid: [slots[k][current[pid]].fileno() for k in keys],
        extra={"keys": [encode_key(k) for k in keys]},
    )


def reload(whole: Whole, args: Args) -> Own | Answer:
    """The supervisor reloads; the workers got `reload` first on their
    channel, so a `ping` answered means it has been carried out there."""
    whole.disabled.clear()
    result = whole.workers.reload()
    if not result.ok:
        return daemon_verbs.reload_answer(result)
    return Own(result.answer(), ask={"cmd": "ping", "args": []})
