"""Lifecycle against the real process: evd start/stop/status/reload, the
pidfile, the SIGTERM drain, SIGHUP reloads, SIGUSR1 and the privilege drop."""

from __future__ import annotations

import json
import os
import pwd
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from support.daemon import (
    BASE_CONFIG,
    ROOT,
    WAIT,
    LogFile,
    connect,
    logged_config,
    process_gone,
    recv_all,
    recv_exactly,
)

from evd.config.loader import parse
from evd.log.logger import log
from evd.loop.reactor import Reactor
from evd.server import preflight
from evd.server.daemon import SWEEP_SLOWEST, Daemon
from evd.system.pidfile import Pidfile, probe, read_pid
from evd.tools import lifecycle, reload_answer
from evd.tools.client import Client

WORKERS_CONFIG = BASE_CONFIG.replace("shutdown_timeout = 5.0", "shutdown_timeout = 5.0\nworkers = 2")


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def echo_once(address: str | tuple, payload: bytes = b"ping") -> bytes:
    if isinstance(address, str) and address.startswith("/"):
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(WAIT)
        sock.connect(address)
    else:
        sock = connect(host_port(address) if isinstance(address, str) else address)
    with sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait(WAIT)
    return proc.pid


def run_evd(*args, timeout=WAIT):
    return subprocess.run(
        [sys.executable, "-m", "evd", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )


# -- evd start / status / reload / stop --------------------------------------------


def test_start_detaches_then_status_reload_stop(control):
    control.write(logged_config(BASE_CONFIG))
    out = control("start")
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(r"evd started, pid \d+\n", out.stdout)
    pid = control.pids[-1]
    assert control.pidfile.read_text() == f"{pid}\n"
    control.log.wait_for("daemon.ready", pid=pid)
    # Detached: another session, cwd /, umask 022, stdin on /dev/null.
    assert os.getsid(pid) != os.getsid(0)
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    assert "Umask:\t0022" in Path(f"/proc/{pid}/status").read_text()
    assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
    assert echo_once(control.log.addresses()[("echo", "tcp")]) == b"ping"

    status = control("status")
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0] == f"running, pid {pid}"
    assert any(line.startswith("uptime ") for line in lines), status.stdout  # figures via framed.sock

    assert control("reload").returncode == 0
    assert control.log.wait_for("config.reload", pid=pid)["ok"] is True

    stop = control("stop")
    assert stop.returncode == 0 and f"stopped, pid {pid}" in stop.stdout, stop.stderr
    assert process_gone(pid, 0)
    assert not control.pidfile.exists()
    assert not (control.tmp / "framed.sock").exists()
    assert control.log.wait_for("daemon.stop", pid=pid)["signal"] == "SIGTERM"

    assert (control("status").returncode, control("status").stdout) == (3, "not running\n")
    assert control("stop").returncode == 0
    assert control("reload").returncode == 1


def test_second_start_says_already_running(control):
    control.write(logged_config(BASE_CONFIG))
    pid = control.start()
    again = control("start")
    assert again.returncode == 1
    assert f"already running, pid {pid}" in again.stderr
    assert control.pidfile.read_text() == f"{pid}\n"
    assert not process_gone(pid, 0)


@pytest.mark.parametrize("holder", ["dead", "unrelated_live"])
def test_stale_pidfile_never_blocks_start(control, holder):
    """A pidfile nobody has locked is stale, whatever its pid -- even the pid
    of a live process (ours), which stop and reload must not signal."""
    control.write(logged_config(BASE_CONFIG))
    stale = dead_pid() if holder == "dead" else os.getpid()
    control.pidfile.write_text(f"{stale}\n")
    status = control("status")
    assert status.returncode == 1 and "stale" in status.stdout, status
    assert control("stop").returncode == 0  # "not running": nothing signalled
    assert control("reload").returncode == 1
    pid = control.start()
    assert pid != stale
    assert control.pidfile.read_text() == f"{pid}\n"
    assert control("status").returncode == 0


def test_start_config_error_exits_78_and_leaves_nothing(control):
    control.write(BASE_CONFIG + "\n[limits]\nbogus = 1\n")
    out = control("start")
    assert out.returncode == 78
    assert "limits" in out.stderr
    assert not control.pidfile.exists()


