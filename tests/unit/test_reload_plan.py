"""The reload plan (server/reload_plan.py), table by table: what a new
configuration adds, removes and changes, the same for one process and for a
supervisor because both ask this one function."""

from __future__ import annotations

import pytest

from evd.config.addresses import Address
from evd.config.loader import parse
from evd.server.reload_plan import Result, changes, describe, log_settings, plan

BASE = """\
[daemon]
pidfile = "/run/evd-test/evd.pid"

[services.echo]
tcp = ["127.0.0.1:7007"]
udp = ["127.0.0.1:7007"]

[commands.greet]
argv = ["echo", "hello"]
"""


def echo(proto: str, port: int = 7007) -> tuple[str, Address]:
    return ("echo", Address(proto, "127.0.0.1", port))


# (what the new file adds to BASE, what BASE's text it replaces) -> changed
CHANGES = [
    ("nothing", "", None, []),
    ("an echo limit", "max_connections = 9\n", '[services.echo]\ntcp = ["127.0.0.1:7007"]\n', ["echo"]),
    (
        "[limits], for every running service",
        "[limits]\nrate = 5.0\n",
        None,
        ["echo", "daytime", "time", "timefmt", "framed"],
    ),
    ("a service that stays off", "[services.chargen]\nmax_connections = 9\n", None, []),
    ("a service switched on", "[services.discard]\nenabled = true\n", None, ["discard"]),
    ("a service switched off", "[services.daytime]\nenabled = false\n", None, ["daytime"]),
    ("the allow-list", None, ('argv = ["echo", "hello"]', 'argv = ["echo", "bonjour"]'), ["commands"]),
    ("the command service", "[services.command]\ntimeout = 3.0\n", None, ["commands"]),
    (
        "the allow-list, command off",
        "[services.command]\nenabled = false\n",
        ('"hello"', '"hi"'),
        ["commands"],
    ),
    ("stats", "[services.stats]\nenabled = false\n", None, ["stats"]),
    ("a named key", '[keys.ops]\nfile = "/etc/evd/ops.key"\n', None, ["keys"]),
    (
        "a named key, framed switched off",
        '[keys.ops]\nfile = "/k"\n[services.framed]\nenabled = false\n',
        None,
        ["framed", "keys"],
    ),
    ("the key file", '[services.framed]\nkey_file = "/etc/evd/key"\n', None, ["framed"]),
    ("the log", '[log]\nlevel = "debug"\n', None, ["log"]),
    (
        "shutdown_timeout",
        None,
        ("[daemon]\n", "[daemon]\nshutdown_timeout = 3.0\n"),
        ["daemon.shutdown_timeout"],
    ),
    ("workers", None, ("[daemon]\n", "[daemon]\nworkers = 2\n"), ["daemon.workers (at the next start)"]),
    (
        "the pidfile and the user",
        None,
        ('pidfile = "/run/evd-test/evd.pid"', 'pidfile = "/tmp/evd.pid"\nuser = "nobody"'),
        ["daemon.pidfile (at the next start)", "daemon.user (at the next start)"],
    ),
    ("control", '[control]\nunix = "/run/evd/control.sock"\n', None, ["control (at the next start)"]),
    ("metrics", '[metrics]\ntcp = ["127.0.0.1:9100"]\n', None, ["metrics (at the next start)"]),
    ("include", None, ("[daemon]\n", 'include = ["/nonexistent-evd-test/*.toml"]\n[daemon]\n'), ["include"]),
    (
        "several at once, in the documented order",
        '[log]\nlevel = "debug"\n[services.stats]\nenabled = false\n[services.discard]\nenabled = true\n',
        ('"hello"', '"hi"'),
        ["discard", "commands", "stats", "log"],
    ),
]


def edited(append: str | None, replace: str | tuple[str, str] | None) -> str:
    text = BASE
    if isinstance(replace, tuple):
        assert replace[0] in text
        text = text.replace(*replace)
    elif replace is not None:  # the text after which `append` goes
        assert replace in text
        return text.replace(replace, replace + (append or ""))
    return text + (append or "")


@pytest.mark.parametrize(("what", "append", "replace", "changed"), CHANGES, ids=[c[0] for c in CHANGES])
def test_changed_names_what_differs(what, append, replace, changed):
    old, new = parse(BASE), parse(edited(append, replace))
    assert plan(old, new, old.listener_keys()).changed == tuple(changed)


