"""Validation: a TOML document in, one frozen `Config` out, or every mistake.

`build` walks the document against the tables of config/schema.py, appending
every problem to one list as "KEY.PATH: message" and carrying on, so an
operator sees all mistakes at once.  Only when the list is empty does it
build the objects; otherwise it raises one `ConfigError`.  The kinds below
turn raw TOML values into Python values ("int", addresses, CIDRs, ...).
"""

from __future__ import annotations

import ipaddress
import math
import types
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from evd.config import addresses
from evd.config.addresses import Address
from evd.config.model import (
    ALL_COMMANDS,
    DEFAULT_KEY,
    EMBEDDED_SOURCE,
    SERVICE_NAMES,
    CommandSpec,
    Config,
    ConfigError,
    ControlConfig,
    DaemonConfig,
    KeySpec,
    Limits,
    LogConfig,
    MetricsConfig,
    ServiceConfig,
)
from evd.config.schema import (
    COMMAND,
    CONTROL,
    DAEMON,
    DEFAULT_COMMANDS,
    DEFAULT_LISTENERS,
    FRAMED_DEFAULTS,
    KEY,
    LIMITS,
    LOG,
    METRICS,
    NAME,
    OFF_BY_DEFAULT,
    PROGRAM,
    PROGRAM_DEFAULTS,
    PROGRAM_KEY,
    REQUIRED_WHY,
    SECTIONS,
    SERVICE_KEYS,
    Schema,
    Value,
    abs_paths,
)

# -- kinds: raw TOML value -> Python value ---------------------------------------

_TOML_TYPES = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", dict: "table"}
_EXPECTED = {"bool": "a boolean", "int": "an integer", "float": "a number", "str": "a string"}
_ADDRESS_KINDS = ("tcp", "udp", "unix", "tls")


def type_name(raw: object) -> str:
    return _TOML_TYPES.get(type(raw), type(raw).__name__)


def _scalar(kind: str, raw: object) -> Value:
    """The value, or raise ValueError("expected ..."); bool is never a number."""
    if kind == "bool":
        ok = isinstance(raw, bool)
    elif kind == "str":
        ok = isinstance(raw, str)
    else:  # an integer is a fine float; a boolean is neither
        ok = isinstance(raw, int | float if kind == "float" else int) and not isinstance(raw, bool)
    if not ok:
        raise ValueError(f"expected {_EXPECTED[kind]}, got {type_name(raw)}")
    if kind == "float":
        assert isinstance(raw, int | float)
        if not math.isfinite(raw):
            raise ValueError("must be a finite number")
        return float(raw)
    if isinstance(raw, str) and "\0" in raw:
        raise ValueError("must not contain a NUL character")
    return raw


def _item(kind: str, raw: str) -> Value:
    if kind == "nets":
        try:
            return ipaddress.ip_network(raw, strict=True)
        except ValueError as exc:
            raise ValueError(f'bad CIDR "{raw}": {exc}') from None
    if kind in _ADDRESS_KINDS:
        try:
            return addresses.parse(kind, raw)
        except ValueError as exc:
            raise ValueError(f'bad address "{raw}": {exc}') from None
    return raw


def _env_table(raw: object, path: str, errors: list[str]) -> Value | None:
    """A table of strings -> ((name, value), ...), in the file's order."""
    if not isinstance(raw, dict):
        errors.append(f"{path}: expected a table of strings, got {type_name(raw)}")
        return None
    items, before = [], len(errors)
    for name, element in raw.items():
        try:
            items.append((name, _scalar("str", element)))
        except ValueError as exc:
            errors.append(f"{path}.{name}: {exc}")
    return tuple(items) if len(errors) == before else None


def convert(kind: str, raw: object, path: str, errors: list[str]) -> Value | None:
    """The converted value, or None after recording every error under `path`."""
    if kind == "env":
        return _env_table(raw, path, errors)
    if kind in _EXPECTED:
        try:
            return _scalar(kind, raw)
        except ValueError as exc:
            errors.append(f"{path}: {exc}")
            return None
    if not isinstance(raw, list):
        errors.append(f"{path}: expected an array of strings, got {type_name(raw)}")
        return None
    items, before = [], len(errors)
    for i, element in enumerate(raw):
        try:
            items.append(_item(kind, _scalar("str", element)))
        except ValueError as exc:
            errors.append(f"{path}[{i}]: {exc}")
    return tuple(items) if len(errors) == before else None


def table(raw: object, path: str, errors: list[str]) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        errors.append(f"{path}: expected a table, got {type_name(raw)}")
        return {}
    return raw


def take(raw: Mapping[str, object], schema: Schema, path: str, errors: list[str]) -> dict[str, Value]:
    """Validate a table against a schema; the valid keys, converted."""
    values = {}
    for key, value in raw.items():
        if key not in schema:
            errors.append(f"{path}.{key}: unknown key")
            continue
        kind, check = schema[key]
        converted = convert(kind, value, f"{path}.{key}", errors)
        problem = check(converted) if converted is not None and check else None
        if problem:
            errors.append(f"{path}.{key}: {problem}")
        elif converted is not None:
            values[key] = converted
    return values