def test_start_port_in_use_fails_on_the_terminal(control):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        control.write(
            logged_config(BASE_CONFIG).replace(
                '[services.daytime]\ntcp = ["127.0.0.1:0"]', f'[services.daytime]\ntcp = ["127.0.0.1:{port}"]'
            )
        )
        out = control("start")
    assert out.returncode == 1
    assert f"127.0.0.1:{port}" in out.stderr and "in use" in out.stderr
    assert not control.pidfile.exists()


def test_start_creates_the_pidfile_directory(control):
    control.write(
        logged_config(BASE_CONFIG).replace('pidfile = "{tmp}/evd.pid"', 'pidfile = "{tmp}/run/evd/evd.pid"')
    )
    control.pidfile = control.tmp / "run" / "evd" / "evd.pid"
    pid = control.start()
    assert control.pidfile.read_text() == f"{pid}\n"
    assert control("stop").returncode == 0
    assert not control.pidfile.exists()


def test_unusable_pidfile_fails_start_but_run_warns_and_serves(control, start_evd, tmp_path):
    (tmp_path / "not-a-dir").write_text("")
    config = BASE_CONFIG.replace('pidfile = "{tmp}/evd.pid"', 'pidfile = "{tmp}/not-a-dir/evd.pid"')
    control.write(logged_config(config))
    out = control("start")
    assert out.returncode == 1 and "not-a-dir" in out.stderr, out.stderr
    evd = start_evd(config)
    assert "not-a-dir" in evd.wait_for("pidfile.skip")["error"]
    assert echo_once(evd.addr("echo")) == b"ping"
    assert evd.stop() == 0


def test_run_holds_the_pidfile_so_status_and_stop_work(start_evd, tmp_path):
    evd = start_evd()
    config = str(evd.config_path)
    status = run_evd("status", "-c", config)
    assert status.returncode == 0 and status.stdout.startswith(f"running, pid {evd.proc.pid}\n")
    second = run_evd("run", "-c", config)
    assert second.returncode == 1 and f"already running, pid {evd.proc.pid}" in second.stderr
    stop = run_evd("stop", "-c", config)
    assert stop.returncode == 0, stop.stderr
    assert evd.proc.wait(WAIT) == 0
    assert not (tmp_path / "evd.pid").exists()


def test_stop_exits_1_when_the_daemon_outlasts_the_timeout(control):
    # The command waits at a FIFO until the test lets it go, so it outlasts
    # `evd stop --timeout 0.1` however slowly that starts (a `sleep 1` did
    # not, on a loaded machine).
    gate = control.tmp / "gate"
    os.mkfifo(gate)
    control.write(logged_config(BASE_CONFIG) + f'[commands.wait]\nargv = ["cat", "{gate}"]\n')
    pid = control.start()
    with Client(f"unix:{control.tmp}/framed.sock", timeout=WAIT) as client:
        client.send({"svc": "command", "name": "wait"})
        control.log.wait_for("command.start", name="wait")
        out = control("stop", "--timeout", "0.1")  # the drain waits for the command
        assert out.returncode == 1 and f"pid {pid} did not stop within 0.1 s" in out.stderr
        with open(gate, "wb"):  # cat opens the FIFO, reads EOF and exits 0
            pass
        assert client.recv().header["exit"] == 0
    assert process_gone(pid)
    assert control("stop").returncode == 0


# -- SIGTERM: the drain ---------------------------------------------------------------


@pytest.mark.no_workers_variant(
    "the first listener.close is the supervisor's; a worker closes its copy a moment later"
)
def test_sigterm_lets_an_inflight_command_finish(start_evd, tmp_path):
    evd = start_evd()
    with Client(f"unix:{tmp_path}/framed.sock", timeout=WAIT) as client:
        client.send({"svc": "command", "name": "sleep", "args": ["1"], "id": 7})
        evd.wait_for("command.start", name="sleep")
        evd.send(signal.SIGTERM)
        # Listeners close at once: new connections are refused ...
        evd.wait_for("listener.close", service="echo", proto="tcp")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(evd.addr("echo"), timeout=WAIT)
        # ... while the request under way gets its answer.
        reply = client.recv()
    assert reply.header["id"] == 7 and reply.header["ok"] is True and reply.header["exit"] == 0
    assert evd.proc.wait(WAIT) == 0
    assert evd.stop() == 0  # and its log read to the end
    names = [e["event"] for e in evd.drain_events()]
    assert names.index("command.end") < names.index("daemon.stop")
    assert not (tmp_path / "evd.pid").exists()


