"""Starting evd: from a valid configuration to a serving process.

`evd run` and `evd start` share one sequence, and its order is the point:

1. check what the configuration names (key file, user, group) -> exit 78
2. open the log file and log `daemon.start`
3. hold SIGHUP/SIGUSR1 (server/signals.py), take the pidfile
                                             -> "already running, pid N", 1
4. adopt systemd's sockets, bind the rest    -> "... address in use", 1
5. hand the log file and pidfile to `daemon.user`, drop privileges
6. `evd start` only: detach (python-daemon's DaemonContext); the daemon
   reports "ready PID" or "error ..." through a pipe to the `evd start`
   process, which waits for that line and exits with it
7. serve: one Daemon, or a Supervisor of `workers` processes

Everything that fails because of the operator's setup fails in 1-5, while
the terminal is still there to say so.  From step 3 until the reactor has
handlers, SIGHUP and SIGUSR1 are blocked: the pidfile already names the
process, and their default action would kill it.

Why `evd start` forks before DaemonContext.open(): open() forks twice and
the first parent simply exits inside it, so the process that called open()
never learns whether the daemon came up.  Our own fork keeps one process
back to wait on the readiness pipe (for at most READY_TIMEOUT) and to reap
the child open() leaves behind.
"""

from __future__ import annotations

import os
import resource
import select
import socket
import sys
import time
from collections.abc import Callable

import daemon as python_daemon

from evd import __version__
from evd.config.model import Config, ConfigError
from evd.log.logger import log
from evd.net.listeners import BindError
from evd.server import preflight, signals
from evd.server.control import drivers, endpoints
from evd.server.control.endpoints import SurfaceKey
from evd.server.daemon import Daemon
from evd.server.reload_plan import ListenerKey, Overrides, log_settings
from evd.server.sockets import Slots, bind_slots, unbind
from evd.server.supervisor import Supervisor
from evd.system import systemd
from evd.system.pidfile import AlreadyRunning, Pidfile, PidfileError
from evd.system.privileges import Credentials, PrivilegeError, drop

# How long `evd start` waits for the daemon to say it listens.  Binding is
# done before detaching, so this only covers the fork and the services'
# start: seconds at worst.
READY_TIMEOUT = 30.0
UMASK = 0o022  # SPEC: not DaemonContext's default of 0


class StartError(Exception):
    """Start-up failed; str() is the one line for the terminal."""

    def __init__(self, message: str, config_error: bool = False):
        super().__init__(message)
        self.config_error = config_error


class Launch:
    """What steps 1-5 produce and steps 6-7 use."""

    def __init__(
        self,
        config: Config,
        machine: preflight.Machine,
        overrides: Overrides,
        pidfile: Pidfile | None,
        slots: Slots,
        inherited: set[ListenerKey],
        notifier: systemd.Notifier,
        mask: signals.Mask,
        surfaces: dict[SurfaceKey, socket.socket] | None = None,
    ):
        self.config = config
        self.machine = machine  # what step 1 read: key secrets, credentials
        self.overrides = overrides  # --log-level / --log-format
        self.pidfile = pidfile  # Pidfile, or None (`run` without one)
        self.slots = slots  # {listener key: [socket per worker]}
        self.inherited = inherited  # keys whose socket came from systemd
        self.notifier = notifier
        self.mask = mask  # the signal mask before step 3 held some
        self.surfaces = surfaces or {}  # the control socket and metrics ports

    def descriptors(self) -> list[int]:
        """What must survive DaemonContext's closing of every descriptor."""
        fds = {s.fileno() for socks in self.slots.values() for s in socks}
        fds.update(s.fileno() for s in self.surfaces.values())
        if self.pidfile is not None:
            fds.add(self.pidfile.fileno())
        if log.sink.path:
            fds.add(log.sink.fileno())
        notify = self.notifier.fileno()
        if notify is not None:
            fds.add(notify)
        return sorted(fds)


