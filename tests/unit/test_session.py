"""The framed session (evd/proto/session.py), sans-IO: frames in, actions out.

Frames are built with the real encoder and fed through the real Decoder the
h11 way -- all at once, one byte at a time, with trailing data -- and every
answer is checked against what SPEC section 5 says, without a socket.  The
last part runs the `Framed` handler (evd/handlers/framed.py) on a real
socketpair and reactor for what only the handler does: counting errors and
making the `stats` body.
"""

from __future__ import annotations

import hmac
import json
import re
import socket
import time
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.transport import Loop

from evd.commands.runner import Runner
from evd.config.loader import parse
from evd.handlers.framed import Context, Framed
from evd.handlers.service import Service
from evd.loop.seams import Reason
from evd.net.transport import StreamTransport
from evd.proto.framing import Decoder, FrameError, encode
from evd.proto.rules import Rules, rules_for
from evd.proto.session import (
    ECHO,
    ECHOED,
    AuthFail,
    AuthOk,
    Close,
    Echo,
    Failure,
    Hello,
    Reply,
    Session,
    Start,
    Stats,
    loggable,
    quote,
)

NONCE = bytes(range(32))
NOW = 1_000_000_000.25  # 2001-09-09T01:46:40.25Z
PYTHON_WORDS = re.compile(r"\bNone\b|\bTrue\b|\bFalse\b|'")

CONFIG = """
[services.framed]
key_file = "/etc/evd/default.key"
dispatch = ["echo", "time", "command", "stats"]

[keys.ops]
file = "/etc/evd/ops.key"
client_cn = "ops.example"

[keys.deploy]
file = "/etc/evd/deploy.key"
commands = ["greet"]

[keys.monitor]
client_cn = "monitor.example"
commands = ["uptime"]

[commands.uptime]
argv = ["uptime"]

[commands.greet]
argv = ["echo", "hello"]
args = true
"""
SECRETS = {"default": b"default secret", "ops": b"ops secret", "deploy": b"deploy secret"}


def keyed_rules() -> Rules:
    return rules_for(parse(CONFIG), SECRETS)


def open_rules() -> Rules:
    return rules_for(parse("[commands.greet]\nargv = ['echo', 'hello']\nargs = true\n"), {})


def mac(secret: bytes, nonce: bytes = NONCE) -> str:
    return hmac.new(secret, nonce, "sha256").hexdigest()


def steps(session: Session, header: dict, body=b"", now: float = NOW) -> list:
    """Everything the session says to do for one request, ECHO resolved as
    the handler sends it (a reply with the request's own id and body), and
    checked to be what `receive` promises: one action, then events only."""
    action, *events = session.receive(header, body, now)
    assert type(action) in (Reply, Echo, Failure, Start, Stats)
    assert all(type(e) in (AuthOk, AuthFail, Close) for e in events)
    return [Reply(header.get("id"), body) if action is ECHO else action, *events]


def run(session: Session, chunks, now: float = NOW) -> list:
    """Feed `chunks` through a Decoder; every action and event, in order."""
    decoder = Decoder()
    out: list = []
    for chunk in chunks:
        decoder.feed(chunk)
        while (request := decoder.next_request()) is not None:
            out.extend(steps(session, *request, now))
    return out


def ask(session: Session, header: dict, body: bytes = b""):
    """One request: its action (the events after it are `steps`'s)."""
    return steps(session, dict(header), body)[0]


def summary(items: list) -> list:
    """Actions and events as comparable tuples."""
    shown = []
    for item in items:
        if isinstance(item, Reply):
            shown.append(("reply", item.rid, bytes(item.body), item.fields))
        elif isinstance(item, Failure):
            shown.append(("failure", item.rid, item.code))
        elif isinstance(item, Start):
            shown.append(("start", item.rid, item.name, item.argv, item.stdin, item.key))
        elif isinstance(item, Stats):
            shown.append(("stats", item.rid))
        else:
            shown.append(item)
    return shown


# -- the three ways of feeding (h11) ---------------------------------------------

