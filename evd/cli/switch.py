"""`evd enable|disable SERVICE [--now]`: switch a service by a drop-in file."""

from __future__ import annotations

import argparse

from evd.cli.failures import EX_CONFIG, EX_FAIL, EX_OK, RELOAD_TIMEOUT, config_errors, error, report_reload
from evd.config.model import ConfigError


def cmd_switch(args: argparse.Namespace) -> int:
    from evd.tools import dropin, reload_answer

    enabled = args.command == "enable"
    try:
        plan = dropin.plan(args.config, args.service, enabled)
        if not plan.unchanged:
            dropin.write_atomically(plan.path, plan.text)
    except ConfigError as exc:
        config_errors(exc)
        error("nothing written: the configuration would be invalid")
        return EX_CONFIG
    except dropin.SwitchError as exc:
        error(str(exc))
        return EX_FAIL
    state = "enabled" if enabled else "disabled"
    if plan.unchanged:
        print(f"{args.service} {state} already ({plan.path} unchanged)")
    else:
        print(f"{args.service} {state}: wrote {plan.path}")
    if not args.now:
        return EX_OK
    outcome = reload_answer.reload(plan.loaded.config, args.timeout)
    return report_reload(outcome.status, outcome.message)


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    for command, verb in (("enable", "switch a service on"), ("disable", "switch a service off")):
        parser = sub.add_parser(
            command,
            parents=[common],
            help=f"{verb}: write the drop-in 50-SERVICE.toml (validated first)",
        )
        parser.add_argument("service", metavar="SERVICE", help="the service the drop-in switches")
        parser.add_argument("--now", action="store_true", help="then reload the running daemon and report")
        parser.add_argument(
            "--timeout",
            type=float,
            default=RELOAD_TIMEOUT,
            metavar="S",
            help=f"with --now: how long to wait for the reload's result (default {RELOAD_TIMEOUT:g})",
        )
        parser.set_defaults(func=cmd_switch)
