"""The configuration: TOML text in, one frozen `Config` out, and back to TOML.

The shape is three layers, each a plain table or a small function:

1. **Schema tables** (`_DAEMON`, `_LOG`, `_LIMITS`, `_SERVICE_KEYS`, `_COMMAND`)
   map every accepted key to `(kind, check)`.  A *kind* says how a raw TOML
   value becomes a Python value ("int", "tcp" addresses, "nets" CIDRs, ...);
   a *check* is an optional function returning an error message or None.
   Defaults live on the dataclasses below and in `_DEFAULT_LISTENERS`.
2. **The validator** (`parse`) walks the TOML document against those tables,
   appending every problem to one list as "KEY.PATH: message" and carrying on,
   so an operator sees all mistakes at once.  Only when the list is empty does
   it build the objects; otherwise it raises one `ConfigError`.
3. **Frozen objects** (`Config` and friends) that the rest of evd reads and
   never changes; a reload builds a new one and compares.

`dump` walks the same schema tables, so every key `parse` accepts is written
back and `parse(dump(c))` equals `c` (except `.source`).

Every path in the file must be absolute: `evd start` changes directory to /.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from importlib import resources

SERVICE_NAMES = ("echo", "discard", "chargen", "daytime", "time", "timefmt", "framed", "command", "stats")
RAW_SERVICES = SERVICE_NAMES[:6]
DISPATCHABLE = ("echo", "time", "command", "stats")  # what the framed port can reach
EMBEDDED_SOURCE = "<embedded>"
DEFAULT_PATH = "/etc/evd/evd.toml"
DEFAULT_ARG_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
_COMMAND_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")  # safe in a log line and a TOML key
_UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """Every problem found, each "KEY.PATH: message"."""

    def __init__(self, errors: list[str] | str):
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("\n".join(self.errors))


@dataclass(frozen=True, slots=True)
class Address:
    proto: str  # "tcp" | "udp" | "unix"
    host: str  # IP literal without brackets, "*" for all IPv4+IPv6, or the unix path
    port: int  # 0 for unix

    def __str__(self) -> str:
        if self.proto == "unix":
            return self.host
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Limits:
    max_connections: int = 1024
    per_source: int = 64
    rate: float = 200.0
    burst: int = 400
    idle_timeout: float = 300.0
    max_header: int = 65536
    max_body: int = 1048576
    write_high: int = 262144
    write_low: int = 65536


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    name: str
    enabled: bool
    tcp: tuple[Address, ...] = ()
    udp: tuple[Address, ...] = ()
    unix: tuple[Address, ...] = ()
    only_from: tuple[Network, ...] = ()
    no_access: tuple[Network, ...] = ()
    limits: Limits = Limits()  # [limits] overridden by keys set in this service's table
    dispatch: tuple[str, ...] = ()  # framed only
    key_file: str = ""  # framed only
    auth_required: tuple[str, ...] = ()  # framed only
    timeout: float = 10.0  # command only
    max_output: int = 1048576  # command only
    max_concurrent: int = 8  # command only

    @property
    def addresses(self) -> tuple[Address, ...]:
        return self.tcp + self.udp + self.unix


@dataclass(frozen=True, slots=True)
class CommandSpec:
    name: str
    argv: tuple[str, ...]
    args: bool = False
    arg_pattern: str = DEFAULT_ARG_PATTERN


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    pidfile: str = "/run/evd/evd.pid"
    user: str = ""
    group: str = ""
    shutdown_timeout: float = 10.0
    workers: int = 1


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    format: str = "json"
    file: str = ""


@dataclass(frozen=True, slots=True)
class Config:
    daemon: DaemonConfig
    log: LogConfig
    limits: Limits
    services: Mapping[str, ServiceConfig]  # every name of SERVICE_NAMES, in that order
    commands: Mapping[str, CommandSpec]
    source: str  # the path read, or EMBEDDED_SOURCE

    def enabled_services(self) -> list[ServiceConfig]:
        return [s for s in self.services.values() if s.enabled]


# -- checks: value -> error message or None ------------------------------------

Check = Callable[[object], "str | None"]


def _at_least(low) -> Check:
    return lambda v: None if v >= low else f"must be at least {low}"


def _one_of(*choices: str) -> Check:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}"


def _abs_path(v: str) -> str | None:
    return None if os.path.isabs(v) else "must be an absolute path"


def _abs_path_or_empty(v: str) -> str | None:
    return None if v == "" else _abs_path(v)


def _service_list(v: tuple[str, ...]) -> str | None:
    for name in v:
        if name not in DISPATCHABLE:
            return f'"{name}" cannot be dispatched (choose from {", ".join(DISPATCHABLE)})'
    if len(set(v)) != len(v):
        return "lists a service twice"
    return None


def _argv(v: tuple[str, ...]) -> str | None:
    return None if v and all(v) else "must be a non-empty array of non-empty strings"


def _regex(v: str) -> str | None:
    try:
        re.compile(v)
    except re.error as exc:
        return f"bad regular expression: {exc}"
    return None


# -- schema tables: key -> (kind, check) ---------------------------------------

_DAEMON = {
    "pidfile": ("str", _abs_path),
    "user": ("str", None),
    "group": ("str", None),
    "shutdown_timeout": ("float", _at_least(0)),
    "workers": ("int", _at_least(1)),
}
_LOG = {
    "level": ("str", _one_of("debug", "info", "warning", "error")),
    "format": ("str", _one_of("json", "console")),
    "file": ("str", _abs_path_or_empty),
}
_LIMITS = {
    "max_connections": ("int", _at_least(1)),
    "per_source": ("int", _at_least(1)),
    "rate": ("float", _at_least(0)),
    "burst": ("int", _at_least(1)),
    "idle_timeout": ("float", _at_least(0)),
    "max_header": ("int", _at_least(2)),
    "max_body": ("int", _at_least(0)),
    "write_high": ("int", _at_least(1)),
    "write_low": ("int", _at_least(0)),
}
_ACCESS = {"only_from": ("nets", None), "no_access": ("nets", None)}
_ENABLED = {"enabled": ("bool", None)}
_RAW = {**_ENABLED, "tcp": ("tcp", None), "udp": ("udp", None), "unix": ("unix", None), **_ACCESS, **_LIMITS}
_SERVICE_KEYS = {name: _RAW for name in RAW_SERVICES} | {
    "framed": {
        **_ENABLED,
        "tcp": ("tcp", None),
        "unix": ("unix", None),
        **_ACCESS,
        "dispatch": ("strs", _service_list),
        "key_file": ("str", _abs_path_or_empty),
        "auth_required": ("strs", _service_list),
        **_LIMITS,
    },
    "command": {
        **_ENABLED,
        "timeout": ("float", _at_least(0)),
        "max_output": ("int", _at_least(0)),
        "max_concurrent": ("int", _at_least(1)),
    },
    "stats": _ENABLED,
}
_COMMAND = {"argv": ("strs", _argv), "args": ("bool", None), "arg_pattern": ("str", _regex)}

# Defaults that are not a single dataclass default: they differ per service.
_OFF_BY_DEFAULT = ("discard", "chargen")  # chargen over UDP is an amplifier; discard is rarely wanted
_DEFAULT_LISTENERS = {
    "echo": {"tcp": ["127.0.0.1:7007"], "udp": ["127.0.0.1:7007"]},
    "discard": {"tcp": ["127.0.0.1:7009"], "udp": ["127.0.0.1:7009"]},
    "chargen": {"tcp": ["127.0.0.1:7019"], "udp": ["127.0.0.1:7019"]},
    "daytime": {"tcp": ["127.0.0.1:7013"], "udp": ["127.0.0.1:7013"]},
    "time": {"tcp": ["127.0.0.1:7037"], "udp": ["127.0.0.1:7037"]},
    "timefmt": {"udp": ["127.0.0.1:7038"]},
    "framed": {"tcp": ["127.0.0.1:7070"]},
}
_FRAMED_DEFAULTS = {"dispatch": DISPATCHABLE, "auth_required": ("command",)}
_DEFAULT_COMMANDS = {"uptime": {"argv": ["uptime"]}, "greet": {"argv": ["echo", "hello"], "args": True}}
_SECTIONS = ("daemon", "log", "limits", "services", "commands")


# -- kinds: raw TOML value -> Python value ---------------------------------------

_TOML_TYPES = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", dict: "table"}
_EXPECTED = {"bool": "a boolean", "int": "an integer", "float": "a number", "str": "a string"}


def _type_name(raw) -> str:
    return _TOML_TYPES.get(type(raw), type(raw).__name__)


def _scalar(kind: str, raw):
    """The value, or raise ValueError("expected ..."); bool is never a number."""
    if kind == "bool":
        ok = isinstance(raw, bool)
    elif kind == "str":
        ok = isinstance(raw, str)
    else:  # an integer is a fine float; a boolean is neither
        ok = isinstance(raw, int | float if kind == "float" else int) and not isinstance(raw, bool)
    if not ok:
        raise ValueError(f"expected {_EXPECTED[kind]}, got {_type_name(raw)}")
    if kind == "float":
        if not math.isfinite(raw):
            raise ValueError("must be a finite number")
        return float(raw)
    return raw


def parse_address(proto: str, text: str) -> Address:
    """One "HOST:PORT" / "[V6]:PORT" / "*:PORT" / unix path, or ValueError."""
    if proto == "unix":
        if not os.path.isabs(text):
            raise ValueError("must be an absolute path")
        if len(os.fsencode(text)) > _UNIX_PATH_MAX:
            raise ValueError(f"longer than {_UNIX_PATH_MAX} bytes, the UNIX socket limit")
        return Address("unix", text, 0)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not port.isascii() or int(port) > 65535:
        raise ValueError("expected HOST:PORT with PORT an integer 0..65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            return Address(proto, str(ipaddress.IPv6Address(host[1:-1])), int(port))
        except ValueError:
            raise ValueError(f"{host} is not an IPv6 literal") from None
    if host == "*":
        return Address(proto, "*", int(port))
    if ":" in host:
        raise ValueError("an IPv6 host needs brackets: [ADDR]:PORT")
    try:
        return Address(proto, str(ipaddress.IPv4Address(host)), int(port))
    except ValueError:
        raise ValueError("host must be an IP literal or * (no hostnames)") from None


def _item(kind: str, raw: str):
    if kind == "nets":
        try:
            return ipaddress.ip_network(raw, strict=True)
        except ValueError as exc:
            raise ValueError(f'bad CIDR "{raw}": {exc}') from None
    if kind in ("tcp", "udp", "unix"):
        try:
            return parse_address(kind, raw)
        except ValueError as exc:
            raise ValueError(f'bad address "{raw}": {exc}') from None
    return raw


def _convert(kind: str, raw, path: str, errors: list[str]):
    """The converted value, or None after recording every error under `path`."""
    if kind in _EXPECTED:
        try:
            return _scalar(kind, raw)
        except ValueError as exc:
            errors.append(f"{path}: {exc}")
            return None
    if not isinstance(raw, list):
        errors.append(f"{path}: expected an array of strings, got {_type_name(raw)}")
        return None
    items, before = [], len(errors)
    for i, element in enumerate(raw):
        try:
            items.append(_item(kind, _scalar("str", element)))
        except ValueError as exc:
            errors.append(f"{path}[{i}]: {exc}")
    return tuple(items) if len(errors) == before else None


def _table(raw, path: str, errors: list[str]) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        errors.append(f"{path}: expected a table, got {_type_name(raw)}")
        return {}
    return raw


def _take(raw: dict, schema: dict, path: str, errors: list[str]) -> dict:
    """Validate a table against a schema; the valid keys, converted."""
    values = {}
    for key, value in raw.items():
        if key not in schema:
            errors.append(f"{path}.{key}: unknown key")
            continue
        kind, check = schema[key]
        value = _convert(kind, value, f"{path}.{key}", errors)
        problem = check(value) if value is not None and check else None
        if problem:
            errors.append(f"{path}.{key}: {problem}")
        elif value is not None:
            values[key] = value
    return values


# -- the validator ---------------------------------------------------------------


def _check_water(limits: Limits, path: str, errors: list[str]) -> None:
    if limits.write_low >= limits.write_high:
        errors.append(f"{path}.write_low: must be less than write_high ({limits.write_high})")


def _misplaced(name: str, raw: dict) -> dict[str, str]:
    """Keys that deserve a better message than "unknown key": key -> message."""
    if name == "framed" and "udp" in raw:
        return {"udp": "framed is TCP/UNIX only"}
    if name in ("command", "stats"):
        return {
            key: f"{name} has no listeners of its own; it is reached through services.framed"
            for key in ("tcp", "udp", "unix")
            if key in raw
        }
    return {}


def _service(name: str, raw, limits: Limits, errors: list[str]) -> ServiceConfig:
    path = f"services.{name}"
    raw = _table(raw, path, errors)
    misplaced = _misplaced(name, raw)
    errors.extend(f"{path}.{key}: {message}" for key, message in misplaced.items())
    raw = {k: v for k, v in raw.items() if k not in misplaced}
    values = _take(raw, _SERVICE_KEYS[name], path, errors)
    overrides = {k: values.pop(k) for k in _LIMITS if k in values}
    effective = replace(limits, **overrides)
    if {"write_low", "write_high"} & overrides.keys():
        _check_water(effective, path, errors)
    defaults = {
        proto: tuple(parse_address(proto, a) for a in addresses)
        for proto, addresses in _DEFAULT_LISTENERS.get(name, {}).items()
    }
    if name == "framed":
        defaults |= _FRAMED_DEFAULTS
    enabled = values.pop("enabled", name not in _OFF_BY_DEFAULT)
    return ServiceConfig(name=name, enabled=enabled, limits=effective, **(defaults | values))


def _services(raw, limits: Limits, errors: list[str]) -> dict[str, ServiceConfig]:
    raw = _table(raw, "services", errors)
    for name in raw:
        if name not in SERVICE_NAMES:
            errors.append(f"services.{name}: unknown service (known: {', '.join(SERVICE_NAMES)})")
    return {name: _service(name, raw.get(name), limits, errors) for name in SERVICE_NAMES}


def _commands(raw, errors: list[str]) -> dict[str, CommandSpec]:
    """No [commands] table means the defaults; a table means exactly its entries."""
    if raw is None:
        raw = _DEFAULT_COMMANDS
    commands = {}
    for name, entry in _table(raw, "commands", errors).items():
        path = f"commands.{name}"
        if not _COMMAND_NAME.fullmatch(name):
            errors.append(f"{path}: bad command name (letters, digits, '.', '_', '-'; at most 64)")
            continue
        if not isinstance(entry, dict):
            errors.append(f"{path}: expected a table, got {_type_name(entry)}")
            continue
        values = _take(entry, _COMMAND, path, errors)
        if "argv" not in entry:
            errors.append(f"{path}.argv: missing (the program and its fixed arguments)")
        if "argv" in values:
            commands[name] = CommandSpec(name=name, **values)
    return commands


def _overlap(a: Address, b: Address) -> bool:
    """Would binding both fail?  "*" and "::" cover everything (Linux binds
    IPv6 wildcards dual-stack), "0.0.0.0" every IPv4 address; port 0 never
    conflicts because the kernel picks a fresh port each time."""
    if a.proto != b.proto:
        return False
    if a.proto == "unix":
        return a.host == b.host
    if a.port != b.port or a.port == 0:
        return False
    hosts = {a.host, b.host}
    if len(hosts) == 1 or hosts & {"*", "::"}:
        return True
    return "0.0.0.0" in hosts and not any(":" in h for h in hosts)


def _check_listeners(services: dict[str, ServiceConfig], errors: list[str]) -> None:
    """A listener may appear once among the enabled services (disabled ones bind nothing)."""
    seen: list[tuple[str, Address]] = []
    for svc in services.values():
        if not svc.enabled:
            continue
        for proto in ("tcp", "udp", "unix"):
            for i, address in enumerate(getattr(svc, proto)):
                key = f"services.{svc.name}.{proto}[{i}]"
                for other_key, other in seen:
                    if _overlap(address, other):
                        clash = "is already used by" if address == other else f"overlaps {other} of"
                        errors.append(f"{key}: {proto} {address} {clash} {other_key}")
                        break
                seen.append((key, address))


def _check_key_file(framed: ServiceConfig, errors: list[str]) -> None:
    if not framed.enabled or not framed.key_file:
        return
    try:
        mode = os.stat(framed.key_file).st_mode
    except OSError as exc:
        errors.append(
            f"services.framed.key_file: {framed.key_file}: cannot read: [Errno {exc.errno}] {exc.strerror}"
        )
        return
    if mode & 0o077:
        errors.append(
            f"services.framed.key_file: {framed.key_file} is accessible by group/others "
            f"(mode {mode & 0o777:04o}); chmod 600 it"
        )


def parse(text: str, source: str = EMBEDDED_SOURCE) -> Config:
    """Validate TOML text into a Config, or raise ConfigError listing every problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: TOML syntax error: {exc}"]) from None
    errors: list[str] = [f"{key}: unknown section" for key in data if key not in _SECTIONS]
    daemon = DaemonConfig(**_take(_table(data.get("daemon"), "daemon", errors), _DAEMON, "daemon", errors))
    log = LogConfig(**_take(_table(data.get("log"), "log", errors), _LOG, "log", errors))
    limits = Limits(**_take(_table(data.get("limits"), "limits", errors), _LIMITS, "limits", errors))
    _check_water(limits, "limits", errors)
    services = _services(data.get("services"), limits, errors)
    commands = _commands(data.get("commands"), errors)
    _check_listeners(services, errors)
    _check_key_file(services["framed"], errors)
    if errors:
        raise ConfigError(errors)
    return Config(
        daemon, log, limits, types.MappingProxyType(services), types.MappingProxyType(commands), source
    )