REQUESTS = [
    ({"svc": "echo", "id": 1}, b"hello"),
    ({"svc": "time", "id": "t", "fmt": "%Y-%m-%d"}, b""),
    ({"svc": "stats", "id": None}, b""),
    ({"svc": "auth", "mac": mac(b"ops secret"), "key": "ops"}, b""),
    ({"svc": "command", "name": "greet", "args": ["world"], "id": 9}, b"stdin"),
    ({"svc": "nosuch", "id": 2}, b""),
    ({"svc": "echo", "id": [1]}, b"x"),
]
STREAM = b"".join(encode(h, b) for h, b in REQUESTS)
EXPECTED = [
    ("reply", 1, b"hello", None),
    ("reply", "t", b"2001-09-09", {"epoch": NOW, "rfc868": 1_000_000_000 + 2208988800}),
    ("stats", None),
    ("reply", None, b"", {"key": "ops"}),
    AuthOk("ops", "hmac"),
    ("start", 9, "greet", ["echo", "hello", "world"], b"stdin", "ops"),
    ("failure", 2, "unknown_service"),
    ("failure", None, "bad_request"),
]


def test_echo_is_answered_by_the_one_shared_action():
    session = Session(open_rules())
    assert session.receive({"svc": "echo", "id": 1}, b"x", NOW) is ECHOED
    assert session.receive({"svc": "echo"}, b"", NOW) is ECHOED
    assert ECHOED == (ECHO,)
    assert session.receive({"svc": "echo", "id": [1]}, b"x", NOW)[0] is not ECHO  # not a scalar id


def test_one_way_out_everything_to_do_is_returned():
    """h11's shape: what the caller must do comes back from the call, the
    events after the action they follow; nothing is left on the session."""
    session = Session(keyed_rules(), NONCE)
    assert not hasattr(session, "events")
    ok = session.receive({"svc": "auth", "id": 1, "mac": mac(b"ops secret")}, b"", NOW)
    assert summary(list(ok)) == [("reply", 1, b"", {"key": "ops"}), AuthOk("ops", "hmac")]
    assert summary(list(session.receive({"svc": "time", "id": 2, "tz": "mars"}, b"", NOW))) == [
        ("failure", 2, "bad_request")
    ]


def test_all_at_once():
    assert summary(run(Session(keyed_rules(), NONCE), [STREAM])) == EXPECTED


def test_one_byte_at_a_time():
    chunks = [STREAM[i : i + 1] for i in range(len(STREAM))]
    assert summary(run(Session(keyed_rules(), NONCE), chunks)) == EXPECTED


@pytest.mark.parametrize("cut", [1, 4, 7, 20])
def test_trailing_data_waits_for_the_rest(cut):
    tail = encode({"svc": "echo", "id": "tail"}, b"later")
    session = Session(keyed_rules(), NONCE)
    decoder = Decoder()
    decoder.feed(STREAM + tail[:cut])
    out = []
    while (request := decoder.next_request()) is not None:
        out.extend(steps(session, *request))
    assert summary(out) == EXPECTED and decoder.buffered == cut
    decoder.feed(tail[cut:])
    assert summary(steps(session, *decoder.next_request())) == [("reply", "tail", b"later", None)]


# -- hello ---------------------------------------------------------------------------


def test_hello_without_keys_offers_no_authentication():
    hello = Session(open_rules(), NONCE).hello()
    assert hello == {
        "evd": 1,
        "server": hello["server"],
        "services": ["echo", "time", "command", "stats"],
        "auth": "none",
    }
    assert hello["server"].startswith("evd/")


def test_hello_with_an_hmac_key_carries_the_nonce():
    hello = Session(keyed_rules(), NONCE).hello()
    assert hello["auth"] == "hmac-sha256" and hello["nonce"] == NONCE.hex() and "key" not in hello


def test_only_tls_keys_require_authentication_but_offer_no_mac():
    rules = rules_for(parse('[keys.m]\nclient_cn = "m"\n[commands.uptime]\nargv = ["uptime"]\n'), {})
    session = Session(rules, NONCE)
    assert session.hello()["auth"] == "none" and "nonce" not in session.hello()
    assert ask(session, {"svc": "command", "name": "uptime"}).code == "unauthorized"
    assert ask(session, {"svc": "auth", "mac": "00"}).code == "bad_request"


