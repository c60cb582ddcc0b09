"""`evd check-config` (the configuration validated, then printed as TOML)
and `evd explain` (what applies to one service, and which file said so)."""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys

from evd.cli.failures import EX_CONFIG, EX_OK, EX_SERVER, config_errors, error
from evd.config import loader, tomlout
from evd.config.model import SERVICE_NAMES, ConfigError
from evd.server import preflight


def _load(args: argparse.Namespace) -> loader.Loaded | None:
    try:
        return loader.load_all(args.config)
    except ConfigError as exc:
        config_errors(exc)
        return None


def cmd_check_config(args: argparse.Namespace) -> int:
    loaded = _load(args)
    if loaded is None:
        return EX_CONFIG
    try:  # refuse everything `run` would
        preflight.check(loaded.config)
    except ConfigError as exc:
        config_errors(loaded.origins.blame_all(exc))
        return EX_CONFIG
    if args.origin:
        sys.stdout.write(tomlout.dump(loaded.config, loaded.origins, loaded.files))
    else:
        sys.stdout.write(tomlout.dump(loaded.config))
    return EX_OK


def cmd_explain(args: argparse.Namespace) -> int:
    from evd.tools import explain

    if args.service not in SERVICE_NAMES:  # before the file: the answer does not depend on it
        error(f"unknown service {args.service} (known: {', '.join(SERVICE_NAMES)})")
        return EX_SERVER
    if args.proto == "unix" and args.from_ip:
        args.parser.error("--from does not apply to --proto unix: UNIX peers have no IP address")
    loaded = _load(args)
    if loaded is None:
        return EX_CONFIG
    answer = explain.explain(loaded, args.service, args.from_ip, args.proto)
    if args.json:
        print(json.dumps(answer))
    else:
        sys.stdout.write(explain.render(answer, loaded))
    return EX_OK


def _ip(text: str) -> str:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address: {text!r}") from None
    return text


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    check = sub.add_parser(
        "check-config", parents=[common], help="validate the configuration and print it as TOML"
    )
    check.add_argument(
        "--origin", action="store_true", help="after each key, the file that set it (# from FILE, # default)"
    )
    check.set_defaults(func=cmd_check_config)
    explain = sub.add_parser(
        "explain",
        parents=[common],
        help="what applies to a service, from which file; with --from, may that address connect",
    )
    explain.add_argument("service", metavar="SERVICE", help="a built-in or program service")
    explain.add_argument("--from", dest="from_ip", type=_ip, metavar="IP", help="the access verdict for IP")
    explain.add_argument(
        "--proto",
        choices=("tcp", "udp", "unix", "tls"),
        help="only the listeners and limits of this protocol",
    )
    explain.add_argument("--json", action="store_true", help="one JSON object (SPEC section 11)")
    explain.set_defaults(func=cmd_explain, parser=explain)
