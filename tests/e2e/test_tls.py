"""End to end: TLS listeners of the real `evd run`, with real TLS clients
(Python's ssl, `openssl s_client`, `socat OPENSSL:`, `evd call --tls`) and
certificates made by trustme in each test (tests/pki.py)."""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time

import pytest
from support.daemon import ROOT, WAIT, need, recv_all, recv_exactly
from support.pki import Pki, write_private

SERVICES = ("echo", "discard", "chargen", "daytime", "time", "timefmt", "framed")
TLS_LINES = """tls = ["127.0.0.1:0"]
tls_cert = "{{tmp}}/server.pem"
tls_key = "{{tmp}}/server.key"
{client_ca}"""


def tls_config(services=SERVICES, client_ca=False, limits="", framed="", off=()) -> str:
    """evd with a TLS listener on each of `services` (and TCP for echo),
    those of `off` switched off; "{tmp}" is filled in by EvdProcess."""
    ca = 'tls_client_ca = "{tmp}/ca.pem"' if client_ca else ""
    parts = [
        '[daemon]\npidfile = "{tmp}/evd.pid"\nshutdown_timeout = 2.0\n',
        '[log]\nlevel = "info"\nformat = "json"\n',
        f"[limits]\nmax_connections = 500\nper_source = 500\nrate = 0.0\n{limits}\n",
    ]
    for name in SERVICES:
        enabled = name in services and name not in off
        table = f"[services.{name}]\nenabled = {str(enabled).lower()}\n"
        if name == "framed":
            table += 'tcp = ["127.0.0.1:0"]\n' + framed + "\n"
        else:
            table += 'tcp = ["127.0.0.1:0"]\n' if name == "echo" else "tcp = []\n"
            table += "udp = []\n"
        if name in services:
            table += TLS_LINES.format(client_ca=ca)
        parts.append(table)
    return "\n".join(parts)


@pytest.fixture
def pki(tmp_path):
    pki = Pki(tmp_path)
    pki.server()  # {tmp}/server.pem and server.key
    return pki


def tls_connect(evd, pki, service="echo", cert=None, **wrap) -> ssl.SSLSocket:
    sock = socket.create_connection(evd.addr(service, "tls"), timeout=WAIT)
    return pki.client_context(cert).wrap_socket(sock, server_hostname="127.0.0.1", **wrap)


def converse(cmd: list[str], data: bytes) -> bytes:
    """Run a client, send `data` on its stdin, and close stdin only once
    that much has come back on its stdout (at stdin's EOF s_client stops at
    once); what it printed, bounded by WAIT."""
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    got = b""
    try:
        proc.stdin.write(data)
        proc.stdin.flush()
        deadline = time.monotonic() + WAIT
        os.set_blocking(proc.stdout.fileno(), False)
        while len(got) < len(data) and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
            chunk = proc.stdout.read() if ready else b""
            if ready and not chunk:
                break
            got += chunk or b""
        proc.stdin.close()
        proc.wait(WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)
        proc.stdout.close()
        proc.stderr.close()
    return got


def read_until(stream, want: bytes) -> bytes:
    """What `stream` (a pipe) gives until `want` has come, within WAIT."""
    got = b""
    deadline = time.monotonic() + WAIT
    while want not in got:
        left = deadline - time.monotonic()
        assert left > 0, f"no {want!r} within {WAIT}s: {got[-300:]!r}"
        if select.select([stream], [], [], left)[0]:
            chunk = os.read(stream.fileno(), 65536)
            assert chunk, f"EOF before {want!r}: {got[-300:]!r}"
            got += chunk
    return got


def evd_call(evd, *args):
    host, port = evd.addr("framed", "tls")
    return subprocess.run(
        [sys.executable, "-m", "evd", "call", "--address", f"{host}:{port}", "--tls", *args],
        capture_output=True,
        text=True,
        timeout=WAIT,
        cwd=ROOT,
    )


# -- serving ----------------------------------------------------------------------


