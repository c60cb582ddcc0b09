"""StreamTransport (evd/net/transport.py) and the stream handlers (evd/handlers/raw.py)
on real sockets: a socketpair (or loopback TCP where TCP matters) and a real
Reactor.  The far end of each socket is a `Peer` driven by the same loop, so
the test never blocks on a socket and never sleeps; every run is bounded.
"""

from __future__ import annotations

import re
import socket
import struct
from datetime import UTC, datetime

import pytest
from support.transport import (
    LIMIT,
    LogRecorder,
    Peer,
    Recorder,
    chargen_cycle,
    counting_pattern,
    make_service,
)

import evd.handlers.service as service_mod
import evd.net.transport as transport_mod
from evd.handlers import raw as handlers
from evd.loop.seams import Reason
from evd.net.transport import RECV_SIZE, StreamTransport

KiB = 1024
MiB = 1024 * KiB


# --- stand-ins and drivers ----------------------------------------------------


def open_transport(service, sock, protocol, host=None, port=0):
    """A transport as a listener makes one: admitted, counted, started."""
    assert service.admit(host, port, service.reactor.now) is None
    t = StreamTransport(service.reactor, sock, protocol, service, host=host, port=port)
    t.start(service.opened(t))
    return t


class RecordingEcho(handlers.Echo):
    def __init__(self):
        self.lost = []
        self.resumed = []

    def resume_writing(self):
        self.resumed.append(self.transport.buffered)

    def connection_lost(self, reason):
        self.lost.append(reason)


@pytest.fixture
def log(monkeypatch):
    return LogRecorder.record(monkeypatch, transport_mod, service_mod)


@pytest.fixture
def conn(loop, log):
    """conn(protocol, service=None) -> (transport, peer) over a socketpair."""
    made = []

    def make(protocol, service=None):
        service = service or make_service(loop.reactor)
        a, b = socket.socketpair()
        a.setblocking(False)
        t = open_transport(service, a, protocol)
        peer = Peer(loop.reactor, b)
        made.append((t, peer))
        return t, peer

    yield make
    for t, peer in made:
        t.close(Reason.SHUTDOWN)
        peer.close()


# --- echo, round trips, order -------------------------------------------------


def test_echo_round_trip(loop, conn, log):
    t, peer = conn(handlers.Echo())
    peer.start_reading()
    peer.send(b"hello, world\n")
    loop.run_until(lambda: len(peer.received) >= 13)
    assert bytes(peer.received) == b"hello, world\n"
    assert t.bytes_in == 13 and t.bytes_out == 13
    assert not t.closed


def test_echo_many_small_messages_in_order(loop, conn):
    _t, peer = conn(handlers.Echo())
    peer.start_reading()
    expected = b"".join(b"message %d\n" % i for i in range(2000))
    peer.send(expected)
    loop.run_until(lambda: len(peer.received) >= len(expected))
    assert bytes(peer.received) == expected


def test_partial_sends_keep_byte_order(loop, conn):
    t, peer = conn(Recorder())
    data = counting_pattern(4 * MiB)
    # Uneven pieces, all written while the peer is not reading yet: the
    # first send is partial and everything after it queues behind.
    sizes = [1, 3, 7, 65536 + 5, 100000, 1, 300000, 2]
    pos = 0
    for size in sizes:
        t.write(data[pos : pos + size])
        pos += size
    t.writelines([data[pos : pos + 11], b"", memoryview(data)[pos + 11 : pos + 500000]])
    pos += 500000
    t.write(bytearray(data[pos : pos + 1 * MiB]))
    pos += 1 * MiB
    t.write(data[pos:])
    assert t.buffered > 0  # the kernel did not take 4 MiB at once
    peer.start_reading()
    loop.run_until(lambda: len(peer.received) >= len(data))
    assert len(peer.received) == len(data)
    assert bytes(peer.received) == data
    assert t.bytes_out == len(data)
    assert t.buffered == 0


def test_writelines_chunks_arrive_in_order(loop, conn):
    t, peer = conn(Recorder())
    peer.start_reading()
    t.writelines([b"one,", b"", b"two,", memoryview(b"three,"), bytearray(b"four,")])
    t.write(b"five")
    loop.run_until(lambda: len(peer.received) >= 23)
    assert bytes(peer.received) == b"one,two,three,four,five"
    assert t.bytes_out == 23


