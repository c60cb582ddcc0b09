"""The `evd` command line (SPEC section 2).

One module per group of subcommands; each has `register(sub, common)`,
which adds its parsers, and `cmd_*` functions that return the exit status.
Modules that pull in the server or a client are imported inside the command
that needs them, so `evd call` does not load the daemon.
"""

from __future__ import annotations

import argparse

from evd import __version__
from evd.cli import bench, call, completion, configure, ctl, lifecycle, logs, manual, switch
from evd.config.model import DEFAULT_PATH

# Every subcommand group, in the order `evd --help` lists them.
GROUPS = (lifecycle, configure, switch, call, ctl, logs, bench)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c",
        "--config",
        metavar="PATH",
        help=f"configuration file (default: $EVD_CONFIG, then {DEFAULT_PATH}, then the embedded default)",
    )
    parser = argparse.ArgumentParser(prog="evd", description="evd: small network services on one event loop")
    parser.add_argument("--version", action="version", version=f"evd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.register(sub, common)
    # Written from the parser itself, so they come last (they walk the whole
    # parser when they run, so every command is in them).
    completion.register(sub, common, parser)
    manual.register(sub, parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return status
