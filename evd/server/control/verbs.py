"""The control commands, carried out in one daemon process.

`answer(daemon, request)` is the whole of it: a request in, an `Answer`
out, the daemon changed on the way for kill, disable, enable, set and
reload.  A single process answers its control clients with it (`Local`);
with workers, each worker answers the supervisor's copy of the request
with it and the supervisor merges the shares (server/control/fanout.py).  Nothing
here touches the control connection, so every command is a unit test on a
real Daemon.

Runtime changes are changes of the configuration in force: `set` replaces
one limit of one service, `disable`/`enable` its `enabled`, and the
daemon's `config` says so.  A reload compares the file with that
configuration, so it lists the service as changed and puts the file's
values back: "until the next reload or restart" needs no bookkeeping of
its own.
"""

from __future__ import annotations

import os
import socket
import time
import tomllib
import types
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, replace
from datetime import UTC, datetime
from typing import Protocol

from evd import __version__
from evd.commands.runner import Runner
from evd.config import schema, validate
from evd.config.addresses import Address
from evd.config.model import LISTENING, Config, ServiceConfig
from evd.handlers.service import SEND_FAILURES, Service
from evd.loop.reactor import Reactor
from evd.net.listeners import BindError, Listener, bind, bound_identity, unlink_if_ours
from evd.net.tls_service import ServerTLS
from evd.proto.control import Answer, Body, Reply, Request
from evd.server.metrics.snapshot import Figures, LagProbe, figures
from evd.server.reload_plan import ListenerKey, Result
from evd.server.reload_steps import Reloads

LastReload = tuple[float, bool] | None


class Served(Protocol):
    """What the commands need of a daemon (server/daemon.py's Daemon)."""

    config: Config
    services: dict[str, Service]
    listeners: dict[ListenerKey, Listener]
    tls: dict[str, ServerTLS]
    runner: Runner
    reactor: Reactor
    started: float
    worker: tuple[int, int] | None
    stopping: bool
    retiring: bool
    lag: LagProbe
    reloads: Reloads

    def open_listener(self, key: ListenerKey, sock: socket.socket) -> None: ...
    def prepare_tls(self, name: str) -> None: ...  # BindError: its TLS files cannot serve
    def refresh(self) -> None: ...
    def reload(self) -> Result: ...


# -- the configuration in force, changed -------------------------------------------


def with_service(config: Config, service: ServiceConfig) -> Config:
    services = dict(config.services)
    services[service.name] = service
    return replace(config, services=types.MappingProxyType(services))


def switchable(config: Config, name: str) -> ServiceConfig | Answer:
    """The service `disable`/`enable`/`set` may act on, or the refusal."""
    service = config.services.get(name)
    if service is None:
        return Answer.refused(f"no service {name!r} (known: {', '.join(config.services)})")
    if name not in LISTENING:
        return Answer.refused(f"{name} has no listeners or limits of its own: it is reached through framed")
    return service


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


# -- queries -------------------------------------------------------------------------


def last_reload(last: LastReload) -> Body | None:
    if last is None:
        return None
    when, ok = last
    return {"time": datetime.fromtimestamp(when, UTC).isoformat(timespec="seconds"), "ok": ok}


def info(daemon: Served) -> Body:
    return {
        "pid": os.getpid(),
        "version": __version__,
        "uptime": round(time.time() - daemon.started, 3),
        "config": daemon.config.source,
        "workers": 1,
        "connections": sum(len(s.connections) for s in daemon.services.values()),
        "commands_running": len(daemon.runner.running),
        "last_reload": last_reload(daemon.reloads.last),
    }


def described(config: Config, listeners: Mapping[str, list[str]]) -> dict[str, Body]:
    """What the configuration in force says of each listening service."""
    return {
        name: {
            "enabled": config.services[name].enabled,
            "listeners": listeners.get(name, []),
            "limits": asdict(config.services[name].limits),
        }
        for name in LISTENING
    }


