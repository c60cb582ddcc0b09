"""`evd check-config`: the configuration validated, then printed as TOML."""

from __future__ import annotations

import argparse
import sys

from evd.cli.exits import EX_CONFIG, EX_OK, config_errors, load_config
from evd.core import tomlout
from evd.core.config import ConfigError
from evd.server import preflight


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args)
    if config is None:
        return EX_CONFIG
    try:  # refuse everything `run` would
        preflight.check(config)
    except ConfigError as exc:
        config_errors(exc)
        return EX_CONFIG
    sys.stdout.write(tomlout.dump(config))
    return EX_OK


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    check = sub.add_parser(
        "check-config", parents=[common], help="validate the configuration and print it as TOML"
    )
    check.set_defaults(func=cmd_check_config)