def test_writelines_behind_a_queue_stays_in_order(loop, conn):
    t, peer = conn(Recorder())
    big = counting_pattern(2 * MiB)
    t.write(big)  # the peer is not reading: most of it queues
    assert t.buffered > 0
    tail = [b"<a>", b"<bb>", b"", b"<ccc>"] * 100
    t.writelines(tail)
    t.writelines(iter([b"<end>"]))  # any iterable
    expected = big + b"".join(tail) + b"<end>"
    peer.start_reading()
    loop.run_until(lambda: len(peer.received) >= len(expected))
    assert bytes(peer.received) == expected


def test_writelines_of_many_chunks_with_nothing_queued(loop, conn):
    t, peer = conn(Recorder())
    chunks = [b"%05d|" % i for i in range(500)]  # more than one sendmsg's worth
    t.writelines(chunks)
    peer.start_reading()
    expected = b"".join(chunks)
    loop.run_until(lambda: len(peer.received) >= len(expected))
    assert bytes(peer.received) == expected


# --- flow control -------------------------------------------------------------


def test_flow_control_pauses_above_high_and_resumes_below_low(loop, conn):
    high, low = 64 * KiB, 16 * KiB
    proto = RecordingEcho()
    t, peer = conn(proto, make_service(loop.reactor, high=high, low=low))
    most = [0]
    loop.reactor.add_before_sleep(lambda: most.__setitem__(0, max(most[0], t.buffered)))
    payload = counting_pattern(1 * MiB)
    peer.send(payload)  # the peer sends but does not read
    loop.run_until(lambda: t.write_paused, what="write_paused")
    assert t.buffered > high
    # While paused the transport reads nothing more: the peer's sends stall.
    loop.run_for(0.1)
    taken = t.bytes_in
    loop.run_for(0.1)
    assert t.bytes_in == taken
    assert t.write_paused
    assert peer.pending > 0, "the peer could send everything: nothing pushed back"
    assert t.bytes_in < len(payload)
    assert most[0] <= high + RECV_SIZE
    assert proto.resumed == []
    # The peer reads: the queue drains, reading resumes, the rest flows.
    peer.start_reading()
    loop.run_until(lambda: len(peer.received) >= len(payload), what="all echoed")
    assert bytes(peer.received) == payload
    assert proto.resumed, "resume_writing was never called"
    assert all(size <= low for size in proto.resumed)
    assert not t.write_paused
    assert most[0] <= high + RECV_SIZE
    assert t.bytes_in == t.bytes_out == len(payload)


def test_writelines_over_high_pauses_reading(loop, conn):
    proto = Recorder()
    t, peer = conn(proto, make_service(loop.reactor, high=32 * KiB, low=8 * KiB))
    t.writelines([b"x" * (400 * KiB), b"y" * (400 * KiB)])
    assert t.write_paused
    peer.send(b"not read while paused")
    loop.run_for(0.05)
    assert bytes(proto.data) == b""
    peer.start_reading()
    loop.run_until(lambda: len(peer.received) >= 800 * KiB and len(proto.data) >= 21)
    assert bytes(peer.received) == b"x" * (400 * KiB) + b"y" * (400 * KiB)
    assert bytes(proto.data) == b"not read while paused"
    assert proto.resumed and not t.write_paused


# --- half-close, reset, errors, closing ---------------------------------------


def test_peer_eof_flushes_pending_output_then_closes_with_eof(loop, conn, log):
    proto = RecordingEcho()
    service = make_service(loop.reactor, high=16 * MiB, low=4 * MiB)  # never pause: queue it all
    t, peer = conn(proto, service)
    payload = counting_pattern(1 * MiB)
    peer.send(payload, shutdown=True)  # send everything, then half-close; do not read
    loop.run_until(lambda: t.eof, what="transport saw EOF")
    assert not t.closed
    assert t.buffered > 0  # output still pending at EOF time
    assert proto.lost == []
    peer.start_reading()
    loop.run_until(lambda: peer.eof, what="peer saw EOF")
    assert bytes(peer.received) == payload
    assert t.closed and t.close_reason == "eof"
    assert proto.lost == ["eof"]
    assert t not in service.connections
    assert service.admission.current == 0
    assert service.bytes_in == service.bytes_out == len(payload)
    closes = log.named("conn.close")
    assert len(closes) == 1
    level, fields = closes[0]
    assert level == "info"
    assert fields["reason"] == "eof"
    assert fields["bytes_in"] == fields["bytes_out"] == len(payload)
    assert fields["service"] == "echo" and fields["peer"] == "unix" and fields["conn"] == t.conn_id


