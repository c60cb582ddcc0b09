"""`evd logs summary --journal` against `journalctl -o json > /dev/null`, on
the same journal file, side by side.

    .venv/bin/python bench/journal.py                      # 1,000,000 entries, 3 rounds
    .venv/bin/python bench/journal.py --entries 100000 --rounds 1   # a smoke run

Makes a journal of `--entries` entries as evd sends them (the events of
bench/logs.py's generator, each encoded by evd/log/journal.py, plus the
fields journald adds: time, pid, boot id, hostname, transport, ...) with
systemd-journal-remote, which writes journal files from journald's export
format without journald's rate limit (and rotates them at its size limit:
a directory of files, as a machine's journal is), once per `--dir` (kept).
Then, round after round, interleaved (the machine is shared, so each sees
the same load):

- `journalctl -D DIR -o json --all > /dev/null`: what reading the journal
  costs, the floor an operator's pipeline pays;
- `evd logs summary --json -D DIR`: its total CPU (evd and its journalctl
  child) and wall time;
- evd's own CPU: `evd logs summary --json < OUT`, where OUT is what evd's
  journalctl child prints (`journalctl ... --output-fields=...`), kept once.

The claim (issue 19): evd's own CPU is below journalctl's own on the same
read, so `summary --journal` is limited by journalctl.  Not part of the
test suite.
"""

from __future__ import annotations

import argparse
import calendar
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from logs import Generator  # noqa: E402  (bench/logs.py: the same events as the file benchmark)

from evd.log import journal  # noqa: E402
from evd.tools.logs import journalctl  # noqa: E402

REMOTE = "/lib/systemd/systemd-journal-remote"
BOOT = "0123456789abcdef0123456789abcdef"
MACHINE = "fedcba9876543210fedcba9876543210"
# What journald adds to every entry of a service (abridged from a real one).
TRUSTED = (
    f"_BOOT_ID={BOOT}\n_MACHINE_ID={MACHINE}\n_HOSTNAME=vm\n_TRANSPORT=journal\n_UID=61234\n_GID=61234\n"
    "_COMM=evd\n_EXE=/usr/bin/python3.11\n"
    "_CMDLINE=/usr/bin/python3 /usr/local/bin/evd run --log-format journal\n"
    "_CAP_EFFECTIVE=400\n_SYSTEMD_CGROUP=/system.slice/evd.service\n_SYSTEMD_UNIT=evd.service\n"
    "_SYSTEMD_SLICE=system.slice\n_SYSTEMD_INVOCATION_ID=0123456789abcdef0123456789abcdef\n"
).encode()


def export_entries(count: int):
    """Entries in journald's export format, evd's fields as evd sends them."""
    pid = 4242
    seconds: dict[str, int] = {}
    for n, line in enumerate(Generator().lines(count)):
        event = orjson.loads(line)
        stamp = event["timestamp"]
        second = seconds.get(stamp[:19])
        if second is None:
            second = seconds[stamp[:19]] = calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S"))
        micros = second * 1_000_000 + (int(stamp[20:26]) if stamp[19] == "." else 0)
        head = f"__REALTIME_TIMESTAMP={micros}\n__MONOTONIC_TIMESTAMP={n + 1_000_000}\n_PID={pid}\n".encode()
        yield head + TRUSTED + journal.entry(event) + b"\n"


def make(folder: Path, count: int) -> None:
    if not Path(REMOTE).exists():
        sys.exit(f"{REMOTE} is needed to write the journal (Debian: systemd-journal-remote)")
    tmp = folder.with_name(folder.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    proc = subprocess.Popen(
        [REMOTE, f"--output={tmp}/evd.journal", "-"], stdin=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert proc.stdin is not None
    batch: list[bytes] = []
    for entry in export_entries(count):
        batch.append(entry)
        if len(batch) == 5000:
            proc.stdin.write(b"".join(batch))
            batch.clear()
    proc.stdin.write(b"".join(batch))
    proc.stdin.close()
    if proc.wait() != 0:
        sys.exit("systemd-journal-remote failed")
    tmp.rename(folder)


def timed(command: list[str], stdin: Path | None = None, stdout: Path | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command and its children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with open(stdin or os.devnull, "rb") as source, open(stdout or os.devnull, "wb") as sink:
        subprocess.run(command, stdin=source, stdout=sink, check=True, cwd=ROOT)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="the journal's directory (made if missing)")
    args = parser.parse_args()
    path = args.dir or Path(f"/tmp/evd-journal-{args.entries}")
    if not path.exists():
        started = time.perf_counter()
        make(path, args.entries)
        size = sum(f.stat().st_size for f in path.iterdir()) >> 20
        print(f"wrote {path} ({size} MiB) in {time.perf_counter() - started:.1f} s", flush=True)
    evd = [sys.executable, "-m", "evd"]
    reader = shutil.which("journalctl") or "journalctl"
    child = journalctl.argv(journalctl.Journal(directory=str(path)), fields=journalctl.SUMMARY_FIELDS)
    child[0] = reader
    out = path.with_name(path.name + ".summary-fields.json")
    timed(child, stdout=out)  # what evd's journalctl child prints, once
    runs: dict[str, list[tuple[float, float]]] = {
        k: [] for k in ("journalctl", "child", "evd_total", "evd_own")
    }
    for _ in range(args.rounds):
        runs["journalctl"].append(timed([reader, "-D", str(path), "-o", "json", "--all"]))
        runs["child"].append(timed(child))
        runs["evd_total"].append(timed([*evd, "logs", "summary", "--json", "-D", str(path)]))
        runs["evd_own"].append(timed([*evd, "logs", "summary", "--json"], stdin=out))
    med = {
        k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in runs.items()
    }
    print(f"{args.entries:,} entries, {args.rounds} interleaved rounds, medians (wall s / CPU s):")
    labels = {
        "journalctl": "journalctl -o json --all > /dev/null",
        "child": "journalctl as evd runs it (--output-fields) > /dev/null",
        "evd_total": "evd logs summary -D (evd + its journalctl)",
        "evd_own": "evd logs summary < that journalctl output (evd alone)",
    }
    for key, label in labels.items():
        wall, cpu = med[key]
        print(f"  {label:58s} {wall:7.2f} s  {cpu:7.2f} s CPU")
    ratio = med["evd_own"][1] / med["journalctl"][1]
    print(f"evd's own CPU / journalctl -o json CPU: {ratio:.2f}  (below 1: journalctl is the limit)")


if __name__ == "__main__":
    main()
