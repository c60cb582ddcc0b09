"""A worker's figures, the timeline every worker shares, and the payloads."""

from __future__ import annotations

import struct
import time
from collections import Counter

# Distinct payloads per run, used in turn, so a stale answer cannot pass.
VARIANTS = 256


def payloads(size: int) -> list[bytes]:
    """VARIANTS distinct payloads of `size` bytes, each starting with its index."""
    pattern = bytes(range(33, 127)) * (size // 94 + 2)
    return [
        struct.pack(">I", i)[-min(4, size) :] + pattern[i % 94 : i % 94 + max(0, size - 4)]
        for i in range(VARIANTS)
    ]


class Stats:
    """What a worker measured: completions in the window and their latencies."""

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.lost = 0
        self.latencies: list[int] = []  # ns
        self.cpu = 0.0
        self.why: Counter[str] = Counter()  # error kinds, for the human line

    def error(self, why: str) -> None:
        self.errors += 1
        self.why[why] += 1

    def result(self) -> dict[str, object]:
        """What the worker sends its parent: a histogram, not every latency."""
        histogram = Counter(ns // 1000 for ns in self.latencies)
        return {
            "requests": self.requests,
            "errors": self.errors,
            "lost": self.lost,
            "cpu": self.cpu,
            "histogram": dict(histogram),
            "why": dict(self.why),
        }


class Window:
    """The shared timeline: warm-up until `start`, measure until `end` (ns of
    time.monotonic_ns, which is system-wide: the parent and every worker
    agree on it)."""

    def __init__(self, t0: float, warmup: float, duration: float):
        self.start = int((t0 + warmup) * 1e9)
        self.end = int((t0 + warmup + duration) * 1e9)
        self.open = False
        self._cpu0 = 0.0

    def tick(self, now: int, stats: Stats) -> bool:
        """False once the run is over; opens the window when its time comes."""
        if not self.open and now >= self.start:
            self.open = True
            self._cpu0 = time.process_time()
        if now >= self.end:
            stats.cpu = time.process_time() - self._cpu0 if self.open else 0.0
            return False
        return True
