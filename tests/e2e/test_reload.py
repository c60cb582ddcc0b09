"""Reloads end to end, against the real process: one report whatever the
number of workers, and a failed reload -- whatever failed -- is always
`config.reload ok=false` with the error, and changes nothing."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest
from support.daemon import BASE_CONFIG, ROOT, WAIT, EvdProcess, connect, recv_exactly

from evd.tools.client import Client

WORKERS = "shutdown_timeout = 5.0\nworkers = 2"
DISCARD_ON = "[services.discard]\nenabled = true"
DISCARD_OFF = "[services.discard]\nenabled = false"
ECHO = '[services.echo]\ntcp = ["127.0.0.1:0"]\n'
KEYED = BASE_CONFIG.replace("[services.framed]\n", '[services.framed]\nkey_file = "{tmp}/key"\n')


def with_workers(config: str, workers: int) -> str:
    return config.replace("shutdown_timeout = 5.0", WORKERS) if workers > 1 else config


def reload_with(evd: EvdProcess, config: str) -> dict:
    """Write `config`, SIGHUP, and the main process's `config.reload`."""
    evd.config_path.write_text(config.format(tmp=evd.tmp))
    mark = len(evd.drain_events())
    evd.send(signal.SIGHUP)
    return evd.wait_for_since(mark, "config.reload", pid=evd.proc.pid)


def still_serving(evd: EvdProcess) -> None:
    with connect(evd.addr("echo")) as sock:
        sock.sendall(b"alive")
        assert recv_exactly(sock, 5) == b"alive"


def write_key(path, content: bytes = b"sekrit") -> bytes:
    path.write_bytes(content)
    path.chmod(0o600)
    return content


@pytest.mark.no_workers_variant("sets workers itself")
@pytest.mark.parametrize("workers", [1, 2])
def test_the_reload_report_is_the_same_with_one_or_two_workers(start_evd, workers):
    """Issue 9 #7: switching discard on was `changed=["echo"]` with one
    process and `["discard","echo"]` with two."""
    before = with_workers(BASE_CONFIG.replace(DISCARD_ON, DISCARD_OFF), workers)
    evd = start_evd(before)
    after = before.replace(DISCARD_OFF, DISCARD_ON).replace(ECHO, ECHO + "max_connections = 100\n")
    reload = reload_with(evd, after)
    assert reload["ok"] is True, reload
    assert (reload["added"], reload["removed"], reload["changed"]) == (
        ["discard tcp 127.0.0.1:0", "discard udp 127.0.0.1:0"],
        [],
        ["echo", "discard"],
    )
    assert "error" not in reload
    assert evd.stop() == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_a_reload_whose_log_file_cannot_be_opened_changes_nothing(start_evd, tmp_path, workers):
    """Issue 9 #17: it was logged `ok=true`, with the new listeners open and
    the old log left behind.  The log file is opened before anything is
    committed: a failure is ok=false, and nothing else changes."""
    before = with_workers(BASE_CONFIG, workers)
    evd = start_evd(before)
    after = (
        before.replace("[log]\n", '[log]\nfile = "{tmp}/no-such-dir/evd.log"\n')
        .replace('unix = ["{tmp}/echo.sock"]', 'unix = ["{tmp}/echo.sock", "{tmp}/echo2.sock"]')
        .replace("[services.daytime]\n", "[services.daytime]\nenabled = false\n")
    )
    failed = reload_with(evd, after)
    assert failed["ok"] is False and failed["level"] == "error"
    assert failed["error"] == (
        f"cannot open log file {tmp_path}/no-such-dir/evd.log: [Errno 2] No such file or directory"
    )
    assert (failed["added"], failed["removed"], failed["changed"]) == ([], [], [])
    assert not (tmp_path / "echo2.sock").exists()
    with socket.create_connection(evd.addr("daytime"), timeout=WAIT) as sock:  # still on
        assert sock.recv(100)
    mark = len(evd.drain_events())
    still_serving(evd)
    evd.wait_for_since(mark, "conn.close", service="echo")  # the log still goes where it went
    assert evd.stop() == 0


