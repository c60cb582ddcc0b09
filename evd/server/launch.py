"""Starting evd: from a valid configuration to a serving process.

`evd run` and `evd start` share one sequence, and its order is the point:

1. check what the configuration names (key file, user, group) -> exit 78
2. open the log file and log `daemon.start`
3. take the pidfile                          -> "already running, pid N", 1
4. adopt systemd's sockets, bind the rest    -> "... address in use", 1
5. hand the log file and pidfile to `daemon.user`, drop privileges
6. `evd start` only: detach (python-daemon's DaemonContext); the daemon
   reports "ready PID" or "error ..." through a pipe to the `evd start`
   process, which waits for that line and exits with it
7. serve: one Daemon, or a Supervisor of `workers` processes

Everything that fails because of the operator's setup fails in 1-5, while
the terminal is still there to say so.

Why `evd start` forks before DaemonContext.open(): open() forks twice and
the first parent simply exits inside it, so the process that called open()
never learns whether the daemon came up.  Our own fork keeps one process
back to wait on the readiness pipe (for at most READY_TIMEOUT) and to reap
the child open() leaves behind.
"""

from __future__ import annotations

import os
import select
import time

import daemon as python_daemon

from evd import __version__
from evd.core import config as config_mod
from evd.core.log import log
from evd.net.listeners import BindError
from evd.server import preflight
from evd.server.daemon import Daemon, bind_all, listener_keys, raise_nofile_limit
from evd.server.supervisor import Supervisor, bind_slots
from evd.system import systemd
from evd.system.pidfile import AlreadyRunning, Pidfile, PidfileError
from evd.system.privileges import PrivilegeError, drop

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

    def __init__(self, config, overrides: dict, pidfile, slots: dict, inherited: set, notifier):
        self.config = config
        self.overrides = overrides  # --log-level / --log-format
        self.pidfile = pidfile  # Pidfile, or None (`run` without one)
        self.slots = slots  # {listener key: [socket per worker]}
        self.inherited = inherited  # keys whose socket came from systemd
        self.notifier = notifier

    def descriptors(self) -> list[int]:
        """What must survive DaemonContext's closing of every descriptor."""
        fds = {s.fileno() for socks in self.slots.values() for s in socks}
        if self.pidfile is not None:
            fds.add(self.pidfile.fileno())
        if log.sink.path:
            fds.add(log.sink.fileno())
        if self.notifier.enabled:
            fds.add(self.notifier.fileno())
        return sorted(fds)


def prepare(config, overrides: dict, pidfile_required: bool) -> Launch:
    """Steps 1-5; StartError on any failure, with nothing left behind."""
    try:
        credentials = preflight.check(config).credentials
    except config_mod.ConfigError as exc:
        raise StartError(str(exc), config_error=True) from None
    try:
        log.configure(
            overrides.get("level") or config.log.level,
            overrides.get("format") or config.log.format,
            config.log.file,
            buffer=config.log.buffer,
            journal_socket=config.log.journal_socket,
        )
    except OSError as exc:
        journal = (overrides.get("format") or config.log.format) == "journal"
        what = (
            f"reach the journal at {config.log.journal_socket}"
            if journal
            else f"open log file {config.log.file}"
        )
        raise StartError(f"cannot {what}: [Errno {exc.errno}] {exc.strerror}") from None
    log.info("daemon.start", version=__version__, config=config.source)
    pidfile = _take_pidfile(config.daemon.pidfile, pidfile_required)
    try:
        raise_nofile_limit()
        slots, inherited = _listen(config)
        if credentials is not None:
            _hand_over(credentials, pidfile, config.log.file)
            drop(credentials)
    except (BindError, PidfileError, PrivilegeError) as exc:
        if pidfile is not None:
            pidfile.release()
        log.error("daemon.stop", reason="error", signal=None, error=str(exc))
        raise StartError(str(exc)) from None
    return Launch(config, overrides, pidfile, slots, inherited, systemd.Notifier.from_env())


def _take_pidfile(path: str, required: bool) -> Pidfile | None:
    pidfile = Pidfile(path)
    try:
        pidfile.acquire()
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


def _listen(config) -> tuple[dict, set]:
    """Step 4: {key: [socket per worker]} and the keys systemd gave us."""
    keys = listener_keys(config)
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
    count = config.daemon.workers
    try:
        if count > 1:
            slots = bind_slots(keys, count, adopted)
        else:
            bound = bind_all([k for k in keys if k not in adopted])
            slots = {k: [adopted[k] if k in adopted else bound[k]] for k in keys}
    except BindError:
        for sock in adopted.values():
            sock.close()
        raise
    return slots, set(adopted)


def _hand_over(credentials, pidfile, log_file: str) -> None:
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


def serve(launch: Launch, on_ready=None) -> int:
    """Step 7, in this process."""
    config = launch.config
    if config.daemon.workers > 1:
        supervisor = Supervisor(
            config,
            launch.slots,
            inherited=launch.inherited,
            notifier=launch.notifier,
            pidfile=launch.pidfile,
            log_overrides=launch.overrides,
        )
        return supervisor.run(on_ready)
    try:
        daemon = Daemon(
            config, notifier=launch.notifier, pidfile=launch.pidfile, log_overrides=launch.overrides
        )
    except config_mod.ConfigError as exc:  # the key file went away since step 1
        raise StartError(str(exc), config_error=True) from None
    daemon.open({key: socks[0] for key, socks in launch.slots.items()}, inherited=launch.inherited)
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
        if launch.pidfile is not None:
            launch.pidfile.write(os.getpid())
        code = serve(launch, on_ready=lambda: reporter.say(f"ready {os.getpid()}"))
    except BaseException as exc:
        log.error("daemon.stop", reason="error", signal=None, error=str(exc), exc_info=exc)
        reporter.say(f"error {exc}")
        code = 1
    reporter.say("error the daemon stopped before it was ready")
    log.sink.flush()
    return code


class _Reporter:
    """The daemon's end of the readiness pipe: says one line, once."""

    def __init__(self, fd: int):
        self.fd = fd

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