def test_echo_over_tls_with_python_openssl_and_socat(start_evd, pki):
    evd = start_evd(tls_config(services=("echo",)))
    opened = evd.wait_for("listener.open", service="echo", proto="tls")
    host, port = evd.addr("echo", "tls")
    assert opened["address"] == f"{host}:{port}"
    with tls_connect(evd, pki) as sock:
        assert sock.version() in ("TLSv1.2", "TLSv1.3")
        sock.sendall(b"over python's ssl\n")
        assert recv_exactly(sock, 18) == b"over python's ssl\n"
    conn = evd.wait_for("conn.open", service="echo", proto="tls")
    assert "client_cn" not in conn
    closed = evd.wait_for("conn.close", conn=conn["conn"])
    assert closed["bytes_in"] == closed["bytes_out"] == 18

    s_client = [need("openssl"), "s_client", "-connect", f"{host}:{port}", "-CAfile", str(pki.cafile)]
    s_client += ["-verify_return_error", "-quiet", "-no_ign_eof"]
    assert converse(s_client, b"over s_client\n") == b"over s_client\n"
    socat = [need("socat"), "-T", str(WAIT), "-", f"OPENSSL:{host}:{port},cafile={pki.cafile}"]
    assert converse(socat, b"over socat\n") == b"over socat\n"


def test_every_stream_service_over_tls(start_evd, pki):
    evd = start_evd(tls_config())
    with tls_connect(evd, pki, "discard") as sock:
        sock.sendall(b"x" * 5000)
        sock.unwrap()  # close_notify, then the server's
    assert evd.wait_for("conn.close", service="discard")["bytes_in"] == 5000
    with tls_connect(evd, pki, "chargen") as sock:
        got = recv_exactly(sock, 7400)
    assert got.startswith(b' !"#$%&') and got[72:74] == b"\r\n"
    with tls_connect(evd, pki, "daytime", suppress_ragged_eofs=False) as sock:
        line = recv_all(sock)  # ends in close_notify: a ragged EOF would raise
    assert line.endswith(b"\r\n") and b"," in line
    with tls_connect(evd, pki, "time", suppress_ragged_eofs=False) as sock:
        stamp = recv_all(sock)
    assert len(stamp) == 4
    assert abs(int.from_bytes(stamp, "big") - 2208988800 - time.time()) < 5
    with tls_connect(evd, pki, "timefmt") as sock:
        sock.sendall(b"%Y\n")
        assert recv_exactly(sock, 6) == time.strftime("%Y").encode() + b"\r\n"
    evd.wait_for("conn.open", service="timefmt")  # the last: the others are read too
    opens = [e for e in evd.drain_events() if e["event"] == "conn.open"]
    assert {e["service"] for e in opens} == {"discard", "chargen", "daytime", "time", "timefmt"}
    assert all(e["proto"] == "tls" for e in opens)


def test_framed_over_tls_with_evd_call(start_evd, pki):
    evd = start_evd(tls_config(services=("framed",)))
    out = evd_call(evd, "--cafile", str(pki.cafile), "echo", "hello over tls")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "hello over tls"
    # Without the CA the server's certificate is not trusted.
    out = evd_call(evd, "echo", "x")
    assert out.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in out.stderr


def test_mutual_tls_requires_a_client_certificate(start_evd, pki):
    evd = start_evd(tls_config(services=("echo", "framed"), client_ca=True))
    cert = pki.client("ops")
    with tls_connect(evd, pki, "echo", cert) as sock:
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"
    opened = evd.wait_for("conn.open", service="echo")
    assert opened["client_cn"] == "ops" and opened["proto"] == "tls"
    out = evd_call(
        evd, "--cafile", str(pki.cafile), "--cert", str(cert[0]), "--key", str(cert[1]), "echo", "hi"
    )
    assert out.returncode == 0 and out.stdout == "hi", out.stderr
    assert evd.wait_for("conn.open", service="framed")["client_cn"] == "ops"

    # No certificate: refused (TLS 1.3 says so after the client's Finished).
    with pytest.raises((ssl.SSLError, ConnectionError)):
        with tls_connect(evd, pki, "echo") as sock:
            sock.sendall(b"ping")
            recv_exactly(sock, 4)
    fail = evd.wait_for("tls.fail", service="echo")
    assert fail["reason"] == "peer_did_not_return_a_certificate" and fail["count"] == 1
    out = evd_call(evd, "--cafile", str(pki.cafile), "echo", "x")
    assert out.returncode == 1 and "CERTIFICATE_REQUIRED" in out.stderr

    # A certificate from a CA the service does not trust: refused too.
    stranger = Pki(evd.tmp, "other-ca").client("ops", "stranger")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        with tls_connect(evd, pki, "echo", stranger) as sock:
            sock.sendall(b"ping")
            recv_exactly(sock, 4)
    assert evd.wait_for("tls.fail", reason="certificate_verify_failed")


