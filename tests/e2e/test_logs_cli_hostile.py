"""`evd logs` as an operator runs it on hostile logs and careless options
(issue 23, items 4 and 8): no traceback, ever; a bad option is a usage
error (exit 2) with one error line; a bad line is skipped and counted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support.daemon import ROOT, WAIT

TS = "2026-03-01T10:00:00.000000Z"


def evd_logs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "evd", "logs", *args],
        capture_output=True,
        text=True,
        timeout=3 * WAIT,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )


def line(event: str, ts: str = TS, **fields) -> str:
    return json.dumps({"timestamp": ts, "level": "info", "event": event, "pid": 7, **fields})


@pytest.fixture
def hostile_log(tmp_path):
    path = tmp_path / "hostile.log"
    close = {"service": "echo", "conn": 1, "duration_ms": 1.0, "bytes_in": 1, "bytes_out": 1, "reason": "eof"}
    rows = [
        line("daemon.start"),
        line("conn.close", peer=":5", **close),  # IndexError before
        line("daemon.start", "9999-12-31T23:59:59-23:59"),  # OverflowError before
        line("daemon.start", "2026-03-01T10:00:00.aaaaaaZ"),  # taken as a timestamp before
        line("conn.close", peer="192.0.2.1:7", **close),
    ]
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("verb", ["summary", "show"])
def test_bad_lines_are_skipped(hostile_log, verb):
    out = evd_logs(verb, "--json", str(hostile_log))
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    if verb == "summary":
        result = json.loads(out.stdout)
        assert (result["lines"], result["skipped"]) == (2, 3)
        assert [p["peer"] for p in result["peers"]] == ["192.0.2.1"]
    else:
        assert len(out.stdout.splitlines()) == 3  # show has no use for the peer unless asked
        assert "2 lines were not evd events" in out.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("summary", "--since", "99999999999d"),
        ("show", "--until", "9999-12-31T23:59:59-23:59"),
        ("show", "--peer", "not-an-ip"),
        ("summary", "--since", "2026-13-01"),
    ],
)
def test_bad_options_exit_2_with_one_error_line(hostile_log, args):
    out = evd_logs(*args, str(hostile_log))
    assert out.returncode == 2, out.stderr
    errors = [row for row in out.stderr.splitlines() if "error:" in row]
    assert len(errors) == 1 and args[1] in errors[0], out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
