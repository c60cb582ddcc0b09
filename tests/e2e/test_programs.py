"""End to end: program services (SPEC section 14) in the real `evd run`, with
real programs (/bin/cat, env, shell scripts) and real clients (nc, socat,
Python sockets).  Expected values come from SPEC 14, not from evd's code.
"""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.ctl import ask, run_ctl
from support.daemon import ROOT, WAIT, need, process_gone, recv_all
from support.pki import Pki
from test_tls import converse

BUILT_IN_OFF = "".join(
    f"[services.{name}]\nenabled = false\n"
    for name in ("echo", "discard", "chargen", "daytime", "time", "timefmt", "framed")
)
# SPEC 14: the whole environment of a program, before its service's `env`.
MINIMAL_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


def program_config(programs: str, limits: str = "", daemon: str = "") -> str:
    """evd with only `programs` (TOML of [services.NAME] tables) on."""
    return (
        '[daemon]\npidfile = "{tmp}/evd.pid"\nshutdown_timeout = 2.0\n'
        + daemon
        + '\n[log]\nlevel = "info"\nformat = "json"\n'
        + f"\n[limits]\nmax_connections = 5000\nper_source = 5000\nrate = 0.0\n{limits}\n"
        + BUILT_IN_OFF
        + programs
    )


def service(name: str, argv: list[str], extra: str = "", unix: bool = False) -> str:
    unix_line = 'unix = ["{tmp}/' + name + '.sock"]\n'
    listeners = 'tcp = ["127.0.0.1:0"]\n' + (unix_line if unix else "")
    quoted = ", ".join(f'"{a}"' for a in argv)
    return f"\n[services.{name}]\nexec = [{quoted}]\n{listeners}{extra}\n"


def script(tmp: Path, name: str, body: str) -> str:
    path = tmp / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def exchange(address, data: bytes) -> bytes:
    """Send `data`, half-close, read until evd (the program) closes."""
    with socket.create_connection(address, timeout=WAIT) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


# The two ways a program starts: through the spawner, off the loop
# (commands/spawner.py), in any directory; through subprocess
# (commands/child.py) when it runs as a user of its own, which the spawner
# cannot switch to: here evd's own user, which only root may name.  Both
# must serve alike.
WAY_CONFIG = {"spawner": 'cwd = "/"\n', "subprocess": f'user = "{pwd.getpwuid(os.geteuid()).pw_name}"\n'}
WAYS = [
    "spawner",
    pytest.param(
        "subprocess",
        marks=pytest.mark.skipif(os.geteuid() != 0, reason="a program with a user of its own needs root"),
    ),
]


@pytest.mark.no_workers_variant(
    "counts the threads of the daemon's process; with workers the programs start in a worker"
)
@pytest.mark.parametrize("way", WAYS)
def test_cat_is_an_echo_driven_by_nc(start_evd, way):
    nc = need("nc")
    evd = start_evd(program_config(service("cat", ["/bin/cat"], WAY_CONFIG[way])))
    host, port = evd.addr("cat")
    out = subprocess.run(
        [nc, "-N", host, str(port)], input=b"hello, program\n", capture_output=True, timeout=WAIT
    )
    assert out.stdout == b"hello, program\n"
    threads = len(os.listdir(f"/proc/{evd.proc.pid}/task"))
    assert (threads > 1) == (way == "spawner"), threads  # the spawner's workers, only when used
    opened = evd.wait_for("conn.open", service="cat")
    start = evd.wait_for("exec.start", conn=opened["conn"])
    assert start["argv"] == ["/bin/cat"] and start["service"] == "cat" and start["peer"] == opened["peer"]
    end = evd.wait_for("exec.end", conn=opened["conn"])
    assert (end["exit"], end["signal"], end["timed_out"], end["stderr_tail"]) == (0, None, False, "")
    assert end["exec_pid"] == start["exec_pid"]
    evd.wait_for("conn.close", conn=opened["conn"])
    order = [e["event"] for e in evd.events if e.get("conn") == opened["conn"]]
    assert order == ["conn.open", "exec.start", "exec.end", "conn.close"]


def test_a_unix_client_through_socat(start_evd):
    socat = need("socat")
    evd = start_evd(program_config(service("cat", ["/bin/cat"], unix=True)))
    path = evd.addresses[("cat", "unix")]
    argv = [socat, "-t", "5", "-", f"UNIX-CONNECT:{path}"]
    out = subprocess.run(argv, input=b"over unix\n", capture_output=True, timeout=WAIT)
    assert out.stdout == b"over unix\n"
    end = evd.wait_for("exec.end", service="cat")
    assert end["exit"] == 0 and end["peer"] == "unix"