# -- the validator ---------------------------------------------------------------


def check_water(limits: Limits, path: str, errors: list[str]) -> None:
    if limits.write_low >= limits.write_high:
        errors.append(f"{path}.write_low: must be less than write_high ({limits.write_high})")


def _misplaced(name: str, raw: Mapping[str, object]) -> dict[str, str]:
    """Keys that deserve a better message than "unknown key": key -> message."""
    if name == "framed" and "udp" in raw:
        return {"udp": "framed is TCP/UNIX only"}
    if name not in SERVICE_NAMES and "udp" in raw:
        return {"udp": "a program service is stream-only (tcp, unix, tls): a program's stdin is a connection"}
    if name in ("command", "stats"):
        return {
            key: f"{name} has no listeners of its own; it is reached through services.framed"
            for key in ("tcp", "udp", "unix", "tls")
            if key in raw
        }
    return {}


def _check_tls(svc: ServiceConfig, path: str, errors: list[str]) -> None:
    """`tls` needs a certificate and key; the other way round is harmless
    (a service switched to plain TCP may keep its certificate lines)."""
    if not svc.tls:
        return
    for key in ("tls_cert", "tls_key"):
        if not getattr(svc, key):
            errors.append(f"{path}.{key}: required when tls is not empty")


def _check_proxy(svc: ServiceConfig, path: str, errors: list[str]) -> None:
    """The PROXY protocol needs someone to trust and a connection to read
    the header from (a datagram has no stream to begin)."""
    if not svc.proxy_protocol:
        return
    if not svc.proxy_from:
        errors.append(
            f"{path}.proxy_from: required when proxy_protocol is true (the CIDRs of the trusted proxies)"
        )
    if svc.udp and not svc.streams:
        errors.append(
            f"{path}.proxy_protocol: {svc.name} has only UDP listeners (PROXY is for tcp, unix, tls)"
        )


def _service(name: str, raw: object, limits: Limits, errors: list[str]) -> ServiceConfig:
    path = f"services.{name}"
    raw = table(raw, path, errors)
    misplaced = _misplaced(name, raw)
    errors.extend(f"{path}.{key}: {message}" for key, message in misplaced.items())
    raw = {k: v for k, v in raw.items() if k not in misplaced}
    program = name not in SERVICE_NAMES
    values = take(raw, PROGRAM if program else SERVICE_KEYS[name], path, errors)
    overrides = {k: values.pop(k) for k in LIMITS if k in values}
    effective = replace(limits, **overrides)
    if {"write_low", "write_high"} & overrides.keys():
        check_water(effective, path, errors)
    defaults: dict[str, Value] = {
        proto: tuple(addresses.parse(proto, a) for a in listed)
        for proto, listed in DEFAULT_LISTENERS.get(name, {}).items()
    }
    if name == "framed":
        defaults |= FRAMED_DEFAULTS
    if program:
        defaults |= PROGRAM_DEFAULTS
    enabled = values.pop("enabled", name not in OFF_BY_DEFAULT)
    svc = ServiceConfig(name=name, enabled=enabled, limits=effective, **(defaults | values))
    _check_tls(svc, path, errors)
    _check_proxy(svc, path, errors)
    return svc


def _services(raw: object, limits: Limits, errors: list[str]) -> dict[str, ServiceConfig]:
    raw = table(raw, "services", errors)
    programs = []
    for name, entry in raw.items():
        if name in SERVICE_NAMES:
            continue
        if not isinstance(entry, dict) or PROGRAM_KEY not in entry:
            errors.append(
                f"services.{name}: unknown service (known: {', '.join(SERVICE_NAMES)}; "
                f'a program service needs {PROGRAM_KEY} = ["/path/to/program", ...])'
            )
        elif not NAME.fullmatch(name):
            errors.append(f"services.{name}: bad service name (letters, digits, '.', '_', '-'; at most 64)")
        else:
            programs.append(name)
    names = [*SERVICE_NAMES, *programs]
    return {name: _service(name, raw.get(name), limits, errors) for name in names}


def _named_tables(
    raw: object, section: str, what: str, schema: Schema, required: tuple[str, ...], errors: list[str]
) -> dict[str, dict[str, Value]]:
    """[SECTION.NAME] tables ([commands.X], [keys.X]): name -> valid values."""
    entries = {}
    for name, entry in table(raw, section, errors).items():
        path = f"{section}.{name}"
        if not NAME.fullmatch(name):
            errors.append(f"{path}: bad {what} name (letters, digits, '.', '_', '-'; at most 64)")
            continue
        if not isinstance(entry, dict):
            errors.append(f"{path}: expected a table, got {type_name(entry)}")
            continue
        before = len(errors)
        values = take(entry, schema, path, errors)
        for key in required:
            if key not in entry:
                errors.append(f"{path}.{key}: missing{REQUIRED_WHY.get(key, '')}")
        if len(errors) == before:
            entries[name] = values
    return entries


