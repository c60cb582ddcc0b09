"""The log's way out: a bounded queue in front of a target that never blocks.

Why it is shaped like this
--------------------------
A log write used to be a blocking `write()` on stderr: a reader that stops
reading (a paused pager, a stalled `| tee`, a journal stream) stopped the
whole daemon.  Here a line is queued, and the queue is written only as far
as the target takes it without waiting:

- stderr that is a pipe, FIFO or terminal is shared with the shell or
  systemd, so its description must keep its flags.  We open
  /proc/self/fd/2 again, which gives a description of our own, and make
  that one non-blocking.  If /proc cannot give one (no reader yet, no
  /proc), we poll fd 2 for writability and write at most PIPE_BUF bytes,
  which a pipe takes whole once poll said it has room.
- stderr that is a socket (systemd's stream) takes `send(MSG_DONTWAIT)`:
  non-blocking for that call only.
- a regular file (log.file, or stderr redirected to one) never says EAGAIN;
  its failures are ENOSPC and EIO.  A short write on a full disk is cut
  back off the file, so no line is ever torn.
- the journal (journal.py) is a datagram socket of our own.

(The stderr and file targets are in log/targets.py.)

The lines of every connection (`put`: conn.open and conn.close, and a
program's exec.start and exec.end) may wait a little on purpose: while the
loop runs and nothing else is queued, they go out once COALESCE_BYTES (or
half of log.buffer) are queued or the oldest has waited COALESCE_DELAY,
whichever comes first, not at the end of every iteration. A busy server
then writes one 64 KiB block where it wrote a few hundred bytes per
iteration: at 14k connections a second that was a third of what logging
cost (docs/performance/logging.md). Any other line (`write`: a reject, an
error, a reload's result) goes out at the end of its iteration as before,
and takes the waiting lines with it, in order. A daemon killed with
SIGKILL loses at most that much of its connection lines; any other exit
writes them.

Lines that cannot go out wait, in order, up to `limit` bytes (log.buffer,
each line counted with its Python overhead, so the figure bounds memory).
Past it, new lines are dropped and counted; the first thing written when
the target takes writes again is the `log.dropped` line (count, first).
While the target would block, the sink watches it for writability through
the reactor (`attach`); while it fails, it tries again every RETRY seconds
(and on every reopen).  Outside the loop (start-up, exit) the sink waits
for the target, for at most DRAIN_TIMEOUT in all.

Workers share the target: every write is whole lines, and at most PIPE_BUF
bytes where the target is a pipe, so lines from two workers never mix; a
terminal, which may take part of a write, is written in turns (a lock, see
log/targets.py): a target that says `Busy` is tried again after BUSY_RETRY.
"""

from __future__ import annotations

import errno
import select
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from evd.log.render import hold_stamps, next_iteration, stamp
from evd.log.targets import Busy

# What a queued line costs beyond its bytes: the bytes object's header and
# its slot in the deque.
LINE_OVERHEAD = 48
RETRY = 1.0  # seconds between tries of a failing target (full disk, no file)
# Another worker finishing its line on a shared terminal: a line's time.
BUSY_RETRY = 0.005
DRAIN_TIMEOUT = 1.0  # SPEC: at exit, at most 1 s waiting for the log
# Connection lines wait for this many bytes (overhead included) or this long.
COALESCE_BYTES = 65536
COALESCE_DELAY = 0.01


class Watcher(Protocol):
    """What the sink needs from the reactor."""

    def add_writer(self, fd: int, callback: Callable[[], object], /) -> None: ...
    def remove_writer(self, fd: int, /) -> None: ...
    def call_later(self, delay: float, callback: Callable[[], float | None], /) -> object: ...


class Target(Protocol):
    """Where bytes go.  `write` returns how many it took, raises
    BlockingIOError when it would block and OSError when it fails."""

    datagram: bool  # one record per write (the journal)
    chunk: int  # most bytes per write for a stream
    path: str  # the log file, "" for stderr and the journal

    @property
    def fd(self) -> int | None: ...  # to watch for writability; None: retry on a timer
    def write(self, data: bytes, /) -> int: ...
    def reopen(self) -> str | None: ...  # a warning (a failed close), OSError if it cannot
    def after_fork(self) -> None: ...
    def isatty(self) -> bool: ...
    def close(self) -> None: ...


