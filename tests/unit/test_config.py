"""Unit tests of configuration parsing, validation and dumping: no sockets."""

import dataclasses
import ipaddress
import os
from pathlib import Path

import pytest

from evd.config import loader, model, tomlout
from evd.config.addresses import Address
from evd.config.loader import parse
from evd.config.model import ConfigError, Limits

ROOT = Path(__file__).resolve().parents[2]
EMBEDDED = loader.embedded_text()


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text)
    assert str(info.value) == "\n".join(info.value.errors)
    return info.value.errors


def one_error(text: str) -> str:
    errors = errors_of(text)
    assert len(errors) == 1, errors
    return errors[0]


def round_trip(c: model.Config) -> model.Config:
    return dataclasses.replace(parse(tomlout.dump(c), "dumped"), source=c.source)


# -- the embedded default ---------------------------------------------------------


def test_repository_copy_is_the_embedded_default():
    assert (ROOT / "etc" / "evd.toml").read_bytes() == (ROOT / "evd" / "default.toml").read_bytes()


def test_embedded_default_equals_an_empty_file():
    """default.toml spells out exactly the built-in defaults, nothing more."""
    assert parse(EMBEDDED) == parse("")


def test_embedded_default_values():
    c = parse(EMBEDDED)
    assert c.source == "<embedded>"
    assert c.daemon == model.DaemonConfig("/run/evd/evd.pid", "", "", 10.0, 1)
    assert c.log == model.LogConfig("info", "json", "")
    assert c.limits == Limits(1024, 64, 200.0, 400, 300.0, 65536, 1048576, 262144, 65536)
    assert tuple(c.services) == model.SERVICE_NAMES
    s = c.services
    assert s["echo"].enabled and s["echo"].tcp == (Address("tcp", "127.0.0.1", 7007),)
    assert s["echo"].udp == (Address("udp", "127.0.0.1", 7007),) and s["echo"].unix == ()
    assert s["echo"].only_from == () and s["echo"].no_access == ()
    assert not s["discard"].enabled and [str(a) for a in s["discard"].addresses] == ["127.0.0.1:7009"] * 2
    assert not s["chargen"].enabled and s["chargen"].udp == (Address("udp", "127.0.0.1", 7019),)
    assert s["daytime"].tcp[0].port == 7013 and s["time"].udp[0].port == 7037
    assert s["timefmt"].tcp == () and s["timefmt"].udp == (Address("udp", "127.0.0.1", 7038),)
    framed = s["framed"]
    assert framed.tcp == (Address("tcp", "127.0.0.1", 7070),) and framed.udp == ()
    assert framed.dispatch == ("echo", "time", "command", "stats")
    assert framed.key_file == "" and framed.auth_required == ("command",)
    assert s["command"].addresses == () and s["stats"].addresses == ()
    assert (s["command"].timeout, s["command"].max_output, s["command"].max_concurrent) == (10.0, 1048576, 8)
    assert all(svc.limits == c.limits for svc in s.values())
    assert [svc.name for svc in c.enabled_services()] == [
        "echo",
        "daytime",
        "time",
        "timefmt",
        "framed",
        "command",
        "stats",
    ]
    assert list(c.commands) == ["uptime", "greet"]
    assert c.commands["uptime"] == model.CommandSpec("uptime", ("uptime",), False, r"^[A-Za-z0-9._-]{1,64}$")
    assert c.commands["greet"].argv == ("echo", "hello") and c.commands["greet"].args


def test_config_is_immutable():
    c = parse("")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.limits.rate = 1.0
    with pytest.raises(TypeError):
        c.services["echo"] = None


def test_every_key_of_the_default_file_is_commented():
    lines = EMBEDDED.splitlines()
    keys = [i for i, line in enumerate(lines) if "=" in line and not line.startswith("#")]
    assert len(keys) > 50
    for i in keys:
        assert lines[i - 1].startswith("#"), f"line {i + 1} has no comment above it: {lines[i]}"


# -- values and types -------------------------------------------------------------


def test_partial_sections_keep_other_defaults():
    c = parse("[limits]\nrate = 5\n[services.echo]\ntcp = []\n")
    assert c.limits.rate == 5.0 and isinstance(c.limits.rate, float)
    assert c.limits.burst == 400
    assert c.services["echo"].tcp == () and c.services["echo"].udp[0].port == 7007


def test_wrong_types():
    errors = errors_of(
        '[limits]\nrate = "fast"\nburst = 1.5\nmax_body = true\n'
        "idle_timeout = false\n[log]\nlevel = 3\n[services.echo]\nenabled = 1\n"
    )
    assert errors == [
        "log.level: expected a string, got integer",
        "limits.rate: expected a number, got string",
        "limits.burst: expected an integer, got float",
        "limits.max_body: expected an integer, got boolean",
        "limits.idle_timeout: expected a number, got boolean",
        "services.echo.enabled: expected a boolean, got integer",
    ]


