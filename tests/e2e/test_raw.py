"""End to end: the real `evd run` process and real clients, raw services."""

from __future__ import annotations

import datetime
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading

import pytest
from support.daemon import BASE_CONFIG, ROOT, WAIT, connect, need, recv_all, recv_exactly

RFC868_EPOCH = datetime.datetime(1900, 1, 1, tzinfo=datetime.UTC)


def rfc868_now() -> int:
    return int((datetime.datetime.now(datetime.UTC) - RFC868_EPOCH).total_seconds())


def udp_request(address, payload: bytes, timeout: float = WAIT, family=socket.AF_INET) -> bytes:
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(payload, address)
        data, _ = sock.recvfrom(65535)
        return data


# -- logs and lifecycle --------------------------------------------------------


@pytest.mark.no_workers_variant("a listener.open per worker as well as the supervisor's")
def test_json_log_lines_and_listener_events(evd):
    start = evd.events[0]
    assert start["event"] == "daemon.start"
    assert start["config"] == str(evd.config_path)
    for key in ("timestamp", "level", "event", "pid"):
        assert key in start
    assert start["pid"] == evd.proc.pid
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", start["timestamp"])
    opened = [e for e in evd.events if e["event"] == "listener.open"]
    ready = evd.wait_for("daemon.ready")
    assert ready["listeners"] == len(opened) == 15
    assert all(e["address"] != "127.0.0.1:0" for e in opened if e["proto"] != "unix")


@pytest.mark.no_workers_variant("a listener.close per worker as well as the supervisor's")
def test_sigterm_stops_cleanly_with_daemon_stop(evd):
    assert evd.stop(signal.SIGTERM) == 0
    stop = evd.wait_for("daemon.stop")
    assert stop["reason"] == "signal" and stop["signal"] == "SIGTERM"
    closed = [e for e in evd.events if e["event"] == "listener.close"]
    assert len(closed) == 15
    assert not (evd.tmp / "echo.sock").exists()


def test_stopping_leaves_what_replaced_its_unix_socket(evd, tmp_path):
    """Only the inode evd bound is removed at exit: a file, or another
    daemon's socket, put at the path meanwhile stays (issue 9, defect 18)."""
    regular = tmp_path / "regular"
    regular.write_text("someone else's")
    os.replace(regular, evd.tmp / "echo.sock")
    theirs = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        theirs.bind(str(tmp_path / "theirs.sock"))
        theirs.listen()
        os.replace(tmp_path / "theirs.sock", evd.tmp / "framed.sock")
        assert evd.stop(signal.SIGTERM) == 0
        assert (evd.tmp / "echo.sock").read_text() == "someone else's"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(WAIT)
            probe.connect(str(evd.tmp / "framed.sock"))
    finally:
        theirs.close()


def test_sigint_stops_cleanly(evd):
    assert evd.stop(signal.SIGINT) == 0
    assert evd.wait_for("daemon.stop")["signal"] == "SIGINT"


def test_conn_open_and_close_are_logged_once_with_counts(evd):
    with connect(evd.addr("echo")) as sock:
        sock.sendall(b"x" * 1000)
        assert recv_exactly(sock, 1000) == b"x" * 1000
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b""
    opened = evd.wait_for("conn.open", service="echo")
    closed = evd.wait_for("conn.close", conn=opened["conn"])
    assert closed["bytes_in"] == 1000 and closed["bytes_out"] == 1000
    assert closed["reason"] == "eof" and closed["duration_ms"] >= 0
    assert closed["peer"] == opened["peer"]


# -- echo ----------------------------------------------------------------------


def test_echo_tcp_with_nc(evd):
    need("nc")
    host, port = evd.addr("echo")
    out = subprocess.run(
        ["nc", "-N", host, str(port)], input=b"hello evd\n", capture_output=True, timeout=WAIT
    )
    assert out.stdout == b"hello evd\n"


def test_echo_tcp_with_socat(evd):
    need("socat")
    host, port = evd.addr("echo")
    payload = os.urandom(100_000)
    out = subprocess.run(
        ["socat", "-t", "5", "-", f"TCP:{host}:{port}"], input=payload, capture_output=True, timeout=WAIT
    )
    assert out.stdout == payload


