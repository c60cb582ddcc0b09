"""Shared by several test modules: the control-socket client and the ctl tests' configurations."""

from __future__ import annotations

import subprocess
import sys

from evd.proto.control import Answer, Request
from evd.tools import ctl
from support.daemon import BASE_CONFIG, ROOT, WAIT

SURFACES = '\n[control]\nunix = "{tmp}/ctl.sock"\n\n[metrics]\ntcp = ["127.0.0.1:0"]\n'


CONFIG = BASE_CONFIG + SURFACES


WORKERS = CONFIG.replace("shutdown_timeout = 5.0", "shutdown_timeout = 5.0\nworkers = 2")


def run_ctl(evd, *args: str) -> subprocess.CompletedProcess:
    """The real `evd ctl`, by -c (its default socket is the config's)."""
    return subprocess.run(
        [sys.executable, "-m", "evd", "ctl", "-c", str(evd.config_path), *args],
        capture_output=True,
        text=True,
        timeout=3 * WAIT,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )


def ask(evd, command: str, *args: str) -> Answer:
    """The same request through the client's function (no process start)."""
    return ctl.request(str(evd.tmp / "ctl.sock"), Request(command, args), WAIT)
