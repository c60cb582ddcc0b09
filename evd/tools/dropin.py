"""`evd enable|disable SERVICE`: the drop-in `50-SERVICE.toml`, written safely.

The file goes into the directory of the first `include` pattern (SPEC
section 11) and holds exactly `[services.SERVICE]` and `enabled = ...`.
Before anything is written, the configuration *with* that file -- main
file, every other drop-in, and what `run` checks on the machine
(server/preflight.py) -- is loaded by the same loader the daemon uses; if
it is invalid nothing is written.  A later drop-in that sets the same key
would make the file pointless, so that is refused too, naming the file.

The write is atomic: a temporary file in the same directory (its name
starts with ".", which no glob matches, so a reload never reads it half
written), fsync-ed, renamed over the target, and the directory fsync-ed so
the rename survives a crash.  Writing what is already there is skipped:
running the command twice is harmless.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass

from evd.config import dropins, loader
from evd.config.loader import Loaded
from evd.config.model import EMBEDDED_SOURCE, SERVICE_NAMES, ConfigError
from evd.server import preflight

PRIORITY = "50"  # the name's prefix: packages ship lower numbers, local overrides higher ones
MODE = 0o644  # read by the daemon's user, which under systemd's DynamicUser= is not root


class SwitchError(Exception):
    """The file cannot (or should not) be written: exit 1, with the reason."""


@dataclass(frozen=True)
class Plan:
    path: str
    text: str
    loaded: Loaded  # the configuration with the file in place
    unchanged: bool  # the file already says exactly this


def content(service: str, enabled: bool) -> str:
    return f"[services.{service}]\nenabled = {'true' if enabled else 'false'}\n"


def target(patterns: tuple[str, ...], source: str, service: str) -> str:
    """Where the drop-in for `service` goes: ENABLE_DIR/50-SERVICE.toml."""
    if not patterns:
        where = "the embedded default configuration" if source == EMBEDDED_SOURCE else source
        raise SwitchError(
            f'{where} has no include: add one, e.g. include = ["/etc/evd/evd.d/*.toml"], '
            "to say where drop-in files live"
        )
    first = patterns[0]
    directory = os.path.dirname(first)
    if any(c in directory for c in "*?["):
        raise SwitchError(f"the first include pattern {first} has wildcards in its directory: write where?")
    path = os.path.join(directory, f"{PRIORITY}-{service}.toml")
    if not dropins.matches(path, first):
        raise SwitchError(f"the first include pattern {first} would not read {path}")
    return path


def plan(config_path: str | None, service: str, enabled: bool) -> Plan:
    """The file to write and the configuration it makes, validated; raises
    ConfigError (invalid: exit 78) or SwitchError (exit 1)."""
    if service not in SERVICE_NAMES:  # before the name becomes part of a path
        raise ConfigError(f"services.{service}: unknown service (known: {', '.join(SERVICE_NAMES)})")
    source, patterns = loader.include_of(config_path)
    path = target(patterns, source, service)
    text = content(service, enabled)
    loaded = loader.load_all(config_path, replaced={path: text})
    try:
        preflight.check(loaded.config)  # as strict as `run`
    except ConfigError as exc:
        raise loaded.origins.blame_all(exc) from None
    key = f"services.{service}.enabled"
    if loaded.config.services[service].enabled != enabled:
        raise SwitchError(f"{loaded.origins.of(key)} sets {key} and is read after {path}: change it there")
    return Plan(path, text, loaded, unchanged=_current(path) == text)


def _current(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


def write_atomically(path: str, text: str) -> None:
    """`path` holds `text`, or (on any error) what it held before."""
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise SwitchError(f"cannot write in {directory}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), MODE)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:  # Ctrl-C included: never leave the temporary file behind
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise SwitchError(f"cannot write {path}: {exc.strerror}") from None
        raise
    dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
