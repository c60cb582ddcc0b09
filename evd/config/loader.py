"""Finding and reading the configuration: the main file and its drop-ins.

`-c PATH`, else `$EVD_CONFIG`, else /etc/evd/evd.toml if it exists, else
the embedded default (evd/default.toml, identical to the repository's
etc/evd.toml).  The main file's `include` patterns name drop-in files,
read after it and merged into it (config/dropins.py) before the one
validator (config/validate.py) judges the whole.  Every reader of the
configuration -- `run`, `start`, a reload, `check-config`, `explain`,
`enable`/`disable` -- comes through `load_all`, so they cannot disagree
about what the files mean.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from evd.config import dropins, validate
from evd.config import model as config_mod
from evd.config.model import EMBEDDED_SOURCE, Config, ConfigError

# The largest configuration file read: the shipped one is 13 KiB, a drop-in
# a few lines; a file of more is a mistake (a log named by a glob).
MAX_FILE = 1 << 20


def embedded_text() -> str:
    return resources.files("evd").joinpath("default.toml").read_text(encoding="utf-8")


def resolve_path(path: str | None) -> str | None:
    """-c PATH, else $EVD_CONFIG, else DEFAULT_PATH if it exists, else None
    (embedded).  Made absolute: `evd start` detaches into cwd "/", and its
    reloads must find the same file."""
    if path is not None:
        return os.path.abspath(path)
    if os.environ.get("EVD_CONFIG"):
        return os.path.abspath(os.environ["EVD_CONFIG"])
    default = config_mod.DEFAULT_PATH
    return default if os.path.exists(default) else None


@dataclass(frozen=True)
class Loaded:
    """A validated configuration with where it came from: the drop-in
    files read (in order) and which file set each key."""

    config: Config
    files: tuple[str, ...] = ()
    origins: dropins.Origins = field(default_factory=lambda: dropins.Origins(None))


def _toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # its message ends "(at line L, column C)"
        raise ConfigError([f"{source}: TOML syntax error: {exc}"]) from None


def parse(text: str, source: str = EMBEDDED_SOURCE) -> Config:
    """Validate one TOML text into a Config, or raise ConfigError listing
    every problem.  No drop-ins: for a single document."""
    return validate.build(_toml(text, source), source)


def read_text(path: str) -> str:
    """A configuration file's text, or ConfigError naming the file.

    A running daemon reads its files on SIGHUP, inside its loop, so what
    the operator points it at must fail at once rather than hang or eat
    memory (as key and certificate files do, system/secrets.py): opened
    with O_NONBLOCK (a FIFO would block the open until a writer comes),
    checked to be a regular file on the open descriptor (not /dev/zero,
    which never ends), and read up to MAX_FILE bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: [Errno {exc.errno}] {exc.strerror}"]) from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):  # said as open() without O_RDONLY's leniency says it
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))
        if not stat.S_ISREG(mode):
            raise ConfigError([f"{path}: not a regular file"])
        data = _read_at_most(fd, MAX_FILE + 1)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: [Errno {exc.errno}] {exc.strerror}"]) from None
    finally:
        os.close(fd)
    if len(data) > MAX_FILE:
        raise ConfigError([f"{path}: larger than {MAX_FILE >> 20} MiB: not a configuration file"])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8: {exc}"]) from None


def _read_at_most(fd: int, size: int) -> bytes:
    """Up to `size` bytes of a regular file, to its end."""
    parts, left = [], size
    while left > 0 and (chunk := os.read(fd, left)):
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _main(path: str | None) -> tuple[str, dict[str, Any]]:
    """(source, document) of the main file, or of the embedded default."""
    resolved = resolve_path(path)
    if resolved is None:
        return EMBEDDED_SOURCE, _toml(embedded_text(), EMBEDDED_SOURCE)
    return resolved, _toml(read_text(resolved), resolved)


def include_of(path: str | None) -> tuple[str, tuple[str, ...]]:
    """(source, include patterns) of the main file alone, validated as
    `load_all` validates them; ConfigError if the main file or its
    `include` is unusable."""
    source, data = _main(path)
    patterns = validate.build({"include": data["include"]}).include if "include" in data else ()
    return source, patterns


