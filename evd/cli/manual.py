"""`evd man PAGE`: the manual pages evd(8) and evd.toml(5), written from the
parser and the configuration schema.

Nothing here is typed twice: evd(8) walks `build_parser()` (every subcommand,
option, choice and default, with the parser's own help), evd.toml(5) walks
config/reference.py (every key with its type, default and the comment that
explains it in etc/evd.toml).  Each page is reStructuredText first; docutils'
manual page writer (the one Sphinx's man builder is built on) turns it into
roff, and the HTML manual (docs/reference/) renders the same text.  An
installed evd therefore carries its pages with it: `evd man evd.toml | man -l -`.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

from evd import __version__
from evd.cli.failures import EX_OK
from evd.config import loader, reference
from evd.config.model import DEFAULT_PATH

_CODE = re.compile(r"`([^`]+)`")
_SPECIAL = re.compile(r"([\\*|_])")


def text(s: str) -> str:
    """Plain words as reStructuredText: `code` spans become literals, markup
    characters are escaped, and a leading punctuation mark cannot start a
    list or a comment."""
    parts = _CODE.split(s)
    out = "".join(
        (f"``{p}``" if p.strip() == p and p else p) if i % 2 else _SPECIAL.sub(r"\\\1", p)
        for i, p in enumerate(parts)
    )
    return "\\" + out if out[:1] in "-+.#:=" and out else out


def _literal(s: str) -> str:
    return f"``{s}``" if s and "``" not in s and s.strip() == s else text(s)


def _header(title: str, char: str = "=") -> list[str]:
    return [title, char * len(title), ""]


def _indent(lines: list[str], by: str = "    ") -> list[str]:
    return [by + line if line else "" for line in lines]


# -- evd(8): the command line ---------------------------------------------------


def _subcommands(parser: argparse.ArgumentParser) -> Iterator[tuple[str, str, argparse.ArgumentParser]]:
    """(name, help, parser) of each subcommand, in the order --help lists them."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, helps.get(name, ""), sub