def services(daemon: Served) -> Body:
    listeners: dict[str, list[str]] = {}
    for (name, _), listener in daemon.listeners.items():
        listeners.setdefault(name, []).append(f"{listener.proto} {listener.actual}")
    out = described(daemon.config, listeners)
    for name, entry in out.items():
        service = daemon.services.get(name)
        refused = Counter(service.rejected) if service else Counter[str]()
        if service:  # refused datagrams too, as `stats` counts them
            refused.update({r: n for r, n in service.udp_drops.items() if not r.startswith(SEND_FAILURES)})
        entry["connections_current"] = len(service.connections) if service else 0
        entry["connections_total"] = service.connections_total if service else 0
        entry["rejected"] = dict(refused)
    return {"services": out}


def _chosen(daemon: Served, args: tuple[str, ...]) -> list[Service] | Answer:
    if not args:
        return list(daemon.services.values())
    name = args[0]
    if name not in daemon.config.services:
        return Answer.refused(f"no service {name!r} (known: {', '.join(daemon.config.services)})")
    service = daemon.services.get(name)
    return [service] if service else []


def conns(daemon: Served, args: tuple[str, ...]) -> Body | Answer:
    chosen = _chosen(daemon, args)
    if isinstance(chosen, Answer):
        return chosen
    worker = daemon.worker[0] if daemon.worker else None
    now = daemon.reactor.now
    rows = [{**asdict(view), "worker": worker} for s in chosen for view in s.open_connections(now)]
    return {"conns": sorted(rows, key=lambda r: r["conn"])}


def sources(daemon: Served, args: tuple[str, ...]) -> Body | Answer:
    chosen = _chosen(daemon, args)
    if isinstance(chosen, Answer):
        return chosen
    now = daemon.reactor.now
    rows = []
    for service in chosen:
        admission = service.admission
        for view in admission.sources(now):
            rows.append(
                {
                    "service": service.name,
                    "ip": view.host,
                    "connections": view.connections,
                    "rejected": view.rejected,
                    "tokens": None if view.tokens is None else round(view.tokens, 3),
                    "banned_for_s": round(admission.banned_for(view.host, now), 3),
                }
            )
    return {"sources": rows}


# -- changes -------------------------------------------------------------------------


def kill(daemon: Served, text: str) -> Answer:
    try:
        conn = int(text)
    except ValueError:
        return Answer.refused(f"a connection id is a number, not {text!r}")
    if any(service.kill(conn) for service in list(daemon.services.values())):
        return Answer.done({"conn": conn, "killed": True})
    return Answer.refused(f"no connection {conn}")


def disable(daemon: Served, name: str) -> tuple[Answer, dict[ListenerKey, Address]]:
    """Close the service's listeners (its connections carry on).  Also
    returns where each was bound, port 0 resolved, for `enable`."""
    service = switchable(daemon.config, name)
    if isinstance(service, Answer):
        return service, {}
    closed, where = [], {}
    for key in [k for k in daemon.listeners if k[0] == name]:
        listener = daemon.listeners.pop(key)
        closed.append(f"{listener.proto} {listener.actual}")
        where[key] = resolved(key[1], listener.sock)
        listener.close()
    daemon.config = with_service(daemon.config, replace(service, enabled=False))
    daemon.refresh()
    return Answer.done({"service": name, "enabled": False, "listeners": closed}), where


def resolved(address: Address, sock: socket.socket) -> Address:
    """`address` with the port the kernel picked, if it was 0."""
    if address.proto == "unix" or address.port:
        return address
    return replace(address, port=int(sock.getsockname()[1]))


def enable(daemon: Served, name: str, socks: Mapping[ListenerKey, socket.socket]) -> Answer:
    """Serve `name` on `socks` (bound by the caller: see `bind_all`)."""
    service = switchable(daemon.config, name)
    if isinstance(service, Answer):
        return service
    service = replace(service, enabled=True)
    daemon.config = with_service(daemon.config, service)
    state = daemon.services.get(name)
    if state is None:
        daemon.services[name] = Service(service, daemon.reactor)
    elif state.config != service:
        state.apply(service)
    opened = []
    for key, sock in socks.items():
        daemon.open_listener(key, sock)
        listener = daemon.listeners[key]
        opened.append(f"{listener.proto} {listener.actual}")
    daemon.refresh()
    return Answer.done({"service": name, "enabled": True, "listeners": opened})


