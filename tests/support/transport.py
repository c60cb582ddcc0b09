"""Shared by several test modules: a loop on real socketpairs, recording
handlers and log, a service.  `Loop.run_until` and `LogRecorder` are the
only ones of their kind in the tests: use them, do not write another."""

from __future__ import annotations

import array
import socket

from evd.config.model import Limits, ServiceConfig
from evd.handlers.base import Handler
from evd.handlers.service import Service
from evd.log.logger import Log
from evd.loop.reactor import Reactor
from evd.net.transport import RECV_SIZE

LIMIT = 5.0


def chargen_cycle() -> bytes:
    """RFC 864 from its definition (not from evd.services)."""
    ring = bytes(range(32, 127))
    return b"".join(bytes(ring[(i + k) % 95] for k in range(72)) + b"\r\n" for i in range(95))


def counting_pattern(size: int) -> bytes:
    """Bytes in which every 4-byte word is distinct: any reordering, loss or
    duplication of a chunk shows."""
    words = array.array("I", range(size // 4 + 1)).tobytes()
    return words[:size]


KiB = 1024


def make_service(reactor, name="echo", high=256 * KiB, low=64 * KiB):
    """The real running state of a service, with these water marks."""
    limits = Limits(write_high=high, write_low=low, rate=0.0)
    return Service(ServiceConfig(name, True, limits=limits), reactor)


class LogRecorder:
    """Stands in for evd's `log` in the modules a test patches (`record`):
    every call kept as (level, event, fields)."""

    info_on = True  # as evd.log.Log at level info: the per-connection events

    def __init__(self):
        self.events = []

    @classmethod
    def record(cls, monkeypatch, *modules):
        """A recorder as the `log` of each of `modules`, for this test."""
        rec = cls()
        for module in modules:
            monkeypatch.setattr(module, "log", rec)
        return rec

    def _record(level):
        def method(self, event, **fields):
            self.events.append((level, event, fields))

        return method

    debug = _record("debug")
    info = _record("info")
    warning = _record("warning")
    error = _record("error")
    # The two lines of every connection, as evd.log.Log makes them from info.
    conn_open = Log._conn_open
    conn_close = Log._conn_close

    def named(self, event):
        return [(level, fields) for level, e, fields in self.events if e == event]

    def fields(self, event):
        """The fields of each `event`, in order."""
        return [fields for _, e, fields in self.events if e == event]

    def names(self):
        """Every event's name, in order."""
        return [e for _, e, _ in self.events]


class Loop:
    """A reactor plus `run_until(condition)`: the condition is checked before
    every sleep; a guard timer bounds the run.  `selector`: the reactor's
    (None: epoll)."""

    def __init__(self, selector=None):
        self.reactor = Reactor(selector)
        self.iterations = 0
        self._cond = None
        self.reactor.add_before_sleep(self._check)

    def _check(self):
        self.iterations += 1
        if self._cond is not None and self._cond():
            self.reactor.stop()

    def run_until(self, cond, limit=LIMIT, what=""):
        """Run the loop until `cond()` holds; fail after `limit` seconds."""
        self._cond = cond
        expired = []
        guard = self.reactor.call_later(limit, lambda: (expired.append(True), self.reactor.stop()) and None)
        try:
            self.reactor.run()
        finally:
            self.reactor.cancel(guard)
            self._cond = None
        assert not expired, f"timed out after {limit}s waiting for {what or cond}"

    def run_for(self, seconds):
        """Let the loop run for a while (to show that something does NOT happen)."""
        stop = self.reactor.call_later(seconds, self.reactor.stop)
        guard = self.reactor.call_later(seconds + LIMIT, self.reactor.stop)
        self.reactor.run()
        self.reactor.cancel(stop)
        self.reactor.cancel(guard)


class Peer:
    """The client end of a socket, driven by the loop."""

    def __init__(self, reactor, sock):
        self.reactor = reactor
        self.sock = sock
        self.fd = sock.fileno()
        sock.setblocking(False)
        self.received = bytearray()
        self.eof = False
        self.error = None
        self.sent = 0
        self._out = memoryview(b"")
        self._shutdown = False
        self.reading = False

    def start_reading(self):
        self.reading = True
        self.reactor.add_reader(self.fd, self._on_read)

    def stop_reading(self):
        self.reading = False
        self.reactor.remove_reader(self.fd)

    def _on_read(self):
        try:
            data = self.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self.error = exc
            self.stop_reading()
            return
        if not data:
            self.eof = True
            self.stop_reading()
            return
        self.received += data

    def send(self, data, shutdown=False):
        self._out = memoryview(bytes(data))
        self._shutdown = shutdown
        self.reactor.add_writer(self.fd, self._on_write)

    @property
    def pending(self):
        return len(self._out)

    def _on_write(self):
        try:
            n = self.sock.send(self._out)
        except BlockingIOError:
            return
        self.sent += n
        self._out = self._out[n:]
        if not self._out:
            self.reactor.remove_writer(self.fd)
            if self._shutdown:
                self.sock.shutdown(socket.SHUT_WR)

    def shutdown(self):
        self.sock.shutdown(socket.SHUT_WR)

    def close(self):
        if self.reading:
            self.stop_reading()
        if self._out:
            self.reactor.remove_writer(self.fd)
        self.sock.close()


class Recorder(Handler):
    """A handler that records its events (and optionally does something)."""

    def __init__(self, on_made=None, on_data=None):
        self.lost = []
        self.data = bytearray()
        self.resumed = []
        self.eofs = 0
        self._on_made = on_made
        self._on_data = on_data

    def connection_made(self, transport):
        self.transport = transport
        if self._on_made:
            self._on_made(transport)

    def data_received(self, data):
        self.data += data
        if self._on_data:
            self._on_data(self.transport, data)

    def eof_received(self):
        self.eofs += 1
        return False

    def resume_writing(self):
        self.resumed.append(self.transport.buffered)

    def connection_lost(self, reason):
        self.lost.append(reason)
