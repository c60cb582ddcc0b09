"""Admission (evd/proto/admission.py): access lists, connection limits, token
buckets.  Pure bookkeeping, so every test drives it with an explicit `now`.

The service configuration is a small stand-in (SimpleNamespace) with the
attributes Admission reads: only_from, no_access, proxy_from (ipaddress
networks, as the config parser produces), proxy_protocol and
limits.{max_connections, per_source, rate, burst}.
"""

from __future__ import annotations

import ipaddress
from types import SimpleNamespace

import pytest

from evd.proto import admission as admission_mod
from evd.proto.access import parse_ip
from evd.proto.admission import Admission


def nets(*cidrs):
    return tuple(ipaddress.ip_network(c) for c in cidrs)


def config(
    only_from=(), no_access=(), max_connections=1000, per_source=1000, rate=0.0, burst=10, proxy_from=()
):
    return SimpleNamespace(
        only_from=nets(*only_from),
        no_access=nets(*no_access),
        proxy_protocol=bool(proxy_from),
        proxy_from=nets(*proxy_from),
        limits=SimpleNamespace(
            max_connections=max_connections, per_source=per_source, rate=rate, burst=burst, auth_ban=0.0
        ),
    )


def admit(adm, host, now=0.0):
    """connect + disconnect: checks the rules without holding a slot."""
    reason = adm.connect(host, now)
    if reason is None:
        adm.disconnect(host)
    return reason


# --- parse_ip -----------------------------------------------------------------


@pytest.mark.parametrize(
    "host, expected",
    [
        ("192.0.2.1", ipaddress.IPv4Address("192.0.2.1")),
        ("2001:db8::1", ipaddress.IPv6Address("2001:db8::1")),
        ("::ffff:192.0.2.1", ipaddress.IPv4Address("192.0.2.1")),
        ("::FFFF:10.1.2.3", ipaddress.IPv4Address("10.1.2.3")),
        ("fe80::1%eth0", ipaddress.IPv6Address("fe80::1")),
        ("unix", None),
        ("", None),
        ("example.com", None),
    ],
)
def test_parse_ip(host, expected):
    assert parse_ip(host) == expected


# --- access lists ---------------------------------------------------------------


@pytest.mark.parametrize(
    "host, allowed",
    [
        ("10.1.2.3", True),
        ("10.255.255.255", True),
        ("11.0.0.1", False),
        ("192.168.1.10", True),
        ("192.168.1.11", False),
        ("::ffff:10.9.9.9", True),  # IPv4-mapped: judged as its IPv4 address
        ("::ffff:11.0.0.1", False),
        ("2001:db8:1::5", True),
        ("2001:db8:2::5", False),
        ("::1", False),
    ],
)
def test_only_from(host, allowed):
    adm = Admission(config(only_from=["10.0.0.0/8", "192.168.1.10/32", "2001:db8:1::/48"]))
    assert admit(adm, host) == (None if allowed else "access")


@pytest.mark.parametrize(
    "host, allowed",
    [
        ("10.1.2.3", True),
        ("10.6.6.6", False),
        ("::ffff:10.6.6.6", False),
        ("::ffff:10.7.0.1", True),
        ("2001:db8::bad", False),
        ("2001:db8::900d", True),
        ("203.0.113.9", True),
    ],
)
def test_no_access_alone(host, allowed):
    adm = Admission(config(no_access=["10.6.0.0/16", "2001:db8::bad/128"]))
    assert admit(adm, host) == (None if allowed else "access")


def test_no_access_is_checked_after_only_from():
    adm = Admission(config(only_from=["10.0.0.0/8", "::1/128"], no_access=["10.0.0.0/24", "::1"]))
    assert admit(adm, "10.0.1.1") is None
    assert admit(adm, "10.0.0.7") == "access"  # inside only_from, but refused
    assert admit(adm, "::ffff:10.0.0.7") == "access"
    assert admit(adm, "::1") == "access"
    assert admit(adm, "172.16.0.1") == "access"  # outside only_from


def test_ipv4_only_list_refuses_ipv6_and_vice_versa():
    v4 = Admission(config(only_from=["0.0.0.0/0"]))
    assert admit(v4, "203.0.113.1") is None
    assert admit(v4, "::ffff:203.0.113.1") is None
    assert admit(v4, "2001:db8::1") == "access"
    v6 = Admission(config(only_from=["::/0"]))
    assert admit(v6, "2001:db8::1") is None
    assert admit(v6, "203.0.113.1") == "access"
    assert admit(v6, "::ffff:203.0.113.1") == "access"