def to_open(
    daemon: Served, name: str, where: Mapping[ListenerKey, Address]
) -> list[tuple[ListenerKey, Address]]:
    """The listeners `enable NAME` opens: each configured address not open,
    at the address it had when disabled if it was disabled here."""
    service = daemon.config.services.get(name)
    if service is None or name not in LISTENING:
        return []
    keys = [(name, address) for address in service.addresses]
    return [(key, where.get(key, key[1])) for key in keys if key not in daemon.listeners]


def bind_all(wanted: list[tuple[ListenerKey, Address]]) -> dict[ListenerKey, socket.socket]:
    """Bind every (key, address), or none: BindError names the first that
    failed, and what was bound is closed and unlinked."""
    bound: dict[ListenerKey, socket.socket] = {}
    try:
        for key, address in wanted:
            bound[key] = bind(address)
    except BindError:
        for key, sock in bound.items():
            if key[1].proto == "unix":
                unlink_if_ours(key[1].host, bound_identity(key[1].host))
            sock.close()
        raise
    return bound


def set_limit(daemon: Served, args: tuple[str, ...]) -> Answer:
    change = limit_change(daemon.config, *args)
    if isinstance(change, Answer):
        return change
    service, body = change
    daemon.config = with_service(daemon.config, service)
    state = daemon.services.get(service.name)
    if state is not None:
        state.apply(service)
    daemon.refresh()  # idle_timeout sets the sweep's pace
    return Answer.done(body)


def reload(daemon: Served) -> Answer:
    result = daemon.reload()
    if result.ok:
        return Answer.done(result.answer())
    return Answer.failed(f"reload failed: {result.error}", result.answer())


def local_figures(daemon: Served) -> Figures:
    """/metrics of a single process: its figures and its reloads."""
    return {**figures(daemon), "reloads": dict(daemon.reloads.count), "pids": [os.getpid()]}


def query(daemon: Served, request: Request) -> Answer:
    """The commands that change nothing, and `figures` (the supervisor's)."""
    command, args = request.command, request.args
    if command == "info":
        return Answer.done(info(daemon))
    if command == "services":
        return Answer.done(services(daemon))
    if command == "figures":
        return Answer.done(figures(daemon))
    if command == "ping":
        return Answer.done({})
    found = conns(daemon, args) if command == "conns" else sources(daemon, args)
    return found if isinstance(found, Answer) else Answer.done(found)


class Local:
    """The control backend of a single process: every answer at once."""

    def __init__(self, daemon: Served):
        self.daemon = daemon
        # Where disabled listeners were bound: `enable` binds there again,
        # so a port 0 listener comes back on its port.
        self.disabled: dict[ListenerKey, Address] = {}

    def handle(self, request: Request, reply: Reply) -> None:
        reply(self.answer(request))

    def scrape(self, done: Callable[[Figures], None]) -> None:
        done(local_figures(self.daemon))

    def answer(self, request: Request) -> Answer:
        daemon, command, args = self.daemon, request.command, request.args
        if command in ("disable", "enable", "set") and (daemon.stopping or daemon.retiring):
            return Answer.refused("evd is stopping")
        if command == "kill":
            return kill(daemon, args[0])
        if command == "disable":
            answer, where = disable(daemon, args[0])
            self.disabled.update(where)
            return answer
        if command == "enable":
            refusal = switchable(daemon.config, args[0])
            if isinstance(refusal, Answer):
                return refusal
            try:
                daemon.prepare_tls(args[0])
                socks = bind_all(to_open(daemon, args[0], self.disabled))
            except BindError as exc:
                return Answer.refused(str(exc))
            return enable(daemon, args[0], socks)
        if command == "set":
            return set_limit(daemon, args)
        if command == "reload":
            self.disabled.clear()
            return reload(daemon)
        return query(daemon, request)