def test_ranges_and_choices():
    errors = errors_of(
        '[daemon]\nworkers = 0\nshutdown_timeout = -1\npidfile = "evd.pid"\n'
        '[log]\nlevel = "trace"\nformat = "xml"\nfile = "rel.log"\n'
        "[limits]\nmax_header = 1\nrate = -0.5\nmax_connections = 0\nper_source = 0\n"
        "burst = 0\nrate2 = 1\n"
    )
    assert errors == [
        "daemon.workers: must be at least 1",
        "daemon.shutdown_timeout: must be at least 0",
        "daemon.pidfile: must be an absolute path",
        "log.level: must be one of debug, info, warning, error",
        "log.format: must be one of json, console, journal",
        "log.file: must be an absolute path",
        "limits.max_header: must be at least 2",
        "limits.rate: must be at least 0",
        "limits.max_connections: must be at least 1",
        "limits.per_source: must be at least 1",
        "limits.burst: must be at least 1",
        "limits.rate2: unknown key",
    ]


def test_non_finite_float():
    assert one_error("[limits]\nrate = inf\n") == "limits.rate: must be a finite number"


def test_water_marks():
    assert (
        one_error("[limits]\nwrite_low = 262144\n")
        == "limits.write_low: must be less than write_high (262144)"
    )
    assert (
        one_error("[services.echo]\nwrite_high = 100\n")
        == "services.echo.write_low: must be less than write_high (100)"
    )


def test_unknown_sections_services_and_keys():
    errors = errors_of(
        "colour = 1\n[extra]\n[services.ssh]\n[services.echo]\nport = 7\n"
        '[services.stats]\nrate = 1\n[daemon]\nuser = "nobody"\nhome = "/"\n'
    )
    assert errors == [
        "colour: unknown section",
        "extra: unknown section",
        "daemon.home: unknown key",
        "services.ssh: unknown service (known: echo, discard, chargen, daytime, time, timefmt, "
        'framed, command, stats; a program service needs exec = ["/path/to/program", ...])',
        "services.echo.port: unknown key",
        "services.stats.rate: unknown key",
    ]


def test_sections_of_the_wrong_shape():
    errors = errors_of('daemon = 1\nservices = "all"\n[commands]\nuptime = "uptime"\n')
    assert errors == [
        "daemon: expected a table, got integer",
        "services: expected a table, got string",
        "commands.uptime: expected a table, got string",
    ]


def test_many_errors_reported_together():
    errors = errors_of(
        '[log]\nlevel = "loud"\n[services.echo]\ntcp = ["nowhere"]\n'
        '[services.time]\nonly_from = ["10.0.0.1/8"]\n[commands.x]\nargv = []\n'
    )
    assert [e.split(":")[0] for e in errors] == [
        "log.level",
        "services.echo.tcp[0]",
        "services.time.only_from[0]",
        "commands.x.argv",
    ]


def test_toml_syntax_error_names_line_and_column():
    with pytest.raises(ConfigError) as info:
        parse('[log]\nlevel = "info"\nformat = json\n', "/etc/evd/evd.toml")
    (error,) = info.value.errors
    assert error.startswith("/etc/evd/evd.toml: TOML syntax error: ")
    assert "(at line 3, column 10)" in error


# -- addresses --------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, host, port, shown",
    [
        ("127.0.0.1:7007", "127.0.0.1", 7007, "127.0.0.1:7007"),
        ("[::1]:7007", "::1", 7007, "[::1]:7007"),
        ("[0:0::1]:80", "::1", 80, "[::1]:80"),
        ("*:7007", "*", 7007, "*:7007"),
        ("0.0.0.0:0", "0.0.0.0", 0, "0.0.0.0:0"),
        ("[::]:65535", "::", 65535, "[::]:65535"),
    ],
)
def test_good_addresses(text, host, port, shown):
    address = parse(f'[services.echo]\ntcp = ["{text}"]\n').services["echo"].tcp[0]
    assert address == Address("tcp", host, port)
    assert str(address) == shown