def test_unix_peers_pass_access_lists():
    adm = Admission(config(only_from=["10.0.0.0/8"], max_connections=1))
    assert adm.connect(None, 0.0) is None
    assert adm.current == 1


def test_access_checks_datagrams_too():
    adm = Admission(config(only_from=["127.0.0.0/8"]))
    assert adm.datagram("127.0.0.1", 0.0) is None
    assert adm.datagram("::ffff:127.0.0.2", 0.0) is None
    assert adm.datagram("198.51.100.1", 0.0) == "access"
    assert adm.current == 0  # datagrams are not connections


def test_without_lists_no_filtering():
    adm = Admission(config())
    assert adm.filters is False
    for host in ("1.2.3.4", "::1", "not-an-ip"):
        assert admit(adm, host) is None


# --- concurrency limits -------------------------------------------------------


def test_max_connections():
    adm = Admission(config(max_connections=3))
    hosts = ["10.0.0.1", "10.0.0.2", None]
    assert [adm.connect(h, 0.0) for h in hosts] == [None, None, None]
    assert adm.current == 3
    assert adm.connect("10.0.0.4", 0.0) == "max_connections"
    assert adm.connect(None, 0.0) == "max_connections"
    adm.disconnect("10.0.0.2")
    assert adm.current == 2
    assert adm.connect("10.0.0.4", 0.0) is None
    assert adm.connect("10.0.0.5", 0.0) == "max_connections"


def test_per_source():
    adm = Admission(config(per_source=2))
    assert adm.connect("10.0.0.1", 0.0) is None
    assert adm.connect("10.0.0.1", 0.0) is None
    assert adm.connect("10.0.0.1", 0.0) == "per_source"
    assert adm.connect("10.0.0.2", 0.0) is None  # another source has its own count
    assert adm.current == 3
    adm.disconnect("10.0.0.1")
    assert adm.connect("10.0.0.1", 0.0) is None
    assert adm.connect("10.0.0.1", 0.0) == "per_source"


def test_per_source_does_not_apply_to_unix_peers():
    adm = Admission(config(per_source=1, max_connections=5))
    assert [adm.connect(None, 0.0) for _ in range(5)] == [None] * 5
    assert adm.connect(None, 0.0) == "max_connections"


def test_refused_connections_take_no_slot():
    adm = Admission(config(only_from=["10.0.0.0/8"], max_connections=2, per_source=1))
    assert adm.connect("11.0.0.1", 0.0) == "access"
    assert adm.connect("10.0.0.1", 0.0) is None
    assert adm.connect("10.0.0.1", 0.0) == "per_source"
    assert adm.current == 1
    assert adm.connect("10.0.0.2", 0.0) is None
    assert adm.current == 2


def test_apply_keeps_open_counts():
    adm = Admission(config(max_connections=10, per_source=5))
    for _ in range(3):
        assert adm.connect("10.0.0.1", 0.0) is None
    adm.apply(config(max_connections=3, per_source=5))
    assert adm.connect("10.0.0.2", 0.0) == "max_connections"
    adm.apply(config(max_connections=10, per_source=3))
    assert adm.connect("10.0.0.1", 0.0) == "per_source"
    assert adm.connect("10.0.0.2", 0.0) is None
    adm.apply(config(only_from=["192.0.2.0/24"]))
    assert adm.connect("10.0.0.3", 0.0) == "access"


# --- token buckets ------------------------------------------------------------


def test_rate_burst_then_refusal_then_refill():
    rate, burst = 2.0, 3
    adm = Admission(config(rate=rate, burst=burst))
    t0 = 100.0
    # A full bucket: `burst` connections at once.
    assert [admit(adm, "10.0.0.1", t0) for _ in range(burst)] == [None] * burst
    assert admit(adm, "10.0.0.1", t0) == "rate"
    assert admit(adm, "10.0.0.2", t0) is None  # buckets are per client
    # 1/rate seconds later exactly one token is back.
    t1 = t0 + 1.0 / rate
    assert admit(adm, "10.0.0.1", t1) is None
    assert admit(adm, "10.0.0.1", t1) == "rate"
    # Not quite another token yet.
    assert admit(adm, "10.0.0.1", t1 + 0.4 / rate) == "rate"
    assert admit(adm, "10.0.0.1", t1 + 1.0 / rate) is None
    # A long pause refills to `burst`, never beyond.
    t2 = t1 + 1000.0
    assert [admit(adm, "10.0.0.1", t2) for _ in range(burst + 1)] == [None] * burst + ["rate"]


