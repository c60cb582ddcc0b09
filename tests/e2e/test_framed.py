"""End to end: the framed port, its services, authentication and `evd call`."""

from __future__ import annotations

import hmac
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest
from support.daemon import BASE_CONFIG, ROOT, WAIT, connect, recv_all, recv_exactly

from evd.proto.framing import Decoder, encode
from evd.tools.client import Client, ServerError


def framed(evd) -> str:
    host, port = evd.addr("framed")
    return f"{host}:{port}"


def call(evd, *args, input=None):
    return subprocess.run(
        [sys.executable, "-m", "evd", "call", "--address", framed(evd), *args],
        capture_output=True,
        timeout=WAIT,
        cwd=ROOT,
        input=input,
    )


def read_frames(sock, count: int):
    decoder = Decoder(1 << 20, 1 << 24)
    frames = []
    while len(frames) < count:
        data = sock.recv(65536)
        if not data:
            break
        decoder.feed(data)
        frames.extend(decoder.frames())
    return frames


# -- hello and the services ------------------------------------------------------


def test_hello_is_sent_first(evd):
    with Client(framed(evd)) as client:
        hello = client.hello
    assert hello["evd"] == 1 and hello["server"].startswith("evd/")
    assert hello["services"] == ["echo", "time", "command", "stats"]
    assert hello["auth"] == "none" and "nonce" not in hello


