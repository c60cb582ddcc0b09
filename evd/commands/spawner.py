"""Starting programs off the loop's thread: glibc's posix_spawn, called
through ctypes from a few worker threads, so the loop never waits for a
child's exec.

Why.  posix_spawn (clone with CLONE_VM|CLONE_VFORK) suspends its caller
until the child has exec'd.  Called from the loop, that is a stall of every
connection per program started, and the stall is as long as the child's
wait for a CPU: on a busy machine, milliseconds.  Programs would then start
one at a time, where xinetd's fork lets it accept the next connection at
once.  ctypes releases the GIL around a foreign call, so only the worker
waits; the loop goes on and hears of the result through a pipe.  glibc's
posix_spawn is made for threaded callers (the child runs on its own stack,
with every signal handler reset, before exec).

What a worker touches: only the request it was handed (argv, environment,
three descriptors duplicated for it, so that nothing the loop closes
meanwhile can be reused under it).  The loop owns everything else.  The
threads start on first use (a supervisor that forks workers has none) and
are daemon threads: an exiting evd does not wait for them.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from evd.commands.child import Launch
from evd.loop.reactor import Reactor

# Enough workers for the programs that start at once to overlap their execs.
WORKERS = 4
# glibc's values (spawn.h); SETSID since glibc 2.26.
POSIX_SPAWN_SETSIGDEF = 0x04
POSIX_SPAWN_SETSIGMASK = 0x08
POSIX_SPAWN_SETSID = 0x80
# Larger than glibc's posix_spawnattr_t (336 bytes), posix_spawn_file_actions_t
# (80) and sigset_t (128) on every architecture it supports.
OPAQUE = 1024
# Python ignores these, and an ignored signal stays ignored across exec.
RESTORED = (13, 25)  # SIGPIPE, SIGXFSZ


class _Libc:
    """The few libc functions, typed once.  Only posix_spawn itself, which
    waits for the child's exec, releases the GIL: the others take
    microseconds, and a GIL released and taken back around each of them
    made the loop and a worker trade the GIL (and, on one CPU, the CPU)
    a dozen times per program started."""

    def __init__(self) -> None:
        waits = ctypes.CDLL(None, use_errno=True)  # releases the GIL around a call
        quick = ctypes.PyDLL(None)  # keeps it
        p, i, s = ctypes.c_void_p, ctypes.c_int, ctypes.c_short
        argv = ctypes.POINTER(ctypes.c_char_p)
        self.spawn = self._fn(waits.posix_spawn, [ctypes.POINTER(i), ctypes.c_char_p, p, p, argv, argv])
        self.fa_init = self._fn(quick.posix_spawn_file_actions_init, [p])
        self.fa_dup2 = self._fn(quick.posix_spawn_file_actions_adddup2, [p, i, i])
        self.fa_destroy = self._fn(quick.posix_spawn_file_actions_destroy, [p])
        # glibc 2.29 and later: the child's working directory, set before exec.
        chdir = getattr(quick, "posix_spawn_file_actions_addchdir_np", None)
        self.fa_chdir = None if chdir is None else self._fn(chdir, [p, ctypes.c_char_p])
        self.attr_init = self._fn(quick.posix_spawnattr_init, [p])
        self.attr_flags = self._fn(quick.posix_spawnattr_setflags, [p, s])
        self.attr_mask = self._fn(quick.posix_spawnattr_setsigmask, [p, p])
        self.attr_default = self._fn(quick.posix_spawnattr_setsigdefault, [p, p])
        self.sigempty = self._fn(quick.sigemptyset, [p])
        self.sigadd = self._fn(quick.sigaddset, [p, i])

    @staticmethod
    def _fn(fn: Any, argtypes: list[Any]) -> Any:
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
        return fn


@functools.cache
def _can_chdir() -> bool:
    """glibc 2.29 and later: posix_spawn can enter the child's directory."""
    return hasattr(ctypes.PyDLL(None), "posix_spawn_file_actions_addchdir_np")


def _c_strings(items: Sequence[bytes]) -> ctypes.Array[ctypes.c_char_p]:
    return (ctypes.c_char_p * (len(items) + 1))(*items, None)


def spawn_attributes(libc: _Libc) -> ctypes.Array[ctypes.c_char]:
    """What every child gets, made once per worker: its own session, an
    empty signal mask, RESTORED at their defaults."""
    attr = ctypes.create_string_buffer(OPAQUE)
    mask, default = ctypes.create_string_buffer(OPAQUE), ctypes.create_string_buffer(OPAQUE)
    libc.attr_init(attr)
    libc.sigempty(mask)
    libc.sigempty(default)
    for signum in RESTORED:
        libc.sigadd(default, signum)
    libc.attr_mask(attr, mask)  # copied into attr
    libc.attr_default(attr, default)
    libc.attr_flags(attr, POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF)
    return attr


