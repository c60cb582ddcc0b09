"""`evd ctl` against a real `evd run` (SPEC section 9): every command, the
socket's mode, workers = 2, and `evd enable --now` through the socket."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys

import pytest
from support.ctl import CONFIG, WORKERS, ask, run_ctl
from support.daemon import ROOT, SPREAD, WAIT, connect, recv_all, recv_exactly

from evd.proto.control import Request
from evd.proto.framing import encode


def body(evd, command: str, *args: str) -> dict:
    answer = ask(evd, command, *args)
    assert answer.ok, answer
    assert answer.body is not None
    return answer.body


def echo_once(sock: socket.socket, payload: bytes = b"ping") -> None:
    sock.sendall(payload)
    assert recv_exactly(sock, len(payload)) == payload


def conn_of(evd, service: str, port: int) -> dict:
    """The `conns` row of our connection from local `port`."""
    rows = [c for c in body(evd, "conns", service)["conns"] if c["peer"].endswith(f":{port}")]
    assert len(rows) == 1, rows
    return rows[0]


def test_the_socket_is_0600_by_default_and_removed_at_exit(start_evd, tmp_path):
    evd = start_evd(CONFIG)
    path = tmp_path / "ctl.sock"
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    evd.wait_for("listener.open", service="control", proto="unix", address=str(path))
    assert evd.stop() == 0
    assert not path.exists()


def test_the_configured_mode_is_given(start_evd, tmp_path):
    evd = start_evd(CONFIG.replace('ctl.sock"\n', 'ctl.sock"\nmode = "0660"\n'))
    assert stat.S_IMODE((tmp_path / "ctl.sock").stat().st_mode) == 0o660
    assert evd.stop() == 0


@pytest.mark.no_workers_variant(
    "info reports workers = 1; test_workers_every_command_covers_every_worker has workers"
)
def test_info_and_services(start_evd, tmp_path):
    evd = start_evd(CONFIG)
    out = run_ctl(evd, "info")
    assert out.returncode == 0, out.stderr
    assert f"pid:              {evd.proc.pid}" in out.stdout.splitlines()
    info = json.loads(run_ctl(evd, "info", "--json").stdout)
    assert info["pid"] == evd.proc.pid and info["workers"] == 1
    assert info["config"] == str(evd.config_path) and info["last_reload"] is None
    assert info["connections"] == 0 and info["commands_running"] == 0
    with connect(evd.addr("echo")) as sock:
        echo_once(sock)
        services = body(evd, "services")["services"]
    echo = services["echo"]
    assert echo["enabled"] is True
    assert echo["connections_current"] == 1 and echo["connections_total"] == 1
    assert sorted(echo["listeners"]) == sorted(
        [
            f"tcp {evd.addresses[('echo', 'tcp')]}",
            f"udp {evd.addresses[('echo', 'udp')]}",
            f"unix {tmp_path}/echo.sock",
        ]
    )
    assert echo["limits"]["max_connections"] == 5000 and echo["rejected"] == {}
    assert set(services) == {"echo", "discard", "chargen", "daytime", "time", "timefmt", "framed"}
    table = run_ctl(evd, "services").stdout.splitlines()
    assert table[0].split() == ["SERVICE", "ENABLED", "CURRENT", "TOTAL", "REJECTED", "LISTENERS"]
    assert evd.stop() == 0


@pytest.mark.no_workers_variant(
    "conns rows name their worker; test_workers_every_command_covers_every_worker has workers"
)
def test_conns_and_kill(start_evd):
    evd = start_evd(CONFIG)
    with connect(evd.addr("echo")) as sock, connect(evd.addr("discard")) as other:
        echo_once(sock, b"12345")
        row = conn_of(evd, "echo", sock.getsockname()[1])
        assert row["service"] == "echo" and row["worker"] is None
        assert row["bytes_in"] == 5 and row["bytes_out"] == 5
        assert row["age_s"] >= 0 and row["idle_s"] >= 0
        listed = {c["conn"] for c in body(evd, "conns")["conns"]}
        assert row["conn"] in listed and len(listed) == 2
        opened = evd.wait_for("conn.open", conn=row["conn"])
        assert opened["service"] == "echo"
        out = run_ctl(evd, "kill", str(row["conn"]))
        assert out.returncode == 0, out.stderr
        assert out.stdout == f"connection {row['conn']} closed\n"
        assert recv_all(sock) == b""  # evd closed it
        closed = evd.wait_for("conn.close", conn=row["conn"])
        assert closed["reason"] == "killed"
        evd.wait_for("ctl", command="kill", args=[str(row["conn"])], ok=True)
        other.sendall(b"still here")  # the other connection is untouched
        assert conn_of(evd, "discard", other.getsockname()[1])["bytes_in"] == 10
    out = run_ctl(evd, "kill", "999999")
    assert out.returncode == 2 and out.stderr == "evd: no connection 999999\n"
    evd.wait_for("ctl", command="kill", args=["999999"], ok=False)
    out = run_ctl(evd, "conns", "nosuch")
    assert out.returncode == 2 and "no service 'nosuch'" in out.stderr
    assert evd.stop() == 0


def test_disable_and_enable_while_a_connection_is_open(start_evd):
    evd = start_evd(CONFIG)
    address = evd.addr("echo")
    with connect(address) as sock:
        echo_once(sock)
        out = run_ctl(evd, "disable", "echo", "--json")
        assert out.returncode == 0, out.stderr
        answer = json.loads(out.stdout)
        assert answer["service"] == "echo" and answer["enabled"] is False
        assert f"tcp {address[0]}:{address[1]}" in answer["listeners"]
        evd.wait_for("ctl", command="disable", args=["echo"], ok=True)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(address, timeout=WAIT).close()
        echo_once(sock, b"carries on")  # established: served as before
        services = body(evd, "services")["services"]
        assert services["echo"]["enabled"] is False and services["echo"]["listeners"] == []
        out = run_ctl(evd, "enable", "echo")
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("echo enabled; opened: ")
        with connect(address) as again:  # the same port, though configured as 0
            echo_once(again, b"back")
        echo_once(sock, b"and still")
    evd.wait_for("ctl", command="enable", args=["echo"], ok=True)
    out = run_ctl(evd, "disable", "command")
    assert out.returncode == 2 and "no listeners" in out.stderr
    assert evd.stop() == 0


def test_set_then_a_rejection_it_causes(start_evd):
    evd = start_evd(CONFIG)
    out = run_ctl(evd, "set", "echo", "max_connections", "1")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "echo: max_connections = 1 (was 5000)\n"
    evd.wait_for("ctl", command="set", args=["echo", "max_connections", "1"], ok=True)
    assert body(evd, "services")["services"]["echo"]["limits"]["max_connections"] == 1
    with connect(evd.addr("echo")) as first:
        echo_once(first)
        with connect(evd.addr("echo")) as second:
            assert recv_all(second) == b""  # refused: closed at once
        reject = evd.wait_for("conn.reject", service="echo")
        assert reject["reason"] == "max_connections"
    assert body(evd, "services")["services"]["echo"]["rejected"] == {"max_connections": 1}
    rows = [r for r in body(evd, "sources", "echo")["sources"] if r["ip"] == "127.0.0.1"]
    assert rows and rows[0]["rejected"] == 1 and rows[0]["tokens"] is None  # rate = 0 here
    assert rows[0]["banned_for_s"] == 0.0
    # Checked as the file is, with its messages, naming the key.
    for args, message in (
        (("echo", "rate", "-1"), "services.echo.rate: must be at least 0\n"),
        (("echo", "rate", "fast"), "services.echo.rate: expected a number, got string\n"),
        (("echo", "write_low", "300000"), "services.echo.write_low: must be less than write_high (262144)\n"),
        (("echo", "colour", "1"), "services.echo.colour: not a [limits] key"),
    ):
        out = run_ctl(evd, "set", *args)
        assert out.returncode == 2 and out.stderr.startswith(f"evd: {message}"), out.stderr
    assert body(evd, "services")["services"]["echo"]["limits"]["rate"] == 0.0
    assert evd.stop() == 0


def test_sources_count_rate_refusals_per_ip(start_evd):
    evd = start_evd(CONFIG)
    assert ask(evd, "set", "echo", "rate", "0.001").ok
    assert ask(evd, "set", "echo", "burst", "1").ok
    with connect(evd.addr("echo")) as sock:
        echo_once(sock)
        for _ in range(2):
            with connect(evd.addr("echo")) as refused:
                assert recv_all(refused) == b""
        rows = {r["ip"]: r for r in body(evd, "sources", "echo")["sources"]}
    row = rows["127.0.0.1"]
    assert row["service"] == "echo" and row["connections"] == 1
    assert row["rejected"] == 2 and 0.0 <= row["tokens"] < 1.0
    table = run_ctl(evd, "sources").stdout.splitlines()
    assert table[0].split() == ["SERVICE", "IP", "CONNS", "REJECTED", "TOKENS", "BANNED_S"]
    assert evd.stop() == 0


def test_reload_answers_ok_and_failed(start_evd):
    evd = start_evd(CONFIG)
    assert ask(evd, "set", "echo", "rate", "9").ok
    out = run_ctl(evd, "reload", "--json")
    assert out.returncode == 0, out.stderr
    # The runtime change is undone: the file says otherwise.
    assert json.loads(out.stdout) == {
        "ok": True,
        "added": [],
        "removed": [],
        "changed": ["echo"],
        "error": None,
    }
    assert body(evd, "services")["services"]["echo"]["limits"]["rate"] == 0.0
    evd.wait_for("ctl", command="reload", args=[], ok=True)
    evd.config_path.write_text("[daemon\n")
    socket_path = str(evd.tmp / "ctl.sock")  # -c would read the broken file
    out = run_ctl(evd, "--socket", socket_path, "reload", "--json")
    assert out.returncode == 1
    answer = json.loads(out.stdout)
    assert answer["ok"] is False and answer["added"] == answer["removed"] == answer["changed"] == []
    assert "line 1" in answer["error"]
    assert out.stderr.startswith("evd: reload failed: ")
    out = run_ctl(evd, "--socket", socket_path, "reload")
    assert out.returncode == 1 and out.stdout == "" and out.stderr.startswith("evd: reload failed: ")
    info = body(evd, "info")
    assert info["last_reload"]["ok"] is False
    evd.wait_for("ctl", command="reload", args=[], ok=False)
    assert evd.stop() == 0


def test_usage_errors_and_no_socket(start_evd, tmp_path):
    evd = start_evd(CONFIG)
    out = run_ctl(evd, "set", "echo")
    assert out.returncode == 2 and out.stderr == "evd: usage: set SERVICE KEY VALUE\n"
    out = run_ctl(evd, "frobnicate")
    assert out.returncode == 2 and "no command 'frobnicate'" in out.stderr
    out = run_ctl(evd, "--socket", str(tmp_path / "nothing.sock"), "info")
    assert out.returncode == 1 and out.stderr.startswith(
        f"evd: cannot talk to evd at {tmp_path}/nothing.sock"
    )
    assert evd.stop() == 0
    out = run_ctl(evd, "info")
    assert out.returncode == 1 and "cannot talk to evd" in out.stderr


def test_a_client_that_never_reads_cannot_grow_the_daemon(start_evd):
    """Requests pipelined without reading: evd answers one at a time and
    stops reading while its answers wait, so it holds at most one."""
    evd = start_evd(CONFIG)
    with socket.socket(socket.AF_UNIX) as greedy:
        greedy.connect(str(evd.tmp / "ctl.sock"))
        greedy.setblocking(False)
        request = encode(Request("services").header())
        sent = 0
        try:
            for _ in range(100_000):
                sent += greedy.send(request)
        except BlockingIOError:
            pass
        assert sent < 100_000 * len(request)  # the daemon stopped reading
        assert body(evd, "info")["pid"] == evd.proc.pid  # and serves others
    assert evd.stop() == 0


# -- workers ---------------------------------------------------------------------------


@pytest.mark.no_workers_variant("sets workers itself")
def test_workers_every_command_covers_every_worker(start_evd):
    evd = start_evd(WORKERS)
    pids = {evd.wait_for("worker.start", worker=i)["worker_pid"] for i in (0, 1)}
    info = body(evd, "info")
    assert info["workers"] == 2 and info["pid"] == evd.proc.pid
    socks = []
    try:
        for i in range(40):  # from two sources: both workers hold some
            sock = connect(evd.addr("echo"), source=SPREAD[i % 2])
            socks.append(sock)
            echo_once(sock)
        conns = body(evd, "conns", "echo")["conns"]
        assert len(conns) == 40 and {c["worker"] for c in conns} == {0, 1}
        assert len({c["conn"] for c in conns}) == 40  # unique across workers
        assert body(evd, "info")["connections"] == 40
        assert body(evd, "services")["services"]["echo"]["connections_current"] == 40
        victim = conn_of(evd, "echo", socks[0].getsockname()[1])  # not socks[1]: it carries on below
        assert ask(evd, "kill", str(victim["conn"])).ok
        closed = evd.wait_for("conn.close", conn=victim["conn"])
        assert closed["reason"] == "killed" and closed["pid"] in pids
        assert ask(evd, "kill", "999999").code == "refused"
        assert ask(evd, "set", "echo", "max_connections", "1").ok
        assert body(evd, "services")["services"]["echo"]["limits"]["max_connections"] == 1
        # Both workers hold connections: whichever takes a new one refuses it.
        for _ in range(4):
            with connect(evd.addr("echo")) as refused:
                assert recv_all(refused) == b""
        rejected = body(evd, "services")["services"]["echo"]["rejected"]
        assert rejected == {"max_connections": 4}
        assert ask(evd, "set", "echo", "max_connections", "5000").ok
        assert ask(evd, "disable", "echo").ok
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(evd.addr("echo"), timeout=WAIT).close()
        echo_once(socks[1], b"carries on")
        answer = ask(evd, "enable", "echo")
        assert answer.ok, answer
        served = set()
        for i in range(40):
            with connect(evd.addr("echo"), source=SPREAD[i % 2]) as sock:
                echo_once(sock)
                served.add(conn_of(evd, "echo", sock.getsockname()[1])["worker"])
        assert served == {0, 1}  # both workers took the new socket
        assert ask(evd, "set", "echo", "burst", "7").ok
        reload = body(evd, "reload")
        assert reload["ok"] is True and reload["changed"] == ["echo"]  # burst goes back
        for pid in pids:
            evd.wait_for("worker.reload", pid=pid, ok=True)
    finally:
        for sock in socks:
            sock.close()
    assert evd.stop() == 0
    assert not (evd.tmp / "ctl.sock").exists()


# -- evd enable --now ------------------------------------------------------------------


def test_enable_now_reloads_through_the_control_socket(start_evd, tmp_path):
    config = f'include = ["{tmp_path}/evd.d/*.toml"]\n' + CONFIG
    evd = start_evd(config)
    out = subprocess.run(
        [sys.executable, "-m", "evd", "disable", "discard", "--now", "-c", str(evd.config_path)],
        capture_output=True,
        text=True,
        timeout=3 * WAIT,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1] == (
        "reloaded; added: nothing; "
        "removed: discard tcp 127.0.0.1:0, discard udp 127.0.0.1:0; changed: discard"
    )
    # The answer came through the socket: the `ctl` line says so.
    evd.wait_for("ctl", command="reload", ok=True)
    assert evd.stop() == 0


def test_enable_now_when_the_socket_is_not_there(tmp_path):
    config = tmp_path / "evd.toml"
    (tmp_path / "evd.d").mkdir()
    config.write_text(
        f'include = ["{tmp_path}/evd.d/*.toml"]\n[control]\nunix = "{tmp_path}/ctl.sock"\n'
        f'[daemon]\npidfile = "{tmp_path}/evd.pid"\n'
    )
    out = subprocess.run(
        [sys.executable, "-m", "evd", "enable", "discard", "--now", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=3 * WAIT,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 1
    assert out.stderr.startswith(
        f"evd: cannot reload: evd is not running (nothing listens at {tmp_path}/ctl.sock, "
    )


def test_a_configuration_in_the_middle_of_an_edit_still_finds_the_daemon(start_evd, tmp_path):
    """`evd ctl -c FILE` while FILE has a syntax error (or a drop-in does):
    control.unix is taken from what can still be read (issue 23, item 8)."""
    evd = start_evd(CONFIG)
    good = evd.config_path.read_text()
    evd.config_path.write_text(good.replace("[control]\n", "[control\n[control]\n", 1))  # half-typed
    out = run_ctl(evd, "info", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["pid"] == evd.proc.pid
    assert "has errors" in out.stderr and str(evd.tmp / "ctl.sock") in out.stderr
    dropin = tmp_path / "d" / "50-bad.toml"
    dropin.parent.mkdir()
    dropin.write_text("[services.echo\n")
    evd.config_path.write_text(f'include = ["{dropin.parent}/*.toml"]\n' + good)
    assert run_ctl(evd, "info").returncode == 0
    # A control.unix nobody can read: the pidfile's daemon, by its UNIX
    # listener that answers as that daemon (echo's, also UNIX here, does not).
    unreadable = good.replace(f'unix = "{evd.tmp}/ctl.sock"', "unix = [", 1)
    assert "echo.sock" in unreadable
    evd.config_path.write_text(unreadable)
    out = run_ctl(evd, "info", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["pid"] == evd.proc.pid
    assert f"the control socket of pid {evd.proc.pid}" in out.stderr and "ctl.sock" in out.stderr
    # Neither: still a configuration error, said so.
    evd.config_path.write_text(unreadable.replace(f'"{evd.tmp}/evd.pid"', '"/nonexistent/evd.pid"'))
    out = run_ctl(evd, "info")
    assert out.returncode == 78 and "give --socket" in out.stderr
    assert evd.stop() == 0
