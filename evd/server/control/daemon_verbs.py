"""What each control verb does in one daemon process.

Each function here is the `local` column of the verb table
(server/control/verbs.py): a daemon, the request's arguments and a way to
get listening sockets in, an `Answer` out, the daemon changed on the way
for kill, disable, enable, set and reload.  A single process runs them for
its control clients; a worker runs them for its supervisor's copy of the
request.  Nothing here touches a control connection, so every verb is a
unit test on a real Daemon.

Sockets come from the caller (`Bind`), as a reload's do
(reload_steps.prepare(bind=...)): a single process binds them itself; a
worker is handed the ones its supervisor bound (they travel with the
request, see fanout.py).

Runtime changes are changes of the configuration in force: `set` replaces
one limit of one service, `disable`/`enable` its `enabled`, and the
daemon's `config` says so.  A reload compares the file with that
configuration, so it lists the service as changed and puts the file's
values back: "until the next reload or restart" needs no bookkeeping of
its own.
"""

from __future__ import annotations

import heapq
import operator
import os
import socket
import time
import tomllib
import types
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

from evd import __version__
from evd.config import schema, validate
from evd.config.addresses import Address
from evd.config.model import Config, ServiceConfig
from evd.proto.control import Answer, Body
from evd.server.reload_plan import ListenerKey, Result

if TYPE_CHECKING:
    from evd.commands.runner import Runner
    from evd.handlers.service import Service
    from evd.loop.reactor import Reactor
    from evd.loop.seams import Connection
    from evd.net.listeners import Listener
    from evd.server.metrics.snapshot import Figures

LastReload = tuple[float, bool] | None
# The sockets `enable NAME` serves: the service's name and (key, where to
# bind it) in, a socket per key out -- all of them, with the service's TLS
# files read -- or the refusal that says why not.
Bind = Callable[[str, list[tuple[ListenerKey, Address]]], "dict[ListenerKey, socket.socket] | Answer"]
Args = tuple[str, ...]


class Reloads(Protocol):
    """What the verbs read of a process's reloads (server/reload_steps.py)."""

    @property
    def count(self) -> Counter[str]: ...  # "ok" / "failed"
    @property
    def last(self) -> LastReload: ...


class Served(Protocol):
    """What the verbs need of a daemon (server/daemon.py's Daemon)."""

    config: Config
    services: dict[str, Service]
    listeners: dict[ListenerKey, Listener]
    runner: Runner
    reactor: Reactor
    started: float
    worker: tuple[int, int] | None
    stopping: bool
    retiring: bool

    @property
    def reloads(self) -> Reloads: ...

    # Where listeners that `disable` closed were bound (port 0 resolved):
    # `enable` binds there again, so a port-0 listener comes back on its port.
    disabled: dict[ListenerKey, Address]

    def open_listener(self, key: ListenerKey, sock: socket.socket) -> None: ...
    def prepare_tls(self, name: str) -> None: ...  # BindError: its TLS files cannot serve
    def apply_service(self, service: ServiceConfig) -> None: ...
    def refresh(self) -> None: ...
    def reload(self) -> Result: ...
    def figures(self) -> Figures: ...


# The `local` column of the verb table.
LocalVerb = Callable[[Served, Args, Bind], Answer]


# -- the configuration in force, changed -------------------------------------------


def with_service(config: Config, service: ServiceConfig) -> Config:
    services = dict(config.services)
    services[service.name] = service
    return replace(config, services=types.MappingProxyType(services))


def switchable(config: Config, name: str) -> ServiceConfig | Answer:
    """The service `disable`/`enable`/`set` may act on, or the refusal."""
    service = config.services.get(name)
    if service is None:
        return unknown_service(config, name)
    if not service.listens:
        return Answer.refused(f"{name} has no listeners or limits of its own: it is reached through framed")
    return service


def unknown_service(config: Config, name: str) -> Answer:
    return Answer.refused(f"no service {name!r} (known: {', '.join(config.services)})")


