"""The schema: every key the configuration accepts, and its checks.

Schema tables (`DAEMON`, `LOG`, `LIMITS`, `SERVICE_KEYS`, ...) map every
accepted key to `(kind, check)`.  A *kind* says how a raw TOML value becomes
a Python value ("int", "tcp" addresses, "nets" CIDRs, ...; config/validate.py
does the converting); a *check* is an optional function returning an error
message or None.  Defaults live on the dataclasses of config/model.py and, where
they differ per service, in `DEFAULT_LISTENERS` and friends below.  The
validator (config/validate.py) walks a document against these tables;
config/tomlout.py walks them to write a configuration back.

Every number has an upper bound as well as a lower one: a size or duration
from the file ends up in an allocation, a buffer limit or a timer, and
`max_header = 5000000000` or `shutdown_timeout = 1e308` must be refused here
rather than fail later inside the loop.  Every string refuses NUL, which no
path, name or argument can carry into a system call.

Checks of the machine (does the key file exist, is the user known, does the
certificate match its key) are not here: they are server/preflight.py's,
run by every command that would act on the configuration.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from evd.config import addresses
from evd.config.model import ALL_COMMANDS, DISPATCHABLE, RAW_SERVICES

# Names of commands and keys: safe in a log line, a TOML key and a file name.
NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "console", "journal")

# -- bounds, with the reasoning for each -------------------------------------

# Durations: 30 days is longer than any sensible timeout, and small enough
# that adding it to the monotonic clock or passing it to epoll is exact.
DURATION_MAX = 30 * 86400.0
# A framed header is a small JSON object; 16 MiB is far past any request
# and still a bounded buffer per connection.
HEADER_MAX = 16 * 1024 * 1024
# Bodies, output queues, command output and the log buffer are held in
# memory whole: 1 GiB each is already more than a small daemon should hold.
BYTES_MAX = 1024 * 1024 * 1024
# Connections are descriptors: a million is past any RLIMIT_NOFILE we meet.
CONNECTIONS_MAX = 1_000_000
# Token buckets: a million per second per client is "no limit" in practice
# (use 0 for that).
RATE_MAX = 1_000_000.0
# Each running command holds a process and four descriptors.
COMMANDS_MAX = 4096
# Processes: one per CPU is the useful most; 1024 CPUs is a big machine.
WORKERS_MAX = 1024

Value = Any  # what a kind produces: bool, int, float, str, tuples of those
Check = Callable[[Value], "str | None"]
Schema = Mapping[str, tuple[str, Check | None]]


# -- checks: value -> error message or None -----------------------------------


def _shown(x: float) -> str:
    """A bound as the operator would write it: 2592000, not 2.592e+06."""
    return str(int(x)) if float(x).is_integer() else repr(x)


def _between(low: float, high: float) -> Check:
    def check(v: Value) -> str | None:
        if v < low:
            return f"must be at least {_shown(low)}"
        if v > high:
            return f"must be at most {_shown(high)}"
        return None

    return check


def _one_of(*choices: str) -> Check:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}"


def _abs_path(v: str) -> str | None:
    return None if os.path.isabs(v) else "must be an absolute path"


def _abs_path_or_empty(v: str) -> str | None:
    return None if v == "" else _abs_path(v)


def abs_paths(v: tuple[str, ...]) -> str | None:
    return next((f'"{p}" must be an absolute path' for p in v if not os.path.isabs(p)), None)


def _service_list(v: tuple[str, ...]) -> str | None:
    for name in v:
        if name not in DISPATCHABLE:
            return f'"{name}" cannot be dispatched (choose from {", ".join(DISPATCHABLE)})'
    if len(set(v)) != len(v):
        return "lists a service twice"
    return None


def _argv(v: tuple[str, ...]) -> str | None:
    return None if v and all(v) else "must be a non-empty array of non-empty strings"


def _program(v: tuple[str, ...]) -> str | None:
    """An exec argv: the program by absolute path (no PATH search: what
    runs is what check-config looked at), then its arguments."""
    return _argv(v) or (None if os.path.isabs(v[0]) else f'"{v[0]}" must be an absolute path')


# Names evd sets for every program: the env table cannot hide them.
PROGRAM_VARIABLES = ("REMOTE_ADDR", "REMOTE_PORT", "EVD_SERVICE", "EVD_CONN")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def _env(v: tuple[tuple[str, str], ...]) -> str | None:
    for name, _ in v:
        if not ENV_NAME.fullmatch(name):
            return f'"{name}" is not an environment variable name'
        if name in PROGRAM_VARIABLES:
            return f"{name} is set by evd for each connection"
    return None


def _regex(v: str) -> str | None:
    try:
        re.compile(v)
    except re.error as exc:
        return f"bad regular expression: {exc}"
    return None


def _mode(v: str) -> str | None:
    if re.fullmatch(r"0?[0-7]{3}", v):
        return None
    return 'must be an octal file mode such as "0600"'


def _unix_path_or_empty(v: str) -> str | None:
    if v == "":
        return None
    try:
        addresses.parse("unix", v)
    except ValueError as exc:
        return str(exc)
    return None


def _key_commands(v: tuple[str, ...]) -> str | None:
    bad = [c for c in v if c != ALL_COMMANDS and not NAME.fullmatch(c)]
    return f'"{bad[0]}" is not a command name' if bad else None


_SECONDS = _between(0, DURATION_MAX)
_BYTES = _between(0, BYTES_MAX)


# -- schema tables: key -> (kind, check) ---------------------------------------

DAEMON: Schema = {
    "pidfile": ("str", _abs_path),
    "user": ("str", None),
    "group": ("str", None),
    "shutdown_timeout": ("float", _SECONDS),
    "workers": ("int", _between(1, WORKERS_MAX)),
}
LOG: Schema = {
    "level": ("str", _one_of(*LEVELS)),
    "format": ("str", _one_of(*LOG_FORMATS)),
    "file": ("str", _abs_path_or_empty),
    "buffer": ("int", _between(4096, BYTES_MAX)),
    "journal_socket": ("str", _abs_path),
}
CONTROL: Schema = {"unix": ("str", _unix_path_or_empty), "mode": ("str", _mode)}
METRICS: Schema = {"tcp": ("tcp", None)}
LIMITS: Schema = {
    "max_connections": ("int", _between(1, CONNECTIONS_MAX)),
    "per_source": ("int", _between(1, CONNECTIONS_MAX)),
    "rate": ("float", _between(0, RATE_MAX)),
    "burst": ("int", _between(1, RATE_MAX)),
    "idle_timeout": ("float", _SECONDS),
    "max_header": ("int", _between(2, HEADER_MAX)),
    "max_body": ("int", _BYTES),
    "write_high": ("int", _between(1, BYTES_MAX)),
    "write_low": ("int", _BYTES),
    "handshake_timeout": ("float", _between(0.001, DURATION_MAX)),
    "auth_ban": ("float", _SECONDS),
}
_ACCESS: Schema = {"only_from": ("nets", None), "no_access": ("nets", None)}
# SPEC section 13; stream services only.  That proxy_from is not empty when
# proxy_protocol is on, and that the service has a stream listener, are
# checks across keys (config/validate.py).
_PROXY: Schema = {"proxy_protocol": ("bool", None), "proxy_from": ("nets", None)}
_ENABLED: Schema = {"enabled": ("bool", None)}
_TLS: Schema = {
    "tls": ("tls", None),
    "tls_cert": ("str", _abs_path_or_empty),
    "tls_key": ("str", _abs_path_or_empty),
    "tls_client_ca": ("str", _abs_path_or_empty),
}
_RAW: Schema = {
    **_ENABLED,
    "tcp": ("tcp", None),
    "udp": ("udp", None),
    "unix": ("unix", None),
    **_TLS,
    **_ACCESS,
    **_PROXY,
    **LIMITS,
}
# Per program or command: where and as whom it runs (SPEC section 14).
_RUN_AS: Schema = {
    "env": ("env", _env),
    "cwd": ("str", _abs_path),
    "user": ("str", None),
    "group": ("str", None),
}
# A program service: a stream service whose connections go to `exec`.
PROGRAM: Schema = {
    **_ENABLED,
    "tcp": ("tcp", None),
    "unix": ("unix", None),
    **_TLS,
    **_ACCESS,
    **_PROXY,
    "exec": ("strs", _program),
    **_RUN_AS,
    "timeout": ("float", _SECONDS),
    **LIMITS,
}
PROGRAM_DEFAULTS = {"timeout": 0.0}  # 0: no limit, as inetd
SERVICE_KEYS: Mapping[str, Schema] = {name: _RAW for name in RAW_SERVICES} | {
    "framed": {
        **_ENABLED,
        "tcp": ("tcp", None),
        "unix": ("unix", None),
        **_TLS,
        **_ACCESS,
        **_PROXY,
        "dispatch": ("strs", _service_list),
        "key_file": ("str", _abs_path_or_empty),
        "auth_required": ("strs", _service_list),
        **LIMITS,
    },
    "command": {
        **_ENABLED,
        "timeout": ("float", _SECONDS),
        "max_output": ("int", _BYTES),
        "max_concurrent": ("int", _between(1, COMMANDS_MAX)),
    },
    "stats": _ENABLED,
}
COMMAND: Schema = {
    "argv": ("strs", _argv),
    "args": ("bool", None),
    "arg_pattern": ("str", _regex),
    "timeout": ("float", _SECONDS),
    "max_concurrent": ("int", _between(1, COMMANDS_MAX)),
    **_RUN_AS,
}
KEY: Schema = {
    "file": ("str", _abs_path_or_empty),
    "client_cn": ("str", None),
    "commands": ("strs", _key_commands),
}

REQUIRED_WHY = {"argv": " (the program and its fixed arguments)"}
PROGRAM_KEY = "exec"  # what makes a [services.NAME] that is not built in a program service

# Defaults that are not a single dataclass default: they differ per service.
OFF_BY_DEFAULT = ("discard", "chargen")  # chargen over UDP is an amplifier; discard is rarely wanted
DEFAULT_LISTENERS = {
    "echo": {"tcp": ["127.0.0.1:7007"], "udp": ["127.0.0.1:7007"]},
    "discard": {"tcp": ["127.0.0.1:7009"], "udp": ["127.0.0.1:7009"]},
    "chargen": {"tcp": ["127.0.0.1:7019"], "udp": ["127.0.0.1:7019"]},
    "daytime": {"tcp": ["127.0.0.1:7013"], "udp": ["127.0.0.1:7013"]},
    "time": {"tcp": ["127.0.0.1:7037"], "udp": ["127.0.0.1:7037"]},
    "timefmt": {"udp": ["127.0.0.1:7038"]},
    "framed": {"tcp": ["127.0.0.1:7070"]},
}
FRAMED_DEFAULTS = {"dispatch": DISPATCHABLE, "auth_required": ("command",)}
DEFAULT_COMMANDS = {"uptime": {"argv": ["uptime"]}, "greet": {"argv": ["echo", "hello"], "args": True}}
SECTIONS = ("include", "daemon", "log", "control", "metrics", "limits", "services", "commands", "keys")
