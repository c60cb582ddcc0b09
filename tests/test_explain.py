"""The access decision (proto/access.py), which `evd explain` uses and
which must agree with the daemon's admission."""

from __future__ import annotations

import ipaddress
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from evd.core import loader
from evd.proto.access import AccessList, Verdict
from evd.proto.admission import Admission

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
