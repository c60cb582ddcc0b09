"""The server, seen from /proc: its CPU time, its memory, its process tree,
and the busy time of the core it is pinned to.

`evd bench --server-pid` samples these at both ends of the measured window;
bench (the benchmark and the attacks) uses the same functions, so
every published figure is read one way.  A process that exits between two
reads simply stops counting: these are measurements, not bookkeeping.
"""

from __future__ import annotations

import os

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """pid and its live descendants (a supervisor and its workers)."""
    pids, i = [pid], 0
    while i < len(pids):
        try:
            with open(f"/proc/{pids[i]}/task/{pids[i]}/children") as f:
                pids.extend(int(p) for p in f.read().split())
        except OSError:
            pass
        i += 1
    return pids


def _cpu_of(pid: int) -> int:
    """utime + stime of one process, in clock ticks (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # After the last ")": the command name may hold spaces and parens.
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def process_cpu(pid: int, tree: bool = True) -> float:
    """utime + stime of pid (and, with `tree`, its live descendants), in seconds."""
    pids = process_tree(pid) if tree else [pid]
    return sum(_cpu_of(p) for p in pids) / _CLK_TCK


def _rss_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def process_rss_kb(pid: int, tree: bool = True) -> int:
    """VmRSS of pid (and, with `tree`, its live descendants), in KiB."""
    pids = process_tree(pid) if tree else [pid]
    return sum(_rss_of(p) for p in pids)


def pinned_core(pid: int) -> int | None:
    """The one CPU pid may run on, or None (not pinned, or gone)."""
    try:
        cpus = os.sched_getaffinity(pid)
    except OSError:
        return None
    return next(iter(cpus)) if len(cpus) == 1 else None


def core_busy(cpu: int) -> float:
    """Busy seconds of one CPU (user+nice+system+irq+softirq) from /proc/stat:
    the whole cost of a server pinned there, kernel loopback work included."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                v = [int(x) for x in line.split()[1:8]]
                return (v[0] + v[1] + v[2] + v[5] + v[6]) / _CLK_TCK
    return 0.0


def per_req(seconds: float, requests: int) -> float | None:
    """Microseconds per request, or None when nothing was completed."""
    return round(seconds / requests * 1e6, 3) if requests else None


class ServerProbe:
    """Samples the server's CPU (and its core's) over the measured window."""

    def __init__(self, pid: int):
        self.pid = pid
        self.core = pinned_core(pid) if pid else None
        self.cpu0 = self.busy0 = 0.0

    def start(self) -> None:
        if self.pid:
            self.cpu0 = process_cpu(self.pid)
            if self.core is not None:
                self.busy0 = core_busy(self.core)

    def stop(self, requests: int) -> dict[str, object]:
        """The window's figures (nothing without a pid)."""
        if not self.pid:
            return {}
        cpu = process_cpu(self.pid) - self.cpu0
        out: dict[str, object] = {
            "server_pid": self.pid,
            "server_cpu_s": round(cpu, 3),
            "server_cpu_us_per_req": per_req(cpu, requests),
        }
        if self.core is not None:
            busy = core_busy(self.core) - self.busy0
            out.update(
                server_core=self.core,
                server_core_busy_s=round(busy, 3),
                server_core_us_per_req=per_req(busy, requests),
            )
        return out