def test_a_fifo_as_key_file_fails_the_reload_instead_of_freezing_the_daemon(start_evd, tmp_path):
    """Issue 9 #16: open() of a FIFO blocks until a writer comes -- the whole
    loop, SIGTERM included."""
    key = write_key(tmp_path / "key")
    evd = start_evd(KEYED)
    os.mkfifo(tmp_path / "fifo", 0o600)
    failed = reload_with(evd, KEYED.replace("{tmp}/key", "{tmp}/fifo"))
    assert failed["ok"] is False
    assert failed["error"] == f"services.framed.key_file: {tmp_path}/fifo is not a regular file"
    with Client(f"unix:{tmp_path}/framed.sock", timeout=WAIT, key=key) as client:  # the old key holds
        assert client.call("command", name="greet").body == b"hello\n"
    assert evd.stop() == 0


@pytest.mark.parametrize(
    ("what", "edit", "error"),
    [
        (
            "an unknown user",
            ("[daemon]\n", '[daemon]\nuser = "evd-no-such-user"\n'),
            'no such user "evd-no-such-user"',
        ),
        ("an empty key file", ("{tmp}/key", "{tmp}/empty"), "{tmp}/empty is empty"),
        ("a key file of newlines", ("{tmp}/key", "{tmp}/newlines"), "{tmp}/newlines is empty"),
        ("a key file that is a directory", ("{tmp}/key", "{tmp}"), "{tmp} is not a regular file"),
    ],
)
def test_evd_reload_to_what_check_config_refuses_fails(start_evd, tmp_path, what, edit, error):
    """Issue 9 #20: whatever `run` and `check-config` refuse, a reload
    refuses too, and `evd reload` leads to `config.reload ok=false`."""
    write_key(tmp_path / "key")
    write_key(tmp_path / "empty", b"")
    write_key(tmp_path / "newlines", b"\n\r\n\n")
    evd = start_evd(KEYED)
    evd.config_path.write_text(KEYED.replace(*edit).format(tmp=tmp_path))
    mark = len(evd.drain_events())
    check = _evd("check-config", "-c", str(evd.config_path))
    assert check.returncode == 78 and error.format(tmp=tmp_path) in check.stderr, check.stderr
    out = _evd("reload", "-c", str(evd.config_path))
    assert out.returncode == 0, out.stderr  # sent; the daemon judges
    failed = evd.wait_for_since(mark, "config.reload")
    assert failed["ok"] is False and error.format(tmp=tmp_path) in failed["error"]
    still_serving(evd)
    assert evd.stop() == 0


@pytest.mark.parametrize(
    ("key", "edit"),
    [
        ("services.framed.key_file", ("{tmp}/key", "{tmp}/k\\u0000ey")),
        ("services.echo.unix", ("{tmp}/echo.sock", "{tmp}/echo\\u0000.sock")),
        ("daemon.pidfile", ("{tmp}/evd.pid", "{tmp}/evd\\u0000.pid")),
        ("log.file", ("[log]\n", '[log]\nfile = "{tmp}/evd\\u0000.log"\n')),
    ],
)
def test_nul_in_a_path_is_a_failed_reload_naming_the_key(start_evd, tmp_path, key, edit):
    """Issue 9 #15: a SIGHUP to such a file logged a traceback and no
    `config.reload` at all."""
    write_key(tmp_path / "key")
    evd = start_evd(KEYED)
    failed = reload_with(evd, KEYED.replace(*edit))
    assert failed["ok"] is False and key in failed["error"], failed
    assert not [e for e in evd.drain_events() if e["event"] == "error"]
    still_serving(evd)
    assert evd.stop() == 0


def _evd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "evd", *args],
        capture_output=True,
        text=True,
        timeout=WAIT,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