def limit_change(config: Config, name: str, key: str, text: str) -> tuple[ServiceConfig, Body] | Answer:
    """`set NAME KEY TEXT` checked as the configuration file is checked
    (the same messages, naming the key): the changed service and the
    answer, or the refusal."""
    service = switchable(config, name)
    if isinstance(service, Answer):
        return service
    path = f"services.{name}"
    if key not in schema.LIMITS:
        return Answer.refused(f"{path}.{key}: not a [limits] key (one of {', '.join(schema.LIMITS)})")
    try:  # TOML's spelling, as in the file: 5, 2.5, 1e3
        raw: object = tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        raw = text  # a string: refused below with the file's message
    errors: list[str] = []
    values = validate.take({key: raw}, schema.LIMITS, path, errors)
    limits = replace(service.limits, **values)
    if not errors and key in ("write_low", "write_high"):
        validate.check_water(limits, path, errors)
    if errors:
        return Answer.refused("; ".join(errors))
    was = getattr(service.limits, key)
    return replace(service, limits=limits), {"service": name, "key": key, "value": values[key], "was": was}


def resolved(address: Address, sock: socket.socket) -> Address:
    """`address` with the port the kernel picked, if it was 0."""
    if address.proto == "unix" or address.port:
        return address
    return replace(address, port=int(sock.getsockname()[1]))


def to_open(config: Config, name: str, is_open: Callable[[ListenerKey], bool]) -> list[ListenerKey]:
    """The listeners `enable NAME` opens: each configured address not open."""
    service = config.services.get(name)
    if service is None or not service.listens:
        return []
    return [(name, address) for address in service.addresses if not is_open((name, address))]


# -- queries -------------------------------------------------------------------------


def last_reload(last: LastReload) -> Body | None:
    if last is None:
        return None
    when, ok = last
    return {"time": datetime.fromtimestamp(when, UTC).isoformat(timespec="seconds"), "ok": ok}


def info(daemon: Served, args: Args, bind: Bind) -> Answer:
    return Answer.done(
        {
            "pid": os.getpid(),
            "version": __version__,
            "uptime": round(time.time() - daemon.started, 3),
            "config": daemon.config.source,
            "workers": 1,
            "connections": sum(len(s.connections) for s in daemon.services.values()),
            "commands_running": len(daemon.runner.running),
            "last_reload": last_reload(daemon.reloads.last),
        }
    )


def described(config: Config, listeners: Mapping[str, list[str]]) -> dict[str, Body]:
    """What the configuration in force says of each listening service."""
    return {
        name: {
            "enabled": service.enabled,
            "listeners": listeners.get(name, []),
            "limits": asdict(service.limits),
        }
        for name, service in config.services.items()
        if service.listens
    }


def services(daemon: Served, args: Args, bind: Bind) -> Answer:
    listeners: dict[str, list[str]] = {}
    for (name, _), listener in daemon.listeners.items():
        listeners.setdefault(name, []).append(f"{listener.proto} {listener.actual}")
    out = described(daemon.config, listeners)
    counted = daemon.figures()["services"]
    for name, entry in out.items():
        figures = counted.get(name)
        refused = Counter[str]()
        if figures:  # refused datagrams too, as `stats` counts them
            refused.update(figures["rejected"])
            refused.update(figures["datagrams_refused"])
        entry["connections_current"] = figures["connections_current"] if figures else 0
        entry["connections_total"] = figures["connections_total"] if figures else 0
        entry["rejected"] = dict(refused)
    return Answer.done({"services": out})


def chosen(daemon: Served, args: Args) -> list[Service] | Answer:
    """`conns`/`sources`: every service, or the one named."""
    if not args:
        return list(daemon.services.values())
    name = args[0]
    if name not in daemon.config.services:
        return unknown_service(daemon.config, name)
    service = daemon.services.get(name)
    return [service] if service else []


def conns(daemon: Served, args: Args, bind: Bind) -> Answer:
    found = chosen(daemon, args)
    if isinstance(found, Answer):
        return found
    return Answer.listing("conns", conn_rows(daemon, found))


def conn_rows(daemon: Served, services: list[Service]) -> Iterator[Body]:
    """Every open connection of `services` by id, made as they are taken
    (slices.py); a connection that closes meanwhile is listed as it was."""
    worker = daemon.worker[0] if daemon.worker else None
    now = daemon.reactor.now
    # One sort per service, keyed in C (2 ms for 18,000 where a Python key
    # took 30): the only step of a listing that is not sliced.
    ordered = [_with(s, sorted(s.connections, key=BY_ID)) for s in services]
    for service, conn in heapq.merge(*ordered, key=_conn_id):
        yield {**asdict(service.view(conn, now)), "worker": worker}


