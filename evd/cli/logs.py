"""`evd logs summary|show [FILE...]`: read evd's JSON logs back (SPEC
sections 2, 8 and 12), from files, stdin or the journal.  Offline: no
daemon; the configuration only says where the log is when no FILE is given."""

from __future__ import annotations

import argparse
import os
import stat
import sys
from typing import TYPE_CHECKING

from evd.cli.failures import EX_FAIL, EX_OK, error
from evd.tools.logs.events import LEVEL_RANK, TimeSpecError, parse_time_spec
from evd.tools.logs.journalctl import DEFAULT_UNIT

if TYPE_CHECKING:
    from evd.tools.logs.journalctl import Journal

FOLLOW_TAIL = 10  # lines shown before following, as `tail -f` does


def _stdin_has_input() -> bool:
    """stdin is a pipe, a socket or a file: `journalctl ... | evd logs` reads it."""
    try:
        mode = os.fstat(0).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode) or stat.S_ISSOCK(mode)


def source(args: argparse.Namespace) -> Journal | None:
    """The journal to read, or None for `args.files` (which this may fill
    in).  The journal when asked for (--journal, -u, -D, --journal-file);
    with no FILE and nothing piped in, where the configuration logs: the
    journal for format = "journal", else log.file, else stdin."""
    from evd.tools.logs.journalctl import Journal

    asked = args.journal or args.unit or args.directory or args.journal_file
    if asked:
        if args.files:
            raise SystemExit(
                _usage(args, "FILE and the journal (--journal, -u, -D, --journal-file) exclude each other")
            )
        return Journal(args.unit, args.directory, list(args.journal_file or ()))
    if args.files or _stdin_has_input():
        return None
    from evd.config import loader
    from evd.config.model import ConfigError

    try:
        config = loader.load(args.config)
    except ConfigError:
        return None  # no configuration to go by: stdin, as without one
    if config.log.format == "journal":
        return Journal()
    if config.log.file:
        args.files = [config.log.file]
    return None


def _usage(args: argparse.Namespace, message: str) -> int:
    error(f"logs {args.verb}: {message}")
    return 2


def _time(text: str) -> str:
    try:
        return parse_time_spec(text)
    except TimeSpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _peer(text: str) -> str:
    """`--peer`, checked here so that a bad one is a usage error (exit 2)
    like every other option; show.peer_matcher reads it."""
    import ipaddress

    if text != "unix":
        try:
            ipaddress.ip_network(text.strip("[]"), strict=False)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an IP address, a CIDR or 'unix'") from None
    return text


def _top(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError("must be 0 (every client) or more")
    return n


def cmd_summary(args: argparse.Namespace) -> int:
    import orjson

    from evd.tools.logs import reading, report, runner

    selection = runner.Selection(args.since, args.until, args.service)
    journal = source(args)
    try:
        if journal is not None:
            summary, errors = runner.summarise_journal(journal, selection)
        else:
            summary, errors = runner.summarise(args.files, selection)
    except reading.InputError as exc:
        error(str(exc))
        return EX_FAIL
    for problem in errors:
        error(f"{problem} (what was read before counts)")
    if args.json and summary.overlong:  # the text report says it in its first line
        error(f"{summary.overlong} lines over {reading.MAX_LINE >> 20} MiB were skipped")
    result = summary.to_json(args.top)
    try:
        if args.json:
            sys.stdout.buffer.write(orjson.dumps(result, option=orjson.OPT_NON_STR_KEYS) + b"\n")
        else:
            sys.stdout.write(report.render(result, summary.extras(), args.top) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        from evd.tools.logs.show import stdout_gone

        stdout_gone()  # `| head`: the reader has what it wanted
    return EX_FAIL if errors else EX_OK


def cmd_show(args: argparse.Namespace) -> int:
    from evd.tools.logs import show

    journal = source(args)
    options = show.Options(
        files=args.files,
        events=args.event,
        service=args.service,
        peer=args.peer,
        level=args.level,
        since=args.since,
        until=args.until,
        json=args.json,
        follow=args.follow,
        tail=None if args.since else FOLLOW_TAIL,
        journal=journal,
    )
    try:
        return show.run(options)
    except show.ShowError as exc:
        error(str(exc))
        return EX_FAIL


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    logs = sub.add_parser(
        "logs",
        help="read evd's JSON logs back: summary, show",
        description="Read evd's JSON log lines from files, .gz files or stdin (no FILE, or -), "
        "or the journal's entries (--journal).",
    )
    verbs = logs.add_subparsers(dest="verb", required=True, metavar="VERB")
    selection = argparse.ArgumentParser(add_help=False)
    selection.add_argument(
        "files", nargs="*", metavar="FILE", help="log files, plain or .gz, in order; - = stdin"
    )
    selection.add_argument(
        "--since",
        type=_time,
        metavar="T",
        help="from T: ISO 8601 (UTC unless an offset is given) or 30m, 2h, 7d ago",
    )
    selection.add_argument("--until", type=_time, metavar="T", help="before T (same forms)")
    selection.add_argument("--service", metavar="NAME", help="only the lines about this service")
    selection.add_argument("--json", action="store_true", help="machine-readable output")
    journal = selection.add_argument_group("the journal (through journalctl -o json)")
    journal.add_argument(
        "--journal",
        action="store_true",
        help="read the journal: the default with no FILE when log.format is journal",
    )
    journal.add_argument(
        "-u", "--unit", metavar="UNIT", help=f"the unit's entries (default {DEFAULT_UNIT}); implies --journal"
    )
    journal.add_argument(
        "-D", "--directory", metavar="DIR", help="journal files in DIR (journalctl -D); implies --journal"
    )
    journal.add_argument(
        "--journal-file",
        action="append",
        metavar="FILE",
        help="this journal file (journalctl --file; repeatable); implies --journal",
    )

    summary = verbs.add_parser(
        "summary",
        parents=[common, selection],
        help="what happened: per service, top clients, commands, errors",
        description="Connections, close reasons, durations (nearest-rank p50/p95/p99/max), bytes, "
        "refusals per service; the top client IPs; commands; errors; reloads; starts and stops.",
    )
    summary.add_argument(
        "--top", type=_top, default=10, metavar="N", help="client IPs listed (default 10; 0 = all)"
    )
    summary.set_defaults(func=cmd_summary)

    show = verbs.add_parser(
        "show",
        parents=[common, selection],
        help="the selected lines, for a person (or unchanged with --json)",
        description="Print the selected log lines: coloured on a terminal, plain when piped "
        "(NO_COLOR is honoured), unchanged with --json.",
    )
    show.add_argument(
        "--event", action="append", metavar="GLOB", help="event name pattern, e.g. 'conn.*' (repeatable)"
    )
    show.add_argument(
        "--peer", type=_peer, metavar="IP", help="client IP or CIDR (IPv6 without brackets), or 'unix'"
    )
    show.add_argument(
        "--level", choices=[lvl for lvl in LEVEL_RANK if lvl != "exception"], help="this level and above"
    )
    show.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="keep reading as the file (or the journal) grows, across a logrotate rename (starts with the "
        f"last {FOLLOW_TAIL} selected lines, or journal entries, unless --since is given)",
    )
    show.set_defaults(func=cmd_show)