@pytest.mark.parametrize(
    "text, why",
    [
        ("localhost:7007", "host must be an IP literal or * (no hostnames)"),
        ("::1:7007", "an IPv6 host needs brackets: [ADDR]:PORT"),
        ("[::g]:7007", "[::g] is not an IPv6 literal"),
        ("127.0.0.1:65536", "expected HOST:PORT with PORT an integer 0..65535"),
        ("127.0.0.1", "expected HOST:PORT with PORT an integer 0..65535"),
        ("127.0.0.1:-1", "expected HOST:PORT with PORT an integer 0..65535"),
        ("300.0.0.1:7", "host must be an IP literal or * (no hostnames)"),
    ],
)
def test_bad_addresses(text, why):
    error = one_error(f'[services.echo]\ntcp = ["127.0.0.1:1", "{text}"]\n')
    assert error == f'services.echo.tcp[1]: bad address "{text}": {why}'


def test_address_list_types():
    assert (
        one_error('[services.echo]\nudp = "127.0.0.1:7"\n')
        == "services.echo.udp: expected an array of strings, got string"
    )
    assert one_error("[services.echo]\nudp = [7]\n") == "services.echo.udp[0]: expected a string, got integer"


def test_unix_paths():
    c = parse('[services.echo]\nunix = ["/run/evd/echo.sock"]\n')
    assert c.services["echo"].unix == (Address("unix", "/run/evd/echo.sock", 0),)
    assert str(c.services["echo"].unix[0]) == "/run/evd/echo.sock"
    assert c.services["echo"].addresses[-1].proto == "unix"
    assert (
        one_error('[services.echo]\nunix = ["echo.sock"]\n')
        == 'services.echo.unix[0]: bad address "echo.sock": must be an absolute path'
    )
    assert one_error('[services.echo]\nunix = [""]\n').startswith('services.echo.unix[0]: bad address ""')
    long = "/" + "x" * 107
    assert "UNIX socket limit" in one_error(f'[services.echo]\nunix = ["{long}"]\n')


def test_framed_has_no_udp_and_command_no_addresses():
    assert (
        one_error('[services.framed]\nudp = ["127.0.0.1:7070"]\n')
        == "services.framed.udp: framed is TCP/UNIX only"
    )
    assert (
        one_error('[services.command]\ntcp = ["127.0.0.1:1"]\n')
        == "services.command.tcp: command has no listeners of its own; it is reached through services.framed"
    )


# -- listener conflicts -----------------------------------------------------------


def test_same_listener_in_two_services():
    assert (
        one_error('[services.daytime]\ntcp = ["127.0.0.1:7007"]\n')
        == "services.daytime.tcp[0]: tcp 127.0.0.1:7007 is already used by services.echo.tcp[0]"
    )


def test_same_listener_twice_in_one_service():
    assert (
        one_error('[services.echo]\nudp = ["[::1]:9", "[::1]:9"]\n')
        == "services.echo.udp[1]: udp [::1]:9 is already used by services.echo.udp[0]"
    )
    assert (
        one_error('[services.echo]\nunix = ["/tmp/e.sock"]\n[services.framed]\nunix = ["/tmp/e.sock"]\n')
        == "services.framed.unix[0]: unix /tmp/e.sock is already used by services.echo.unix[0]"
    )


@pytest.mark.parametrize("wildcard", ["*", "0.0.0.0", "[::]"])
def test_wildcard_overlaps_a_specific_address(wildcard):
    error = one_error(f'[services.daytime]\ntcp = ["{wildcard}:7007"]\n')
    assert (
        error
        == f"services.daytime.tcp[0]: tcp {wildcard}:7007 overlaps 127.0.0.1:7007 of services.echo.tcp[0]"
    )


def test_listeners_that_do_not_conflict():
    parse('[services.daytime]\ntcp = ["*:7007"]\nudp = []\n[services.echo]\ntcp = []\n')  # udp 7007 only
    parse('[services.echo]\ntcp = ["127.0.0.1:0", "*:0"]\n[services.time]\ntcp = ["127.0.0.1:0"]\n')
    parse('[services.echo]\ntcp = ["0.0.0.0:7007", "[::1]:7007"]\n')
    parse('[services.echo]\ntcp = ["127.0.0.2:7007"]\n')
    parse('[services.discard]\ntcp = ["127.0.0.1:7007"]\n')  # disabled services bind nothing


# -- access lists -----------------------------------------------------------------


def test_access_lists():
    svc = parse(
        '[services.echo]\nonly_from = ["10.0.0.0/8", "192.168.1.7", "2001:db8::/32"]\nno_access = ["::1"]\n'
    ).services["echo"]
    assert svc.only_from == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.168.1.7/32"),
        ipaddress.ip_network("2001:db8::/32"),
    )
    assert svc.no_access == (ipaddress.ip_network("::1/128"),)


