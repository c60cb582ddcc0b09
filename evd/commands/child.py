"""One child process of evd, from spawn to reaping: the one way evd starts a
program, shared by the command runner (`process.Run`: a framed request's
command) and program services (`handlers/program.py`: a connection's
program, SPEC section 14).

A child leads its own session and process group, runs with a given
environment and working directory (as another user when asked), and, if
its owner asks (commands do), gets a parent-death signal
(`evd.system.children.Deathsig`).  It is started without copying evd:
`os.posix_spawn` (glibc: clone with CLONE_VM|CLONE_VFORK, then exec) when
nothing has to happen in between that it cannot do -- no parent-death
signal, no user switch, the working directory evd's own -- else subprocess,
which vforks too unless a preexec_fn or a user switch forces a fork.
posix_spawn skips subprocess's Python-level set-up and its descriptor
sweep: every descriptor evd opens is close-on-exec (Python's default, PEP
446; systemd's sockets are made so on adoption), so only the three a child
is given survive the exec.  Figures: docs/performance/programs.md.

The reactor watches everything about it: its exit (a pidfd, readable when
the main process is gone) and the pipes evd reads (stdout and/or stderr,
given to the subclass's `_keep`).  Nothing here ever waits.  Construction
is all or nothing: a child that cannot be watched is killed and left to be
reaped, and the error is a SpawnError.

How a child ends.  Normally its main process exits and the pipes evd reads
close, and it is `_finished`.  Otherwise evd ends it -- on the timeout, on
an output cap, because its client left, at shutdown -- with SIGTERM to its
group and to every process found belonging to it (`evd.system.children`:
descendants, session, holders of its pipes), then SIGKILL KILL_GRACE later.
At that point evd stops waiting for the pipes: whatever still holds them is
out of reach, so our ends are drained and closed.  A main process that even
SIGKILL does not end (stuck in the kernel) gets KILL_GRACE more, then the
child is finished without its status and the owner reaps it later.  So no
end waits longer than timeout + 2 KILL_GRACE.  Whatever a normally ended
child left in its group gets the same SIGTERM-then-SIGKILL.

The first cause evd ends a child for is its `reason`: the timeout is
disarmed once evd has begun ending it, and only a client leaving overrides
the cause.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, Protocol

from evd.loop.reactor import Reactor, Timer
from evd.system import children
from evd.system.children import Deathsig

# Between SIGTERM and SIGKILL: time for a well-behaved program to clean up.
KILL_GRACE = 1.0
READ_SIZE = 65536
# Reads of one pipe when evd stops waiting for it: what is already there,
# bounded, since an unreachable holder may still be writing.
DRAIN_READS = 16
# Why evd ended a child; "exit" when it ended itself.
EXIT, TIMEOUT, TRUNCATED, CLIENT_GONE, SHUTDOWN = "exit", "timeout", "truncated", "client_gone", "shutdown"
PIPE = subprocess.PIPE


class SpawnError(Exception):
    """The program could not be started (`doing` = "cannot run") or
    watched ("cannot watch"); str() says why, in the OS's words."""

    def __init__(self, reason: str, doing: str = "cannot run"):
        super().__init__(reason)
        self.doing = doing


@dataclass(frozen=True, slots=True)
class Launch:
    """How to start a program: what, where, with what, as whom.  `uid` and
    `gid` are resolved before the loop needs them (a name lookup may block)."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    cwd: str = "/"
    uid: int | None = None
    gid: int | None = None


class Process(Protocol):
    """A started child as subprocess.Popen describes it (or `Spawned`)."""

    pid: int
    returncode: int | None
    stdin: IO[bytes] | None
    stdout: IO[bytes] | None
    stderr: IO[bytes] | None

    def poll(self) -> int | None: ...


class Spawned:
    """A child started by os.posix_spawn, with Popen's few attributes that
    evd uses: `poll` reaps it without waiting."""

    def __init__(self, pid: int, stdin: IO[bytes] | None, stdout: IO[bytes] | None, stderr: IO[bytes] | None):
        self.pid = pid
        self.returncode: int | None = None
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: its status is lost
                return None
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)  # -N: killed by signal N
        return self.returncode


class Owner(Protocol):
    """What a child needs from whoever started it (commands.Runner)."""

    reactor: Reactor
    deathsig: Deathsig

    def reap_later(self, proc: Process) -> None:
        """Collect a SIGKILLed process without waiting for it."""

    def linger(self, child: Child, lingering: bool) -> None:
        """The finished child still has leftovers to SIGKILL (or no more)."""


def killpg(pgid: int, signum: int) -> bool:
    """Signal a process group; False if it has no members left."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    return True


