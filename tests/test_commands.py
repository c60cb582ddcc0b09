"""The command runner (evd/handlers/commands.py) with a real Reactor and real child
processes.  Expected values come from SPEC section 5 (environment, cwd,
process group, signals), not from the module's constants.
"""

from __future__ import annotations

import os
import select
import signal
from types import SimpleNamespace

import pytest

import evd.handlers.commands as commands_mod
from evd.core.reactor import Reactor
from evd.handlers.commands import CommandError, Runner

LIMIT = 5.0
# SPEC section 3: the default arg_pattern.
DEFAULT_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
# SPEC section 5: the whole environment of a command.
SPEC_ENV = {"PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8"}


def spec(argv, args=False, arg_pattern=DEFAULT_PATTERN):
    return SimpleNamespace(argv=list(argv), args=args, arg_pattern=arg_pattern)


def service(timeout=5.0, max_output=1 << 20, max_concurrent=8):
    return SimpleNamespace(timeout=timeout, max_output=max_output, max_concurrent=max_concurrent)


TABLE = {
    "greet": spec(["echo", "hello"], args=True),
    "uptime": spec(["uptime"]),
    "digits": spec(["echo"], args=True, arg_pattern=r"[0-9]+"),
}


class LogRecorder:
    def __init__(self):
        self.events = []

    def info(self, event, **fields):
        self.events.append((event, fields))

    warning = debug = error = info


class Harness:
    def __init__(self):
        self.reactor = Reactor()
        self.runners = []
        self._cond = None
        self.reactor.add_before_sleep(self._check)

    def _check(self):
        if self._cond is not None and self._cond():
            self.reactor.stop()

    def runner(self, config=None, table=None):
        r = Runner(self.reactor, config or service(), TABLE if table is None else table)
        self.runners.append(r)
        return r

    def run_until(self, cond, limit=LIMIT):
        """Run the loop until cond() holds; fail after `limit` seconds."""
        expired = []
        self._cond = cond
        guard = self.reactor.call_later(limit, lambda: (expired.append(True), self.reactor.stop()) and None)
        try:
            self.reactor.run()
        finally:
            self.reactor.cancel(guard)
            self._cond = None
        assert not expired, f"not done within {limit}s"

    def execute(self, runner, argv, stdin=b"", limit=LIMIT):
        results = []
        run = runner.start("test", argv, stdin, results.append)
        self.run_until(lambda: results, limit)
        assert len(results) == 1
        return run, results[0]


@pytest.fixture
def log(monkeypatch):
    rec = LogRecorder()
    monkeypatch.setattr(commands_mod, "log", rec)
    return rec


@pytest.fixture
def h(log):
    harness = Harness()
    yield harness
    for r in harness.runners:
        r.kill_all()
    harness.reactor.close()


# --- argv validation ------------------------------------------------------------


def test_argv_known_command_without_args(h):
    r = h.runner()
    assert r.argv("uptime", None) == ["uptime"]
    assert r.argv("uptime", []) == ["uptime"]


def test_argv_appends_valid_args(h):
    r = h.runner()
    assert r.argv("greet", ["world", "a.b-c_d"]) == ["echo", "hello", "world", "a.b-c_d"]
    assert r.argv("greet", ["x" * 64]) == ["echo", "hello", "x" * 64]
    assert TABLE["greet"].argv == ["echo", "hello"]  # the table entry is not changed


@pytest.mark.parametrize("name", ["nope", "", "GREET", None, 5, ["greet"]])
def test_argv_unknown_command(h, name):
    with pytest.raises(CommandError) as info:
        h.runner().argv(name, None)
    assert info.value.code == "unknown_command"


def test_argv_args_refused_when_not_allowed(h):
    with pytest.raises(CommandError) as info:
        h.runner().argv("uptime", ["-p"])
    assert info.value.code == "bad_args"


@pytest.mark.parametrize("args", ["world", {"a": 1}, [1], ["ok", None], [["nested"]], 3])
def test_argv_args_must_be_a_list_of_strings(h, args):
    with pytest.raises(CommandError) as info:
        h.runner().argv("greet", args)
    assert info.value.code == "bad_args"


@pytest.mark.parametrize(
    "arg",
    [
        ";rm -rf /",
        "$(id)",
        "`id`",
        "a b",
        "a|b",
        "a&b",
        "a>b",
        "../../etc/passwd",
        "",
        "x" * 65,
        "abc\n",
        "\nabc",
        "ä",
        "a\x00b",
        "*",
        "~root",
        "--opt=$HOME",
    ],
)
def test_argv_default_pattern_refuses_shell_metacharacters(h, arg):
    with pytest.raises(CommandError) as info:
        h.runner().argv("greet", ["fine", arg])
    assert info.value.code == "bad_args"