def posix_spawn(
    libc: _Libc,
    argv: Sequence[bytes],
    env: Sequence[bytes],
    stdio: Sequence[int],
    attr: ctypes.Array[ctypes.c_char],
    cwd: bytes | None = None,
) -> int:
    """The child's pid, started with `attr` (spawn_attributes), in `cwd`
    (None: ours), with descriptors 0, 1, 2 from `stdio`; OSError if it
    could not start (a `cwd` that is not a directory: ENOENT, ENOTDIR...).
    Blocks until the child has exec'd."""
    actions = ctypes.create_string_buffer(OPAQUE)
    libc.fa_init(actions)
    try:
        if cwd is not None:
            if libc.fa_chdir is None:
                raise OSError(errno.ENOSYS, "posix_spawn cannot change directory here (glibc < 2.29)")
            libc.fa_chdir(actions, cwd)
        for target, fd in enumerate(stdio):
            libc.fa_dup2(actions, fd, target)
        pid = ctypes.c_int(0)
        err = libc.spawn(ctypes.byref(pid), argv[0], actions, attr, _c_strings(argv), _c_strings(env))
    finally:
        libc.fa_destroy(actions)
    if err:
        raise OSError(err, os.strerror(err))
    return pid.value


# pid, or why it did not start
Done = Callable[[int | OSError], None]


@dataclass(slots=True)
class _Request:
    argv: list[bytes]
    env: list[bytes]
    stdio: tuple[int, int, int]  # the worker's own duplicates, closed by the loop
    cwd: bytes | None
    done: Done
    result: int | OSError | None = None


class Spawner:
    """Start programs from worker threads; `done(pid or OSError)` is called
    from the loop."""

    def __init__(self, reactor: Reactor):
        self.reactor = reactor
        self._libc: _Libc | None = None
        self._chdir = _can_chdir()  # posix_spawn can set the child's directory
        self._todo: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        # This iteration's requests, handed to the workers as the loop goes
        # to wait (`_hand_over`), when it lets the GIL go anyway: a worker
        # woken at once would only find the GIL taken and sleep again, two
        # context switches for nothing per program.
        self._batch: list[_Request] = []
        self._finished: deque[_Request] = deque()
        self._wake_r = self._wake_w = -1

    def can_start(self, launch: Launch) -> bool:
        """Whether `launch` is the spawner's to start: no user or group to
        switch to, an absolute path (posix_spawnp would search evd's PATH,
        not the child's), and a directory posix_spawn can enter (glibc 2.29
        and later) or ours."""
        return (
            launch.uid is None
            and launch.gid is None
            and os.path.isabs(launch.argv[0])
            and (self._chdir or launch.cwd == os.getcwd())
        )

    def start(
        self,
        argv: Sequence[str],
        env: dict[str, str],
        stdio: Sequence[int],
        done: Done,
        cwd: str | None = None,
    ) -> None:
        """Start `argv` (an absolute path first) with `env` and `stdio`
        (duplicated here: the caller may close its own at once), in `cwd`
        (None: evd's own).  Only what `can_start` accepted: on a glibc that
        cannot enter a directory, that is a program in evd's own cwd."""
        if self._libc is None:
            self._start_workers()
        dups = tuple(os.dup(fd) for fd in stdio)
        request = _Request(
            [a.encode() for a in argv],
            [f"{k}={v}".encode() for k, v in env.items()],
            (dups[0], dups[1], dups[2]),
            os.fsencode(cwd) if cwd is not None and self._chdir else None,
            done,
        )
        self._batch.append(request)

    def _hand_over(self) -> None:
        if self._batch:
            batch, self._batch = self._batch, []
            for request in batch:
                self._todo.put(request)

    def _start_workers(self) -> None:
        self._libc = _Libc()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.reactor.add_reader(self._wake_r, self._on_wake)
        self.reactor.add_before_sleep(self._hand_over)
        for n in range(WORKERS):
            threading.Thread(target=self._work, name=f"evd-spawn-{n}", daemon=True).start()

    def _work(self) -> None:
        libc = self._libc
        assert libc is not None
        attr = spawn_attributes(libc)
        while True:
            request = self._todo.get()
            try:
                request.result = posix_spawn(
                    libc, request.argv, request.env, request.stdio, attr, request.cwd
                )
            except OSError as exc:
                request.result = exc
            self._finished.append(request)
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:  # the pipe is full of wake-ups already
                pass

    def _on_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while self._finished:
            request = self._finished.popleft()
            for fd in request.stdio:
                os.close(fd)
            assert request.result is not None
            request.done(request.result)
