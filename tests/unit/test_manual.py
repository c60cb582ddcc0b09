"""The manual pages cannot drift: every configuration key the schema accepts
is in evd.toml(5) with a meaning, every subcommand and option the parser
accepts is in evd(8), and both pages are clean roff for mandoc and groff."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping

import pytest

from evd.cli import build_parser, manual
from evd.config import reference, schema


def _is_schema(value: object) -> bool:
    return (
        isinstance(value, Mapping)
        and bool(value)
        and all(isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str) for v in value.values())
    )


def schema_keys() -> Iterator[tuple[str, str]]:
    """(table, key) for every table of config/schema.py, found by looking
    rather than by a list that could miss a new one."""
    for name, value in vars(schema).items():
        if name.startswith("_"):
            continue
        if _is_schema(value):
            yield from ((name, key) for key in value)
        elif isinstance(value, Mapping) and value and all(_is_schema(v) for v in value.values()):
            yield from ((f"{name}[{service}]", key) for service, table in value.items() for key in table)


def documented_keys() -> set[str]:
    """`TABLE.KEY` as evd.toml(5) lists them (limits appear under [limits])."""
    page = manual.body("evd.toml", build_parser())
    found, table = set(), ""
    for line in page.splitlines():
        if re.fullmatch(r"\[[^\]]+\].*|TOP LEVEL", line):
            table = line
        elif m := re.match(r"\*\*([A-Za-z0-9_\\-]+)\*\* \(", line):
            found.add(f"{table} {m.group(1).replace(chr(92), '')}")
    return found


def test_every_schema_key_is_in_evd_toml_5_with_a_meaning() -> None:
    listed = {entry.rsplit(" ", 1)[1] for entry in documented_keys()}
    missing = sorted({f"{table}.{key}" for table, key in schema_keys() if key not in listed})
    assert not missing, f"keys missing from evd.toml(5) (config/reference.py tables()): {missing}"
    assert reference.undocumented() == [], (
        "comment these keys in etc/evd.toml (or add them to reference.NOTES)"
    )


def test_every_service_table_lists_its_own_keys() -> None:
    """A key added to one service's table shows up under that table."""
    by_table: dict[str, set[str]] = {}
    for entry in documented_keys():
        table, key = entry.rsplit(" ", 1)
        by_table.setdefault(table, set()).add(key)
    for service, keys in schema.SERVICE_KEYS.items():
        tables = [t for t in by_table if re.search(rf"\b{service}\b", t) and t.startswith("[services.")]
        assert tables, f"no table for services.{service} in evd.toml(5)"
        own = set(keys) - set(schema.LIMITS)
        assert own <= by_table[tables[0]], f"services.{service}: missing {sorted(own - by_table[tables[0]])}"


def commands(parser: argparse.ArgumentParser, words: tuple[str, ...] = ("evd",)) -> Iterator[tuple[str, ...]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*words, name)
                yield from commands(sub, (*words, name))


def test_every_subcommand_and_option_is_in_evd_8() -> None:
    parser = build_parser()
    page = manual.body("evd", parser)
    unescaped = page.replace("\\", "")
    subparsers = {words: sub for words, sub in _parsers(parser)}
    for words in commands(parser):
        assert f"**{' '.join(words)}**" in unescaped, f"{' '.join(words)} missing from evd(8)"
        section = unescaped.split(f"**{' '.join(words)}**", 1)[1]
        for action in manual.options(subparsers[words]):
            for option in action.option_strings:
                assert f"**{option}**" in section, f"{' '.join(words)} {option} missing from evd(8)"


def _parsers(parser: argparse.ArgumentParser, words: tuple[str, ...] = ("evd",)):  # type: ignore[no-untyped-def]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*words, name), sub
                yield from _parsers(sub, (*words, name))


def test_text_escapes_markup_and_keeps_code() -> None:
    assert manual.text("a_b *c* `x_y`") == r"a\_b \*c\* ``x_y``"
    assert manual.text("... and more").startswith("\\.")


@pytest.mark.parametrize("page", sorted(manual.PAGES))
def test_roff_is_clean_for_mandoc_and_groff(page: str) -> None:
    roff = manual.roff(page, build_parser())
    assert roff.startswith('.\\"') and ".TH" in roff and roff.isascii()
    linted = False
    if shutil.which("mandoc"):
        lint = subprocess.run(
            ["mandoc", "-T", "lint", "-W", "warning"], input=roff, capture_output=True, text=True, timeout=30
        )
        assert lint.stdout + lint.stderr == "", lint.stdout + lint.stderr
        linted = True
    if shutil.which("groff"):
        warn = subprocess.run(
            ["groff", "-man", "-ww", "-z"], input=roff, capture_output=True, text=True, timeout=30
        )
        assert warn.returncode == 0 and warn.stderr == "", warn.stderr
        linted = True
    if not linted:
        pytest.skip("neither mandoc nor groff is installed (Debian: mandoc, groff-base)")


@pytest.mark.skipif(shutil.which("man") is None, reason="man is not installed (Debian: man-db)")
def test_man_renders_the_page_through_evd_man(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "evd.toml.5"
    path.write_text(manual.roff("evd.toml", build_parser()))
    shown = subprocess.run(
        ["man", "-l", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        env={"MANPAGER": "cat", "PATH": "/usr/bin:/bin"},
    )
    assert shown.returncode == 0, shown.stderr
    assert "shutdown_timeout" in shown.stdout and "max_connections" in shown.stdout