def test_services_follow_dispatch_and_what_is_enabled():
    config = parse(
        '[services.framed]\ndispatch = ["stats", "echo", "command"]\n[services.stats]\nenabled = false\n'
    )
    assert Session(rules_for(config, {})).hello()["services"] == ["echo", "command"]


# -- echo, time, stats -----------------------------------------------------------------


def test_echo_returns_the_body_with_any_scalar_id():
    for rid in (1, "x", None, True, 2.5, "\ud800"):
        reply = ask(Session(open_rules()), {"svc": "echo", "id": rid}, b"\x00\xff")
        assert (reply.rid, reply.body, reply.fields) == (rid, b"\x00\xff", None)


def test_time_in_utc_and_local(monkeypatch):
    session = Session(open_rules())
    reply = ask(session, {"svc": "time"})
    assert reply.body == b"2001-09-09T01:46:40Z" and reply.fields["epoch"] == NOW
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    time.tzset()
    try:
        assert ask(session, {"svc": "time", "tz": "local", "fmt": "%H:%M"}).body == b"07:16"
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"fmt": "x" * 257}, "fmt must be a string of at most 256 characters"),
        ({"fmt": 5}, "fmt must be a string of at most 256 characters"),
        ({"fmt": None}, "fmt must be a string of at most 256 characters"),
        ({"tz": "mars"}, 'tz must be "utc" or "local"'),
        ({"tz": ["utc"]}, 'tz must be "utc" or "local"'),
        ({"fmt": "%Y\0"}, "fmt must not contain a NUL character"),
    ],
)
def test_time_refuses_what_it_cannot_format(fields, message):
    failure = ask(Session(open_rules()), {"svc": "time", "id": 3, **fields})
    assert (failure.rid, failure.code, failure.message) == (3, "bad_request", message)


def test_time_takes_a_format_of_256_characters():
    assert ask(Session(open_rules()), {"svc": "time", "fmt": "x" * 256}).body == b"x" * 256


def test_stats_is_left_to_the_handler():
    assert summary([ask(Session(open_rules()), {"svc": "stats", "id": 4})]) == [("stats", 4)]


# -- refusals -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header, rid, code, message",
    [
        ({}, None, "bad_request", "svc (a string) is required"),
        ({"svc": 5, "id": 1}, 1, "bad_request", "svc (a string) is required"),
        ({"svc": "echo", "id": {"a": 1}}, None, "bad_request", None),
        ({"svc": "nosuch", "id": 1}, 1, "unknown_service", 'no service "nosuch" here'),
        ({"svc": "x'y"}, None, "unknown_service", 'no service "x\'y" here'),
        (
            {"svc": "command", "name": "greet"},
            None,
            "unauthorized",
            "command needs an authenticated connection",
        ),
    ],
)
def test_refusals(header, rid, code, message):
    failure = ask(Session(keyed_rules(), NONCE), header)
    assert (failure.rid, failure.code) == (rid, code)
    if message is not None:
        assert failure.message == message


def test_a_disabled_service_is_unknown():
    config = parse("[services.stats]\nenabled = false\n[services.command]\nenabled = false\n")
    session = Session(rules_for(config, {}))
    assert ask(session, {"svc": "stats"}).code == "unknown_service"
    assert ask(session, {"svc": "command", "name": "uptime"}).code == "unknown_service"


# -- command ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", [None, 7, ["greet"], {}, "", True, 1.5])
def test_command_without_a_usable_name_is_a_bad_request(name):
    failure = ask(Session(open_rules()), {"svc": "command", "name": name})
    assert failure.code == "bad_request" and failure.message == "name (a non-empty string) is required"


def test_command_without_name_at_all():
    assert ask(Session(open_rules()), {"svc": "command"}).code == "bad_request"