def test_echo_udp_with_socat(evd):
    need("socat")
    host, port = evd.addr("echo", "udp")
    out = subprocess.run(
        ["socat", "-T", "2", "-", f"UDP:{host}:{port}"],
        input=b"ping over udp",
        capture_output=True,
        timeout=WAIT,
    )
    assert out.stdout == b"ping over udp"


def test_echo_one_mebibyte_round_trip(evd):
    payload = os.urandom(1 << 20)
    with connect(evd.addr("echo")) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        got = recv_exactly(sock, len(payload))
        sender.join(WAIT)
    assert got == payload


def test_echo_half_close_flushes_then_closes(evd):
    with connect(evd.addr("echo")) as sock:
        sock.sendall(b"last words")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b"last words"


def test_echo_unix_socket(evd):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(WAIT)
        sock.connect(str(evd.tmp / "echo.sock"))
        sock.sendall(b"over unix")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b"over unix"
    assert evd.wait_for("conn.open", service="echo")["peer"] == "unix"


def test_echo_udp_largest_datagram(evd):
    payload = os.urandom(65507)
    assert udp_request(evd.addr("echo", "udp"), payload) == payload


def test_reset_mid_transfer_does_not_disturb_others(evd):
    address = evd.addr("echo")
    with connect(address) as steady:
        steady.sendall(b"before")
        assert recv_exactly(steady, 6) == b"before"
        victim = connect(address)
        victim.setblocking(False)
        sent = 0
        try:
            while sent < 1 << 20:  # as much as the buffers take, never reading
                sent += victim.send(b"y" * 65536)
        except BlockingIOError:
            pass
        assert sent > 0
        victim.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        victim.close()  # RST with a megabyte in flight
        evd.wait_for("conn.close", service="echo", reason="reset")
        steady.sendall(b"after")
        assert recv_exactly(steady, 5) == b"after"


def test_thousand_concurrent_connections_all_echo(evd):
    address = evd.addr("echo")
    socks = [connect(address) for _ in range(1000)]
    try:
        for i, sock in enumerate(socks):
            sock.sendall(b"%06d" % i)
        for i, sock in enumerate(socks):
            assert recv_exactly(sock, 6) == b"%06d" % i
    finally:
        for sock in socks:
            sock.close()


def test_udp_loop_guard_drops_small_service_ports(evd):
    if os.geteuid() != 0:
        pytest.skip("binding source port 7 needs root")
    target = evd.addr("echo", "udp")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 7))
        sock.settimeout(0.5)
        for _ in range(3):
            sock.sendto(b"loop?", target)
        drop = evd.wait_for("udp.drop", service="echo", reason="loop")
        assert drop["peer"] == "127.0.0.1:7" and drop["count"] == 1
        with pytest.raises(socket.timeout):
            sock.recvfrom(100)
    # the guard does not stop ordinary clients
    assert udp_request(target, b"still here") == b"still here"


def test_udp_loop_guard_covers_evds_own_ports(evd):
    """A datagram 'from' another evd UDP port (two echo services ping-ponging)
    is not answered."""
    daytime = evd.addr("daytime", "udp")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.5)
        # Bind to the daytime port's number on another loopback address, so
        # the source port is one evd receives UDP on.
        try:
            sock.bind(("127.0.0.2", daytime[1]))
        except OSError:
            pytest.skip("cannot bind 127.0.0.2")
        sock.sendto(b"x", evd.addr("echo", "udp"))
        evd.wait_for("udp.drop", service="echo", reason="loop")
        with pytest.raises(socket.timeout):
            sock.recvfrom(100)


# -- discard, chargen, daytime, time, timefmt ----------------------------------


def test_discard_reads_and_answers_nothing(evd):
    with connect(evd.addr("discard")) as sock:
        sock.sendall(b"z" * 100_000)
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b""
    closed = evd.wait_for("conn.close", service="discard")
    assert closed["bytes_in"] == 100_000 and closed["bytes_out"] == 0


def _chargen_pattern(lines: int) -> bytes:
    ring = bytes(range(32, 127))
    return b"".join((ring * 2)[i % 95 : i % 95 + 72] + b"\r\n" for i in range(lines))


def test_chargen_tcp_pattern(evd):
    with connect(evd.addr("chargen")) as sock:
        got = recv_exactly(sock, 74 * 200)
    assert got == _chargen_pattern(200)


def test_chargen_udp_one_line_per_datagram(evd):
    address = evd.addr("chargen", "udp")
    lines = [udp_request(address, b"") for _ in range(3)]
    assert lines == [_chargen_pattern(3)[i * 74 : (i + 1) * 74] for i in range(3)]