def test_slow_and_garbage_handshakes_are_tls_fail(start_evd, pki):
    evd = start_evd(tls_config(services=("echo",), limits="handshake_timeout = 0.3"))
    address = evd.addr("echo", "tls")
    with socket.create_connection(address, timeout=WAIT) as silent:
        started = time.monotonic()
        assert silent.recv(100) == b""  # closed by the server
        assert time.monotonic() - started < 0.3 + 1.5  # the sweep runs every 0.075 s here
    assert evd.wait_for("tls.fail", reason="handshake_timeout")["service"] == "echo"
    with socket.create_connection(address, timeout=WAIT) as http:
        http.sendall(b"GET / HTTP/1.1\r\nHost: evd\r\n\r\n")
        assert recv_all(http)[:1] in (b"", b"\x15")  # nothing, or a TLS alert
    assert evd.wait_for("tls.fail", reason="http_request")
    # A failed handshake is not a connection.
    assert not [e for e in evd.drain_events() if e["event"] in ("conn.open", "conn.close")]
    # And the port still serves.
    with tls_connect(evd, pki) as sock:
        sock.sendall(b"ok")
        assert recv_exactly(sock, 2) == b"ok"


def test_failed_handshakes_are_counted_in_metrics_by_reason(start_evd, pki):
    from support.metrics import samples, scrape, value

    evd = start_evd(tls_config(services=("echo",)) + '\n[metrics]\ntcp = ["127.0.0.1:0"]\n')
    for _ in range(2):
        with socket.create_connection(evd.addr("echo", "tls"), timeout=WAIT) as http:
            http.sendall(b"GET / HTTP/1.1\r\nHost: evd\r\n\r\n")
            recv_all(http)  # evd closed it: the failure is counted by then
    assert evd.wait_for("tls.fail", reason="http_request")  # (the second is throttled)
    with tls_connect(evd, pki) as sock:  # a handshake that works counts nothing
        sock.sendall(b"ok")
        assert recv_exactly(sock, 2) == b"ok"
    text = scrape(evd.addr("metrics"))[2]
    assert value(text, "evd_tls_failures_total", service="echo", reason="http_request") == 2
    assert [k for k in samples(text) if k[0] == "evd_tls_failures_total"] == [
        ("evd_tls_failures_total", (("reason", "http_request"), ("service", "echo")))
    ]