def _option_term(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"*{text(str(action.metavar or action.dest).upper())}*"
    names = ", ".join(f"**{text(o)}**" for o in action.option_strings)
    if action.nargs == 0:
        return names
    metavar = action.metavar or (None if action.choices else action.dest.upper())
    return (
        f"{names} *{text(str(metavar))}*"
        if metavar
        else f"{names} {{{','.join(map(str, action.choices or ()))}}}"
    )


def _option_body(action: argparse.Action) -> str:
    help_ = action.help or ""
    words = [help_ if help_[-1:] in (".", ")", "?", "") else f"{help_}."]
    if action.choices and not isinstance(action, argparse._SubParsersAction):
        words.append(f"One of {', '.join(map(str, action.choices))}.")
    shown = action.default not in (None, False, argparse.SUPPRESS, [])
    if shown and "default" not in (action.help or ""):
        words.append(f"Default: {action.default}.")
    return text(" ".join(w for w in words if w)) or "(no description)"


def options(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    """The options and arguments a page documents (not --help, nor the
    subcommand choice itself)."""
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        if action.help == argparse.SUPPRESS:
            continue
        yield action


def _command(words: list[str], summary: str, parser: argparse.ArgumentParser) -> list[str]:
    usage = " ".join(parser.format_usage().split())
    usage = usage.removeprefix("usage: ")
    lines = [f"**{text(' '.join(words))}**", *_indent([text(usage), ""])]
    about = " ".join(w for w in (summary, parser.description or "") if w)
    if about:
        lines += _indent([text(" ".join(about.split())), ""])
    for action in options(parser):
        lines += _indent([_option_term(action), *_indent([_option_body(action)]), ""])
    for name, help_, sub in _subcommands(parser):
        lines += _command([*words, name], help_, sub)
    return lines


def evd_page(parser: argparse.ArgumentParser) -> list[str]:
    lines = _header("SYNOPSIS")
    lines += ["**evd** [**--version**] *COMMAND* [*OPTIONS*] [*ARGUMENTS*]", ""]
    lines += _header("DESCRIPTION")
    lines += [
        text(
            "evd serves the classic small network services (echo, discard, chargen, daytime, time, "
            "timefmt) and a framed request/response port from one process and one event loop. "
            "The same command starts and stops the daemon, steers a running one (`evd ctl`), "
            "reads its logs back (`evd logs`) and talks to it as a client (`evd call`, `evd bench`)."
        ),
        "",
        text(
            f"Every command takes `-c PATH`; without it, the file named by $EVD_CONFIG, then "
            f"{DEFAULT_PATH}, then the embedded default configuration (see evd.toml(5))."
        ),
        "",
    ]
    lines += _header("COMMANDS")
    for name, help_, sub in _subcommands(parser):
        lines += _command(["evd", name], help_, sub)
    lines += _header("EXIT STATUS")
    lines += [
        text(
            "0 success; 1 a failure to start, stop, reach or reload the daemon; 2 a refusal from the "
            "server or the daemon, an unknown service, or a usage error; 3 (status) not running; "
            "78 an invalid configuration, every error listed as KEY.PATH: message."
        ),
        "",
    ]
    lines += _header("ENVIRONMENT")
    lines += ["**EVD_CONFIG**", *_indent(["The configuration file when -c is not given.", ""])]
    lines += _header("FILES")
    lines += [f"*{text(DEFAULT_PATH)}*", *_indent(["The configuration file, if it exists.", ""])]
    lines += _header("SEE ALSO")
    lines += ["**evd.toml**\\ (5), **systemctl**\\ (1), **journalctl**\\ (1), **logrotate**\\ (8)", ""]
    return lines


# -- evd.toml(5): the configuration ---------------------------------------------


def config_page() -> list[str]:
    lines = _header("SYNOPSIS")
    lines += [f"*{text(DEFAULT_PATH)}*, and the drop-in files its **include** names", ""]
    lines += _header("DESCRIPTION")
    for paragraph in reference.preamble(loader.embedded_text())[1:]:
        lines += [text(paragraph), ""]
    lines += [text("`evd check-config` prints the effective configuration: every key below, set."), ""]
    for table in reference.tables():
        lines += _header(table.header or "TOP LEVEL", "-")
        for paragraph in table.about:
            lines += [text(paragraph), ""]
        for key in table.keys:
            lines += [f"**{text(key.name)}** ({text(key.kind)}; default {_literal(key.default)})"]
            lines += _indent([text(key.meaning), ""])
    lines += _header("SEE ALSO")
    lines += ["**evd**\\ (8)", ""]
    return lines


# name -> (section, one-line description, body)
PAGES: dict[str, tuple[int, str, Callable[[argparse.ArgumentParser], list[str]]]] = {
    "evd": (8, "small network services on one event loop", evd_page),
    "evd.toml": (5, "the configuration of evd", lambda _parser: config_page()),
}


def body(name: str, parser: argparse.ArgumentParser) -> str:
    """A page's sections as reStructuredText (what docs/ renders)."""
    return "\n".join(PAGES[name][2](parser)) + "\n"


def rst(name: str, parser: argparse.ArgumentParser) -> str:
    """The whole page: title, the fields the manpage writer reads, body."""
    section, summary, _ = PAGES[name]
    rule = "=" * len(name)
    today = datetime.now(UTC).date().isoformat()
    head = [rule, text(name), rule, "", "-" * len(summary), summary, "-" * len(summary), ""]
    head += [f":Manual section: {section}", ":Manual group: evd", f":Version: evd {__version__}"]
    head += [f":Date: {today}", ""]
    return "\n".join(head) + "\n" + body(name, parser)


def roff(name: str, parser: argparse.ArgumentParser) -> str:
    """The page as roff for man(1)."""
    from docutils.core import publish_string  # only `evd man` needs docutils
    from docutils.writers import manpage

    out = publish_string(
        rst(name, parser),
        writer=manpage.Writer(),
        settings_overrides={"report_level": 2, "halt_level": 2, "output_encoding": "unicode"},
    )
    # The writer starts every section with a paragraph break; right after
    # .SH/.SS that break is redundant, and mandoc -T lint warns about it.
    page = re.sub(r"^(\.S[HS] [^\n]*\n)\.sp\n", r"\1", str(out), flags=re.MULTILINE)
    # roff input is ASCII: "—" and friends as named Unicode escapes.
    return re.sub(r"[^\x00-\x7f]", lambda m: f"\\[u{ord(m.group()):04X}]", page)


def cmd_man(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.root_parser
    page = rst(args.page, parser) if args.rst else roff(args.page, parser)
    sys.stdout.write(page)
    return EX_OK


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], root: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "man",
        help="print a manual page (evd, evd.toml) as roff: evd man evd.toml | man -l -",
        description="Print a manual page, written from this evd's own parser and configuration schema.",
    )
    p.add_argument(
        "page", choices=tuple(PAGES), help="evd: the commands (8); evd.toml: the configuration (5)"
    )
    p.add_argument("--rst", action="store_true", help="print the reStructuredText source instead of roff")
    p.set_defaults(func=cmd_man, root_parser=root)
