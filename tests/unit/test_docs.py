"""The README stays a quick start whose figures come from one place.

The performance page (docs/performance/index.md) holds the benchmark's
tables; the README's summary is derived from them, row by row, so a new
measurement is typed once, into the page, and this test shows the summary
to paste when they disagree.  CI reads the test command from the README, so
its marker and its single line are checked too.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PERFORMANCE = ROOT / "docs" / "performance" / "index.md"

# README row -> the load's name in the performance table.
LOADS = {
    "TCP ping-pong 50 × 64 B": "TCP ping-pong 50 × 64 B",
    "TCP ping-pong 50 × 1 KiB": "TCP ping-pong 50 × 1 KiB",
    "connect/echo/close, 20 in flight": "connect/echo/close, 20 in flight (evd: log warning)",
    "UDP ping-pong 20 × 64 B": "UDP ping-pong 20 × 64 B",
    "TLS echo 50 × 64 B": "TLS echo 50 × 64 B",
}
SERVERS = ("evd", "asyncio", "uvloop", "minimal")
IDLE = "10,000 idle connections (KiB/conn)"
START, END = "<!-- performance-summary -->", "<!-- /performance-summary -->"


def rows(text: str) -> list[list[str]]:
    return [
        [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("|")
    ]


def summary() -> str:
    """The README's table, from the performance page's."""
    table = rows(PERFORMANCE.read_text())
    cpu = {(r[0], r[1]): r[5] for r in table if len(r) == 11}  # load, server -> CPU µs/req
    idle = {r[0]: r[1] for r in table if len(r) == 5}  # server -> RSS KiB/conn
    lines = ["| load | evd µs/req | asyncio | uvloop | minimal loop |", "|---|--:|--:|--:|--:|"]
    for shown, load in LOADS.items():
        lines.append(f"| {shown} | " + " | ".join(cpu.get((load, s), "–") for s in SERVERS) + " |")
    lines.append(f"| {IDLE} | " + " | ".join(idle.get(s, "–") for s in SERVERS) + " |")
    return "\n".join(lines)


def test_the_readme_summary_is_the_performance_pages_figures() -> None:
    text = README.read_text()
    assert START in text and END in text
    shown = text.split(START, 1)[1].split(END, 1)[0].strip()
    expected = summary()
    assert expected.count("–") <= 1, f"a load or server left the performance page:\n{expected}"
    assert shown == expected, f"README.md's summary should read:\n{expected}"


def test_the_readme_is_a_quick_start_with_cis_test_command() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, "README.md is the quick start: the manual is docs/"
    marker = lines.index("<!-- test-command -->")
    assert lines[marker + 1] == "```sh" and lines[marker + 3] == "```"
    assert re.search(r"python -m pytest", lines[marker + 2])
