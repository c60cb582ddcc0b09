"""Drop-in files: which ones, merged how, and which file set each key.

`include` (main file only) lists glob patterns.  Each pattern's matches are
taken in lexical order of their full paths, patterns in the order given, a
path matched twice read once (at its first place).  glob skips names that
start with ".", so editors' swap files and `evd enable`'s temporary file are
never read half-written.

Merging works on the parsed TOML documents, before validation, so the
validator (config/validate.py) sees one document and judges it exactly as it
judges a single file: tables merge key by key, anything else -- a scalar,
a list -- is replaced whole by the later file.  `[commands.NAME]` tables are
tables, so the allow-list is the union of every file's commands (a later
`[commands.NAME]` changes only the keys it names).

`Origins` remembers, for every value, the last file that set it, and for
every table the last file that touched it: `check-config --origin` and
`evd explain` print it, and a validation error is prefixed with the file
its key came from ("FILE: KEY.PATH: message").  Errors in the main file
keep the plain "KEY.PATH: message" form.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from evd.config.model import ConfigError

Path = tuple[str, ...]
Document = dict[str, Any]

# A service's limits fall back to [limits]: services.X.K is in force as
# limits.K unless the service's table sets it (config/validate.py `_service`).
_LIMIT_KEY = re.compile(r"services\.[^.]+\.(?P<key>.+)")
# Other keys an error message names (a listener clash names both).
_KEY = re.compile(r"\b[a-z_]+(?:\.[A-Za-z0-9_-]+)+(?:\[\d+\])?")
# Tables whose entries are independent: services, commands, keys.
COLLECTIONS = ("services", "commands", "keys")


def matches(path: str, pattern: str) -> bool:
    """Would glob(pattern) find `path` if it existed?  Component by
    component, a leading "." matched only by a leading "." (as glob does)."""
    names, parts = path.split("/"), pattern.split("/")
    return len(names) == len(parts) and all(
        fnmatch.fnmatchcase(name, part) and (not name.startswith(".") or part.startswith("."))
        for name, part in zip(names, parts, strict=True)
    )


def expand(patterns: Iterable[str], skip: str | None = None, extra: Iterable[str] = ()) -> list[str]:
    """The files the patterns match, in reading order.  `skip` (the main
    file) is never its own drop-in, even if a pattern matches it; `extra`
    are paths to take as existing (a file `evd enable` is about to write)."""
    skipped = os.path.realpath(skip) if skip else None
    extra = list(extra)
    seen: set[str] = set()
    files = []
    for pattern in patterns:
        found = set(glob.glob(pattern)) | {p for p in extra if matches(p, pattern)}
        for path in sorted(found):
            if path in seen or (skipped and os.path.realpath(path) == skipped):
                continue
            seen.add(path)
            files.append(path)
    return files


def _dotted(path: Path) -> str:
    return ".".join(path)


class Origins:
    """Which file set each key: values by their full path, tables by the
    last file that touched them (set or merged into)."""

    def __init__(self, main: str | None) -> None:
        self.main = main  # None: the embedded default, whose values are the defaults
        self.values: dict[str, str] = {}
        self.tables: dict[str, str] = {}

    def record(self, value: object, path: Path, file: str) -> None:
        """`value` (a table or not) was set at `path` by `file`."""
        if isinstance(value, dict):
            self.tables[_dotted(path)] = file
            for key, item in value.items():
                self.record(item, path + (key,), file)
        else:
            self.values[_dotted(path)] = file

    def forget(self, path: Path) -> None:
        """A later file replaced the whole of `path`: what was under it is gone."""
        prefix = _dotted(path)
        for table in (self.values, self.tables):
            for key in [k for k in table if k == prefix or k.startswith(prefix + ".")]:
                del table[key]

    def of(self, dotted: str) -> str | None:
        """The file that set this value, or None: the default.  A service's
        limit not set in its table is the [limits] value in force for it."""
        found = self.values.get(dotted)
        if found is None and (limit := _LIMIT_KEY.fullmatch(dotted)):
            found = self.values.get(f"limits.{limit['key']}")
        return found

    def blame(self, error: str) -> str:
        """One "KEY.PATH: message" error, prefixed with the drop-in file
        it comes from: the file that set KEY.PATH; else, for a clash, the
        file that set the other key the message names; else the file that
        last touched the nearest table around KEY.PATH."""
        key, _, message = error.partition(": ")
        file = self._value(key)
        if file is None:
            file = next(filter(None, map(self._value, _KEY.findall(message))), None)
        if file is None:
            file = self._table(key)
        return error if file is None or file == self.main else f"{file}: {error}"

    def _value(self, key: str) -> str | None:
        """Who set this value ("services.echo.tcp[0]": the list)."""
        return self.values.get(key.partition("[")[0])

    def _table(self, key: str) -> str | None:
        """Who last touched the nearest table around `key`; never a whole
        collection ([services], [commands], [keys]) for a key inside it:
        the last file to touch any service says nothing about this one."""
        cuts = [m.start() for m in re.finditer(r"[.\[]", key)]
        for candidate in [key] + [key[:i] for i in reversed(cuts)]:
            if candidate in COLLECTIONS and candidate != key:
                return None
            if candidate in self.tables:
                return self.tables[candidate]
        return None

    def blame_all(self, exc: ConfigError) -> ConfigError:
        return ConfigError([self.blame(e) for e in exc.errors])


def merge(into: Document, overlay: Mapping[str, Any], file: str, origins: Origins, path: Path = ()) -> None:
    """Merge one file's document into the merged one, in place."""
    if path:
        origins.tables[_dotted(path)] = file
    for key, value in overlay.items():
        here = path + (key,)
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value, file, origins, here)
            continue
        if key in into:
            origins.forget(here)
        into[key] = value
        origins.record(value, here, file)
