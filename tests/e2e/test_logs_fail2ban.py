"""etc/fail2ban: the filter finds the client IP (IPv4 and IPv6) in the
`auth.fail` and `conn.reject` lines a real `evd run` wrote, as the real
`fail2ban-regex` reads them, and the jail loads in a real fail2ban
configuration."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from support.daemon import ROOT, WAIT, LogFile, need, services_off
from support.failures import BANNING, SERVICES, dial, ipv6_loopback, refused, wrong_auth

FILTER = ROOT / "etc" / "fail2ban" / "filter.d" / "evd.conf"
JAIL = ROOT / "etc" / "fail2ban" / "jail.d" / "evd.conf"
CONFIG = (
    """\
[daemon]
pidfile = "{tmp}/evd.pid"

[log]
level = "info"
format = "json"
file = "{tmp}/evd.log"

"""
    + SERVICES
)
CONFIG += services_off("daytime", "time", "timefmt")


def listeners(log: LogFile, service: str) -> list[str]:
    return [e["address"] for e in log.find("listener.open", service=service, proto="tcp")]


@pytest.fixture
def failures_log(start_evd, tmp_path) -> Path:
    """A log with auth failures and refusals from 127.0.0.1 and ::1."""
    if not ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    (tmp_path / "key").write_bytes(b"the key")
    os.chmod(tmp_path / "key", 0o600)
    evd = start_evd(CONFIG, wait_ready=False)
    log = LogFile(tmp_path / "evd.log")
    log.wait_for("daemon.ready")
    framed_v4, framed_v6 = listeners(log, "framed")
    echo_v4, echo_v6 = listeners(log, "echo")
    wrong_auth(framed_v4, 3)  # three: evd closes the connection and bans the address
    log.wait_for("conn.close", service="framed", reason="auth")
    refused(framed_v4)  # banned for auth_ban seconds: accepted and closed at once
    wrong_auth(framed_v6, 2)
    refused(echo_v4)  # not in only_from
    refused(echo_v6)
    # discard is full with one connection: the next is refused, and the
    # filter must leave that one alone (the service was full, the client
    # did nothing wrong)
    discard = listeners(log, "discard")[0]
    with socket.create_connection(dial(discard), timeout=WAIT):
        log.wait_for("conn.open", service="discard")
        refused(discard)
        log.wait_for("conn.reject", reason="max_connections")
    deadline = time.monotonic() + WAIT
    while sum(e.get("count", 1) for e in log.find("conn.reject")) < 4 or len(log.find("auth.fail")) < 5:
        assert time.monotonic() < deadline, "the refusals did not all reach the log"
        time.sleep(0.05)
    assert evd.stop() == 0
    return tmp_path / "evd.log"


@pytest.mark.no_workers_variant(
    "the fixture expects one listener.open per address, workers log their own too"
)
def test_filter_finds_the_client_ips(failures_log):
    fail2ban_regex = need("fail2ban-regex")
    events = [json.loads(line) for line in failures_log.read_text().splitlines()]
    # what the filter should match, from the log itself: one per line
    expected = Counter(
        e["peer"].rpartition(":")[0].strip("[]")
        for e in events
        if e["event"] == "auth.fail" or (e["event"] == "conn.reject" and e["reason"] in BANNING)
    )
    # 127.0.0.1: auth 3, banned 1, refused 1; ::1: auth 2, refused 1
    assert expected["127.0.0.1"] >= 5 and expected["::1"] >= 3
    assert any(e["event"] == "conn.reject" and e["reason"] == "banned" for e in events)
    assert any(e["event"] == "conn.reject" and e["reason"] == "max_connections" for e in events)
    out = subprocess.run(
        [fail2ban_regex, "--verbose", str(failures_log), str(FILTER)],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, TZ="Asia/Tokyo"),  # evd logs UTC; the filter must say so
    )
    assert out.returncode == 0, out.stderr + out.stdout
    summary = re.search(r"^Lines: (\d+) lines, (\d+) ignored, (\d+) matched, (\d+) missed", out.stdout, re.M)
    assert summary, out.stdout
    assert int(summary[1]) == len(events)
    assert int(summary[3]) == sum(expected.values())
    # each match is listed as "|      IP  Day Mon DD HH:MM:SS YYYY", in local time
    found = Counter(re.findall(r"^\|\s+(\S+)\s+\w{3} \w{3} \d\d \d\d:\d\d:\d\d \d{4}$", out.stdout, re.M))
    assert found == expected
    first = next(e for e in events if e["event"] == "auth.fail")
    assert time.strftime("%H:%M:%S", _tokyo(first["timestamp"])) in out.stdout


def _tokyo(timestamp: str) -> time.struct_time:
    from datetime import datetime, timedelta, timezone

    moment = datetime.fromisoformat(timestamp).astimezone(timezone(timedelta(hours=9)))
    return moment.timetuple()


@pytest.mark.no_workers_variant(
    "the fixture expects one listener.open per address, workers log their own too"
)
def test_jail_loads_in_fail2ban(failures_log, tmp_path):
    client = need("fail2ban-client")
    if not Path("/etc/fail2ban/jail.conf").exists():
        pytest.skip("fail2ban's own configuration (/etc/fail2ban) is not installed")
    conf = tmp_path / "fail2ban"
    shutil.copytree("/etc/fail2ban", conf)
    for dropin in (conf / "jail.d").glob("*"):
        dropin.unlink()  # the distribution's jails (sshd) watch logs this test has nothing to do with
    shutil.copy(FILTER, conf / "filter.d" / "evd.conf")
    jail = JAIL.read_text().replace("/var/log/evd/evd.log", str(failures_log))
    (conf / "jail.d" / "evd.conf").write_text(jail)
    test = subprocess.run([client, "--conf", str(conf), "-t"], capture_output=True, text=True, timeout=60)
    assert test.returncode == 0, test.stdout + test.stderr
    dump = subprocess.run([client, "--conf", str(conf), "-d"], capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0, dump.stderr
    assert "['add', 'evd', 'auto']" in dump.stdout
    assert f"['set', 'evd', 'addlogpath', '{failures_log}', 'head']" in dump.stdout
    assert "auth\\\\.fail" in dump.stdout and "['set', 'evd', 'maxretry', 5]" in dump.stdout
