"""SIGUSR1 with workers: every process leaves the old log file before any
writes to the new one.

Why.  logrotate renames the log and sends SIGUSR1; each process then
reopens the path.  A reader that follows the log across the rename
(`evd logs show -f`, `tail -F`) reads the old file to its end and moves to
the new one as soon as that has bytes -- it cannot know who else still
writes to the old one.  With several writers reopening one after another,
the first line in the new file sent the reader away while a slower worker
still had a line or two for the old file: lost to the reader.

How.  A rotation is a barrier, held by the supervisor:
1. The supervisor sends SIGUSR1 to every worker.
2. Each worker writes out what it holds for the old file, then holds its
   log lines in memory (its sink's target takes nothing: `HeldTarget`) and
   says so: its pid, four bytes, on the `acks` pipe (a write that small to
   a pipe is atomic, whatever the other workers write at the same time).
3. Once every worker has said so (or after HOLD_TIMEOUT: a stuck worker
   must not stop the log), the supervisor reopens its own log -- the new
   file's first line is its `log.reopen` -- and sends SIGUSR1 again.
4. Each held worker reopens and lets its lines go, into the new file.
No process writes to the new file before all have stopped writing to the
old one.  A held worker that hears nothing more reopens by itself after
HOLD_TIMEOUT (a SIGUSR1 sent to a worker by hand, or a supervisor gone).
The supervisor starts no worker while a rotation runs: a worker forked
then would inherit a file that nobody tells it to leave.
"""

from __future__ import annotations

import os
import signal
import struct
from collections.abc import Callable, Iterable
from typing import Any

from evd.log.logger import log
from evd.loop.reactor import Reactor, Timer

# Longest a rotation waits for the workers, and a worker for the word to go
# on.  Workers answer within a loop iteration; this only bounds a stuck one.
HOLD_TIMEOUT = 1.0
ACK = struct.Struct("=i")  # a worker's pid


class HeldTarget:
    """A log target that takes nothing for now: the sink keeps the lines
    (up to log.buffer, as for a full disk) and offers them again at each
    flush.  Everything but writing is the real target's."""

    fd = None  # nothing to wait for: the next flush tries again

    def __init__(self, real: Any):
        self.real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def write(self, data: bytes, /) -> int:
        return 0


class SupervisorRotation:
    """The supervisor's side: steps 1 and 3."""

    def __init__(
        self,
        reactor: Reactor,
        signal_workers: Callable[[int, Iterable[int]], None],
        on_done: Callable[[], None],
    ):
        self.reactor = reactor
        self.signal_workers = signal_workers  # (signum, pids)
        self.on_done = on_done  # the supervisor starts what it held back
        self.acks_r, self.acks_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.waiting: set[int] | None = None  # pids not yet held; None: no rotation running
        self.held: set[int] = set()
        self._timer: Timer | None = None
        self._buffer = b""
        reactor.add_reader(self.acks_r, self._read_acks)

    @property
    def running(self) -> bool:
        return self.waiting is not None

    def start(self, pids: Iterable[int]) -> None:
        """SIGUSR1 reached the supervisor: hold every worker in `pids`."""
        if self.running:
            return  # one rotation at a time; this one reopens anyway
        self.waiting = set(pids)
        self.held = set()
        if not self.waiting:
            self._finish()
            return
        self.signal_workers(signal.SIGUSR1, self.waiting)
        self._timer = self.reactor.call_later(HOLD_TIMEOUT, self._give_up)

    def gone(self, pid: int) -> None:
        """A worker exited: wait for it no longer."""
        if self.waiting is not None and pid in self.waiting:
            self.waiting.discard(pid)
            if not self.waiting:
                self._finish()

    def _read_acks(self) -> None:
        try:
            self._buffer += os.read(self.acks_r, 4096)
        except BlockingIOError:
            return
        whole = len(self._buffer) - len(self._buffer) % ACK.size
        for (pid,) in ACK.iter_unpack(self._buffer[:whole]):
            if self.waiting is not None and pid in self.waiting:
                self.waiting.discard(pid)
                self.held.add(pid)
        self._buffer = self._buffer[whole:]
        if self.waiting is not None and not self.waiting:
            self._finish()

    def _give_up(self) -> None:
        self._timer = None
        if self.waiting:
            log.warning("log.reopen", ok=True, waited_for=sorted(self.waiting), error="workers did not hold")
            self._finish()

    def _finish(self) -> None:
        if self._timer is not None:
            self.reactor.cancel(self._timer)
            self._timer = None
        self.waiting = None
        log.reopen()
        log.sink.write_all()  # our log.reopen first in the new file
        self.signal_workers(signal.SIGUSR1, self.held)
        self.held = set()
        self.on_done()

    def close(self) -> None:
        """At exit, the loop already closed."""
        os.close(self.acks_r)
        os.close(self.acks_w)

    def close_in_child(self) -> int:
        """In a new worker: drop the read end; the write end for its acks."""
        os.close(self.acks_r)
        return self.acks_w


class WorkerRotation:
    """A worker's side: steps 2 and 4, its SIGUSR1 handler."""

    def __init__(self, reactor: Reactor, acks: int):
        self.reactor = reactor
        self.acks = acks
        self.real: Any = None  # the sink's target while held
        self._timer: Timer | None = None

    def signalled(self) -> None:
        if self.real is None:
            self._hold()
        else:
            self._release()

    def _hold(self) -> None:
        log.sink.write_all()  # the last lines for the old file
        self.real = log.sink.target
        log.sink.target = HeldTarget(self.real)
        try:
            os.write(self.acks, ACK.pack(os.getpid()))
        except OSError:  # no supervisor to hold for
            self._release()
            return
        self._timer = self.reactor.call_later(HOLD_TIMEOUT, self._release)

    def _release(self) -> None:
        if self._timer is not None:
            self.reactor.cancel(self._timer)
            self._timer = None
        # Reopen while still held: Sink.reopen first writes out what it
        # holds, to the old file -- the held lines must go to the new one.
        log.reopen()
        if self.real is not None:
            log.sink.target, self.real = self.real, None
            log.sink.write_all()
