"""One command's process, from spawn to answer (the runner that decides
what may run is `commands.py`).

A command is a child process leading its own session and process group,
with stdin from the request body, cwd `/` and an environment of PATH and
LANG only.  The reactor watches everything about it: its stdin pipe (written
as the child reads), stdout and stderr (read as they come, capped at
`max_output` together), and its exit (a pidfd, readable when the child is
gone).  Nothing here ever waits: a command that sleeps for a minute costs
the loop nothing.  Construction is all or nothing: a child that cannot be
watched is killed and left to be reaped, and the error is a CommandError.

How a run ends.  Normally its main process exits and its pipes close, and
the answer goes back.  Otherwise evd ends it -- on the timeout, on the
output cap, or because the client left (`abandon`: nobody can receive the
answer) -- with SIGTERM to its group and to every process found belonging
to it (`evd.system.children`: descendants, session, holders of its pipes),
then SIGKILL KILL_GRACE later.  At that point the answer stops waiting for
the pipes: whatever still holds them is out of reach, so our ends are
drained and closed.  A main process that even SIGKILL does not end (stuck
in the kernel) gets KILL_GRACE more, then the answer goes without its
status and the owner reaps it later.  So no answer waits longer than
timeout + 2 KILL_GRACE.  Whatever a normally ended command left in its group
(and, then, whatever else is found belonging to it) gets the same
SIGTERM-then-SIGKILL.  A parent-death signal takes the main process down
with evd if evd is killed.

The first cause evd ends a run for is its `reason` (command.end): the
timeout is disarmed once evd has begun ending a run, and only a client
leaving overrides the cause.  `outcome()` is the metrics label: the first
that applies of `client_gone`, `timeout`, `truncated`, `signal` (killed by
a signal, or its status unknown), `failed` (non-zero exit), `exit0`.
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from typing import IO, Protocol

from evd.log.logger import log
from evd.loop.reactor import Reactor, Timer
from evd.proto.allowlist import quote
from evd.system import children
from evd.system.children import Deathsig

ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
# Between SIGTERM and SIGKILL: time for a well-behaved program to clean up.
KILL_GRACE = 1.0
READ_SIZE = 65536
# Reads of one pipe when evd stops waiting for it: what is already there,
# bounded, since an unreachable holder may still be writing.
DRAIN_READS = 16
# `reason` of command.end: why evd ended the run; "exit" when it ended itself.
EXIT, TIMEOUT, TRUNCATED, CLIENT_GONE, SHUTDOWN = "exit", "timeout", "truncated", "client_gone", "shutdown"
OUTCOMES = ("exit0", "failed", "signal", "timeout", "truncated", "client_gone")


class CommandError(Exception):
    """A request that cannot run; `code` is the framed error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class Result:
    __slots__ = ("exit", "signal", "timed_out", "truncated", "stdout", "stderr")

    def __init__(self) -> None:
        self.exit: int | None = None
        self.signal: int | None = None
        self.timed_out = False
        self.truncated = False
        self.stdout = bytearray()
        self.stderr = bytearray()


Done = Callable[[Result], object]


class Owner(Protocol):
    """What a run needs from whoever started it (commands.Runner)."""

    reactor: Reactor
    deathsig: Deathsig

    def reap_later(self, proc: subprocess.Popen[bytes]) -> None:
        """Collect a SIGKILLed process without waiting for it."""

    def answered(self, run: Run) -> None:
        """The run has answered (or would have: abandoned); count it."""

    def linger(self, run: Run, lingering: bool) -> None:
        """The answered run still has leftovers to SIGKILL (or no more)."""


def _killpg(pgid: int, signum: int) -> bool:
    """Signal a process group; False if it has no members left."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    return True


def _why(exc: BaseException) -> str:
    """An exception as words for a client: the OS's message, no repr."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return "not runnable"


