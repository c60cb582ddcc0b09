"""Finding a command's processes in /proc, and choosing how commands get
their parent-death signal (evd/system/children.py), with real processes."""

from __future__ import annotations

import ctypes
import functools
import os
import select
import shutil
import signal
import subprocess
import sys

import pytest

from evd.system import children

LIMIT = 5.0
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin"}


@pytest.fixture
def procs():
    """Processes a test starts, each killed (group and all) at the end."""
    started = []
    yield started
    for proc in started:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(LIMIT)


def start(procs, argv, **kwargs):
    proc = subprocess.Popen(argv, start_new_session=True, **kwargs)
    procs.append(proc)
    return proc


def read_pids(proc, count):
    """`count` pids the process prints, one a line, within LIMIT."""
    # Read the descriptor itself: a buffered readline may take both lines at
    # once, and a select on the descriptor would then wait for a third.
    fd = proc.stdout.fileno()
    data = b""
    while data.count(b"\n") < count:
        assert select.select([fd], [], [], LIMIT)[0], "no pid printed"
        chunk = os.read(fd, 4096)
        assert chunk, "the process ended before printing its pids"
        data += chunk
    return [int(line) for line in data.split(b"\n")[:count]]


def test_stat_reads_a_name_with_spaces_and_parentheses(procs, tmp_path):
    odd = tmp_path / "a) b (c"
    shutil.copy(shutil.which("sleep"), odd)
    proc = start(procs, [str(odd), "30"])
    assert children._stat(str(proc.pid)) == (os.getpid(), proc.pid, proc.pid)


def test_related_finds_what_left_the_group_but_not_the_group(procs):
    need_setsid()
    proc = start(
        procs,
        # The inner sh prints its pid once setsid has made it a session.
        ["sh", "-c", "sleep 30 & echo $!; setsid sh -c 'echo $$; exec sleep 30' & wait"],
        stdout=subprocess.PIPE,
    )
    in_group, escaped = read_pids(proc, 2)
    found = children.related(proc.pid)
    assert escaped in found  # by its parent chain
    assert in_group not in found and proc.pid not in found  # killpg's job
    proc.stdout.close()
    os.kill(escaped, signal.SIGKILL)


def test_related_finds_pipe_holders_and_never_this_process(procs):
    r, w = os.pipe()
    try:
        holder = start(procs, ["sleep", "30"], pass_fds=(w,))
        inode = os.fstat(r).st_ino
        assert holders_soon(inode, holder.pid)
        # No relation to the root at all: only the pipe ties it to it.
        found = children.related(999_999_999, pipes=[inode])
        assert found == {holder.pid}
        assert os.getpid() not in children.holders({inode})  # we hold both ends
    finally:
        os.close(r)
        os.close(w)


def holders_soon(inode, pid):
    """The holder may not have started yet: look until it has (bounded)."""
    fd = os.pidfd_open(pid)
    try:
        for _ in range(100):
            if pid in children.holders({inode}):
                return True
            select.select([fd], [], [], 0.05)  # returns early only if it died
        return False
    finally:
        os.close(fd)


def need_setsid():
    if shutil.which("setsid") is None:
        pytest.skip("setsid (util-linux) is not installed")


def test_signal_all_counts_who_was_there(procs):
    proc = start(procs, ["sleep", "30"])
    proc_gone = start(procs, ["true"])
    proc_gone.wait(LIMIT)
    assert children.signal_all([proc.pid, proc_gone.pid], 0) == 1


# --- how commands get their parent-death signal --------------------------------


def test_deathsig_prefers_setpriv():
    if children.setpriv(ENV) is None:
        pytest.skip("setpriv with --pdeathsig (util-linux >= 2.33) is not installed")
    found = children.deathsig(ENV)
    assert found.mode == "setpriv" and found.preexec is None
    assert found.prefix[1:] == ("--pdeathsig", "KILL", "--")


def test_a_setpriv_without_pdeathsig_is_not_used(tmp_path):
    """util-linux before 2.33 refuses the option: every command would fail."""
    fake = tmp_path / "setpriv"
    fake.write_text("#!/bin/sh\necho 'setpriv: unrecognized option' >&2\nexit 1\n")
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:{ENV['PATH']}"}
    assert children.setpriv(env) is None
    assert children.deathsig(env).mode == "prctl"


def test_without_setpriv_prctl_is_used_and_works():
    found = children.deathsig({"PATH": "/nonexistent"})
    assert found.mode == "prctl" and found.prefix == ()
    code = (
        "import ctypes, sys; v = ctypes.c_int(); ctypes.CDLL(None).prctl(2, ctypes.byref(v)); print(v.value)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        preexec_fn=functools.partial(found.preexec, os.getpid()),
        capture_output=True,
        check=True,
        timeout=LIMIT,
    )
    assert int(out.stdout) == signal.SIGKILL


def test_without_prctl_commands_run_without_deathsig(monkeypatch):
    def no_libc(*args, **kwargs):
        raise OSError("no libc here")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    assert children.prctl_preexec() is None
    assert children.deathsig({"PATH": "/nonexistent"}) is children.NONE