def test_environment_is_minimal_plus_the_client_and_env(start_evd):
    config = program_config(service("env", ["/usr/bin/env"], 'env = {{ GREETING = "hi there" }}\n'))
    evd = start_evd(config, env={"EVD_TEST_SECRET": "must-not-leak"})
    with socket.create_connection(evd.addr("env"), timeout=WAIT) as sock:
        client_port = sock.getsockname()[1]
        out = recv_all(sock).decode()
    env = dict(line.split("=", 1) for line in out.splitlines())
    conn = evd.wait_for("conn.open", service="env")["conn"]
    assert env == MINIMAL_ENV | {
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": str(client_port),
        "EVD_SERVICE": "env",
        "EVD_CONN": str(conn),
        "GREETING": "hi there",
    }


def test_a_script_reads_a_line_and_answers_in_its_cwd(start_evd, tmp_path):
    path = script(tmp_path, "greet.sh", 'read name\necho "hello $name from $(pwd)"\necho done >&2\n')
    evd = start_evd(program_config(service("greet", [path], 'cwd = "/tmp"\n')))
    assert exchange(evd.addr("greet"), b"world\n") == b"hello world from /tmp\n"
    end = evd.wait_for("exec.end", service="greet")
    assert end["exit"] == 0 and end["stderr_tail"] == "done\n"


def test_a_program_that_ignores_sigterm_is_killed_after_the_timeout(start_evd, tmp_path):
    path = script(tmp_path, "stubborn.sh", "trap '' TERM\nwhile :; do sleep 0.05; done\n")
    evd = start_evd(program_config(service("stubborn", [path], "timeout = 0.3\n")))
    with socket.create_connection(evd.addr("stubborn"), timeout=WAIT) as sock:
        assert recv_all(sock) == b""  # closed by evd: the child is gone
    end = evd.wait_for("exec.end", service="stubborn")
    assert end["timed_out"] is True and end["signal"] == 9 and end["exit"] is None
    # SPEC 14: SIGTERM at the timeout, SIGKILL 1 s later.
    assert end["duration_ms"] >= 1300
    assert process_gone(end["exec_pid"])


@pytest.mark.no_workers_variant("counts the threads of the daemon's process")
def test_the_spawner_starts_a_program_in_its_cwd(start_evd, tmp_path):
    """A `cwd` that is not evd's own still starts off the loop: posix_spawn
    enters it (posix_spawn_file_actions_addchdir_np) before exec."""
    (tmp_path / "here").mkdir()
    evd = start_evd(program_config(service("where", ["/bin/pwd"], f'cwd = "{tmp_path / "here"}"\n')))
    assert Path(f"/proc/{evd.proc.pid}/cwd").resolve() != tmp_path / "here"
    assert exchange(evd.addr("where"), b"") == f"{tmp_path / 'here'}\n".encode()
    assert len(os.listdir(f"/proc/{evd.proc.pid}/task")) > 1  # the spawner's workers started it


@pytest.mark.parametrize("way", WAYS)
def test_a_program_that_exits_at_once_closes_the_connection(start_evd, way):
    evd = start_evd(program_config(service("quick", ["/bin/sh", "-c", "exit 3"], WAY_CONFIG[way])))
    with socket.create_connection(evd.addr("quick"), timeout=WAIT) as sock:
        assert recv_all(sock) == b""
    end = evd.wait_for("exec.end", service="quick")
    assert (end["exit"], end["signal"], end["timed_out"]) == (3, None, False)
    assert evd.wait_for("conn.close", conn=end["conn"])["reason"] == "done"


@pytest.mark.parametrize("way", WAYS)
def test_a_program_gone_after_start_is_an_error_and_a_closed_connection(start_evd, tmp_path, way):
    path = script(tmp_path, "vanishing.sh", "echo never\n")
    evd = start_evd(program_config(service("vanishing", [path], WAY_CONFIG[way])))
    os.unlink(path)
    with socket.create_connection(evd.addr("vanishing"), timeout=WAIT) as sock:
        assert recv_all(sock) == b""
    end = evd.wait_for("exec.end", service="vanishing")
    assert end["exec_pid"] is None and path in end["error"]
    assert "exec.start" not in [e["event"] for e in evd.events]
    assert evd.wait_for("conn.close", conn=end["conn"])["reason"] == "error"
    # ... and the next one too: nothing was lost or left behind.
    with socket.create_connection(evd.addr("vanishing"), timeout=WAIT) as sock:
        assert recv_all(sock) == b""