def test_eof_received_returning_true_keeps_the_connection(loop, conn):
    class KeepOpen(Recorder):
        def eof_received(self):
            self.transport.write(b"bye")
            return True

    proto = KeepOpen()
    t, peer = conn(proto)
    peer.start_reading()
    peer.shutdown()
    loop.run_until(lambda: t.eof and len(peer.received) >= 3)
    loop.run_for(0.02)
    assert not t.closed and t.eof
    assert bytes(peer.received) == b"bye"
    t.close()
    loop.run_until(lambda: peer.eof)
    assert proto.lost == ["done"]


def test_peer_reset_closes_with_reset_exactly_once(loop, log):
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname(), timeout=LIMIT)
    accepted, addr = server.accept()
    server.close()
    accepted.setblocking(False)
    service = make_service(loop.reactor, high=64 * MiB, low=1 * MiB)
    proto = Recorder(on_made=lambda tr: tr.write(counting_pattern(4 * MiB)))
    t = open_transport(service, accepted, proto, host=addr[0], port=addr[1])
    assert t.buffered > 0  # data pending towards the client
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # RST
    loop.run_until(lambda: t.closed, what="transport closed after RST")
    assert t.close_reason == "reset"
    loop.run_for(0.02)
    t.close(Reason.ERROR)
    assert proto.lost == ["reset"]
    assert service.admission.current == 0 and service.admission.per_source(addr[0]) == 0
    assert service.errors == 0
    assert [f["reason"] for _, f in log.named("conn.close")] == ["reset"]
    assert log.named("error") == []


def test_handler_exception_closes_only_that_connection(loop, conn, log):
    def boom(tr, data):
        raise RuntimeError("handler bug")

    service = make_service(loop.reactor, name="svc")
    bad = Recorder(on_data=boom)
    t_bad, p_bad = conn(bad, service)
    good = RecordingEcho()
    t_good, p_good = conn(good, service)
    p_bad.start_reading()
    p_bad.send(b"trigger")
    loop.run_until(lambda: p_bad.eof, what="bad connection closed")
    assert t_bad.closed and t_bad.close_reason == "error"
    assert bad.lost == ["error"]
    assert service.errors == 1
    errors = log.named("error")
    assert len(errors) == 1
    level, fields = errors[0]
    assert level == "error"
    assert fields["where"] == "svc.data_received"
    assert isinstance(fields["exc_info"], RuntimeError) and str(fields["exc_info"]) == "handler bug"
    assert fields["conn"] == t_bad.conn_id
    # The loop keeps serving the other connection.
    p_good.start_reading()
    p_good.send(b"still here")
    loop.run_until(lambda: len(p_good.received) >= 10)
    assert bytes(p_good.received) == b"still here"
    assert not t_good.closed
    assert t_bad not in service.connections and t_good in service.connections


def test_connection_made_raising_closes_with_error(loop, conn, log):
    def boom(tr):
        raise ValueError("made")

    proto = Recorder(on_made=boom)
    service = make_service(loop.reactor, name="x")
    t, _peer = conn(proto, service)
    assert t.closed and t.close_reason == "error"
    assert proto.lost == ["error"]
    assert service.errors == 1
    assert log.named("error")[0][1]["where"] == "x.connection_made"


def test_connection_lost_raising_is_logged_and_close_completes(loop, conn, log):
    class BadLost(Recorder):
        def connection_lost(self, reason):
            raise KeyError("lost")

    service = make_service(loop.reactor, name="y")
    t, peer = conn(BadLost(), service)
    peer.start_reading()
    t.write(b"abc")
    t.close()
    assert t.closed
    assert service.errors == 1
    assert log.named("error")[0][1]["where"] == "y.connection_lost"
    assert len(log.named("conn.close")) == 1
    loop.run_until(lambda: peer.eof)
    assert bytes(peer.received) == b"abc"


def test_close_twice_is_harmless(loop, conn, log):
    proto = Recorder()
    service = make_service(loop.reactor)
    t, peer = conn(proto, service)
    peer.start_reading()
    peer.send(b"12345")
    loop.run_until(lambda: len(proto.data) == 5)
    t.close()
    t.close(Reason.IDLE)
    t.close_when_flushed()
    t.write(b"ignored after close")
    t.writelines([b"also ignored"])
    assert proto.lost == ["done"]
    assert t.close_reason == "done"
    assert service.admission.current == 0
    assert service.bytes_in == 5
    assert len(log.named("conn.close")) == 1
    loop.run_until(lambda: peer.eof)
    assert bytes(peer.received) == b""


