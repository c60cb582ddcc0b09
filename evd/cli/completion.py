"""`evd completion bash|zsh`: a completion script written from the parser.

shtab turns the argparse parser into bash and zsh completion, so every
subcommand, option and fixed choice is completed without a list kept by
hand.  What the parser cannot know is added here, by naming the actions
that take such values (`DYNAMIC`): service names come from the
configuration when the user presses TAB (the script runs `evd completion
--values services`, which reads the same file `evd` would), the `ctl`
commands from the control protocol's own table, log event names from
`EVENTS`.  A test completes `evd ct<TAB>` and `evd ctl <TAB>` through the
real bash functions.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

from evd.cli.failures import EX_OK
from evd.config import loader
from evd.config.model import DISPATCHABLE, ConfigError

SHELLS = ("bash", "zsh")
# The log events `evd logs show --event` completes (SPEC sections 6-14);
# a pattern is completed as typed, so these are the common starting points.
EVENTS = (
    "daemon.start", "daemon.ready", "daemon.stop", "listener.open", "listener.close", "listener.backoff",
    "conn.open", "conn.close", "conn.reject", "request", "udp.drop", "tls.fail", "auth.ok", "auth.fail",
    "command.start", "command.end", "config.reload", "ctl", "error", "log.dropped", "log.reopen",
    "worker.start", "worker.exit", "worker.ready", "worker.reload", "worker.stop",
    "systemd.adopt", "systemd.socket", "conn.*", "command.*", "auth.*", "worker.*",
)  # fmt: skip

_BASH = """
_evd_values() {{
  # $1: services (from the configuration evd would read)
  command evd completion --values "$1" 2>/dev/null
}}
_evd_services() {{
  compgen -W "$(_evd_values services)" -- "$1"
}}
_evd_events() {{
  compgen -W "{events}" -- "$1"
}}
_evd_ctl_words() {{
  # The first word is a ctl command; after one that names a service, a service.
  local i word command=""
  for (( i = 2; i < COMP_CWORD; i++ )); do
    word="${{COMP_WORDS[i]}}"
    case "$word" in -*) continue ;; esac
    command="$word"; break
  done
  if [ -z "$command" ]; then
    compgen -W "{commands}" -- "$1"
  elif [[ " {takes_service} " == *" $command "* && $(( COMP_CWORD - i )) == 1 ]]; then
    _evd_services "$1"
  fi
}}
_evd_dispatchable() {{
  compgen -W "{dispatchable}" -- "$1"
}}
"""

_ZSH = """
_evd_services() {{
  local -a names
  names=(${{(f)"$(command evd completion --values services 2>/dev/null)"}})
  compadd -a names
}}
_evd_events() {{
  compadd {events}
}}
_evd_ctl_words() {{
  compadd {commands}
}}
_evd_dispatchable() {{
  compadd {dispatchable}
}}
"""

# (subcommand path, action dest) -> the shell function that completes it.
DYNAMIC = {
    (("explain",), "service"): "_evd_services",
    (("enable",), "service"): "_evd_services",
    (("disable",), "service"): "_evd_services",
    (("logs", "summary"), "service"): "_evd_services",
    (("logs", "show"), "service"): "_evd_services",
    (("logs", "show"), "event"): "_evd_events",
    (("ctl",), "words"): "_evd_ctl_words",
    (("call",), "service"): "_evd_dispatchable",
}
# Options and arguments that name files.
FILE_METAVARS = ("PATH", "FILE")


def _parsers(
    parser: argparse.ArgumentParser, words: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield words, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*words, name))


def _preamble(shell: str) -> str:
    # The `evd ctl` commands from the daemon's verb table (loaded only to
    # write a script), and those whose next word is a service name.
    from evd.server.control.verbs import PUBLIC

    takes_service = [
        name for name, usage in PUBLIC.items() if usage.split()[1:2] in (["SERVICE"], ["[SERVICE]"])
    ]
    template = _BASH if shell == "bash" else _ZSH
    return template.format(
        events=" ".join(EVENTS),
        commands=" ".join(PUBLIC),
        takes_service=" ".join(takes_service),
        dispatchable=" ".join(DISPATCHABLE),
    )


def annotate(parser: argparse.ArgumentParser) -> None:
    """Tell shtab which actions take files or values it cannot know."""
    import shtab

    for words, sub in _parsers(parser):
        for action in sub._actions:
            function = DYNAMIC.get((words, action.dest))
            if function is not None:
                action.complete = {"bash": function, "zsh": function}  # type: ignore[attr-defined]
            elif action.metavar in FILE_METAVARS:
                action.complete = shtab.FILE  # type: ignore[attr-defined]


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    import shtab  # only `evd completion` needs it

    annotate(parser)
    text: str = shtab.complete(parser, shell=shell, preamble=_preamble(shell))
    return text


def values(kind: str, config_path: str | None) -> list[str]:
    """What a completion function offers at TAB time; never an error."""
    if kind == "services":
        try:
            return list(loader.load(config_path).services)
        except (ConfigError, OSError):
            return []
    return []


def cmd_completion(args: argparse.Namespace) -> int:
    if args.values:
        sys.stdout.write("".join(f"{v}\n" for v in values(args.values, args.config)))
        return EX_OK
    if args.shell is None:
        args.completion_parser.error("give a shell (bash or zsh), or --values")
    sys.stdout.write(script(args.root_parser, args.shell))
    return EX_OK


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
    root: argparse.ArgumentParser,
) -> None:
    p = sub.add_parser(
        "completion",
        parents=[common],
        help="print a shell completion script: source <(evd completion bash)",
        description="Print a completion script for bash or zsh, written from this evd's own parser.",
    )
    p.add_argument("shell", nargs="?", choices=SHELLS, help="the shell the script is for")
    p.add_argument(
        "--values",
        choices=("services",),
        help="print the values the script completes at TAB time (services: the configuration's)",
    )
    p.set_defaults(func=cmd_completion, root_parser=root, completion_parser=p)
