"""How long starting one command holds the loop, per parent-death-signal
mode (evd/system/children.py), at a given daemon size.

    python3 bench/command_spawn.py [--heap-mib 0 30 200] [--runs 300]

`Runner.start` returns once the child has exec'd (subprocess waits for
that): that time is a stall of the whole loop.  Modes: `none` (vfork, no
parent-death signal), `setpriv` (vfork, then setpriv execs the command),
`prctl` (a preexec_fn: fork, whose cost grows with the daemon's memory).
The heap is filled with touched pages, as a daemon's would be.  Runs of
each mode are interleaved; medians and 90th percentiles in microseconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evd.commands.runner import ENV, Runner
from evd.log.logger import log
from evd.loop.reactor import Reactor
from evd.system import children


class Loop:
    """A reactor run until the current command has answered."""

    def __init__(self) -> None:
        self.reactor = Reactor()
        self.answers: list[object] = []
        self.reactor.add_before_sleep(self._check)

    def _check(self) -> None:
        if self.answers:
            self.reactor.stop()

    def wait(self) -> None:
        guard = self.reactor.call_later(10.0, self.reactor.stop)
        self.reactor.run()
        self.reactor.cancel(guard)
        if not self.answers:
            raise SystemExit("a command did not answer within 10 s")
        self.answers.clear()


def measure(heap_mib: int, runs: int) -> None:
    log.configure("warning", "json")  # command.start/end lines are not the question
    ballast = [bytes(1024) for _ in range(heap_mib * 1024)]
    modes = {"none": children.NONE, "prctl": children.prctl_preexec(), "setpriv": children.setpriv(ENV)}
    config = SimpleNamespace(timeout=10.0, max_output=1 << 16, max_concurrent=1)
    loops = {mode: Loop() for mode, found in modes.items() if found is not None}
    runners = {mode: Runner(loop.reactor, config, {}, deathsig=modes[mode]) for mode, loop in loops.items()}
    times: dict[str, list[float]] = {mode: [] for mode in runners}
    for i in range(runs + 10):
        for mode, runner in runners.items():
            loop = loops[mode]
            t0 = time.perf_counter()
            runner.start("true", ["true"], b"", loop.answers.append)
            elapsed = time.perf_counter() - t0
            loop.wait()
            if i >= 10:  # the first ten warm up
                times[mode].append(elapsed)
    rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20
    print(f"heap {heap_mib} MiB, RSS {rss} MiB, {runs} runs each")
    for mode, values in times.items():
        values.sort()
        p90 = values[int(len(values) * 0.9)]
        print(f"  {mode:8s} median {statistics.median(values) * 1e6:7.0f} us   p90 {p90 * 1e6:7.0f} us")
    del ballast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heap-mib", type=int, nargs="+", default=[0, 30, 200])
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args()
    if len(args.heap_mib) == 1:
        measure(args.heap_mib[0], args.runs)
        return
    for heap in args.heap_mib:
        # A fresh process per size: one heap must not weigh on the next.
        subprocess.run(
            [sys.executable, __file__, "--heap-mib", str(heap), "--runs", str(args.runs)], check=True
        )


if __name__ == "__main__":
    main()