def test_tls_1_1_and_renegotiation_are_refused(start_evd, pki):
    openssl = need("openssl")
    evd = start_evd(tls_config(services=("echo",)))
    host, port = evd.addr("echo", "tls")
    old = subprocess.run(
        [openssl, "s_client", "-connect", f"{host}:{port}", "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=WAIT,
    )
    assert old.returncode != 0
    assert evd.wait_for("tls.fail", reason="unsupported_protocol")
    # TLS 1.2 client-initiated renegotiation ("R" in s_client): refused,
    # and the connection ends without the daemon noticing anything else.
    proc = subprocess.Popen(
        [openssl, "s_client", "-connect", f"{host}:{port}", "-CAfile", str(pki.cafile), "-tls1_2"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        proc.stdin.write(b"before\n")
        proc.stdin.flush()
        opened = evd.wait_for("conn.open", service="echo")
        out = read_until(proc.stdout, b"before\n")  # echoed: nothing in flight now
        proc.stdin.write(b"R\n")
        proc.stdin.flush()
        out += proc.communicate(timeout=WAIT)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)
    assert b"before" in out and b"RENEGOTIATING" in out
    assert b"no renegotiation" in out
    closed = evd.wait_for("conn.close", conn=opened["conn"])
    assert closed["reason"] == "error" and closed["bytes_in"] == 7


def test_a_client_that_never_reads_does_not_hold_up_others(start_evd, pki):
    evd = start_evd(tls_config(services=("echo", "chargen")))
    with tls_connect(evd, pki, "chargen") as hog:
        opened = evd.wait_for("conn.open", service="chargen")
        for _ in range(20):  # the hog never reads; the others are served
            with tls_connect(evd, pki) as sock:
                sock.sendall(b"still here")
                assert recv_exactly(sock, 10) == b"still here"
        assert hog.recv(10)  # and the hog gets the pattern once it reads
    closed = evd.wait_for("conn.close", conn=opened["conn"])
    # Held at write_high (256 KiB by default), plus the kernel's buffers.
    assert closed["bytes_out"] < 16 * 1024 * 1024


# -- certificates: rotation and mistakes ----------------------------------------------


def test_sighup_rotates_the_certificate_for_new_connections(start_evd, pki):
    evd = start_evd(tls_config(services=("echo",)))
    established = tls_connect(evd, pki)
    first = established.getpeercert(binary_form=True)
    pki.server()  # a new certificate and key in place of the old
    mark = len(evd.drain_events())
    evd.send(signal.SIGHUP)
    reload = evd.wait_for_since(mark, "config.reload")
    assert reload["ok"] is True and reload["changed"] == ["echo"]  # the rotation is reported
    with tls_connect(evd, pki) as fresh:
        assert fresh.getpeercert(binary_form=True) != first
    # The established connection keeps its session.
    with established:
        established.sendall(b"after rotation")
        assert recv_exactly(established, 14) == b"after rotation"

    # A broken key at the next SIGHUP: the reload fails naming the key, and
    # the certificate in force stays in force.
    (evd.tmp / "server.key").write_bytes(b"not a key\n")
    mark = len(evd.drain_events())
    evd.send(signal.SIGHUP)
    reload = evd.wait_for_since(mark, "config.reload")
    assert reload["ok"] is False
    assert "services.echo.tls_key: " in reload["error"]
    with tls_connect(evd, pki) as again:
        again.sendall(b"x")
        assert recv_exactly(again, 1) == b"x"


def _break(kind: str, tmp) -> str:
    """Spoil the configuration's TLS files one way; the key the error names."""
    if kind == "missing cert":
        os.unlink(tmp / "server.pem")
        return "tls_cert"
    if kind == "cert is a directory":
        os.unlink(tmp / "server.pem")
        os.mkdir(tmp / "server.pem")
        return "tls_cert"
    if kind == "cert not PEM":
        (tmp / "server.pem").write_text("hello\n")
        return "tls_cert"
    if kind == "missing key":
        os.unlink(tmp / "server.key")
        return "tls_key"
    if kind == "key readable by others":
        os.chmod(tmp / "server.key", 0o644)
        return "tls_key"
    if kind == "key of another certificate":
        other = Pki(tmp, "other").server("other")
        shutil.copy(other[1], tmp / "server.key")
        return "tls_key"
    if kind == "encrypted key":
        need("openssl")
        subprocess.run(
            [
                "openssl",
                "pkey",
                "-in",
                tmp / "server.key",
                "-aes256",
                "-passout",
                "pass:secret",
                "-out",
                tmp / "enc",
            ],
            check=True,
            capture_output=True,
        )
        write_private(tmp / "server.key", (tmp / "enc").read_bytes())
        return "tls_key"
    assert kind == "bad client CA"
    (tmp / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    return "tls_client_ca"


MISTAKES = (
    "missing cert",
    "cert is a directory",
    "cert not PEM",
    "missing key",
    "key readable by others",
    "key of another certificate",
    "encrypted key",
    "bad client CA",
)


@pytest.mark.parametrize("kind", MISTAKES)
def test_check_config_refuses_unusable_tls_files(tmp_path, pki, kind):
    config = tmp_path / "evd.toml"
    config.write_text(tls_config(services=("echo",), client_ca=True).format(tmp=tmp_path))
    key = _break(kind, tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "evd", "check-config", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=WAIT,
        cwd=ROOT,
    )
    assert out.returncode == 78, out.stderr
    assert f"services.echo.{key}: " in out.stderr


def test_run_refuses_a_key_readable_by_others(start_evd, pki, tmp_path):
    os.chmod(tmp_path / "server.key", 0o640)
    evd = start_evd(tls_config(services=("framed",)), wait_ready=False)
    assert evd.proc.wait(WAIT) == 78
    evd._reader.join(WAIT)  # everything it wrote on stderr is in evd.raw
    text = "\n".join(evd.raw)
    assert "services.framed.tls_key: " in text and "chmod 600" in text


def test_tls_needs_a_certificate(tmp_path):
    config = tmp_path / "evd.toml"
    config.write_text('[services.echo]\ntls = ["127.0.0.1:0"]\n')
    out = subprocess.run(
        [sys.executable, "-m", "evd", "check-config", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=WAIT,
        cwd=ROOT,
    )
    assert out.returncode == 78
    assert "services.echo.tls_cert: required when tls is not empty" in out.stderr


# -- the framed port over mutual TLS: named keys by client certificate -----------------

NAMED_KEYS = """
[commands.greet]
argv = ["echo", "hello"]
args = true

[commands.uptime]
argv = ["uptime"]

[keys.ops]
client_cn = "ops"

[keys.deploy]
client_cn = "deploy"
commands = ["greet"]
"""


def test_a_client_certificate_authenticates_as_its_key(start_evd, pki):
    from evd.tools.client import Client, ServerError

    evd = start_evd(tls_config(services=("framed",), client_ca=True) + NAMED_KEYS)
    host, port = evd.addr("framed", "tls")
    deploy = pki.client("deploy")
    with Client(f"{host}:{port}", timeout=WAIT, tls=pki.client_context(deploy)) as client:
        assert client.hello["key"] == "deploy"  # authenticated from the hello on
        assert client.call("command", name="greet", args=["tls"]).body == b"hello tls\n"
        with pytest.raises(ServerError) as err:
            client.call("command", name="uptime")
        assert err.value.code == "unauthorized"  # outside deploy's commands
    opened = evd.wait_for("conn.open", service="framed")
    ok = evd.wait_for("auth.ok", conn=opened["conn"])
    assert (ok["key"], ok["via"]) == ("deploy", "tls")
    assert opened["client_cn"] == "deploy"
    start = evd.wait_for("command.start", name="greet")
    assert start["key"] == "deploy"

    # A certificate the CA signed for a CN no key names: a connection, but
    # not an authenticated one.
    with Client(f"{host}:{port}", timeout=WAIT, tls=pki.client_context(pki.client("intern"))) as client:
        assert "key" not in client.hello
        with pytest.raises(ServerError) as err:
            client.call("command", name="greet")
        assert err.value.code == "unauthorized"
    # And evd call with the ops certificate may run anything.
    ops = pki.client("ops")
    out = evd_call(
        evd, "--cafile", str(pki.cafile), "--cert", str(ops[0]), "--key", str(ops[1]), "command", "uptime"
    )
    assert out.returncode == 0, out.stderr


def test_ctl_enable_reads_the_tls_files_of_a_service_that_was_off(start_evd, pki, tmp_path):
    from support.ctl import SURFACES, run_ctl

    evd = start_evd(tls_config(services=("echo", "daytime"), off=("echo", "daytime")) + SURFACES)
    out = run_ctl(evd, "enable", "echo")
    assert out.returncode == 0, out.stderr
    opened = evd.wait_for("listener.open", service="echo", proto="tls")
    host, _, port = opened["address"].rpartition(":")
    with socket.create_connection((host, int(port)), timeout=WAIT) as raw:
        with pki.client_context().wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            sock.sendall(b"on")
            assert recv_exactly(sock, 2) == b"on"
    # Files that cannot serve: refused, naming the key, nothing opened.
    os.chmod(tmp_path / "server.key", 0o644)
    out = run_ctl(evd, "enable", "daytime")
    assert out.returncode == 2
    assert "services.daytime.tls_key: " in out.stderr and "chmod 600" in out.stderr
    assert not [e for e in evd.drain_events() if e["event"] == "listener.open" and e["service"] == "daytime"]


# -- evd bench --tls ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "service", "extra"),
    [
        ("tcp", "echo", ["-n", "4", "-s", "1000"]),
        ("connect", "echo", ["-n", "4", "--sources", "64"]),
        ("framed", "framed", ["-n", "3", "-D", "4"]),
        ("idle", "echo", ["-n", "20"]),
    ],
)
def test_evd_bench_over_tls(start_evd, pki, mode, service, extra):
    from support.bench import run_json

    evd = start_evd(tls_config(services=("echo", "framed")))
    host, port = evd.addr(service, "tls")
    result = run_json(
        mode,
        "--tls",
        "--cafile",
        str(pki.cafile),
        "--address",
        f"{host}:{port}",
        "-d",
        "0.5",
        "-w",
        "0",
        *extra,
    )
    assert result["tls"] is True and result["errors"] == 0, result
    assert result["requests"] > 0
    evd.wait_for("conn.open", service=service)
    opened = [e for e in evd.drain_events() if e["event"] == "conn.open" and e["service"] == service]
    assert opened and all(e["proto"] == "tls" for e in opened)


def test_evd_bench_tls_refuses_udp_and_an_untrusted_server(start_evd, pki):
    from support.bench import evd_bench

    evd = start_evd(tls_config(services=("echo",)))
    host, port = evd.addr("echo", "tls")
    out = evd_bench("udp", "--tls", "--address", f"{host}:{port}", "-d", "0.2")
    assert out.returncode == 1 and "udp has no TLS" in out.stderr
    out = evd_bench("tcp", "--tls", "--address", f"{host}:{port}", "-d", "0.2", "-w", "0")
    assert out.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in out.stderr