# -- finding and reading the file ------------------------------------------------


def embedded_text() -> str:
    return resources.files("evd").joinpath("default.toml").read_text(encoding="utf-8")


def resolve_path(path: str | None) -> str | None:
    """-c PATH, else $EVD_CONFIG, else DEFAULT_PATH if it exists, else None (embedded)."""
    if path is not None:
        return path
    if os.environ.get("EVD_CONFIG"):
        return os.environ["EVD_CONFIG"]
    return DEFAULT_PATH if os.path.exists(DEFAULT_PATH) else None


def load(path: str | None = None) -> Config:
    resolved = resolve_path(path)
    if resolved is None:
        return parse(embedded_text(), EMBEDDED_SOURCE)
    try:
        with open(resolved, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError([f"{resolved}: cannot read: [Errno {exc.errno}] {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{resolved}: not UTF-8: {exc}"]) from None
    return parse(text, resolved)


# -- writing TOML ----------------------------------------------------------------


def _toml_str(s: str) -> str:
    """A basic string when nothing needs escaping, a literal one for
    backslashes (regexes stay readable), else an escaped basic one."""
    plain = not any(c < " " or c == "\x7f" for c in s)
    if plain and '"' not in s and "\\" not in s:
        return f'"{s}"'
    if plain and "'" not in s:
        return f"'{s}'"
    escaped = "".join(
        f"\\{c}" if c in '"\\' else f"\\u{ord(c):04x}" if c < " " or c == "\x7f" else c for c in s
    )
    return f'"{escaped}"'


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)  # repr(float) always has "." or an exponent: valid TOML
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return _toml_str(str(value))  # strings, Address, networks


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_str(key)


def _section(header: str, items: dict) -> str:
    lines = [f"[{header}]"] + [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in items.items()]
    return "\n".join(lines) + "\n"


def _service_items(svc: ServiceConfig) -> dict:
    return {key: getattr(svc.limits if key in _LIMITS else svc, key) for key in _SERVICE_KEYS[svc.name]}


def dump(config: Config) -> str:
    """The effective configuration as TOML: every key, defaults spelled out."""
    parts = [
        _section(name, {f.name: getattr(obj, f.name) for f in fields(obj)})
        for name, obj in (("daemon", config.daemon), ("log", config.log), ("limits", config.limits))
    ]
    parts += [_section(f"services.{s.name}", _service_items(s)) for s in config.services.values()]
    parts += [
        _section(
            f"commands.{_toml_key(c.name)}", {"argv": c.argv, "args": c.args, "arg_pattern": c.arg_pattern}
        )
        for c in config.commands.values()
    ]
    if not config.commands:
        parts.append("[commands]  # empty: no command may run\n")
    return "\n".join(parts)