def test_close_when_flushed_sends_everything_first(loop, conn):
    proto = Recorder()
    t, peer = conn(proto)
    data = counting_pattern(2 * MiB)
    t.write(data)
    t.close_when_flushed(Reason.IDLE)
    assert not t.closed
    t.write(b"too late")  # refused once closing
    peer.start_reading()
    loop.run_until(lambda: peer.eof)
    assert bytes(peer.received) == data
    assert proto.lost == ["idle"]


# --- the stream handlers ------------------------------------------------------

DAYTIME_RE = re.compile(
    rb"\A(Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday), "
    rb"(January|February|March|April|May|June|July|August|September|October|November|December) "
    rb"(0[1-9]|[12][0-9]|3[01]), [0-9]{4} ([01][0-9]|2[0-3]):[0-5][0-9]:[0-6][0-9]-[A-Za-z0-9+\-]+\r\n\Z"
)


def test_daytime_sends_one_line_then_closes(loop, conn):
    t, peer = conn(handlers.Daytime())
    peer.start_reading()
    loop.run_until(lambda: peer.eof)
    assert DAYTIME_RE.match(bytes(peer.received)), bytes(peer.received)
    year = datetime.now().year
    assert str(year).encode() in peer.received or str(year - 1).encode() in peer.received
    assert t.closed and t.close_reason == "done"


def test_time_sends_four_bytes_then_closes(loop, conn):
    before = datetime.now(UTC)
    t, peer = conn(handlers.Time())
    peer.start_reading()
    loop.run_until(lambda: peer.eof)
    after = datetime.now(UTC)
    assert len(peer.received) == 4
    got = struct.unpack(">I", peer.received)[0]
    epoch = datetime(1900, 1, 1, tzinfo=UTC)
    low = int((before - epoch).total_seconds()) % 2**32
    high = int((after - epoch).total_seconds()) % 2**32
    assert (got - low) % 2**32 <= (high - low) % 2**32
    assert t.close_reason == "done"


def test_discard_reads_and_drops(loop, conn):
    service = make_service(loop.reactor, name="discard")
    t, peer = conn(handlers.Discard(), service)
    peer.start_reading()
    peer.send(b"z" * (3 * MiB), shutdown=True)
    loop.run_until(lambda: peer.eof)
    assert peer.received == b""
    assert t.close_reason == "eof"
    assert service.bytes_in == 3 * MiB and service.bytes_out == 0


