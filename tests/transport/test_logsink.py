"""The log sink (evd/log/sink.py) on real descriptors: pipes that stop
being read, a terminal nobody reads, a socket, a full tmpfs, and the bound
on what it holds.  Every test that could hang if the sink blocked runs
under an alarm, so a blocking write fails the test instead of stalling it."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import os
import signal
import socket
import time
import tracemalloc
from pathlib import Path

import pytest

from evd.log import sink as logsink
from evd.log import targets
from evd.log.sink import LINE_OVERHEAD, Sink
from evd.log.targets import ATOMIC_WRITE, FileTarget, StderrTarget
from evd.loop.reactor import Reactor

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


@contextlib.contextmanager
def never_blocks(seconds: float = 10.0):
    """Fail (not hang) if the code inside blocks."""

    def expired(signum, frame):
        raise AssertionError(f"blocked for {seconds}s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def dropped_note(count: int, first: str) -> str:
    return json.dumps({"event": "log.dropped", "count": count, "first": first})


def line(i: int, pad: int = 60) -> str:
    return json.dumps({"event": "conn.open", "conn": i, "peer": "x" * pad})


def small_pipe() -> tuple[int, int]:
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, 4096)
    return r, w


def read_all(fd: int) -> bytes:
    """Everything readable now, without waiting."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
    return b"".join(chunks)


def drain_into(r: int, sink: Sink) -> bytes:
    """Read the pipe and let the sink write, until it holds nothing."""
    received = read_all(r)
    with never_blocks():
        for _ in range(10_000):
            sink.flush()
            received += read_all(r)
            if not (sink._queue or sink._out or sink._dropped):
                break
    return received


def fdinfo_flags(fd: int, pid: int | str = "self") -> int:
    for row in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
        if row.startswith("flags:"):
            return int(row.split()[1], 8)
    raise AssertionError("no flags in fdinfo")


class Recording:
    """A target that remembers each write."""

    datagram = False
    chunk = ATOMIC_WRITE
    path = ""
    fd = None

    def __init__(self):
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.writes.append(bytes(data))
        return len(data)

    def reopen(self):
        return None

    def after_fork(self):
        pass

    def isatty(self):
        return False

    def close(self):
        pass


def batch_through_recording(lines: list[str]) -> list[bytes]:
    out = Recording()
    sink = Sink(out, 1 << 20, dropped_note)
    sink.batching = True
    for text in lines:
        sink.write(text)
    assert out.writes == []  # batching: nothing written before the flush
    sink.flush()
    return out.writes


# -- batches ------------------------------------------------------------------


def test_a_batch_is_one_write_when_it_fits():
    lines = [line(i, 10) for i in range(20)]
    assert batch_through_recording(lines) == [("\n".join(lines) + "\n").encode()]


def test_a_large_batch_goes_out_in_whole_lines_of_at_most_pipe_buf_bytes():
    # Workers share one stderr pipe: only writes up to PIPE_BUF stay whole.
    lines = [json.dumps({"event": "conn.close", "conn": i, "peer": "é" * (i % 50)}) for i in range(500)]
    writes = batch_through_recording(lines)
    assert len(writes) > 1
    assert b"".join(writes) == ("\n".join(lines) + "\n").encode()  # nothing lost, order kept
    for data in writes:
        assert data.endswith(b"\n") and len(data) <= ATOMIC_WRITE
    for data, following in itertools.pairwise(writes):  # as full as whole lines allow
        assert len(data) + len(following.split(b"\n", 1)[0]) + 1 > ATOMIC_WRITE


def test_a_line_longer_than_pipe_buf_goes_alone():
    long = json.dumps({"event": "error", "exception": "x" * (2 * ATOMIC_WRITE)})
    assert batch_through_recording(["a", long, "b"]) == [b"a\n", (long + "\n").encode(), b"b\n"]


def test_a_lone_surrogate_does_not_lose_the_batch():
    """Issue 9 #3: one line with "\\ud800" made the whole batch raise."""
    lines = [line(1), json.dumps({"id": "\ud800"}, ensure_ascii=False), line(2)]
    data = b"".join(batch_through_recording(lines))
    got = [json.loads(row) for row in data.decode().splitlines()]
    assert got == [json.loads(text) for text in lines]  # the escape reads back as the same string


# -- connection lines wait a little --------------------------------------------


class Timers:
    """What the sink asks of a reactor, with the timers kept to fire by hand."""

    def __init__(self):
        self.timers: list[tuple[float, object]] = []

    def add_writer(self, fd, callback):
        raise AssertionError("a target that takes everything needs no writer")

    def remove_writer(self, fd):
        pass

    def call_later(self, delay, callback):
        self.timers.append((delay, callback))

    def fire(self):
        due, self.timers = self.timers, []
        for _, callback in due:
            callback()


