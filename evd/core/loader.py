"""Finding and reading the configuration file.

`-c PATH`, else `$EVD_CONFIG`, else /etc/evd/evd.toml if it exists, else
the embedded default (evd/default.toml, identical to the repository's
etc/evd.toml).  `load` reads the file and hands the document to the
validator (core/schema.py); every reader of the configuration -- `run`,
`start`, a reload, `check-config` -- comes through here, so they cannot
disagree about what a file means.
"""

from __future__ import annotations

import os
import tomllib
from importlib import resources

from evd.core import config as config_mod
from evd.core import schema
from evd.core.config import EMBEDDED_SOURCE, Config, ConfigError


def embedded_text() -> str:
    return resources.files("evd").joinpath("default.toml").read_text(encoding="utf-8")


def resolve_path(path: str | None) -> str | None:
    """-c PATH, else $EVD_CONFIG, else DEFAULT_PATH if it exists, else None (embedded)."""
    if path is not None:
        return path
    if os.environ.get("EVD_CONFIG"):
        return os.environ["EVD_CONFIG"]
    default = config_mod.DEFAULT_PATH
    return default if os.path.exists(default) else None


def parse(text: str, source: str = EMBEDDED_SOURCE) -> Config:
    """Validate TOML text into a Config, or raise ConfigError listing every problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: TOML syntax error: {exc}"]) from None
    return schema.build(data, source)


def read_text(path: str) -> str:
    """A configuration file's text, or ConfigError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: [Errno {exc.errno}] {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8: {exc}"]) from None


def load(path: str | None = None) -> Config:
    resolved = resolve_path(path)
    if resolved is None:
        return parse(embedded_text(), EMBEDDED_SOURCE)
    return parse(read_text(resolved), resolved)


def reread(config: Config) -> Config:
    """The configuration `config` was read from, read again (ConfigError if
    it is no longer valid).  The embedded default stays the embedded
    default: a file appearing at /etc/evd/evd.toml later does not count."""
    if config.source == EMBEDDED_SOURCE:
        return parse(embedded_text(), EMBEDDED_SOURCE)
    return load(config.source)
