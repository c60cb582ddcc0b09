"""The reactor (evd/loop/reactor.py) on real file descriptors and real signals.

Every `run()` is bounded by a guard timer that stops the loop and marks the
test as timed out; conditions are met from inside callbacks, never by
sleeping.
"""

from __future__ import annotations

import inspect
import itertools
import os
import selectors
import signal
import socket
import time

import pytest

from evd.loop.reactor import Reactor

LIMIT = 5.0  # seconds: the bound on every run of the loop


@pytest.fixture
def reactor():
    r = Reactor()
    yield r
    r.close()


@pytest.fixture
def pair():
    socks = []

    def make():
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        socks.extend((a, b))
        return a, b

    yield make
    for s in socks:
        s.close()


def run_bounded(reactor: Reactor, limit: float = LIMIT) -> None:
    """Run until something in the test stops the loop; fail after `limit`."""
    expired = []
    guard = reactor.call_later(limit, lambda: (expired.append(True), reactor.stop()) and None)
    reactor.run()
    reactor.cancel(guard)
    assert not expired, f"the loop was not stopped within {limit}s"


def stop_after(reactor: Reactor, delay: float) -> None:
    reactor.call_later(delay, reactor.stop)


# --- file events --------------------------------------------------------------


def test_reader_fires_with_data(reactor, pair):
    a, b = pair()
    got = []

    def on_read():
        got.append(a.recv(100))
        reactor.stop()

    reactor.add_reader(a.fileno(), on_read)
    b.send(b"ping")
    run_bounded(reactor)
    assert got == [b"ping"]


def test_writer_removed_inside_its_callback_fires_once(reactor, pair):
    a, _ = pair()
    calls = []

    def on_write():
        calls.append(a.send(b"x"))
        reactor.remove_writer(a.fileno())

    reactor.add_writer(a.fileno(), on_write)
    # A socket stays writable: a writer still registered would fire on every
    # iteration until the stop timer.
    stop_after(reactor, 0.05)
    run_bounded(reactor)
    assert calls == [1]


def test_reader_removed_inside_its_callback_does_not_fire_again(reactor, pair):
    a, b = pair()
    calls = []

    def on_read():
        calls.append(1)  # do not read: the fd stays readable
        reactor.remove_reader(a.fileno())

    reactor.add_reader(a.fileno(), on_read)
    b.send(b"data")
    stop_after(reactor, 0.05)
    run_bounded(reactor)
    assert calls == [1]


def test_removing_another_fds_reader_in_the_same_batch(reactor, pair):
    (a1, b1), (a2, b2) = pair(), pair()
    fired = []

    def make(me, other):
        def on_read():
            fired.append(me)
            reactor.remove_reader(me.fileno())
            reactor.remove_reader(other.fileno())

        return on_read

    reactor.add_reader(a1.fileno(), make(a1, a2))
    reactor.add_reader(a2.fileno(), make(a2, a1))
    b1.send(b"1")
    b2.send(b"2")  # both readable before the first select: one batch
    stop_after(reactor, 0.05)
    run_bounded(reactor)
    assert len(fired) == 1


def test_removing_another_fd_then_reusing_its_number_in_the_same_batch(reactor, pair):
    (a1, b1), (a2, b2) = pair(), pair()
    fired, stale = [], []
    fresh = []

    def first():
        fired.append("first")
        reactor.remove_reader(a1.fileno())
        reactor.remove_reader(a2.fileno())
        a2.close()  # its number is free again ...
        c, d = socket.socketpair()  # ... and likely reused here
        c.setblocking(False)
        fresh.extend((c, d))
        reactor.add_reader(c.fileno(), lambda: stale.append(c.fileno()))

    def second():
        fired.append("second")
        reactor.remove_reader(a1.fileno())
        reactor.remove_reader(a2.fileno())

    reactor.add_reader(a1.fileno(), first)
    reactor.add_reader(a2.fileno(), second)
    b1.send(b"1")
    b2.send(b"2")
    stop_after(reactor, 0.05)
    try:
        run_bounded(reactor)
        if fired == ["first"]:
            # The new socket has nothing to read: its callback must not run
            # on the stale event of the fd number's previous owner.
            assert stale == []
        else:
            assert fired == ["second"]
    finally:
        for s in fresh:
            reactor.remove_reader(s.fileno())
            s.close()


