"""`evd logs summary|show [FILE...]`: read evd's JSON logs back (SPEC
sections 2 and 8).  Offline: no configuration, no daemon."""

from __future__ import annotations

import argparse
import sys

from evd.cli.failures import EX_FAIL, EX_OK, error
from evd.tools.logs.events import LEVEL_RANK, TimeSpecError, parse_time_spec

FOLLOW_TAIL = 10  # lines shown before following, as `tail -f` does


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
    try:
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
        description="Read evd's JSON log lines from files, .gz files or stdin (no FILE, or -).",
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
        help=f"keep reading as the file grows, across a logrotate rename (starts with the last {FOLLOW_TAIL} "
        "selected lines unless --since is given)",
    )
    show.set_defaults(func=cmd_show)
