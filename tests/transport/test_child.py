"""Starting a child (evd/commands/child.py `spawn`): posix_spawn where it
can, subprocess where it must, and the same child either way -- its own
session, exactly its environment, default signal dispositions, its status
(SPEC sections 5 and 14)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from evd.commands import spawner as spawner_module
from evd.commands.child import PIPE, Child, Launch, Spawned, SpawnError, spawn
from evd.commands.spawner import Spawner
from evd.loop.reactor import Reactor
from evd.system import children

ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
SCRIPT = 'echo "$$ $(pwd)"; env | grep -v "^PWD=" | sort; grep ^SigIgn: /proc/$$/status; read line; exit 7'


def run(launch: Launch, deathsig=children.NONE):
    proc = spawn(launch, deathsig, stdin=PIPE, stdout=PIPE)
    proc.stdin.write(b"\n")
    proc.stdin.close()
    out = b""
    while chunk := proc.stdout.read(65536):
        out += chunk
    proc.stdout.close()
    proc.stderr.close()
    while proc.poll() is None:
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
    return proc, out.decode().splitlines()


@pytest.mark.parametrize("cwd", ["here", "/"])
def test_the_same_child_by_posix_spawn_or_subprocess(cwd):
    launch = Launch(("/bin/sh", "-c", SCRIPT), ENV, os.getcwd() if cwd == "here" else "/")
    proc, lines = run(launch)
    # posix_spawn only where nothing must happen between fork and exec.
    assert isinstance(proc, Spawned) == (launch.cwd == os.getcwd() != "/")
    pid, where = lines[0].split()
    assert int(pid) == proc.pid and where == launch.cwd
    assert lines[1:3] == ["LANG=C.UTF-8", "PATH=/usr/bin:/bin"]
    ignored = int(lines[3].split()[1], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1)), "SIGPIPE must not stay ignored"
    assert proc.returncode == 7


def test_own_session_and_status_of_a_signal():
    proc = spawn(Launch(("/bin/sleep", "10"), ENV, os.getcwd()), children.NONE, stdin=PIPE, stdout=PIPE)
    try:
        assert isinstance(proc, Spawned) or os.getcwd() == "/"
        assert os.getsid(proc.pid) == proc.pid and os.getpgid(proc.pid) == proc.pid
        os.kill(proc.pid, signal.SIGTERM)
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        assert proc.poll() == -signal.SIGTERM
    finally:
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            pipe.close()


def test_only_the_given_descriptors_reach_the_child(tmp_path):
    kept = os.open(tmp_path, os.O_RDONLY)  # close-on-exec, as every descriptor evd opens
    try:
        _proc, lines = run(Launch(("/bin/sh", "-c", "ls /proc/$$/fd; read x"), ENV, os.getcwd()))
    finally:
        os.close(kept)
    assert sorted(int(fd) for fd in lines if fd.isdigit() and int(fd) < 10) == [0, 1, 2]


@pytest.mark.parametrize("program", ["/nonexistent/program", "/etc/hostname"])
def test_a_program_that_cannot_start_is_a_spawn_error(program):
    if not Path(program).exists() and program != "/nonexistent/program":
        pytest.skip(f"{program} is absent")
    with pytest.raises(SpawnError):
        spawn(Launch((program,), ENV, os.getcwd()), children.NONE, stdin=subprocess.DEVNULL, stdout=PIPE)


class Finished(Child):
    """A child that remembers what it reported when it finished."""

    def _finished(self):
        self.reported = (self.exit, self.signal)


def test_a_child_ended_by_sigkill_reports_it_even_before_the_kernel_has_ended_it():
    """`evd ctl kill` of a program's connection SIGKILLs its group and logs
    exec.end at once.  When the kernel had not yet ended the process at
    that look (CI saw it, loaded), exec.end said signal=null."""
    reactor = Reactor()
    reaped = []
    owner = SimpleNamespace(
        reactor=reactor, deathsig=children.NONE, reap_later=reaped.append, linger=lambda child, on: None
    )
    proc = spawn(Launch(("/bin/sleep", "10"), ENV, os.getcwd()), children.NONE, stdin=PIPE, stdout=PIPE)
    proc.stdin.close()
    real_poll, looks = proc.poll, []

    def late_poll():  # the first look comes before the kernel is done
        looks.append(1)
        return None if len(looks) == 1 else real_poll()

    proc.poll = late_poll
    try:
        launch = Launch(("/bin/sleep", "10"), ENV, os.getcwd())
        child = Finished(owner, launch, stdin=PIPE, stdout=PIPE, timeout=0, proc=proc)
        child.kill_now("killed")
        late_poll()  # the first look, as reap_later makes it: nothing yet
        child.end_now()
        assert child.reported == (None, signal.SIGKILL) and reaped == [proc]
    finally:
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        assert real_poll() == -signal.SIGKILL
        reactor.close()


def spawned_by_the_spawner(launch: Launch, chdir: bool | None = None) -> tuple[int | OSError, bytes]:
    """Start `launch` through the spawner's threads, its stdout a pipe:
    the result the loop was told, and what the child wrote.  `chdir`
    False: as on a glibc without posix_spawn_file_actions_addchdir_np."""
    reactor = Reactor()
    spawner = Spawner(reactor)
    if chdir is not None:
        spawner._chdir = chdir
    out_r, out_w = os.pipe()
    results: list[int | OSError] = []

    def done(result: int | OSError) -> None:
        results.append(result)
        reactor.stop()

    try:
        assert spawner.can_start(launch)
        with open(os.devnull, "rb") as null:
            spawner.start(launch.argv, dict(launch.env), (null.fileno(), out_w, out_w), done, launch.cwd)
        os.close(out_w)
        reactor.call_later(10.0, reactor.stop)
        reactor.run()
        assert results, "the spawner never answered"
        out = b""
        while chunk := os.read(out_r, 65536):
            out += chunk
        if isinstance(results[0], int):
            os.waitpid(results[0], 0)
        return results[0], out
    finally:
        os.close(out_r)
        reactor.close()


def test_the_spawner_starts_a_program_in_a_directory_not_ours(tmp_path):
    """posix_spawn enters `cwd` before exec (glibc's addchdir_np): any
    directory is the spawner's, not only evd's own."""
    assert os.getcwd() != str(tmp_path)
    pid, out = spawned_by_the_spawner(Launch(("/bin/pwd",), ENV, str(tmp_path)))
    assert isinstance(pid, int) and out == f"{tmp_path}\n".encode()


def test_the_spawner_reports_a_directory_it_cannot_enter(tmp_path):
    result, out = spawned_by_the_spawner(Launch(("/bin/pwd",), ENV, str(tmp_path / "gone")))
    assert isinstance(result, OSError) and result.errno == errno.ENOENT and out == b""


def test_the_spawner_leaves_a_user_switch_to_subprocess():
    reactor = Reactor()
    try:
        spawner = Spawner(reactor)
        assert spawner.can_start(Launch(("/bin/pwd",), ENV, "/"))
        assert not spawner.can_start(Launch(("/bin/pwd",), ENV, "/", uid=0, gid=0))
        assert not spawner.can_start(Launch(("pwd",), ENV, "/"))  # a PATH search: evd's, not the child's
    finally:
        reactor.close()


def test_without_addchdir_a_program_in_our_own_cwd_still_starts(monkeypatch, tmp_path):
    """An older glibc: the spawner takes only programs in evd's own cwd, and
    starts them without asking posix_spawn to change directory."""

    class OldLibc(spawner_module._Libc):
        def __init__(self):
            super().__init__()
            self.fa_chdir = None

    monkeypatch.setattr(spawner_module, "_Libc", OldLibc)
    monkeypatch.chdir(tmp_path)
    reactor = Reactor()
    try:
        spawner = Spawner(reactor)
        spawner._chdir = False
        assert not spawner.can_start(Launch(("/bin/pwd",), ENV, "/"))
    finally:
        reactor.close()
    pid, out = spawned_by_the_spawner(Launch(("/bin/pwd",), ENV, str(tmp_path)), chdir=False)
    assert isinstance(pid, int) and out == f"{tmp_path}\n".encode()
