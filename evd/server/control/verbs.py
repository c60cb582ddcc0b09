"""The control verbs: one table, read by every place that handles them.

A verb is handled in three places -- a single process answering its
control clients, a supervisor asking its workers, a worker answering its
supervisor -- and checked in a fourth, the `evd ctl` client.  Each row of
`VERBS` says everything about one verb (STYLE.md habit 14, as
reload_plan.plan() does for reloads):

- `usage`: its arguments, as `evd ctl` prints them ("conns [SERVICE]":
  SERVICE is optional); proto/control.parse checks requests against it;
- `changes`: it changes the daemon, so it is logged as `ctl`;
- `reconfigures`: it changes the configuration in force, so a daemon that
  is stopping refuses it;
- `local`: what one daemon process does (daemon_verbs.py), in a single
  process and in each worker alike;
- `own`: the supervisor's own part before it asks its workers
  (supervisor_verbs.py); None for the verbs only a supervisor asks;
- `merge`: how the workers' answers and the supervisor's part make the one
  answer;
- `fds`: listening sockets travel with the request (`enable`: the
  supervisor binds, each worker is handed its copies).

The drivers are thin: `Local` and `WorkerEnd` in drivers.py, `Fanout` in
fanout.py.  This module and the two it reads import nothing of the daemon
at run time, so the `evd ctl` client checks its words against the same
table at no cost.  A verb that is not in the table is refused everywhere with
`unknown_command`; nothing falls through to another verb.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from evd.proto.control import Answer, Request, unknown_command
from evd.proto.control import parse as parse_with
from evd.server.control import daemon_verbs as one
from evd.server.control import supervisor_verbs as whole


@dataclass(frozen=True, slots=True)
class Verb:
    usage: str
    local: one.LocalVerb
    own: whole.OwnPart | None  # None: not a client's verb (the supervisor asks it)
    merge: whole.Merge | None
    changes: bool = False
    reconfigures: bool = False
    fds: bool = False


# fmt: off
VERBS: Mapping[str, Verb] = {
    "info":     Verb("info",                  one.info,      whole.info,          whole.info_merge),
    "services": Verb("services",              one.services,  whole.services,      whole.services_merge),
    "conns":    Verb("conns [SERVICE]",       one.conns,     whole.service_named, whole.conns_merge),
    "sources":  Verb("sources [SERVICE]",     one.sources,   whole.service_named, whole.sources_merge),
    "kill":     Verb("kill CONN",             one.kill,      whole.kill,          whole.anyone, changes=True),
    "disable":  Verb("disable SERVICE",       one.disable,   whole.disable,       whole.every, changes=True,
                     reconfigures=True),
    "enable":   Verb("enable SERVICE",        one.enable,    whole.enable,        whole.every, changes=True,
                     reconfigures=True, fds=True),
    "set":      Verb("set SERVICE KEY VALUE", one.set_limit, whole.set_limit,     whole.every, changes=True,
                     reconfigures=True),
    "reload":   Verb("reload",                one.reload,    whole.reload,        whole.every, changes=True),
    # Asked by a supervisor of its workers only.
    "figures":  Verb("figures",               one.figures,   None,                None),
    "ping":     Verb("ping",                  one.ping,      None,                None),
}
# fmt: on
# What a control client may ask, with the words `evd ctl` shows.
PUBLIC: Mapping[str, str] = {name: verb.usage for name, verb in VERBS.items() if verb.own is not None}
USAGE = " | ".join(PUBLIC.values())


def parse(header: Mapping[str, Any]) -> Request | Answer:
    """A control client's request checked against the table."""
    return parse_with(header, PUBLIC)


def unknown(command: str) -> Answer:
    """The answer to a verb a driver has no row for."""
    return unknown_command(command, PUBLIC)


def changes(command: str) -> bool:
    verb = VERBS.get(command)
    return verb is not None and verb.changes
