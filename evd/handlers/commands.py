"""The command service: allow-listed programs, run without blocking the loop.

Only `[commands.NAME]` entries run, as `argv` plus client arguments that the
entry allows and that each match its `arg_pattern`.  There is no shell, so
`;`, `$(...)` and friends are just bytes that fail the pattern.

A command is a child process in its own process group with stdin from the
request body, cwd `/` and an environment of PATH and LANG only.  The reactor
watches everything about it: its stdin pipe (written as the child reads),
stdout and stderr (read as they come, capped at `max_output` together), and
its exit (a pidfd, readable when the child is gone).  A timeout or the output
cap sends SIGTERM to the group and SIGKILL a second later.  The client gets
its answer once the command exits and its pipes close; whatever it left
running in its group gets the same SIGTERM-then-SIGKILL, so no command leaks
processes.  Nothing here ever waits: a command that sleeps for a minute costs
the loop nothing.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import signal
import subprocess
import time

from evd.core.log import log

ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
# Between SIGTERM and SIGKILL: time for a well-behaved program to clean up.
KILL_GRACE = 1.0
READ_SIZE = 65536


class CommandError(Exception):
    """A request that cannot run; `code` is the framed error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class Result:
    __slots__ = ("exit", "signal", "timed_out", "truncated", "stdout", "stderr")

    def __init__(self):
        self.exit = None
        self.signal = None
        self.timed_out = False
        self.truncated = False
        self.stdout = bytearray()
        self.stderr = bytearray()


class Runner:
    """Every running command of one daemon, and the rules they run under."""

    def __init__(self, reactor, service_config, commands):
        self.reactor = reactor
        self.running: set[Run] = set()
        # Finished runs whose group still had members: SIGTERMed, SIGKILL due.
        self.lingering: set[Run] = set()
        self.total = 0
        self.apply(service_config, commands)

    def apply(self, service_config, commands) -> None:
        self.config = service_config
        self.commands = commands

    def argv(self, name, args) -> list[str]:
        """The argv for a request, or CommandError (unknown_command, bad_args)."""
        spec = self.commands.get(name) if isinstance(name, str) else None
        if spec is None:
            raise CommandError("unknown_command", f"no command named {name!r}")
        if args is None:
            args = []
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise CommandError("bad_args", "args must be a list of strings")
        if args and not spec.args:
            raise CommandError("bad_args", f"command {name!r} takes no arguments")
        pattern = re.compile(spec.arg_pattern)
        for arg in args:
            if not pattern.fullmatch(arg):
                raise CommandError("bad_args", f"argument {arg!r} does not match {spec.arg_pattern}")
        return list(spec.argv) + args

    def start(self, name: str, argv: list[str], stdin: bytes, done) -> Run:
        """Run argv; `done(result)` is called from the loop when it ends."""
        if len(self.running) >= self.config.max_concurrent:
            raise CommandError("busy", f"{len(self.running)} commands running (max_concurrent)")
        run = Run(self, name, argv, stdin, done)
        self.running.add(run)
        self.total += 1
        return run

    def kill_all(self) -> None:
        for run in list(self.running):
            run.kill(signal.SIGKILL)
            run.finish()
        for run in list(self.lingering):
            run.kill_rest()


