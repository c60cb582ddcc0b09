"""The reactor: one thread, one selector, callbacks.

Why it is shaped like this
--------------------------
evd serves many small conversations at once from one process.  The cheapest
way to do that in Python is the oldest one: put every socket in non-blocking
mode, ask the kernel (epoll) which ones are ready, and
call a short function for each.  Nothing here blocks except the one `select`
call per iteration, whose timeout is the time to the next timer.

The public surface is small on purpose (redis's ae.c is the model): readers
and writers per file descriptor, timers, signal handlers, a before-sleep
hook, `run` and `stop`.  Every callback takes no arguments (use a bound
method or a closure); the reactor knows nothing of sockets, services,
configuration or logs.

Polling sits behind a seam of five calls (register, modify, unregister,
poll, close): epoll itself on Linux, or any injected `selectors` selector.
epoll reports only descriptor numbers, so a descriptor removed during a batch
of events is remembered until the batch ends: its later events are stale, and
the number may already belong to a new socket.

Timers live in a heap of `Timer` handles.  A timer's callback may return a
number of seconds to be called again after that delay, or None for "no
more" -- a periodic sweep is one timer, not one heap entry per event.
Cancelling marks the handle; the heap drops it when it reaches the top.

Signals never run code inside the handler.  The C-level handler writes the
signal number to a socketpair (`signal.set_wakeup_fd`); the loop reads it,
wakes from `select`, and calls the registered callback between events, where
any state may be touched safely (the trio/curio way).

Invariants:
- `now` is read once per iteration: callbacks compare against it instead of
  calling `time.monotonic()` on every byte.
- a callback that raises is a bug in that callback, not in the loop: it goes
  to `on_error` and the loop continues.
"""

from __future__ import annotations

import heapq
import itertools
import select
import selectors
import signal
import socket
import time
from collections.abc import Callable
from types import FrameType
from typing import Protocol

Callback = Callable[[], object]
# A timer's callback returns seconds until its next call, or None: no more.
TimerCallback = Callable[[], float | None]
SignalDisposition = Callable[[int, FrameType | None], object] | int | signal.Handlers | None


class Poller(Protocol):
    """The polling seam: epoll itself, or any `selectors` selector."""

    READ: int
    WRITE: int
    READY_READ: int  # event bits that mean "call the reader"
    READY_WRITE: int
    # Called when a descriptor is about to be closed; None: nothing to do.
    forget: Callable[[int], None] | None

    def register(self, fd: int, mask: int, /) -> object: ...
    def modify(self, fd: int, mask: int, /) -> object: ...
    def unregister(self, fd: int, /) -> object: ...
    def poll(self, timeout: float | None) -> list[tuple[int, int]]: ...
    def close(self) -> None: ...


class EpollPoller:
    """The Linux backend: epoll itself, with no per-event objects (the
    `selectors` wrapper builds a key and a tuple per ready descriptor, a
    tenth of the loop's own cost on the echo path)."""

    MAX_EVENTS = 1024
    READ = select.EPOLLIN
    WRITE = select.EPOLLOUT
    # An error or hang-up wakes both directions: recv/send will say what.
    READY_READ = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP
    READY_WRITE = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP
    # Closing a descriptor takes it out of the epoll set (evd never dup()s
    # a connection's socket): forgetting one needs no system call.
    forget: Callable[[int], None] | None = None

    def __init__(self) -> None:
        epoll = self._epoll = select.epoll()
        # epoll's own methods, bound once: no Python frame per call.
        self.register: Callable[[int, int], None] = epoll.register
        self.modify: Callable[[int, int], None] = epoll.modify
        self.unregister: Callable[[int], None] = epoll.unregister

    def poll(self, timeout: float | None) -> list[tuple[int, int]]:
        return self._epoll.poll(-1 if timeout is None else timeout, self.MAX_EVENTS)

    def close(self) -> None:
        self._epoll.close()


class SelectorPoller:
    """Any `selectors` selector: an injected one, or a system without epoll."""

    READ = READY_READ = selectors.EVENT_READ
    WRITE = READY_WRITE = selectors.EVENT_WRITE

    def __init__(self, selector: selectors.BaseSelector):
        self._selector = selector
        self.forget: Callable[[int], None] | None = self._unregister

    def register(self, fd: int, mask: int) -> None:
        self._selector.register(fd, mask)

    def modify(self, fd: int, mask: int) -> None:
        self._selector.modify(fd, mask)

    def unregister(self, fd: int) -> None:
        self._selector.unregister(fd)

    def _unregister(self, fd: int) -> None:
        self._selector.unregister(fd)  # a selector keeps closed fds

    def poll(self, timeout: float | None) -> list[tuple[int, int]]:
        return [(key.fd, mask) for key, mask in self._selector.select(timeout)]

    def close(self) -> None:
        self._selector.close()


