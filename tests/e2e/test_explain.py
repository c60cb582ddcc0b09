"""`evd explain` (SPEC section 11) and the access decision behind it
(proto/access.py), which must agree with the daemon's admission."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.daemon import ROOT, WAIT

from evd.config import loader
from evd.proto.access import AccessList, Verdict
from evd.proto.admission import Admission
from evd.tools import explain


def evd_explain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "evd", "explain", *args],
        capture_output=True,
        text=True,
        timeout=3 * WAIT,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    """A main file with a drop-in directory: echo only from 10/8 except
    10.0.0.0/24, burst from the main file, rate from the drop-in."""
    main = tmp_path / "evd.toml"
    main.write_text(
        f'include = ["{tmp_path}/evd.d/*.toml"]\n[limits]\nburst = 7\n'
        '[services.echo]\nonly_from = ["10.0.0.0/8"]\nunix = ["/run/evd/echo.sock"]\n'
    )
    (tmp_path / "evd.d").mkdir()
    drop = tmp_path / "evd.d/50-echo.toml"
    drop.write_text('[services.echo]\nrate = 3.0\nno_access = ["10.0.0.0/24"]\n')
    return main, drop


# -- verdicts, through the command line ------------------------------------------------


@pytest.mark.parametrize(
    "ip, verdict, rule",
    [
        ("10.1.2.3", "allow", "only_from 10.0.0.0/8"),
        ("::ffff:10.1.2.3", "allow", "only_from 10.0.0.0/8"),  # IPv4-mapped is IPv4
        ("10.0.0.9", "deny", "no_access 10.0.0.0/24"),
        ("192.168.1.1", "deny", None),  # in no only_from entry: no entry decided
        ("2001:db8::1", "deny", None),
    ],
)
def test_verdicts(files, ip, verdict, rule):
    main, _ = files
    out = evd_explain("echo", "--from", ip, "--json", "-c", str(main))
    assert out.returncode == 0, out.stderr
    untrusted = {"trusted": False, "rule": None}
    expected = {"ip": ip, "verdict": verdict, "rule": rule, "proxy": untrusted}
    assert json.loads(out.stdout)["access"] == expected


def test_json_shape_and_where_each_limit_came_from(files):
    main, drop = files
    out = evd_explain("echo", "--json", "-c", str(main))
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert list(answer) == ["service", "enabled", "listeners", "limits", "access", "proxy"]
    assert answer["proxy"] == {"protocol": False, "from": []}
    assert answer["service"] == "echo" and answer["enabled"] is True and answer["access"] is None
    assert answer["listeners"] == ["tcp 127.0.0.1:7007", "udp 127.0.0.1:7007", "unix /run/evd/echo.sock"]
    limits = answer["limits"]
    assert all(list(v) == ["value", "from"] for v in limits.values())
    assert limits["rate"] == {"value": 3.0, "from": str(drop)}  # the drop-in, in [services.echo]
    assert limits["burst"] == {"value": 7, "from": str(main)}  # the main file's [limits]
    assert limits["max_connections"] == {"value": 1024, "from": "default"}
    # what acts on echo over tcp, udp and unix; not the framed port's or TLS's limits
    assert set(limits) == {
        "max_connections",
        "per_source",
        "rate",
        "burst",
        "idle_timeout",
        "write_high",
        "write_low",
    }


def test_proto_narrows_listeners_and_limits(files):
    main, _ = files
    udp = json.loads(evd_explain("echo", "--proto", "udp", "--json", "-c", str(main)).stdout)
    assert udp["listeners"] == ["udp 127.0.0.1:7007"] and list(udp["limits"]) == ["rate", "burst"]
    unix = json.loads(evd_explain("echo", "--proto", "unix", "--json", "-c", str(main)).stdout)
    assert list(unix["limits"]) == ["max_connections", "idle_timeout", "write_high", "write_low"]
    tls = json.loads(evd_explain("echo", "--proto", "tls", "--json", "-c", str(main)).stdout)
    assert tls["listeners"] == [] and "handshake_timeout" in tls["limits"]
    framed = json.loads(evd_explain("framed", "--json", "-c", str(main)).stdout)
    assert {"max_header", "max_body", "auth_ban"} <= set(framed["limits"])


def test_text_form_names_the_files(files):
    main, drop = files
    out = evd_explain("echo", "--from", "10.0.0.9", "-c", str(main))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "echo: enabled  (from default)"
    assert f"  rate            = 3.0        from {drop}" in lines
    assert f"only_from: 10.0.0.0/8  (from {main})" in lines
    assert f"no_access: 10.0.0.0/24  (from {drop})" in lines
    assert lines[-1] == "access from 10.0.0.9: deny (by no_access 10.0.0.0/24)"


def test_command_is_reached_through_framed(tmp_path):
    main = tmp_path / "evd.toml"
    main.write_text('[services.framed]\nno_access = ["192.0.2.0/24"]\n')
    answer = json.loads(evd_explain("command", "--from", "192.0.2.7", "--json", "-c", str(main)).stdout)
    assert answer["listeners"] == [] and list(answer["limits"]) == ["timeout", "max_output", "max_concurrent"]
    assert answer["access"] == {
        "ip": "192.0.2.7",
        "verdict": "deny",
        "rule": "no_access 192.0.2.0/24",
        "proxy": {"trusted": False, "rule": None},
    }


@pytest.fixture
def proxied(tmp_path: Path) -> Path:
    """echo behind proxies of 10.9.0.0/16, for clients of 192.0.2.0/24 but not 192.0.2.66."""
    main = tmp_path / "evd.toml"
    main.write_text(
        '[services.echo]\nproxy_protocol = true\nproxy_from = ["10.9.0.0/16", "::1"]\n'
        'only_from = ["192.0.2.0/24"]\nno_access = ["192.0.2.66"]\nunix = ["/run/evd/echo.sock"]\n'
    )
    return main


def test_from_says_whether_the_address_is_a_trusted_proxy(proxied):
    trusted = json.loads(evd_explain("echo", "--from", "10.9.1.2", "--json", "-c", str(proxied)).stdout)
    assert trusted["proxy"] == {"protocol": True, "from": ["10.9.0.0/16", "::1/128"]}
    assert trusted["access"]["proxy"] == {"trusted": True, "rule": "proxy_from 10.9.0.0/16"}
    mapped = json.loads(evd_explain("echo", "--from", "::ffff:10.9.1.2", "--json", "-c", str(proxied)).stdout)
    assert mapped["access"]["proxy"]["trusted"] is True
    client = json.loads(evd_explain("echo", "--from", "192.0.2.7", "--json", "-c", str(proxied)).stdout)
    assert client["access"]["proxy"] == {"trusted": False, "rule": None}
    assert client["access"]["verdict"] == "allow"
    # Behind a proxy, UNIX connections have a client IP too, and a header to wait for.
    unix = json.loads(evd_explain("echo", "--proto", "unix", "--json", "-c", str(proxied)).stdout)
    assert {"per_source", "rate", "handshake_timeout"} <= set(unix["limits"])


def test_from_in_words_behind_a_proxy(proxied):
    text = evd_explain("echo", "--from", "10.9.1.2", "-c", str(proxied)).stdout.splitlines()
    assert f"proxy_protocol: on, from 10.9.0.0/16, ::1/128  (from {proxied})" in text
    assert text[-2].startswith("10.9.1.2 is a trusted proxy of echo (by proxy_from 10.9.0.0/16)")
    text = evd_explain("echo", "--from", "192.0.2.66", "-c", str(proxied)).stdout.splitlines()
    assert text[-2].startswith("192.0.2.66 is NOT a trusted proxy of echo: its connections are refused")
    assert text[-1] == "access for client 192.0.2.66: deny (by no_access 192.0.2.66/32)"


def test_exit_statuses(files, tmp_path):
    main, drop = files
    assert evd_explain("echo", "-c", str(main)).returncode == 0
    unknown = evd_explain("gopher", "-c", str(main))
    assert unknown.returncode == 2 and unknown.stderr.startswith("evd: unknown service gopher (known: echo,")
    drop.write_text("[services.echo]\nrate = -1\n")
    invalid = evd_explain("echo", "-c", str(main))
    assert invalid.returncode == 78 and invalid.stderr == f"{drop}: services.echo.rate: must be at least 0\n"
    assert evd_explain("echo", "--from", "example.org", "-c", str(main)).returncode == 2
    assert evd_explain("echo", "--proto", "unix", "--from", "10.0.0.1", "-c", str(main)).returncode == 2


def test_explain_and_check_config_use_one_loader(files):
    """What explain reports is what the loader (and so a reload) builds."""
    main, _ = files
    loaded = loader.load_all(str(main))
    answer = explain.explain(loaded, "echo")
    echo = loaded.config.services["echo"]
    assert {k: v["value"] for k, v in answer["limits"].items()} == {
        k: getattr(echo.limits, k) for k in answer["limits"]
    }


# -- the access decision agrees with the daemon's admission ------------------------------

CASES = [
    # only_from, no_access, host, allowed
    ((), (), "10.0.0.1", True),
    (("10.0.0.0/8",), (), "10.1.2.3", True),
    (("10.0.0.0/8",), (), "192.168.0.1", False),
    (("10.0.0.0/8",), (), "::ffff:10.1.2.3", True),
    (("10.0.0.0/8",), (), "::1", False),
    ((), ("10.0.0.5/32",), "10.0.0.5", False),
    ((), ("10.0.0.5/32",), "::ffff:10.0.0.5", False),
    ((), ("10.0.0.5/32",), "10.0.0.6", True),
    (("::ffff:10.0.0.0/104",), (), "10.9.9.9", True),
    (("::ffff:10.0.0.0/104",), (), "::ffff:10.9.9.9", True),
    (("::ffff:10.0.0.0/104",), (), "11.0.0.1", False),
    (("10.0.0.0/8",), ("10.0.0.0/24",), "10.0.0.7", False),
    (("10.0.0.0/8",), ("10.0.0.0/24",), "10.1.0.1", True),
    (("2001:db8::/32",), (), "2001:db8::1", True),
    (("2001:db8::/32",), (), "2001:db9::1", False),
    (("2001:db8::/32",), (), "10.0.0.1", False),
    (("fe80::/10",), (), "fe80::1%eth0", True),
    (("0.0.0.0/0",), ("::/0",), "1.2.3.4", True),
    (("0.0.0.0/0",), ("::/0",), "::ffff:1.2.3.4", True),
    (("0.0.0.0/0",), ("::/0",), "::1", False),
    (("10.0.0.0/8",), (), "not-an-address", True),
]


def admission_allows(only_from, no_access, host) -> bool:
    lists = f"only_from = {json.dumps(list(only_from))}\nno_access = {json.dumps(list(no_access))}\n"
    return Admission(loader.parse("[services.echo]\n" + lists).services["echo"])._allowed(host)


def nets(texts):
    return [ipaddress.ip_network(t) for t in texts]


@pytest.mark.parametrize("only_from, no_access, host, allowed", CASES)
def test_access_list_agrees_with_admission(only_from, no_access, host, allowed):
    verdict = AccessList(nets(only_from), nets(no_access)).decide(host)
    assert verdict.allowed is allowed
    assert admission_allows(only_from, no_access, host) is allowed


def test_the_deciding_rule():
    acl = AccessList(nets(["10.0.0.0/8", "10.1.0.0/16"]), nets(["10.1.2.0/24", "10.1.0.0/16"]))
    assert acl.decide("10.9.9.9") == Verdict(True, "only_from 10.0.0.0/8")  # the first match
    assert acl.decide("10.1.2.3") == Verdict(False, "no_access 10.1.2.0/24")
    assert acl.decide("11.0.0.1") == Verdict(False, None)
    mapped = AccessList(nets(["::ffff:10.0.0.0/104"]), [])
    assert mapped.decide("10.0.0.1").rule == "only_from ::ffff:a00:0/104"  # named as configured
    assert AccessList([], []).decide("10.0.0.1") == Verdict(True, None)
    assert not AccessList([], []) and AccessList([], nets(["::1/128"]))


# Addresses and networks of both families, and IPv4-mapped IPv6 ones (which
# both sides must fold to IPv4), often enough to meet each other.
addresses = st.one_of(
    st.ip_addresses(),
    st.ip_addresses(v=4).map(lambda ip: ipaddress.IPv6Address(f"::ffff:{ip}")),
    st.sampled_from([ipaddress.ip_address(a) for a in ("10.0.0.1", "::ffff:10.0.0.1", "::1")]),
)
networks = st.builds(
    lambda ip, prefix: ipaddress.ip_network(f"{ip}/{prefix % (ip.max_prefixlen + 1)}", strict=False),
    addresses,
    st.integers(0, 128),
)


@given(
    st.lists(networks, max_size=3),
    st.lists(networks, max_size=3),
    addresses,
)
def test_access_list_agrees_with_admission_on_any_input(only_from, no_access, ip):
    text = f"[services.echo]\nonly_from = {json.dumps([str(n) for n in only_from])}\n" + (
        f"no_access = {json.dumps([str(n) for n in no_access])}\n"
    )
    admission = Admission(loader.parse(text).services["echo"])
    assert AccessList(only_from, no_access).allowed(str(ip)) is admission._allowed(str(ip))