def test_drain_ends_at_shutdown_timeout_killing_the_rest(start_evd, tmp_path):
    evd = start_evd(BASE_CONFIG.replace("shutdown_timeout = 5.0", "shutdown_timeout = 0.3"))
    with Client(f"unix:{tmp_path}/framed.sock", timeout=WAIT) as client:
        client.send({"svc": "command", "name": "sleep", "args": ["30"], "id": 1})
        evd.wait_for("command.start", name="sleep")
        evd.send(signal.SIGTERM)
        assert evd.proc.wait(WAIT) == 0
    assert evd.wait_for("command.end", name="sleep")["signal"] == signal.SIGKILL
    assert evd.wait_for("daemon.stop")["signal"] == "SIGTERM"


# -- SIGHUP: reloads ---------------------------------------------------------------

ECHO_BEFORE = '[services.echo]\ntcp = ["127.0.0.1:0"]\nudp = ["127.0.0.1:0"]\nunix = ["{tmp}/echo.sock"]\n'
ECHO_AFTER = (
    '[services.echo]\ntcp = []\nudp = ["127.0.0.1:0"]\n'
    'unix = ["{tmp}/echo.sock", "{tmp}/echo2.sock"]\nmax_connections = 100\n'
)


@pytest.mark.no_workers_variant("listener.open lines of the supervisor and the workers interleave")
def test_reload_adds_removes_and_survives_a_broken_config(start_evd, tmp_path):
    evd = start_evd()
    steady = connect(evd.addr("echo"))  # on a listener the reload removes
    steady.sendall(b"before")
    assert recv_exactly(steady, 6) == b"before"

    after = BASE_CONFIG.replace(ECHO_BEFORE, ECHO_AFTER).replace(
        "[services.discard]\nenabled = true", "[services.discard]\nenabled = false"
    )
    evd.config_path.write_text(after.format(tmp=tmp_path))
    evd.send(signal.SIGHUP)
    reload = evd.wait_for("config.reload")
    assert reload["ok"] is True
    assert reload["added"] == [f"echo unix {tmp_path}/echo2.sock"]
    assert sorted(reload["removed"]) == [
        "discard tcp 127.0.0.1:0",
        "discard udp 127.0.0.1:0",
        "echo tcp 127.0.0.1:0",
    ]
    assert {"echo", "discard"} <= set(reload["changed"])
    closed = [(e["service"], e["proto"]) for e in evd.drain_events() if e["event"] == "listener.close"]
    assert sorted(closed) == [("discard", "tcp"), ("discard", "udp"), ("echo", "tcp")]

    steady.sendall(b"still here")  # its listener is gone, the connection is not
    assert recv_exactly(steady, 10) == b"still here"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(evd.addr("echo"), timeout=WAIT)
    assert echo_once(str(tmp_path / "echo2.sock")) == b"ping"
    with Client("{}:{}".format(*evd.addr("framed")), timeout=WAIT) as client:  # kept: the same port
        assert client.call("echo", b"framed").body == b"framed"

    evd.config_path.write_text(after.format(tmp=tmp_path) + "\n[limits]\nbogus = 1\n")
    evd.send(signal.SIGHUP)
    failed = evd.wait_for("config.reload", ok=False)
    assert failed["level"] == "error" and "limits" in failed["error"]
    steady.sendall(b"and now")
    assert recv_exactly(steady, 7) == b"and now"
    assert echo_once(str(tmp_path / "echo2.sock")) == b"ping"
    steady.close()
    assert evd.stop() == 0


def test_reload_applies_log_level_and_commands(start_evd, tmp_path):
    evd = start_evd()
    changed = BASE_CONFIG.replace('level = "info"', 'level = "debug"').replace(
        '[commands.greet]\nargv = ["echo", "hello"]', '[commands.greet]\nargv = ["echo", "bonjour"]'
    )
    evd.config_path.write_text(changed.format(tmp=tmp_path))
    evd.send(signal.SIGHUP)
    assert {"log", "commands"} <= set(evd.wait_for("config.reload", ok=True)["changed"])
    with Client(f"unix:{tmp_path}/framed.sock", timeout=WAIT) as client:
        assert client.call("command", name="greet").body == b"bonjour\n"
    evd.wait_for("request", svc="command")  # debug now
    assert evd.stop() == 0