class Timer:
    """A cancellable handle for `Reactor.call_later`."""

    __slots__ = ("when", "seq", "callback", "cancelled")

    def __init__(self, when: float, seq: int, callback: TimerCallback):
        self.when = when
        self.seq = seq
        self.callback = callback
        self.cancelled = False

    def __lt__(self, other: Timer) -> bool:
        return (self.when, self.seq) < (other.when, other.seq)


class Reactor:
    def __init__(self, selector: selectors.BaseSelector | None = None):
        # The polling seam: epoll directly, or any injected selector.
        self._selector: Poller
        if selector is None and hasattr(select, "epoll"):
            self._selector = EpollPoller()
        else:
            self._selector = SelectorPoller(selector or selectors.DefaultSelector())
        self._read = self._selector.READ
        self._write = self._selector.WRITE
        self._forget = self._selector.forget
        # fd -> [reader, writer]
        self._handlers: dict[int, list[Callback | None]] = {}
        # Descriptors unregistered during the current batch of events: a
        # later event in the batch may be stale, and the fd number may
        # already belong to a new socket.
        self._gone: set[int] = set()
        self._timers: list[Timer] = []
        self._seq = itertools.count()
        self._before_sleep: list[Callback] = []
        self._signal_handlers: dict[int, Callback] = {}
        self._old_signal: dict[int, SignalDisposition] = {}
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._old_wakeup_fd = -1
        self._running = False
        self.now = time.monotonic()
        # Called as on_error(where, exc) when a callback raises; the default
        # re-raises, the daemon installs a logger.
        self.on_error: Callable[[str, BaseException], None] = _reraise

    # -- file events ------------------------------------------------------

    def add_reader(self, fd: int, callback: Callback) -> None:
        if fd in self._handlers:
            self._set(fd, 0, callback)
        else:  # a new connection: the common case, without the general path
            self._selector.register(fd, self._read)
            self._handlers[fd] = [callback, None]

    def remove_reader(self, fd: int) -> None:
        self._set(fd, 0, None)

    def add_writer(self, fd: int, callback: Callback) -> None:
        self._set(fd, 1, callback)

    def remove_writer(self, fd: int) -> None:
        self._set(fd, 1, None)

    def forget(self, fd: int) -> None:
        """`fd` is about to be closed: drop its callbacks.  With epoll this
        costs no system call (one per connection on the connect path)."""
        if self._handlers.pop(fd, None) is not None:
            self._gone.add(fd)
            if self._forget is not None:
                self._forget(fd)

    def _set(self, fd: int, slot: int, callback: Callback | None) -> None:
        handlers = self._handlers.get(fd)
        if handlers is None:
            if callback is None:
                return
            handlers = [None, None]
            handlers[slot] = callback
            # Registered first, remembered second: a failed register (a
            # closed fd) must leave no trace.
            self._selector.register(fd, self._read if slot == 0 else self._write)
            self._handlers[fd] = handlers
            return
        if (handlers[slot] is None) == (callback is None):
            handlers[slot] = callback  # replacing a callback keeps the mask
            return
        handlers[slot] = callback
        mask = (self._read if handlers[0] else 0) | (self._write if handlers[1] else 0)
        if mask:
            self._selector.modify(fd, mask)
        else:
            del self._handlers[fd]
            self._gone.add(fd)
            self._selector.unregister(fd)

    # -- timers -----------------------------------------------------------

    def call_later(self, delay: float, callback: TimerCallback) -> Timer:
        """Call `callback` after `delay` seconds; if it returns a number, again
        after that many seconds, until it returns None or is cancelled."""
        timer = Timer(time.monotonic() + delay, next(self._seq), callback)
        heapq.heappush(self._timers, timer)
        return timer

    def cancel(self, timer: Timer | None) -> None:
        if timer is not None:
            timer.cancelled = True

    def _run_timers(self) -> None:
        timers = self._timers
        now = self.now
        again_list: list[tuple[Timer, float]] = []
        while timers and timers[0].when <= now:
            timer = heapq.heappop(timers)
            if timer.cancelled:
                continue
            try:
                again = timer.callback()
            except Exception as exc:  # a bug in the callback, not the loop
                self.on_error("timer", exc)
                continue
            if again is not None and not timer.cancelled:
                again_list.append((timer, again))
        # Re-armed after the pass: a timer asking for 0 s runs again on the
        # next iteration, after I/O, instead of spinning here.
        for timer, again in again_list:
            timer.when = now + again
            timer.seq = next(self._seq)
            heapq.heappush(timers, timer)

    # -- hooks and signals -----------------------------------------------

    def add_before_sleep(self, callback: Callback) -> None:
        """Run `callback` at the end of every iteration, before waiting."""
        self._before_sleep.append(callback)

    def add_signal_handler(self, signum: int, callback: Callback) -> None:
        """Call `callback` from the loop (never from the handler) on `signum`."""
        if self._wake_r is None:
            self._open_wakeup()
        if signum not in self._old_signal:
            self._old_signal[signum] = signal.signal(signum, _note_signal)
        self._signal_handlers[signum] = callback

    def _open_wakeup(self) -> None:
        wake_r, wake_w = self._wake_r, self._wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        self._old_wakeup_fd = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        self.add_reader(wake_r.fileno(), lambda: self._read_signals(wake_r))

    def _read_signals(self, wake_r: socket.socket) -> None:
        try:
            data = wake_r.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        for signum in data:
            callback = self._signal_handlers.get(signum)
            if callback is not None:
                try:
                    callback()
                except Exception as exc:
                    self.on_error("signal", exc)

    def close(self) -> None:
        """Restore signal dispositions and release the selector."""
        for signum, old in self._old_signal.items():
            signal.signal(signum, old)
        self._old_signal.clear()
        self._signal_handlers.clear()
        if self._wake_r is not None:
            signal.set_wakeup_fd(self._old_wakeup_fd)
            self.remove_reader(self._wake_r.fileno())
            self._close_wakeup()
        self._selector.close()

    def _close_wakeup(self) -> None:
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._wake_r = self._wake_w = None

    def close_in_child(self) -> None:
        """In a process forked from a running loop: let go of this one so the
        child can build its own.  Only closes: the epoll set is shared with
        the parent across fork, and an unregister here would remove the
        parent's registrations."""
        if self._wake_r is not None:
            signal.set_wakeup_fd(-1)  # else the child's signals wake the parent
            self._close_wakeup()
        for signum, old in self._old_signal.items():
            signal.signal(signum, old)
        self._old_signal.clear()
        self._signal_handlers.clear()
        self._handlers.clear()
        self._timers.clear()
        self._selector.close()

    # -- the loop ---------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._running

    def stop(self) -> None:
        """Leave `run` after the current iteration."""
        self._running = False

    def run(self) -> None:
        self._running = True
        poll = self._selector.poll
        ready_read = self._selector.READY_READ
        ready_write = self._selector.READY_WRITE
        monotonic = time.monotonic
        timers = self._timers
        handlers_of = self._handlers.get
        gone = self._gone
        on_error = self.on_error
        while self._running:
            for hook in self._before_sleep:
                try:
                    hook()
                except Exception as exc:
                    self.on_error("before_sleep", exc)
            if not self.running:  # a hook stopped the loop
                break
            timeout = None
            if timers:
                timeout = max(0.0, timers[0].when - monotonic())
            events = poll(timeout)
            self.now = monotonic()
            gone.clear()
            for fd, mask in events:
                handlers = handlers_of(fd)
                if handlers is None or (gone and fd in gone):
                    continue
                try:
                    # Re-check each slot: an earlier callback in this batch
                    # may have removed it (the connection closed).
                    if mask & ready_read:
                        callback = handlers[0]
                        if callback is not None:
                            callback()
                    if mask & ready_write:
                        callback = handlers[1]
                        if callback is not None:
                            callback()
                except Exception as exc:
                    on_error("io", exc)
            if timers and timers[0].when <= self.now:
                self._run_timers()


def _note_signal(signum: int, frame: FrameType | None) -> None:
    """The Python-level handler does nothing: the wakeup fd carries the news."""


def _reraise(where: str, exc: BaseException) -> None:
    raise exc
