"""SPEC section 12: the journal read back.  A real `evd run` logs to a real
systemd-journald (a namespace of its own); `evd logs summary|show` read
those journal files through the real journalctl, and the real
`fail2ban-regex` finds the failures in them with the shipped journal
filter."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.daemon import ROOT, WAIT, need
from support.failures import BANNING, SERVICES, dial, ipv6_loopback, refused, wrong_auth
from support.journald import Journald, real_journald

from evd.log.logger import Log
from evd.tools.logs.summary import CLOSE_AT_42

CONFIG = (
    """\
[daemon]
pidfile = "{tmp}/evd.pid"
shutdown_timeout = 2.0

[log]
level = "info"
format = "journal"
journal_socket = "{socket}"

"""
    + SERVICES
    + """
[services.daytime]
tcp = ["127.0.0.1:0"]
udp = []

[services.time]
enabled = false
[services.timefmt]
enabled = false
"""
)
FILTER = ROOT / "etc" / "fail2ban" / "filter.d" / "evd-journal.conf"
JAIL = ROOT / "etc" / "fail2ban" / "jail.d" / "evd-journal.conf"


def evd(*args: str, stdin: bytes | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "evd", *args],
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )


def daytime(address: str) -> None:
    refused(address)  # daytime answers and closes: one conn.close reason=eof


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Iterator[tuple[Journald, int]]:
    """A journal a real evd wrote: connections over IPv4 and IPv6, auth
    failures and a ban, refusals (access, max_connections), a failed and a
    good reload.  (the journald, evd's pid)"""
    if not ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    tmp = tmp_path_factory.mktemp("journal")
    (tmp / "key").write_bytes(b"the key")
    os.chmod(tmp / "key", 0o600)
    with real_journald() as journald:
        config = tmp / "evd.toml"
        text = CONFIG.format(tmp=tmp, socket=journald.socket)
        config.write_text(text)
        proc = subprocess.Popen(
            [sys.executable, "-m", "evd", "run", "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )
        try:
            pid = f"_PID={proc.pid}"
            journald.query("EVD_EVENT=daemon.ready", pid)
            opened = journald.query("EVD_EVENT=listener.open", pid, want=6)
            where = {(e["EVD_SERVICE"], e["EVD_ADDRESS"].startswith("[")): e["EVD_ADDRESS"] for e in opened}
            for _ in range(3):
                daytime(where["daytime", False])
            wrong_auth(where["framed", False], 3)  # three: closed and banned
            journald.query("EVD_EVENT=conn.close", "EVD_REASON=auth", pid)
            refused(where["framed", False])  # banned
            wrong_auth(where["framed", True], 2)
            refused(where["echo", False])  # not in only_from
            refused(where["echo", True])
            with socket.create_connection(dial(where["discard", False]), timeout=WAIT):
                journald.query("EVD_EVENT=conn.open", "EVD_SERVICE=discard", pid)
                refused(where["discard", False])  # full: max_connections, not the client's doing
                journald.query("EVD_EVENT=conn.reject", "EVD_REASON=max_connections", pid)
            deadline = time.monotonic() + WAIT  # a throttled refusal comes a second later
            while sum(int(e.get("EVD_COUNT", 1)) for e in journald.query("EVD_EVENT=conn.reject", pid)) < 4:
                assert time.monotonic() < deadline, "the refusals did not all reach the journal"
                time.sleep(0.05)
            journald.query("EVD_EVENT=auth.fail", pid, want=5)
            config.write_text(text + "\n[services.echo\n")  # a syntax error: the reload fails
            proc.send_signal(signal.SIGHUP)
            journald.query("EVD_EVENT=config.reload", pid)
            config.write_text(text)
            proc.send_signal(signal.SIGHUP)
            journald.query("EVD_EVENT=config.reload", pid, want=2)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(WAIT) == 0
            journald.query("EVD_EVENT=daemon.stop", pid)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            assert proc.stderr is not None
            proc.stderr.close()
        yield journald, proc.pid


def summary(*args: str, stdin: bytes | None = None) -> dict:
    done = evd("logs", "summary", "--json", "--top", "0", *args, stdin=stdin)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_summary_of_the_journal_is_the_summary_of_its_json_lines(written, tmp_path):
    journald, _ = written
    directory = str(journald.directory)
    from_journal = summary("-D", directory)
    shown = evd("logs", "show", "--json", "-D", directory)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    # show --json prints what evd would have written to a file: evd's own
    # spelling, so a summary of it takes the same fast path as a log file's
    closes = [line for line in lines if b'"conn.close"' in line]
    assert closes and all(line[42:83] == CLOSE_AT_42 for line in closes)
    (tmp_path / "evd.log").write_bytes(shown.stdout)
    from_file = summary(str(tmp_path / "evd.log"))
    assert from_file["lines"] == from_journal["lines"] == len(lines)
    assert from_journal == from_file
    # and it is what happened
    assert from_journal["services"]["daytime"]["connections"] >= 3
    assert from_journal["services"]["echo"]["rejected"] == {"access": 2}
    assert from_journal["services"]["discard"]["rejected"] == {"max_connections": 1}
    assert from_journal["reloads"] == {"ok": 1, "failed": 1}
    assert from_journal["starts"] == 1 and from_journal["stops"] == 1
    peers = {row["peer"]: row for row in from_journal["peers"]}
    assert peers["127.0.0.1"]["auth_failures"] == 3 and peers["::1"]["auth_failures"] == 2


def test_journalctl_json_lines_on_stdin_mix_with_evd_lines(written, tmp_path):
    journald, _ = written
    directory = str(journald.directory)
    raw = subprocess.run(
        ["journalctl", "-D", directory, "-o", "json", "--all"], capture_output=True, timeout=60
    )
    assert raw.returncode == 0
    entries = raw.stdout.splitlines()
    ours = [line for line in entries if b'"EVD_EVENT"' in line]
    evd_lines = evd("logs", "show", "--json", "-D", directory).stdout.splitlines()
    mixed = [line for pair in zip(entries, evd_lines, strict=False) for line in pair]
    mixed += entries[len(evd_lines) :] + evd_lines[len(entries) :]
    both = summary(stdin=b"\n".join(mixed) + b"\n")
    once = summary("-D", directory)
    assert both["lines"] == 2 * once["lines"] == len(ours) + len(evd_lines)
    assert both["skipped"] == len(entries) - len(ours)  # journald's own entries
    assert both["reloads"] == {"ok": 2, "failed": 2}
    assert both["services"]["daytime"]["connections"] == 2 * once["services"]["daytime"]["connections"]


def test_since_and_until_go_to_journalctl_and_select(written):
    journald, _ = written
    directory = str(journald.directory)
    later = summary("-D", directory, "--since", "2999-01-01")
    assert later["lines"] == 0 and later["first"] is None
    everything = summary("-D", directory)
    first, last = everything["first"], everything["last"]
    assert summary("-D", directory, "--until", first)["lines"] == 0  # half-open, as for files
    assert summary("-D", directory, "--since", first, "--until", last)["lines"] == everything["lines"] - 1


def test_a_unit_without_entries_is_an_empty_summary(written):
    journald, _ = written
    empty = summary("-D", str(journald.directory), "-u", "nothing-here.service")
    assert empty["lines"] == 0 and empty["services"] == {} and empty["skipped"] == 0


def test_journalctl_missing_or_failing_is_one_line_and_exit_1(tmp_path):
    bare = tmp_path / "bin"
    bare.mkdir()
    for verb in ("summary", "show"):
        missing = evd("logs", verb, "--journal", env=dict(os.environ, PATH=str(bare)))
        assert missing.returncode == 1 and missing.stdout == b""
        assert missing.stderr.decode().splitlines() == [
            "evd: journalctl: not found (the journal is read through it)"
        ]
        failing = evd("logs", verb, "-D", str(tmp_path / "no-such-directory"))
        assert failing.returncode == 1
        (line,) = failing.stderr.decode().splitlines()
        assert line.startswith("evd: journalctl failed (exit 1): ") and "no-such-directory" in line


def test_fail2ban_finds_the_clients_in_the_journal(written):
    """The real fail2ban-regex on the systemd backend, reading the journal
    evd wrote: IPv4, IPv6, a ban, and a refusal that must not match."""
    journald, pid = written
    fail2ban_regex = need("fail2ban-regex")
    entries = journald.query(f"_PID={pid}", want=10)
    expected = Counter(
        e["EVD_PEER"].rpartition(":")[0].strip("[]")
        for e in entries
        if e.get("EVD_EVENT") == "auth.fail"
        or (e.get("EVD_EVENT") == "conn.reject" and e["EVD_REASON"] in BANNING)
    )
    assert expected["127.0.0.1"] >= 5 and expected["::1"] >= 3
    assert any(e.get("EVD_REASON") == "max_connections" for e in entries)  # there, and not matched
    source = f"systemd-journal[journalpath={journald.directory}]"

    def run(*options: str) -> str:
        done = subprocess.run(
            [fail2ban_regex, "--verbose", *options, source, str(FILTER)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr + done.stdout
        return done.stdout

    # the shipped journalmatch reads evd.service's entries: this test's evd
    # ran outside systemd, so none
    assert "_SYSTEMD_UNIT=evd.service" in run() and re.search(r"^Lines: 0 lines", run(), re.M)
    out = run("--journalmatch", f"_PID={pid}")
    counted = re.search(r"^Lines: (\d+) lines, (\d+) ignored, (\d+) matched, (\d+) missed", out, re.M)
    assert counted, out
    assert int(counted[1]) == len(entries)
    assert int(counted[3]) == sum(expected.values())
    found = Counter(re.findall(r"^\|\s+(\S+)\s+\w{3} \w{3} \d\d \d\d:\d\d:\d\d \d{4}$", out, re.M))
    assert found == expected


def test_the_journal_jail_loads_in_fail2ban(tmp_path):
    client = need("fail2ban-client")
    if not Path("/etc/fail2ban/jail.conf").exists():
        pytest.skip("fail2ban's own configuration (/etc/fail2ban) is not installed")
    conf = tmp_path / "fail2ban"
    shutil.copytree("/etc/fail2ban", conf)
    for dropin in (conf / "jail.d").glob("*"):
        dropin.unlink()
    shutil.copy(FILTER, conf / "filter.d" / "evd-journal.conf")
    shutil.copy(JAIL, conf / "jail.d" / "evd-journal.conf")
    test = subprocess.run([client, "--conf", str(conf), "-t"], capture_output=True, text=True, timeout=60)
    assert test.returncode == 0, test.stdout + test.stderr
    dump = subprocess.run([client, "--conf", str(conf), "-d"], capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0, dump.stderr
    assert "['add', 'evd-journal', 'systemd']" in dump.stdout
    assert dump.stdout.count("['set', 'evd-journal', 'addjournalmatch', '_SYSTEMD_UNIT=evd.service']") == 1


def test_same_events_same_summary_from_a_json_file_and_the_journal(tmp_path):
    """One set of events, logged by evd's own log to a JSON file and to a
    real journald: the same summary, apart from lines/skipped -- and the
    first/last times, which the journal takes from its own clock (SPEC 12:
    timestamp from __REALTIME_TIMESTAMP), a moment after evd's."""
    with real_journald() as journald:
        to_file, to_journal = Log(), Log()
        to_file.configure("info", "json", str(tmp_path / "evd.log"))
        to_journal.configure("info", "journal", journal_socket=str(journald.socket))
        started = time.time()
        for log in (to_file, to_journal):
            for conn, (peer, reason) in enumerate(
                [
                    ("10.0.0.1:5", "eof"),
                    ("[2001:db8::1]:6", "idle"),
                    ("unix", "eof"),
                    ("10.0.0.1:7", "killed"),
                ]
            ):
                log.info("conn.open", service="echo", peer=peer, conn=conn)
                log.info(
                    "conn.close", service="echo", peer=peer, conn=conn, duration_ms=1.5 * conn,
                    bytes_in=conn, bytes_out=2 * conn, reason=reason,
                )  # fmt: skip
            log.warning("conn.reject", service="echo", peer="10.0.0.2:9", reason="rate", count=4)
            log.info("command.end", name="greet", argv=["echo", "hi"], command_pid=5, exit=0, signal=None,
                     timed_out=False, truncated=True, duration_ms=3.25, key="ops")  # fmt: skip
            log.error("config.reload", ok=False, error="bad", added=[], removed=[], changed=[])
            log.error("error", where="echo.read", exc_info="Traceback\n  boom")
        to_file.sink.close()
        journald.query("EVD_EVENT=error", f"_PID={os.getpid()}")
        from_file = summary(str(tmp_path / "evd.log"))
        from_journal = summary("-D", str(journald.directory))
    for key in ("lines", "skipped", "first", "last"):
        from_file.pop(key), from_journal.pop(key)
    assert from_journal == from_file
    assert from_file["services"]["echo"]["connections"] == 4
    assert started > 0


def test_show_follow_prints_new_entries_as_they_come(tmp_path):
    with real_journald() as journald:
        log = Log()
        log.configure("info", "journal", journal_socket=str(journald.socket))
        log.info("conn.open", service="echo", peer="127.0.0.1:1", conn=1)
        journald.query("EVD_EVENT=conn.open", f"_PID={os.getpid()}")
        reader = subprocess.Popen(
            [sys.executable, "-m", "evd", "logs", "show", "-f", "--json", "-D", str(journald.directory)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
        )
        try:
            assert reader.stdout is not None
            first = json.loads(read_line(reader.stdout))
            assert first["event"] == "conn.open" and first["conn"] == 1
            log.info("conn.close", service="echo", peer="127.0.0.1:1", conn=1, duration_ms=1.0, bytes_in=0,
                     bytes_out=0, reason="eof")  # fmt: skip
            second = json.loads(read_line(reader.stdout))
            assert second["event"] == "conn.close" and second["reason"] == "eof"
        finally:
            reader.send_signal(signal.SIGINT)
            try:
                reader.wait(WAIT)
            except subprocess.TimeoutExpired:
                reader.kill()
                reader.wait()
            for stream in (reader.stdout, reader.stderr):
                if stream:
                    stream.close()
        log.sink.close()


def read_line(stream) -> bytes:
    """One line of a child's output, waiting at most WAIT."""
    deadline = time.monotonic() + WAIT
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        assert left > 0, f"no line within {WAIT}s: {line!r}"
        ready, _, _ = select.select([stream], [], [], left)
        if ready:
            byte = os.read(stream.fileno(), 1)
            assert byte, "the reader ended"
            line += byte
    return line


def test_without_file_the_configuration_says_where_the_log_is(tmp_path):
    """No FILE and nothing piped in: the journal for format = "journal"
    (through journalctl -u evd.service), the log.file for a file; anything
    piped in is read whatever the configuration says.  (journalctl here is a
    stand-in that notes how it was called: the system journal is not this
    test's to fill.)"""
    entry = {
        "__REALTIME_TIMESTAMP": "1796610208611495",
        "PRIORITY": "6",
        "_PID": "7",
        "EVD_EVENT": "daemon.start",
    }
    fake = tmp_path / "bin" / "journalctl"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/argv\necho '{json.dumps(entry)}'\n")
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake.parent}:{os.environ['PATH']}")
    config = tmp_path / "evd.toml"
    config.write_text('[log]\nformat = "journal"\n')
    done = evd("logs", "summary", "--json", "-c", str(config), "--since", "2026-01-01", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["starts"] == 1
    argv = (tmp_path / "argv").read_text().split()
    assert argv[argv.index("--unit") + 1] == "evd.service"
    assert " ".join(argv[argv.index("--since") + 1 :][:3]) == "2026-01-01 00:00:00.000000 UTC"
    piped = evd("logs", "summary", "--json", "-c", str(config), stdin=b"", env=env)
    assert json.loads(piped.stdout)["starts"] == 0  # stdin, not the journal
    log = tmp_path / "evd.log"
    log.write_text(LINE_START + "\n")
    config.write_text(f'[log]\nformat = "json"\nfile = "{log}"\n')
    from_file = evd("logs", "show", "--json", "-c", str(config), env=env)
    assert from_file.returncode == 0 and from_file.stdout.decode() == LINE_START + "\n"


LINE_START = (
    '{"timestamp": "2026-12-07T02:23:28.611495Z", "level": "info", "event": "daemon.start", "pid": 7}'
)
