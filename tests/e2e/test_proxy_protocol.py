"""The PROXY protocol end to end (SPEC section 13): the real `evd run`
behind a test that speaks as the proxy -- v1 and v2 headers on one
listener, split anyhow, over TCP, UNIX and TLS, the framed port; the
client they name is the peer of every log line, every limit and every
ctl answer; every refusal closes that connection only.  (HAProxy itself
in front of evd: test_haproxy_proxy.py.)"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys

import pytest
from support.ctl import ask
from support.daemon import ROOT, WAIT, recv_all, recv_exactly
from support.pki import Pki

from evd.proto.framing import Decoder, encode
from evd.proto.proxy import V2_SIGNATURE, v1_header, v2_header

CONFIG = """\
[daemon]
pidfile = "{tmp}/evd.pid"
shutdown_timeout = 2.0
[log]
level = "info"
[control]
unix = "{tmp}/ctl.sock"
[limits]
max_connections = 100
per_source = 100
rate = 0.0
handshake_timeout = 0.5
[services.echo]
tcp = ["127.0.0.1:0"]
udp = ["127.0.0.1:0"]
unix = ["{tmp}/echo.sock"]
tls = ["127.0.0.1:0"]
tls_cert = "{tmp}/server.pem"
tls_key = "{tmp}/server.key"
proxy_protocol = true
proxy_from = ["127.0.0.1/32"]
[services.daytime]
tcp = ["127.0.0.1:0"]
udp = []
[services.time]
enabled = false
[services.timefmt]
enabled = false
[services.framed]
tcp = ["127.0.0.1:0"]
proxy_protocol = true
proxy_from = ["127.0.0.1/32"]
"""


@pytest.fixture
def proxied(start_evd, tmp_path):
    """evd with echo (tcp, unix, tls) and framed behind the PROXY protocol
    from 127.0.0.1; daytime served directly."""

    def start(extra: str = "", config: str = CONFIG):
        Pki(tmp_path).server()
        return start_evd(config + extra)

    return start


def dial(evd, *prefix: bytes, proto: str = "tcp", source: str = "127.0.0.1") -> socket.socket:
    """A connection to echo as the proxy, the header (if any) sent first."""
    if proto == "unix":
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(WAIT)
        sock.connect(str(evd.tmp / "echo.sock"))
    else:
        sock = socket.socket()
        sock.settimeout(WAIT)
        sock.bind((source, 0))
        sock.connect(evd.addr("echo", proto))
    for part in prefix:
        sock.sendall(part)
    return sock


def echoed(sock: socket.socket, payload: bytes = b"ping") -> bool:
    sock.sendall(payload)
    return recv_exactly(sock, len(payload)) == payload


def closed(sock: socket.socket) -> bool:
    """Closed by evd without a byte said (a reset if our bytes went unread)."""
    try:
        return recv_all(sock) == b""
    except ConnectionResetError:
        return True


def rejected(evd) -> dict:
    answer = ask(evd, "services")
    assert answer.ok, answer
    return answer.body["services"]["echo"]["rejected"]


def test_v1_and_v2_on_one_listener_name_the_client(proxied):
    evd = proxied()
    with dial(evd, v1_header(("192.0.2.10", 4010), ("198.51.100.1", 7))) as v1:
        assert echoed(v1)
        opened = evd.wait_for("conn.open", peer="192.0.2.10:4010")
        assert opened["proxy"] == f"127.0.0.1:{v1.getsockname()[1]}" and opened["proto"] == "tcp"
        # v2, its header and the first request in one write, and IPv6.
        with dial(evd, v2_header(("2001:db8::7", 4020)) + b"first") as v2:
            assert recv_exactly(v2, 5) == b"first"
            assert evd.wait_for("conn.open", peer="[2001:db8::7]:4020")["proxy"].startswith("127.0.0.1:")
            conns = ask(evd, "conns", "echo").body["conns"]
            assert sorted(c["peer"] for c in conns) == ["192.0.2.10:4010", "[2001:db8::7]:4020"]
            sources = {r["ip"]: r["connections"] for r in ask(evd, "sources", "echo").body["sources"]}
            assert sources == {"192.0.2.10": 1, "2001:db8::7": 1}  # never the proxy's address
    closed = evd.wait_for("conn.close", peer="192.0.2.10:4010")
    assert closed["bytes_in"] == 4  # the header is not the client's traffic
    assert evd.stop() == 0


def test_a_header_split_at_every_byte(proxied):
    evd = proxied()
    header = v2_header(("192.0.2.11", 4011), ("192.0.2.1", 7), tlvs=((0x02, b"evd.example"),))
    with dial(evd) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(header)):
            sock.sendall(header[i : i + 1])
        assert echoed(sock)
    assert evd.wait_for("conn.open", peer="192.0.2.11:4011")


def test_local_and_unknown_are_the_proxy_itself(proxied):
    evd = proxied()
    for header in (v2_header(None), b"PROXY UNKNOWN\r\n"):
        with dial(evd, header) as sock:
            assert echoed(sock)
            port = sock.getsockname()[1]
        opened = evd.wait_for("conn.open", peer=f"127.0.0.1:{port}")
        assert opened["proxy"] == f"127.0.0.1:{port}"
    assert evd.stop() == 0


def test_unix_listeners_read_the_header_too(proxied):
    evd = proxied()
    with dial(evd, v1_header(("192.0.2.12", 4012), ("192.0.2.1", 7)), proto="unix") as sock:
        assert echoed(sock)
    opened = evd.wait_for("conn.open", peer="192.0.2.12:4012")
    assert opened["proto"] == "unix" and opened["proxy"] == "unix"


@pytest.mark.parametrize("together", [True, False], ids=["with-client-hello", "alone"])
def test_tls_reads_the_header_before_the_handshake(proxied, tmp_path, together):
    evd = proxied()
    context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    raw = dial(evd, proto="tls")
    if together:  # corked: the header leaves with the ClientHello, and one read gets both
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
    raw.sendall(v2_header(("192.0.2.13", 4013)))
    with context.wrap_socket(raw, server_hostname="127.0.0.1", do_handshake_on_connect=False) as tls:
        if together:
            tls.setblocking(False)
            with pytest.raises(ssl.SSLWantReadError):
                tls.do_handshake()  # the ClientHello, behind the header
            tls.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
            tls.settimeout(WAIT)
        tls.do_handshake()
        assert echoed(tls)
    opened = evd.wait_for("conn.open", peer="192.0.2.13:4013")
    assert opened["proto"] == "tls" and opened["proxy"].startswith("127.0.0.1:")


def hello(sock: socket.socket) -> dict:
    decoder = Decoder(1 << 16, 1 << 20)
    while True:
        data = sock.recv(65536)
        assert data, "closed before the hello"
        decoder.feed(data)
        frames = list(decoder.frames())
        if frames:
            return frames[0].header


def test_framed_says_hello_after_the_header(proxied):
    evd = proxied()
    with socket.create_connection(evd.addr("framed"), timeout=WAIT) as sock:
        sock.sendall(v1_header(("192.0.2.14", 4014), ("192.0.2.1", 7070)))
        assert hello(sock)["evd"] == 1
        sock.sendall(encode({"svc": "echo", "id": 1}, b"hi"))
    assert evd.wait_for("conn.open", service="framed", peer="192.0.2.14:4014")


REFUSED = [
    b"GET / HTTP/1.0\r\n\r\n",  # no header at all
    b"PROXY TCP4 192.0.2.1 nonsense 1 2\r\n",  # malformed
    b"PROXY " + b"x" * 120,  # no CRLF where one must be
    V2_SIGNATURE + b"\x21\x11\xff\xff",  # oversized
    V2_SIGNATURE + b"\x21\x31\x00\x00",  # an address family that names no client (AF_UNIX)
    V2_SIGNATURE + b"\x21\x11\x00\x0e" + bytes(14),  # a truncated TLV block
]


def test_bad_headers_close_that_connection_only(proxied):
    evd = proxied()
    with dial(evd, v2_header(("192.0.2.15", 4015))) as kept:
        assert echoed(kept)
        for data in REFUSED:
            with dial(evd, data) as sock:
                assert closed(sock)
            assert echoed(kept)  # everyone else carries on
        first = evd.wait_for("conn.reject", reason="proxy")
        assert first["service"] == "echo" and first["peer"].startswith("127.0.0.1:") and first["count"] == 1
        assert rejected(evd) == {"proxy": len(REFUSED)}
    assert not [e for e in evd.drain_events() if e["event"] == "conn.open" and e["peer"].startswith("127.")]


def test_a_late_or_missing_header_is_refused(proxied):
    evd = proxied()
    with dial(evd, b"PROXY TCP4 192.0.2.1") as late:  # and then nothing
        assert closed(late)  # closed at handshake_timeout
    with dial(evd) as silent:
        silent.shutdown(socket.SHUT_WR)  # EOF before any header
        assert closed(silent)
    assert rejected(evd) == {"proxy": 2}
    assert evd.wait_for("conn.reject", reason="proxy")


def test_only_trusted_proxies_may_connect(proxied):
    evd = proxied(config=CONFIG.replace('proxy_from = ["127.0.0.1/32"]', 'proxy_from = ["127.0.0.2/32"]', 1))
    with dial(evd, v2_header(("192.0.2.16", 4016)), source="127.0.0.3") as stranger:
        assert closed(stranger)
    reject = evd.wait_for("conn.reject", reason="proxy")
    assert reject["peer"].startswith("127.0.0.3:")
    with dial(evd, v2_header(("192.0.2.16", 4016)), source="127.0.0.2") as trusted:
        assert echoed(trusted)
    # The UDP side of a proxied service is served as before.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(WAIT)
        udp.sendto(b"dgram", evd.addr("echo", "udp"))
        assert udp.recv(100) == b"dgram"


def test_limits_and_access_lists_apply_to_each_client(proxied):
    evd = proxied(
        config=CONFIG.replace(
            'proxy_from = ["127.0.0.1/32"]\n',
            'proxy_from = ["127.0.0.1/32"]\nper_source = 1\nonly_from = ["192.0.2.0/24"]\n',
            1,
        )
    )
    with dial(evd, v2_header(("192.0.2.17", 1))) as a, dial(evd, v2_header(("192.0.2.18", 1))) as b:
        assert echoed(a) and echoed(b)  # one each: per_source is per client, not per proxy
        with dial(evd, v2_header(("192.0.2.17", 2))) as again:
            assert closed(again)
        assert evd.wait_for("conn.reject", reason="per_source")["peer"] == "192.0.2.17:2"
        with dial(evd, v2_header(("203.0.113.9", 3))) as outsider:
            assert closed(outsider)
        assert evd.wait_for("conn.reject", reason="access")["peer"] == "203.0.113.9:3"
        assert echoed(a) and echoed(b)
    assert rejected(evd) == {"per_source": 1, "access": 1}


def test_daytime_beside_it_is_served_directly(proxied):
    evd = proxied()
    with socket.create_connection(evd.addr("daytime"), timeout=WAIT) as sock:
        assert recv_all(sock).endswith(b"\r\n")


def test_proxy_protocol_on_udp_only_is_exit_78(tmp_path):
    config = tmp_path / "evd.toml"
    config.write_text('[services.timefmt]\nproxy_protocol = true\nproxy_from = ["10.0.0.0/8"]\n')
    out = subprocess.run(
        [sys.executable, "-m", "evd", "check-config", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=3 * WAIT,
        cwd=ROOT,
    )
    assert out.returncode == 78
    assert "services.timefmt.proxy_protocol: timefmt has only UDP listeners" in out.stderr
    config.write_text("[services.echo]\nproxy_protocol = true\n")
    out = subprocess.run(
        [sys.executable, "-m", "evd", "run", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=3 * WAIT,
        cwd=ROOT,
    )
    assert out.returncode == 78 and "services.echo.proxy_from: required" in out.stderr


PROGRAM = """\
[daemon]
pidfile = "{tmp}/evd.pid"
shutdown_timeout = 2.0
[log]
level = "info"
[limits]
rate = 0.0
[services.echo]
enabled = false
[services.daytime]
enabled = false
[services.time]
enabled = false
[services.timefmt]
enabled = false
[services.framed]
enabled = false
[services.who]
exec = ["/bin/sh", "-c", "echo $REMOTE_ADDR $REMOTE_PORT; exec cat"]
tcp = ["127.0.0.1:0"]
proxy_protocol = true
proxy_from = ["127.0.0.1/32"]
"""


def test_a_program_gets_the_client_and_every_byte_after_the_header(start_evd):
    """The socket goes to the child as it is: evd must have read the header
    and not one byte more, even when they came in one packet."""
    evd = start_evd(PROGRAM)
    with socket.create_connection(evd.addr("who"), timeout=WAIT) as sock:
        sock.sendall(v2_header(("192.0.2.20", 4020)) + b"first bytes\n")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b"192.0.2.20 4020\nfirst bytes\n"
    assert evd.wait_for("exec.start", service="who")["peer"] == "192.0.2.20:4020"
    assert evd.wait_for("conn.open", service="who")["proxy"].startswith("127.0.0.1:")