def prepare(config: Config, overrides: Overrides, detach: bool) -> Launch:
    """Steps 1-5 (`detach`: for `evd start`); StartError on any failure,
    with nothing left behind."""
    try:
        machine = preflight.check(config)
    except ConfigError as exc:
        raise StartError(str(exc), config_error=True) from None
    try:
        log.configure(
            *log_settings(config, overrides),
            buffer=config.log.buffer,
            journal_socket=config.log.journal_socket,
        )
    except OSError as exc:  # a log file (a journal that is away is no failure: see below)
        reason = f"[Errno {exc.errno}] {exc.strerror}"
        raise StartError(f"cannot open log file {config.log.file}: {reason}") from None
    problem = log.journal_problem()
    if problem:  # SPEC 12: serve on, the entries wait for journald
        print(
            f"evd: warning: cannot reach the journal at {config.log.journal_socket} ({problem}); "
            f"serving on, entries wait in log.buffer until it answers",
            file=sys.stderr,
            flush=True,
        )
    log.info("daemon.start", version=__version__, config=config.source)
    # From here until the reactor has handlers, SIGHUP/SIGUSR1 sent to the
    # pid of the pidfile wait instead of killing us (server/signals.py).
    mask = signals.hold()
    pidfile = _take_pidfile(config.daemon.pidfile, required=detach, write_pid=not detach)
    try:
        raise_nofile_limit()
        slots, inherited = _listen(config)
        try:
            bound = endpoints.bind_all(config)
        except BindError:
            unbind(slots)
            raise
        if machine.credentials is not None:
            _hand_over(machine.credentials, pidfile, config.log.file)
            drop(machine.credentials)
    except (BindError, PidfileError, PrivilegeError) as exc:
        if pidfile is not None:
            pidfile.release()
        log.error("daemon.stop", reason="error", signal=None, error=str(exc))
        raise StartError(str(exc)) from None
    notifier = systemd.Notifier.from_env()
    return Launch(config, machine, overrides, pidfile, slots, inherited, notifier, mask, bound)


def raise_nofile_limit() -> None:
    """Use every descriptor we are allowed: each connection costs one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def _take_pidfile(path: str, required: bool, write_pid: bool) -> Pidfile | None:
    """Step 3.  `evd start` (`write_pid` false) locks the file but leaves it
    empty: its own pid is not the daemon's, and a pid in the file is an
    invitation to signal it.  The daemon writes its pid once detached."""
    pidfile = Pidfile(path)
    try:
        pidfile.acquire(write_pid=write_pid)
    except AlreadyRunning as exc:
        log.error("daemon.stop", reason="error", signal=None, error=str(exc))
        raise StartError(str(exc)) from None
    except PidfileError as exc:
        if required:
            log.error("daemon.stop", reason="error", signal=None, error=str(exc))
            raise StartError(str(exc)) from None
        # `evd run` as a user who cannot write /run/evd: serve anyway, but
        # evd stop/status/reload will not find this daemon.
        log.warning("pidfile.skip", error=str(exc))
        return None
    return pidfile


def _listen(config: Config) -> tuple[Slots, set[ListenerKey]]:
    """Step 4: {key: [socket per worker]} and the keys systemd gave us."""
    keys = config.listener_keys()
    adopted, leftover = systemd.match(systemd.listen_fds(), keys)
    for sock, name in leftover:
        log.warning(
            "systemd.socket",
            name=name,
            address=systemd.describe(sock),
            error="matches no configured listener; closed",
        )
        sock.close()
    for key, sock in adopted.items():
        log.info("systemd.adopt", service=key[0], proto=key[1].proto, address=systemd.describe(sock))
    try:
        slots = bind_slots(keys, config.daemon.workers, adopted)
    except BindError:
        for sock in adopted.values():
            sock.close()
        raise
    return slots, set(adopted)


def _hand_over(credentials: Credentials, pidfile: Pidfile | None, log_file: str) -> None:
    """Give what we keep writing to the user we become."""
    if pidfile is not None:
        pidfile.chown(credentials.uid, credentials.gid)
    if log_file:
        try:
            os.chown(log_file, credentials.uid, credentials.gid)
        except OSError as exc:
            raise PrivilegeError(
                f"cannot hand {log_file} to {credentials.user or credentials.uid}: "
                f"chown: [Errno {exc.errno}] {exc.strerror}"
            ) from None


def serve(launch: Launch, on_ready: Callable[[], None] | None = None) -> int:
    """Step 7, in this process."""
    config = launch.config
    if config.daemon.workers > 1:
        supervisor = Supervisor(
            config,
            launch.machine,
            launch.slots,
            inherited=launch.inherited,
            notifier=launch.notifier,
            pidfile=launch.pidfile,
            log_overrides=launch.overrides,
            surfaces=launch.surfaces,
        )
        return supervisor.run(on_ready)
    daemon = Daemon(
        config,
        launch.machine,
        notifier=launch.notifier,
        pidfile=launch.pidfile,
        log_overrides=launch.overrides,
    )
    bound: dict[ListenerKey, socket.socket] = {key: socks[0] for key, socks in launch.slots.items()}
    daemon.open(bound, inherited=launch.inherited)
    local = drivers.Local(daemon)
    served = endpoints.Surfaces(daemon.reactor, config.limits, launch.surfaces, local, local)
    served.open()
    daemon.closers.append(served.close)
    return daemon.serve(on_ready)


# -- evd start ---------------------------------------------------------------


def start(launch: Launch) -> int:
    """Step 6 and 7 in a detached daemon; here, wait for its word.  The
    daemon's pid, or StartError."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read_end)
        os._exit(_detach_and_serve(launch, write_end))
    os.close(write_end)
    signals.restore(launch.mask)  # this process is a client again
    try:
        line = _await_line(read_end, READY_TIMEOUT)
    finally:
        os.close(read_end)
        _reap(child)
    word, _, rest = line.partition(" ")
    if word == "ready" and rest.isdigit():
        return int(rest)
    raise StartError(rest if word == "error" else f"unexpected word from the daemon: {line!r}")