@pytest.mark.no_workers_variant("stats name the answering worker's pid, not the supervisor's")
def test_echo_time_stats_through_the_client(evd):
    with Client(framed(evd)) as client:
        echo = client.call("echo", b"\x00binary\xff", id=7)
        assert echo.header == {"id": 7, "ok": True, "len": 8} and echo.body == b"\x00binary\xff"
        before = time.time()
        t = client.call("time", id="t", fmt="%Y", tz="utc")
        assert t.header["id"] == "t" and abs(t.header["epoch"] - before) < 5
        assert t.header["rfc868"] == (int(t.header["epoch"]) + 2208988800) & 0xFFFFFFFF
        assert t.body == time.strftime("%Y", time.gmtime()).encode()
        default = client.call("time")
        assert re.fullmatch(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", default.body)
        assert default.header["id"] is None
        stats = json.loads(client.call("stats").body)
    assert stats["pid"] == evd.proc.pid and stats["version"]
    assert stats["services"]["framed"]["connections_current"] == 1
    assert stats["services"]["framed"]["requests"] >= 3
    assert stats["commands"] == {"running": 0, "total": 0}
    for key in (
        "connections_current",
        "connections_total",
        "rejected",
        "bytes_in",
        "bytes_out",
        "requests",
        "errors",
    ):
        assert key in stats["services"]["echo"]


def test_stats_count_raw_services(evd):
    with connect(evd.addr("echo")) as sock:
        sock.sendall(b"12345")
        recv_exactly(sock, 5)
        with Client(framed(evd)) as client:
            live = json.loads(client.call("stats").body)["services"]["echo"]
    assert live["connections_current"] == 1 and live["bytes_in"] == 5 and live["bytes_out"] == 5


def test_time_rejects_bad_fmt_and_tz(evd):
    with Client(framed(evd)) as client:
        for fields in ({"fmt": "x" * 257}, {"tz": "mars"}, {"fmt": 5}):
            with pytest.raises(ServerError) as err:
                client.call("time", **fields)
            assert err.value.code == "bad_request"


def test_command_runs_with_args_and_stdin(evd):
    with Client(framed(evd)) as client:
        greet = client.call("command", name="greet", args=["world"], id=1)
        assert greet.header["exit"] == 0 and greet.header["signal"] is None
        assert greet.body == b"hello world\n" and greet.header["stdout_len"] == 12
        assert greet.header["timed_out"] is False and greet.header["truncated"] is False
    end = evd.wait_for("command.end", name="greet")
    assert end["exit"] == 0 and end["argv"] == ["echo", "hello", "world"]
    assert evd.wait_for("command.start", name="greet")["command_pid"] == end["command_pid"]


@pytest.mark.parametrize("args", [[";rm -rf /"], ["$(id)"], ["a b"], ["`id`"], ["x" * 65]])
def test_command_refuses_shell_metacharacters(evd, args):
    with Client(framed(evd)) as client:
        with pytest.raises(ServerError) as err:
            client.call("command", name="greet", args=args)
    assert err.value.code == "bad_args"


def test_error_codes(evd):
    with Client(framed(evd)) as client:
        cases = [
            ({"svc": "nosuch"}, "unknown_service"),
            ({"id": 1}, "bad_request"),
            ({"svc": "echo", "id": [1]}, "bad_request"),
            ({"svc": "command", "name": "rm"}, "unknown_command"),
            ({"svc": "command", "name": "greet", "args": "x"}, "bad_args"),
            ({"svc": "auth", "mac": "00"}, "bad_request"),  # no key configured
        ]
        for header, code in cases:
            client.send(header)
            reply = client.recv()
            assert reply.header["ok"] is False and reply.header["error"]["code"] == code, header
        # the connection survives request errors
        assert client.call("echo", b"alive").body == b"alive"


def test_pipelined_thousand_requests_in_one_write(evd):
    with connect(evd.addr("framed")) as sock:
        read_frames(sock, 1)  # hello
        batch = b"".join(encode({"svc": "echo", "id": i}, b"%d" % i) for i in range(1000))
        batch += encode({"svc": "time", "id": "t"}) + encode({"svc": "stats", "id": "s"})
        sock.sendall(batch)
        frames = read_frames(sock, 1002)
    assert [f.header["id"] for f in frames] == list(range(1000)) + ["t", "s"]
    assert all(f.body == b"%d" % i for i, f in enumerate(frames[:1000]))


def test_any_id_the_client_sent_comes_back(evd):
    # "\ud800" is valid JSON but no UTF-8 encoder takes the string it means.
    odd = b'{"svc":"echo","id":"\\ud800 \xc3\xa9"}'
    with connect(evd.addr("framed")) as sock:
        read_frames(sock, 1)  # hello
        sock.sendall(struct.pack("!I", len(odd)) + odd + encode({"svc": "echo", "id": 2}, b"next"))
        first, second = read_frames(sock, 2)
    assert first.header == {"id": "\ud800 \u00e9", "ok": True, "len": 0}
    assert second.header["id"] == 2 and second.body == b"next"
    assert not [e for e in evd.drain_events() if e.get("event") == "error"]


BAD_FRAMES = {
    "H=0": struct.pack("!I", 0),
    "H=1": struct.pack("!I", 1) + b"{",
    "H>max_header": struct.pack("!I", 70000),
    "not JSON": struct.pack("!I", 5) + b"hello",
    "JSON array": struct.pack("!I", 2) + b"[]",
    "negative len": struct.pack("!I", 10) + b'{"len":-1}',
    "oversized len": struct.pack("!I", 16) + b'{"len":99999999}',
    "invalid UTF-8": struct.pack("!I", 4) + b'"\xff"' + b"}",
    "number beyond a double": struct.pack("!I", 12) + b'{"id":1e400}',
}


@pytest.mark.parametrize("name", BAD_FRAMES)
def test_bad_frames_get_one_error_and_close_only_that_connection(evd, name):
    with connect(evd.addr("framed")) as bystander, connect(evd.addr("framed")) as sock:
        read_frames(bystander, 1)
        read_frames(sock, 1)
        sock.sendall(BAD_FRAMES[name])
        decoder = Decoder()
        decoder.feed(recv_all(sock))  # the server closes after one frame
        frames = list(decoder.frames())
        assert len(frames) == 1, name
        error = frames[0].header
        assert error["ok"] is False and error["error"]["code"] == "bad_frame" and error["id"] is None
        bystander.sendall(encode({"svc": "echo", "id": 1}, b"ok"))
        assert read_frames(bystander, 1)[0].body == b"ok"
    assert evd.wait_for("conn.close", service="framed", reason="bad_frame")


def test_slow_command_does_not_delay_others(evd):
    with Client(framed(evd)) as slow, Client(framed(evd)) as other:
        slow.send({"svc": "command", "name": "sleep", "args": ["3"], "id": "slow"})
        evd.wait_for("command.start", name="sleep")
        started = time.monotonic()
        assert other.call("echo", b"quick").body == b"quick"
        with connect(evd.addr("echo")) as raw:
            raw.sendall(b"raw")
            assert recv_exactly(raw, 3) == b"raw"
        assert time.monotonic() - started < 0.5
        # and on the slow connection, echo answers before the command does
        slow.send({"svc": "echo", "id": "e"}, b"e")
        assert slow.recv().header["id"] == "e"
        assert slow.recv().header["id"] == "slow"


COMMAND_LIMITS = (
    BASE_CONFIG
    + """
[services.command]
timeout = 0.5
max_output = 1000
max_concurrent = 1

[commands.yes]
argv = ["yes"]
"""
)


def test_command_timeout_output_cap_and_busy(start_evd):
    evd = start_evd(COMMAND_LIMITS)
    address = f"{evd.addr('framed')[0]}:{evd.addr('framed')[1]}"
    with Client(address) as client, Client(address) as second:
        client.send({"svc": "command", "name": "sleep", "args": ["5"], "id": 1})
        evd.wait_for("command.start", name="sleep")
        with pytest.raises(ServerError) as err:
            second.call("command", name="greet")
        assert err.value.code == "busy"
        slept = client.recv().header
        assert slept["timed_out"] is True and slept["exit"] is None and slept["signal"] == 15
        yes = client.call("command", name="yes", id=2)
        assert yes.header["truncated"] is True and len(yes.body) == 1000
        assert yes.body == b"y\n" * 500


AUTH_CONFIG = BASE_CONFIG.replace("[services.framed]\n", '[services.framed]\nkey_file = "{tmp}/key"\n')


def test_hmac_authentication(tmp_path, start_evd):
    key = b"sekrit key"
    (tmp_path / "key").write_bytes(key + b"\n")
    os.chmod(tmp_path / "key", 0o600)
    evd = start_evd(AUTH_CONFIG)
    address = framed(evd)
    with Client(address) as anon:
        assert anon.hello["auth"] == "hmac-sha256" and len(anon.hello["nonce"]) == 64
        assert anon.call("echo", b"free").body == b"free"
        with pytest.raises(ServerError) as err:
            anon.call("command", name="greet")
        assert err.value.code == "unauthorized"
    with Client(address, key=key) as authed:
        assert authed.call("command", name="greet").body == b"hello\n"
    # evd call with --key-file
    out = call(evd, "--key-file", str(tmp_path / "key"), "command", "greet", "there")
    assert out.returncode == 0 and out.stdout == b"hello there\n"
    with connect(evd.addr("framed")) as sock:
        hello = read_frames(sock, 1)[0].header
        assert hello["nonce"]
        for _ in range(3):
            sock.sendall(encode({"svc": "auth", "mac": hmac.new(b"wrong", b"x", "sha256").hexdigest()}))
        decoder = Decoder()
        decoder.feed(recv_all(sock))
        codes = [f.header["error"]["code"] for f in decoder.frames()]
    assert codes == ["unauthorized"] * 3
    assert evd.wait_for("auth.fail")["peer"].startswith("127.0.0.1:")
    assert evd.wait_for("conn.close", service="framed", reason="auth")


# -- issue 9: malformed requests, odd MACs, errors counted once, deep nesting ---

# What a client must never read in an error message: Python's words and its
# quoting ('x' is a repr; the protocol quotes as JSON does, "x").
PYTHON_WORDS = re.compile(r"\bNone\b|\bTrue\b|\bFalse\b|'")


def error_reply(client, header: dict) -> dict:
    client.send(header)
    reply = client.recv().header
    assert reply["ok"] is False, header
    return reply["error"]


@pytest.mark.parametrize("name", ["absent", None, 7, ["greet"], {}, "", True])
def test_command_without_a_usable_name_is_a_bad_request(evd, name):
    header = {"svc": "command", "id": 1} if name == "absent" else {"svc": "command", "id": 1, "name": name}
    with Client(framed(evd)) as client:
        error = error_reply(client, header)
    assert error["code"] == "bad_request"
    assert not PYTHON_WORDS.search(error["message"]), error


MESSAGES_CONFIG = (
    BASE_CONFIG
    + """
[commands.fixed]
argv = ["true"]
"""
)


def test_no_error_message_speaks_python(start_evd):
    evd = start_evd(MESSAGES_CONFIG)
    requests = [
        {"svc": "nosuch"},
        {"svc": 5},
        {"id": [1], "svc": "echo"},
        {"id": {"a": None}, "svc": "echo"},
        {"svc": "command", "name": "rm"},
        {"svc": "command", "name": "fixed", "args": ["x"]},
        {"svc": "command", "name": "greet", "args": [";rm"]},
        {"svc": "command", "name": "greet", "args": [None]},
        {"svc": "command", "name": "greet", "args": "x"},
        {"svc": "time", "fmt": "%Y\u0000"},
        {"svc": "time", "fmt": None},
        {"svc": "time", "tz": None},
        {"svc": "auth", "mac": "00"},
    ]
    with Client(framed(evd)) as client:
        for header in requests:
            error = error_reply(client, header)
            assert not PYTHON_WORDS.search(error["message"]), (header, error)
        assert client.call("echo", b"alive").body == b"alive"
    assert not [e for e in evd.drain_events() if e.get("event") == "error"]


ODD_MACS = ["\ud800", "é" * 64, 7, None, "", "zz" * 32, ["00"], {"a": 1}, "0" * 10000]


def test_any_odd_mac_is_a_wrong_mac(tmp_path, start_evd):
    key = b"sekrit key"
    (tmp_path / "key").write_bytes(key)
    os.chmod(tmp_path / "key", 0o600)
    evd = start_evd(AUTH_CONFIG)
    for pair in (ODD_MACS[i : i + 2] for i in range(0, len(ODD_MACS), 2)):
        with Client(framed(evd)) as client:  # two wrong tries each: no ban
            for mac in pair:
                error = error_reply(client, {"svc": "auth", "mac": mac})
                assert error == {"code": "unauthorized", "message": "wrong mac"}, mac
            client.authenticate(key)  # and the connection is alive
    assert not [e for e in evd.drain_events() if e.get("event") == "error"]


NUL_CONFIG = (
    BASE_CONFIG
    + """
[commands.say]
argv = ["echo"]
args = true
arg_pattern = '^.{{0,64}}$'
"""
)


def framed_errors(client) -> int:
    return json.loads(client.call("stats").body)["services"]["framed"]["errors"]


def test_one_failed_request_counts_one_error(start_evd):
    evd = start_evd(NUL_CONFIG)
    with Client(framed(evd)) as client:
        before = framed_errors(client)
        # A NUL passes the pattern but no exec takes it; a lone surrogate is
        # no UTF-8.  Either was an internal error, counted twice.
        codes = [
            error_reply(client, {"svc": "command", "name": "say", "args": [arg]})["code"]
            for arg in ("a\u0000b", "\ud800")
        ]
        assert framed_errors(client) == before + 2
        assert codes == ["bad_args", "bad_args"]
        # Nor is a byte that is not UTF-8 (0x80, smuggled as a surrogate escape).
        assert (
            error_reply(client, {"svc": "command", "name": "say", "args": ["\udc80"]})["code"] == "bad_args"
        )


DEBUG_CONFIG = BASE_CONFIG.replace('level = "info"', 'level = "debug"')


def test_deeply_nested_fields_are_answered_and_logged_at_debug(start_evd):
    # Nested about as deep as the parser takes (where exactly depends on
    # the stack): each is either parsed and refused as a bad request, the
    # request logged, or beyond the parser, a bad frame.
    evd = start_evd(DEBUG_CONFIG)
    answers = set()
    for depth in range(940, 1000, 6):
        nested = "[" * depth + "]" * depth
        for raw in (f'{{"svc":{nested},"id":1}}', f'{{"svc":"echo","id":{nested}}}'):
            with connect(evd.addr("framed")) as sock:
                read_frames(sock, 1)
                last = encode({"svc": "echo", "id": f"last {depth}"}, b"ok")
                sock.sendall(struct.pack("!I", len(raw)) + raw.encode() + last)  # one write: no RST
                frames = read_frames(sock, 2)
            codes = [f.header["error"]["code"] if not f.header["ok"] else "ok" for f in frames]
            assert codes in (["bad_request", "ok"], ["bad_frame"]), (depth, codes)
            answers.add(codes[0])
            if codes[0] == "bad_request":
                assert evd.wait_for("request", id=f"last {depth}")
    assert "bad_request" in answers  # the log renderer met the deep ones
    requests = [e for e in evd.drain_events() if e.get("event") == "request"]
    assert {e["svc"] for e in requests} >= {"<array>", "echo"}
    assert not [e for e in evd.events if e.get("event") == "error"]


def test_world_readable_key_file_is_refused(tmp_path):
    (tmp_path / "key").write_bytes(b"k")
    os.chmod(tmp_path / "key", 0o644)
    config = tmp_path / "evd.toml"
    config.write_text(AUTH_CONFIG.format(tmp=tmp_path))
    out = subprocess.run(
        [sys.executable, "-m", "evd", "run", "-c", str(config)], capture_output=True, timeout=WAIT, cwd=ROOT
    )
    assert out.returncode == 78
    assert "services.framed.key_file" in out.stderr.decode()


# -- evd call --------------------------------------------------------------------


@pytest.mark.no_workers_variant("stats name the answering worker's pid, not the supervisor's")
def test_evd_call_commands_and_exit_codes(evd):
    out = call(evd, "echo", "hello", "there")
    assert out.returncode == 0 and out.stdout == b"hello there"
    out = call(evd, "--json", "time", "--fmt", "%Y")
    header, _, body = out.stdout.partition(b"\n")
    assert out.returncode == 0 and json.loads(header)["ok"] is True
    assert body == time.strftime("%Y", time.gmtime()).encode()
    out = call(evd, "command", "greet", ";rm -rf /")
    assert out.returncode == 2 and b"bad_args" in out.stderr
    out = call(evd, "stats")
    assert out.returncode == 0 and json.loads(out.stdout)["pid"] == evd.proc.pid
    unix = subprocess.run(
        [sys.executable, "-m", "evd", "call", "--address", f"unix:{evd.tmp}/framed.sock", "echo", "via unix"],
        capture_output=True,
        timeout=WAIT,
        cwd=ROOT,
    )
    assert unix.returncode == 0 and unix.stdout == b"via unix"


def test_evd_call_connection_failure_exits_1(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connection refused
        out = subprocess.run(
            [sys.executable, "-m", "evd", "call", "--address", f"127.0.0.1:{port}", "echo", "x"],
            capture_output=True,
            timeout=WAIT,
            cwd=ROOT,
        )
    assert out.returncode == 1 and b"cannot talk to" in out.stderr


# -- backpressure ------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def test_pipelining_without_reading_is_throttled_then_answered(evd):
    body = b"p" * 1024
    frames = [encode({"svc": "echo", "id": i}, body) for i in range(10_000)]
    with connect(evd.addr("framed")) as sock:
        read_frames(sock, 1)
        baseline = rss_kib(evd.proc.pid)
        sock.setblocking(False)
        pending = memoryview(b"".join(frames))
        stalled_at = None
        deadline = time.monotonic() + WAIT
        while pending and time.monotonic() < deadline:
            try:
                pending = pending[sock.send(pending) :]
            except BlockingIOError:
                stalled_at = len(pending)
                break
        assert stalled_at, "the daemon kept reading though nobody read its replies"
        grown = rss_kib(evd.proc.pid) - baseline
        assert grown < 32 * 1024, f"RSS grew {grown} KiB"
        sock.setblocking(True)
        sock.settimeout(WAIT)
        decoder = Decoder(1 << 16, 1 << 20)
        got = 0
        while got < 10_000:
            if pending:
                try:
                    sock.setblocking(False)
                    pending = pending[sock.send(pending) :]
                except BlockingIOError:
                    pass
                finally:
                    sock.setblocking(True)
                    sock.settimeout(WAIT)
            decoder.feed(sock.recv(1 << 20))
            for frame in decoder.frames():
                assert frame.header["id"] == got and frame.body == body
                got += 1
    assert got == 10_000


# -- named keys, scopes, bans, audit (issue 13) --------------------------------------

KEYS_CONFIG = (
    BASE_CONFIG.replace("[services.framed]\n", '[services.framed]\nkey_file = "{tmp}/default.key"\n')
    + """
[keys.ops]
file = "{tmp}/ops.key"

[keys.deploy]
file = "{tmp}/deploy.key"
commands = ["greet"]
"""
)
SECRETS = {"default": b"default secret", "ops": b"ops secret", "deploy": b"deploy secret"}


def write_keys(tmp_path, names=SECRETS) -> None:
    for name in names:
        path = tmp_path / f"{name}.key"
        path.write_bytes(SECRETS[name] + b"\n")
        os.chmod(path, 0o600)


def mac_for(client: Client, name: str) -> str:
    return hmac.new(SECRETS[name], bytes.fromhex(client.hello["nonce"]), "sha256").hexdigest()


def test_named_keys_hello_auth_scope_and_audit(tmp_path, start_evd):
    write_keys(tmp_path)
    evd = start_evd(KEYS_CONFIG)
    with Client(framed(evd)) as client:
        hello = client.hello
        assert hello["auth"] == "hmac-sha256" and len(hello["nonce"]) == 64 and "key" not in hello
        with pytest.raises(ServerError) as err:
            client.call("command", name="greet")
        assert err.value.code == "unauthorized"  # auth_required: command, as any key exists
        # By name: only that key is tried.
        reply = client.call("auth", key="deploy", mac=mac_for(client, "deploy"), id="a")
        assert reply.header == {"id": "a", "ok": True, "key": "deploy", "len": 0}
        ok = evd.wait_for("auth.ok", key="deploy")
        assert ok["via"] == "hmac" and ok["peer"].startswith("127.0.0.1:") and ok["conn"] > 0
        assert client.call("command", name="greet", args=["x"]).body == b"hello x\n"
        with pytest.raises(ServerError) as err:
            client.call("command", name="sleep", args=["0"])  # outside deploy's commands
        assert (err.value.code, err.value.message) == ("unauthorized", 'key "deploy" may not run "sleep"')
        start = evd.wait_for("command.start", name="greet")
        assert start["key"] == "deploy" and start["peer"] == ok["peer"]
        end = evd.wait_for("command.end", name="greet")
        assert end["key"] == "deploy" and end["peer"] == ok["peer"]
    with Client(framed(evd)) as client:
        # Without a name every key is tried.
        assert client.call("auth", mac=mac_for(client, "ops")).header["key"] == "ops"
        assert client.call("command", name="sleep", args=["0"]).header["exit"] == 0
    with Client(framed(evd)) as client:
        for header in (
            {"key": "nosuch", "mac": mac_for(client, "ops")},
            {"key": "deploy", "mac": mac_for(client, "ops")},
        ):
            with pytest.raises(ServerError) as err:
                client.call("auth", **header)
            assert (err.value.code, err.value.message) == ("unauthorized", "wrong mac")
        assert client.call("auth", key="default", mac=mac_for(client, "default")).header["key"] == "default"
    evd.wait_for("auth.fail", key="deploy")  # the second: both are in the log now
    fails = [e for e in evd.drain_events() if e.get("event") == "auth.fail"]
    assert [e.get("key") for e in fails] == ["nosuch", "deploy"] and [e["attempt"] for e in fails] == [1, 2]


def test_evd_call_names_its_key(tmp_path, start_evd):
    """`evd call --key-file F --key-name NAME` sends `auth` with that name:
    the server tries that key only, and its scope applies."""
    write_keys(tmp_path)
    evd = start_evd(KEYS_CONFIG)
    deploy = str(tmp_path / "deploy.key")
    out = call(evd, "--key-file", deploy, "--key-name", "deploy", "--json", "command", "greet", "x")
    assert out.returncode == 0, out.stderr
    assert out.stdout.endswith(b"hello x\n")
    assert evd.wait_for("auth.ok", key="deploy")["via"] == "hmac"
    out = call(evd, "--key-file", deploy, "--key-name", "ops", "command", "greet", "x")
    assert out.returncode == 2 and b"unauthorized: wrong mac" in out.stderr
    assert evd.wait_for("auth.fail", key="ops")["attempt"] == 1
    out = call(evd, "--key-file", deploy, "--key-name", "deploy", "command", "sleep", "0")
    assert out.returncode == 2 and b'key "deploy" may not run "sleep"' in out.stderr


def test_three_failed_auth_ban_the_address_from_that_service(tmp_path, start_evd):
    write_keys(tmp_path)
    evd = start_evd(KEYS_CONFIG.replace("rate = 0.0\n", "rate = 0.0\nauth_ban = 300.0\n"))
    with Client(framed(evd)) as client:
        for _ in range(2):
            client.send({"svc": "auth", "mac": "00"})
            assert client.recv().header["error"]["code"] == "unauthorized"
        client.send({"svc": "auth", "mac": "00"})
        assert client.recv().header["error"]["code"] == "unauthorized"  # the third is answered ...
        with pytest.raises(ConnectionError):
            client.recv()  # ... then the connection closes
    assert evd.wait_for("auth.fail", attempt=3)
    assert evd.wait_for("conn.close", service="framed", reason="auth")
    # The address is refused by framed now: accepted and closed, no hello.
    with connect(evd.addr("framed")) as sock:
        assert recv_all(sock) == b""
    reject = evd.wait_for("conn.reject", service="framed", reason="banned")
    assert reject["peer"].startswith("127.0.0.1:")
    # Other services, and other addresses, are not concerned.
    with connect(evd.addr("echo")) as sock:
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"
    other = socket.socket()
    other.bind(("127.0.0.2", 0))
    other.settimeout(WAIT)
    with other:
        other.connect(evd.addr("framed"))
        assert read_frames(other, 1)[0].header["evd"] == 1


def test_auth_ban_zero_bans_nobody(tmp_path, start_evd):
    write_keys(tmp_path)
    evd = start_evd(KEYS_CONFIG.replace("rate = 0.0\n", "rate = 0.0\nauth_ban = 0.0\n"))
    with connect(evd.addr("framed")) as sock:
        read_frames(sock, 1)
        sock.sendall(b"".join(encode({"svc": "auth", "mac": "00"}) for _ in range(3)))
        assert len(read_frames(sock, 4)) == 3  # three answers, then closed
    assert evd.wait_for("conn.close", service="framed", reason="auth")
    with Client(framed(evd)) as client:
        assert client.call("echo", b"still welcome").body == b"still welcome"


def test_a_command_whose_client_has_gone_is_killed(tmp_path, start_evd):
    write_keys(tmp_path)
    evd = start_evd(KEYS_CONFIG)
    with Client(framed(evd)) as client:
        client.call("auth", key="ops", mac=mac_for(client, "ops"))
        client.send({"svc": "command", "name": "sleep", "args": ["30"], "id": 1})
        start = evd.wait_for("command.start", name="sleep")
    end = evd.wait_for("command.end", name="sleep")
    assert end["reason"] == "client_gone" and end["signal"] == 15
    assert end["key"] == "ops" and end["peer"] == start["peer"] and end["duration_ms"] < 5000


def test_rotating_a_key_with_a_reload(tmp_path, start_evd):
    # The guide's key rotation (docs/guide/tls.md), step by step: add the new key, reload, move the
    # clients over, remove the old key, reload.
    write_keys(tmp_path, ["ops"])
    old_only = BASE_CONFIG + '\n[keys.ops]\nfile = "{tmp}/ops.key"\n'
    evd = start_evd(old_only)
    with Client(framed(evd)) as early:
        early.call("auth", mac=mac_for(early, "ops"))
        both = old_only + '\n[keys.deploy]\nfile = "{tmp}/deploy.key"\n'
        write_keys(tmp_path, ["deploy"])
        evd.config_path.write_text(both.format(tmp=tmp_path))
        mark = len(evd.drain_events())
        evd.send(signal.SIGHUP)
        assert evd.wait_for_since(mark, "config.reload")["ok"] is True
        with Client(framed(evd)) as moved:
            assert moved.call("auth", mac=mac_for(moved, "deploy")).header["key"] == "deploy"
            assert early.call("command", name="greet").body == b"hello\n"  # both valid meanwhile
            evd.config_path.write_text(
                (BASE_CONFIG + '\n[keys.deploy]\nfile = "{tmp}/deploy.key"\n').format(tmp=tmp_path)
            )
            mark = len(evd.drain_events())
            evd.send(signal.SIGHUP)
            assert evd.wait_for_since(mark, "config.reload")["ok"] is True
            assert moved.call("command", name="greet").body == b"hello\n"
            # The old key is gone, and with it what it authenticated.
            with pytest.raises(ServerError) as err:
                early.call("command", name="greet")
            assert err.value.code == "unauthorized"
    with Client(framed(evd)) as late:
        with pytest.raises(ServerError) as err:
            late.call("auth", mac=mac_for(late, "ops"))
        assert err.value.code == "unauthorized"