def test_rate_refusal_does_not_consume_slots():
    adm = Admission(config(rate=1.0, burst=1, per_source=1))
    assert adm.connect("10.0.0.1", 0.0) is None
    # per_source refuses before the bucket is touched: no token is spent.
    assert adm.connect("10.0.0.1", 0.0) == "per_source"
    adm.disconnect("10.0.0.1")
    assert adm.connect("10.0.0.1", 0.0) == "rate"
    assert adm.current == 0
    assert adm.connect("10.0.0.1", 1.0) is None


def test_rate_zero_means_no_limit():
    adm = Admission(config(rate=0.0, burst=1))
    assert [admit(adm, "10.0.0.1", 0.0) for _ in range(1000)] == [None] * 1000
    assert adm.buckets == 0


def test_rate_limits_datagrams():
    adm = Admission(config(rate=10.0, burst=5))
    assert [adm.datagram("10.0.0.1", 0.0) for _ in range(6)] == [None] * 5 + ["rate"]
    assert adm.datagram("10.0.0.1", 0.1) is None  # 10/s: one token per 0.1 s


def test_expire_drops_refilled_buckets_only():
    rate, burst = 1.0, 4
    adm = Admission(config(rate=rate, burst=burst))
    full = burst / rate  # time for an emptied bucket to refill completely
    for host, when in (("10.0.0.1", 0.0), ("10.0.0.2", 3.0), ("10.0.0.3", 5.0)):
        assert [admit(adm, host, when) for _ in range(burst)] == [None] * burst  # emptied
    assert adm.buckets == 3
    adm.expire(0.0 + full - 0.1)  # nobody has refilled yet
    assert adm.buckets == 3
    adm.expire(0.0 + full)  # 10.0.0.1 has refilled
    assert adm.buckets == 2
    adm.expire(5.0 + full)
    assert adm.buckets == 0


def test_expired_client_gets_a_full_bucket_again():
    adm = Admission(config(rate=1.0, burst=2))
    assert [admit(adm, "10.0.0.1", 0.0) for _ in range(3)] == [None, None, "rate"]
    adm.expire(10.0)
    assert adm.buckets == 0
    assert [admit(adm, "10.0.0.1", 10.0) for _ in range(3)] == [None, None, "rate"]


def test_bucket_table_is_bounded(monkeypatch):
    monkeypatch.setattr(admission_mod, "MAX_BUCKETS", 8)
    adm = Admission(config(rate=1.0, burst=1))
    seen = []
    for i in range(1000):
        # All at the same instant: no bucket has refilled, so the sweep
        # alone would free nothing.
        assert adm.datagram(f"10.0.{i // 256}.{i % 256}", 50.0) is None
        seen.append(adm.buckets)
    assert max(seen) <= 8
    assert adm.buckets >= 1
    # The newest client keeps its (empty) bucket ...
    assert adm.datagram("10.0.3.231", 50.0) == "rate"
    # ... while the oldest ones were dropped and start afresh.
    assert adm.datagram("10.0.0.0", 50.0) is None


def test_bucket_table_bound_prefers_dropping_refilled_buckets(monkeypatch):
    monkeypatch.setattr(admission_mod, "MAX_BUCKETS", 4)
    adm = Admission(config(rate=1.0, burst=1))
    for i in range(4):
        adm.datagram(f"10.0.0.{i}", float(i))  # buckets at t = 0, 1, 2, 3
    # At t = 3.5 only the t<=2.5 buckets have refilled (burst/rate = 1 s).
    assert adm.datagram("10.0.0.99", 3.5) is None
    assert adm.buckets == 2  # 10.0.0.3 kept, 10.0.0.99 added
    assert adm.datagram("10.0.0.3", 3.5) == "rate"