def test_chargen_produces_the_pattern_bounded_by_write_high(loop, conn):
    high, low = 128 * KiB, 32 * KiB
    service = make_service(loop.reactor, name="chargen", high=high, low=low)
    t, peer = conn(handlers.Chargen(), service)
    block = len(chargen_cycle()) * (65536 // len(chargen_cycle()))
    loop.run_until(lambda: t.write_paused, what="chargen paused")
    loop.run_for(0.05)
    queued = t.buffered
    iterations = loop.iterations
    loop.run_for(0.1)
    # The peer does not read: nothing more is produced and the loop idles.
    assert t.buffered == queued
    assert queued <= high + block
    assert loop.iterations - iterations < 20
    # The peer reads: the RFC 864 pattern flows, whole cycles end to end.
    peer.start_reading()
    want = 3 * MiB
    loop.run_until(lambda: len(peer.received) >= want, what="3 MiB of chargen")
    cycle = chargen_cycle()
    got = bytes(peer.received[:want])
    assert got == (cycle * (want // len(cycle) + 1))[:want]
    assert t.buffered <= high + block


def test_chargen_closes_when_peer_goes(loop, conn):
    proto = handlers.Chargen()
    t, peer = conn(proto, make_service(loop.reactor, name="chargen", high=64 * KiB, low=16 * KiB))
    peer.start_reading()
    loop.run_until(lambda: len(peer.received) > 256 * KiB)
    peer.close()
    loop.run_until(lambda: t.closed, what="chargen closed")
    assert t.close_reason in ("reset", "eof")


def test_chargen_does_not_spin_while_closing(loop, conn):
    # Regression: Chargen used to re-arm call_later(0) forever while closing.
    # write_high far above what one refill writes: chargen never pauses.
    t, peer = conn(
        handlers.Chargen(), make_service(loop.reactor, name="chargen", high=64 * MiB, low=16 * MiB)
    )
    peer.shutdown()  # the client half-closes and never reads
    loop.run_until(lambda: t.eof, what="EOF seen")
    assert not t.closed and t.buffered > 0  # closing, waiting to flush
    start = loop.iterations
    loop.run_for(0.2)
    assert loop.iterations - start < 50, f"{loop.iterations - start} loop iterations while idle"


class FakeTransport:
    """Enough of a transport for the sans-IO side of Timefmt."""

    def __init__(self):
        self.written = []
        self.closed_with = None
        self.requests = 0

    def write(self, data):
        self.written.append(bytes(data))

    def close(self, reason="done"):
        self.closed_with = reason


def test_timefmt_lines_fed_one_byte_at_a_time():
    h = handlers.Timefmt()
    ft = FakeTransport()
    h.connection_made(ft)
    stream = b"hello\n%%\r\n\xff\nno newline yet"
    for i in range(len(stream)):
        h.data_received(stream[i : i + 1])
    assert b"".join(ft.written) == b"hello\r\n%\r\n\r\n"
    assert ft.requests == 3
    assert ft.closed_with is None
    h.data_received(b"\n")
    assert b"".join(ft.written).endswith(b"no newline yet\r\n")


def test_timefmt_all_at_once_and_trailing_partial_line():
    h = handlers.Timefmt()
    ft = FakeTransport()
    h.connection_made(ft)
    h.data_received(b"a\nb\r\nc\n" + b"%Y" * 200 + b"\npartial")
    assert ft.written == [b"a\r\nb\r\nc\r\n\r\n"]  # one write per batch; too long -> empty
    assert ft.requests == 4


def test_timefmt_line_length_limit_is_1024_inclusive():
    h = handlers.Timefmt()
    ft = FakeTransport()
    h.connection_made(ft)
    h.data_received(b"x" * 1024)
    assert ft.closed_with is None
    h.data_received(b"x")
    assert ft.closed_with == "line_too_long"


def test_timefmt_over_a_socket(loop, conn):
    service = make_service(loop.reactor, name="timefmt")
    t, peer = conn(handlers.Timefmt(), service)
    peer.start_reading()
    before = datetime.now().year
    peer.send(b"hello\n%Y\r\n")
    loop.run_until(lambda: peer.received.count(b"\r\n") >= 2)
    after = datetime.now().year
    assert bytes(peer.received) in {b"hello\r\n%d\r\n" % y for y in (before, after)}
    peer.send(b"x" * 2000)  # an overlong line closes the connection
    loop.run_until(lambda: peer.eof)
    assert t.close_reason == "line_too_long"
    assert service.requests == 2


def test_accepted_tcp_connections_send_without_nagle_delay(loop, log, monkeypatch):
    """TCP_NODELAY on every accepted connection (set once on the listener
    where the kernel passes it on, as Linux does)."""
    from evd.config.addresses import Address
    from evd.net import listeners

    monkeypatch.setattr(listeners, "log", log)
    address = Address("tcp", "127.0.0.1", 0)
    service = make_service(loop.reactor)
    service.connections_total = 0
    listener = listeners.StreamListener(
        loop.reactor, listeners.bind(address), service, address, handlers.Echo
    )
    listener.open()
    client = socket.create_connection(listener.sock.getsockname(), timeout=LIMIT)
    try:
        loop.run_until(lambda: service.connections, what="the connection accepted")
        (t,) = service.connections
        assert t.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        client.close()
        listener.close()


def test_a_connection_the_poller_refuses_is_closed_and_released(loop, log, monkeypatch):
    """epoll_ctl can fail (ENOSPC past max_user_watches): that connection
    closes with the error named, and its admission slot comes back."""
    import errno

    service = make_service(loop.reactor)
    a, b = socket.socketpair()
    a.setblocking(False)
    real = loop.reactor.add_reader

    def add_reader(fd, callback):
        if fd == a.fileno():
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, callback)

    monkeypatch.setattr(loop.reactor, "add_reader", add_reader)
    t = open_transport(service, a, handlers.Echo())
    assert t.closed and t.close_reason == "error"
    assert not service.connections and service.admission.current == 0
    (close,) = log.named("conn.close")
    assert close[1]["error"] == "epoll_ctl: [Errno 28] No space left on device"
    b.close()
