"""What starting one program costs, by the ways evd can start it
(evd/commands/child.py): CPU of this process and its children per start,
and wall time until the child is reaped.

    .venv/bin/python bench/spawn_cost.py [--runs 300] [--rounds 2]

Ways: `popen` (subprocess: vfork, Python-level set-up, a descriptor sweep),
`popen+setpriv` (the commands' parent-death signal: a second exec),
`posix_spawn` (what program services use when they can).  The program is
/bin/true with stderr a pipe, in its own session, as evd starts them.
Rounds interleave the ways; each line is one round.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable

ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
PROGRAM = "/bin/true"


def cpu() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def popen(prefix: list[str]) -> None:
    proc = subprocess.Popen(
        [*prefix, PROGRAM],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd="/",
        env=ENV,
        close_fds=True,
        start_new_session=True,
    )
    assert proc.stderr is not None
    proc.stderr.close()
    proc.wait()


def posix_spawn(prefix: list[str]) -> None:
    r, w = os.pipe()
    pid = os.posix_spawn(PROGRAM, [PROGRAM], ENV, file_actions=[(os.POSIX_SPAWN_DUP2, w, 2)], setsid=True)
    os.close(w)
    os.close(r)
    os.waitpid(pid, 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    setpriv = shutil.which("setpriv")
    ways: dict[str, tuple[Callable[[list[str]], None], list[str]]] = {
        "popen": (popen, []),
        "posix_spawn": (posix_spawn, []),
    }
    if setpriv:
        ways["popen+setpriv"] = (popen, [setpriv, "--pdeathsig", "KILL", "--"])
    print("| round | way | CPU µs/start | wall µs/start |")
    print("|---|---|---|---|")
    for n in range(1, args.rounds + 1):
        for name, (start, prefix) in ways.items():
            c, t = cpu(), time.perf_counter()
            for _ in range(args.runs):
                start(prefix)
            per_cpu = (cpu() - c) / args.runs * 1e6
            per_wall = (time.perf_counter() - t) / args.runs * 1e6
            print(f"| {n} | {name} | {per_cpu:.0f} | {per_wall:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
