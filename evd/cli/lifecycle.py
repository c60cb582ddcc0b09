"""`evd run`, `start`, `stop`, `reload`, `status`: the daemon's life."""

from __future__ import annotations

import argparse
import math
import sys
from typing import TYPE_CHECKING

from evd.cli.failures import EX_CONFIG, EX_FAIL, EX_OK, RELOAD_TIMEOUT, error, load_config, report_reload
from evd.cli.targets import server_key, status_address
from evd.config.schema import DURATION_MAX, LEVELS, LOG_FORMATS

# `evd stop --timeout`: the bound the schema puts on every duration (a
# number select() and the clock take exactly).
STOP_TIMEOUT_MAX = DURATION_MAX

if TYPE_CHECKING:  # launch (and the whole server) is imported only by the commands that run it
    from evd.server.launch import Launch


def _prepare(args: argparse.Namespace, detach: bool) -> tuple[Launch | None, int]:
    """Steps 1-5 of server/launch.py: (Launch, 0) or (None, exit status)."""
    from evd.server import launch

    config = load_config(args)
    if config is None:
        return None, EX_CONFIG
    overrides = {"level": args.log_level, "format": args.log_format}
    try:
        return launch.prepare(config, overrides, detach), EX_OK
    except launch.StartError as exc:
        if exc.config_error:
            print(exc, file=sys.stderr)
            return None, EX_CONFIG
        error(str(exc))
        return None, EX_FAIL


def cmd_run(args: argparse.Namespace) -> int:
    from evd.server import launch

    prepared, status = _prepare(args, detach=False)
    if prepared is None:
        return status
    try:
        return launch.serve(prepared)
    except launch.StartError as exc:
        error(str(exc))
        return EX_CONFIG if exc.config_error else EX_FAIL


def cmd_start(args: argparse.Namespace) -> int:
    from evd.server import launch

    prepared, status = _prepare(args, detach=True)
    if prepared is None:
        return status
    if not prepared.config.log.file and prepared.config.log.format != "journal":
        error("note: log.file is not set, so the daemon's log goes to /dev/null")
    try:
        pid = launch.start(prepared)
    except launch.StartError as exc:
        error(str(exc))
        return EX_FAIL
    print(f"evd started, pid {pid}", flush=True)
    return EX_OK


def seconds(text: str) -> float:
    """`--timeout S`: a finite number of seconds, 0 to STOP_TIMEOUT_MAX
    (argparse turns the error into `evd stop: error: ...`, exit 2)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or not 0 <= value <= STOP_TIMEOUT_MAX:
        raise argparse.ArgumentTypeError(
            f"{text} is not a number of seconds from 0 to {STOP_TIMEOUT_MAX:.0f}"
        )
    return value


def cmd_stop(args: argparse.Namespace) -> int:
    from evd.tools import lifecycle

    config = load_config(args)
    if config is None:
        return EX_CONFIG
    timeout = args.timeout if args.timeout is not None else config.daemon.shutdown_timeout + 5
    status, message = lifecycle.stop(config.daemon.pidfile, timeout)
    print(message, file=sys.stdout if status == EX_OK else sys.stderr)
    return status


def cmd_reload(args: argparse.Namespace) -> int:
    from evd.tools import reload_answer

    config = load_config(args)
    if config is None:  # the daemon would refuse it too, and keep what it runs
        error("nothing reloaded: the configuration is invalid")
        return EX_FAIL
    outcome = reload_answer.reload(config, args.timeout)
    return report_reload(outcome.status, outcome.message)


def cmd_status(args: argparse.Namespace) -> int:
    from evd.tools import lifecycle

    config = load_config(args)
    if config is None:
        return EX_CONFIG
    status, lines = lifecycle.status(config.daemon.pidfile, status_address(config), server_key(config))
    print("\n".join(lines))
    return status


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    log_options = argparse.ArgumentParser(add_help=False)
    log_options.add_argument("--log-format", choices=LOG_FORMATS, help="override log.format")
    log_options.add_argument("--log-level", choices=LEVELS, help="override log.level")
    run = sub.add_parser("run", parents=[common, log_options], help="run in the foreground")
    run.set_defaults(func=cmd_run)
    start = sub.add_parser(
        "start", parents=[common, log_options], help="start in the background; return once it listens"
    )
    start.set_defaults(func=cmd_start)
    stop = sub.add_parser("stop", parents=[common], help="stop the daemon of the pidfile")
    stop.add_argument(
        "--timeout",
        type=seconds,
        metavar="S",
        help="seconds to wait for it to exit (default: daemon.shutdown_timeout + 5)",
    )
    stop.set_defaults(func=cmd_stop)
    reload = sub.add_parser(
        "reload",
        parents=[common],
        help="make the daemon re-read its configuration, and say whether it applied (exit 1 if not)",
    )
    reload.add_argument(
        "--timeout",
        type=seconds,
        default=RELOAD_TIMEOUT,
        metavar="S",
        help=f"how long to wait for the result (default {RELOAD_TIMEOUT:g})",
    )
    reload.set_defaults(func=cmd_reload)
    status = sub.add_parser(
        "status", parents=[common], help="is the daemon running? (exit 0 yes, 3 no, 1 stale)"
    )
    status.set_defaults(func=cmd_status)