def coalescing(out, loop):
    sink = Sink(out, 1 << 20, dropped_note)
    sink.batching = True
    sink.attach(loop)
    return sink


def test_connection_lines_wait_for_the_timer_and_no_longer():
    out, loop = Recording(), Timers()
    sink = coalescing(out, loop)
    sink.put(line(1) + "\n")
    sink.put(line(2) + "\n")
    sink.flush()
    sink.flush()  # a second iteration sets no second timer
    assert out.writes == []
    assert [delay for delay, _ in loop.timers] == [logsink.COALESCE_DELAY]
    loop.fire()
    assert b"".join(out.writes) == f"{line(1)}\n{line(2)}\n".encode()
    sink.put(line(3) + "\n")
    sink.flush()  # the next wait has its own timer
    assert len(loop.timers) == 1


def test_connection_lines_go_out_once_they_fill_a_block():
    out, loop = Recording(), Timers()
    sink = coalescing(out, loop)
    count = 0
    while sink._size < logsink.COALESCE_BYTES:
        sink.put(line(count) + "\n")
        count += 1
    sink.flush()
    rows = [json.loads(text) for text in b"".join(out.writes).decode().splitlines()]
    assert [row["conn"] for row in rows] == list(range(count))


def test_connection_lines_wait_for_no_more_than_half_a_small_buffer():
    """log.buffer below the block: lines that waited for a full block would
    fill the buffer and be dropped while the log could take them."""
    out, loop = Recording(), Timers()
    sink = Sink(out, 8192, dropped_note)
    sink.batching = True
    sink.attach(loop)
    count = 0
    while sink._size * 2 < 8192:
        sink.put(line(count) + "\n")
        count += 1
    sink.flush()
    assert len(b"".join(out.writes).splitlines()) == count and sink.dropped_total == 0


def test_any_other_line_goes_out_with_its_iteration_and_takes_the_waiting_ones():
    out, loop = Recording(), Timers()
    sink = coalescing(out, loop)
    sink.put(line(1) + "\n")
    sink.write(line(2))  # a reject, a reload's result: not kept waiting
    sink.put(line(3) + "\n")
    sink.flush()
    rows = [json.loads(text) for text in b"".join(out.writes).decode().splitlines()]
    assert [row["conn"] for row in rows] == [1, 2, 3]
    sink.put(line(4) + "\n")
    sink.flush()  # connection lines alone wait again
    assert b'"conn": 4' not in b"".join(out.writes)


def test_waiting_lines_are_written_at_exit(tmp_path):
    path = tmp_path / "evd.log"
    sink = coalescing(FileTarget(str(path)), Timers())
    sink.put(line(1) + "\n")
    sink.flush()
    assert path.read_text() == ""
    sink.close()
    assert path.read_text() == line(1) + "\n"


def test_a_forked_worker_waits_on_its_own_loops_timer():
    """The parent's timer is not in the worker's reactor: a worker that
    kept the parent's `timer set` would hold its lines until some other
    line came (a new generation's conn.close lines never came)."""
    out, parent = Recording(), Timers()
    sink = coalescing(out, parent)
    sink.put(line(1) + "\n")
    sink.flush()
    assert len(parent.timers) == 1
    sink.after_fork()
    worker = Timers()
    sink.batching = True
    sink.attach(worker)
    sink.put(line(2) + "\n")
    sink.flush()
    assert len(worker.timers) == 1
    worker.fire()
    assert b"".join(out.writes) == f"{line(2)}\n".encode()


# -- a pipe that stops being read ----------------------------------------------


def test_a_stalled_pipe_never_blocks_and_reports_what_it_dropped():
    r, w = small_pipe()
    flags = fcntl.fcntl(w, fcntl.F_GETFL)
    try:
        sink = Sink(StderrTarget(w), 8192, dropped_note)
        sink.batching = True
        sent = 2000
        with never_blocks():
            for i in range(sent):
                sink.write(line(i))
                if i % 10 == 0:
                    sink.flush()
            sink.flush()
        assert sink.dropped_total > 0
        assert fcntl.fcntl(w, fcntl.F_GETFL) == flags  # the shared description: untouched
        assert not fdinfo_flags(w) & os.O_NONBLOCK
        received = drain_into(r, sink)  # the reader reads: the sink writes again
        rows = [json.loads(text) for text in received.decode().splitlines()]
        notes = [row for row in rows if row["event"] == "log.dropped"]
        conns = [row["conn"] for row in rows if row["event"] == "conn.open"]
        # A pipe with room for a short line but not for a batch takes the
        # note alone: several notes then, each for the lines lost before it.
        assert notes and sum(note["count"] for note in notes) == sink.dropped_total
        assert len(conns) + sink.dropped_total == sent
        assert conns == sorted(conns)  # in order
    finally:
        os.close(r)
        os.close(w)


