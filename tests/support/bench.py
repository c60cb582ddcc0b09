"""Shared by several test modules: running evd bench and reading its JSON."""

from __future__ import annotations

import json
import subprocess
import sys

from support.daemon import ROOT


def evd_bench(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "evd", "bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )


def run_json(*args: str) -> dict:
    proc = evd_bench(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])
