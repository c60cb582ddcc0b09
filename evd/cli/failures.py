"""Exit statuses, and how every command reports what went wrong."""

from __future__ import annotations

import argparse
import os
import select
import sys

from evd.config import loader
from evd.config.model import Config, ConfigError

EX_OK = 0
EX_FAIL = 1
EX_SERVER = 2  # the server (or daemon) answered with a refusal
EX_NOT_RUNNING = 3  # LSB: `status` of a daemon that is not running
EX_CONFIG = 78  # sysexits.h EX_CONFIG: what service managers expect
# `evd reload --timeout`, `enable|disable --now --timeout` (SPEC: 10): a
# reload binds a few sockets and reads a few files.
RELOAD_TIMEOUT = 10.0


def error(message: str) -> None:
    """One human line on stderr."""
    print(f"evd: {message}", file=sys.stderr)


def report_reload(status: int, message: str) -> int:
    """A reload's result: on stdout when it applied (or was sent), the
    daemon's error on stderr when it failed (SPEC sections 2 and 12)."""
    if status == EX_OK:
        print(message, flush=True)
    else:
        error(message)
    return status


def config_errors(exc: ConfigError) -> None:
    """Every configuration problem, one "KEY.PATH: message" per line."""
    for line in exc.errors:
        print(line, file=sys.stderr)


def load_config(args: argparse.Namespace) -> Config | None:
    """The configuration of -c/$EVD_CONFIG/the default, or None after
    printing every error (the caller exits EX_CONFIG)."""
    try:
        return loader.load(args.config)
    except ConfigError as exc:
        config_errors(exc)
        return None


def stdout_closed() -> bool:
    """Has the reader of stdout gone (a pipe whose read end is closed)?
    poll says POLLERR on such a write end, and only on such."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):  # no stdout at all
        return False


def stdout_gone() -> None:
    """The reader of stdout left (`| head`): what is still buffered has
    nowhere to go, so let the exit's flush write it to /dev/null instead
    of raising BrokenPipeError again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
