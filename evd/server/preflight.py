"""What the configuration names on this machine, checked and read.

The validator (config/validate.py) judges the file alone.  Before evd acts on
a configuration -- `run`, `start`, a reload, and `check-config`, which must
refuse everything `run` would -- the things it names must also be usable:
key files readable, private, regular and not empty; each TLS service's
certificate, key and client CA loaded into the server context it will use
(system/certificates.py); the user and group known; each program service's
program an executable file, and the identity it runs as known (and evd
root to switch to it).  `check` does all of
it, collects every problem as "KEY.PATH: message" (one ConfigError, exit
78), and returns what it read, so the daemon uses exactly what was checked.
"""

from __future__ import annotations

import hashlib
import os
import ssl
import stat
from dataclasses import dataclass, field

from evd.config.model import Config, ConfigError, ServiceConfig
from evd.system import privileges
from evd.system.certificates import CertificateError, server_context
from evd.system.secrets import SecretError, read_secret


@dataclass(slots=True)
class Machine:
    """What `check` read: HMAC secrets by key name, TLS server contexts by
    service name (and a digest of the files each was built from, so a
    reload can tell a rotated certificate), and the identity to drop to
    (None: stay)."""

    secrets: dict[str, bytes] = field(default_factory=dict)
    tls: dict[str, ssl.SSLContext] = field(default_factory=dict)
    certificates: dict[str, bytes] = field(default_factory=dict)
    credentials: privileges.Credentials | None = None
    # Programs and commands by key path ("services.NAME", "commands.NAME"):
    # (uid, gid) to run as; None for either: evd's own.
    identities: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)


def _key_path(config: Config, name: str) -> str:
    return "services.framed.key_file" if name not in config.keys else f"keys.{name}.file"


def _digest(*paths: str) -> bytes:
    """What the files hold now (just read, and read again here: a file
    replaced in between only makes a reload report a change)."""
    digest = hashlib.sha256()
    for path in paths:
        if path:
            with open(path, "rb") as f:
                digest.update(hashlib.sha256(f.read()).digest())
    return digest.digest()


def check(config: Config) -> Machine:
    """Everything the configuration names, checked; ConfigError listing
    every problem otherwise."""
    errors: list[str] = []
    machine = Machine()
    if config.services["framed"].enabled:
        for name, spec in config.all_keys().items():
            if not spec.file:
                continue
            try:
                machine.secrets[name] = read_secret(spec.file)
            except SecretError as exc:
                errors.append(f"{_key_path(config, name)}: {exc}")
    for svc in config.services.values():
        if svc.enabled and svc.tls and svc.listens:
            try:
                machine.tls[svc.name] = server_context(svc.tls_cert, svc.tls_key, svc.tls_client_ca)
            except CertificateError as exc:
                errors.append(f"services.{svc.name}.{exc.key}: {exc}")
            else:
                machine.certificates[svc.name] = _digest(svc.tls_cert, svc.tls_key, svc.tls_client_ca)
    for svc in config.services.values():
        if svc.enabled and svc.exec:
            errors += _program(svc, config, machine)
    if config.services["command"].enabled:
        for command in config.commands.values():
            errors += _identity(f"commands.{command.name}", command.user, command.group, config, machine)
    try:
        machine.credentials = privileges.resolve(config.daemon.user, config.daemon.group)
    except ConfigError as exc:
        errors += exc.errors
    if errors:
        raise ConfigError(errors)
    return machine


def _program(svc: ServiceConfig, config: Config, machine: Machine) -> list[str]:
    """A program service's program (an executable regular file) and the
    identity it runs as; the problems found."""
    path = f"services.{svc.name}"
    program = svc.exec[0]
    errors = []
    try:
        st = os.stat(program)
    except OSError as exc:
        errors.append(f'{path}.exec: "{program}": {exc.strerror}')
    else:
        if not stat.S_ISREG(st.st_mode):
            errors.append(f'{path}.exec: "{program}" is not a file')
        elif not os.access(program, os.X_OK):
            errors.append(f'{path}.exec: "{program}" is not executable')
    return errors + _identity(path, svc.user, svc.group, config, machine)


def _identity(path: str, user: str, group: str, config: Config, machine: Machine) -> list[str]:
    """The (uid, gid) a program or command at `path` runs as, into
    `machine.identities`; the problems found (unknown names, evd not root)."""
    if not user and not group:
        return []
    try:
        identity = privileges.resolve(user, group, path)
    except ConfigError as exc:
        return exc.errors
    assert identity is not None
    machine.identities[path] = (identity.uid if user else None, identity.gid)
    if os.geteuid() != 0 or config.daemon.user:
        who = "runs as daemon.user" if config.daemon.user else f"runs as uid {os.geteuid()}"
        key = "user" if user else "group"
        return [f"{path}.{key}: evd must run as root to start a program as another user ({who})"]
    return []