def test_the_pipe_is_written_through_a_private_description():
    r, w = small_pipe()
    try:
        target = StderrTarget(w)
        assert target.fd != w
        assert fdinfo_flags(target.fd) & os.O_NONBLOCK  # ours: non-blocking
        assert not fdinfo_flags(w) & os.O_NONBLOCK
        target.close()
    finally:
        os.close(r)
        os.close(w)


def test_without_proc_the_pipe_is_polled_and_written_whole(monkeypatch):
    """The fallback when /proc/self/fd cannot give a private description:
    poll for room, then at most PIPE_BUF bytes, which a pipe takes whole."""
    real_open = os.open

    def no_proc(path, *args, **kw):
        if str(path).startswith("/proc/self/fd/"):
            raise PermissionError(errno.EACCES, "no /proc here")
        return real_open(path, *args, **kw)

    monkeypatch.setattr(os, "open", no_proc)
    r, w = small_pipe()
    try:
        target = StderrTarget(w)
        assert target.fd == w
        sink = Sink(target, 8192, dropped_note)
        sink.batching = True
        with never_blocks():
            for i in range(1000):
                sink.write(line(i))
                sink.flush()
        assert sink.dropped_total > 0
        assert not fdinfo_flags(w) & os.O_NONBLOCK
        received = drain_into(r, sink)
        rows = [json.loads(text) for text in received.decode().splitlines()]  # whole lines only
        assert sum(row["count"] for row in rows if row["event"] == "log.dropped") == sink.dropped_total
        assert len([row for row in rows if row["event"] == "conn.open"]) + sink.dropped_total == 1000
    finally:
        os.close(r)
        os.close(w)


def test_the_reactor_wakes_the_sink_when_the_pipe_drains():
    r, w = small_pipe()
    reactor = Reactor()
    try:
        sink = Sink(StderrTarget(w), 1 << 20, dropped_note)
        sink.batching = True
        sink.attach(reactor)
        for i in range(200):  # more than the pipe holds
            sink.write(line(i))
        sink.flush()
        assert sink._queue or sink._out  # waiting for the pipe
        received = []

        def reader():
            received.append(os.read(r, 65536))
            if b'"conn": 199' in b"".join(received):
                reactor.stop()

        reactor.add_reader(r, reader)
        reactor.call_later(5.0, reactor.stop)
        with never_blocks():
            reactor.run()  # no before-sleep flush here: only the writer wakes the sink
        rows = [json.loads(text) for text in b"".join(received).decode().splitlines()]
        assert [row["conn"] for row in rows] == list(range(200))
        sink.detach()
    finally:
        reactor.close()
        os.close(r)
        os.close(w)


def test_at_exit_the_drain_waits_at_most_a_second():
    r, w = small_pipe()
    try:
        sink = Sink(StderrTarget(w), 1 << 20, dropped_note)
        sink.batching = True
        for i in range(500):
            sink.write(line(i))
        start = time.monotonic()
        with never_blocks():
            sink.close()
        assert 0.9 <= time.monotonic() - start < 2.0
        assert sink.dropped_total > 0  # what could not go is counted
    finally:
        os.close(r)
        os.close(w)


def test_a_stalled_pipe_holds_at_most_the_buffer():
    """log.buffer bounds memory, not only a count of bytes."""
    r, w = small_pipe()
    limit = 64 * 1024
    try:
        sink = Sink(StderrTarget(w), limit, dropped_note)
        sink.batching = True
        lines = [line(i) for i in range(50_000)]
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i, text in enumerate(lines):
                sink.write(text)
                if i % 100 == 0:
                    sink.flush()
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert sink._size <= limit + 200  # a log.dropped note may wait on top
        assert held < limit + 16 * 1024, held
        assert sink.dropped_total > 40_000
    finally:
        os.close(r)
        os.close(w)


# -- other kinds of stderr -----------------------------------------------------