def test_a_reloaded_log_level_reaches_connections_already_open(start_evd, tmp_path):
    """A framed connection opened at `info` logs its requests once a reload
    has set `debug` (it once kept the level it was opened with)."""
    evd = start_evd()
    with Client(f"unix:{tmp_path}/framed.sock", timeout=WAIT) as client:
        assert client.call("echo", body=b"before").body == b"before"
        opened = evd.wait_for("conn.open", service="framed")
        evd.config_path.write_text(
            BASE_CONFIG.replace('level = "info"', 'level = "debug"').format(tmp=tmp_path)
        )
        evd.send(signal.SIGHUP)
        evd.wait_for("config.reload", ok=True)
        if opened["pid"] != evd.proc.pid:  # workers: the one serving this connection has reloaded
            evd.wait_for("worker.reload", pid=opened["pid"], ok=True)
        assert client.call("echo", body=b"after").body == b"after"
        evd.wait_for("request", svc="echo", conn=opened["conn"])
    assert evd.stop() == 0


def test_reload_that_removes_a_listener_keeps_the_hmac_key(start_evd, tmp_path):
    """Regression: a loop over removed listeners once overwrote the key."""
    key = b"sekrit key"
    (tmp_path / "key").write_bytes(key)
    os.chmod(tmp_path / "key", 0o600)
    authed = BASE_CONFIG.replace("[services.framed]\n", '[services.framed]\nkey_file = "{tmp}/key"\n')
    evd = start_evd(authed)
    evd.config_path.write_text(authed.replace(ECHO_BEFORE, ECHO_AFTER).format(tmp=tmp_path))
    evd.send(signal.SIGHUP)
    assert evd.wait_for("config.reload")["removed"] == ["echo tcp 127.0.0.1:0"]
    with Client(f"unix:{tmp_path}/framed.sock", timeout=WAIT, key=key) as client:
        assert client.call("command", name="greet").body == b"hello\n"
    assert evd.stop() == 0


# -- SIGUSR1: logrotate ---------------------------------------------------------------


def test_sigusr1_reopens_the_log_file_after_a_rename(control):
    control.write(logged_config(BASE_CONFIG))
    pid = control.start()
    control.log.wait_for("daemon.ready")
    echo = control.log.addresses()[("echo", "tcp")]
    rotated = control.tmp / "evd.log.1"
    os.rename(control.log.path, rotated)
    os.kill(pid, signal.SIGUSR1)
    fresh = LogFile(control.tmp / "evd.log")
    fresh.wait_for("log.reopen", pid=pid)
    assert echo_once(echo) == b"ping"
    fresh.wait_for("conn.close", service="echo")
    assert not LogFile(rotated).find("conn.open")


# -- the privilege drop ------------------------------------------------------------


@pytest.fixture
def nobody_dir():
    """A directory `nobody` owns, reachable by it (pytest's tmp_path is not)."""
    if os.geteuid() != 0:
        pytest.skip("dropping privileges needs root")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")
    path = Path(tempfile.mkdtemp(prefix="evd-priv-"))
    path.chmod(0o755)
    os.chown(path, nobody.pw_uid, nobody.pw_gid)
    yield path, nobody
    subprocess.run(["rm", "-rf", str(path)], check=False)


