"""One command's process, from request to answer (the runner that decides
what may run is `runner.py`; the child's life -- spawn, watch, end, reap --
is `child.py`'s, shared with program services).

A command is a child (child.py) with stdin from the request body, cwd and
environment from its `[commands.NAME]` entry or the command service (SPEC
sections 5 and 14), and stdout and stderr read as they come, capped at
`max_output` together.  Its stdin pipe is written as the child reads.

The answer goes back when the child is finished (child.py says when, and
why evd ended it).  A client that leaves first `abandon`s the run: nobody
can receive the answer, so the child is ended.  `outcome()` is the metrics
label: the first that applies of `client_gone`, `timeout`, `truncated`,
`signal` (killed by a signal, or its status unknown), `failed` (non-zero
exit), `exit0`.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from typing import Protocol

from evd.commands import child
from evd.commands.child import CLIENT_GONE, EXIT, PIPE, READ_SIZE, Child, Launch, SpawnError
from evd.log.logger import log
from evd.proto.allowlist import quote

ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
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


class Owner(child.Owner, Protocol):
    """What a run needs from whoever started it (commands.Runner)."""

    def answered(self, run: Run) -> None:
        """The run has answered (or would have: abandoned); count it."""


class Run(Child):
    def __init__(
        self,
        owner: Owner,
        name: str,
        launch: Launch,
        stdin: bytes,
        done: Done,
        *,
        timeout: float,
        max_output: int,
        key: str | None = None,
        peer: str | None = None,
    ):
        self.runner = owner
        self.name = name
        self.key = key
        self.peer = peer
        self._done: Done | None = done
        self.result = Result()
        self.max_output = max_output
        self._stdin = memoryview(stdin)
        self._stdin_fd = -1
        self._bufs: dict[int, bytearray] = {}
        program = launch.argv[0]
        # Behind a prefix (setpriv) a missing program is the prefix's exit
        # status, not an error here: look first.  With cwd "/", a relative
        # path is relative to "/".
        if owner.deathsig.prefix and _which(program, launch.env.get("PATH", "")) is None:
            raise CommandError("internal", f"cannot run {quote(program)}: not found or not executable")
        try:
            super().__init__(owner, launch, stdin=PIPE, stdout=PIPE, timeout=timeout)
        except SpawnError as exc:
            raise CommandError("internal", f"{exc.doing} {quote(program)}: {exc}") from None
        log.info("command.start", name=name, argv=self.argv, command_pid=self.pid, key=key, peer=peer)

    def _watch(self, timeout: float) -> None:
        proc = self.proc
        if proc.stdin is None or proc.stdout is None or proc.stderr is None:
            raise RuntimeError("Popen without pipes")
        super()._watch(timeout)
        self._bufs = {proc.stdout.fileno(): self.result.stdout, proc.stderr.fileno(): self.result.stderr}
        self._stdin_fd = proc.stdin.fileno()
        os.set_blocking(self._stdin_fd, False)
        self._write_stdin()

    # -- the child's pipes ---------------------------------------------------------

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

    def _keep(self, fd: int, data: bytes) -> bool:
        """Store output up to the cap; True when this is the first overflow."""
        result = self.result
        room = self.max_output - len(result.stdout) - len(result.stderr)
        first = False
        if len(data) > room:
            data = data[:room]
            first = not result.truncated
            result.truncated = True
        self._bufs[fd].extend(data)
        return first

    def _release_all(self) -> None:
        self._close_stdin()
        super()._release_all()

    # -- ending it -----------------------------------------------------------------

    def _on_timeout(self) -> None:
        self.result.timed_out = True  # known at once, before the answer
        super()._on_timeout()

    def abandon(self) -> None:
        """The requesting connection closed first: nobody can receive the
        answer.  End the command (SIGTERM, SIGKILL KILL_GRACE later);
        command.end says client_gone and `done` is not called."""
        if self.finished:
            return
        self._done = None
        self.terminate(CLIENT_GONE)

    def _finished(self) -> None:
        """Count, log and report."""
        result = self.result
        result.exit, result.signal, result.timed_out = self.exit, self.signal, self.timed_out
        self.runner.answered(self)
        log.info(
            "command.end",
            name=self.name,
            argv=self.argv,
            command_pid=self.pid,
            exit=result.exit,
            signal=result.signal,
            timed_out=result.timed_out,
            truncated=result.truncated,
            duration_ms=self.duration_ms(),
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


def _which(program: str, path: str) -> str | None:
    if "/" in program:
        program = os.path.join("/", program)
    return shutil.which(program, path=path)
