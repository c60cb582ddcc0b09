"""The command allow-list's checks, sans-IO: which command a request names,
and the argv it may run.

Only `[commands.NAME]` entries run, as their `argv` plus client arguments
that the entry allows and that each match its `arg_pattern` in full.  There
is no shell, so `;`, `$(...)` and friends are just characters that fail the
pattern.  An argument must also be text a program can receive: no NUL (it
ends a C string) and nothing without a UTF-8 form (a lone surrogate, or
"\\udcff", which would reach the program as a raw byte).

Every refusal names the client's string the same way (`quote`): JSON in
ASCII, cut short -- never a Python repr, and nothing that can break a
terminal or a log line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

from evd.config.model import CommandSpec

# How much of a client's string a message quotes.
QUOTE_MAX = 64


class Refusal(Exception):
    """A request the allow-list refuses; `code` is the framed error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def quote(text: str, limit: int = QUOTE_MAX) -> str:
    """A client's string inside a message: JSON-quoted in ASCII (a control
    character or a lone surrogate cannot break a terminal or a log line),
    cut to `limit` characters."""
    if len(text) > limit:
        return json.dumps(text[:limit])[:-1] + '..."'
    return json.dumps(text)


def command(commands: Mapping[str, CommandSpec], name: object) -> CommandSpec:
    """The entry a request names: Refusal bad_request (no usable name) or
    unknown_command."""
    if type(name) is not str or not name:
        raise Refusal("bad_request", "name (a non-empty string) is required")
    spec = commands.get(name)
    if spec is None:
        raise Refusal("unknown_command", f"no command named {quote(name)}")
    return spec


def argv(spec: CommandSpec, args: object) -> list[str]:
    """`spec.argv` and the client's `args` (None: none), or Refusal bad_args."""
    if args is None:
        args = []
    elif type(args) is not list or not all(type(a) is str for a in args):
        raise Refusal("bad_args", "args must be a list of strings")
    if args and not spec.args:
        raise Refusal("bad_args", f"command {quote(spec.name)} takes no arguments")
    for n, arg in enumerate(args, 1):
        problem = _bad_arg(arg, spec.arg_pattern)
        if problem:
            raise Refusal("bad_args", f"argument {n} ({quote(arg)}) {problem}")
    return [*spec.argv, *args]


def _bad_arg(arg: str, pattern: str) -> str:
    """What is wrong with one client argument, or "" if nothing."""
    if "\0" in arg:
        return "contains a NUL character"
    if not arg.isascii():
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            return "is not valid UTF-8 text"
    if re.fullmatch(pattern, arg) is None:
        return f"does not match {pattern}"
    return ""
