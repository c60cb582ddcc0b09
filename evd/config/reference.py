"""The configuration reference: every key with its type, default and meaning.

evd.toml(5) and the manual's configuration page are written from this, so
neither can fall behind the schema.  Each fact has one source:

* the keys and their kinds: the tables of config/schema.py;
* the defaults: the embedded default configuration, parsed (the dataclass
  defaults of config/model.py and the per-service listeners of the schema);
* the meaning: the comment above the key in etc/evd.toml (the embedded
  default, shipped as evd/default.toml), which explains every key where it
  is set.  Within `[services.NAME]` the comment above `enabled` describes the
  service itself.  Keys that the reference file cannot show set (`[keys.NAME]`
  has no default entry) take their sentence from `NOTES` below.

`undocumented()` lists keys with no meaning from either source; a test keeps
it empty, so a new key arrives with its comment.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any

from evd.config import loader, schema, tomlout
from evd.config.model import RAW_SERVICES, CommandSpec, Config, KeySpec, ServiceConfig

# The meaning of keys that etc/evd.toml shows only inside a commented-out
# example, by table path as `meanings()` spells it.
NOTES = {
    "keys.NAME.file": "HMAC-SHA256 secret file for this key (same rules as services.framed.key_file: "
    "absolute, mode 600 or stricter).",
    "keys.NAME.client_cn": "The subject CN of a TLS client certificate verified by tls_client_ca; "
    "a connection presenting it is authenticated as this key from its start.",
    "keys.NAME.commands": 'The commands this key may run ("*" = all).',
    "services.NAME.enabled": "Whether the service runs: false closes its listeners and refuses it "
    "on the framed port.",
    # Program services (SPEC section 14): a [services.NAME] of your own.
    "services.PROGRAM.exec": "The program and its arguments, the program by absolute path (no PATH "
    "search): it is started for every accepted connection, with the connection as its stdin and stdout.",
    "services.PROGRAM.env": "A table of variables added to the program's minimal environment "
    "(PATH=/usr/bin:/bin, LANG=C.UTF-8, REMOTE_ADDR, REMOTE_PORT, EVD_SERVICE, EVD_CONN; those cannot "
    "be replaced).",
    "services.PROGRAM.cwd": "The program's working directory.",
    "services.PROGRAM.user": 'Run the program as this user ("" = as evd; evd must then run as root).',
    "services.PROGRAM.group": 'Run the program with this group ("" = the user\'s primary group).',
    "services.PROGRAM.timeout": "Seconds of wall time before the program's process group gets SIGTERM "
    "(SIGKILL 1 s later); 0 = no limit, as inetd.",
    # Commands with their own settings (SPEC section 14); unset: [services.command]'s.
    "commands.NAME.timeout": "Seconds before this command's process group is killed; 0 = no limit.",
    "commands.NAME.max_concurrent": "Runs of this command at once, within [services.command] "
    "max_concurrent; beyond it requests get busy.",
    "commands.NAME.cwd": "The command's working directory.",
    "commands.NAME.env": "A table of variables added to the command's minimal environment "
    "(PATH=/usr/local/bin:/usr/bin:/bin, LANG=C.UTF-8).",
    "commands.NAME.user": 'Run the command as this user ("" = as evd; evd must then run as root).',
    "commands.NAME.group": 'Run the command with this group ("" = the user\'s primary group).',
}
_ENABLED_MEANING = NOTES["services.NAME.enabled"]

# How a schema kind reads for a person.
KINDS = {
    "bool": "boolean",
    "int": "integer",
    "float": "number",
    "str": "string",
    "env": "table of strings",
    "strs": "array of strings",
    "nets": "array of CIDRs",
    "tcp": "array of addresses (HOST:PORT)",
    "udp": "array of addresses (HOST:PORT)",
    "tls": "array of addresses (HOST:PORT)",
    "unix": "array of socket paths",
}

_TABLE = re.compile(r"^\[([^\]]+)\]")
_KEY = re.compile(r"^([A-Za-z0-9_-]+)\s*=")


@dataclass(frozen=True, slots=True)
class Key:
    name: str
    kind: str  # as KINDS spells it
    default: str  # TOML, or a line per service where they differ
    meaning: str


@dataclass(frozen=True, slots=True)
class Table:
    header: str  # "" for the keys before any table
    about: tuple[str, ...]  # paragraphs
    keys: tuple[Key, ...]


def comments(text: str) -> dict[str, list[str]]:
    """`{"daemon.pidfile": [paragraph, ...]}`: the comment paragraphs right
    above each key of a TOML file.  A blank line ends a comment; a lone "#"
    separates paragraphs."""
    found: dict[str, list[str]] = {}
    table, block = "", [""]
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#"):
            words = line.lstrip("#").strip()
            if words:
                block[-1] = f"{block[-1]} {words}".strip()
            elif block[-1]:
                block.append("")
            continue
        if (head := _TABLE.match(line)) is not None:
            table = head.group(1).strip()
        elif (key := _KEY.match(line)) is not None:
            paragraphs = [p for p in block if p]
            if paragraphs:
                found[f"{table}.{key.group(1)}" if table else key.group(1)] = paragraphs
        block = [""]
    return found


def preamble(text: str) -> list[str]:
    """The paragraphs of the comment that opens a TOML file."""
    block = [""]
    for raw in text.splitlines():
        line = raw.strip()
        if not line.startswith("#"):
            break
        words = line.lstrip("#").strip()
        if words:
            block[-1] = f"{block[-1]} {words}".strip()
        elif block[-1]:
            block.append("")
    return [p for p in block if p]


def _first(found: Mapping[str, list[str]], paths: list[str]) -> list[str]:
    return next((found[p] for p in paths if p in found), [])


def _keys(
    table_schema: schema.Schema,
    meaning: Callable[[str], str],
    default: Callable[[str], str],
    skip: frozenset[str] = frozenset(),
) -> tuple[Key, ...]:
    return tuple(
        Key(name, KINDS.get(kind, kind), default(name), meaning(name))
        for name, (kind, _check) in table_schema.items()
        if name not in skip
    )


def _section(config: Config, found: Mapping[str, list[str]], name: str, table_schema: schema.Schema) -> Table:
    obj = getattr(config, name)
    # Paragraphs above the table's first key but its last describe the table.
    first = _first(found, [f"{name}.{next(iter(table_schema))}"])
    intro = len(first) - 1

    def meaning(key: str) -> str:
        paragraphs = found.get(f"{name}.{key}", [])
        return " ".join(paragraphs[intro:] if paragraphs is first else paragraphs)

    return Table(
        f"[{name}]", tuple(first[:-1]), _keys(table_schema, meaning, lambda k: tomlout.value(getattr(obj, k)))
    )


def _per_service(config: Config, names: tuple[str, ...], key: str) -> str:
    shown = {n: tomlout.value(tomlout.service_items(config.services[n])[key]) for n in names}
    if len(set(shown.values())) == 1:
        return next(iter(shown.values()))
    return "; ".join(f"{n}: {v}" for n, v in shown.items())


def _services(config: Config, found: Mapping[str, list[str]], names: tuple[str, ...]) -> Table:
    table_schema = schema.SERVICE_KEYS[names[0]]

    def meaning(key: str) -> str:
        if key == "enabled":
            return _ENABLED_MEANING
        return " ".join(_first(found, [f"services.{n}.{key}" for n in names]))

    about = [f"{n}: {' '.join(found.get(f'services.{n}.enabled', []))}" for n in names]
    if "rate" in table_schema:
        about.append("Any key of [limits] may also be set here, for this service alone.")
    header = f"[services.{names[0]}]" if len(names) == 1 else "[services.NAME] for " + ", ".join(names)
    return Table(
        header,
        tuple(about),
        _keys(
            table_schema,
            meaning,
            lambda k: _per_service(config, names, k),
            skip=frozenset(schema.LIMITS),
        ),
    )


def _programs(found: Mapping[str, list[str]]) -> Table:
    """`[services.NAME]` with `exec`: a program service, NAME of your own."""
    defaults = {f.name: f.default for f in fields(ServiceConfig)}
    defaults |= {"enabled": True, **schema.PROGRAM_DEFAULTS}

    def meaning(key: str) -> str:
        own = NOTES.get(f"services.PROGRAM.{key}") or NOTES.get(f"services.NAME.{key}")
        return own or " ".join(_first(found, [f"services.{n}.{key}" for n in RAW_SERVICES]))

    about = (
        "A table whose NAME is not a built-in service and that has exec is a program service "
        "(inetd's nowait services): every accepted stream connection starts the program. "
        "Any key of [limits] may also be set here, for this service alone.",
    )
    return Table(
        "[services.NAME] with exec (program services)",
        about,
        _keys(
            schema.PROGRAM,
            meaning,
            lambda k: "(required)" if k == "exec" else tomlout.value(defaults[k]),
            skip=frozenset(schema.LIMITS),
        ),
    )


def _named(
    found: Mapping[str, list[str]], section: str, table_schema: schema.Schema, spec: Any, about: str
) -> Table:
    defaults = {f.name: f.default for f in fields(spec)}
    paths = [p for p in found if p.startswith(f"{section}.")]  # in the file's order

    def meaning(key: str) -> str:
        text = " ".join(_first(found, [p for p in paths if p.endswith(f".{key}")]))
        return text or NOTES.get(f"{section}.NAME.{key}", "")

    def default(key: str) -> str:
        if key in schema.REQUIRED_WHY:
            return "(required)"
        if defaults[key] is None:  # falls back to another table's
            return "([services.command]'s)"
        if key == "env":
            return "{}"
        return tomlout.value(defaults[key])

    return Table(f"[{section}.NAME]", (about,), _keys(table_schema, meaning, default))


def tables() -> list[Table]:
    """Every table of the configuration, in the order of etc/evd.toml."""
    text = loader.embedded_text()
    config = loader.parse(text)
    found = comments(text)
    include = Key("include", KINDS["strs"], tomlout.value(config.include), " ".join(found.get("include", [])))
    sections = [("daemon", schema.DAEMON), ("log", schema.LOG), ("control", schema.CONTROL)]
    sections += [("metrics", schema.METRICS), ("limits", schema.LIMITS)]
    return [
        Table("", ("Keys outside any table.",), (include,)),
        *(_section(config, found, name, table_schema) for name, table_schema in sections),
        _services(config, found, RAW_SERVICES),
        *(_services(config, found, (name,)) for name in ("framed", "command", "stats")),
        _programs(found),
        _named(
            found,
            "commands",
            schema.COMMAND,
            CommandSpec,
            "The allow-list: one table per command that the framed port may run, without a shell.",
        ),
        _named(found, "keys", schema.KEY, KeySpec, "Named credentials for the framed port; none by default."),
    ]


def entries() -> Iterator[tuple[Table, Key]]:
    for table in tables():
        for key in table.keys:
            yield table, key


def undocumented() -> list[str]:
    """Keys without a meaning: a test keeps this empty."""
    return [f"{t.header or 'top level'} {k.name}" for t, k in entries() if not k.meaning]