def _with(service: Service, conns: list[Connection]) -> Iterator[tuple[Service, Connection]]:
    for conn in conns:
        yield service, conn


BY_ID = operator.attrgetter("conn_id")
BY_HOST = operator.attrgetter("host")


def _conn_id(item: tuple[Service, Connection]) -> int:
    return item[1].conn_id


def sources(daemon: Served, args: Args, bind: Bind) -> Answer:
    found = chosen(daemon, args)
    if isinstance(found, Answer):
        return found
    return Answer.listing("sources", source_rows(daemon, found))


def source_rows(daemon: Served, services: list[Service]) -> Iterator[Body]:
    """Per (service, client IP), in that order: how workers' rows merge."""
    now = daemon.reactor.now
    for service in sorted(services, key=lambda s: s.name):
        admission = service.admission
        for view in sorted(admission.sources(now), key=BY_HOST):
            yield {
                "service": service.name,
                "ip": view.host,
                "connections": view.connections,
                "rejected": view.rejected,
                "tokens": None if view.tokens is None else round(view.tokens, 3),
                "banned_for_s": round(admission.banned_for(view.host, now), 3),
            }


def figures(daemon: Served, args: Args, bind: Bind) -> Answer:
    """A worker's figures, for its supervisor's /metrics."""
    return Answer.done(daemon.figures())


def ping(daemon: Served, args: Args, bind: Bind) -> Answer:
    """Answered once what came before it on the channel is done."""
    return Answer.done({})


# -- changes -------------------------------------------------------------------------


def kill(daemon: Served, args: Args, bind: Bind) -> Answer:
    try:
        conn = int(args[0])
    except ValueError:
        return Answer.refused(f"a connection id is a number, not {args[0]!r}")
    if any(service.kill(conn) for service in list(daemon.services.values())):
        return Answer.done({"conn": conn, "killed": True})
    return Answer.refused(f"no connection {conn}")


def disable(daemon: Served, args: Args, bind: Bind) -> Answer:
    """Close the service's listeners (its connections carry on)."""
    name = args[0]
    service = switchable(daemon.config, name)
    if isinstance(service, Answer):
        return service
    closed = []
    for key in [k for k in daemon.listeners if k[0] == name]:
        listener = daemon.listeners.pop(key)
        closed.append(f"{listener.proto} {listener.actual}")
        daemon.disabled[key] = resolved(key[1], listener.sock)
        listener.close()
    daemon.config = with_service(daemon.config, replace(service, enabled=False))
    daemon.refresh()
    return Answer.done({"service": name, "enabled": False, "listeners": closed})


def enable(daemon: Served, args: Args, bind: Bind) -> Answer:
    """Serve the service again on the sockets `bind` gives."""
    name = args[0]
    service = switchable(daemon.config, name)
    if isinstance(service, Answer):
        return service
    keys = to_open(daemon.config, name, lambda key: key in daemon.listeners)
    socks = bind(name, [(key, daemon.disabled.get(key, key[1])) for key in keys])
    if isinstance(socks, Answer):
        return socks
    service = replace(service, enabled=True)
    daemon.config = with_service(daemon.config, service)
    daemon.apply_service(service)
    opened = []
    for key, sock in socks.items():
        daemon.open_listener(key, sock)
        listener = daemon.listeners[key]
        opened.append(f"{listener.proto} {listener.actual}")
    daemon.refresh()
    return Answer.done({"service": name, "enabled": True, "listeners": opened})


def set_limit(daemon: Served, args: Args, bind: Bind) -> Answer:
    change = limit_change(daemon.config, *args)
    if isinstance(change, Answer):
        return change
    service, body = change
    daemon.config = with_service(daemon.config, service)
    if service.name in daemon.services:
        daemon.apply_service(service)
    daemon.refresh()  # idle_timeout sets the sweep's pace
    return Answer.done(body)


def reload(daemon: Served, args: Args, bind: Bind) -> Answer:
    daemon.disabled.clear()  # the file decides again where everything is
    result = daemon.reload()
    return reload_answer(result)


def reload_answer(result: Result) -> Answer:
    if result.ok:
        return Answer.done(result.answer())
    return Answer.failed(f"reload failed: {result.error}", result.answer())