def _detach_and_serve(launch: Launch, write_end: int) -> int:
    """In the child: become the daemon, serve, report through `write_end`."""
    reporter = _Reporter(write_end)
    try:
        context = python_daemon.DaemonContext(
            working_directory="/",
            umask=UMASK,
            detach_process=True,
            prevent_core=True,
            files_preserve=launch.descriptors() + [write_end],
            signal_map={},  # our reactor owns the signals
        )
        context.open()  # this process exits in here; the daemon returns
        if launch.pidfile is not None:  # still holding SIGHUP/SIGUSR1 until it serves
            launch.pidfile.write(os.getpid())
        code = serve(launch, on_ready=lambda: reporter.say(f"ready {os.getpid()}"))
    except BaseException as exc:
        log.error("daemon.stop", reason="error", signal=None, error=str(exc), exc_info=exc)
        reporter.say(f"error {exc}")
        code = 1
    reporter.say("error the daemon stopped before it was ready")
    log.sink.write_all()
    return code


class _Reporter:
    """The daemon's end of the readiness pipe: says one line, once."""

    def __init__(self, fd: int):
        self.fd: int | None = fd

    def say(self, line: str) -> None:
        if self.fd is None:
            return
        try:
            os.write(self.fd, line.replace("\n", " ").encode() + b"\n")
        except OSError:
            pass  # `evd start` gave up waiting: nobody to tell
        os.close(self.fd)
        self.fd = None


def _await_line(fd: int, timeout: float) -> str:
    """One line from the readiness pipe, within `timeout` (this is the
    `evd start` process, a client: it may wait)."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise StartError(f"the daemon did not report ready within {timeout:.0f} s; see its log")
        readable, _, _ = select.select([fd], [], [], left)
        if readable:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise StartError("the daemon exited during start-up; see its log")
            data += chunk
    return data.partition(b"\n")[0].decode("utf-8", "replace")


def _reap(pid: int) -> None:
    """The child exits inside DaemonContext.open(), long before the daemon is
    ready; reap it (bounded, should it be stuck)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        select.select([pidfd], [], [], 5.0)
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    finally:
        os.close(pidfd)
