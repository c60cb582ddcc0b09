"""What the kernel offers for keeping a command's processes in hand, short of
a cgroup: finding them in `/proc`, and a parent-death signal.

A command runs as the leader of its own session and process group, and
killpg reaches everything that stays in the group.  A process that leaves it
(`setsid`, or a job-control shell's `setpgid`) is still found here, by what
it cannot shed:

- its parent chain, while the parents live (children of a dead process are
  handed to init, and the chain is broken);
- the command's session (a job-control shell's jobs leave the group, not the
  session);
- the pipes it holds: whatever keeps the command's stdout or stderr open is,
  by definition, what the answer is waiting for -- the same test `fuser`
  makes, by the inode of the pipe.

What none of these find is a process that left the session, lost its
parent before the scan and holds none of the pipes: a proper daemon.  Only a
cgroup holds that one (under systemd, evd's unit: see docs/guide/tls.md).

The parent-death signal (PR_SET_PDEATHSIG) makes the kernel SIGKILL the
command's main process when evd dies, even of SIGKILL; not its children (a
fork does not inherit it), and not after it execs a set-user-ID program.  It
is set in the child between fork and exec, which Python can only do with a
`preexec_fn`: that forces subprocess onto fork instead of vfork, and fork
costs the daemon time in proportion to its memory.  util-linux's `setpriv
--pdeathsig` sets it from a second exec instead, far cheaper, so it is used
when present and new enough (2.33); else the preexec_fn; else nothing.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

PR_SET_PDEATHSIG = 1
PR_GET_PDEATHSIG = 2
# Bounds a probe of setpriv at start-up (before the loop runs).
PROBE_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class Deathsig:
    """How a command gets its parent-death signal: `prefix` goes before its
    argv, `preexec(parent_pid)` runs in the child before exec (forcing
    fork); the parent's pid is taken at each spawn, since a daemon may have
    forked since this was made."""

    mode: str  # "setpriv", "prctl" or "none"
    prefix: tuple[str, ...] = ()
    preexec: Callable[[int], None] | None = None


NONE = Deathsig("none")


def deathsig(env: Mapping[str, str]) -> Deathsig:
    """The cheapest way to have commands SIGKILLed when this process dies.
    Runs a probe (once per call): call it at start-up, not from the loop."""
    found = setpriv(env)
    if found is not None:
        return found
    return prctl_preexec() or NONE


def setpriv(env: Mapping[str, str]) -> Deathsig | None:
    """`setpriv --pdeathsig KILL --` if it exists and understands the option
    (util-linux 2.33, 2018; older ones refuse it, and would fail every
    command)."""
    path = shutil.which("setpriv", path=env.get("PATH"))
    true = shutil.which("true", path=env.get("PATH"))
    if path is None or true is None:
        return None
    prefix = (path, "--pdeathsig", "KILL", "--")
    try:
        probe = subprocess.run(  # at start-up, before any loop runs (Runner creation)
            [*prefix, true],
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=PROBE_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return Deathsig("setpriv", prefix=prefix) if probe.returncode == 0 else None


def prctl_preexec() -> Deathsig | None:
    """A preexec_fn calling prctl through ctypes, if libc has prctl and the
    call is allowed here (a seccomp filter may refuse it)."""
    try:
        # dlopen(NULL): the symbols already loaded, libc among them.
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    current = ctypes.c_int(0)
    # PR_GET changes nothing: it only proves prctl works for this process.
    if prctl(PR_GET_PDEATHSIG, ctypes.byref(current), 0, 0, 0) != 0:
        return None

    def preexec(parent: int) -> None:
        # Best effort: a refused prctl must not make the command unrunnable.
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # evd died before the line above
            os._exit(1)

    return Deathsig("prctl", preexec=preexec)


# -- finding a command's processes ---------------------------------------------


def _stat(pid: str) -> tuple[int, int, int] | None:
    """(ppid, pgrp, session) of a process, or None if it is gone."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
    except OSError:
        return None
    try:
        data = os.read(fd, 1024)  # the whole line: about 300 bytes
    except OSError:
        return None
    finally:
        os.close(fd)
    # The command name (field 2) may hold spaces and parentheses: the fields
    # we want follow its last ")".
    fields = data[data.rfind(b")") + 2 :].split(maxsplit=4)
    try:
        return int(fields[1]), int(fields[2]), int(fields[3])
    except (IndexError, ValueError):
        return None


def _pids() -> list[str]:
    try:
        return [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return []


def related(root: int, pipes: Iterable[int] = ()) -> set[int]:
    """Pids of the processes outside process group `root` that belong to
    command `root` (killpg reaches the group, and a process signalled twice
    could be interrupted in its SIGTERM handler): members of its session,
    holders of the pipes `pipes` (inode numbers), and everything descended
    from those and from the group's members.  Never this process.

    The number `root` stays the command's while its group or session has a
    member: Linux does not reuse a pid that names a live group or session.
    """
    me = os.getpid()
    children: dict[int, list[int]] = {}
    group = set()
    seeds = set()
    for name in _pids():
        stat = _stat(name)
        if stat is None:
            continue
        pid = int(name)
        ppid, pgrp, session = stat
        children.setdefault(ppid, []).append(pid)
        if pgrp == root:
            group.add(pid)
        elif session == root:
            seeds.add(pid)
    seeds |= group
    inodes = set(pipes)
    if inodes:
        seeds |= holders(inodes)
    found: set[int] = set()
    todo = list(seeds)
    while todo:
        pid = todo.pop()
        if pid in found or pid == me or pid <= 1:
            continue
        found.add(pid)
        todo.extend(children.get(pid, ()))
    return found - group


def holders(inodes: set[int]) -> set[int]:
    """Pids of the processes (other than this one) that hold one of the
    pipes `inodes` open.  Only our own user's processes are looked at: a
    command runs as evd's user, and reading every descriptor of every
    process (as root) is the expensive part."""
    links = {f"pipe:[{inode}]" for inode in inodes}
    me, uid = os.getpid(), os.geteuid()
    found = set()
    for name in _pids():
        pid = int(name)
        if pid == me:
            continue
        base = f"/proc/{name}/fd"
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
            fds = os.listdir(base)
        except OSError:  # gone
            continue
        for fd in fds:
            try:
                if os.readlink(f"{base}/{fd}") in links:
                    found.add(pid)
                    break
            except OSError:
                continue
    return found


def signal_all(pids: Iterable[int], signum: int) -> int:
    """Send `signum` to each pid; returns how many were still there."""
    sent = 0
    for pid in pids:
        try:
            os.kill(pid, signum)
            sent += 1
        except (ProcessLookupError, PermissionError):
            continue
    return sent
