"""`evd logs show -f`: follow a growing log file, across logrotate.

Waiting: inotify, through ctypes (the standard library has no binding),
on the file's directory (a write to the file, a new file of that name) and
on the file itself (writes to it after it was moved elsewhere).  An event
only says "look again": each wakeup is followed by a `stat` of the path
and reads to EOF, so nothing depends on reading the events right; they
are decoded only to pass over the other files of a busy directory.  inotify
shows a line as soon as it is written and costs nothing while the log is
quiet; a wait still ends after BACKSTOP seconds, because some filesystems
(NFS, some FUSE and overlay set-ups) deliver no events, and the same checks
then run anyway.  Without inotify (not Linux, no libc, the per-user limit
of instances reached) the same loop polls every POLL seconds: a bounded
sleep, never a busy loop.

logrotate, as `tail -F` sees it, with one difference.  When the path names
a new file (rename then create, or `create` in logrotate), evd goes on
writing to the old one until SIGUSR1 makes it reopen the path; so the old
file stays open and is read to its end until the new one receives its
first bytes, and nothing written in between is lost.  A file that shrinks
(`copytruncate`) is read again from its start.  A path that is missing for
a while (between rename and create) is simply looked for again.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import io
import os
import select
import struct
import time
from collections.abc import Iterator

from evd.tools.logs.reading import BLOCK, InputError, Lines

BACKSTOP = 1.0  # seconds: longest wait with inotify, for filesystems that send no events
POLL = 0.5  # seconds between looks without inotify: a line shows at most this late

# <sys/inotify.h>
IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
DIR_EVENTS = IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
FILE_EVENTS = IN_MODIFY | IN_ATTRIB | IN_MOVE_SELF | IN_DELETE_SELF
EVENT_HEAD = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name


class PollWatcher:
    """Wakes up every POLL seconds."""

    kind = "poll"

    def watch(self, path: str) -> None:
        pass

    def wait(self) -> None:
        time.sleep(POLL)  # a reader without inotify: polling is its only clock

    def close(self) -> None:
        pass


class InotifyWatcher:
    """Wakes up when something happens to a followed file (or to its name
    in its directory), or after BACKSTOP seconds.  Raises OSError if
    inotify is unavailable."""

    kind = "inotify"

    def __init__(self) -> None:
        name = ctypes.util.find_library("c")
        if name is None:
            raise OSError("no C library")
        libc = ctypes.CDLL(name, use_errno=True)
        try:
            self._add = libc.inotify_add_watch
            init = libc.inotify_init1
        except AttributeError:
            raise OSError("no inotify in the C library") from None
        self._add.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
        self._add.restype = ctypes.c_int
        self.fd = init(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.files: set[int] = set()  # watches on followed files (inodes)
        self.dirs: dict[int, set[bytes]] = {}  # watch on a directory -> followed names in it

    def watch(self, path: str) -> None:
        """Watch `path` (the inode it names now) and its name in its
        directory; what cannot be watched is still seen by the backstop."""
        directory, name = os.path.split(os.path.abspath(path))
        wd = self._add(self.fd, os.fsencode(directory), DIR_EVENTS)
        if wd >= 0:
            self.dirs.setdefault(wd, set()).add(os.fsencode(name))
        wd = self._add(self.fd, os.fsencode(path), FILE_EVENTS)
        if wd >= 0:
            self.files.add(wd)

    def wait(self) -> None:
        """Until an event about a followed file, or BACKSTOP seconds.
        Events about other files of the directory (a busy /var/log) are
        read and passed over."""
        deadline = time.monotonic() + BACKSTOP
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([self.fd], [], [], left)
            if not readable or self.relevant():
                return

    def relevant(self) -> bool:
        """Read the queued events: does one concern a followed file?"""
        found = False
        try:
            while data := os.read(self.fd, 65536):
                for wd, name in _events(data):
                    # wd -1: the queue overflowed, anything may have happened
                    found = found or wd in self.files or wd == -1 or name in self.dirs.get(wd, ())
        except BlockingIOError:
            pass
        return found

    def close(self) -> None:
        os.close(self.fd)


def _events(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(watch, name) of each `struct inotify_event` in `data`."""
    offset = 0
    while offset + EVENT_HEAD.size <= len(data):
        wd, _mask, _cookie, length = EVENT_HEAD.unpack_from(data, offset)
        start = offset + EVENT_HEAD.size
        yield wd, data[start : start + length].rstrip(b"\0")
        offset = start + length


def watcher() -> InotifyWatcher | PollWatcher:
    """inotify where it works, else polling."""
    try:
        return InotifyWatcher()
    except OSError:
        return PollWatcher()


class Followed:
    """One log file being followed: the file its path names now, and the
    one it named before a rotation until the new one is written to."""

    def __init__(self, path: str, watch: InotifyWatcher | PollWatcher):
        self.path = path
        self.watcher = watch
        try:
            self.file = open(path, "rb", buffering=0)  # closed by close()
        except OSError as exc:
            raise InputError(f"{path}: {exc.strerror or exc}") from None
        self.identity = _identity(os.fstat(self.file.fileno()))
        self.carry = Lines()  # the unfinished last line, bounded
        self.old: io.FileIO | None = None  # the file before a rotation, still read
        self.old_carry = Lines()
        watch.watch(path)

    def read(self) -> Iterator[list[bytes]]:
        """Every complete line written since the last call, in blocks: the
        old file's rest first, then the current file's."""
        while True:
            if self.old is not None:
                yield from _drain(self.old, self.old_carry)
            wrote = False
            for lines in _drain(self.file, self.carry):
                wrote = True
                yield lines
            if wrote and self.old is not None:
                # evd writes the new file now, so the old one is complete
                # once read again: what it got before those new bytes.
                yield from _drain(self.old, self.old_carry)
                self._retire_old()
            if not self._look_at_path():
                return

    def _retire_old(self) -> None:
        if self.old is not None:
            self.old.close()  # an unfinished line at the end of a finished file is not a line
        self.old, self.old_carry = None, Lines()

    def _look_at_path(self) -> bool:
        """Has the path changed file (then read again at once)?"""
        try:
            st = os.stat(self.path)
        except OSError:
            return False  # renamed away and not yet created again: look next time
        if _identity(st) == self.identity:
            if st.st_size < self.file.tell():
                self.file.seek(0)  # truncated in place (copytruncate)
                self.carry = Lines()
                return True
            return False
        try:
            new = open(self.path, "rb", buffering=0)
        except OSError:
            return False
        self._retire_old()
        self.old, self.old_carry = self.file, self.carry
        self.file, self.carry = new, Lines()
        self.identity = _identity(os.fstat(new.fileno()))
        self.watcher.watch(self.path)
        return True

    def close(self) -> None:
        self._retire_old()
        self.file.close()


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _drain(file: io.FileIO, carry: Lines) -> Iterator[list[bytes]]:
    """The complete lines per block read, to EOF; `carry` keeps the
    unfinished rest."""
    while True:
        data = file.read(BLOCK)
        if not data:
            return
        yield carry.cut(data)
