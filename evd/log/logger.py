"""Structured logs: one event per line (or journald entry), through structlog.

Everything in evd logs through the module-level `log` object: `log.info(event,
**fields)` and its siblings.  `configure` rebuilds the logger (level filter,
format) and points the one `Sink` at its target -- stderr, `log.file`, or
the journal -- so a reload that changes the level, the format or the file
swaps what is underneath every caller at once.

The sink (log/sink.py) never blocks the loop: lines are queued, written once
per loop iteration from the reactor's before-sleep hook (`sink.flush`), and
whatever the target does not take at once waits in a bounded queue.  The
lines of each connection (`conn_open`, `conn_close`, `exec_start`,
`exec_end`, through `Sink.put`) may wait for a block, at most 10 ms.
`batched(reactor)` is the loop's time: the sink may then ask the reactor to
wake it when the target can take more.  Outside the loop each line is
written at once, waiting at most a second in all.

Rendering (render.py): structlog's chain for every event, except the
per-connection ones in JSON, which have a direct renderer of the same bytes.
Every connection's two lines go through `conn_open` and `conn_close`: in
JSON, one f-string each, the connection's own part made once at conn.open
and kept on the transport for conn.close; in other formats, `info`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

import structlog

from evd.log import render
from evd.log.journal import JournalTarget
from evd.log.sink import Sink, Target, Watcher
from evd.log.targets import ATOMIC_WRITE, FileTarget, StderrTarget, describe

__all__ = ["ATOMIC_WRITE", "FORMATS", "LEVELS", "NOTHING_MORE", "Log", "log"]

LEVELS = render.LEVELS
FORMATS = render.FORMATS
DEFAULT_BUFFER = 4 * 1024 * 1024  # SPEC: log.buffer
DEFAULT_JOURNAL = "/run/systemd/journal/socket"

LogMethod = render.LogMethod
Logged = render.Logged
NOTHING_MORE = render.NOTHING_MORE
ConnOpen = render.ConnOpen
ConnClose = render.ConnClose
ExecStart = render.ExecStart
ExecEnd = render.ExecEnd


def _nothing(event: str, /, **fields: Any) -> None:
    """A level that is filtered out."""


class Log:
    """What every module logs through; `configure` swaps what is underneath."""

    def __init__(self) -> None:
        self.level = "info"
        self.format = "json"
        self.journal_socket = DEFAULT_JOURNAL
        self._chain: list[render.Processor] = []
        self.sink = Sink(StderrTarget(), DEFAULT_BUFFER, self._render_dropped)
        self._set()

    def _set(self) -> None:
        self._chain = render.processors(self.format, colors=self.sink.isatty())
        threshold = getattr(logging, self.level.upper())
        logger = structlog.wrap_logger(
            self.sink,
            processors=self._chain,
            wrapper_class=structlog.make_filtering_bound_logger(threshold),
            context_class=dict,
        ).bind()
        # For the per-connection events: skip building their fields at all
        # when info is filtered out (the connect path at level warning).
        self.info_on = self.enabled("info")
        # Read per request by the framed handler: a reload's level reaches
        # connections already open.
        self.debug_on = self.enabled("debug")
        self.debug: LogMethod = logger.debug if self.debug_on else _nothing
        self.info: LogMethod = logger.info if self.info_on else _nothing
        self.warning: LogMethod = logger.warning if self.enabled("warning") else _nothing
        self.error: LogMethod = logger.error
        self.conn_open: ConnOpen = self._conn_open
        self.conn_close: ConnClose = self._conn_close
        self.exec_start: ExecStart = self._exec_start
        self.exec_end: ExecEnd = self._exec_end
        if self.format == "json" and self.info_on:
            self.conn_open, self.conn_close = render.json_conn_lines(self.sink.put)
            self.exec_start, self.exec_end = render.json_exec_lines(self.sink.put)
        fast = {"json": render.fast_json, "journal": render.fast_journal}.get(self.format)
        if fast is not None:
            write = self.sink.write
            if self.enabled("debug"):
                self.debug = render.shortcut("debug", logger.debug, write, fast)
            if self.info_on:
                self.info = render.shortcut("info", logger.info, write, fast)

    # -- the two lines of every connection -----------------------------------------

    def _conn_open(
        self, conn: Logged, service: str, conn_id: int, proto: str, extra: Mapping[str, Any]
    ) -> None:
        """conn.open: service, peer, conn, proto, then `extra`.  (`conn_id`:
        the transport is told its id after this.)"""
        self.info("conn.open", service=service, peer=conn.peer, conn=conn_id, proto=proto, **extra)

    def _conn_close(
        self, conn: Logged, service: str, micros: int, reason: str, extra: Mapping[str, Any]
    ) -> None:
        """conn.close: service, peer, conn, duration_ms (`micros` / 1000),
        bytes_in, bytes_out, reason, then `extra`."""
        self.info(
            "conn.close",
            service=service,
            peer=conn.peer,
            conn=conn.conn_id,
            duration_ms=micros / 1000,
            bytes_in=conn.bytes_in,
            bytes_out=conn.bytes_out,
            reason=reason,
            **extra,
        )

    # -- the two lines of every program connection -----------------------------------

    def _exec_start(self, service: str, conn_id: int, argv: tuple[str, ...], pid: int, peer: str) -> None:
        """exec.start: service, conn, argv, exec_pid, peer."""
        self.info("exec.start", service=service, conn=conn_id, argv=list(argv), exec_pid=pid, peer=peer)

    def _exec_end(
        self,
        service: str,
        conn_id: int,
        argv: tuple[str, ...],
        peer: str,
        pid: int,
        exit: int | None,
        signal: int | None,
        timed_out: bool,
        micros: int,
        stderr_tail: str,
    ) -> None:
        """exec.end: service, conn, argv, peer, exec_pid, exit, signal,
        timed_out, duration_ms (`micros` / 1000), stderr_tail."""
        self.info(
            "exec.end",
            service=service,
            conn=conn_id,
            argv=list(argv),
            peer=peer,
            exec_pid=pid,
            exit=exit,
            signal=signal,
            timed_out=timed_out,
            duration_ms=micros / 1000,
            stderr_tail=stderr_tail,
        )

    def _render_dropped(self, count: int, first: str) -> Any:
        return render.run_chain(self._chain, "warning", "log.dropped", {"count": count, "first": first})

    @property
    def dropped_total(self) -> int:
        """Lines lost since the process started (for metrics)."""
        return self.sink.dropped_total

    def configure(
        self,
        level: str,
        fmt: str,
        path: str = "",
        *,
        buffer: int | None = None,
        journal_socket: str | None = None,
    ) -> None:
        """Log at `level` in `fmt` to `path` ("" = stderr) or, for the
        journal format, to `journal_socket`.  Raises OSError if the file or
        the journal cannot be opened (nothing changes then).  `buffer` and
        `journal_socket` left out keep what they were."""
        socket_path = self.journal_socket if journal_socket is None else journal_socket
        target = self._target_for(fmt, path, socket_path)
        self.journal_socket = socket_path
        if buffer is not None:
            self.sink.limit = buffer
        if target is not None:
            self.sink.retarget(target)
        self.level, self.format = level, fmt
        self._set()

    def _target_for(self, fmt: str, path: str, socket_path: str) -> Target | None:
        """A new target, or None if the current one is the one wanted."""
        current = self.sink.target
        if fmt == "journal":
            if isinstance(current, JournalTarget) and current.socket_path == socket_path:
                return None
            return JournalTarget(socket_path)
        if isinstance(current, JournalTarget) or current.path != path:
            return FileTarget(path) if path else StderrTarget()
        return None

    def journal_problem(self) -> str:
        """Why the journal could not be reached when it was configured ("" if
        it could, or the log is not the journal): evd serves on and keeps
        the entries meanwhile (SPEC section 12), and says so once."""
        target = self.sink.target
        return target.problem if isinstance(target, JournalTarget) else ""

    def reopen(self) -> None:
        """SIGUSR1 (and every reload): reopen log.file, which logrotate may
        have moved away; the first line in the new file says so.  A file
        that cannot be opened is one error line, and the lines wait (up to
        log.buffer) for a reopen that works."""
        path = self.sink.path
        try:
            warning = self.sink.reopen()
        except OSError as exc:
            where = path or self.journal_socket
            self.error("log.reopen", ok=False, file=where, error=f"open: {describe(exc)}")
            return
        if warning:
            self.warning("log.reopen", ok=True, file=path, error=warning)
        elif path:
            self.info("log.reopen", ok=True, file=path)

    @contextlib.contextmanager
    def batched(self, reactor: Watcher | None = None) -> Iterator[None]:
        """While the loop runs: lines are written once per iteration by the
        before-sleep hook (`sink.flush`), and the reactor wakes the sink
        when a target that was full can take more.  At the end, at most a
        second for what is left."""
        sink = self.sink
        outer = sink.batching
        sink.batching = True
        if reactor is not None:
            sink.attach(reactor)
        try:
            yield
        finally:
            sink.batching = outer
            if not outer:
                sink.detach()

    def enabled(self, level: str) -> bool:
        return LEVELS.index(level) >= LEVELS.index(self.level)


log = Log()


def _after_fork() -> None:
    log.sink.after_fork()


# A worker starts with an empty queue: its parent writes what it had.
os.register_at_fork(after_in_child=_after_fork)
