"""The signals a daemon process handles, and the start-up window they wait out.

SIGHUP, SIGUSR1 and SIGUSR2 end a process that has no handler for them:
that is their default action.  The pidfile names the daemon before its
reactor has installed handlers (binding, the privilege drop and, for
`evd start`, detaching come in between), so an `evd reload` or a logrotate
SIGUSR1 sent right after a start would kill the daemon it meant to steer,
and leave a stale pidfile behind.  So they are *held*: blocked from before
the pidfile is taken until the reactor handles them.  A signal sent in
that window stays pending, and the kernel delivers it the moment the
reactor unblocks it -- a reload right after a start is a reload.

SIGTERM and SIGINT are not held: their default action is what the sender
asked for (the process ends), and a start-up that hangs must stay
interruptible.  A forked worker arrives with everything blocked (the
supervisor blocks across the fork, see server/supervisor.py) and unblocks
the same way once its own reactor is ready.
"""

from __future__ import annotations

import signal

# What a daemon's (or worker's) reactor handles.
HANDLED = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2})
# Fatal by default, and sent to the pid of the pidfile: held during start-up.
HELD_AT_START = frozenset({signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2})
# From the supervisor to a worker replaced by a reload: stop accepting,
# serve what is open to its end (see Daemon.retire).
RETIRE = signal.SIGUSR2
# A thread's signal mask, as pthread_sigmask returns it.
Mask = set[int | signal.Signals]


def hold() -> Mask:
    """Block the held signals; the mask before (for `restore`)."""
    return signal.pthread_sigmask(signal.SIG_BLOCK, HELD_AT_START)


def restore(mask: Mask) -> None:
    """Back to `mask`: the `evd start` process, once it has forked the
    daemon, is a client again."""
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def release(signals: frozenset[signal.Signals] = HANDLED) -> None:
    """The reactor has handlers for `signals`: let them in, pending ones first."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
