"""`evd ctl COMMAND [ARGS...]`: the runtime control client (SPEC section 9)."""

from __future__ import annotations

import argparse
import json

from evd.cli.failures import EX_CONFIG, EX_FAIL, EX_OK, config_errors, error
from evd.config import loader
from evd.config.model import ConfigError

DEFAULT_TIMEOUT = 10.0  # seconds: a reload binds a few sockets and reads a few files


def _options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """The options, accepted before COMMAND (the group's parser) and after
    it (the parser of the words, whose defaults must not undo the first)."""
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--socket",
        metavar="PATH",
        default=default,
        help="control socket (default: the config's control.unix)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="print the answer as one JSON object",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=argparse.SUPPRESS if suppress else DEFAULT_TIMEOUT,
        metavar="S",
        help=f"how long to wait for the answer (default {DEFAULT_TIMEOUT:g})",
    )


def _words(args: argparse.Namespace) -> argparse.Namespace:
    """COMMAND, its arguments and any option among them."""
    from evd.server.control.verbs import USAGE

    parser = argparse.ArgumentParser(prog="evd ctl", description=USAGE)
    parser.add_argument("-c", "--config", metavar="PATH", default=argparse.SUPPRESS)
    _options(parser, suppress=True)
    parser.add_argument("command", metavar="COMMAND")
    parser.add_argument("args", nargs="*", metavar="ARG")
    if not args.words or all(w.startswith("-") for w in args.words if w != "--"):
        if "-h" in args.words or "--help" in args.words:
            parser.print_help()
            raise SystemExit(0)
        parser.error(f"a COMMAND is needed: {USAGE}")
    return parser.parse_intermixed_args(args.words, namespace=args)


def _socket_of(args: argparse.Namespace) -> str | int:
    """The configuration's control.unix, or the exit status after saying
    why there is none.  An operator in the middle of an edit must still be
    able to ask the daemon: when the configuration does not load, the key
    is taken from what can still be read (loader.salvage)."""
    try:
        config = loader.load(args.config)
    except ConfigError as exc:
        path = loader.salvage(args.config, "control", "unix")
        if path:
            error(f"the configuration has errors (evd check-config lists them); using control.unix {path}")
            return path
        found = _socket_of_pidfile(args)
        if found:
            error(f"the configuration has errors (evd check-config lists them); using {found[1]}")
            return found[0]
        config_errors(exc)
        error(
            "the configuration has errors, no control.unix can be read from it and the pidfile's "
            "daemon has no control socket; give --socket"
        )
        return EX_CONFIG
    if not config.control.unix:
        error(f"no control socket: set control.unix in {config.source}, or give --socket")
        return EX_FAIL
    return config.control.unix


def _socket_of_pidfile(args: argparse.Namespace) -> tuple[str, str] | None:
    """The control socket of the daemon the pidfile names (daemon.pidfile as
    far as it can be read, else its default): its UNIX listener that
    answers as that daemon, and how it was found; None if there is none."""
    from evd.config.model import DaemonConfig
    from evd.system.pidfile import PidfileError, probe
    from evd.tools import ctl

    pidfile = loader.salvage(args.config, "daemon", "pidfile") or DaemonConfig().pidfile
    try:
        state = probe(pidfile)
    except PidfileError:
        return None
    if not state.running or state.pid is None:
        return None
    found = ctl.control_socket_of(state.pid, args.timeout)
    if found is None:
        return None
    return found, f"{found}, the control socket of pid {state.pid} (from {pidfile})"


def cmd_ctl(args: argparse.Namespace) -> int:
    from evd.proto.control import EXIT_STATUS, Request
    from evd.server.control.verbs import parse
    from evd.tools import ctl

    args = _words(args)
    path = args.socket if args.socket is not None else _socket_of(args)
    if not isinstance(path, str):
        return path
    request = parse({"cmd": args.command, "args": args.args})
    if not isinstance(request, Request):  # checked here too: a clear usage line, no round trip
        error(request.message or "bad request")
        return EXIT_STATUS.get(request.code or "", EX_FAIL)
    try:
        answer = ctl.request(path, request, args.timeout)
    except OSError as exc:
        error(f"cannot talk to evd at {path}: {exc.strerror or exc}")
        return EX_FAIL
    if args.json:
        body = answer.body if answer.body is not None else {"ok": False, "error": answer.header()["error"]}
        print(json.dumps(body))
    elif answer.ok and answer.body is not None:
        print("\n".join(ctl.render(request.command, answer.body)))
    if answer.ok:
        return EX_OK
    error(answer.message or "refused")
    return EXIT_STATUS.get(answer.code or "", EX_FAIL)


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    parser = sub.add_parser(
        "ctl",
        parents=[common],
        help="ask or steer the running daemon through its control socket",
        # The commands come from the daemon's verb table, loaded only by
        # `evd ctl` itself: `evd ctl` alone lists them with their arguments.
        description="evd ctl COMMAND [ARG...]: `evd ctl` alone lists the commands",
    )
    _options(parser, suppress=False)
    parser.add_argument(
        "words",
        nargs=argparse.REMAINDER,
        metavar="COMMAND [ARG...]",
        help="the control command and its arguments",
    )
    parser.set_defaults(func=cmd_ctl)