class Run:
    def __init__(
        self,
        owner: Owner,
        name: str,
        argv: list[str],
        stdin: bytes,
        done: Done,
        *,
        timeout: float,
        max_output: int,
        key: str | None = None,
        peer: str | None = None,
    ):
        self.owner = owner
        self.reactor = owner.reactor
        self.name = name
        self.argv = argv
        self.key = key
        self.peer = peer
        self._done: Done | None = done
        self.result = Result()
        self.reason: str | None = None  # why evd ended it, once it does
        self.started = time.monotonic()
        self.max_output = max_output
        self._stdin = memoryview(stdin)
        self._stdin_fd = -1
        self.pidfd = -1
        self._pipes: dict[int, tuple[IO[bytes], bytearray]] = {}  # stdout, stderr while open
        self._exited = False  # the main process is reaped
        self._answered = False
        self._timeout: Timer | None = None
        self._kill_timer: Timer | None = None  # SIGKILL due, after a SIGTERM
        self._give_up_timer: Timer | None = None
        self.proc = self._spawn()
        self.pid = self.proc.pid
        try:
            self._watch(timeout)
        except BaseException as exc:
            # All or nothing: a half-watched child would never be reaped,
            # and nothing could find it to kill it.
            self._abort()
            if isinstance(exc, OSError):
                raise CommandError("internal", f"cannot watch {quote(argv[0])}: {_why(exc)}") from None
            raise
        log.info("command.start", name=name, argv=argv, command_pid=self.pid, key=key, peer=peer)

    def _spawn(self) -> subprocess.Popen[bytes]:
        deathsig = self.owner.deathsig
        program = self.argv[0]
        # Behind a prefix (setpriv) a missing program is the prefix's exit
        # status, not an error here: look first.  With cwd "/", a relative
        # path is relative to "/".
        if deathsig.prefix and _which(program) is None:
            raise CommandError("internal", f"cannot run {quote(program)}: not found or not executable")
        try:
            return subprocess.Popen(
                [*deathsig.prefix, *self.argv],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd="/",
                env=ENV,
                close_fds=True,
                # Its own session: a job-control shell's jobs leave the
                # group, not the session, and no terminal of ours is its.
                start_new_session=True,
                preexec_fn=None
                if deathsig.preexec is None
                else functools.partial(deathsig.preexec, os.getpid()),
            )
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            raise CommandError("internal", f"cannot run {quote(program)}: {_why(exc)}") from None

    def _watch(self, timeout: float) -> None:
        proc = self.proc
        if proc.stdin is None or proc.stdout is None or proc.stderr is None:
            raise RuntimeError("Popen without pipes")
        # First: the likeliest to fail (EMFILE), before anything depends on it.
        self.pidfd = os.pidfd_open(self.pid)
        self.reactor.add_reader(self.pidfd, self._on_exit)
        for pipe, buf in ((proc.stdout, self.result.stdout), (proc.stderr, self.result.stderr)):
            fd = pipe.fileno()
            os.set_blocking(fd, False)
            self.reactor.add_reader(fd, functools.partial(self._on_output, fd))
            self._pipes[fd] = (pipe, buf)
        self._stdin_fd = proc.stdin.fileno()
        os.set_blocking(self._stdin_fd, False)
        self._timeout = self.reactor.call_later(timeout, self._on_timeout)
        self._write_stdin()

    def _abort(self) -> None:
        """Undo a half-built run: kill the child, unregister and close
        everything, and leave the child to be reaped without waiting."""
        _killpg(self.pid, signal.SIGKILL)
        self.reactor.cancel(self._timeout)
        self._release_all()
        self.owner.reap_later(self.proc)

    # -- the child's pipes and exit ----------------------------------------------

    def _write_stdin(self) -> None:
        fd = self._stdin_fd
        while self._stdin:
            try:
                n = os.write(fd, self._stdin[:READ_SIZE])
            except BlockingIOError:
                self.reactor.add_writer(fd, self._write_stdin)
                return
            except OSError as exc:  # EPIPE: it does not read its stdin
                if exc.errno != errno.EPIPE:
                    log.warning("command.stdin", name=self.name, command_pid=self.pid, error=exc.strerror)
                break
            self._stdin = self._stdin[n:]
        self._close_stdin()

    def _close_stdin(self) -> None:
        if self._stdin_fd >= 0:
            self.reactor.remove_writer(self._stdin_fd)
            self._stdin_fd = -1
        if self.proc.stdin is not None:
            self.proc.stdin.close()

    def _on_output(self, fd: int) -> None:
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""  # as good as EOF: nothing more will come
        if not data:
            self._close_pipe(fd)
            self._maybe_answer()
        elif self._keep(fd, data):
            self._terminate(TRUNCATED)

    def _keep(self, fd: int, data: bytes) -> bool:
        """Store output up to the cap; True when this is the first overflow."""
        result = self.result
        room = self.max_output - len(result.stdout) - len(result.stderr)
        first = False
        if len(data) > room:
            data = data[:room]
            first = not result.truncated
            result.truncated = True
        self._pipes[fd][1].extend(data)
        return first

    def _close_pipe(self, fd: int) -> None:
        pipe, _ = self._pipes.pop(fd)
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
        self._maybe_answer()

    def reaped(self) -> None:
        """The pidfd is readable: the main process is gone; collect it."""
        self.reactor.remove_reader(self.pidfd)
        os.close(self.pidfd)
        self.pidfd = -1
        self.proc.poll()
        self._exited = True

    # -- ending it ----------------------------------------------------------------

    def _on_timeout(self) -> None:
        self._timeout = None
        self.result.timed_out = True
        self._terminate(TIMEOUT)

    def abandon(self) -> None:
        """The requesting connection closed first: nobody can receive the
        answer.  End the command (SIGTERM, SIGKILL KILL_GRACE later);
        command.end says client_gone and `done` is not called."""
        if self._answered:
            return
        self._done = None
        self._terminate(CLIENT_GONE)

    def _terminate(self, reason: str) -> None:
        """Begin the end, once: SIGTERM now, SIGKILL after KILL_GRACE."""
        if self.reason is None or reason == CLIENT_GONE:
            self.reason = reason
        if self._kill_timer is not None:
            return
        self.reactor.cancel(self._timeout)  # the first cause is the one to name
        self._timeout = None
        self._signal(signal.SIGTERM)
        self._kill_timer = self.reactor.call_later(KILL_GRACE, self._hard_kill)

    def _signal(self, signum: int) -> bool:
        """Signal the group and every process found belonging to the
        command; False if nobody was there."""
        hit = _killpg(self.pid, signum)
        pipes = {os.fstat(fd).st_ino for fd in self._pipes}
        found = children.related(self.pid, pipes=pipes)
        return children.signal_all(found, signum) > 0 or hit

    def _hard_kill(self) -> None:
        self._kill_timer = None
        self._signal(signal.SIGKILL)
        if self._answered:  # only leftovers were left
            self.owner.linger(self, False)
            return
        self._drain_pipes()
        if self._exited:
            self._answer()
        else:  # SIGKILL is on its way; uninterruptible sleep can hold it
            self._give_up_timer = self.reactor.call_later(KILL_GRACE, self._answer)

    def kill_rest(self) -> None:
        """SIGKILL now whatever is left (the grace is over, or evd exits)."""
        self.reactor.cancel(self._kill_timer)
        self._hard_kill()

    def kill_now(self) -> None:
        """Daemon exit, first half: SIGKILL everything (then `end_now`)."""
        if self.reason is None:
            self.reason = SHUTDOWN
        self.reactor.cancel(self._kill_timer)
        self._kill_timer = None
        self._signal(signal.SIGKILL)

    def end_now(self) -> None:
        """Daemon exit, second half: answer with what is known."""
        self._drain_pipes()
        self._answer()

    def _maybe_answer(self) -> None:
        if self._exited and not self._pipes:
            self._answer()

    def _release_all(self) -> None:
        """Unregister and close every descriptor of the run."""
        self.reactor.cancel(self._give_up_timer)
        for fd in list(self._pipes):
            self._close_pipe(fd)
        if self.proc.stdout is not None:  # a half-built run's, never watched
            self.proc.stdout.close()
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self._close_stdin()
        if self.pidfd >= 0:
            self.reactor.remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = -1

    def _answer(self) -> None:
        """Release everything, count, log and report.  Runs once."""
        if self._answered:
            return
        self._answered = True
        self.reactor.cancel(self._timeout)
        self._release_all()
        if not self._exited:
            self.owner.reap_later(self.proc)
        if self._kill_timer is not None:
            self.owner.linger(self, True)
        elif self.reason is None and _killpg(self.pid, 0):
            # The main process is gone; what it left in its group is not
            # wanted.  (Only then a /proc scan: it costs per process.)
            self._signal(signal.SIGTERM)
            self._kill_timer = self.reactor.call_later(KILL_GRACE, self._hard_kill)
            self.owner.linger(self, True)
        result = self.result
        code = self.proc.returncode
        result.exit = code if code is not None and code >= 0 else None
        result.signal = -code if code is not None and code < 0 else None
        self.owner.answered(self)
        log.info(
            "command.end",
            name=self.name,
            argv=self.argv,
            command_pid=self.pid,
            exit=result.exit,
            signal=result.signal,
            timed_out=result.timed_out,
            truncated=result.truncated,
            duration_ms=round((time.monotonic() - self.started) * 1000, 3),
            key=self.key,
            peer=self.peer,
            reason=self.reason or EXIT,
        )
        done, self._done = self._done, None
        if done is not None:
            done(result)

    def outcome(self) -> str:
        """The metrics outcome (module docstring): the first that applies."""
        result = self.result
        if self.reason == CLIENT_GONE:
            return "client_gone"
        if result.timed_out:
            return "timeout"
        if result.truncated:
            return "truncated"
        if result.exit is None:
            return "signal"
        return "exit0" if result.exit == 0 else "failed"


def _which(program: str) -> str | None:
    if "/" in program:
        program = os.path.join("/", program)
    return shutil.which(program, path=ENV["PATH"])