def test_privilege_drop_to_nobody_keeps_log_and_pidfile_writable(control, nobody_dir):
    path, nobody = nobody_dir
    control.tmp, control.config_path = path, path / "evd.toml"
    control.pidfile, control.log = path / "run" / "evd.pid", LogFile(path / "evd.log")
    control.write(
        logged_config(BASE_CONFIG).replace(
            'pidfile = "{tmp}/evd.pid"', 'pidfile = "{tmp}/run/evd.pid"\nuser = "nobody"'
        )
    )
    control.config_path.chmod(0o644)
    pid = control.start()
    status = Path(f"/proc/{pid}/status").read_text()
    assert re.search(rf"^Uid:\s+{nobody.pw_uid}\s+{nobody.pw_uid}\s+{nobody.pw_uid}\s", status, re.M), status
    assert re.search(rf"^Gid:\s+{nobody.pw_gid}\s", status, re.M)
    groups = re.search(r"^Groups:(.*)$", status, re.M).group(1).split()
    assert {int(g) for g in groups} == set(os.getgrouplist("nobody", nobody.pw_gid))
    for owned in (control.pidfile, control.pidfile.parent, control.log.path):
        assert owned.stat().st_uid == nobody.pw_uid, owned
    control.log.wait_for("daemon.ready")
    assert echo_once(control.log.addresses()[("echo", "tcp")]) == b"ping"
    with Client(f"unix:{path}/framed.sock", timeout=WAIT) as client:  # commands still run
        assert client.call("command", name="greet", args=["x"]).body == b"hello x\n"
    os.rename(control.log.path, path / "evd.log.1")  # logrotate, then a file nobody creates
    os.kill(pid, signal.SIGUSR1)
    LogFile(path / "evd.log").wait_for("log.reopen")
    assert (path / "evd.log").stat().st_uid == nobody.pw_uid
    assert control("reload").returncode == 0
    assert control("stop").returncode == 0
    assert not control.pidfile.exists()  # removed by nobody, from its own directory


# -- signals during start-up ---------------------------------------------------------
#
# Issue 9 #14: the pidfile names the daemon before its reactor has handlers,
# and SIGHUP/SIGUSR1 kill a process that has none: `evd reload` right after a
# start killed the daemon (and left a stale pidfile).  They are held from
# before the pidfile is taken until the reactor handles them.


