"""systemd integration: sd_notify to a fake $NOTIFY_SOCKET, socket activation
through an exec wrapper, and the shipped unit files under systemd-analyze."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.daemon import ROOT, WAIT, NotifySocket, connect, recv_all, services_off

from evd.config.addresses import Address
from evd.system import systemd
from evd.tools.client import Client

MINIMAL = """\
[daemon]
pidfile = "{tmp}/evd.pid"
shutdown_timeout = 2.0

[log]
level = "info"

[limits]
rate = 0.0

[services.echo]
tcp = ["127.0.0.1:0"]
udp = []

[services.time]
tcp = ["127.0.0.1:0"]
udp = ["127.0.0.1:0"]

[services.framed]
tcp = []
unix = ["{tmp}/framed.sock"]
"""
MINIMAL += services_off("daytime", "timefmt")


@pytest.mark.no_workers_variant("STATUS= says how many workers serve")
def test_notify_ready_reloading_stopping(start_evd, notify_socket):
    notify, address = notify_socket
    evd = start_evd(env={"NOTIFY_SOCKET": address})
    fields, pid = notify.expect("READY=1")
    assert pid == evd.proc.pid and fields["STATUS"].startswith("serving on")
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    evd.send(signal.SIGHUP)
    fields, _ = notify.expect("RELOADING=1")
    assert before <= int(fields["MONOTONIC_USEC"]) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notify.expect("READY=1")
    evd.wait_for("config.reload", ok=True)
    evd.send(signal.SIGTERM)
    fields, _ = notify.expect("STOPPING=1")
    assert "STATUS" in fields
    assert evd.proc.wait(WAIT) == 0


def test_notify_abstract_socket_and_watchdog(start_evd, tmp_path):
    name = f"evd-test-{os.getpid()}-{tmp_path.name}"
    notify = NotifySocket("\0" + name)
    try:
        start_evd(env={"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "100000"})
        notify.expect("READY=1")
        started = time.monotonic()
        for _ in range(3):  # every 50 ms: half of WATCHDOG_USEC
            notify.expect("WATCHDOG=1")
        assert time.monotonic() - started < 2.0
    finally:
        notify.close()


# -- socket activation -------------------------------------------------------------

WRAPPER = """\
import fcntl, os, sys
# wrapper.py FD,FD,... NAMES -- COMMAND...: what systemd does before exec.
fds = [int(fd) for fd in sys.argv[1].split(",")]
names, command = sys.argv[2], sys.argv[4:]
moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]  # out of the way of 3, 4, ...
for fd in fds:
    os.close(fd)
for i, fd in enumerate(moved):
    os.dup2(fd, 3 + i)  # inheritable
    os.close(fd)
os.environ["LISTEN_FDS"] = str(len(fds))
os.environ["LISTEN_PID"] = str(os.getpid())  # exec keeps the pid
if names:
    os.environ["LISTEN_FDNAMES"] = names
