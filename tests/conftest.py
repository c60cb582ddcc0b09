"""The fixtures every layer of tests shares: a real `evd run` on free ports
(tests/support/daemon.py has the helpers behind them).

Workers are not a special case (STYLE 16): every end-to-end test that
starts a daemon through these fixtures runs twice, as one process ([w1])
and with `workers = 2` ([w2]), which the fixtures write into its
configuration.  A test whose expected result differs with workers by
design (worker pids, a listener.open per worker, process_* summed), or
that sets `workers` itself, opts out with
`@pytest.mark.no_workers_variant("why")` and runs once, as written.  A
known defect with workers in someone else's area is marked
`@pytest.mark.workers_defect("what, whose")`: its [w2] runs as a non-strict
xfail until fixed (then drop the mark).
"""

from __future__ import annotations

import re

import pytest
from support.daemon import (
    BASE_CONFIG,
    WAIT,
    Control,
    EvdProcess,
    NotifySocket,
)

VARIANTS = [pytest.param(1, id="w1"), pytest.param(2, id="w2")]


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "no_workers_variant(reason): run this end-to-end test once, as written, not also with workers = 2",
    )
    config.addinivalue_line(
        "markers",
        "workers_defect(reason): a known defect with workers, another area's: [w2] is xfail (not strict)",
    )


def pytest_generate_tests(metafunc):
    definition = metafunc.definition
    if (
        "evd_workers" in metafunc.fixturenames
        and "/e2e/" in str(definition.path)
        and definition.get_closest_marker("no_workers_variant") is None
    ):
        variants = VARIANTS
        defect = definition.get_closest_marker("workers_defect")
        if defect is not None:
            xfail = pytest.mark.xfail(reason=f"with workers: {defect.args[0]}", strict=False)
            variants = [VARIANTS[0], pytest.param(2, id="w2", marks=xfail)]
        metafunc.parametrize("evd_workers", variants, indirect=True)


@pytest.fixture
def evd_workers(request) -> int:
    """How many workers the fixtures' daemons run: 1, or 2 for a [w2] test."""
    return getattr(request, "param", 1)


def with_workers(config: str, workers: int) -> str:
    """`config` with `workers` set, unless it sets workers itself."""
    if workers == 1 or re.search(r"^\s*workers\s*=", config, re.MULTILINE):
        return config
    if re.search(r"^\[daemon\]\s*$", config, re.MULTILINE):
        return re.sub(
            r"^\[daemon\]\s*$", f"[daemon]\nworkers = {workers}", config, count=1, flags=re.MULTILINE
        )
    return f"{config.rstrip()}\n\n[daemon]\nworkers = {workers}\n"


@pytest.fixture
def start_evd(tmp_path, evd_workers):
    started: list[EvdProcess] = []

    def start(
        config: str = BASE_CONFIG, args=(), env=None, wait_ready=True, prefix=(), pass_fds=()
    ) -> EvdProcess:
        evd = EvdProcess(
            tmp_path, config, args, env, prefix, pass_fds, adjust=lambda text: with_workers(text, evd_workers)
        )
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
def control(tmp_path, evd_workers):
    ctl = Control(tmp_path, lambda text: with_workers(text, evd_workers))
    yield ctl
    ctl.cleanup()


@pytest.fixture
def notify_socket(tmp_path):
    """(NotifySocket, the $NOTIFY_SOCKET value for it)."""
    notify = NotifySocket(str(tmp_path / "notify"))
    yield notify, str(tmp_path / "notify")
    notify.close()