def test_argv_custom_pattern_must_match_whole_argument(h):
    r = h.runner()
    assert r.argv("digits", ["123"]) == ["echo", "123"]
    for bad in ("12a", "a12", "1 2", ""):
        with pytest.raises(CommandError) as info:
            r.argv("digits", [bad])
        assert info.value.code == "bad_args"


# --- running ------------------------------------------------------------------


def test_echo_hello(h, log):
    r = h.runner()
    run, res = h.execute(r, ["echo", "hello"])
    assert (res.exit, res.signal, res.timed_out, res.truncated) == (0, None, False, False)
    assert bytes(res.stdout) == b"hello\n"
    assert bytes(res.stderr) == b""
    assert r.running == set() and r.total == 1
    events = [e for e, _ in log.events]
    assert events == ["command.start", "command.end"]
    end = log.events[1][1]
    assert end["exit"] == 0 and end["signal"] is None and end["command_pid"] == run.pid
    assert end["argv"] == ["echo", "hello"]


def test_exit_status_and_stderr(h):
    _run, res = h.execute(h.runner(), ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert res.exit == 3 and res.signal is None
    assert bytes(res.stdout) == b"out\n"
    assert bytes(res.stderr) == b"err\n"


def test_stdin_body_is_passed(h):
    _, res = h.execute(h.runner(), ["cat"], stdin=b"line one\nline two\n")
    assert res.exit == 0
    assert bytes(res.stdout) == b"line one\nline two\n"


def test_large_stdin_is_written_without_blocking(h):
    body = bytes(range(256)) * 4096  # 1 MiB: far more than a pipe buffer
    _, res = h.execute(h.runner(service(max_output=4 << 20)), ["cat"], stdin=body)
    assert res.exit == 0 and not res.truncated
    assert bytes(res.stdout) == body


def test_stdin_ignored_by_the_command(h):
    _, res = h.execute(h.runner(), ["true"], stdin=b"x" * (1 << 20))
    assert res.exit == 0
    assert bytes(res.stdout) == b""


def test_environment_is_exactly_path_and_lang(h, monkeypatch):
    monkeypatch.setenv("EVD_TEST_SECRET", "must-not-leak")
    _, res = h.execute(h.runner(), ["env"])
    assert res.exit == 0
    assert set(bytes(res.stdout).decode().splitlines()) == SPEC_ENV


def test_cwd_is_root(h):
    _, res = h.execute(h.runner(), ["pwd"])
    assert bytes(res.stdout) == b"/\n"


def test_command_runs_in_its_own_process_group(h):
    r = h.runner()
    done = []
    run = r.start("sleep", ["sleep", "10"], b"", done.append)
    assert os.getpgid(run.pid) == run.pid
    assert os.getpgid(run.pid) != os.getpgrp()
    r.kill_all()
    assert len(done) == 1


def test_loop_keeps_running_while_a_command_runs(h):
    r = h.runner()
    order = []
    r.start("sleep", ["sleep", "0.3"], b"", lambda res: order.append(("done", res.exit)))
    h.reactor.call_later(0.01, lambda: order.append(("timer", None)))
    h.run_until(lambda: len(order) == 2)
    assert order == [("timer", None), ("done", 0)]


def test_timeout_kills_the_command(h):
    r = h.runner(service(timeout=0.2))
    _run, res = h.execute(r, ["sleep", "10"])
    assert res.timed_out is True
    assert res.exit is None
    assert res.signal in (signal.SIGTERM, signal.SIGKILL)
    assert res.signal == 15  # sleep dies of SIGTERM; no SIGKILL needed
    assert not res.truncated
    assert r.running == set()


def test_timeout_escalates_to_sigkill(h, monkeypatch):
    monkeypatch.setattr(commands_mod, "KILL_GRACE", 0.1)  # keep the test fast
    r = h.runner(service(timeout=0.1))
    # Ignores SIGTERM: only SIGKILL (KILL_GRACE later) ends it.
    _run, res = h.execute(
        r, ["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.05; done"], limit=LIMIT
    )
    assert res.timed_out is True
    assert res.signal == 9
    assert bytes(res.stdout) == b"ready\n"


def wait_dead(pid: int, pgid: int, limit: float = LIMIT) -> bool:
    """Wait (bounded) until `pid`, a member of group `pgid`, has exited.

    A pidfd turns readable when the process exits (zombie or reaped): no
    polling.  The group check guards against a reused pid.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        if os.getpgid(pid) != pgid:
            return True  # reaped, and the number went to someone else
        readable, _, _ = select.select([fd], [], [], limit)
        return bool(readable)
    finally:
        os.close(fd)


def test_timeout_kills_the_whole_group(h):
    r = h.runner(service(timeout=0.2))
    # The background child keeps stdout open: only a group kill ends the run.
    run, res = h.execute(r, ["sh", "-c", "sleep 30 & echo $!; wait"])
    assert res.timed_out is True
    straggler = int(bytes(res.stdout))
    assert wait_dead(straggler, run.pid), "the background child outlived the group kill"


def test_what_a_command_leaves_behind_is_killed(h, monkeypatch):
    monkeypatch.setattr(commands_mod, "KILL_GRACE", 0.1)
    r = h.runner(service(timeout=30))
    # The main process exits at once; its child ignores SIGTERM and holds no pipe.
    run, res = h.execute(
        r, ["sh", "-c", "(trap '' TERM; exec sleep 30) </dev/null >/dev/null 2>&1 & echo $!"]
    )
    assert res.exit == 0 and not res.timed_out
    straggler = int(bytes(res.stdout))
    assert run in r.lingering
    # SIGTERM is ignored, so only the SIGKILL after KILL_GRACE ends it; the
    # loop must run for that timer to fire.
    h.run_until(lambda: not r.lingering)
    assert wait_dead(straggler, run.pid), "the leftover child was not killed"


def test_kill_all_at_shutdown_takes_what_commands_left_behind(h):
    r = h.runner(service(timeout=30))  # KILL_GRACE (1 s) is not waited for
    run, res = h.execute(
        r, ["sh", "-c", "(trap '' TERM; exec sleep 30) </dev/null >/dev/null 2>&1 & echo $!"]
    )
    straggler = int(bytes(res.stdout))
    assert run in r.lingering
    r.kill_all()  # what the daemon does once the drain is over
    assert not r.lingering
    assert wait_dead(straggler, run.pid), "the leftover child outlived the daemon's exit"


def test_output_over_max_output_is_truncated_and_killed(h):
    cap = 10000
    r = h.runner(service(max_output=cap))
    _run, res = h.execute(r, ["yes"])
    assert res.truncated is True
    assert not res.timed_out
    assert res.signal in (signal.SIGTERM, signal.SIGKILL)
    assert bytes(res.stdout) == (b"y\n" * cap)[:cap]
    assert bytes(res.stderr) == b""


def test_max_output_counts_stdout_and_stderr_together(h):
    cap = 50000
    r = h.runner(service(max_output=cap))
    _, res = h.execute(r, ["sh", "-c", "yes out & exec yes err >&2"])
    assert res.truncated is True
    assert len(res.stdout) + len(res.stderr) == cap
    assert bytes(res.stdout) == (b"out\n" * cap)[: len(res.stdout)]
    assert bytes(res.stderr) == (b"err\n" * cap)[: len(res.stderr)]


def test_output_exactly_max_output_is_not_truncated(h):
    r = h.runner(service(max_output=6))
    _, res = h.execute(r, ["echo", "hello"])
    assert res.truncated is False
    assert res.exit == 0
    assert bytes(res.stdout) == b"hello\n"


def test_busy_when_max_concurrent_reached(h):
    r = h.runner(service(max_concurrent=2))
    done = []
    r.start("a", ["sleep", "10"], b"", done.append)
    r.start("b", ["sleep", "10"], b"", done.append)
    with pytest.raises(CommandError) as info:
        r.start("c", ["echo", "no"], b"", done.append)
    assert info.value.code == "busy"
    assert len(r.running) == 2 and r.total == 2
    r.kill_all()
    assert [d.signal for d in done] == [9, 9]
    # A slot is free again.
    _, res = h.execute(r, ["echo", "again"])
    assert bytes(res.stdout) == b"again\n"


def test_kill_all(h):
    r = h.runner()
    done = []
    runs = [r.start(f"s{i}", ["sleep", "10"], b"", done.append) for i in range(3)]
    r.kill_all()
    assert len(done) == 3
    assert all(res.signal == 9 and res.exit is None for res in done)
    assert r.running == set()
    for run in runs:
        with pytest.raises(ProcessLookupError):
            os.kill(run.pid, 0)  # reaped, not a zombie
    # The loop is left clean: nothing of the killed runs fires later.
    ticks = []
    h.reactor.call_later(0.05, lambda: ticks.append(1))
    h.run_until(lambda: ticks)
    assert len(done) == 3


def test_unrunnable_program_is_internal_error(h):
    r = h.runner()
    with pytest.raises(CommandError) as info:
        r.start("x", ["/nonexistent/evd-test-program"], b"", lambda res: None)
    assert info.value.code == "internal"
    assert r.running == set()
