"""Program services (SPEC section 14): a program started for each connection,
the connection its stdin and stdout -- inetd's `nowait`, systemd's
`Accept=yes`.

By the time `connection_made` runs, the listener has applied every limit,
access rule and ban, and the transport knows the client (after a PROXY
header, when there is one): the program is started for it then.

Plain TCP and UNIX: the socket itself becomes the child's stdin and stdout,
and evd closes its own descriptor (`transport.hand_off`): the bytes never
pass through evd, which is what makes it as cheap as inetd.  The connection
stays open in evd's books -- counted for max_connections and per_source,
listed by `evd ctl conns` with its `exec_pid` -- until the child is
finished, and then `conn.close` comes.  evd cannot see its traffic, so
idle_timeout does not apply to it: `timeout` is the program's limit.

TLS: evd stays in between.  What the client sends is decrypted and written
to the child's stdin pipe; what the child writes to stdout is encrypted and
sent.  Both directions are bounded: while the child's stdin does not take
more, the client is not read; while the client's queue is above
write_high, the child's stdout is not read.  The client's EOF closes the
child's stdin; the child's end closes the connection once flushed.  evd
carries the bytes, so idle_timeout applies as to any connection.

stderr is read by evd in both cases, and only its last STDERR_TAIL bytes
are kept, for `exec.end`: a child writing gigabytes there costs evd a
pipe's reads and 1 KiB.

The child (commands/child.py, shared with the command runner) leads its own
process group; its exit is watched through a pidfd, never waited for.  A
child whose connection evd closes (`evd ctl kill`, shutdown after
shutdown_timeout, a TLS error) has its group SIGKILLed at once, and
`exec.end` is logged before `conn.close`.
"""

from __future__ import annotations

import errno
import functools
import os
import signal
from collections.abc import Mapping
from typing import IO, TYPE_CHECKING

from evd.commands.child import PIPE, Child, Launch, Owner, Process, Spawned, SpawnError, killpg
from evd.commands.spawner import Spawner
from evd.handlers.base import Handler
from evd.log.logger import log
from evd.loop.seams import Reason

if TYPE_CHECKING:
    from evd.loop.seams import ServiceState, Transport

# SPEC section 14: a program's whole environment, before its own `env`.
ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
# What `exec.end` keeps of stderr: enough for the error a program died with.
STDERR_TAIL = 1024
# TLS relay: what may wait for the child's stdin before the client is no
# longer read (a pipe holds 64 KiB more).
STDIN_HIGH = 65536
# TLS relay: what a client may send while its program is being started
# (a few milliseconds); past it, the client is not read until it is.
PENDING_MAX = 1048576


class Programs:
    """What every program connection of a daemon shares: the owner of the
    children (commands.Runner: reaping, leftovers), the spawner that starts
    them off the loop, and, by "services.NAME", the identity preflight
    resolved."""

    def __init__(
        self,
        owner: Owner,
        identities: Mapping[str, tuple[int | None, int | None]],
        spawner: Spawner | None = None,
    ):
        self.owner = owner
        self.identities = identities
        self.spawner = spawner


class ProgramChild(Child):
    """A connection's program: stderr kept as a tail, stdout relayed.

    No parent-death signal: the program serves its client on its own
    socket, as inetd's and systemd's Accept=yes services do, and if evd is
    killed it goes on until that client is done (a TLS relay's child sees
    its pipes close).  Under systemd the unit's cgroup still ends it at
    stop.  What that saves is an exec per connection (setpriv), half of
    what starting a program costs."""

    parent_death = False

    def __init__(
        self,
        handler: Program,
        launch: Launch,
        *,
        relay: bool,
        sock: int,
        timeout: float,
        proc: Process | None,
    ):
        self.handler = handler
        self.tail = bytearray()
        self.stdout_fd = -1
        io = PIPE if relay else sock
        super().__init__(handler.programs.owner, launch, stdin=io, stdout=io, timeout=timeout, proc=proc)
        if relay and self.proc.stdout is not None:
            self.stdout_fd = self.proc.stdout.fileno()

    def _keep(self, fd: int, data: bytes) -> bool:
        if fd == self.stdout_fd:
            self.handler.from_child(data)
        else:
            tail = self.tail
            tail += data
            if len(tail) > STDERR_TAIL:
                del tail[:-STDERR_TAIL]
        return False

    def pause_stdout(self, paused: bool) -> None:
        """Flow control of the relay: stop (or go on) reading stdout."""
        fd = self.stdout_fd
        if fd < 0 or fd not in self._pipes:
            return
        if paused:
            self.reactor.remove_reader(fd)
        else:
            self.reactor.add_reader(fd, lambda: self._on_output(fd))

    def _finished(self) -> None:
        self.handler.child_finished(self)