def _patterns(data: Mapping[str, Any]) -> tuple[str, ...]:
    """The main document's include patterns; none if they are invalid (the
    validation of the whole document then reports why)."""
    if "include" not in data:
        return ()
    try:
        return validate.build({"include": data["include"]}).include
    except ConfigError:
        return ()


def _dropin(path: str, replaced: Mapping[str, str]) -> dict[str, Any]:
    """One drop-in's document (ConfigError naming the file if unusable)."""
    data = _toml(replaced[path] if path in replaced else read_text(path), path)
    if "include" in data:
        raise ConfigError([f"{path}: include: only the main file may include drop-ins"])
    return data


def load_all(path: str | None = None, replaced: Mapping[str, str] | None = None) -> Loaded:
    """The main file and its drop-ins, merged and validated; ConfigError
    listing every problem, each naming its drop-in file.

    `replaced` maps drop-in paths to the text to read instead of the file
    (which need not exist yet): `evd enable` validates the configuration
    it is about to write this way, before writing."""
    replaced = replaced or {}
    source, data = _main(path)
    main = None if source == EMBEDDED_SOURCE else source
    origins = dropins.Origins(main)
    merged: dict[str, Any] = {}
    if main is not None:  # the embedded default's values are the defaults: no origin
        dropins.merge(merged, data, main, origins)
    else:
        merged = data
    files = dropins.expand(_patterns(data), skip=main, extra=replaced)
    documents, errors = [], []
    for file in files:
        try:
            documents.append((file, _dropin(file, replaced)))
        except ConfigError as exc:
            errors += exc.errors
    if errors:  # a file that could not be read cannot be merged: the rest would mislead
        raise ConfigError(errors)
    for file, document in documents:
        dropins.merge(merged, document, file, origins)
    try:
        config = validate.build(merged, source)
    except ConfigError as exc:
        raise origins.blame_all(exc) from None
    return Loaded(config, tuple(files), origins)


def salvage(path: str | None, table: str, key: str) -> str | None:
    """`table.key`, a string, as far as the files can still be read when
    the whole does not load: `evd ctl` uses it to find the control socket
    while the operator is in the middle of an edit.  The main file, then
    its drop-ins if its `include` can still be read, the last file that
    sets it winning (as in `load_all`); in a file that is not valid TOML,
    the key's own line in its table.  None if no readable file sets it."""
    resolved = resolve_path(path)
    if resolved is None:
        return None
    files = [resolved]
    try:
        files += dropins.expand(include_of(resolved)[1], skip=resolved)
    except ConfigError:
        pass  # the main file alone, then
    found = None
    for file in files:
        try:
            value = _salvage_one(read_text(file), table, key)
        except ConfigError:
            continue
        found = value if value is not None else found
    return found


def _salvage_one(text: str, table: str, key: str) -> str | None:
    try:
        value = tomllib.loads(text).get(table, {}).get(key)
        return value if isinstance(value, str) else None
    except (tomllib.TOMLDecodeError, AttributeError):
        pass
    header = re.compile(r"\s*\[\s*([A-Za-z0-9_.-]+)\s*\]\s*(#.*)?")
    line_of = re.compile(rf"\s*({re.escape(table)}\s*\.\s*)?{re.escape(key)}\s*=")
    current, found = "", None
    for line in text.splitlines():
        if (opened := header.fullmatch(line)) is not None:
            current = opened[1]
            continue
        match = line_of.match(line)
        # `key = ...` under [table], or `table.key = ...` before any table
        if match is None or (current, bool(match[1])) not in ((table, False), ("", True)):
            continue
        try:  # the line alone is a TOML document: its value, unescaped
            document = tomllib.loads(line.strip())
        except tomllib.TOMLDecodeError:
            continue
        value = document[table][key] if match[1] else document[key]
        found = value if isinstance(value, str) else found
    return found


def load(path: str | None = None) -> Config:
    return load_all(path).config


def reread(config: Config) -> Config:
    """The configuration `config` was read from, read again with its
    drop-ins globbed afresh (ConfigError if it is no longer valid).  The
    embedded default stays the embedded default: a file appearing at
    /etc/evd/evd.toml later does not count."""
    if config.source == EMBEDDED_SOURCE:
        return parse(embedded_text(), EMBEDDED_SOURCE)
    return load(config.source)
