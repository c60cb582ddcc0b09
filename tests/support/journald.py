"""A real systemd-journald in a journal namespace of its own (its own socket
and files, the machine's journal untouched), and queries of it through the
real journalctl."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from support.daemon import WAIT

JOURNALD = "/lib/systemd/systemd-journald"


@dataclass
class Journald:
    namespace: str
    socket: Path

    @property
    def directory(self) -> Path:
        """Where this namespace's journal files are (persistent if
        /var/log/journal exists, else volatile)."""
        machine = Path("/etc/machine-id").read_text().strip()
        for folder in ("/var/log/journal", "/run/log/journal"):
            path = Path(f"{folder}/{machine}.{self.namespace}")
            if path.is_dir():
                return path
        raise AssertionError(f"no journal files for namespace {self.namespace}")

    def query(self, *matches: str, want: int = 1) -> list[dict]:
        """The entries matching (journalctl's matches), once there are at
        least `want` of them (bounded: WAIT), as journalctl -o json gives them."""
        deadline = time.monotonic() + WAIT
        while True:
            done = subprocess.run(
                ["journalctl", f"--namespace={self.namespace}", "-o", "json", "--all", *matches],
                capture_output=True,
                timeout=WAIT,
            )
            found = [json.loads(row) for row in done.stdout.decode().splitlines() if row.startswith("{")]
            if len(found) >= want or time.monotonic() > deadline:
                return found
            time.sleep(0.05)  # journalctl has no "wait for N entries"; bounded by WAIT


@contextmanager
def real_journald() -> Iterator[Journald]:
    """Start one (or skip, saying why); stopped and its files removed after."""
    if not Path(JOURNALD).exists():
        pytest.skip(f"{JOURNALD} is not installed")
    if shutil.which("journalctl") is None:
        pytest.skip("journalctl is not installed")
    namespace = f"evdtest{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen(
        [JOURNALD, namespace], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    sock = Path(f"/run/systemd/journal.{namespace}/socket")
    deadline = time.monotonic() + WAIT
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            reason = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
            proc.wait()
            pytest.skip(f"systemd-journald cannot run here: {reason or 'no socket'}")
        time.sleep(0.02)
    try:
        yield Journald(namespace, sock)
    finally:
        proc.terminate()
        try:
            proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
        machine = Path("/etc/machine-id").read_text().strip() if Path("/etc/machine-id").exists() else ""
        for folder in ("/run/log/journal", "/var/log/journal"):
            shutil.rmtree(f"{folder}/{machine}.{namespace}", ignore_errors=True)
        shutil.rmtree(sock.parent, ignore_errors=True)