@pytest.mark.parametrize(
    "fields, code, message",
    [
        ({"name": "rm"}, "unknown_command", 'no command named "rm"'),
        ({"name": "x" * 100}, "unknown_command", f'no command named "{"x" * 64}..."'),
        ({"name": "greet", "args": "x"}, "bad_args", "args must be a list of strings"),
        ({"name": "greet", "args": [1]}, "bad_args", "args must be a list of strings"),
        ({"name": "greet", "args": [None]}, "bad_args", "args must be a list of strings"),
        ({"name": "greet", "args": [";rm"]}, "bad_args", None),
        ({"name": "greet", "args": ["ok", "a b"]}, "bad_args", None),
    ],
)
def test_command_refusals(fields, code, message):
    failure = ask(Session(open_rules()), {"svc": "command", **fields})
    assert failure.code == code
    if message is not None:
        assert failure.message == message
    assert not PYTHON_WORDS.search(failure.message)


def test_an_argument_that_fails_the_pattern_is_named_by_position():
    failure = ask(Session(open_rules()), {"svc": "command", "name": "greet", "args": ["ok", "a b"]})
    assert failure.message == 'argument 2 ("a b") does not match ^[A-Za-z0-9._-]{1,64}$'


def test_arguments_without_args_true_are_refused():
    rules = rules_for(parse('[commands.up]\nargv = ["uptime"]\n'), {})
    failure = ask(Session(rules), {"svc": "command", "name": "up", "args": ["x"]})
    assert (failure.code, failure.message) == ("bad_args", 'command "up" takes no arguments')
    assert isinstance(ask(Session(rules), {"svc": "command", "name": "up", "args": []}), Start)


@pytest.mark.parametrize(
    "arg, problem",
    [("a\0b", "contains a NUL character"), ("\ud800", "is not valid UTF-8 text"), ("\udc80", None)],
)
def test_arguments_no_exec_can_take_are_bad_args(arg, problem):
    # A permissive pattern lets them through; exec would not take them (NUL)
    # or would get bytes that are not UTF-8 (a surrogate escape).
    rules = rules_for(parse("[commands.say]\nargv = ['echo']\nargs = true\narg_pattern = '^.{0,64}$'\n"), {})
    failure = ask(Session(rules), {"svc": "command", "name": "say", "args": [arg]})
    assert failure.code == "bad_args"
    assert failure.message.endswith(problem or "is not valid UTF-8 text")


def test_a_started_command_is_pending_until_answered():
    session = Session(open_rules())
    start = ask(session, {"svc": "command", "name": "greet", "args": ["you"], "id": 5}, b"in")
    assert (start.rid, start.argv, start.stdin, start.key) == (5, ["echo", "hello", "you"], b"in", None)
    second = ask(session, {"svc": "command", "name": "greet"})
    assert session.pending == 2

    class Outcome:
        exit, signal, timed_out, truncated = 0, None, False, True
        stdout, stderr = bytearray(b"out"), bytearray(b"err")

    reply = session.finished(start, Outcome())
    assert (reply.rid, reply.body) == (5, b"outerr")
    assert reply.fields == {
        "exit": 0,
        "signal": None,
        "timed_out": False,
        "truncated": True,
        "stdout_len": 3,
        "stderr_len": 3,
    }
    busy = session.start_failed(second, "busy", "8 commands running (max_concurrent)")
    assert (busy.rid, busy.code) == (None, "busy") and session.pending == 0


# -- authentication -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["default", "ops", "deploy"])
def test_auth_without_a_key_name_tries_every_key(name):
    session = Session(keyed_rules(), NONCE)
    reply, *events = steps(session, {"svc": "auth", "id": 1, "mac": mac(SECRETS[name]).upper()})
    assert (reply.rid, reply.fields) == (1, {"key": name})
    assert events == [AuthOk(name, "hmac")] and session.key.name == name


def test_auth_with_a_key_name_tries_that_key_only():
    session = Session(keyed_rules(), NONCE)
    assert ask(session, {"svc": "auth", "key": "deploy", "mac": mac(b"ops secret")}).code == "unauthorized"
    assert ask(session, {"svc": "auth", "key": "ops", "mac": mac(b"ops secret")}).fields == {"key": "ops"}


