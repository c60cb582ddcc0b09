"""HAProxy in front of evd with `send-proxy` and `send-proxy-v2` (SPEC
section 13): clients from two loopback addresses through the one proxy are
two clients to evd -- per_source and only_from apply to each, the log and
`evd ctl sources` name each, and an auth ban of one leaves the other
served.  (How HAProxy is run in tests: test_haproxy.py.)"""

from __future__ import annotations

import re
import socket
import subprocess
import time

import pytest
from support.ctl import ask
from support.daemon import ROOT, WAIT, need, recv_all, recv_exactly
from support.pki import write_private

from evd.proto.framing import Decoder, encode

A, B, OUTSIDER = "127.0.0.2", "127.0.0.3", "127.0.0.4"

CONFIG = """\
[daemon]
pidfile = "{tmp}/evd.pid"
shutdown_timeout = 2.0
[log]
level = "info"
[control]
unix = "{tmp}/ctl.sock"
[limits]
rate = 0.0
auth_ban = 300.0
[services.echo]
tcp = ["127.0.0.1:0"]
udp = []
per_source = 1
only_from = ["127.0.0.2", "127.0.0.3"]
proxy_protocol = true
proxy_from = ["127.0.0.1/32"]
[services.daytime]
enabled = false
[services.time]
enabled = false
[services.timefmt]
enabled = false
[services.framed]
tcp = ["127.0.0.1:0"]
key_file = "{tmp}/framed.key"
proxy_protocol = true
proxy_from = ["127.0.0.1/32"]
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def haproxy_config(send: str, echo: tuple[int, int], framed: tuple[int, int]) -> str:
    """Two frontends, each to one evd port with `send` (send-proxy or send-proxy-v2)."""
    return f"""\
global
    maxconn 100
defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
frontend echo
    bind 127.0.0.1:{echo[0]}
    default_backend evd_echo
frontend framed
    bind 127.0.0.1:{framed[0]}
    default_backend evd_framed
backend evd_echo
    server evd 127.0.0.1:{echo[1]} {send}
backend evd_framed
    server evd 127.0.0.1:{framed[1]} {send}
"""


def dial(port: int, source: str) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(WAIT)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def served(sock: socket.socket) -> bool:
    sock.sendall(b"ping")
    return recv_exactly(sock, 4) == b"ping"


def refused(sock: socket.socket) -> bool:
    """HAProxy passes evd's close on: the client's connection ends, unanswered."""
    try:
        sock.sendall(b"ping")
        return recv_all(sock) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def frames(sock: socket.socket, count: int) -> list:
    decoder = Decoder(1 << 16, 1 << 20)
    got: list = []
    while len(got) < count:
        data = sock.recv(65536)
        if not data:
            break
        decoder.feed(data)
        got.extend(decoder.frames())
    return got


@pytest.fixture
def behind_haproxy(start_evd, tmp_path):
    haproxy = need("haproxy")
    started = []

    def start(send: str):
        write_private(tmp_path / "framed.key", b"the framed key\n")
        evd = start_evd(CONFIG)
        echo, framed = free_port(), free_port()
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(haproxy_config(send, (echo, evd.addr("echo")[1]), (framed, evd.addr("framed")[1])))
        proc = subprocess.Popen(
            [haproxy, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        started.append(proc)
        deadline = time.monotonic() + WAIT
        while True:  # HAProxy is up once its frontend accepts
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                with socket.create_connection(("127.0.0.1", framed), timeout=WAIT) as probe:
                    frames(probe, 1)
                break
            except (ConnectionRefusedError, ConnectionResetError):
                assert time.monotonic() < deadline, "haproxy did not start"
                time.sleep(0.05)  # bounded: retried until the deadline
        return evd, echo, framed

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(WAIT)


@pytest.mark.parametrize("send", ["send-proxy", "send-proxy-v2"])
def test_two_clients_through_one_proxy_are_two_clients(behind_haproxy, send):
    evd, echo, _ = behind_haproxy(send)
    with dial(echo, A) as a, dial(echo, B) as b:
        # per_source = 1, yet both are served: the limit is per client.
        assert served(a) and served(b)
        with dial(echo, A) as second:
            assert refused(second)
        reject = evd.wait_for("conn.reject", service="echo", reason="per_source")
        assert reject["peer"].startswith(f"{A}:")
        with dial(echo, OUTSIDER) as outsider:  # only_from names A and B
            assert refused(outsider)
        assert evd.wait_for("conn.reject", service="echo", reason="access")["peer"].startswith(f"{OUTSIDER}:")
        assert served(a) and served(b)
        sources = {r["ip"]: r for r in ask(evd, "sources", "echo").body["sources"]}
        assert sources[A]["connections"] == 1 and sources[A]["rejected"] == 1
        assert sources[B]["connections"] == 1 and sources[B]["rejected"] == 0
        assert "127.0.0.1" not in sources  # the proxy is nobody's client
        peers = {c["peer"].rpartition(":")[0] for c in ask(evd, "conns", "echo").body["conns"]}
        assert peers == {A, B}
    for client in (A, B):
        opened = [e for e in evd.events if e["event"] == "conn.open" and e["peer"].startswith(f"{client}:")]
        assert opened and opened[0]["proxy"].startswith("127.0.0.1:")
    assert evd.stop() == 0


@pytest.mark.parametrize("send", ["send-proxy", "send-proxy-v2"])
def test_a_ban_of_one_client_leaves_the_other_served(behind_haproxy, send):
    evd, _, framed = behind_haproxy(send)
    with dial(framed, A) as a:
        assert frames(a, 1)[0].header["auth"] == "hmac-sha256"
        for _ in range(3):
            a.sendall(encode({"svc": "auth", "mac": "00"}))
        answers = frames(a, 3)
        assert [f.header["error"]["code"] for f in answers] == ["unauthorized"] * 3
        assert recv_all(a) == b""  # closed after the third
    fail = evd.wait_for("auth.fail", attempt=3)
    assert fail["peer"].startswith(f"{A}:")
    with dial(framed, A) as again:
        assert recv_all(again) == b""  # banned: no hello
    assert evd.wait_for("conn.reject", service="framed", reason="banned")["peer"].startswith(f"{A}:")
    with dial(framed, B) as b:
        assert frames(b, 1)[0].header["evd"] == 1  # the other client is served
    banned = {r["ip"]: r["banned_for_s"] for r in ask(evd, "sources", "framed").body["sources"]}
    assert banned[A] > 0 and banned.get(B, 0.0) == 0.0
    assert evd.stop() == 0
    # fail2ban's filter finds the client in those lines, never the proxy.
    fail2ban_regex = need("fail2ban-regex")
    log = evd.tmp / "evd.log"
    log.write_text("\n".join(line for line in evd.raw if line.startswith("{")) + "\n")
    out = subprocess.run(
        [fail2ban_regex, "--verbose", str(log), str(ROOT / "etc/fail2ban/filter.d/evd.conf")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr + out.stdout
    found = set(re.findall(r"^\|\s+(\S+)\s+\w{3} \w{3} \d\d \d\d:\d\d:\d\d \d{4}$", out.stdout, re.M))
    assert found == {A}, out.stdout