def test_ipv4_mapped_networks_in_the_rules_match_ipv4_peers():
    import ipaddress as _ip
    from types import SimpleNamespace as _NS

    from evd.proto.admission import ACCESS
    from evd.proto.admission import Admission as _Adm

    limits = _NS(max_connections=10, per_source=10, rate=0.0, burst=1, auth_ban=0.0)
    rule = _NS(
        only_from=(_ip.ip_network("::ffff:10.0.0.0/104"),),
        no_access=(),
        proxy_protocol=False,
        proxy_from=(),
        limits=limits,
    )
    adm = _Adm(rule)
    assert adm.connect("10.1.2.3", 0.0) is None
    assert adm.connect("::ffff:10.1.2.3", 0.0) is None
    assert adm.connect("11.0.0.1", 0.0) == ACCESS


# --- views (runtime control) and the public switches ----------------------------------


def test_sources_show_open_connections_and_tokens():
    adm = Admission(config(rate=2.0, burst=4, per_source=10))
    assert adm.sources(0.0) == []
    assert adm.connect("10.0.0.1", 0.0) is None
    assert adm.connect("10.0.0.1", 0.0) is None
    assert adm.datagram("10.0.0.2", 0.0) is None
    assert adm.connect(None, 0.0) is None  # a UNIX peer: no source
    views = {v.host: v for v in adm.sources(0.5)}
    assert set(views) == {"10.0.0.1", "10.0.0.2"}
    assert views["10.0.0.1"].connections == 2 and views["10.0.0.2"].connections == 0
    # Two tokens spent at t=0, one back after 0.5 s at 2/s.
    assert views["10.0.0.1"].tokens == pytest.approx(3.0)
    assert views["10.0.0.2"].tokens == pytest.approx(4.0)  # never above burst
    assert adm.tokens("192.0.2.9", 0.5) == 4.0  # no bucket yet: a full one
    adm.disconnect("10.0.0.1")
    adm.disconnect("10.0.0.1")
    adm.expire(100.0)
    assert adm.sources(100.0) == []


def test_sources_without_a_rate_have_no_tokens():
    adm = Admission(config(rate=0.0))
    assert adm.connect("10.0.0.1", 0.0) is None
    (view,) = adm.sources(0.0)
    assert view.tokens is None and adm.tokens("10.0.0.1", 0.0) is None
    assert adm.per_source("10.0.0.1") == 1 and adm.per_source("10.0.0.2") == 0


@pytest.mark.parametrize(
    "only_from, rate, checked",
    [((), 0.0, False), (("10.0.0.0/8",), 0.0, True), ((), 5.0, True)],
)
def test_checks_datagrams_only_when_something_applies(only_from, rate, checked):
    adm = Admission(config(only_from=only_from, rate=rate))
    assert adm.checks_datagrams is checked
    adm.apply(config(only_from=(), rate=0.0))
    assert adm.checks_datagrams is False


def test_access_verdicts_are_remembered_bounded_and_forgotten_on_reload(monkeypatch):
    """A UDP client asks per datagram: the verdict is parsed once per host,
    the table stays bounded, and a reload's new lists apply at once."""
    adm = Admission(config(only_from=["10.0.0.0/8"]))
    parsed = []

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def allowed(self, host):
            parsed.append(host)
            return self.inner.allowed(host)

    monkeypatch.setattr(adm, "_access", Counting(adm._access))
    assert [adm.datagram("10.1.2.3", 0.0) for _ in range(3)] == [None, None, None]
    assert adm.datagram("192.0.2.1", 0.0) == admission_mod.ACCESS
    assert parsed == ["10.1.2.3", "192.0.2.1"]
    monkeypatch.setattr(admission_mod, "MAX_VERDICTS", 2)
    adm.datagram("10.9.9.9", 0.0)
    assert len(adm._verdicts) <= 2
    adm.apply(config(only_from=["192.0.2.0/24"]))
    assert adm.datagram("192.0.2.1", 0.0) is None
    assert adm.datagram("10.1.2.3", 0.0) == admission_mod.ACCESS


def test_trusted_proxies():
    adm = Admission(config(proxy_from=("10.0.0.0/8", "::1")))
    assert adm.proxied
    assert adm.from_proxy("10.1.2.3") and adm.from_proxy("::ffff:10.1.2.3") and adm.from_proxy("::1")
    assert not adm.from_proxy("11.0.0.1") and not adm.from_proxy("127.0.0.1")
    assert adm.from_proxy(None)  # a UNIX peer: the socket file's mode decides
    adm.apply(config(proxy_from=("11.0.0.0/8",)))  # a reload forgets the old verdicts
    assert adm.from_proxy("11.0.0.1") and not adm.from_proxy("10.1.2.3")
    assert not Admission(config()).proxied