class Run:
    def __init__(self, runner: Runner, name: str, argv: list[str], stdin: bytes, done):
        self.runner = runner
        self.reactor = runner.reactor
        self.name = name
        self.argv = argv
        self.done = done
        self.result = Result()
        self.started = time.monotonic()
        self.max_output = runner.config.max_output
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd="/",
                env=ENV,
                close_fds=True,
                process_group=0,
            )
        except OSError as exc:
            raise CommandError("internal", f"cannot run {argv[0]}: {exc.strerror}") from None
        self.pid = self.proc.pid
        self._stdin = memoryview(stdin)
        self._open = {}  # fd -> buffer, for stdout and stderr while open
        self._exited = False
        self._finished = False
        self._kill_timer = None
        for pipe, buf in ((self.proc.stdout, self.result.stdout), (self.proc.stderr, self.result.stderr)):
            fd = pipe.fileno()
            os.set_blocking(fd, False)
            self._open[fd] = buf
            self.reactor.add_reader(fd, functools.partial(self._on_output, fd))
        os.set_blocking(self.proc.stdin.fileno(), False)
        self._write_stdin()
        self._pidfd = os.pidfd_open(self.pid)
        self.reactor.add_reader(self._pidfd, self._on_exit)
        self._timeout = self.reactor.call_later(runner.config.timeout, self._on_timeout)
        log.info("command.start", name=name, argv=argv, command_pid=self.pid)

    def _write_stdin(self) -> None:
        stdin = self.proc.stdin
        fd = stdin.fileno()
        while self._stdin:
            try:
                n = os.write(fd, self._stdin[:READ_SIZE])
            except BlockingIOError:
                self.reactor.add_writer(fd, self._write_stdin)
                return
            except OSError as exc:  # EPIPE: it does not read its stdin
                if exc.errno != errno.EPIPE:
                    log.warning("command.stdin", name=self.name, command_pid=self.pid, error=str(exc))
                break
            self._stdin = self._stdin[n:]
        self.reactor.remove_writer(fd)
        stdin.close()

    def _on_output(self, fd: int) -> None:
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        if not data:
            self._close_pipe(fd)
            return
        result = self.result
        room = self.max_output - len(result.stdout) - len(result.stderr)
        if len(data) > room:
            data = data[:room]
            if not result.truncated:
                result.truncated = True
                self.kill(signal.SIGTERM)
        self._open[fd] += data
        self._maybe_finish()

    def _close_pipe(self, fd: int) -> None:
        self.reactor.remove_reader(fd)
        del self._open[fd]
        self._maybe_finish()

    def _on_exit(self) -> None:
        self.reactor.remove_reader(self._pidfd)
        self._exited = True
        self.proc.poll()
        self._maybe_finish()

    def _on_timeout(self) -> None:
        self.result.timed_out = True
        self.kill(signal.SIGTERM)

    def kill(self, signum: int) -> None:
        """Signal the whole group; after SIGTERM, SIGKILL follows."""
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:  # the group is empty
            return
        if signum == signal.SIGTERM and self._kill_timer is None:
            self._kill_timer = self.reactor.call_later(KILL_GRACE, self.kill_rest)

    def kill_rest(self) -> None:
        """SIGKILL whatever is left of the group (the grace is over)."""
        self.reactor.cancel(self._kill_timer)
        self._kill_timer = None
        self.runner.lingering.discard(self)
        self.kill(signal.SIGKILL)

    def _maybe_finish(self) -> None:
        if self._exited and not self._open:
            self.finish()

    def finish(self) -> None:
        """Release everything; report unless already reported.  Runs once."""
        if self._finished:
            return
        self._finished = True
        reactor = self.reactor
        for fd in list(self._open):
            reactor.remove_reader(fd)
        if not self._exited:
            reactor.remove_reader(self._pidfd)
            self.proc.wait()  # only after SIGKILL, at daemon exit
        reactor.cancel(self._timeout)
        # The main process is gone; what it left in its group is not wanted.
        # A pending SIGKILL (after a timeout) stays armed for it.
        if self._kill_timer is None:
            self.kill(signal.SIGTERM)
        if self._kill_timer is not None:
            self.runner.lingering.add(self)
        if self.proc.stdin and not self.proc.stdin.closed:
            reactor.remove_writer(self.proc.stdin.fileno())
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        os.close(self._pidfd)
        self.runner.running.discard(self)
        code = self.proc.returncode
        result = self.result
        result.exit = code if code is not None and code >= 0 else None
        result.signal = -code if code is not None and code < 0 else None
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
        )
        self.done(result)