os.execv(command[0], command)
"""


@pytest.fixture
def activate(tmp_path):
    """activate(sockets, names) -> (prefix, pass_fds) for start_evd; the test
    keeps its copies, as systemd would."""
    wrapper = tmp_path / "activate.py"
    wrapper.write_text(WRAPPER)
    held = []

    def prepare(sockets, names=""):
        held.extend(sockets)
        fds = [s.fileno() for s in sockets]
        return [sys.executable, str(wrapper), ",".join(map(str, fds)), names, "--"], fds

    yield prepare
    for sock in held:
        sock.close()


def bound(kind, address):
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    sock = socket.socket(family, kind)
    sock.bind(address)
    if kind == socket.SOCK_STREAM:
        sock.listen()
    return sock


def name_of(sock) -> str:
    host, port = sock.getsockname()
    return f"{host}:{port}"


def test_socket_activation_by_name(start_evd, tmp_path, activate):
    tcp = bound(socket.SOCK_STREAM, ("127.0.0.1", 0))
    udp = bound(socket.SOCK_DGRAM, ("127.0.0.1", 0))
    unix = bound(socket.SOCK_STREAM, str(tmp_path / "framed.sock"))
    stray = bound(socket.SOCK_STREAM, ("127.0.0.1", 0))
    prefix, fds = activate([tcp, udp, unix, stray], "echo-tcp:time-udp:framed-unix:bogus-tcp")
    evd = start_evd(MINIMAL, prefix=prefix, pass_fds=fds)
    assert evd.events[0]["pid"] == evd.proc.pid  # exec'd, not forked
    adopted = {(e["service"], e["proto"]): e["address"] for e in evd.events if e["event"] == "systemd.adopt"}
    assert adopted == {
        ("echo", "tcp"): name_of(tcp),
        ("time", "udp"): name_of(udp),
        ("framed", "unix"): str(tmp_path / "framed.sock"),
    }
    assert evd.wait_for("systemd.socket", name="bogus-tcp")["level"] == "warning"
    assert evd.addresses[("echo", "tcp")] == name_of(tcp)
    assert evd.addresses[("time", "udp")] == name_of(udp)
    assert evd.addresses[("time", "tcp")] not in (name_of(tcp), name_of(stray))  # bound by evd

    with connect(tcp.getsockname()) as sock:
        sock.sendall(b"activated")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b"activated"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(WAIT)
        client.sendto(b"", udp.getsockname())
        assert len(client.recv(16)) == 4
    with Client(f"unix:{tmp_path}/framed.sock", timeout=WAIT) as client:
        assert client.call("echo", b"x").body == b"x"
    assert len(recv_all(connect(evd.addr("time")))) == 4

    assert evd.stop() == 0
    assert (tmp_path / "framed.sock").exists()  # systemd's socket: systemd removes it


def test_socket_activation_by_address(start_evd, tmp_path, activate):
    """Unnamed sockets go by address; a configured address that came from
    nowhere is bound as usual.  The port is held by the test, so binding it
    instead of adopting would fail."""
    tcp = bound(socket.SOCK_STREAM, ("127.0.0.1", 0))
    prefix, fds = activate([tcp])
    config = MINIMAL.replace(
        '[services.echo]\ntcp = ["127.0.0.1:0"]', f'[services.echo]\ntcp = ["{name_of(tcp)}"]'
    )
    evd = start_evd(config, prefix=prefix, pass_fds=fds)
    assert evd.wait_for("systemd.adopt")["address"] == name_of(tcp)
    assert evd.addresses[("echo", "tcp")] == name_of(tcp)
    with connect(tcp.getsockname()) as sock:
        sock.sendall(b"by address")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b"by address"
    assert evd.stop() == 0


def test_listen_fds_are_only_for_the_named_pid():
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
    assert systemd.listen_fds(env) == []
    assert env == {}  # read once, never passed on


def test_match_prefers_name_then_address(tmp_path):
    a = bound(socket.SOCK_STREAM, ("127.0.0.1", 0))
    b = bound(socket.SOCK_STREAM, ("127.0.0.1", 0))
    u = bound(socket.SOCK_DGRAM, ("127.0.0.1", 0))
    try:
        echo_b = ("echo", Address("tcp", "127.0.0.1", b.getsockname()[1]))
        daytime = ("daytime", Address("tcp", "127.0.0.1", 0))
        time_udp = ("time", Address("udp", "127.0.0.1", u.getsockname()[1]))
        chargen_udp = ("chargen", Address("udp", "127.0.0.1", 0))
        keys = [daytime, echo_b, chargen_udp, time_udp]
        adopted, leftover = systemd.match([(a, "daytime-tcp"), (b, ""), (u, "evd.socket")], keys)
        assert adopted == {daytime: a, echo_b: b, time_udp: u}  # port 0 (chargen) only by name
        assert leftover == []
        adopted, leftover = systemd.match([(a, "echo-udp")], [echo_b])
        assert adopted == {} and leftover == [(a, "echo-udp")]
    finally:
        for sock in (a, b, u):
            sock.close()


# -- the unit files ------------------------------------------------------------------


def evd_executable() -> str:
    """The installed `evd` if there is one, else this Python running -m evd."""
    for candidate in (shutil.which("evd"), str(Path(sys.executable).parent / "evd")):
        if candidate and os.access(candidate, os.X_OK):
            return f"{candidate} run"
    return f"{sys.executable} -m evd run"


def test_unit_files_pass_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    probe = subprocess.run([analyze, "--version"], capture_output=True, text=True, timeout=WAIT)
    if probe.returncode != 0:
        pytest.skip(f"systemd-analyze cannot run here: {probe.stderr.strip()}")
    for unit in ("evd.service", "evd.socket"):
        text = (ROOT / "systemd" / unit).read_text()
        run = evd_executable()
        text = text.replace("/usr/bin/evd run", run)
        text = text.replace("/usr/bin/evd reload", run.removesuffix(" run") + " reload")
        (tmp_path / unit).write_text(text)
    out = subprocess.run(
        [analyze, "verify", "--man=no", str(tmp_path / "evd.socket"), str(tmp_path / "evd.service")],
        capture_output=True,
        text=True,
        timeout=3 * WAIT,
        cwd=tmp_path,
    )
    ours = [line for line in (out.stdout + out.stderr).splitlines() if "evd." in line]
    assert out.returncode == 0 and not ours, out.stdout + out.stderr
    service = (ROOT / "systemd" / "evd.service").read_text()
    for setting in (
        "Type=notify",
        "ExecReload=/usr/bin/evd reload",
        "DynamicUser=yes",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "ProtectSystem=strict",
        "RuntimeDirectory=evd",
        "LogsDirectory=evd",
        "KillMode=mixed",
        "ExecStart=/usr/bin/evd run --log-format journal",
        "Documentation=man:evd(8) man:evd.toml(5)",
    ):
        assert f"\n{setting}\n" in service, setting


def test_the_units_configuration_puts_the_control_socket_in_its_runtime_directory():
    """SPEC 12: the unit's configuration (systemd/evd.toml, installed as
    /etc/evd/evd.toml) sets control.unix inside RuntimeDirectory=evd, so
    that ExecReload's `evd reload` gets its answer there; the embedded
    default keeps no control socket."""
    from evd.config.loader import parse

    config = parse((ROOT / "systemd" / "evd.toml").read_text())
    assert config.control.unix == "/run/evd/control.sock"
    assert config.daemon.pidfile.startswith("/run/evd/")
    assert parse((ROOT / "etc" / "evd.toml").read_text()).control.unix == ""
    assert "\nRuntimeDirectory=evd\n" in (ROOT / "systemd" / "evd.service").read_text()