def _commands(raw: object, errors: list[str]) -> dict[str, CommandSpec]:
    """No [commands] table means the defaults; a table means exactly its entries."""
    tables = _named_tables(
        DEFAULT_COMMANDS if raw is None else raw, "commands", "command", COMMAND, ("argv",), errors
    )
    return {name: CommandSpec(name=name, **values) for name, values in tables.items()}


def _keys(
    raw: object, commands: Mapping[str, CommandSpec], key_file: str, errors: list[str]
) -> dict[str, KeySpec]:
    keys = {}
    for name, values in _named_tables(raw, "keys", "key", KEY, (), errors).items():
        spec = KeySpec(name=name, **values)
        path = f"keys.{name}"
        if not spec.file and not spec.client_cn:
            errors.append(f"{path}: needs a file (an HMAC secret), a client_cn, or both")
        for command in spec.commands:
            if command != ALL_COMMANDS and command not in commands:
                errors.append(f'{path}.commands: "{command}" is not in the [commands] allow-list')
        keys[name] = spec
    if key_file and DEFAULT_KEY in keys:
        errors.append(f"keys.{DEFAULT_KEY}: the name is taken by services.framed.key_file")
    cns = [k.client_cn for k in keys.values() if k.client_cn]
    for cn in {cn for cn in cns if cns.count(cn) > 1}:
        errors.append(f'keys: client_cn "{cn}" is given to more than one key')
    return keys


def overlap(a: Address, b: Address) -> bool:
    """Would binding both fail?  "*" and "::" cover everything (Linux binds
    IPv6 wildcards dual-stack), "0.0.0.0" every IPv4 address; port 0 never
    conflicts because the kernel picks a fresh port each time."""
    if a.port_space != b.port_space:
        return False
    if a.proto == "unix":
        return a.host == b.host
    if a.port != b.port or a.port == 0:
        return False
    hosts = {a.host, b.host}
    if len(hosts) == 1 or hosts & {"*", "::"}:
        return True
    return "0.0.0.0" in hosts and not any(":" in h for h in hosts)


def _check_listeners(
    services: Mapping[str, ServiceConfig], control: ControlConfig, metrics: MetricsConfig, errors: list[str]
) -> None:
    """An address may be bound once: among the enabled services (disabled
    ones bind nothing), the control socket and the metrics port."""
    wanted: list[tuple[str, Address]] = []
    for svc in services.values():
        if svc.enabled and svc.listens:
            for proto in _ADDRESS_KINDS:
                listed = getattr(svc, proto)
                wanted += [(f"services.{svc.name}.{proto}[{i}]", a) for i, a in enumerate(listed)]
    if control.unix:
        wanted.append(("control.unix", Address("unix", control.unix, 0)))
    wanted += [(f"metrics.tcp[{i}]", a) for i, a in enumerate(metrics.tcp)]
    seen: list[tuple[str, Address]] = []
    for key, address in wanted:
        for other_key, other in seen:
            if overlap(address, other):
                same = (address.host, address.port) == (other.host, other.port)
                clash = "is already used by" if same else f"overlaps {other} of"
                errors.append(f"{key}: {address.port_space} {address} {clash} {other_key}")
                break
        seen.append((key, address))


def build(data: Mapping[str, object], source: str = EMBEDDED_SOURCE) -> Config:
    """Validate a parsed TOML document into a Config, or raise ConfigError
    listing every problem."""
    errors: list[str] = [f"{key}: unknown section" for key in data if key not in SECTIONS]

    def section(name: str, schema: Schema) -> dict[str, Value]:
        return take(table(data.get(name), name, errors), schema, name, errors)

    include: tuple[str, ...] = ()
    if "include" in data:
        value = convert("strs", data["include"], "include", errors)
        problem = abs_paths(value) if value is not None else None
        if problem:
            errors.append(f"include: {problem}")
        elif value is not None:
            include = value
    daemon = DaemonConfig(**section("daemon", DAEMON))
    log = LogConfig(**section("log", LOG))
    control = ControlConfig(**section("control", CONTROL))
    metrics = MetricsConfig(**section("metrics", METRICS))
    limits = Limits(**section("limits", LIMITS))
    check_water(limits, "limits", errors)
    services = _services(data.get("services"), limits, errors)
    commands = _commands(data.get("commands"), errors)
    keys = _keys(data.get("keys"), commands, services["framed"].key_file, errors)
    _check_listeners(services, control, metrics, errors)
    if errors:
        raise ConfigError(errors)
    return Config(
        daemon,
        log,
        limits,
        services=_frozen(services),
        commands=_frozen(commands),
        source=source,
        control=control,
        metrics=metrics,
        keys=_frozen(keys),
        include=include,
    )


def _frozen(mapping: dict[str, Any]) -> Mapping[str, Any]:
    return types.MappingProxyType(mapping)
