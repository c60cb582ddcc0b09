"""The fixtures every layer of tests shares: a real `evd run` on free ports
(tests/support/daemon.py has the helpers behind them)."""

from __future__ import annotations

import pytest
from support.daemon import (
    BASE_CONFIG,
    WAIT,
    Control,
    EvdProcess,
    NotifySocket,
)


@pytest.fixture
def start_evd(tmp_path):
    started: list[EvdProcess] = []

    def start(
        config: str = BASE_CONFIG, args=(), env=None, wait_ready=True, prefix=(), pass_fds=()
    ) -> EvdProcess:
        evd = EvdProcess(tmp_path, config, args, env, prefix, pass_fds)
        started.append(evd)
        return evd.ready() if wait_ready else evd

    yield start
    for evd in started:
        if evd.proc.poll() is None:
            evd.proc.kill()
            evd.proc.wait(WAIT)


@pytest.fixture
def evd(start_evd) -> EvdProcess:
    """A daemon with every service on, listening on free loopback ports."""
    return start_evd()


@pytest.fixture
def control(tmp_path):
    ctl = Control(tmp_path)
    yield ctl
    ctl.cleanup()


@pytest.fixture
def notify_socket(tmp_path):
    """(NotifySocket, the $NOTIFY_SOCKET value for it)."""
    notify = NotifySocket(str(tmp_path / "notify"))
    yield notify, str(tmp_path / "notify")
    notify.close()