def test_every_key_is_computed_whichever_matches(monkeypatch):
    # No early exit: the first key matching takes as many HMACs as none.
    import evd.proto.rules as rules_mod

    macs = [mac(secret) for secret in (b"default secret", b"deploy secret", b"wrong")]
    calls = []
    real = hmac.new
    monkeypatch.setattr(rules_mod.hmac, "new", lambda *a, **k: calls.append(1) or real(*a, **k))
    for given_mac in macs:
        calls.clear()
        ask(Session(keyed_rules(), NONCE), {"svc": "auth", "mac": given_mac})
        assert len(calls) == 3
    calls.clear()
    ask(Session(keyed_rules(), NONCE), {"svc": "auth", "key": "nosuch", "mac": macs[0]})
    assert len(calls) == 1  # an unknown name costs what a real one does


ODD_MACS = ["\ud800", "é" * 64, 7, None, "", "zz" * 32, ["00"], {"a": 1}, "0" * 10_000, True]


@pytest.mark.parametrize("odd", ODD_MACS)
def test_an_odd_mac_is_a_wrong_mac(odd):
    session = Session(keyed_rules(), NONCE)
    failure, *events = steps(session, {"svc": "auth", "mac": odd})
    assert (failure.code, failure.message) == ("unauthorized", "wrong mac")
    assert events == [AuthFail(1, None)] and session.key is None


def test_an_unknown_key_name_reads_like_a_wrong_mac():
    session = Session(keyed_rules(), NONCE)
    failure, *events = steps(session, {"svc": "auth", "key": "nosuch", "mac": mac(b"ops secret")})
    assert (failure.code, failure.message) == ("unauthorized", "wrong mac")
    assert events == [AuthFail(1, "nosuch")]


def test_a_key_name_that_is_not_a_string_is_a_bad_request():
    session = Session(keyed_rules(), NONCE)
    assert ask(session, {"svc": "auth", "key": 7, "mac": mac(b"ops secret")}).code == "bad_request"
    assert session.failures == 0


def test_three_failures_close_and_ban_after_the_third_answer():
    session = Session(keyed_rules(), NONCE)
    out = run(session, [encode({"svc": "auth", "mac": "00", "id": i}) for i in range(3)])
    assert summary(out) == [
        ("failure", 0, "unauthorized"),
        AuthFail(1, None),
        ("failure", 1, "unauthorized"),
        AuthFail(2, None),
        ("failure", 2, "unauthorized"),
        AuthFail(3, None),
        Close(Reason.AUTH, ban=True),
    ]


def test_a_success_between_failures_does_not_reset_the_count():
    session = Session(keyed_rules(), NONCE)
    ask(session, {"svc": "auth", "mac": "00"})
    ask(session, {"svc": "auth", "mac": mac(b"default secret")})
    ask(session, {"svc": "auth", "mac": "00"})
    _, *events = steps(session, {"svc": "auth", "mac": "00"})
    assert events == [AuthFail(3, None), Close(Reason.AUTH, ban=True)]


def test_auth_when_no_key_is_configured_is_a_bad_request():
    failure = ask(Session(open_rules(), NONCE), {"svc": "auth", "mac": "00"})
    assert (failure.code, failure.message) == ("bad_request", "authentication is not configured")


# -- scopes -----------------------------------------------------------------------------


def authed(name: str) -> Session:
    session = Session(keyed_rules(), NONCE)
    assert ask(session, {"svc": "auth", "key": name, "mac": mac(SECRETS[name])}).fields == {"key": name}
    return session


def test_a_command_outside_the_keys_scope_is_unauthorized():
    session = authed("deploy")  # commands = ["greet"]
    failure = ask(session, {"svc": "command", "name": "uptime"})
    assert (failure.code, failure.message) == ("unauthorized", 'key "deploy" may not run "uptime"')
    assert ask(session, {"svc": "command", "name": "greet"}).key == "deploy"


def test_the_default_key_and_star_run_everything():
    for name in ("default", "ops"):
        assert isinstance(ask(authed(name), {"svc": "command", "name": "uptime"}), Start)


def test_an_unknown_command_is_unknown_whatever_the_scope():
    assert ask(authed("deploy"), {"svc": "command", "name": "rm"}).code == "unknown_command"


# -- TLS client certificates ------------------------------------------------------------


