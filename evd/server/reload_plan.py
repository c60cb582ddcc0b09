"""The reload plan: what a new configuration changes, computed once.

A reload compares the configuration in force with the one just read, and
the listeners open now with the ones the new configuration asks for.  The
single-process daemon and the supervisor both need that answer, and their
`config.reload` lines (and `evd ctl reload`'s answer) must say the same
thing whatever `workers` is: so the comparison lives here, once, as a pure
function of its inputs -- no socket, no log, no clock -- and each caller
only carries it out.

The plan is carried out whole or not at all: everything that can fail
(reading and checking the file, binding the added listeners, opening a new
log file) happens before anything is changed.  `Result` is what the caller
reports: the log line's fields, and the answer a control client waits for.

`changed` names what differs, in this order: the listening services, then
`commands` (the allow-list and the command service), `stats`, `keys`
(named keys, or the bytes of a key file), `log`, the `daemon.*` keys, and
`control`, `metrics`, `include`.  A service that is off before and after is
not named: its settings have no effect.  `daemon.pidfile`, `user`, `group`
and `workers` shape the start, so they say "(at the next start)"; so do
`control` and `metrics`, whose sockets are bound only at the start.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace

from evd.config.addresses import Address
from evd.config.model import Config, Limits, ServiceConfig

# (service name, configured address): how listeners are known across reloads.
ListenerKey = tuple[str, Address]

# --log-level / --log-format from the command line: they win over the file.
Overrides = Mapping[str, str | None]

# [daemon] keys a running daemon cannot take over: they shape its start.
AT_NEXT_START = frozenset({"pidfile", "user", "group", "workers"})
NEXT_START = " (at the next start)"
NO_LIMITS = Limits()


def describe(key: ListenerKey) -> str:
    """How `added` and `removed` name a listener: "echo tcp 127.0.0.1:7"."""
    name, address = key
    return f"{name} {address.proto} {address}"


@dataclass(frozen=True, slots=True)
class Plan:
    added: tuple[ListenerKey, ...]  # listeners to open, in the new configuration's order
    removed: tuple[ListenerKey, ...]  # listeners to close, in the current order
    changed: tuple[str, ...]

    def result(self) -> Result:
        return Result(
            ok=True,
            added=tuple(describe(k) for k in self.added),
            removed=tuple(describe(k) for k in self.removed),
            changed=self.changed,
        )


@dataclass(frozen=True, slots=True)
class Result:
    """What a reload did: `ok` and the three lists, or `error` and nothing."""

    ok: bool
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    error: str | None = None

    @classmethod
    def failed(cls, error: str) -> Result:
        return cls(ok=False, error=error)

    def fields(self) -> dict[str, object]:
        """The `config.reload` fields (SPEC section 6): `error` only when
        it failed."""
        out: dict[str, object] = {
            "ok": self.ok,
            "added": list(self.added),
            "removed": list(self.removed),
            "changed": list(self.changed),
        }
        if not self.ok:
            out["error"] = self.error
        return out

    def answer(self) -> dict[str, object]:
        """The control answer (SPEC section 9): always all five fields."""
        return {**self.fields(), "error": self.error}


def plan(
    old: Config,
    new: Config,
    current: Iterable[ListenerKey],
    old_secrets: Mapping[str, bytes] | None = None,
    new_secrets: Mapping[str, bytes] | None = None,
    old_certificates: Mapping[str, bytes] | None = None,
    new_certificates: Mapping[str, bytes] | None = None,
) -> Plan:
    """What going from `old` (with the listeners `current` open) to `new`
    takes.  The secrets, when given, are the key bytes preflight read for
    each: a key file rewritten in place is a change of `keys` too.  The
    certificates are digests of each TLS service's files: a certificate
    rotated in place is a change of that service."""
    now = list(current)
    wanted = new.listener_keys()
    wanted_set, now_set = set(wanted), set(now)
    added = tuple(k for k in wanted if k not in now_set)
    removed = tuple(k for k in now if k not in wanted_set)
    changed = changes(old, new, old_secrets, new_secrets, old_certificates, new_certificates)
    return Plan(added, removed, tuple(changed))


def changes(
    old: Config,
    new: Config,
    old_secrets: Mapping[str, bytes] | None = None,
    new_secrets: Mapping[str, bytes] | None = None,
    old_certificates: Mapping[str, bytes] | None = None,
    new_certificates: Mapping[str, bytes] | None = None,
) -> list[str]:
    """The `changed` list (see the module's docstring for its order)."""
    before, after = old_certificates or {}, new_certificates or {}
    changed = [
        name
        for name in new.services
        if new.services[name].listens
        and (
            _differs(old.services.get(name), new.services[name])
            or (name in before and name in after and before[name] != after[name])
        )
    ]
    command = _differs(_unlimited(old, "command"), _unlimited(new, "command"))
    if command or (_on(old, new, "command") and old.commands != new.commands):
        changed.append("commands")
    if _differs(_unlimited(old, "stats"), _unlimited(new, "stats")):
        changed.append("stats")
    rekeyed = old_secrets is not None and new_secrets is not None and old_secrets != new_secrets
    if _on(old, new, "framed") and (old.keys != new.keys or rekeyed):
        changed.append("keys")
    if old.log != new.log:
        changed.append("log")
    for f in fields(old.daemon):
        if getattr(old.daemon, f.name) != getattr(new.daemon, f.name):
            changed.append(f"daemon.{f.name}" + (NEXT_START if f.name in AT_NEXT_START else ""))
    # The control socket and the metrics port are bound once, at the start
    # (as the privileged, pre-drop part of it): a change waits for a restart.
    for section in ("control", "metrics"):
        if getattr(old, section) != getattr(new, section):
            changed.append(section + NEXT_START)
    if old.include != new.include:
        changed.append("include")
    return changed


def log_settings(config: Config, overrides: Overrides) -> tuple[str, str, str]:
    """`log.configure`'s level, format and file for `config`."""
    level = overrides.get("level") or config.log.level
    fmt = overrides.get("format") or config.log.format
    return level, fmt, config.log.file


def _differs(old: ServiceConfig | None, new: ServiceConfig) -> bool:
    """A service whose settings differ and that is on before or after."""
    if old is None:
        return new.enabled
    return old != new and (old.enabled or new.enabled)


def _unlimited(config: Config, name: str) -> ServiceConfig:
    """A framed-only service without its limits: it has no listener, so
    `[limits]` does not apply to it (the framed port's limits do)."""
    return replace(config.services[name], limits=NO_LIMITS)


def _on(old: Config, new: Config, name: str) -> bool:
    return old.services[name].enabled or new.services[name].enabled
