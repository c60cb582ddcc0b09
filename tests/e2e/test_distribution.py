"""The files a distribution installs, each checked with its real tool:
logrotate against a running evd under load, systemd-sysusers and
systemd-tmpfiles on a scratch root, systemd-analyze security on the unit,
promtool on the alert rules."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from support.daemon import ROOT, WAIT, LogFile, need

ROTATIONS = 10

CONFIG = """\
[daemon]
pidfile = "{tmp}/evd.pid"
shutdown_timeout = 2.0

[log]
level = "info"
format = "json"
file = "{tmp}/evd.log"

[limits]
per_source = 5000
rate = 0.0

[services.echo]
tcp = ["127.0.0.1:0"]
udp = []

[services.daytime]
enabled = false

[services.time]
enabled = false

[services.timefmt]
enabled = false

[services.framed]
enabled = false
"""


class EchoLoad:
    """One client making echo connections back to back until stopped; each
    costs evd a `conn.open` and a `conn.close` line."""

    def __init__(self, address: tuple[str, int]):
        self.address = address
        self.done = 0
        self.failures: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with socket.create_connection(self.address, timeout=WAIT) as sock:
                    sock.sendall(b"x")
                    assert sock.recv(1) == b"x"
                self.done += 1
            except (OSError, AssertionError) as exc:
                self.failures.append(exc)
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(WAIT)
        assert not self._thread.is_alive() and not self.failures, self.failures
        return self.done


def fds_on(pid: int, inode: int) -> list[str]:
    """evd's descriptors that are the file with this inode."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.stat(f"/proc/{pid}/fd/{fd}").st_ino == inode:
                found.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return found


def read_lines(path: Path) -> list[bytes]:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    assert data.endswith(b"\n") or not data, f"{path.name} ends in half a line"
    return data.splitlines()


def test_logrotate_ten_times_under_load_loses_and_tears_no_line(tmp_path: Path) -> None:
    logrotate = need("logrotate")
    log_path = tmp_path / "evd.log"
    config = tmp_path / "evd.toml"
    config.write_text(CONFIG.format(tmp=tmp_path))
    # The shipped file, pointed at this test's log and pidfile, keeping every
    # generation so that every line can be counted.
    shipped = (ROOT / "etc" / "logrotate.d" / "evd").read_text()
    rotate_conf = tmp_path / "logrotate.conf"
    rotate_conf.write_text(
        shipped.replace("/var/log/evd/evd.log", str(log_path))
        .replace("/run/evd/evd.pid", str(tmp_path / "evd.pid"))
        .replace("rotate 8", f"rotate {ROTATIONS + 2}")
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "evd", "run", "-c", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        log = LogFile(log_path)
        log.wait_for("daemon.ready")
        host, port = log.addresses()[("echo", "tcp")].rsplit(":", 1)
        load = EchoLoad((host, int(port)))
        for rotation in range(ROTATIONS):
            old = log_path.stat().st_ino
            out = subprocess.run(
                [logrotate, "-f", "-s", str(tmp_path / "logrotate.state"), str(rotate_conf)],
                capture_output=True,
                text=True,
                timeout=WAIT,
            )
            assert out.returncode == 0, out.stderr
            new_log = LogFile(log_path)
            new_log.wait_for("log.reopen")  # the new file receives lines ...
            new_log.wait_for("conn.close")  # ... the load's too
            assert log_path.stat().st_ino != old
            assert fds_on(proc.pid, old) == [], f"rotation {rotation}: evd still holds the old file"
        served = load.stop()
        # Every connection's close line is written before evd stops.
        new_log.wait_for("conn.close", conn=max(e["conn"] for e in new_log.find("conn.open")))
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0, proc.stderr.read().decode() if proc.stderr else ""

    files = sorted(tmp_path.glob("evd.log*"))
    assert len(files) == ROTATIONS + 1, [f.name for f in files]
    events = [json.loads(line) for path in files for line in read_lines(path)]  # torn lines fail here
    opened = {e["conn"] for e in events if e["event"] == "conn.open"}
    closed = {e["conn"] for e in events if e["event"] == "conn.close"}
    assert len(opened) == len(closed) == served and opened == closed
    assert sum(e["event"] == "log.reopen" for e in events) == ROTATIONS


def scratch_root(tmp_path: Path) -> Path:
    """An empty root with the base groups a Debian system has, and the two
    files installed where packages put them."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\nadm:x:4:\n")
    for kind in ("sysusers.d", "tmpfiles.d"):
        (root / "usr" / "lib" / kind).mkdir(parents=True)
        shutil.copy(ROOT / "systemd" / kind / "evd.conf", root / "usr" / "lib" / kind / "evd.conf")
    return root


def test_sysusers_and_tmpfiles_make_the_user_and_its_directories(tmp_path: Path) -> None:
    sysusers, tmpfiles = need("systemd-sysusers"), need("systemd-tmpfiles")
    root = scratch_root(tmp_path)
    dry = subprocess.run(
        [sysusers, f"--root={root}", "--dry-run"], capture_output=True, text=True, timeout=WAIT
    )
    assert dry.returncode == 0 and "Creating user 'evd'" in dry.stdout + dry.stderr, dry.stderr
    assert "evd" not in (root / "etc" / "passwd").read_text()
    made = subprocess.run([sysusers, f"--root={root}"], capture_output=True, text=True, timeout=WAIT)
    assert made.returncode == 0, made.stderr
    user = next(
        line.split(":")
        for line in (root / "etc" / "passwd").read_text().splitlines()
        if line.startswith("evd:")
    )
    assert user[6] in ("/usr/sbin/nologin", "/sbin/nologin") and 0 < int(user[2]) < 1000  # a system user
    # systemd 252's tmpfiles has no --dry-run; --create on the scratch root is the check.
    created = subprocess.run(
        [tmpfiles, f"--root={root}", "--create"], capture_output=True, text=True, timeout=WAIT
    )
    assert created.returncode == 0, created.stderr
    uid = int(user[2])
    for path, mode, gid in (("run/evd", 0o755, int(user[3])), ("var/log/evd", 0o750, 4)):
        info = (root / path).stat()
        assert (info.st_mode & 0o7777, info.st_uid, info.st_gid) == (mode, uid, gid), path


def test_the_unit_passes_systemd_analyze_security(tmp_path: Path) -> None:
    analyze = need("systemd-analyze")
    unit = tmp_path / "evd.service"
    unit.write_text((ROOT / "systemd" / "evd.service").read_text().replace("/usr/bin/evd", sys.executable))
    # Exposure 2.0 ("OK") today; the threshold fails a unit that loses its hardening.
    out = subprocess.run(
        [analyze, "security", "--offline=yes", "--threshold=25", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=3 * WAIT,
        cwd=tmp_path,
    )
    if "Unknown option" in out.stderr or "unrecognized option" in out.stderr:
        pytest.skip(f"this systemd-analyze has no offline security check: {out.stderr.strip()}")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr


def test_the_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    promtool = need("promtool")
    rules = ROOT / "etc" / "prometheus"
    check = subprocess.run(
        [promtool, "check", "rules", "evd-rules.yml"], capture_output=True, text=True, timeout=WAIT, cwd=rules
    )
    assert check.returncode == 0 and "SUCCESS: 2 rules found" in check.stdout, check.stdout + check.stderr
    test = subprocess.run(
        [promtool, "test", "rules", "evd-rules.test.yml"],
        capture_output=True,
        text=True,
        timeout=WAIT,
        cwd=rules,
    )
    assert test.returncode == 0, test.stdout + test.stderr
