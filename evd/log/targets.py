"""Where log lines go when they are not the journal: stderr and log.file.

Both are written without ever waiting (the reasons are in log/sink.py):
stderr through a description of our own, a socket send that does not wait,
or a poll before a write of at most PIPE_BUF bytes; a regular file by
appends that a full disk takes whole or not at all.

A terminal is not a pipe: a write of whole lines to a pipe is taken whole
or not at all (up to PIPE_BUF), but a non-blocking write to a terminal on
hold (Ctrl-S, a full pty) takes what fits, part of a line.  With workers,
the rest would follow after another worker's line: torn lines.  So the
processes writing to one terminal take turns: each write to it is made
under an exclusive flock(2) on the terminal, and a process whose write was
cut keeps the lock until the rest is out.  The others meanwhile get `Busy`
and try again a moment later (the lines wait in their queues, in order).
Each process locks through a description of its own (a flock belongs to
the open file description, which a fork shares).
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import stat

from evd.log.journal import identity

# The largest write a pipe keeps whole when several processes write to it.
ATOMIC_WRITE = select.PIPE_BUF
# A regular file keeps any append whole: fewer, larger writes.
FILE_CHUNK = 1 << 16


class Busy(BlockingIOError):
    """Another process is part way through a line on the shared terminal:
    try again soon (not on writability: the terminal may well be writable)."""


def describe(exc: OSError) -> str:
    """`[Errno 28] No space left on device`, with no Python words."""
    text = f"[Errno {exc.errno}] {exc.strerror}" if exc.errno else str(exc)
    return f"{exc.filename}: {text}" if exc.filename else text


class StderrTarget:
    """fd 2, written without ever changing its description's flags."""

    datagram = False
    path = ""

    def __init__(self, fd: int = 2):
        self.stderr = fd
        self._resolve()

    def _resolve(self) -> None:
        self._private: int | None = None
        self._sock: socket.socket | None = None
        self._poll = False
        self._tty = False
        self._lock: int | None = None  # this process's own description of the terminal
        self._holding = False  # a write cut short: the lock is kept until its rest is out
        self.chunk = ATOMIC_WRITE
        self._identity = identity(self.stderr)
        try:
            mode = os.fstat(self.stderr).st_mode
        except OSError:
            return  # no stderr: writes fail with EBADF and are counted
        if stat.S_ISSOCK(mode):
            # A socket object on a copy of the descriptor; flags passed per
            # call leave the shared description as it is.
            self._sock = socket.socket(fileno=os.dup(self.stderr))
        elif stat.S_ISFIFO(mode) or (stat.S_ISCHR(mode) and os.isatty(self.stderr)):
            try:
                flags = os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
                self._private = os.open(f"/proc/self/fd/{self.stderr}", flags)
                self._private_identity = identity(self._private)
                self._tty = stat.S_ISCHR(mode)
            except OSError:
                self._poll = True
        elif stat.S_ISREG(mode):
            self.chunk = FILE_CHUNK

    @property
    def fd(self) -> int | None:
        if self._private is not None:
            return self._private
        if self._poll or self._sock is not None:
            return self.stderr
        return None

    def write(self, data: bytes) -> int:
        if self._private is not None:
            return self._turn(self._private, data) if self._tty else os.write(self._private, data)
        if self._sock is not None:
            return self._sock.send(data, socket.MSG_DONTWAIT)
        if self._poll:
            poller = select.poll()
            poller.register(self.stderr, select.POLLOUT)
            if not poller.poll(0):
                raise BlockingIOError(errno.EAGAIN, "stderr is full")
            return os.write(self.stderr, data[:ATOMIC_WRITE])
        return _append(self.stderr, data)

    def _turn(self, fd: int, data: bytes) -> int:
        """A write to a shared terminal, in this process's turn (see the top)."""
        fresh = not self._holding
        if fresh:
            if self._lock is None:
                self._lock = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC)
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise Busy(errno.EAGAIN, "another process is writing a line to the terminal") from None
            self._holding = True
        try:
            written = os.write(fd, data)
        except OSError:
            if fresh:  # nothing of these lines went out: nothing to finish
                self._unlock()
            raise
        if written == len(data) or (fresh and not written):
            self._unlock()
        return written

    def _unlock(self) -> None:
        if self._holding and self._lock is not None:
            self._holding = False
            fcntl.flock(self._lock, fcntl.LOCK_UN)

    def reopen(self) -> str | None:
        return None  # stderr stays stderr

    def after_fork(self) -> None:
        """Detaching (`evd start`) points fd 2 at /dev/null and closes our
        private descriptor, whose number may be reused by then: look again,
        and never close what may not be ours any more."""
        if self._lock is not None:  # the parent's description: its lock is its own
            os.close(self._lock)
            self._lock, self._holding = None, False
        same = identity(self.stderr) == self._identity
        if self._private is not None:
            same = same and identity(self._private) == self._private_identity
        if not same:
            if self._sock is not None:
                self._sock.detach()
            self._resolve()

    def isatty(self) -> bool:
        try:
            return os.isatty(self.stderr)
        except OSError:
            return False

    def close(self) -> None:
        if self._lock is not None:  # a turn not finished ends here
            os.close(self._lock)
            self._lock, self._holding = None, False
        if self._private is not None:
            os.close(self._private)
            self._private = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class FileTarget:
    """`log.file`, opened for append by us (so the description is ours)."""

    datagram = False

    def __init__(self, path: str):
        self.path = path
        self._fd: int | None = self._open()

    def _open(self) -> int:
        # O_NONBLOCK: a FIFO named as log.file must not hang the open (or the
        # writes); a regular file ignores it.
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
        fd = os.open(self.path, flags, 0o666)
        self._regular = stat.S_ISREG(os.fstat(fd).st_mode)
        self.chunk = FILE_CHUNK if self._regular else ATOMIC_WRITE
        return fd

    @property
    def fd(self) -> int | None:
        return None if self._regular or self._fd is None else self._fd

    def fileno(self) -> int:
        if self._fd is None:
            raise OSError(errno.EBADF, "the log file is not open")
        return self._fd

    def write(self, data: bytes) -> int:
        if self._fd is None:  # the last reopen found no file: try again
            self._fd = self._open()
        if self._regular:
            return _append(self._fd, data)
        return os.write(self._fd, data)

    def reopen(self) -> str | None:
        """Open `path` again (logrotate moved it).  If it cannot be opened
        and the old description no longer is the file at `path` (its
        directory was removed), let it go: lines wait in the queue until a
        file can be opened."""
        old = self._fd
        try:
            self._fd = self._open()
        except OSError:
            if old is not None and not self._names(old):
                self._fd = None
                _close(old)
            raise
        return _close(old) if old is not None else None

    def _names(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == identity(fd)

    def after_fork(self) -> None:
        pass  # launch keeps the log file across detaching

    def isatty(self) -> bool:
        return self._fd is not None and os.isatty(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            _close(self._fd)
            self._fd = None


def _close(fd: int) -> str | None:
    """close(2) may report a failed write-back (ENOSPC, EIO on NFS); the
    descriptor is gone either way."""
    try:
        os.close(fd)
    except OSError as exc:
        return f"close: {describe(exc)}"
    return None


def _append(fd: int, data: bytes) -> int:
    """Append to a regular file, a line whole or not at all: a disk that
    fills part way through a write has the part taken back off the file,
    and the error (ENOSPC, EIO) is raised for the whole write."""
    done = 0
    while done < len(data):
        try:
            written = os.write(fd, data[done:] if done else data)
        except OSError:
            if done == 0 or _take_back(fd, done):
                raise
            return done  # cannot take it back: the rest follows when it can
        if written == 0:
            raise OSError(errno.EIO, "write: nothing written")
        done += written
    return done


def _take_back(fd: int, count: int) -> bool:
    """Cut our last `count` bytes off the file, unless someone appended
    after them (another worker) or the file cannot be cut."""
    try:
        end = os.lseek(fd, 0, os.SEEK_CUR)  # O_APPEND: just after our bytes
        if os.fstat(fd).st_size != end:
            return False
        os.ftruncate(fd, end - count)
    except OSError:
        return False
    return True
