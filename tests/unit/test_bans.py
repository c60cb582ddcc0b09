"""The ban table of evd/proto/admission.py (`auth_ban`, SPEC section 10):
pure bookkeeping driven with an explicit `now`, on real configuration
objects."""

from __future__ import annotations

import ipaddress

from evd.config.model import Limits, ServiceConfig
from evd.proto import admission
from evd.proto.admission import BANNED, Admission


def framed(auth_ban: float = 60.0, **service) -> ServiceConfig:
    limits = Limits(rate=0.0, auth_ban=auth_ban)
    return ServiceConfig(name="framed", enabled=True, limits=limits, **service)


def admit(adm: Admission, host: str | None, now: float) -> str | None:
    reason = adm.connect(host, now)
    if reason is None:
        adm.disconnect(host)
    return reason


def test_a_banned_address_is_refused_for_auth_ban_seconds_then_admitted():
    adm = Admission(framed(auth_ban=60.0))
    assert adm.ban("192.0.2.1", 100.0) is True
    assert admit(adm, "192.0.2.1", 100.0) == BANNED
    assert admit(adm, "192.0.2.1", 159.9) == BANNED
    assert admit(adm, "192.0.2.2", 120.0) is None  # only that address
    assert adm.banned_for("192.0.2.1", 130.0) == 30.0
    assert admit(adm, "192.0.2.1", 160.0) is None  # over: and forgotten at once
    assert adm.bans == 0 and adm.banned_for("192.0.2.1", 160.0) == 0.0


def test_a_refused_connection_takes_no_slot():
    adm = Admission(framed())
    adm.ban("192.0.2.1", 0.0)
    assert adm.connect("192.0.2.1", 1.0) == BANNED
    assert adm.current == 0


def test_the_sweep_drops_bans_that_ran_out():
    adm = Admission(framed(auth_ban=10.0))
    adm.ban("192.0.2.1", 0.0)
    adm.ban("192.0.2.2", 5.0)
    adm.expire(12.0)
    assert adm.bans == 1 and adm.banned_for("192.0.2.2", 12.0) == 3.0
    adm.expire(15.0)
    assert adm.bans == 0


def test_a_new_failure_extends_the_ban():
    adm = Admission(framed(auth_ban=10.0))
    adm.ban("192.0.2.1", 0.0)
    adm.ban("192.0.2.1", 8.0)
    assert admit(adm, "192.0.2.1", 12.0) == BANNED
    assert admit(adm, "192.0.2.1", 18.0) is None


def test_the_table_is_bounded_and_gives_up_the_oldest(monkeypatch):
    monkeypatch.setattr(admission, "MAX_BANS", 4)
    adm = Admission(framed())
    for i in range(10):
        adm.ban(f"192.0.2.{i}", float(i))
        assert adm.bans <= 4
    assert [admit(adm, f"192.0.2.{i}", 10.0) for i in range(10)] == [None] * 6 + [BANNED] * 4


def test_a_full_table_first_sweeps_bans_that_ran_out(monkeypatch):
    monkeypatch.setattr(admission, "MAX_BANS", 2)
    adm = Admission(framed(auth_ban=10.0))
    adm.ban("192.0.2.1", 0.0)  # ends at 10
    adm.ban("192.0.2.2", 5.0)  # ends at 15
    adm.ban("192.0.2.3", 11.0)  # the first has run out: it goes, not the second
    assert admit(adm, "192.0.2.2", 12.0) == BANNED and admit(adm, "192.0.2.3", 12.0) == BANNED


def test_auth_ban_zero_bans_nobody_and_a_reload_to_zero_lifts_bans():
    off = Admission(framed(auth_ban=0.0))
    assert off.ban("192.0.2.1", 0.0) is False
    assert admit(off, "192.0.2.1", 0.0) is None
    on = Admission(framed(auth_ban=60.0))
    on.ban("192.0.2.1", 0.0)
    on.apply(framed(auth_ban=0.0))
    assert admit(on, "192.0.2.1", 1.0) is None and on.bans == 0


def test_a_reload_keeps_bans_in_force():
    adm = Admission(framed(auth_ban=60.0))
    adm.ban("192.0.2.1", 0.0)
    adm.apply(framed(auth_ban=30.0))
    assert admit(adm, "192.0.2.1", 10.0) == BANNED


def test_unix_peers_have_no_address_to_ban():
    adm = Admission(framed())
    assert adm.ban(None, 0.0) is False
    assert admit(adm, None, 0.0) is None


def test_the_access_lists_still_come_first():
    adm = Admission(framed(only_from=(ipaddress.ip_network("10.0.0.0/8"),)))
    adm.ban("192.0.2.1", 0.0)
    assert admit(adm, "192.0.2.1", 1.0) == admission.ACCESS
