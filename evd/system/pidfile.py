"""The pidfile: a file that holds the daemon's pid and a lock while it lives.

Why a lock and not just the pid: a pid outlives nothing.  After a crash the
file stays behind, and its pid may by now belong to some other process, so
"is that pid alive?" cannot tell a running daemon from a stale file.  A lock
can: the kernel drops it when the last descriptor of the locked file closes,
however the process ended.  So "locked" means running, "there but unlocked"
means stale -- and a stale file never blocks a start (gunicorn's pidfile has
the same rule, told by the pid alone).

Why `flock` and not `lockf`/`fcntl` record locks: a flock lock belongs to the
open file description, so it survives the forks of `evd start` into the
daemon (the descriptor is in DaemonContext's `files_preserve`) and is shared
by every copy of the descriptor.  A record lock belongs to the process that
took it and would be gone after the first fork.

Readers (`evd status`, `stop`, `reload`) test the lock with a shared,
non-blocking flock they drop at once.  `acquire` tells such a passing reader
(shared) from a daemon (exclusive) and waits the few microseconds a reader
holds it instead of reporting "already running".
"""

from __future__ import annotations

import errno
import fcntl
import os

# Tries to take the lock while readers hold it for the instant of a probe;
# each try is two system calls, so this bounds the wait to well under 1 ms.
_READER_SPINS = 1000
# Tries to lock a file that stays the same file: a concurrent owner removing
# its pidfile can pull the path out from under an acquire, at most once or
# twice in practice.
_RACE_RETRIES = 5


class PidfileError(Exception):
    """The pidfile cannot be used; str() names the path, syscall and errno."""


class AlreadyRunning(Exception):
    def __init__(self, path: str, pid: int | None):
        self.path = path
        self.pid = pid
        super().__init__(f"already running, pid {pid if pid is not None else '?'}")


def _error(syscall: str, path: str, exc: OSError) -> PidfileError:
    return PidfileError(f"pidfile {path}: {syscall}: [Errno {exc.errno}] {exc.strerror}")


def read_pid(path: str) -> int | None:
    """The pid written in `path`, or None if missing, empty or garbage."""
    try:
        with open(path, "rb") as f:
            text = f.read(32).strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def _locked(fd: int) -> bool:
    """Does someone hold an exclusive lock on `fd`'s file?"""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


class State:
    """What a reader sees: does the file exist, its pid, is it locked."""

    __slots__ = ("exists", "pid", "locked")

    def __init__(self, exists: bool, pid: int | None, locked: bool):
        self.exists, self.pid, self.locked = exists, pid, locked

    @property
    def running(self) -> bool:
        return self.locked

    @property
    def stale(self) -> bool:
        return self.exists and not self.locked


def probe(path: str) -> State:
    """The state of the pidfile at `path`, without disturbing its owner."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return State(False, None, False)
    except OSError as exc:
        raise _error("open", path, exc) from None
    try:
        return State(True, read_pid(path), _locked(fd))
    finally:
        os.close(fd)


class Pidfile:
    """The daemon's side: create, lock, write, and at exit remove its own."""

    def __init__(self, path: str):
        self.path = path
        self.fd: int | None = None
        self.pid: int | None = None
        self.owner: int | None = None  # the process that took the lock
        self.created_dirs: list[str] = []  # made by us: chown them on a privilege drop

    def acquire(self, write_pid: bool = True) -> None:
        """Lock the pidfile and write our pid (or, without `write_pid`,
        empty it: `evd start`, whose daemon writes its own pid later), or
        raise AlreadyRunning / PidfileError.  The lock is held until
        `release` or process exit."""
        self._make_dirs()
        for _ in range(_RACE_RETRIES):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise _error("open", self.path, exc) from None
            try:
                self._lock(fd)
                if self._same_file(fd):
                    self.fd = fd
                    self.owner = os.getpid()
                    if write_pid:
                        self.write(os.getpid())
                    else:  # a stale pid left in the file must not be signalled
                        self._rewrite(fd, b"")
                    return
            except BaseException:
                os.close(fd)
                raise
            # Removed or replaced between our open and our lock: the lock
            # we hold guards a file nobody else will open.  Try again.
            os.close(fd)
        raise PidfileError(f"pidfile {self.path}: replaced repeatedly while locking it")

    def _make_dirs(self) -> None:
        missing, parent = [], os.path.dirname(self.path)
        while parent and not os.path.isdir(parent):
            missing.append(parent)
            parent = os.path.dirname(parent)
        for directory in reversed(missing):
            try:
                os.mkdir(directory, 0o755)
            except FileExistsError:
                continue
            except OSError as exc:
                raise _error("mkdir", directory, exc) from None
            self.created_dirs.append(directory)

    def _lock(self, fd: int) -> None:
        for _ in range(_READER_SPINS):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            except OSError as exc:
                raise _error("flock", self.path, exc) from None
            # Held.  Exclusively (a daemon) or shared (a reader's probe)?
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise AlreadyRunning(self.path, read_pid(self.path)) from None
            fcntl.flock(fd, fcntl.LOCK_UN)
        raise AlreadyRunning(self.path, read_pid(self.path))

    def _same_file(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def write(self, pid: int) -> None:
        """Replace the content with `pid` (the daemon's, after detaching)."""
        self._rewrite(self._fd(), f"{pid}\n".encode())
        self.pid = pid

    def _rewrite(self, fd: int, content: bytes) -> None:
        try:
            os.ftruncate(fd, 0)
            if content:
                os.pwrite(fd, content, 0)
        except OSError as exc:
            raise _error("write", self.path, exc) from None

    def _fd(self) -> int:
        if self.fd is None:
            raise PidfileError(f"pidfile {self.path}: not held")
        return self.fd

    def chown(self, uid: int, gid: int) -> None:
        """Hand the file (and the directories we made) to the user we drop
        to, so it can still remove them at exit."""
        try:
            os.fchown(self._fd(), uid, gid)
            for directory in self.created_dirs:
                os.chown(directory, uid, gid)
        except OSError as exc:
            raise _error("chown", self.path, exc) from None

    def fileno(self) -> int:
        return self._fd()

    def release(self) -> str | None:
        """Remove the file if it is still ours, then unlock.  Returns a
        warning to log if it could not be removed, else None."""
        if self.fd is None:
            return None
        warning = None
        # Ours: the file we locked, holding what we wrote -- our pid, or
        # nothing if `evd start` fails before its daemon wrote one.
        mine = os.getpid() == (self.pid if self.pid is not None else self.owner)
        if mine and self._same_file(self.fd) and read_pid(self.path) == self.pid:
            try:
                os.unlink(self.path)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    warning = str(_error("unlink", self.path, exc))
        self.close()
        return warning

    def close(self) -> None:
        """Drop our descriptor without removing anything: the `evd start`
        parent and worker processes, whose copies the daemon does not need."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