class Program(Handler):
    __slots__ = (
        "service",
        "programs",
        "child",
        "launch",
        "_relay",
        "_pending",
        "_stdin",
        "_stdin_fd",
        "_stdin_eof",
    )

    def __init__(self, service: ServiceState, programs: Programs):
        self.service = service
        self.programs = programs
        self.child: ProgramChild | None = None
        self._relay = False
        self._pending = False  # the spawner is starting the program
        self._stdin = bytearray()  # TLS: for the child, not taken yet
        self._stdin_fd = -1
        self._stdin_eof = False

    @property
    def exec_pid(self) -> int | None:
        """The running child's pid (`evd ctl conns`), or None."""
        child = self.child
        return child.pid if child is not None and not child.finished else None

    def connection_made(self, transport: Transport) -> None:
        self.transport = transport
        config = self.service.config
        self._relay = relay = transport.proto == "tls"
        uid, gid = self.programs.identities.get(f"services.{config.name}", (None, None))
        self.launch = launch = Launch(config.exec, self._environment(transport), config.cwd, uid, gid)
        if not relay:  # the socket is the child's: evd must not read it meanwhile
            transport.pause_reading()
        try:
            # Not found: said here, before a setpriv prefix would hide it.
            if not os.access(launch.argv[0], os.X_OK):
                raise SpawnError("not found or not executable")
            if not relay:
                os.set_blocking(transport.fd, True)  # the child's stdin: read as any file
            spawner = self.programs.spawner
            if spawner is not None and spawner.can_start(launch):
                self._spawn(spawner)
                return
            child = ProgramChild(
                self, launch, relay=relay, sock=transport.fd, timeout=config.timeout, proc=None
            )
        except (SpawnError, OSError) as exc:
            self._cannot_start(exc)
            return
        self._started(child)

    def _spawn(self, spawner: Spawner) -> None:
        """Start the program off the loop (commands/spawner.py); the pipes
        are made here, the child's ends closed once the spawner has its
        own copies."""
        ours, theirs = [], []
        try:
            err_r, err_w = os.pipe()
            ours.append(err_r)
            theirs.append(err_w)
            if self._relay:
                in_r, in_w = os.pipe()
                out_r, out_w = os.pipe()
                ours += [in_w, out_r]
                theirs += [in_r, out_w]
                stdio = (in_r, out_w, err_w)
            else:
                stdio = (self.transport.fd, self.transport.fd, err_w)
            launch = self.launch
            spawner.start(
                launch.argv, dict(launch.env), stdio, functools.partial(self._spawned, ours), launch.cwd
            )
        except BaseException:
            for fd in ours:
                os.close(fd)
            raise
        finally:
            for fd in theirs:
                os.close(fd)
        self._pending = True

    def _spawned(self, ours: list[int], result: int | OSError) -> None:
        """The spawner is done: watch the child, or say why there is none."""
        self._pending = False
        transport = self.transport
        if isinstance(result, OSError) or transport.closed:
            for fd in ours:
                os.close(fd)
            if not isinstance(result, OSError):  # killed or shut down meanwhile
                killpg(result, signal.SIGKILL)
                self.programs.owner.reap_later(Spawned(result, None, None, None))
            elif not transport.closed:
                self._cannot_start(result)
            return
        if self._relay:
            proc = Spawned(result, _file(ours[1], "wb"), _file(ours[2], "rb"), _file(ours[0], "rb"))
        else:
            proc = Spawned(result, None, None, _file(ours[0], "rb"))
        timeout = self.service.config.timeout
        try:
            child = ProgramChild(self, self.launch, relay=self._relay, sock=-1, timeout=timeout, proc=proc)
        except SpawnError as exc:
            self._cannot_start(exc)
            return
        self._started(child)

    def _cannot_start(self, exc: BaseException) -> None:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        self._log_end(None, error=f"cannot run {self.launch.argv[0]}: {why}")
        self.transport.close(Reason.ERROR)

    def _started(self, child: ProgramChild) -> None:
        self.child = child
        transport = self.transport
        log.exec_start(self.service.name, transport.conn_id, self.launch.argv, child.pid, transport.peer)
        if not self._relay:
            transport.hand_off()  # the child has it; evd keeps nothing
            return
        assert child.proc.stdin is not None
        self._stdin_fd = child.proc.stdin.fileno()
        os.set_blocking(self._stdin_fd, False)
        if self._stdin:  # what came with the handshake
            self._write_stdin()
        elif self._stdin_eof:
            self._close_stdin()
        else:
            transport.resume_reading()

    def _environment(self, transport: Transport) -> dict[str, str]:
        config = self.service.config
        env = dict(ENV)
        if transport.host is not None:  # a UNIX peer has no address
            env["REMOTE_ADDR"] = transport.host
            env["REMOTE_PORT"] = str(transport.port)
        env["EVD_SERVICE"] = config.name
        env["EVD_CONN"] = str(transport.conn_id)
        env.update(config.env)
        return env

    # -- TLS: the relay ------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._pending:  # the program is being started: kept for it
            self._stdin += data
            if len(self._stdin) > PENDING_MAX:
                self.transport.pause_reading()
            return
        if self._stdin_fd < 0:
            return  # the child's stdin is closed: what it will not read is dropped
        self._stdin += data
        self._write_stdin()

    def _write_stdin(self) -> None:
        fd, pending = self._stdin_fd, self._stdin
        reactor = self.transport.reactor
        try:
            while pending:
                n = os.write(fd, pending)
                del pending[:n]
        except BlockingIOError:
            reactor.add_writer(fd, self._write_stdin)
            if len(pending) > STDIN_HIGH:
                self.transport.pause_reading()
            return
        except OSError as exc:  # EPIPE: it stopped reading
            if exc.errno != errno.EPIPE:
                log.warning("exec.stdin", conn=self.transport.conn_id, error=exc.strerror)
            self._close_stdin()
            return
        reactor.remove_writer(fd)
        self.transport.resume_reading()
        if self._stdin_eof:
            self._close_stdin()

    def _close_stdin(self) -> None:
        self._stdin.clear()
        if self._stdin_fd >= 0:
            self.transport.reactor.remove_writer(self._stdin_fd)
            self._stdin_fd = -1
            child = self.child
            if child is not None and child.proc.stdin is not None:
                child.proc.stdin.close()

    def eof_received(self) -> bool:
        """The client is done sending: so is the child's stdin, once what
        waits is written.  The connection stays open for its answer."""
        self._stdin_eof = True
        if not self._stdin and not self._pending:
            self._close_stdin()
        return True

    def from_child(self, data: bytes) -> None:
        transport = self.transport
        transport.write(data)
        if transport.write_paused and self.child is not None:
            self.child.pause_stdout(True)

    def resume_writing(self) -> None:
        if self.child is not None:
            self.child.pause_stdout(False)

    # -- the end -------------------------------------------------------------------

    def child_finished(self, child: ProgramChild) -> None:
        self._close_stdin()
        self._log_end(child)
        self.transport.close_when_flushed(Reason.DONE)

    def connection_lost(self, reason: str) -> None:
        """evd closed the connection first (killed, shutdown, a TLS error):
        the child's group goes with it, SIGKILLed now."""
        child = self.child
        if child is not None and not child.finished:
            child.kill_now(str(reason))
            child.end_now()

    def _log_end(self, child: ProgramChild | None, error: str | None = None) -> None:
        transport = self.transport
        name, argv = self.service.name, self.launch.argv
        if child is None:
            log.warning(
                "exec.end", service=name, conn=transport.conn_id, argv=list(argv), peer=transport.peer,
                exec_pid=None, error=error,
            )  # fmt: skip
            return
        log.exec_end(
            name, transport.conn_id, argv, transport.peer, child.pid, child.exit, child.signal,
            child.timed_out, child.micros(), child.tail.decode("utf-8", "replace"),
        )  # fmt: skip


def _file(fd: int, mode: str) -> IO[bytes]:
    return open(fd, mode, buffering=0)  # closed with the child's other descriptors
