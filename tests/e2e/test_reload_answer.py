"""`evd reload` tells the truth (SPEC sections 2 and 12): a good reload and
a failed one through each way the answer can come -- the control socket, a
JSON log file, the journal (a real systemd-journald in a namespace of its
own) -- exit 0 with what changed, or exit 1 with the daemon's own error.

A reload that fails with a valid configuration: a listener on an address
this machine does not have (192.0.2.1, TEST-NET-1) cannot be bound, and the
daemon keeps what it runs."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from support.daemon import ROOT, WAIT, LogFile, process_gone
from support.journald import real_journald

CONFIG = """\
[daemon]
pidfile = "{tmp}/evd.pid"
shutdown_timeout = 2.0

[log]
level = "info"
{log}

[control]
unix = "{control}"

[services.echo]
tcp = []
udp = []
unix = [{echo}]

[services.daytime]
enabled = false
[services.time]
enabled = false
[services.timefmt]
enabled = false
[services.framed]
enabled = false
"""
UNBINDABLE = '"192.0.2.1:7"'


def reload(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "evd", "reload", "-c", str(config), "--timeout", str(WAIT)],
        capture_output=True,
        text=True,
        timeout=3 * WAIT,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )


def run_both(tmp: Path, log: str, control: str, ready: Callable[[subprocess.Popen], None]) -> list[str]:
    """Start evd, reload it with a good change, then a bad one; the
    errors the daemon logged for the bad one (as `ready` finds them)."""
    config = tmp / "evd.toml"

    def write(echo: str) -> None:
        config.write_text(CONFIG.format(tmp=tmp, log=log, control=control, echo=echo))

    write(f'"{tmp}/echo.sock"')
    proc = subprocess.Popen(
        [sys.executable, "-m", "evd", "run", "-c", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    try:
        ready(proc)
        write(f'"{tmp}/echo.sock", "{tmp}/echo2.sock"')
        good = reload(config)
        assert good.returncode == 0, good.stderr
        assert good.stdout.startswith(f"reloaded, pid {proc.pid}; added: echo unix {tmp}/echo2.sock") or (
            good.stdout.startswith(f"reloaded; added: echo unix {tmp}/echo2.sock")  # the socket knows no pid
        ), good.stdout
        assert (tmp / "echo2.sock").exists()
        config.write_text(config.read_text().replace("tcp = []", f"tcp = [{UNBINDABLE}]", 1))
        bad = reload(config)
        assert bad.returncode == 1, bad.stdout
        (line,) = bad.stderr.splitlines()
        assert line.startswith("evd: reload failed") and "192.0.2.1" in line, line
        assert proc.poll() is None  # still serving what it had
        assert (tmp / "echo2.sock").exists()
        return [line]
    finally:
        proc.terminate()
        proc.wait(WAIT)
        assert process_gone(proc.pid, WAIT)


def test_through_the_control_socket(tmp_path):
    log = LogFile(tmp_path / "evd.log")
    (line,) = run_both(
        tmp_path,
        f'format = "json"\nfile = "{tmp_path}/evd.log"',
        f"{tmp_path}/control.sock",
        lambda proc: log.wait_for("daemon.ready"),
    )
    failed = log.wait_for("config.reload", ok=False)
    assert line == f"evd: reload failed: {failed['error']}"
    assert log.find("ctl", command="reload")  # the answer came through the socket


def test_from_the_log_file(tmp_path):
    log = LogFile(tmp_path / "evd.log")
    (line,) = run_both(
        tmp_path,
        f'format = "json"\nfile = "{tmp_path}/evd.log"',
        "",
        lambda proc: log.wait_for("daemon.ready"),
    )
    failed = log.wait_for("config.reload", ok=False)
    assert line.endswith(f": {failed['error']}") and "pid" in line
    assert not log.find("ctl")  # by SIGHUP, not the socket


def test_from_the_journal(tmp_path):
    with real_journald() as journald:
        (line,) = run_both(
            tmp_path,
            f'format = "journal"\njournal_socket = "{journald.socket}"',
            "",
            lambda proc: journald.query("EVD_EVENT=daemon.ready", f"_PID={proc.pid}"),
        )
        (failed,) = journald.query("EVD_EVENT=config.reload", "EVD_OK=false")
    assert line.endswith(f": {failed['EVD_ERROR']}") and "pid" in line


def test_with_no_log_to_read_it_says_so_and_exits_0(tmp_path):
    run = CONFIG.format(tmp=tmp_path, log='format = "json"', control="", echo=f'"{tmp_path}/echo.sock"')
    (tmp_path / "evd.toml").write_text(run)
    proc = subprocess.Popen(
        [sys.executable, "-m", "evd", "run", "-c", str(tmp_path / "evd.toml")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    try:
        wait_connectable(tmp_path / "echo.sock", proc)
        out = reload(tmp_path / "evd.toml")
        assert out.returncode == 0 and out.stdout.startswith(f"reload signal sent to pid {proc.pid}; ")
    finally:
        proc.terminate()
        proc.wait(WAIT)


def wait_connectable(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + WAIT
    while True:
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(str(path))
                return
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "evd did not start listening"
            time.sleep(0.02)


def test_an_invalid_configuration_reloads_nothing_and_exits_1(tmp_path):
    (tmp_path / "evd.toml").write_text("[log\n")
    out = reload(tmp_path / "evd.toml")
    assert out.returncode == 1
    assert out.stderr.splitlines()[-1] == "evd: nothing reloaded: the configuration is invalid"
