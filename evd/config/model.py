"""The configuration as the rest of evd reads it: frozen objects.

A `Config` is built once from TOML by `config/validate.py` (which validates
every key and collects every mistake), found and read by `config/loader.py`,
and written back as TOML by `config/tomlout.py`.  Nothing changes a `Config`:
a reload builds a new one and compares (server/reload_plan.py).

Defaults live on the dataclasses below, so a file that leaves a key out and
a file that spells it out give equal objects.
"""

from __future__ import annotations

import ipaddress
import types
from collections.abc import Mapping
from dataclasses import dataclass, field

from evd.config.addresses import Address

SERVICE_NAMES = ("echo", "discard", "chargen", "daytime", "time", "timefmt", "framed", "command", "stats")
RAW_SERVICES = SERVICE_NAMES[:6]
# Services with listeners of their own (command and stats are reached
# through the framed dispatcher only).
LISTENING = (*RAW_SERVICES, "framed")
DISPATCHABLE = ("echo", "time", "command", "stats")  # what the framed port can reach
EMBEDDED_SOURCE = "<embedded>"
DEFAULT_PATH = "/etc/evd/evd.toml"
DEFAULT_ARG_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
# `[keys.NAME] commands`: every command of the allow-list.
ALL_COMMANDS = "*"
# The key that `services.framed.key_file` defines.
DEFAULT_KEY = "default"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """Every problem found, each "KEY.PATH: message" (prefixed "FILE: "
    when it came from a drop-in file)."""

    def __init__(self, errors: list[str] | str):
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("\n".join(self.errors))


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
    handshake_timeout: float = 10.0
    auth_ban: float = 60.0


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    name: str
    enabled: bool
    tcp: tuple[Address, ...] = ()
    udp: tuple[Address, ...] = ()
    unix: tuple[Address, ...] = ()
    tls: tuple[Address, ...] = ()
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    only_from: tuple[Network, ...] = ()
    no_access: tuple[Network, ...] = ()
    # The PROXY protocol (SPEC section 13): stream connections begin with a
    # header naming the real client, and come only from `proxy_from`.
    proxy_protocol: bool = False
    proxy_from: tuple[Network, ...] = ()
    limits: Limits = Limits()  # [limits] overridden by keys set in this service's table
    dispatch: tuple[str, ...] = ()  # framed only
    key_file: str = ""  # framed only
    auth_required: tuple[str, ...] = ()  # framed only
    timeout: float = 10.0  # command and programs (programs: 0 by default, none)
    max_output: int = 1048576  # command only
    max_concurrent: int = 8  # command only
    exec: tuple[str, ...] = ()  # a program service's argv (SPEC section 14)
    env: tuple[tuple[str, str], ...] = ()  # programs: added to the minimal environment
    cwd: str = "/"  # programs
    user: str = ""  # programs: run as (evd must be root)
    group: str = ""  # programs

    @property
    def addresses(self) -> tuple[Address, ...]:
        return self.tcp + self.udp + self.unix + self.tls

    @property
    def listens(self) -> bool:
        """A service with listeners of its own: a raw service, the framed
        port, or a program service."""
        return self.name in LISTENING or bool(self.exec)

    @property
    def streams(self) -> tuple[Address, ...]:
        """The listeners that accept connections (all but UDP)."""
        return self.tcp + self.unix + self.tls


@dataclass(frozen=True, slots=True)
class CommandSpec:
    name: str
    argv: tuple[str, ...]
    args: bool = False
    arg_pattern: str = DEFAULT_ARG_PATTERN
    # Its own settings (SPEC section 14); None: [services.command]'s.
    timeout: float | None = None
    max_concurrent: int | None = None  # within the service's
    cwd: str = "/"
    env: tuple[tuple[str, str], ...] = ()  # added to the minimal environment
    user: str = ""
    group: str = ""


@dataclass(frozen=True, slots=True)
class KeySpec:
    """A named credential for the framed port (SPEC section 10)."""

    name: str
    file: str = ""  # HMAC secret
    client_cn: str = ""  # a verified TLS client certificate with this CN
    commands: tuple[str, ...] = (ALL_COMMANDS,)

    def may_run(self, command: str) -> bool:
        return ALL_COMMANDS in self.commands or command in self.commands


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
    buffer: int = 4194304
    journal_socket: str = "/run/systemd/journal/socket"


@dataclass(frozen=True, slots=True)
class ControlConfig:
    unix: str = ""
    mode: str = "0600"  # octal, as chmod takes it

    @property
    def mode_bits(self) -> int:
        return int(self.mode, 8)


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    tcp: tuple[Address, ...] = ()


@dataclass(frozen=True, slots=True)
class Config:
    daemon: DaemonConfig
    log: LogConfig
    limits: Limits
    # Every name of SERVICE_NAMES, in that order, then the program services.
    services: Mapping[str, ServiceConfig]
    commands: Mapping[str, CommandSpec]
    source: str  # the path read, or EMBEDDED_SOURCE
    control: ControlConfig = ControlConfig()
    metrics: MetricsConfig = MetricsConfig()
    keys: Mapping[str, KeySpec] = field(default_factory=lambda: types.MappingProxyType({}))
    include: tuple[str, ...] = ()

    def enabled_services(self) -> list[ServiceConfig]:
        return [s for s in self.services.values() if s.enabled]

    def listener_keys(self) -> list[tuple[str, Address]]:
        """(service, address) of every listener the configuration asks for."""
        return [
            (svc.name, address)
            for svc in self.services.values()
            if svc.enabled and svc.listens
            for address in svc.addresses
        ]

    def all_keys(self) -> dict[str, KeySpec]:
        """The framed port's credentials: `[keys.NAME]` entries, and
        `services.framed.key_file` as the key named "default"."""
        keys = dict(self.keys)
        key_file = self.services["framed"].key_file
        if key_file:
            keys[DEFAULT_KEY] = KeySpec(DEFAULT_KEY, file=key_file)
        return keys