def test_bad_cidrs():
    errors = errors_of(
        '[services.echo]\nonly_from = ["192.168.1.1/24", "example.com"]\nno_access = ["10.0.0.0/33"]\n'
    )
    assert (
        errors[0] == 'services.echo.only_from[0]: bad CIDR "192.168.1.1/24": 192.168.1.1/24 has host bits set'
    )
    assert errors[1].startswith('services.echo.only_from[1]: bad CIDR "example.com": ')
    assert errors[2].startswith('services.echo.no_access[0]: bad CIDR "10.0.0.0/33": ')
    assert len(errors) == 3


# -- limits per service -----------------------------------------------------------


def test_service_limits_override_the_global_ones():
    c = parse("[limits]\nrate = 10\nburst = 20\n[services.echo]\nrate = 0\nmax_connections = 5\n")
    assert c.limits.rate == 10.0 and c.limits.max_connections == 1024
    echo = c.services["echo"].limits
    assert (echo.rate, echo.burst, echo.max_connections) == (0.0, 20, 5)
    assert c.services["time"].limits == c.limits
    assert c.services["command"].limits == c.limits


def test_service_limit_errors_name_the_service():
    assert (
        one_error("[services.framed]\nmax_header = 0\n") == "services.framed.max_header: must be at least 2"
    )
    assert one_error("[services.command]\nrate = 1\n") == "services.command.rate: unknown key"


# -- framed and command -----------------------------------------------------------


def test_dispatch_and_auth_required():
    framed = parse('[services.framed]\ndispatch = ["echo"]\nauth_required = ["echo", "stats"]\n').services[
        "framed"
    ]
    assert framed.dispatch == ("echo",) and framed.auth_required == ("echo", "stats")
    errors = errors_of(
        '[services.framed]\ndispatch = ["echo", "daytime"]\nauth_required = ["time", "time"]\n'
    )
    assert errors == [
        'services.framed.dispatch: "daytime" cannot be dispatched (choose from echo, time, command, stats)',
        "services.framed.auth_required: lists a service twice",
    ]


def test_command_service_keys():
    cmd = parse("[services.command]\ntimeout = 2\nmax_output = 0\nmax_concurrent = 1\n").services["command"]
    assert (cmd.timeout, cmd.max_output, cmd.max_concurrent) == (2.0, 0, 1)
    assert (
        one_error("[services.command]\nmax_concurrent = 0\n")
        == "services.command.max_concurrent: must be at least 1"
    )


def test_key_file_must_be_absolute():
    assert (
        one_error('[services.framed]\nkey_file = "key"\n')
        == "services.framed.key_file: must be an absolute path"
    )


# -- commands ---------------------------------------------------------------------


def test_a_commands_table_replaces_the_defaults():
    c = parse('[commands.date]\nargv = ["date", "-u"]\n')
    assert list(c.commands) == ["date"]
    assert c.commands["date"] == model.CommandSpec("date", ("date", "-u"))
    assert parse("[commands]\n").commands == {}
    assert list(parse("[log]\n").commands) == ["uptime", "greet"]


def test_command_errors():
    errors = errors_of(
        '[commands."bad name"]\nargv = ["x"]\n[commands.a]\nargs = "yes"\n'
        '[commands.b]\nargv = ["ls", ""]\narg_pattern = "(["\n[commands.c]\nargv = ["x"]\ncolour = 1\n'
    )
    assert errors[0].startswith("commands.bad name: bad command name")
    assert errors[1] == "commands.a.args: expected a boolean, got string"
    assert errors[2].startswith("commands.a.argv: missing")
    assert errors[3] == "commands.b.argv: must be a non-empty array of non-empty strings"
    assert errors[4].startswith("commands.b.arg_pattern: bad regular expression: ")
    assert errors[5] == "commands.c.colour: unknown key"
    assert len(errors) == 6


# -- dump -------------------------------------------------------------------------


def test_dump_round_trips_the_default():
    c = parse(EMBEDDED)
    assert round_trip(c) == c
    assert tomlout.dump(c) == tomlout.dump(round_trip(c))


def test_dump_writes_every_effective_key():
    text = tomlout.dump(parse("[limits]\nburst = 9\n"))
    echo = text.split("[services.echo]\n")[1].split("\n\n")[0]
    assert "burst = 9" in echo and "only_from = []" in echo and 'udp = ["127.0.0.1:7007"]' in echo
    assert "shutdown_timeout = 10.0" in text and "rate = 200.0" in text