DAYTIME = re.compile(rb"[A-Z][a-z]+day, [A-Z][a-z]+ \d\d, \d{4} \d\d:\d\d:\d\d-\S+\r\n")


def test_daytime_tcp_and_udp(evd):
    with connect(evd.addr("daytime")) as sock:
        line = recv_all(sock)
    assert DAYTIME.fullmatch(line), line
    assert DAYTIME.fullmatch(udp_request(evd.addr("daytime", "udp"), b"?"))
    assert evd.wait_for("conn.close", service="daytime")["reason"] == "done"


def test_time_tcp_and_udp(evd):
    before = rfc868_now()
    with connect(evd.addr("time")) as sock:
        (tcp_value,) = struct.unpack("!I", recv_all(sock))
    (udp_value,) = struct.unpack("!I", udp_request(evd.addr("time", "udp"), b""))
    after = rfc868_now()
    assert before <= tcp_value <= after
    assert before <= udp_value <= after


def test_time_with_rdate(evd):
    need("rdate")
    host, port = evd.addr("time")
    out = subprocess.run(["rdate", "-p", "-o", str(port), host], capture_output=True, timeout=WAIT)
    assert out.returncode == 0, out.stderr
    year = str(datetime.datetime.now().year).encode()
    assert year in out.stdout


def test_timefmt_udp(evd):
    address = evd.addr("timefmt", "udp")
    assert udp_request(address, b"%Y").decode() == str(datetime.datetime.now().year)
    default = udp_request(address, b"").decode()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", default)


def test_timefmt_tcp_lines(evd):
    with connect(evd.addr("timefmt")) as sock:
        sock.sendall(b"%Y\r\n%%literal\n")
        sock.shutdown(socket.SHUT_WR)
        reply = recv_all(sock)
    year = str(datetime.datetime.now().year).encode()
    assert reply == year + b"\r\n%literal\r\n"


# -- start-up errors -------------------------------------------------------------


def run_evd(args, timeout=WAIT, **kw):
    return subprocess.run(
        [sys.executable, "-m", "evd", *args], capture_output=True, timeout=timeout, cwd=ROOT, **kw
    )


@pytest.mark.parametrize(
    "snippet, key",
    [
        ("[services.echo]\nbogus = 1\n", "services.echo.bogus"),
        ('[services.echo]\ntcp = ["999.0.0.1:7"]\n', "services.echo.tcp[0]"),
        ('[services.echo]\nonly_from = ["10.0.0.0/33"]\n', "services.echo.only_from[0]"),
        ('[limits]\nrate = "fast"\n', "limits.rate"),
        ("[services.nosuch]\nenabled = true\n", "services.nosuch"),
    ],
)
def test_config_errors_exit_78_naming_the_key(tmp_path, snippet, key):
    path = tmp_path / "bad.toml"
    path.write_text(snippet)
    out = run_evd(["run", "-c", str(path)])
    assert out.returncode == 78
    assert key in out.stderr.decode()


def test_toml_syntax_error_names_line_and_column(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[log]\nlevel = \n")
    out = run_evd(["run", "-c", str(path)])
    assert out.returncode == 78
    assert re.search(r"line 2, column \d+", out.stderr.decode())


def test_port_in_use_exits_1_with_one_line(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = tmp_path / "evd.toml"
        config.write_text(
            BASE_CONFIG.format(tmp=tmp_path).replace(
                '[services.echo]\ntcp = ["127.0.0.1:0"]', f'[services.echo]\ntcp = ["127.0.0.1:{port}"]'
            )
        )
        out = run_evd(["run", "-c", str(config), "--log-level", "warning"])
    assert out.returncode == 1
    lines = [line for line in out.stderr.decode().splitlines() if not line.startswith("{")]
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0], out.stderr


def test_check_config_embedded_default_round_trips(tmp_path):
    out = run_evd(["check-config"], env={**os.environ, "EVD_CONFIG": ""})
    assert out.returncode == 0, out.stderr
    text = out.stdout.decode()
    assert 'tcp = ["127.0.0.1:7007"]' in text or "127.0.0.1:7007" in text
    printed = tmp_path / "printed.toml"
    printed.write_text(text)
    again = run_evd(["check-config", "-c", str(printed)])
    assert again.returncode == 0 and again.stdout.decode() == text
