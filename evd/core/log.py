"""Structured logs: one event per line, JSON or console, through structlog.

Everything in evd logs through the module-level `log` object.  `configure`
points it at a freshly built structlog logger (level filter, timestamp, pid,
renderer), so a reload that changes the level or the file swaps the logger
underneath every caller at once.

Lines go to a `LogSink`: stderr or a file opened for append.  While the
reactor runs, the sink is in batching mode: rendered lines are collected and
written in one `write` from the reactor's before-sleep hook, so a burst of
connections costs one system call, not one per event.  Outside the loop (start
up, errors at exit) each line is written at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import sys
import traceback

import structlog

LEVELS = ("debug", "info", "warning", "error")
# The largest write a pipe keeps whole when several processes write to it.
ATOMIC_WRITE = select.PIPE_BUF


class LogSink:
    """The file end of logging: stderr or `path` in append mode, reopenable."""

    def __init__(self, path: str = ""):
        self.path = path
        self.batching = False
        self._pending: list[str] = []
        self._file = self._open()

    def _open(self):
        if not self.path:
            return sys.stderr
        return open(self.path, "a", encoding="utf-8", buffering=1)

    def write(self, line: str) -> None:
        if self.batching:
            self._pending.append(line)
            return
        self._emit(line + "\n")

    # structlog calls the method named after the level; all of them write.
    msg = debug = info = warning = error = critical = fatal = exception = write

    def flush(self) -> None:
        """Write the batch: whole lines, at most ATOMIC_WRITE bytes a write
        (one line longer than that goes alone).  Workers share one stderr
        pipe or log file, and a pipe keeps only writes up to PIPE_BUF in one
        piece: a bigger one could be cut by another worker's lines."""
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        chunk: list[str] = []
        size = 0
        for line in lines:
            n = (len(line) if line.isascii() else len(line.encode())) + 1
            if chunk and size + n > ATOMIC_WRITE:
                self._emit("\n".join(chunk) + "\n")
                chunk, size = [], 0
            chunk.append(line)
            size += n
        self._emit("\n".join(chunk) + "\n")

    def _emit(self, text: str) -> None:
        try:
            self._file.write(text)
            self._file.flush()
        except (OSError, ValueError):
            # A full disk or a closed stderr must not take the daemon down;
            # there is nowhere left to report it.
            pass

    def reopen(self) -> None:
        """Reopen `path` (after logrotate renamed it); stderr stays stderr."""
        self.flush()
        if not self.path:
            return
        old = self._file
        self._file = self._open()
        old.close()

    def fileno(self) -> int:
        return self._file.fileno()

    def close(self) -> None:
        self.flush()
        if self.path:
            self._file.close()


_pid = os.getpid()


def _refresh_pid() -> None:
    global _pid
    _pid = os.getpid()


# getpid() is a system call; cache it, and refresh it in forked workers.
os.register_at_fork(after_in_child=_refresh_pid)

# One encoder, built once: json.dumps with any keyword builds a new encoder
# per call, which was a third of the cost of a log line.
_encoder = json.JSONEncoder(default=repr, ensure_ascii=False)


def _dumps(obj, **_kw) -> str:
    return _encoder.encode(obj)


def _render_exc_info(logger, method_name, event_dict):
    """`exc_info` becomes the formatted traceback text (SPEC: field exc_info)."""
    exc = event_dict.get("exc_info")
    if isinstance(exc, BaseException):
        event_dict["exc_info"] = "".join(traceback.format_exception(exc)).rstrip()
    elif exc is True:
        event_dict["exc_info"] = traceback.format_exc().rstrip()
    return event_dict


def _order_keys(logger, method_name, event_dict):
    """timestamp, level, event, pid first: what an operator reads first."""
    pop = event_dict.pop
    return {
        "timestamp": pop("timestamp"),
        "level": pop("level"),
        "event": pop("event"),
        "pid": _pid,
        **event_dict,
    }


def build_logger(level: str, fmt: str, sink: LogSink):
    processors = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
        _render_exc_info,
        _order_keys,
    ]
    if fmt == "json":
        processors.append(structlog.processors.JSONRenderer(serializer=_dumps))
    else:
        colors = hasattr(sink._file, "isatty") and sink._file.isatty()
        processors.append(structlog.dev.ConsoleRenderer(colors=colors))
    wrapper = structlog.make_filtering_bound_logger(getattr(logging, level.upper()))
    return structlog.wrap_logger(
        sink, processors=processors, wrapper_class=wrapper, context_class=dict
    ).bind()


class Log:
    """What every module logs through; `configure` swaps the target."""

    def __init__(self):
        self.sink = LogSink()
        self.level = "info"
        self._set(build_logger("info", "json", self.sink))

    def _set(self, logger) -> None:
        # For the per-connection events: skip building their fields at all
        # when info is filtered out (the connect path at level warning).
        self.info_on = self.enabled("info")
        self.debug = logger.debug
        self.info = logger.info
        self.warning = logger.warning
        self.error = logger.error

    def configure(self, level: str, fmt: str, path: str = "") -> None:
        """Point logging at `path` ("" = stderr) with `level` and `fmt`.
        Raises OSError if the file cannot be opened (the old sink stays)."""
        sink = self.sink
        if path != sink.path:
            sink = LogSink(path)
            sink.batching = self.sink.batching
            self.sink.close()
        self.sink = sink
        self.level = level
        self._set(build_logger(level, fmt, sink))

    def reopen(self) -> None:
        """SIGUSR1 (and every reload): reopen log.file, which logrotate may
        have moved away; the first line in the new file says so."""
        try:
            self.sink.reopen()
        except OSError as exc:
            self.error("error", where="log.reopen", exc_info=exc)
        else:
            if self.sink.path:
                self.info("log.reopen", file=self.sink.path)

    @contextlib.contextmanager
    def batched(self):
        """While the loop runs: lines are written once per iteration by the
        before-sleep hook (`sink.flush`), and everything left at the end."""
        self.sink.batching = True
        try:
            yield
        finally:
            self.sink.batching = False
            self.sink.flush()

    def enabled(self, level: str) -> bool:
        return LEVELS.index(level) >= LEVELS.index(self.level)


log = Log()