def test_removing_the_writer_from_the_reader_of_the_same_fd(reactor, pair):
    a, b = pair()
    order = []

    def on_read():
        order.append("read")
        a.recv(10)
        reactor.remove_writer(a.fileno())
        reactor.remove_reader(a.fileno())

    reactor.add_reader(a.fileno(), on_read)
    reactor.add_writer(a.fileno(), lambda: order.append("write"))
    b.send(b"x")  # now readable and writable: both bits in one event
    stop_after(reactor, 0.05)
    run_bounded(reactor)
    assert order == ["read"]


def test_reader_and_writer_on_one_fd_both_fire_and_are_independent(reactor, pair):
    a, b = pair()
    seen = {"read": 0, "write": 0}

    def on_read():
        seen["read"] += 1
        assert a.recv(10) == b"x"
        reactor.remove_reader(a.fileno())
        if not seen["write"]:
            return
        reactor.stop()

    def on_write():
        seen["write"] += 1
        reactor.remove_writer(a.fileno())
        if seen["read"]:
            reactor.stop()

    reactor.add_reader(a.fileno(), on_read)
    reactor.add_writer(a.fileno(), on_write)
    b.send(b"x")
    run_bounded(reactor)
    assert seen == {"read": 1, "write": 1}


def test_replacing_a_callback_keeps_the_registration(reactor, pair):
    a, b = pair()
    got = []
    reactor.add_reader(a.fileno(), lambda: got.append("old"))
    reactor.add_reader(a.fileno(), lambda: (got.append(a.recv(10)), reactor.stop()))
    b.send(b"new")
    run_bounded(reactor)
    assert got == [b"new"]


def test_remove_of_unregistered_fd_is_harmless(reactor, pair):
    a, _ = pair()
    reactor.remove_reader(a.fileno())
    reactor.remove_writer(a.fileno())
    reactor.add_writer(a.fileno(), lambda: (reactor.remove_writer(a.fileno()), reactor.stop()))
    run_bounded(reactor)


# --- timers -------------------------------------------------------------------


def test_timers_fire_in_order_of_due_time(reactor):
    order = []
    for delay in (0.03, 0.0, 0.02, 0.01):
        reactor.call_later(delay, lambda d=delay: order.append(d))
    reactor.call_later(0.04, reactor.stop)
    run_bounded(reactor)
    assert order == [0.0, 0.01, 0.02, 0.03]


def test_timers_with_equal_delay_fire_in_scheduling_order(reactor):
    order = []
    for i in range(10):
        reactor.call_later(0.01, lambda i=i: order.append(i))
    reactor.call_later(0.02, reactor.stop)
    run_bounded(reactor)
    assert order == list(range(10))


def test_timer_never_fires_early(reactor):
    fired = []
    start = time.monotonic()

    def fire():
        fired.append(time.monotonic() - start)
        reactor.stop()

    reactor.call_later(0.05, fire)
    run_bounded(reactor)
    assert len(fired) == 1
    assert fired[0] >= 0.05


def test_timer_returning_a_number_repeats_and_none_stops(reactor):
    calls = []

    def tick():
        calls.append(time.monotonic())
        return 0.005 if len(calls) < 5 else None

    reactor.call_later(0.0, tick)
    reactor.call_later(0.2, reactor.stop)
    run_bounded(reactor)
    assert len(calls) == 5
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert all(g >= 0.005 for g in gaps), gaps


