"""render.stamp while the loop runs: one timestamp per loop iteration (the
lines of an iteration share the instant the loop woke for), a new one after
the sink's flush, and every line's own time outside the loop."""

from __future__ import annotations

from evd.log import render
from evd.log.sink import Sink
from evd.log.targets import FileTarget


class Clock:
    def __init__(self) -> None:
        self.now = 1_796_610_208_000_000_000

    def __call__(self) -> int:
        self.now += 1_000  # a microsecond per reading
        return self.now


def test_one_timestamp_per_loop_iteration(monkeypatch, tmp_path):
    monkeypatch.setattr(render, "clock", Clock())
    sink = Sink(FileTarget(str(tmp_path / "evd.log")), 1 << 20, lambda count, first: "")
    assert render.stamp() != render.stamp()  # outside the loop: each its own
    try:
        sink.attach(Watcher())  # the loop runs
        first = render.stamp()
        assert render.stamp() == first == render.fast_json("info", "conn.open", {"conn": 1})[15:42]
        sink.flush()  # the loop's before-sleep: the iteration ends
        assert render.stamp() > first
    finally:
        sink.detach()
        sink.close()
    assert render.stamp() != render.stamp()


class Watcher:
    def add_writer(self, fd, callback):
        raise AssertionError("a regular file is never watched")

    def remove_writer(self, fd):
        pass

    def call_later(self, delay, callback):
        raise AssertionError("nothing to retry")