def test_a_socket_as_stderr_is_sent_to_without_blocking():
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    flags = fcntl.fcntl(ours.fileno(), fcntl.F_GETFL)
    try:
        sink = Sink(StderrTarget(ours.fileno()), 8192, dropped_note)
        sink.batching = True
        with never_blocks():
            for i in range(3000):
                sink.write(line(i))
                sink.flush()
        assert sink.dropped_total > 0
        assert fcntl.fcntl(ours.fileno(), fcntl.F_GETFL) == flags
        theirs.setblocking(False)
        data = b""
        with never_blocks():
            for _ in range(100):
                with contextlib.suppress(BlockingIOError):
                    data += theirs.recv(1 << 20)
                sink.flush()
                if b"log.dropped" in data and not (sink._queue or sink._out):
                    break
        rows = [json.loads(text) for text in data.decode().splitlines()]
        assert sum(row.get("count", 0) for row in rows if row["event"] == "log.dropped") == sink.dropped_total
    finally:
        ours.close()
        theirs.close()


def test_a_terminal_nobody_reads_does_not_block():
    master, slave = os.openpty()
    flags = fcntl.fcntl(slave, fcntl.F_GETFL)
    try:
        target = StderrTarget(slave)
        assert target.isatty()
        sink = Sink(target, 8192, dropped_note)
        sink.batching = True
        with never_blocks():
            for i in range(5000):
                sink.write(line(i))
                sink.flush()
        assert sink.dropped_total > 0
        assert fcntl.fcntl(slave, fcntl.F_GETFL) == flags
        target.close()
    finally:
        os.close(master)
        os.close(slave)


# -- a full disk ---------------------------------------------------------------


def fill(path: Path) -> None:
    """Fill the file system `path` is on, to the last byte."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while os.write(fd, b"\0" * 512):
                pass
    finally:
        os.close(fd)


def test_a_full_disk_tears_no_line_and_says_what_it_lost(tiny_tmpfs, monkeypatch):
    monkeypatch.setattr(logsink, "RETRY", 0.0)
    path = tiny_tmpfs / "evd.log"
    sink = Sink(FileTarget(str(path)), 4096, dropped_note)
    sink.batching = True
    fill(tiny_tmpfs / "filler")
    sent = 0
    for i in range(3000):  # odd-sized lines, so a page boundary falls inside one
        sink.write(line(i, pad=60 + i % 37))
        sent += 1
        if i % 7 == 0:
            sink.flush()
    sink.flush()
    assert sink.dropped_total > 0
    text = path.read_bytes()
    assert text == b"" or text.endswith(b"\n")
    whole = [json.loads(row) for row in text.decode().splitlines()]  # no torn line
    (tiny_tmpfs / "filler").unlink()
    time.sleep(0.01)  # RETRY is 0: the next flush tries again
    sink.flush()
    rows = [json.loads(row) for row in path.read_bytes().decode().splitlines()]
    assert rows[: len(whole)] == whole
    after = rows[len(whole) :]
    assert after[0]["event"] == "log.dropped"
    conns = [row for row in rows if row["event"] == "conn.open"]
    assert len(conns) + after[0]["count"] == sent
    sink.close()


def test_a_write_the_disk_takes_in_part_is_taken_back(tmp_path, monkeypatch):
    """The short-write path alone: the kernel takes 10 bytes, then ENOSPC."""
    path = tmp_path / "evd.log"
    path.write_bytes(b"earlier\n")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    real_write = os.write
    calls = []

    def short(fd_, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd_, bytes(data[:10]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", short)
    with pytest.raises(OSError):
        targets._append(fd, b'{"event": "a long line"}\n')
    monkeypatch.undo()
    os.close(fd)
    assert path.read_bytes() == b"earlier\n"


class Gate(Recording):
    """A target that would block until opened."""

    def __init__(self):
        super().__init__()
        self.open = False

    def write(self, data: bytes) -> int:
        if not self.open:
            raise BlockingIOError(errno.EAGAIN, "full")
        return super().write(data)


def test_the_first_line_once_writes_work_again_is_log_dropped():
    gate = Gate()
    sink = Sink(gate, 10 * (100 + LINE_OVERHEAD), dropped_note)
    sink.batching = True
    lines = [json.dumps({"event": "x", "n": i}).ljust(99) for i in range(25)]
    for text in lines:
        sink.write(text)
        sink.flush()
    assert sink.dropped_total == 15 and gate.writes == []
    gate.open = True
    sink.flush()
    rows = [json.loads(row) for row in b"".join(gate.writes).decode().splitlines()]
    assert rows[0]["event"] == "log.dropped" and rows[0]["count"] == 15
    assert [row["n"] for row in rows[1:]] == list(range(10))  # the ones held, in order
    sink.write(lines[0])
    sink.flush()
    assert b"".join(gate.writes).decode().count("log.dropped") == 1  # told once