def test_cancel_before_due(reactor):
    fired = []
    timer = reactor.call_later(0.01, lambda: fired.append("cancelled one"))
    reactor.call_later(0.02, lambda: fired.append("kept"))
    reactor.cancel(timer)
    reactor.cancel(None)  # allowed: "no timer"
    reactor.call_later(0.05, reactor.stop)
    run_bounded(reactor)
    assert fired == ["kept"]


def test_cancel_from_another_timer(reactor):
    fired = []
    victim = reactor.call_later(0.03, lambda: fired.append("victim"))
    reactor.call_later(0.01, lambda: reactor.cancel(victim))
    reactor.call_later(0.05, reactor.stop)
    run_bounded(reactor)
    assert fired == []


def test_cancel_repeating_timer_from_inside_its_callback(reactor):
    calls = []
    handle = []

    def tick():
        calls.append(1)
        if len(calls) == 3:
            reactor.cancel(handle[0])
        return 0.001  # asks to repeat, but it is cancelled

    handle.append(reactor.call_later(0.0, tick))
    reactor.call_later(0.1, reactor.stop)
    run_bounded(reactor)
    assert len(calls) == 3


def test_cancel_repeating_timer_between_calls(reactor):
    calls = []
    timer = reactor.call_later(0.0, lambda: calls.append(1) or 0.002)

    def cancel():
        reactor.cancel(timer)
        frozen.append(len(calls))

    frozen = []
    reactor.call_later(0.03, cancel)
    reactor.call_later(0.08, reactor.stop)
    run_bounded(reactor)
    assert frozen and frozen[0] >= 2
    assert len(calls) == frozen[0]


def test_timer_returning_zero_yields_to_the_loop_between_calls(reactor):
    # Regression: a timer returning 0 used to be re-run inside the same pass forever.
    iteration = [0]
    seen_in = []

    def hook():
        iteration[0] += 1

    def tick():
        seen_in.append(iteration[0])
        if len(seen_in) >= 5:
            reactor.stop()
            return None  # the guard that keeps this test bounded
        return 0

    reactor.add_before_sleep(hook)
    reactor.call_later(0.0, tick)
    run_bounded(reactor)
    # "Call again as soon as possible" must still let one loop iteration
    # (I/O, hooks) pass between calls.
    assert len(set(seen_in)) == len(seen_in), seen_in


# --- before-sleep hooks and stop ----------------------------------------------


def test_before_sleep_runs_every_iteration(reactor):
    trace = []
    reactor.add_before_sleep(lambda: trace.append("hook"))

    def tick():
        trace.append("timer")
        if trace.count("timer") == 4:
            reactor.stop()
            return None
        return 0.001

    reactor.call_later(0.0, tick)
    run_bounded(reactor)
    assert trace[0] == "hook"
    assert trace.count("timer") == 4
    # Never two timer runs without a hook (an iteration) between them.
    assert "timer, timer" not in ", ".join(trace)


