"""process_cpu_seconds_total is a counter: the sum it is built from may dip
(a worker gone from /proc but not yet reaped, ticks against rusage), the
value exposed never does."""

from __future__ import annotations

import os

from evd.server.metrics import exposition


def cpu_seconds(pids: list[int], departed: float) -> float:
    (family,) = [f for f in exposition.process_families(pids, departed) if f.name == "process_cpu_seconds"]
    return family.samples[0].value


def test_a_counter_summed_from_parts_never_goes_back(monkeypatch):
    monkeypatch.setattr(exposition, "CPU_SECONDS", exposition.HighWater())
    own = os.getpid()
    first = cpu_seconds([own], 1000.0)  # a reaped worker's 1000 s counted
    # The same worker seen neither in /proc nor in the departed sum yet:
    later = cpu_seconds([own, 2**22 + 1], 0.0)
    assert first >= 1000.0 and later >= first


def test_the_high_water_mark_follows_a_rising_sum():
    mark = exposition.HighWater()
    assert [mark(v) for v in (0.83, 0.8299999999999998, 0.9, 0.5, 1.2)] == [0.83, 0.83, 0.9, 0.9, 1.2]
