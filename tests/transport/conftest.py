"""What the transport layer's tests share: a loop (tests/support/transport.py),
closed after the test, and a tiny tmpfs for a full disk."""

from __future__ import annotations

import subprocess

import pytest
from support.transport import Loop


@pytest.fixture
def loop():
    lp = Loop()
    yield lp
    lp.reactor.close()


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 64 KiB tmpfs (root can mount one; else skip)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