@pytest.mark.parametrize(
    "text",
    [
        '[daemon]\nuser = "nobody"\ngroup = "nogroup"\nworkers = 4\nshutdown_timeout = 0\n'
        '[log]\nlevel = "debug"\nformat = "console"\nfile = "/var/log/evd/evd.log"\n',
        '[limits]\nrate = 0\nidle_timeout = 1.5e3\n[services.echo]\ntcp = ["*:7", "[::1]:8"]\nudp = []\n'
        'unix = ["/run/evd/e.sock"]\nonly_from = ["10.0.0.0/8", "::1"]\n'
        'no_access = ["10.1.0.0/16"]\nburst = 3\n'
        "[services.chargen]\nenabled = true\nudp = []\n"
        '[services.framed]\ndispatch = ["echo"]\nauth_required = []\n',
        "[commands]\n[services.command]\nenabled = false\n[services.stats]\nenabled = false\n",
        '[commands."odd.name"]\nargv = ["printf", "it\'s \\"quoted\\"\\\\ \\t\\u007f\\u00e9"]\nargs = true\n'
        "arg_pattern = '^\\d+(\\.\\d+)?$'\n"
        '[commands.other]\nargv = ["x"]\narg_pattern = "^it\'s\\\\w$"\n',
    ],
)
def test_dump_round_trips_other_configs(text):
    c = parse(text, "/etc/evd/evd.toml")
    assert c != parse("")
    assert round_trip(c) == c


def test_dump_keeps_regex_backslashes_readable():
    c = parse("[commands.n]\nargv = [\"seq\"]\nargs = true\narg_pattern = '^\\d{1,3}$'\n")
    assert c.commands["n"].arg_pattern == r"^\d{1,3}$"
    assert r"arg_pattern = '^\d{1,3}$'" in tomlout.dump(c)


# -- finding the file -------------------------------------------------------------


def test_resolve_path_order(tmp_path, monkeypatch):
    monkeypatch.delenv("EVD_CONFIG", raising=False)
    monkeypatch.setattr(model, "DEFAULT_PATH", str(tmp_path / "absent.toml"))
    assert loader.resolve_path(None) is None
    default = tmp_path / "evd.toml"
    default.write_text("")
    monkeypatch.setattr(model, "DEFAULT_PATH", str(default))
    assert loader.resolve_path(None) == str(default)
    monkeypatch.setenv("EVD_CONFIG", "/from/env.toml")
    assert loader.resolve_path(None) == "/from/env.toml"
    assert loader.resolve_path("/explicit.toml") == "/explicit.toml"
    monkeypatch.setenv("EVD_CONFIG", "")
    assert loader.resolve_path(None) == str(default)


def test_load(tmp_path, monkeypatch):
    monkeypatch.delenv("EVD_CONFIG", raising=False)
    monkeypatch.setattr(model, "DEFAULT_PATH", str(tmp_path / "absent.toml"))
    assert loader.load() == parse(EMBEDDED)
    path = tmp_path / "evd.toml"
    path.write_text('[log]\nlevel = "error"\n')
    c = loader.load(str(path))
    assert c.source == str(path) and c.log.level == "error"
    monkeypatch.setenv("EVD_CONFIG", str(path))
    assert loader.load().source == str(path)


def test_load_unreadable(tmp_path):
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as info:
        loader.load(str(missing))
    assert info.value.errors == [f"{missing}: cannot read: [Errno 2] No such file or directory"]
    if os.geteuid() != 0:
        path = tmp_path / "secret.toml"
        path.write_text("")
        path.chmod(0)
        with pytest.raises(ConfigError, match=r"cannot read: \[Errno 13\] Permission denied"):
            loader.load(str(path))


def test_config_error_accepts_one_message():
    exc = ConfigError("x: broken")
    assert exc.errors == ["x: broken"] and str(exc) == "x: broken"


# -- bounds, NUL, and the keys of sections 8-11 ---------------------------------------


@pytest.mark.parametrize(
    "text, error",
    [
        ("[limits]\nmax_header = 5000000000\n", "limits.max_header: must be at most 16777216"),
        ("[limits]\nmax_body = 2000000000\n", "limits.max_body: must be at most 1073741824"),
        ("[limits]\nwrite_high = 2000000000\n", "limits.write_high: must be at most 1073741824"),
        ("[limits]\nidle_timeout = 1e308\n", "limits.idle_timeout: must be at most 2592000"),
        ("[limits]\nhandshake_timeout = 0\n", "limits.handshake_timeout: must be at least 0.001"),
        ("[limits]\nauth_ban = -1\n", "limits.auth_ban: must be at least 0"),
        ("[limits]\nrate = 1e9\n", "limits.rate: must be at most 1000000"),
        ("[daemon]\nshutdown_timeout = 1e308\n", "daemon.shutdown_timeout: must be at most 2592000"),
        ("[daemon]\nworkers = 100000\n", "daemon.workers: must be at most 1024"),
        ("[services.echo]\nmax_header = 99999999\n", "services.echo.max_header: must be at most 16777216"),
        ("[services.command]\ntimeout = 1e100\n", "services.command.timeout: must be at most 2592000"),
        (
            "[services.command]\nmax_output = 1e3\n",
            "services.command.max_output: expected an integer, got float",
        ),
        ("[log]\nbuffer = 10\n", "log.buffer: must be at least 4096"),
    ],
)
def test_every_size_and_duration_is_bounded(text, error):
    assert one_error(text) == error