def pid_once_written(path: Path, timeout: float = WAIT) -> int:
    """The pid in the pidfile, as soon as there is one.  No sleep between
    looks: the window this is after is about a millisecond wide."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = read_pid(str(path))
        if pid is not None:
            return pid
        os.sched_yield()
    raise AssertionError(f"no pid in {path} within {timeout}s")


def hup_at_once(pidfile: Path) -> int:
    pid = pid_once_written(pidfile)
    os.kill(pid, signal.SIGHUP)
    os.kill(pid, signal.SIGUSR1)
    return pid


@pytest.mark.no_workers_variant("sets workers itself")
@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_and_sigusr1_right_after_the_pidfile_appears_do_not_kill_run(start_evd, tmp_path, workers):
    config = BASE_CONFIG if workers == 1 else WORKERS_CONFIG
    for _ in range(6 if workers == 1 else 3):
        assert not (tmp_path / "evd.pid").exists()
        evd = start_evd(config, wait_ready=False)
        assert hup_at_once(tmp_path / "evd.pid") == evd.proc.pid
        evd.ready()
        assert evd.wait_for("config.reload", pid=evd.proc.pid)["ok"] is True
        if workers > 1:  # a worker, as soon as it is known, takes them as well
            for index in range(workers):
                worker = evd.wait_for("worker.start", worker=index)["worker_pid"]
                os.kill(worker, signal.SIGHUP)
                evd.wait_for("worker.reload", pid=worker, ok=True)
        assert echo_once(evd.addr("echo")) == b"ping"
        assert evd.stop() == 0


def test_sighup_right_after_evd_start_writes_the_pidfile_reloads_the_daemon(control):
    """`evd start` leaves the pidfile empty until the daemon itself writes
    its pid: a pid in the file is an invitation to signal it, and the
    `evd start` process is not the daemon."""
    control.write(logged_config(BASE_CONFIG))
    for _ in range(3):
        starting = subprocess.Popen(
            [sys.executable, "-m", "evd", "start", "-c", str(control.config_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
        )
        try:
            pid = hup_at_once(control.pidfile)
            out, err = starting.communicate(timeout=3 * WAIT)
        finally:
            if starting.poll() is None:
                starting.kill()
                starting.wait(WAIT)
            written = read_pid(str(control.pidfile))
            control.pids += [p for p in (written,) if p is not None]
        assert starting.returncode == 0, err
        assert out == f"evd started, pid {pid}\n"
        assert control.log.wait_for("config.reload", pid=pid)["ok"] is True
        assert control("stop").returncode == 0
        assert process_gone(pid)


def test_evd_start_locks_an_empty_pidfile_until_its_daemon_writes_its_pid(tmp_path):
    """Between `evd start` taking the pidfile and its daemon writing its own
    pid, the file names nobody: not the `evd start` process, and not a stale
    pid left in it (which may be anyone's by now).  reload and stop say
    "starting?" instead of signalling someone."""
    path = tmp_path / "evd.pid"
    path.write_text(f"{os.getppid()}\n")  # stale, and alive: must never be signalled
    pidfile = Pidfile(str(path))
    pidfile.acquire(write_pid=False)
    try:
        assert path.read_text() == ""
        state = probe(str(path))
        assert (state.locked, state.pid) == (True, None)
        config = parse(f'[daemon]\npidfile = "{path}"\n')
        reloaded = reload_answer.reload(config, 1.0)
        for outcome in ((reloaded.status, reloaded.message), lifecycle.stop(str(path), 1.0)):
            assert outcome[0] == 1 and "starting?" in outcome[1], outcome
    finally:
        assert pidfile.release() is None
    assert not path.exists()  # nothing written: still ours to remove


# -- evd stop --timeout -----------------------------------------------------------------


def test_stop_refuses_a_timeout_it_cannot_wait_before_signalling(start_evd):
    """Issue 9 #19: these were tracebacks after SIGTERM had been sent."""
    evd = start_evd()
    for timeout in ("inf", "nan", "-1", "1e308", "2592001", "soon"):
        out = run_evd("stop", "--timeout", timeout, "-c", str(evd.config_path))
        assert out.returncode == 2, (timeout, out.stderr)
        assert "argument --timeout" in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert evd.proc.poll() is None  # nothing was sent
    assert run_evd("stop", "--timeout", "2592000", "-c", str(evd.config_path)).returncode == 0
    assert evd.proc.wait(WAIT) == 0


# -- in the process: the sweep, and a reload that meets a bug ------------------------------

NO_IDLE_LIMIT = BASE_CONFIG.replace("rate = 0.0", "rate = 100.0\nidle_timeout = 0.0")


def test_no_idle_limit_anywhere_means_a_slow_sweep_that_still_expires_buckets(tmp_path):
    """Issue 9 #5: `idle_timeout = 0` (never) made the shortest limit 0 and
    the sweep ran 20 times a second.  Without any positive limit it runs at
    the slowest period, and still expires rate buckets."""
    daemon = Daemon(parse(NO_IDLE_LIMIT.format(tmp=tmp_path)), preflight.Machine(), Reactor())
    reactor = daemon.reactor
    sweeps: list[float] = []

    def expire(now: float, force: bool = False) -> None:
        sweeps.append(time.monotonic())
        reactor.stop()

    daemon.open({})
    opened = time.monotonic()
    for service in daemon.services.values():
        service.admission.expire = expire
    reactor.call_later(WAIT, reactor.stop)
    try:
        reactor.run()
    finally:
        reactor.close()
    assert sweeps, "no sweep expired the rate buckets"
    assert sweeps[0] - opened >= 0.9 * SWEEP_SLOWEST


def test_a_reload_that_meets_a_bug_is_a_failed_reload_not_a_stray_traceback(tmp_path, monkeypatch):
    """Issue 9 #15: whatever the exception, SIGHUP ends in `config.reload
    ok=false` with the error; the reload returns the same result."""
    path = tmp_path / "evd.toml"
    path.write_text(logged_config(BASE_CONFIG).format(tmp=tmp_path))
    config = parse(path.read_text(), str(path))
    log.configure("info", "json", config.log.file)
    daemon = Daemon(config, preflight.Machine(), Reactor())
    try:
        daemon.open({})

        def broken(config: object) -> None:
            raise ValueError("embedded null byte")

        monkeypatch.setattr(preflight, "check", broken)
        result = daemon.reload()
    finally:
        daemon.reactor.close()
        log.configure("info", "json", "")
    assert (result.ok, result.error) == (False, "internal error: ValueError: embedded null byte")
    events = [json.loads(line) for line in (tmp_path / "evd.log").read_text().splitlines()]
    reload = [e for e in events if e["event"] == "config.reload"]
    assert len(reload) == 1 and reload[0]["ok"] is False and reload[0]["error"] == result.error
    assert any(e["event"] == "error" and e["where"] == "reload" for e in events)