def test_several_before_sleep_hooks_run_in_order(reactor):
    trace = []
    reactor.add_before_sleep(lambda: trace.append("a"))
    reactor.add_before_sleep(lambda: trace.append("b"))
    reactor.call_later(0.0, reactor.stop)
    run_bounded(reactor)
    assert trace[:2] == ["a", "b"]
    assert len(trace) % 2 == 0 and trace == ["a", "b"] * (len(trace) // 2)


def test_stop_from_before_sleep_hook_leaves_without_waiting(reactor):
    # Nothing is registered: without the hook's stop, select would wait for
    # the guard timer.
    reactor.add_before_sleep(reactor.stop)
    start = time.monotonic()
    run_bounded(reactor, limit=2.0)
    assert time.monotonic() - start < 1.0


def test_stop_from_io_callback_ends_run_and_run_can_resume(reactor, pair):
    a, b = pair()
    got = []

    def on_read():
        got.append(a.recv(10))
        reactor.stop()

    reactor.add_reader(a.fileno(), on_read)
    b.send(b"one")
    run_bounded(reactor)
    assert got == [b"one"]
    b.send(b"two")
    run_bounded(reactor)  # the same reactor runs again
    assert got == [b"one", b"two"]


# --- signals ------------------------------------------------------------------


def test_signal_callback_runs_in_the_loop_not_in_the_handler(reactor):
    calls = []
    in_timer = [False]

    def on_usr1():
        frames = [f.function for f in inspect.stack()]
        calls.append((in_timer[0], frames))
        reactor.stop()

    def send():
        in_timer[0] = True
        os.kill(os.getpid(), signal.SIGUSR1)
        # Plenty of bytecode for a Python-level handler to have run by now.
        for _ in range(1000):
            pass
        in_timer[0] = False

    reactor.add_signal_handler(signal.SIGUSR1, on_usr1)
    reactor.call_later(0.0, send)
    run_bounded(reactor)
    assert len(calls) == 1
    was_in_timer, frames = calls[0]
    assert was_in_timer is False
    assert "send" not in frames
    assert "run" in frames


def test_signal_delivered_outside_run_is_handled_at_next_run(reactor):
    calls = []
    reactor.add_signal_handler(signal.SIGUSR2, lambda: (calls.append("usr2"), reactor.stop()))
    os.kill(os.getpid(), signal.SIGUSR2)
    assert calls == []  # the handler only recorded it
    run_bounded(reactor)
    assert calls == ["usr2"]


def test_two_signals_each_reach_their_own_callback(reactor):
    calls = []

    def note(name):
        calls.append(name)
        if len(calls) == 2:
            reactor.stop()

    reactor.add_signal_handler(signal.SIGUSR1, lambda: note("usr1"))
    reactor.add_signal_handler(signal.SIGUSR2, lambda: note("usr2"))
    reactor.call_later(0.0, lambda: os.kill(os.getpid(), signal.SIGUSR2))
    reactor.call_later(0.01, lambda: os.kill(os.getpid(), signal.SIGUSR1))
    run_bounded(reactor)
    assert calls == ["usr2", "usr1"]


def test_close_restores_old_signal_disposition_and_wakeup_fd():
    def previous_handler(signum, frame):
        pass

    old = signal.signal(signal.SIGUSR1, previous_handler)
    try:
        old_wakeup = signal.set_wakeup_fd(-1)
        signal.set_wakeup_fd(old_wakeup)
        r = Reactor()
        r.add_signal_handler(signal.SIGUSR1, lambda: None)
        assert signal.getsignal(signal.SIGUSR1) is not previous_handler
        r.close()
        assert signal.getsignal(signal.SIGUSR1) is previous_handler
        restored = signal.set_wakeup_fd(-1)
        signal.set_wakeup_fd(old_wakeup)
        assert restored == old_wakeup
    finally:
        signal.signal(signal.SIGUSR1, old)


# --- errors -------------------------------------------------------------------


def test_raising_callbacks_go_to_on_error_and_the_loop_continues(reactor, pair):
    a, b = pair()
    errors = []
    reactor.on_error = lambda where, exc: errors.append((where, type(exc), str(exc)))
    raised_hook = []

    def bad_reader():
        a.recv(10)
        raise ValueError("reader")

    def bad_hook():
        if not raised_hook:
            raised_hook.append(1)
            raise KeyError("hook")

    def bad_timer():
        raise RuntimeError("timer")

    reactor.add_reader(a.fileno(), bad_reader)
    reactor.add_before_sleep(bad_hook)
    reactor.call_later(0.0, bad_timer)
    b.send(b"x")
    reactor.call_later(0.05, reactor.stop)  # the loop is still alive to run this
    run_bounded(reactor)
    assert sorted(errors) == sorted(
        [
            ("io", ValueError, "reader"),
            ("before_sleep", KeyError, "'hook'"),
            ("timer", RuntimeError, "timer"),
        ]
    )


def test_raising_signal_callback_goes_to_on_error(reactor):
    errors = []
    reactor.on_error = lambda where, exc: (errors.append((where, str(exc))), reactor.stop())

    def bad():
        raise OSError("from the signal callback")

    reactor.add_signal_handler(signal.SIGUSR1, bad)
    reactor.call_later(0.0, lambda: os.kill(os.getpid(), signal.SIGUSR1))
    run_bounded(reactor)
    assert errors == [("signal", "from the signal callback")]


def test_raising_timer_that_would_repeat_is_not_rescheduled(reactor):
    calls = []
    reactor.on_error = lambda where, exc: None

    def bad():
        calls.append(1)
        raise RuntimeError("once")

    reactor.call_later(0.0, bad)
    reactor.call_later(0.05, reactor.stop)
    run_bounded(reactor)
    assert calls == [1]


def test_default_on_error_reraises_out_of_run(reactor, pair):
    a, b = pair()

    class Boom(Exception):
        pass

    def bad():
        raise Boom("unhandled")

    reactor.add_reader(a.fileno(), bad)
    b.send(b"x")
    guard = reactor.call_later(LIMIT, reactor.stop)
    with pytest.raises(Boom, match="unhandled"):
        reactor.run()
    reactor.cancel(guard)


# --- the selector seam --------------------------------------------------------


class RecordingSelector(selectors.SelectSelector):
    """A different backend than the default, recording what the reactor asks."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def register(self, fileobj, events, data=None):
        self.calls.append(("register", fileobj, events))
        return super().register(fileobj, events, data)

    def modify(self, fileobj, events, data=None):
        self.calls.append(("modify", fileobj, events))
        return super().modify(fileobj, events, data)

    def unregister(self, fileobj):
        self.calls.append(("unregister", fileobj))
        return super().unregister(fileobj)

    def select(self, timeout=None):
        self.calls.append(("select",))
        return super().select(timeout)


def test_injected_selector_is_used(pair):
    sel = RecordingSelector()
    reactor = Reactor(selector=sel)
    a, b = pair()
    got = []
    try:

        def on_read():
            got.append(a.recv(10))
            reactor.remove_reader(a.fileno())
            reactor.stop()

        reactor.add_reader(a.fileno(), on_read)
        reactor.add_writer(a.fileno(), lambda: reactor.remove_writer(a.fileno()))
        b.send(b"via select")
        run_bounded(reactor)
    finally:
        reactor.close()
    fd = a.fileno()
    assert got == [b"via select"]
    assert sel.calls[0] == ("register", fd, selectors.EVENT_READ)
    assert ("modify", fd, selectors.EVENT_READ | selectors.EVENT_WRITE) in sel.calls
    assert ("unregister", fd) in sel.calls
    assert ("select",) in sel.calls
    assert sel.get_map() is None  # close() released the injected selector too


def test_failed_registration_leaves_no_trace(reactor, pair, tmp_path):
    # Regression: a failed register used to leave a ghost entry for the fd number.
    a, b = pair()
    fd = os.open(tmp_path / "regular", os.O_RDWR | os.O_CREAT)
    try:
        with pytest.raises(OSError):
            reactor.add_reader(fd, lambda: None)  # epoll refuses regular files
        os.dup2(a.fileno(), fd)  # the number now names a socket (as after close + accept)
        got = []

        def on_read():
            got.append(os.read(fd, 10))
            reactor.remove_reader(fd)
            reactor.stop()

        reactor.add_reader(fd, on_read)
        b.send(b"after")
        run_bounded(reactor, limit=1.0)
        assert got == [b"after"]
    finally:
        os.close(fd)


def test_remove_after_failed_registration_is_harmless(reactor, tmp_path):
    fd = os.open(tmp_path / "regular", os.O_RDWR | os.O_CREAT)
    try:
        with pytest.raises(OSError):
            reactor.add_writer(fd, lambda: None)
        reactor.remove_writer(fd)
    finally:
        os.close(fd)