@pytest.mark.parametrize(
    "text, key",
    [
        ('[services.framed]\nkey_file = "/etc/evd/\\u0000key"\n', "services.framed.key_file"),
        ('[services.echo]\nunix = ["/run/\\u0000e.sock"]\n', "services.echo.unix[0]"),
        ('[daemon]\npidfile = "/run/evd\\u0000.pid"\n', "daemon.pidfile"),
        ('[log]\nfile = "/var/log/\\u0000evd.log"\n', "log.file"),
        ('[commands.x]\nargv = ["echo", "a\\u0000b"]\n', "commands.x.argv[1]"),
        ('[daemon]\nuser = "ro\\u0000ot"\n', "daemon.user"),
    ],
)
def test_a_nul_character_is_refused_in_any_string(text, key):
    assert one_error(text) == f"{key}: must not contain a NUL character"


def test_new_sections_have_the_spec_defaults():
    c = parse("")
    assert c.include == ()
    assert c.log == model.LogConfig("info", "json", "", 4194304, "/run/systemd/journal/socket")
    assert c.control == model.ControlConfig("", "0600") and c.control.mode_bits == 0o600
    assert c.metrics == model.MetricsConfig(())
    assert (c.limits.handshake_timeout, c.limits.auth_ban) == (10.0, 60.0)
    echo = c.services["echo"]
    assert (echo.tls, echo.tls_cert, echo.tls_key, echo.tls_client_ca) == ((), "", "", "")
    assert c.keys == {}


def test_control_metrics_and_include_values():
    c = parse(
        'include = ["/etc/evd/evd.d/*.toml"]\n[log]\nformat = "journal"\n'
        '[control]\nunix = "/run/evd/ctl.sock"\nmode = "0660"\n[metrics]\ntcp = ["127.0.0.1:9101"]\n'
    )
    assert c.include == ("/etc/evd/evd.d/*.toml",) and c.log.format == "journal"
    assert c.control.unix == "/run/evd/ctl.sock" and c.control.mode_bits == 0o660
    assert c.metrics.tcp == (Address("tcp", "127.0.0.1", 9101),)
    assert errors_of('include = ["evd.d/*.toml"]\n[control]\nmode = "rw"\nunix = "ctl.sock"\n') == [
        'include: "evd.d/*.toml" must be an absolute path',
        'control.mode: must be an octal file mode such as "0600"',
        "control.unix: must be an absolute path",
    ]


def test_tls_addresses_need_a_certificate_and_share_the_tcp_port_space():
    assert errors_of('[services.echo]\ntls = ["127.0.0.1:7443"]\n') == [
        "services.echo.tls_cert: required when tls is not empty",
        "services.echo.tls_key: required when tls is not empty",
    ]
    c = parse('[services.framed]\ntls = ["[::1]:7443"]\ntls_cert = "/c.pem"\ntls_key = "/k.pem"\n')
    assert c.services["framed"].tls == (Address("tls", "::1", 7443),)
    assert ("framed", Address("tls", "::1", 7443)) in c.listener_keys()
    assert (
        one_error('[services.echo]\ntls = ["127.0.0.1:7070"]\ntls_cert = "/c"\ntls_key = "/k"\n')
        == "services.framed.tcp[0]: tcp 127.0.0.1:7070 is already used by services.echo.tls[0]"
    )
    assert one_error('[metrics]\ntcp = ["*:7007"]\n') == (
        "metrics.tcp[0]: tcp *:7007 overlaps 127.0.0.1:7007 of services.echo.tcp[0]"
    )
    assert one_error('[control]\nunix = "/run/e.sock"\n[services.echo]\nunix = ["/run/e.sock"]\n') == (
        "control.unix: unix /run/e.sock is already used by services.echo.unix[0]"
    )
    assert one_error('[services.command]\ntls = ["127.0.0.1:1"]\n').endswith(
        "command has no listeners of its own; it is reached through services.framed"
    )