class Sink:
    """The queue in front of a target; what structlog writes lines to."""

    def __init__(self, target: Target, limit: int, render_dropped: Callable[[int, str], str | bytes]):
        self.target = target
        self.limit = limit
        self.render_dropped = render_dropped
        self.batching = False
        self.dropped_total = 0  # lines lost since start: never goes down
        self._queue: deque[bytes] = deque()
        self._size = 0  # bytes held (queue and out), overhead included
        # The write in progress: a chunk of lines or the log.dropped note,
        # or what the target left of it.  While none of it is written
        # (`_fresh`), a note can still go in front of it.
        self._out = b""
        self._fresh = False
        self._noted = 0  # lines the note in `_out` stands for, while it is unwritten
        self._dropped = 0  # lost and not yet in a note
        self._first = ""  # timestamp of the first of them
        self._watcher: Watcher | None = None
        self._paused = False  # a writer or a timer of the watcher resumes us
        self._writer_fd: int | None = None
        self._retry_at = 0.0  # without a watcher: no try before this
        self._drain_until: float | None = None
        self._forked = False
        # A line that goes out at the end of its iteration is queued (not
        # only connection lines, which may wait: `put`); the timer that
        # lets them wait no longer than COALESCE_DELAY is set.
        self._urgent = False
        self._due_set = False

    @property
    def path(self) -> str:
        return self.target.path

    def fileno(self) -> int:
        fileno: Callable[[], int] | None = getattr(self.target, "fileno", None)
        if fileno is None:
            raise OSError(errno.EBADF, "the log has no file")
        return fileno()

    def isatty(self) -> bool:
        return self.target.isatty()

    # -- lines in ---------------------------------------------------------------

    def write(self, line: str | bytes) -> None:
        self._urgent = True
        if isinstance(line, bytes):
            self._hold(line)
        else:
            self.put(line if self.target.datagram else line + "\n")

    def put(self, line: str) -> None:
        """A connection's line as it goes out: a stream's, with its newline.
        It may wait a little (see the top).  Twice per connection: this is
        `_hold` for them, with only the loop's usual case inline."""
        try:
            record = line.encode()
        except UnicodeEncodeError:  # a lone surrogate: its escape, never a lost batch
            record = line.encode("utf-8", "backslashreplace")
        size = self._size + len(record) + LINE_OVERHEAD
        if size <= self.limit and self.batching:
            self._queue.append(record)
            self._size = size
        else:
            self._hold(record)

    def _hold(self, record: bytes) -> None:
        size = len(record) + LINE_OVERHEAD
        if self._size + size > self.limit:
            self._drop(1)
        else:
            self._queue.append(record)
            self._size += size
        if not self.batching:
            self._write_now()

    # structlog calls the method named after the level; all of them write.
    msg = debug = info = warning = error = critical = fatal = exception = write

    def _drop(self, count: int) -> None:
        if not count:
            return
        if not self._dropped:
            self._first = stamp()
        self._dropped += count
        self.dropped_total += count

    # -- bytes out --------------------------------------------------------------

    def flush(self) -> None:
        """Write what the target takes now; never waits.  (The loop calls
        it once per iteration: the next line takes a new timestamp.)
        Connection lines alone may wait for more (see the top)."""
        next_iteration()
        if (  # (`_out` or `_paused`: a write began, and `_urgent` holds until it ends)
            not self._urgent
            and self._queue
            and self._size < COALESCE_BYTES
            and self._size * 2 < self.limit  # a small log.buffer must not fill while lines wait
            and self._watcher is not None
        ):
            if not self._due_set:
                self._due_set = True
                self._watcher.call_later(COALESCE_DELAY, self._due)
            return
        self.write_all()

    def _due(self) -> None:
        self._due_set = False
        self.write_all()

    def write_all(self) -> None:
        """Write what the target takes now, connection lines too."""
        if self._paused or not (self._queue or self._out or self._dropped):
            return
        self._write()

    def _write(self) -> None:
        self._urgent = True  # until all is written: a retry or a writable target goes on
        if self._retry_at:
            if time.monotonic() < self._retry_at:
                return
            self._retry_at = 0.0
        if self._forked:
            self._forked = False
            try:
                self.target.after_fork()
            except OSError:
                self._wait_retry()
                return
        target = self.target
        while True:
            if self._dropped and (self._fresh or not self._out):
                self._add_note()
            if not self._out:
                self._out = self._next()
                if not self._out:
                    self._urgent = False
                    return
                self._fresh = True
            try:
                written = target.write(self._out)
            except InterruptedError:
                continue
            except Busy:
                self._wait_retry(BUSY_RETRY)
                return
            except BlockingIOError:
                self._wait_writable()
                return
            except OSError:
                self._wait_retry()
                return
            if not written:
                self._wait_writable()
                return
            self._size -= written
            self._out = self._out[written:]
            self._fresh = False
            self._noted = 0  # a note going out tells its lines

    def _add_note(self) -> None:
        """log.dropped goes first: in front of a write not yet begun, or in
        place of a note not yet written, counting the lines since."""
        count = self._dropped
        if self._noted:  # `_out` is that note, unwritten
            count += self._noted
            self._size -= len(self._out)
        elif self._out:  # lines not yet written: back to the queue's front
            self._queue.appendleft(self._out)
            self._size += LINE_OVERHEAD
        line = self.render_dropped(count, self._first)
        note = line if isinstance(line, bytes) else line.encode("utf-8", "backslashreplace")
        if not self.target.datagram:
            note += b"\n"
        self._out, self._fresh, self._noted, self._dropped = note, True, count, 0
        self._size += len(note)

    def _next(self) -> bytes:
        """Whole lines up to the target's chunk (a longer line goes alone);
        one entry for the journal."""
        queue = self._queue
        if not queue:
            return b""
        if self.target.datagram:
            self._size -= LINE_OVERHEAD
            return queue.popleft()
        if self._size <= self.target.chunk:  # the usual flush: every line fits, no count needed
            self._size -= LINE_OVERHEAD * len(queue)
            data = b"".join(queue)
            queue.clear()
            return data
        parts = [queue.popleft()]
        room = self.target.chunk - len(parts[0])
        while queue and len(queue[0]) <= room:
            room -= len(queue[0])
            parts.append(queue.popleft())
        self._size -= LINE_OVERHEAD * len(parts)
        return b"".join(parts)

    def _wait_writable(self) -> None:
        fd = self.target.fd
        if self._watcher is None or fd is None:
            return  # the next flush tries again
        self._paused = True
        if self._writer_fd != fd:
            self._stop_writer()
            self._watcher.add_writer(fd, self._writable)
            self._writer_fd = fd

    def _writable(self) -> None:
        self._paused = False
        self.write_all()
        if not self._paused:
            self._stop_writer()

    def _stop_writer(self) -> None:
        if self._writer_fd is not None and self._watcher is not None:
            self._watcher.remove_writer(self._writer_fd)
        self._writer_fd = None

    def _wait_retry(self, delay: float | None = None) -> None:
        delay = RETRY if delay is None else delay  # RETRY read now: a test may change it
        self._stop_writer()
        if self._watcher is None:
            self._retry_at = time.monotonic() + delay
            return
        self._paused = True
        self._watcher.call_later(delay, self._retry)

    def _retry(self) -> None:
        self._paused = False
        self.write_all()

    def _write_now(self) -> None:
        """Outside the loop: write, waiting for the target if need be, for
        at most DRAIN_TIMEOUT in all until the loop runs again."""
        self.write_all()
        if self._queue or self._out:
            if self._drain_until is None:
                self._drain_until = time.monotonic() + DRAIN_TIMEOUT
            self.drain(self._drain_until)

    def drain(self, until: float) -> None:
        """Wait for the target until the monotonic time `until`."""
        while True:
            self._paused = False
            self.write_all()
            left = until - time.monotonic()
            fd = self.target.fd
            if not (self._queue or self._out) or left <= 0 or fd is None:
                return
            self._retry_at = 0.0
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            poller.poll(left * 1000)

    # -- the loop ---------------------------------------------------------------

    def attach(self, watcher: Watcher) -> None:
        """While the loop runs: lines go out from its before-sleep hook
        (`flush`), and the loop wakes the sink when a target that would
        have blocked can take more, or to retry a failing one."""
        self._stop_writer()
        self._watcher = watcher
        self._paused = False
        self._due_set = False  # a timer of another reactor never fires here
        self._drain_until = None
        hold_stamps(True)
        if self._retry_at:  # failing since before the loop: the loop's timer retries now
            self._paused = True
            watcher.call_later(max(0.0, self._retry_at - time.monotonic()), self._retry)
            self._retry_at = 0.0
            return
        self.write_all()

    def detach(self) -> None:
        """The loop ended: at most DRAIN_TIMEOUT more for what is queued."""
        self._stop_writer()
        self._watcher = None
        self._paused = False
        hold_stamps(False)
        self._drain_until = time.monotonic() + DRAIN_TIMEOUT
        self.drain(self._drain_until)

    def after_fork(self) -> None:
        """In a new worker: the parent writes what was queued, and the
        reactor we watched through is the parent's."""
        self._queue.clear()
        self._size = self._noted = self._dropped = self.dropped_total = 0
        self._out = b""
        self._watcher = None
        self._writer_fd = None
        self._paused = self._urgent = self._due_set = False
        hold_stamps(False)
        self.batching = False  # until the worker's own loop runs
        # Checked before the next write, not now: detaching (`evd start`)
        # closes descriptors after its forks, and the number may be reused.
        self._forked = True

    # -- targets ----------------------------------------------------------------

    def reopen(self) -> str | None:
        """Reopen the target (SIGUSR1, reload): a warning, or OSError."""
        self.write_all()
        try:
            return self.target.reopen()
        finally:
            self._resume()

    def retarget(self, target: Target) -> None:
        """Switch to a new target (log.file or format changed).  Queued
        lines follow when both take lines; what cannot follow is counted."""
        old = self.target
        self.write_all()
        self._forget_out()
        if old.datagram != target.datagram:
            self._drop(len(self._queue))
            self._queue.clear()
            self._size = 0
        self._stop_writer()
        self.target = target
        old.close()
        self._resume()

    def _forget_out(self) -> None:
        """Never the rest of a write to another target: count it lost."""
        if self._noted:
            self._dropped += self._noted
        elif self._out:
            self._drop(1 if self.target.datagram else max(1, self._out.count(b"\n")))
        self._size -= len(self._out)
        self._out = b""
        self._noted = 0

    def _resume(self) -> None:
        self._paused = False
        self._retry_at = 0.0
        self.write_all()

    def close(self) -> None:
        """At exit: what could not be written in time is lost."""
        self.detach()
        self._forget_out()
        self._drop(len(self._queue))
        self._queue.clear()
        self._size = 0
        self.target.close()
