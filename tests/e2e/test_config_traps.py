"""Configuration files that are not files (issue 23, item 3): a FIFO or a
device as the main file or as a drop-in, and a file far too big.  Each used
to hang `check-config` and `run` (a FIFO blocks its open until a writer
comes), freeze a running daemon's loop on SIGHUP, or eat gigabytes
(/dev/zero).  Now each is refused at once, naming the file: exit 78, and a
reload keeps the old configuration and says why in `config.reload`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support.daemon import BASE_CONFIG, ROOT, WAIT

from evd.config import loader


def evd(*args: str) -> subprocess.CompletedProcess[str]:
    """The real command; a hang fails the test by its timeout."""
    return subprocess.run(
        [sys.executable, "-m", "evd", *args],
        capture_output=True,
        text=True,
        timeout=3 * WAIT,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def too_big(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(loader.MAX_FILE + 1)  # sparse: costs no disk
    return path


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_a_fifo_as_the_main_file(tmp_path, command):
    main = fifo(tmp_path / "evd.toml")
    out = evd(command, "-c", str(main))
    assert out.returncode == 78, out.stderr
    assert f"{main}: not a regular file" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("command", ["check-config", "run"])
@pytest.mark.parametrize("trap", ["fifo", "/dev/zero", "too big"])
def test_a_trap_as_a_drop_in(tmp_path, command, trap):
    if trap == "fifo":
        path = str(fifo(tmp_path / "50-fifo.toml"))
    elif trap == "too big":
        path = str(too_big(tmp_path / "50-big.toml"))
    else:
        path = trap
    main = tmp_path / "evd.toml"
    main.write_text(f'include = ["{path}"]\n' + BASE_CONFIG.format(tmp=tmp_path))
    out = evd(command, "-c", str(main))
    assert out.returncode == 78, out.stderr
    why = "larger than 1 MiB" if trap == "too big" else "not a regular file"
    assert f"{path}: {why}" in out.stderr and "Traceback" not in out.stderr


def test_a_reload_refuses_them_and_keeps_serving(start_evd, tmp_path):
    dropins = tmp_path / "evd.d"
    dropins.mkdir()
    head = f'include = ["{dropins}/*.toml"]\n'
    daemon = start_evd(head + BASE_CONFIG)
    echo = daemon.addr("echo")

    def reload_fails(because: str) -> None:
        mark = len(daemon.drain_events())
        daemon.send(signal.SIGHUP)
        reload = daemon.wait_for_since(mark, "config.reload")
        assert reload["ok"] is False and reload["error"] == because
        with socket.create_connection(echo, timeout=WAIT) as sock:  # the loop serves on, as before
            sock.sendall(b"still\n")
            assert sock.recv(16) == b"still\n"

    trap = fifo(dropins / "50-fifo.toml")
    reload_fails(f"{trap}: not a regular file")
    trap.unlink()
    trap = too_big(dropins / "50-big.toml")
    reload_fails(f"{trap}: larger than 1 MiB: not a configuration file")
    trap.unlink()
    daemon.config_path.write_text('include = ["/dev/zero"]\n' + BASE_CONFIG.format(tmp=tmp_path))
    reload_fails("/dev/zero: not a regular file")
    assert daemon.stop() == 0