def why(exc: BaseException) -> str:
    """An exception as words for a client or a log line: no repr."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return "not runnable"


def spawn(launch: Launch, deathsig: Deathsig, *, stdin: int, stdout: int, stderr: int = PIPE) -> Process:
    """Start `launch` in its own session with the given stdin/stdout/stderr
    (PIPE or a descriptor); SpawnError if it cannot start."""
    try:
        if plain(launch, deathsig):
            return _posix_spawn(launch, (stdin, stdout, stderr))
        return subprocess.Popen(
            [*deathsig.prefix, *launch.argv],
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            cwd=launch.cwd,
            env=dict(launch.env),
            close_fds=True,
            # Its own session: a job-control shell's jobs leave the group,
            # not the session, and no terminal of ours is its.
            start_new_session=True,
            user=launch.uid,
            group=launch.gid,
            # Dropping to a user drops root's supplementary groups too.
            extra_groups=[] if launch.uid is not None else None,
            preexec_fn=None if deathsig.preexec is None else _preexec(deathsig),
        )
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        raise SpawnError(why(exc)) from None


def plain(launch: Launch, deathsig: Deathsig = children.NONE) -> bool:
    """Nothing to do between fork and exec that posix_spawn cannot: no
    parent-death signal, no user switch, no chdir, no PATH search (which
    posix_spawnp would make in evd's PATH, not the child's)."""
    return (
        deathsig.mode == "none"
        and launch.uid is None
        and launch.gid is None
        and os.path.isabs(launch.argv[0])
        and launch.cwd == os.getcwd()
    )


# What subprocess's restore_signals resets: Python ignores SIGPIPE and
# SIGXFSZ, and an ignored signal stays ignored across exec.
RESTORED = (signal.SIGPIPE, signal.SIGXFSZ)


def _posix_spawn(launch: Launch, given: tuple[int, int, int]) -> Spawned:
    """posix_spawn with descriptors 0, 1, 2 from `given` (PIPE: a new pipe,
    whose other end is returned as Popen would)."""
    actions: list[tuple[int, int, int]] = []
    theirs: list[int] = []
    ours: list[IO[bytes] | None] = []
    try:
        for target, spec in enumerate(given):
            if spec == PIPE:
                r, w = os.pipe()
                child, parent = (r, w) if target == 0 else (w, r)
                theirs.append(child)
                ours.append(open(parent, "wb" if target == 0 else "rb", buffering=0))
                spec = child
            else:
                ours.append(None)
            actions.append((os.POSIX_SPAWN_DUP2, spec, target))
        pid = os.posix_spawn(
            launch.argv[0],
            launch.argv,
            dict(launch.env),
            file_actions=actions,
            setsid=True,
            setsigmask=(),
            setsigdef=RESTORED,
        )
    except BaseException:
        for pipe in ours:
            if pipe is not None:
                pipe.close()
        raise
    finally:
        for fd in theirs:
            os.close(fd)
    return Spawned(pid, *ours)


def _preexec(deathsig: Deathsig) -> Callable[[], None]:
    preexec, parent = deathsig.preexec, os.getpid()
    assert preexec is not None
    return lambda: preexec(parent)


class Child:
    """A running child: watched, ended, finished once (`_finished`)."""

    # Commands get the parent-death signal (they are evd's work); a
    # program service's child does not (handlers/program.py says why).
    parent_death = True

    def __init__(
        self,
        owner: Owner,
        launch: Launch,
        *,
        stdin: int,
        stdout: int,
        timeout: float,
        proc: Process | None = None,
    ):
        """Start `launch`, or watch `proc`, already started for it (by
        commands/spawner.py, off the loop)."""
        self.owner = owner
        self.reactor = owner.reactor
        self.argv = list(launch.argv)
        self.reason: str | None = None  # why evd ended it, once it does
        self.started = time.monotonic()
        self.timed_out = False
        self.pidfd = -1
        self._pipes: dict[int, IO[bytes]] = {}  # the pipes evd reads, while open
        self._exited = False  # the main process is reaped
        self._finished_once = False
        self._timeout: Timer | None = None
        self._kill_timer: Timer | None = None  # SIGKILL due, after a SIGTERM
        self._give_up_timer: Timer | None = None
        self._killed_now = False  # kill_now: SIGKILLed, and finished without waiting
        if proc is None:
            deathsig = owner.deathsig if self.parent_death else children.NONE
            proc = spawn(launch, deathsig, stdin=stdin, stdout=stdout)
        self.proc = proc
        self.pid = self.proc.pid
        try:
            self._watch(timeout)
        except BaseException as exc:
            # All or nothing: a half-watched child would never be reaped,
            # and nothing could find it to kill it.
            self._abort()
            if isinstance(exc, OSError):
                raise SpawnError(why(exc), "cannot watch") from None
            raise

    @property
    def finished(self) -> bool:
        return self._finished_once

    def _watch(self, timeout: float) -> None:
        proc = self.proc
        # First: the likeliest to fail (EMFILE), before anything depends on it.
        self.pidfd = os.pidfd_open(self.pid)
        self.reactor.add_reader(self.pidfd, self._on_exit)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is None:
                continue
            fd = pipe.fileno()
            os.set_blocking(fd, False)
            self.reactor.add_reader(fd, functools.partial(self._on_output, fd))
            self._pipes[fd] = pipe
        if timeout > 0:
            self._timeout = self.reactor.call_later(timeout, self._on_timeout)

    def _abort(self) -> None:
        """Undo a half-built child: kill it, unregister and close
        everything, and leave it to be reaped without waiting."""
        killpg(self.pid, signal.SIGKILL)
        self.reactor.cancel(self._timeout)
        self._release_all()
        self.owner.reap_later(self.proc)

    # -- what a subclass says ------------------------------------------------------

    def _keep(self, fd: int, data: bytes) -> bool:
        """Output from pipe `fd`; True to end the child (TRUNCATED)."""
        return False

    def _finished(self) -> None:
        """The child is over (its status in proc.returncode, if known)."""

    # -- the child's pipes and exit ------------------------------------------------

    def _on_output(self, fd: int) -> None:
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""  # as good as EOF: nothing more will come
        if not data:
            self._close_pipe(fd)
            self._maybe_finish()
        elif self._keep(fd, data):
            self.terminate(TRUNCATED)

    def _close_pipe(self, fd: int) -> None:
        pipe = self._pipes.pop(fd)
        self.reactor.remove_reader(fd)
        pipe.close()

    def _drain_pipes(self) -> None:
        """Stop waiting for the pipes: keep what is there, close our ends."""
        for fd in list(self._pipes):
            for _ in range(DRAIN_READS):
                try:
                    data = os.read(fd, READ_SIZE)
                except OSError:  # EAGAIN included: nothing more now
                    break
                if not data:
                    break
                self._keep(fd, data)
            self._close_pipe(fd)

    def _on_exit(self) -> None:
        self.reaped()
        self._maybe_finish()

    def reaped(self) -> None:
        """The pidfd is readable: the main process is gone; collect it."""
        self.reactor.remove_reader(self.pidfd)
        os.close(self.pidfd)
        self.pidfd = -1
        self.proc.poll()
        self._exited = True

    # -- ending it -----------------------------------------------------------------

    def _on_timeout(self) -> None:
        self._timeout = None
        self.timed_out = True
        self.terminate(TIMEOUT)

    def terminate(self, reason: str) -> None:
        """Begin the end, once: SIGTERM now, SIGKILL after KILL_GRACE."""
        if self.reason is None or reason == CLIENT_GONE:
            self.reason = reason
        if self._kill_timer is not None or self._finished_once:
            return
        self.reactor.cancel(self._timeout)  # the first cause is the one to name
        self._timeout = None
        self._signal(signal.SIGTERM)
        self._kill_timer = self.reactor.call_later(KILL_GRACE, self._hard_kill)

    def _signal(self, signum: int) -> bool:
        """Signal the group and every process found belonging to the child;
        False if nobody was there."""
        hit = killpg(self.pid, signum)
        pipes = {os.fstat(fd).st_ino for fd in self._pipes}
        found = children.related(self.pid, pipes=pipes)
        return children.signal_all(found, signum) > 0 or hit

    def _hard_kill(self) -> None:
        self._kill_timer = None
        self._signal(signal.SIGKILL)
        if self._finished_once:  # only leftovers were left
            self.owner.linger(self, False)
            return
        self._drain_pipes()
        if self._exited:
            self._finish()
        else:  # SIGKILL is on its way; uninterruptible sleep can hold it
            self._give_up_timer = self.reactor.call_later(KILL_GRACE, self._finish)

    def kill_rest(self) -> None:
        """SIGKILL now whatever is left (the grace is over, or evd exits)."""
        self.reactor.cancel(self._kill_timer)
        self._hard_kill()

    def kill_now(self, reason: str = SHUTDOWN) -> None:
        """SIGKILL everything now (then `end_now`)."""
        if self.reason is None:
            self.reason = reason
        self.reactor.cancel(self._kill_timer)
        self._kill_timer = None
        self._killed_now = True
        self._signal(signal.SIGKILL)

    def end_now(self) -> None:
        """Finish with what is known (after `kill_now`)."""
        self._drain_pipes()
        self._finish()

    def _maybe_finish(self) -> None:
        if self._exited and not self._pipes:
            self._finish()

    def _release_all(self) -> None:
        """Unregister and close every descriptor of the child."""
        self.reactor.cancel(self._give_up_timer)
        for fd in list(self._pipes):
            self._close_pipe(fd)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:  # a half-built child's, never watched
                pipe.close()
        if self.pidfd >= 0:
            self.reactor.remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = -1

    def _finish(self) -> None:
        """Release everything, deal with leftovers, and report.  Runs once."""
        if self._finished_once:
            return
        self._finished_once = True
        self.reactor.cancel(self._timeout)
        self._release_all()
        if not self._exited:
            self.owner.reap_later(self.proc)
        if self._kill_timer is not None:
            self.owner.linger(self, True)
        elif self.reason is None and killpg(self.pid, 0):
            # The main process is gone; what it left in its group is not
            # wanted.  (Only then a /proc scan: it costs per process.)
            self._signal(signal.SIGTERM)
            self._kill_timer = self.reactor.call_later(KILL_GRACE, self._hard_kill)
            self.owner.linger(self, True)
        self._finished()

    # -- what ended it -------------------------------------------------------------

    @property
    def exit(self) -> int | None:
        code = self.proc.returncode
        return code if code is not None and code >= 0 else None

    @property
    def signal(self) -> int | None:
        code = self.proc.returncode
        if code is None and self._killed_now:
            # `kill_now` finishes without waiting: the kernel may not have
            # ended it yet when evd looked, but SIGKILL is what ends it.
            # (A process that outlives a SIGKILL it was given a grace for
            # has no status: `_hard_kill`.)
            return int(signal.SIGKILL)
        return -code if code is not None and code < 0 else None

    def duration_ms(self) -> float:
        return self.micros() / 1000

    def micros(self) -> int:
        """How long it has run, in whole microseconds (exec.end's duration)."""
        return int((time.monotonic() - self.started) * 1_000_000 + 0.5)