def test_a_tls_key_authenticates_from_the_start():
    rules = keyed_rules()
    session = Session(rules, NONCE, tls_key=rules.key_for_cn("monitor.example"))
    assert session.opened() == (Hello(session.hello()), AuthOk("monitor", "tls"))
    hello = session.hello()
    assert hello["key"] == "monitor" and hello["auth"] == "hmac-sha256"
    assert isinstance(ask(session, {"svc": "command", "name": "uptime"}), Start)
    assert ask(session, {"svc": "command", "name": "greet"}).code == "unauthorized"  # its scope


def test_key_for_cn():
    rules = keyed_rules()
    assert rules.key_for_cn("ops.example") == "ops"
    assert rules.key_for_cn("nobody") is None and rules.key_for_cn("") is None


def test_a_tls_key_that_is_not_configured_authenticates_nothing():
    session = Session(keyed_rules(), NONCE, tls_key="gone")
    assert session.opened() == (Hello(session.hello()),)
    assert session.key is None and "key" not in session.hello()


# -- reloads ----------------------------------------------------------------------------


def test_a_reload_that_removes_the_key_takes_the_authentication_with_it():
    session = authed("ops")
    rules = keyed_rules()
    session.update(replace(rules, keys={k: v for k, v in rules.keys.items() if k != "ops"}))
    assert ask(session, {"svc": "command", "name": "uptime"}).code == "unauthorized"


def test_a_reload_that_narrows_the_scope_applies_at_once():
    session = authed("ops")
    rules = keyed_rules()
    narrowed = {**rules.keys, "ops": replace(rules.keys["ops"], commands=("greet",))}
    session.update(replace(rules, keys=narrowed))
    assert ask(session, {"svc": "command", "name": "uptime"}).code == "unauthorized"


def test_a_connection_opened_without_a_nonce_cannot_mac_after_a_reload():
    session = Session(open_rules(), b"")
    session.update(keyed_rules())
    assert ask(session, {"svc": "auth", "mac": mac(b"ops secret", b"")}).code == "bad_request"
    assert ask(session, {"svc": "command", "name": "greet"}).code == "unauthorized"


# -- the end of a connection -------------------------------------------------------------


def test_draining_closes_once_nothing_is_in_flight():
    session = Session(open_rules())
    start = ask(session, {"svc": "command", "name": "greet"})
    assert session.close_reason(partial=False) is None
    session.drain()
    assert session.close_reason(partial=False) is None  # a command runs

    class Done:
        exit, signal, timed_out, truncated, stdout, stderr = 0, None, False, False, b"", b""

    session.finished(start, Done())
    assert session.close_reason(partial=True) is None  # a frame is half in
    assert session.close_reason(partial=False) == Reason.SHUTDOWN


def test_the_peers_eof_ends_the_connection_even_with_commands_running():
    # A closed TCP connection and a half-closed one look the same: the
    # client is gone, and its commands are abandoned.
    session = Session(open_rules())
    ask(session, {"svc": "command", "name": "greet"})
    assert session.peer_eof() is False


def test_a_frame_error_is_one_failure_then_close():
    session = Session(open_rules())
    failure, *events = session.frame_error(FrameError("header length 1 is below the minimum of 2"))
    assert (failure.rid, failure.code) == (None, "bad_frame")
    assert events == [Close(Reason.BAD_FRAME)]


# -- helpers for messages and logs -------------------------------------------------------


def test_quote_is_json_and_cut():
    assert quote("it's") == '"it\'s"'
    assert quote("\ud800\x1b") == '"\\ud800\\u001b"'
    assert quote("x" * 100) == '"' + "x" * 64 + '..."'


def test_loggable_keeps_scalars_and_names_the_rest():
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    assert [loggable(v) for v in (1, 2.5, True, None, "s")] == [1, 2.5, True, None, "s"]
    assert loggable(deep) == "<array>" and loggable({"a": deep}) == "<object>"
    assert loggable("\ud800") == "\\ud800" and loggable("x" * 100) == "x" * 64 + "..."


# -- property: any JSON object as a header -------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)
FIELD_NAMES = ["svc", "id", "name", "args", "fmt", "tz", "mac", "key", "len", "x"]
SERVICES = st.sampled_from(["echo", "time", "command", "stats", "auth", "nosuch", ""])
headers = st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=4), json_values, max_size=6)