def test_named_keys():
    c = parse(
        '[keys.ops]\nfile = "/etc/evd/ops.key"\n[keys.ci]\nclient_cn = "ci-runner"\ncommands = ["greet"]\n'
    )
    assert c.keys["ops"] == model.KeySpec("ops", "/etc/evd/ops.key", "", ("*",))
    assert c.keys["ci"].may_run("greet") and not c.keys["ci"].may_run("uptime")
    assert c.keys["ops"].may_run("uptime")
    assert errors_of(
        '[keys.a]\ncommands = ["nope"]\n[keys.b]\nclient_cn = "x"\n[keys.c]\nclient_cn = "x"\n'
        '[keys."bad name"]\nfile = "/k"\n[keys.d]\nfile = "k"\nsecret = 1\n'
    ) == [
        "keys.bad name: bad key name (letters, digits, '.', '_', '-'; at most 64)",
        "keys.d.file: must be an absolute path",
        "keys.d.secret: unknown key",
        "keys.a: needs a file (an HMAC secret), a client_cn, or both",
        'keys.a.commands: "nope" is not in the [commands] allow-list',
        'keys: client_cn "x" is given to more than one key',
    ]
    assert one_error('[services.framed]\nkey_file = "/k"\n[keys.default]\nfile = "/k2"\n') == (
        "keys.default: the name is taken by services.framed.key_file"
    )
    both = parse('[services.framed]\nkey_file = "/k"\n[keys.ops]\nclient_cn = "ops"\n')
    assert list(both.all_keys()) == ["ops", "default"]
    assert both.all_keys()["default"] == model.KeySpec("default", "/k")


def test_dump_round_trips_the_new_sections():
    c = parse(
        'include = ["/etc/evd/evd.d/*.toml"]\n[control]\nunix = "/run/c.sock"\n'
        '[metrics]\ntcp = ["127.0.0.1:9"]\n'
        '[services.echo]\ntls = ["127.0.0.1:7443"]\ntls_cert = "/c"\ntls_key = "/k"\nauth_ban = 5\n'
        '[keys.ops]\nclient_cn = "ops"\ncommands = ["uptime"]\n'
    )
    assert round_trip(c) == c


def test_resolve_path_makes_a_relative_path_absolute(tmp_path, monkeypatch):
    """`evd start` detaches into "/": a reload must find the file it started with."""
    monkeypatch.chdir(tmp_path)
    assert loader.resolve_path("evd.toml") == str(tmp_path / "evd.toml")
    monkeypatch.setenv("EVD_CONFIG", "conf/evd.toml")
    assert loader.resolve_path(None) == str(tmp_path / "conf/evd.toml")


# --- program services (SPEC section 14) ----------------------------------------

PROGRAM = '[services.cat]\nexec = ["/bin/cat", "-u"]\ntcp = ["127.0.0.1:0"]\n'


def test_a_program_service_and_its_defaults():
    svc = parse(PROGRAM).services["cat"]
    assert svc.exec == ("/bin/cat", "-u") and svc.listens and svc.enabled
    assert (svc.cwd, svc.user, svc.group, svc.env) == ("/", "", "", ())
    assert svc.timeout == 0.0  # SPEC 14: 0 = none, the default
    assert list(parse(PROGRAM).services)[-1] == "cat"  # after the built-in ones


def test_a_program_service_round_trips_with_its_env():
    c = parse(PROGRAM + 'env = { A = "1", B_2 = "two words" }\ncwd = "/tmp"\ntimeout = 5\n')
    assert c.services["cat"].env == (("A", "1"), ("B_2", "two words"))
    assert round_trip(c) == c


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ('exec = ["cat"]', 'services.x.exec: "cat" must be an absolute path'),
        ("exec = []", "services.x.exec: must be a non-empty array of non-empty strings"),
        ('exec = ["/bin/cat"]\nenv = { REMOTE_ADDR = "x" }', "services.x.env: REMOTE_ADDR is set by evd"),
        ('exec = ["/bin/cat"]\nenv = { "1A" = "x" }', 'services.x.env: "1A" is not an environment variable'),
        ('exec = ["/bin/cat"]\nenv = { A = 1 }', "services.x.env.A: expected a string, got integer"),
        ('exec = ["/bin/cat"]\ncwd = "tmp"', "services.x.cwd: must be an absolute path"),
        ('exec = ["/bin/cat"]\nudp = ["127.0.0.1:0"]', "services.x.udp: a program service is stream-only"),
        ('tcp = ["127.0.0.1:0"]', "services.x: unknown service"),
    ],
)
def test_program_service_mistakes(extra, error):
    assert one_error(f"[services.x]\n{extra}\n").startswith(error)


def test_commands_take_their_own_settings_and_fall_back_when_unset():
    c = parse(
        '[commands.job]\nargv = ["/bin/true"]\ntimeout = 60\nmax_concurrent = 2\ncwd = "/srv"\n'
        'env = { MODE = "batch" }\nuser = "nobody"\n[commands.plain]\nargv = ["/bin/true"]\n'
    )
    job, plain = c.commands["job"], c.commands["plain"]
    assert (job.timeout, job.max_concurrent, job.cwd, job.env, job.user) == (
        60.0,
        2,
        "/srv",
        (("MODE", "batch"),),
        "nobody",
    )
    unset = (plain.timeout, plain.max_concurrent, plain.cwd, plain.env, plain.user)
    assert unset == (None, None, "/", (), "")
    assert round_trip(c) == c
    assert "timeout" not in tomlout.command_items(plain)  # unset stays unset


