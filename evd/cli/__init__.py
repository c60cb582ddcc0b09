"""The `evd` command line (SPEC section 2).

One module per group of subcommands; each has `register(sub, common)`,
which adds its parsers, and `cmd_*` functions that return the exit status.
Modules that pull in the server or a client are imported inside the command
that needs them, so `evd call` does not load the daemon.
"""

from __future__ import annotations

import argparse
import sys

from evd import __version__
from evd.cli import bench, call, completion, configure, ctl, failures, lifecycle, logs, manual, switch
from evd.cli.failures import EX_OK
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
    args = build_parser().parse_args(argv)  # argparse's own output ignores a closed pipe
    try:
        status: int = args.func(args)
        sys.stdout.flush()  # here, not at exit, so that a closed pipe is seen below
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        if not failures.stdout_closed():
            raise  # a socket's, not ours to hide
        failures.stdout_gone()  # `evd ctl services | head -3`: the reader has what it wanted
        return EX_OK
    return status