def check_config(tmp_path: Path, config: str) -> subprocess.CompletedProcess:
    path = tmp_path / "check.toml"
    path.write_text(config.format(tmp=tmp_path))
    return subprocess.run(
        [sys.executable, "-m", "evd", "check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=WAIT,
        cwd=ROOT,
    )


@pytest.mark.parametrize(
    ("program", "problem"),
    [
        ("cat", '"cat" must be an absolute path'),
        ("{tmp}", "is not a file"),
        ("{tmp}/plain.txt", "is not executable"),
        ("{tmp}/missing", "No such file or directory"),
    ],
)
def test_check_config_refuses_a_program_it_could_not_run(tmp_path, program, problem):
    (tmp_path / "plain.txt").write_text("not a program\n")
    out = check_config(tmp_path, program_config(service("bad", [program])))
    assert out.returncode == 78
    assert "services.bad.exec" in out.stderr and problem in out.stderr


def test_check_config_accepts_a_program_and_refuses_unknown_names(tmp_path):
    assert check_config(tmp_path, program_config(service("ok", ["/bin/cat"]))).returncode == 0
    out = check_config(tmp_path, program_config("[services.nothing]\ntcp = []\n"))
    assert out.returncode == 78 and "services.nothing: unknown service" in out.stderr
    out = check_config(tmp_path, program_config(service("ok", ["/bin/cat"], 'udp = ["127.0.0.1:0"]\n')))
    assert out.returncode == 78 and "services.ok.udp" in out.stderr


def test_a_program_connection_counts_for_max_connections_until_it_ends(start_evd):
    evd = start_evd(program_config(service("cat", ["/bin/cat"], "max_connections = 1\n")))
    first = socket.create_connection(evd.addr("cat"), timeout=WAIT)
    try:
        first.sendall(b"one\n")
        assert first.recv(100) == b"one\n"  # the child runs: its slot is taken
        with socket.create_connection(evd.addr("cat"), timeout=WAIT) as second:
            assert recv_all(second) == b""
        assert evd.wait_for("conn.reject", service="cat")["reason"] == "max_connections"
    finally:
        first.close()
    evd.wait_for("conn.close", service="cat")
    assert exchange(evd.addr("cat"), b"two\n") == b"two\n"  # the slot came back


def test_stderr_floods_cost_only_the_last_kib(start_evd, tmp_path):
    path = script(tmp_path, "flood.sh", "head -c 200000000 /dev/zero | tr '\\0' x >&2\necho END >&2\n")
    evd = start_evd(program_config(service("flood", [path])))
    with socket.create_connection(evd.addr("flood"), timeout=WAIT) as sock:
        assert recv_all(sock) == b""
    end = evd.wait_for("exec.end", service="flood", timeout=60)
    tail = end["stderr_tail"]
    assert len(tail) == 1024 and tail.endswith("xxxxEND\n") and set(tail[:-4]) == {"x"}


def grandchild(evd, name: str) -> tuple[socket.socket, int]:
    """Connect to a program that starts `sleep` in the background and exits:
    the socket, and the sleep's pid (the program writes it)."""
    sock = socket.create_connection(evd.addr(name), timeout=WAIT)
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(100)
        assert chunk, "closed before the pid"
        line += chunk
    return sock, int(line)


LEAVES_A_GRANDCHILD = ["/bin/sh", "-c", "sleep 300 & echo $!; exit 0"]


def test_a_grandchild_is_ended_with_its_group_at_the_timeout(start_evd):
    evd = start_evd(program_config(service("parent", LEAVES_A_GRANDCHILD, "timeout = 0.5\n")))
    sock, pid = grandchild(evd, "parent")
    with sock:
        end = evd.wait_for("exec.end", service="parent")
        # (Whether the shell had exited by then is the scheduler's business.)
        assert end["timed_out"] is True
        assert process_gone(pid), "the grandchild outlived the timeout"
        assert recv_all(sock) == b""


def test_a_grandchild_is_ended_with_its_group_at_shutdown(start_evd):
    evd = start_evd(program_config(service("parent", LEAVES_A_GRANDCHILD)))
    sock, pid = grandchild(evd, "parent")
    with sock:
        started = time.monotonic()
        assert evd.stop() == 0
        # SPEC 14: shutdown_timeout (2 s here), then the group is killed.
        assert time.monotonic() - started >= 1.5
        assert process_gone(pid), "the grandchild outlived evd"
        assert evd.wait_for("exec.end", service="parent")["timed_out"] is False


def zombies_of(pid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if fields[0] == "Z" and int(fields[1]) == pid:
            found.append(int(name))
    return found


@pytest.mark.parametrize("way", WAYS)
def test_500_connections_at_once_all_answered_nothing_left(start_evd, way):
    evd = start_evd(program_config(service("cat", ["/bin/cat"], WAY_CONFIG[way])))
    fds = Path(f"/proc/{evd.proc.pid}/fd")
    # One connection first: evd's lazily opened descriptors are open now.
    assert exchange(evd.addr("cat"), b"warm\n") == b"warm\n"
    evd.wait_for("conn.close", service="cat")
    before = len(os.listdir(fds))
    socks = [socket.create_connection(evd.addr("cat"), timeout=WAIT) for _ in range(500)]
    try:
        for i, sock in enumerate(socks):
            sock.sendall(b"%d\n" % i)
        for i, sock in enumerate(socks):
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == b"%d\n" % i
    finally:
        for sock in socks:
            sock.close()
    deadline = time.monotonic() + 30
    while True:
        closed = sum(1 for e in evd.drain_events() if e.get("event") == "conn.close")
        if closed == 501 or time.monotonic() > deadline:
            break
        evd.wait_for_since(len(evd.events), "conn.close", timeout=30)
    assert closed == 501
    assert len(os.listdir(fds)) == before
    assert zombies_of(evd.proc.pid) == []


# --- TLS: evd relays ------------------------------------------------------------------


def tls_service(name: str, argv: list[str], extra: str = "") -> str:
    return service(name, argv, 'tls = ["127.0.0.1:0"]\ntls_cert = "{tmp}/server.pem"\n' + extra).replace(
        'tls_cert = "{tmp}/server.pem"\n', 'tls_cert = "{tmp}/server.pem"\ntls_key = "{tmp}/server.key"\n'
    )


@pytest.fixture
def pki(tmp_path):
    pki = Pki(tmp_path)
    pki.server()
    return pki


@pytest.mark.parametrize("way", WAYS)
def test_cat_over_tls_with_openssl_s_client(start_evd, pki, way):
    evd = start_evd(program_config(tls_service("cat", ["/bin/cat"], WAY_CONFIG[way])))
    host, port = evd.addr("cat", "tls")
    s_client = [need("openssl"), "s_client", "-connect", f"{host}:{port}", "-CAfile", str(pki.cafile)]
    s_client += ["-verify_return_error", "-quiet", "-no_ign_eof"]
    assert converse(s_client, b"through the relay\n") == b"through the relay\n"
    end = evd.wait_for("exec.end", service="cat")
    assert end["exit"] == 0
    close = evd.wait_for("conn.close", conn=end["conn"])
    assert close["bytes_in"] == close["bytes_out"] == len(b"through the relay\n")


@pytest.mark.parametrize("way", WAYS)
def test_tls_relay_carries_more_than_a_pipe_holds_and_keeps_stderr(start_evd, pki, tmp_path, way):
    # The program reads what it wants (a client's EOF is s_client's test):
    # 300 kB is more than a pipe holds, so the relay waits for the child.
    path = script(tmp_path, "count.sh", 'head -c 300000 | wc -c\necho "$REMOTE_ADDR" >&2\n')
    evd = start_evd(program_config(tls_service("count", [path], WAY_CONFIG[way])))
    sock = socket.create_connection(evd.addr("count", "tls"), timeout=WAIT)
    with pki.client_context().wrap_socket(sock, server_hostname="127.0.0.1") as tls:
        tls.sendall(b"x" * 300_000)
        answer = b""
        while chunk := tls.recv(100):
            answer += chunk
    assert answer.strip() == b"300000"
    end = evd.wait_for("exec.end", service="count")
    assert end["exit"] == 0 and end["stderr_tail"] == "127.0.0.1\n"


def test_tls_relay_bounds_what_a_child_writes_to_a_client_that_does_not_read(start_evd, pki):
    evd = start_evd(program_config(tls_service("yes", ["/usr/bin/yes"], "timeout = 1\n")))
    sock = socket.create_connection(evd.addr("yes", "tls"), timeout=WAIT)
    with pki.client_context().wrap_socket(sock, server_hostname="127.0.0.1") as tls:
        assert tls.recv(10).startswith(b"y\n")
        end = evd.wait_for("exec.end", service="yes")  # the timeout ends it; evd held on meanwhile
    assert end["timed_out"] is True
    close = evd.wait_for("conn.close", conn=end["conn"])
    # Written to a client that read 10 bytes: what the socket buffers hold
    # plus write_high (256 KiB), not what `yes` made in 1 s.
    assert close["bytes_out"] < 16 * 1024 * 1024


@pytest.mark.skipif(os.geteuid() != 0, reason="starting a program as another user needs root")
def test_a_program_runs_as_its_user_and_group(start_evd):
    import pwd

    nobody = pwd.getpwnam("nobody")
    evd = start_evd(program_config(service("who", ["/usr/bin/id"], 'user = "nobody"\n')))
    with socket.create_connection(evd.addr("who"), timeout=WAIT) as sock:
        out = recv_all(sock).decode()
    assert out.startswith(f"uid={nobody.pw_uid}(nobody) gid={nobody.pw_gid}(")
    assert "groups=" in out and ",0(root)" not in out and "=0(root)" not in out


@pytest.mark.skipif(os.geteuid() != 0, reason="the refusal is of a daemon dropping root")
def test_check_config_refuses_a_program_user_when_evd_drops_root(tmp_path):
    config = program_config(service("who", ["/usr/bin/id"], 'user = "nobody"\n'), daemon='user = "nobody"\n')
    out = check_config(tmp_path, config)
    assert out.returncode == 78 and "services.who.user: evd must run as root" in out.stderr


# --- evd ctl: conns with exec_pid, kill ends the group ------------------------------


def test_ctl_lists_a_program_connection_with_its_pid_and_kill_ends_its_group(start_evd):
    config = program_config(service("parent", ["/bin/sh", "-c", "sleep 300 & echo $!; exec cat"]))
    evd = start_evd(config + '\n[control]\nunix = "{tmp}/ctl.sock"\n')
    sock, grandchild_pid = grandchild(evd, "parent")
    with sock:
        start = evd.wait_for("exec.start", service="parent")
        answer = ask(evd, "conns")
        assert answer.ok, answer
        (row,) = answer.body["conns"]
        assert row["conn"] == start["conn"] and row["exec_pid"] == start["exec_pid"]
        text = run_ctl(evd, "conns").stdout.splitlines()
        assert text[0].split()[-1] == "EXEC_PID" and text[1].split()[-1] == str(start["exec_pid"])
        assert ask(evd, "kill", str(start["conn"])).ok
        end = evd.wait_for("exec.end", conn=start["conn"])
        assert end["signal"] == 9
        assert evd.wait_for("conn.close", conn=start["conn"])["reason"] == "killed"
        assert process_gone(start["exec_pid"]) and process_gone(grandchild_pid)
        assert recv_all(sock) == b""
    assert ask(evd, "conns").body["conns"] == []


def test_a_program_service_added_by_a_reload_serves(start_evd):
    evd = start_evd(program_config(service("cat", ["/bin/cat"])))
    evd.config_path.write_text(
        program_config(service("cat", ["/bin/cat"]) + service("env", ["/usr/bin/env"])).format(tmp=evd.tmp)
    )
    mark = len(evd.drain_events())
    evd.send(signal.SIGHUP)
    assert evd.wait_for_since(mark, "config.reload")["ok"] is True
    opened = evd.wait_for_since(mark, "listener.open", service="env")
    host, _, port = opened["address"].rpartition(":")
    with socket.create_connection((host, int(port)), timeout=WAIT) as sock:
        assert b"EVD_SERVICE=env\n" in recv_all(sock)


def test_program_services_with_workers(start_evd):
    config = program_config(service("env", ["/usr/bin/env"], WAY_CONFIG["spawner"]), daemon="workers = 2\n")
    evd = start_evd(config)
    conns = set()
    for _ in range(6):
        with socket.create_connection(evd.addr("env"), timeout=WAIT) as sock:
            env = dict(line.split("=", 1) for line in recv_all(sock).decode().splitlines())
        conns.add(env["EVD_CONN"])
    assert len(conns) == 6  # each connection its own id, whichever worker took it
    ends = [evd.wait_for("exec.end", conn=int(c)) for c in conns]
    assert all(e["exit"] == 0 for e in ends)


def test_a_program_behind_a_proxy_sees_the_client_the_header_names(start_evd):
    extra = 'proxy_protocol = true\nproxy_from = ["127.0.0.1/32"]\n'
    evd = start_evd(program_config(service("env", ["/bin/sh", "-c", "read line; echo $line; env"], extra)))
    with socket.create_connection(evd.addr("env"), timeout=WAIT) as sock:
        # The header and the client's first line in one segment: the line is the program's.
        sock.sendall(b"PROXY TCP4 192.0.2.7 127.0.0.1 40123 7\r\nfirst line\n")
        out = recv_all(sock).decode()
    lines = out.splitlines()
    assert lines[0] == "first line"
    env = dict(line.split("=", 1) for line in lines[1:] if "=" in line)
    assert (env["REMOTE_ADDR"], env["REMOTE_PORT"]) == ("192.0.2.7", "40123")
    assert evd.wait_for("exec.start", service="env")["peer"] == "192.0.2.7:40123"