def test_command_setting_mistakes():
    base = '[commands.job]\nargv = ["/bin/true"]\n'
    assert one_error(base + "max_concurrent = 0\n") == "commands.job.max_concurrent: must be at least 1"
    assert one_error(base + 'cwd = "srv"\n') == "commands.job.cwd: must be an absolute path"
    assert one_error(base + 'env = { EVD_CONN = "1" }\n').startswith("commands.job.env: EVD_CONN")


# -- the PROXY protocol (SPEC section 13) -----------------------------------------


def test_proxy_protocol_keys():
    c = parse(
        '[services.echo]\nproxy_protocol = true\nproxy_from = ["10.0.0.0/8", "::1"]\n'
        '[services.framed]\nproxy_protocol = true\nproxy_from = ["127.0.0.1"]\n'
    )
    echo = c.services["echo"]
    assert echo.proxy_protocol is True
    assert echo.proxy_from == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert c.services["framed"].proxy_from == (ipaddress.ip_network("127.0.0.1/32"),)
    assert parse("").services["echo"].proxy_protocol is False
    assert round_trip(c) == c


def test_proxy_protocol_needs_trusted_proxies():
    assert one_error("[services.echo]\nproxy_protocol = true\n").startswith(
        "services.echo.proxy_from: required when proxy_protocol is true"
    )
    assert one_error("[services.echo]\nproxy_protocol = true\nproxy_from = []\n").startswith(
        "services.echo.proxy_from: required"
    )
    # proxy_from alone is harmless (switching the protocol off keeps the list).
    assert parse('[services.echo]\nproxy_from = ["10.0.0.0/8"]\n').services["echo"].proxy_from


def test_proxy_protocol_is_for_streams():
    error = one_error('[services.timefmt]\nproxy_protocol = true\nproxy_from = ["10.0.0.0/8"]\n')
    assert error.startswith("services.timefmt.proxy_protocol: timefmt has only UDP listeners")
    # A service with UDP and TCP: the header is read on its stream listeners.
    assert parse('[services.echo]\nproxy_protocol = true\nproxy_from = ["10.0.0.0/8"]\n')
    unknown = one_error("[services.command]\nproxy_protocol = true\n")
    assert unknown == "services.command.proxy_protocol: unknown key"
    assert one_error('[services.echo]\nproxy_from = ["10.0.0.1/8"]\n').startswith(
        'services.echo.proxy_from[0]: bad CIDR "10.0.0.1/8"'
    )
    assert one_error('[services.echo]\nproxy_protocol = "yes"\n') == (
        "services.echo.proxy_protocol: expected a boolean, got string"
    )


def test_salvage_reads_one_key_from_a_broken_file(tmp_path):
    """What `evd ctl` falls back to (issue 23, item 8)."""
    from evd.config.loader import salvage

    main = tmp_path / "evd.toml"
    cases = {
        '[control]\nunix = "/run/a.sock"\n[services.echo\n': "/run/a.sock",
        'control.unix = "/run/b.sock"\n[oops\n': "/run/b.sock",
        "[control]\nmode = \"0600\"\nunix = '/run/c.sock' # literal\n[control\n": "/run/c.sock",
        '[services.echo]\nunix = "/run/not-control.sock"\n[x\n': None,
        "[control]\nunix = [\n": None,
        '[metrics]\ncontrol.unix = "/run/metrics.control.unix"\n[x\n': None,
        '[control]\nunix = "/run/good.sock"\n': "/run/good.sock",  # valid TOML, whatever else is wrong
    }
    for text, expected in cases.items():
        main.write_text(text)
        assert salvage(str(main), "control", "unix") == expected, text
    # the drop-ins, read after the main file, win as they do in a load
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "50-ctl.toml").write_text('[control]\nunix = "/run/dropin.sock"\n')
    main.write_text(f'include = ["{tmp_path}/d/*.toml"]\n[control]\nunix = "/run/main.sock"\n[broken\n')
    assert salvage(str(main), "control", "unix") == "/run/main.sock"  # its include unreadable: itself
    main.write_text(f'include = ["{tmp_path}/d/*.toml"]\n[control]\nunix = "/run/main.sock"\n')
    (tmp_path / "d" / "60-broken.toml").write_text("[x\n")
    assert salvage(str(main), "control", "unix") == "/run/dropin.sock"