def test_no_change_is_an_empty_plan():
    config = parse(BASE)
    todo = plan(config, parse(BASE), config.listener_keys())
    assert (todo.added, todo.removed, todo.changed) == ((), (), ())
    assert todo.result() == Result(ok=True)


def test_listeners_added_removed_and_kept():
    old = parse(BASE)
    new = parse(BASE.replace('udp = ["127.0.0.1:7007"]', 'udp = ["127.0.0.1:7008"]\nunix = ["/run/e.sock"]'))
    todo = plan(old, new, old.listener_keys())
    assert todo.added == (echo("udp", 7008), ("echo", Address("unix", "/run/e.sock", 0)))
    assert todo.removed == (echo("udp"),)
    assert todo.changed == ("echo",)
    assert todo.result().added == ("echo udp 127.0.0.1:7008", "echo unix /run/e.sock")
    assert todo.result().removed == ("echo udp 127.0.0.1:7007",)


def test_the_current_listeners_not_the_old_configuration_decide():
    """Listeners are compared with what is open: a listener missing now
    (say, not open yet) is added even if the old file had it."""
    config = parse(BASE)
    current = [k for k in config.listener_keys() if k != echo("tcp")] + [("time", Address("tcp", "::1", 37))]
    todo = plan(config, config, current)
    assert todo.added == (echo("tcp"),)
    assert todo.removed == (("time", Address("tcp", "::1", 37)),)
    assert todo.changed == ()


def test_a_service_switched_on_is_added_and_changed():
    old = parse(BASE)
    new = parse(BASE + "[services.discard]\nenabled = true\n")
    todo = plan(old, new, old.listener_keys())
    assert [describe(k) for k in todo.added] == ["discard tcp 127.0.0.1:7009", "discard udp 127.0.0.1:7009"]
    assert todo.changed == ("discard",)


@pytest.mark.parametrize(
    ("old_secrets", "new_secrets", "changed"),
    [
        ({"default": b"a"}, {"default": b"a"}, []),
        ({"default": b"a"}, {"default": b"b"}, ["keys"]),  # the file rewritten in place: rotation
        ({}, {"ops": b"a"}, ["keys"]),
        (None, {"default": b"b"}, []),  # nothing to compare with
    ],
)
def test_key_bytes_rewritten_in_place_are_a_change_of_keys(old_secrets, new_secrets, changed):
    config = parse(BASE)
    assert changes(config, config, old_secrets, new_secrets) == changed


@pytest.mark.parametrize(
    ("old_certs", "new_certs", "changed"),
    [
        ({"echo": b"a"}, {"echo": b"a"}, []),
        ({"echo": b"a"}, {"echo": b"b"}, ["echo"]),  # rotated in place: new connections get it
        ({"echo": b"a", "framed": b"f"}, {"echo": b"a", "framed": b"g"}, ["framed"]),
        ({}, {"echo": b"b"}, []),  # TLS newly on: the service's settings say so
        (None, {"echo": b"b"}, []),  # nothing to compare with
    ],
)
def test_a_certificate_rotated_in_place_is_a_change_of_its_service(old_certs, new_certs, changed):
    config = parse(BASE)
    assert changes(config, config, None, None, old_certs, new_certs) == changed
    todo = plan(config, config, config.listener_keys(), None, None, old_certs, new_certs)
    assert todo.changed == tuple(changed)


def test_keys_of_a_framed_port_off_before_and_after_are_no_change():
    off = BASE + "[services.framed]\nenabled = false\n"
    assert changes(parse(off), parse(off + '[keys.ops]\nfile = "/k"\n'), {}, {}) == []


def test_result_fields_for_the_log_and_the_control_answer():
    ok = Result(ok=True, added=("echo tcp 127.0.0.1:7",), changed=("echo",))
    assert ok.fields() == {"ok": True, "added": ["echo tcp 127.0.0.1:7"], "removed": [], "changed": ["echo"]}
    assert ok.answer() == {**ok.fields(), "error": None}
    failed = Result.failed("services.echo.tcp: bad")
    assert failed.fields() == {
        "ok": False,
        "added": [],
        "removed": [],
        "changed": [],
        "error": "services.echo.tcp: bad",
    }
    assert failed.answer() == failed.fields()


def test_command_line_log_options_win_over_the_file():
    config = parse(BASE + '[log]\nlevel = "warning"\nformat = "console"\nfile = "/var/log/evd.log"\n')
    assert log_settings(config, {}) == ("warning", "console", "/var/log/evd.log")
    assert log_settings(config, {"level": "debug", "format": None}) == (
        "debug",
        "console",
        "/var/log/evd.log",
    )
