"""The effective configuration written back as TOML (`evd check-config`).

`dump` walks the schema tables of config/schema.py, so every key the
validator accepts is written, defaults spelled out, and
`parse(dump(c))` equals `c` (except `.source`).  With the origins of a
load (`check-config --origin`), each key line ends in a comment naming the
file that set it, `# from FILE`, or `# default`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

from evd.config import schema
from evd.config.dropins import Origins
from evd.config.model import CommandSpec, Config, ServiceConfig


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


def value(v: object) -> str:
    """One value as TOML."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)  # repr(float) always has "." or an exponent: valid TOML
    if isinstance(v, tuple):
        return "[" + ", ".join(value(item) for item in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{key(k)} = {value(item)}" for k, item in v.items()) + "}"
    return _toml_str(str(v))  # strings, Address, networks


def key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _toml_str(k)


def _origin(origins: Origins | None, path: str) -> str:
    if origins is None:
        return ""
    file = origins.of(path)
    return f"  # from {file}" if file is not None else "  # default"


def _section(header: str, items: Mapping[str, object], origins: Origins | None = None, path: str = "") -> str:
    """`[header]` and its keys; `path` is the table's dotted path as the
    origins know it, unquoted (default: the header)."""
    path = path or header
    lines = [f"[{header}]"] + [
        f"{key(k)} = {value(v)}{_origin(origins, f'{path}.{k}')}" for k, v in items.items()
    ]
    return "\n".join(lines) + "\n"


def _fields(obj: Any) -> dict[str, object]:
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


def service_items(svc: ServiceConfig) -> dict[str, object]:
    """A service's keys in schema order, limits included (in force for it)."""
    keys = schema.SERVICE_KEYS.get(svc.name, schema.PROGRAM)
    items = {k: getattr(svc.limits if k in schema.LIMITS else svc, k) for k in keys}
    if "env" in items:  # pairs, written as an inline table
        items["env"] = dict(svc.env)
    return items


def command_items(spec: CommandSpec) -> dict[str, object]:
    """A command's keys in schema order; those left to [services.command]
    (None) are not written, so they still fall back when read again."""
    items = {k: getattr(spec, k) for k in schema.COMMAND}
    items["env"] = dict(spec.env)
    return {k: v for k, v in items.items() if v is not None}


def dump(config: Config, origins: Origins | None = None, files: Sequence[str] = ()) -> str:
    """The effective configuration as TOML: every key, defaults spelled
    out; with `origins`, each key's file as a comment, after a header
    listing the files read."""
    parts = []
    if origins is not None:
        read = [config.source] + list(files)
        parts.append("".join(f"# read: {f}\n" for f in read))
    parts.append(f"include = {value(config.include)}{_origin(origins, 'include')}\n")
    parts += [
        _section(name, _fields(obj), origins)
        for name, obj in (
            ("daemon", config.daemon),
            ("log", config.log),
            ("control", config.control),
            ("metrics", config.metrics),
            ("limits", config.limits),
        )
    ]
    parts += [_section(f"services.{s.name}", service_items(s), origins) for s in config.services.values()]
    parts += [
        _section(f"commands.{key(c.name)}", command_items(c), origins, f"commands.{c.name}")
        for c in config.commands.values()
    ]
    if not config.commands:
        parts.append("[commands]  # empty: no command may run\n")
    parts += [
        _section(
            f"keys.{key(k.name)}",
            {"file": k.file, "client_cn": k.client_cn, "commands": k.commands},
            origins,
            f"keys.{k.name}",
        )
        for k in config.keys.values()
    ]
    return "\n".join(parts)
