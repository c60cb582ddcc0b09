"""The parent of a run: fork the workers, start them together, sample the
server over the measured window, merge what the workers measured.

Each worker is a forked process with its share of the connections (one
Python process is roughly one core's worth of load).  It sets up, reports
"ready" on its pipe, waits for the shared start time, runs its mode and
reports the result.  Every exchange on the pipes has a deadline, and a
worker whose parent gave up ends by itself.
"""

from __future__ import annotations

import multiprocessing
import resource
import time
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_any
from typing import Any

from evd.tools.bench.measure import Window
from evd.tools.bench.modes import MODE_CLASSES
from evd.tools.bench.options import SETUP_TIMEOUT, BenchError, Options
from evd.tools.bench.probes import ServerProbe, process_rss_kb
from evd.tools.bench.report import summary
from evd.tools.bench.target import Target, find

# Beyond the measured time: how long workers may take to report a result.
RESULT_GRACE = 30.0


def run(opts: Options) -> dict[str, object]:
    """Run one bounded benchmark; the result as a JSON-able dict."""
    opts.check()
    target = find(opts)
    # RLIMIT_NOFILE is per process, and each process holds only its share:
    # 100,000 idle connections fit under a 20,000 limit with -P 6.
    _raise_nofile(-(-_sockets(opts, target) // opts.processes) + 64)
    shares, first = [], 0
    for i in range(opts.processes):
        count = opts.connections // opts.processes + (i < opts.connections % opts.processes)
        shares.append((first, count))
        first += count
    ctx = multiprocessing.get_context("fork")
    probe = ServerProbe(opts.server_pid)
    rss_before = process_rss_kb(opts.server_pid) if opts.server_pid else 0
    procs, pipes = [], []
    try:
        for first, count in shares:
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(opts, target, first, count, theirs), daemon=True)
            proc.start()
            theirs.close()
            procs.append(proc)
            pipes.append(mine)
        setup_started = time.monotonic()
        _receive(pipes, "ready", SETUP_TIMEOUT + 10)
        setup_s = time.monotonic() - setup_started
        t0 = time.monotonic() + 0.02
        for p in pipes:
            p.send(("go", t0))
        extra: dict[str, object] = {}
        if opts.mode == "idle":
            _sleep_until(t0 + opts.duration)  # the hold: sample RSS while held
            if opts.server_pid:
                rss = process_rss_kb(opts.server_pid)
                extra = {
                    "rss_before_kb": rss_before,
                    "rss_after_kb": rss,
                    "rss_per_conn_kib": round((rss - rss_before) / opts.connections, 3),
                }
            extra.update(
                held=opts.connections,
                setup_s=round(setup_s, 3),
                connections_per_s=round(opts.connections / setup_s, 1) if setup_s else None,
            )
        else:
            _sleep_until(t0 + opts.warmup)
            probe.start()
            _sleep_until(t0 + opts.warmup + opts.duration)
        results = _receive(pipes, "result", RESULT_GRACE + (opts.duration if opts.mode == "idle" else 0))
        if opts.mode != "idle":
            extra = probe.stop(sum(int(r["requests"]) for r in results))
    finally:
        for proc in procs:
            proc.join(2)
            if proc.is_alive():
                proc.kill()
                proc.join(2)
        for p in pipes:
            p.close()
    return summary(opts, results, extra, len(target.sources) if opts.sources else 0)


def _sockets(opts: Options, target: Target) -> int:
    """Descriptors the run holds at once (UDP with sources: several per slot)."""
    if opts.mode == "udp" and opts.sources:
        return opts.connections * -(-len(target.sources) // opts.connections)
    return opts.connections


def _worker_main(opts: Options, target: Target, first: int, count: int, pipe: Connection) -> None:
    """A forked worker: set up, report ready, wait for the start, run, report."""
    mode = MODE_CLASSES[opts.mode](opts, target, first, count)
    try:
        try:
            mode.setup()
        except (OSError, BenchError) as exc:
            pipe.send(("error", f"set-up: {exc}"))
            return
        pipe.send(("ready", None))
        if not pipe.poll(SETUP_TIMEOUT + 10):
            return
        try:
            message, t0 = pipe.recv()
        except EOFError:  # the parent gave up
            return
        if message != "go":
            return
        pipe.send(("result", mode.run(Window(t0, opts.warmup, opts.duration))))
    finally:
        mode.close()
        pipe.close()


def _raise_nofile(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if needed > hard:
        raise BenchError(f"{needed} sockets need more descriptors than RLIMIT_NOFILE allows ({hard})")


def _receive(pipes: list[Connection], kind: str, timeout: float) -> list[dict[str, Any]]:
    """One `kind` message from every worker, within `timeout`."""
    deadline = time.monotonic() + timeout
    got: dict[Connection, Any] = {}
    while len(got) < len(pipes):
        left = deadline - time.monotonic()
        ready = wait_any([p for p in pipes if p not in got], max(0.0, left))
        if not ready:
            raise BenchError(f"workers did not report {kind} within {timeout:.0f}s")
        for p in [p for p in pipes if p in ready]:
            try:
                message, payload = p.recv()
            except EOFError:
                raise BenchError("a worker died") from None
            if message == "error":
                raise BenchError(payload)
            got[p] = payload
    return [got[p] for p in pipes]


def _sleep_until(when: float) -> None:
    """The measured window is a span of time: waiting out a span is timing, not sync."""
    left = when - time.monotonic()
    if left > 0:
        time.sleep(left)  # waiting out the window (the generator, not the daemon)