@settings(max_examples=400, deadline=None)
@given(headers, SERVICES | json_values, st.binary(max_size=20), st.booleans(), st.data())
def test_any_json_object_gets_exactly_one_answer_never_an_exception(header, svc, body, keyed, data):
    if data.draw(st.booleans()):
        header["svc"] = svc
    rules = keyed_rules() if keyed else open_rules()
    session = Session(rules, NONCE, tls_key=data.draw(st.sampled_from([None, "ops", "monitor"])))
    for _ in range(data.draw(st.integers(1, 4))):  # the same request again: state moves on
        action, *events = session.receive(dict(header), body, NOW)
        assert type(action) in (Reply, Echo, Failure, Start, Stats)
        if isinstance(action, Failure):
            assert action.code in (
                "bad_request",
                "unknown_service",
                "unauthorized",
                "unknown_command",
                "bad_args",
            )
            # Outside the client's own strings (JSON-quoted), no Python.
            assert action.message and not PYTHON_WORDS.search(
                re.sub(r'"(?:[^"\\]|\\.)*"', "", action.message)
            )
        assert all(type(e) in (AuthOk, AuthFail, Close) for e in events)
        assert all(type(e) is not Close for e in events[:-1])  # a close comes last
        if events and type(events[-1]) is Close:
            assert events[-1] == Close(Reason.AUTH, ban=True) and session.failures == 3
            break
        json.dumps(action.fields if isinstance(action, Reply) else None)  # a reply can be sent


# -- the handler on a real socketpair ------------------------------------------------------


def framed_connection(stats):
    """A Framed handler on one end of a socketpair, the client's end back."""
    config = parse("[limits]\nrate = 0.0\n")
    loop = Loop()
    service = Service(config.services["framed"], loop.reactor)
    runner = Runner(loop.reactor, config.services["command"], config.commands)
    context = Context(runner, stats, rules_for(config, {}))
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    transport = StreamTransport(loop.reactor, ours, Framed(service, context), service, None)
    service.connections.add(transport)
    transport.start(1)
    theirs.settimeout(5.0)
    return loop, service, transport, theirs


def frames_from(loop: Loop, sock: socket.socket, count: int) -> list:
    """Run the loop until `count` frames have reached the client's end (read
    by the same loop, so nothing blocks and nothing sleeps)."""
    decoder = Decoder(1 << 20, 1 << 24)
    frames: list = []

    def readable():
        decoder.feed(sock.recv(1 << 20))
        frames.extend(decoder.frames())

    loop.reactor.add_reader(sock.fileno(), readable)
    try:
        loop.run_until(lambda: len(frames) >= count)
    finally:
        loop.reactor.remove_reader(sock.fileno())
    return frames


def test_an_internal_error_is_counted_once():
    def broken_stats():
        raise RuntimeError("a bug in the daemon")

    loop, service, transport, client = framed_connection(broken_stats)
    try:
        frames_from(loop, client, 1)  # hello
        client.sendall(encode({"svc": "stats", "id": 1}) + encode({"svc": "echo", "id": 2}, b"after"))
        error, echo = frames_from(loop, client, 2)
        assert error.header == {
            "id": 1,
            "ok": False,
            "error": {"code": "internal", "message": "internal error"},
            "len": 0,
        }
        assert echo.body == b"after"  # the connection goes on
        assert service.errors == 1
    finally:
        transport.close()
        client.close()
        loop.reactor.close()


def test_the_stats_body_is_made_once_per_loop_iteration():
    calls = []

    def stats():
        calls.append(1)
        return {"n": len(calls)}

    loop, _, transport, client = framed_connection(stats)
    try:
        frames_from(loop, client, 1)  # hello
        client.sendall(b"".join(encode({"svc": "stats", "id": i}) for i in range(200)))
        frames = frames_from(loop, client, 200)
        # One write, one read, one loop iteration: one snapshot for all 200.
        assert len(calls) == 1 and all(json.loads(f.body) == {"n": 1} for f in frames)
        client.sendall(encode({"svc": "stats", "id": "later"}))
        (later,) = frames_from(loop, client, 1)
        assert json.loads(later.body) == {"n": 2}  # a later iteration: fresh figures
    finally:
        transport.close()
        client.close()
        loop.reactor.close()
