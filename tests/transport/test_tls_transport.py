"""TLSTransport (evd/net/tls.py) on real sockets and a real Reactor.

The client is Python's own TLS (an SSLObject between two memory BIOs), so
the test decides exactly which ciphertext bytes reach the server and when:
one byte at a time, several records at once, a record cut short, garbage.
A UNIX socketpair delivers what one end sends to the other at once, so
calling the server's reader right after a send is a deterministic step.
"""

from __future__ import annotations

import socket
import ssl

import pytest
from support.pki import Pki
from support.transport import LogRecorder, Peer, Recorder, chargen_cycle, counting_pattern, make_service

import evd.handlers.service as service_mod
import evd.net.tls_records as tls_records
import evd.net.transport as transport_mod
from evd.handlers import raw as handlers
from evd.loop.seams import Reason
from evd.net.tls import TLSTransport
from evd.net.tls_service import ServerTLS
from evd.system.certificates import server_context

KiB = 1024
MiB = 1024 * KiB


class TLSClient:
    """The client end: TLS in memory, bytes over `sock`, driven by the loop
    (or stepped by hand: `pump`)."""

    def __init__(self, reactor, sock, context, cn_check=True):
        self.reactor = reactor
        self.sock = sock
        self.fd = sock.fileno()
        sock.setblocking(False)
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_hostname="127.0.0.1")
        self.done = False  # handshake
        self.received = bytearray()
        self.clean_close = False  # the server's close_notify came
        self.eof = False  # the socket's EOF
        self.error: Exception | None = None
        self.reading = False

    def handshake_step(self):
        try:
            self.obj.do_handshake()
            self.done = True
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as exc:
            self.error = exc

    def ciphertext(self) -> bytes:
        return self.outgoing.read()

    def start_reading(self):
        self.reading = True
        self.reactor.add_reader(self.fd, self.pump)

    def stop_reading(self):
        self.reading = False
        self.reactor.remove_reader(self.fd)

    def pump(self):
        """Read what the server sent, advance the handshake, decrypt."""
        try:
            data = self.sock.recv(256 * KiB)
        except BlockingIOError:
            return
        except OSError as exc:
            self.error = exc
            return
        if not data:
            self.eof = True
            if self.reading:
                self.stop_reading()
            return
        self.incoming.write(data)
        if not self.done:
            self.handshake_step()
            if not self.done:
                self.sock.sendall(self.ciphertext())
                return
            self.sock.sendall(self.ciphertext())
        while True:
            try:
                chunk = self.obj.read(256 * KiB)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLZeroReturnError:
                self.clean_close = True
                return
            except ssl.SSLError as exc:
                self.error = exc
                return
            if not chunk:
                self.clean_close = True
                return
            self.received += chunk

    def send(self, data: bytes):
        self.obj.write(data)
        self.sock.sendall(self.ciphertext())


@pytest.fixture
def log(monkeypatch):
    return LogRecorder.record(monkeypatch, transport_mod, service_mod)


@pytest.fixture
def pki(tmp_path):
    return Pki(tmp_path)


@pytest.fixture(params=["c-level", "public"])
def records(request, monkeypatch):
    """Run a test on the C-level record object (records_of's private
    `_sslobj`) and on its public fallback, the SSLObject itself."""
    if request.param == "public":
        monkeypatch.setattr(tls_records, "records_of", lambda obj: obj)
    return request.param


@pytest.fixture
def tls_conn(loop, log, pki):
    """tls_conn(handler, client_ca=False, client_cert=None, service=None)
    -> (server transport, TLSClient, ServerTLS), the handshake not begun."""
    made = []
    cert, key = pki.server()

    def make(handler, client_ca=False, client_cert=None, service=None, sndbuf=None):
        service = service or make_service(loop.reactor)
        context = server_context(str(cert), str(key), str(pki.cafile) if client_ca else "")
        tls = ServerTLS(service, context, loop.reactor)
        a, b = socket.socketpair()
        if sndbuf:
            a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        a.setblocking(False)
        assert service.admit(None, 0, loop.reactor.now) is None
        t = tls.transport(loop.reactor, a, handler, service, None, 0)
        t.start(service.opened(t))
        client = TLSClient(loop.reactor, b, pki.client_context(client_cert))
        made.append((t, client))
        return t, client, tls

    yield make
    for t, client in made:
        t.close(Reason.SHUTDOWN)
        client.sock.close()


def handshake(loop, t: TLSTransport, client: TLSClient):
    """Run the handshake over the loop until both ends are done."""
    client.start_reading()
    client.handshake_step()
    client.sock.sendall(client.ciphertext())
    loop.run_until(lambda: (client.done and t.announced) or t.closed or client.error, what="handshake")


# --- the handshake ---------------------------------------------------------------


def test_handler_hears_of_the_connection_only_after_the_handshake(loop, tls_conn, log):
    made = []
    handler = Recorder(on_made=lambda transport: made.append(transport.client_cn))
    t, client, tls = tls_conn(handler)
    client.handshake_step()
    hello = client.ciphertext()
    for i in range(len(hello)):  # the client's hello one byte per recv
        client.sock.send(hello[i : i + 1])
        t._reader()
        assert not made
    assert tls.handshaking == {t}
    assert not log.named("conn.open")
    handshake(loop, t, client)
    assert made == [None] and not t.closed
    assert tls.handshaking == set()
    ((_, opened),) = log.named("conn.open")
    assert opened["proto"] == "tls" and opened["conn"] == t.conn_id
    assert "client_cn" not in opened


def test_records_of_reaches_the_c_level_object(loop, tls_conn):
    t, _client, _ = tls_conn(handlers.Echo())
    assert t.records.records is t.records.obj._sslobj  # what SSLObject.read and .write call


def test_echo_with_every_ciphertext_byte_arriving_alone(loop, tls_conn, records):
    t, client, _ = tls_conn(handlers.Echo())
    assert (t.records.records is t.records.obj) == (records == "public")
    handshake(loop, t, client)
    client.obj.write(b"first record ")
    client.obj.write(b"second record")
    wire = client.ciphertext()
    for i in range(len(wire)):
        client.sock.send(wire[i : i + 1])
        t._reader()
    loop.run_until(lambda: len(client.received) >= 26)
    assert bytes(client.received) == b"first record second record"
    assert t.bytes_in == 26 and t.bytes_out == 26


def test_records_arriving_together_are_all_delivered(loop, tls_conn):
    handler = Recorder()
    t, client, _ = tls_conn(handler)
    handshake(loop, t, client)
    for i in range(5):
        client.obj.write(b"record %d;" % i)
    wire = client.ciphertext()
    client.sock.send(wire[:-3])  # four whole records and most of the fifth
    t._reader()
    assert bytes(handler.data) == b"record 0;record 1;record 2;record 3;"
    client.sock.send(wire[-3:])
    t._reader()
    assert bytes(handler.data) == b"record 0;record 1;record 2;record 3;record 4;"


@pytest.mark.parametrize("echo", [False, True])
def test_a_request_that_came_with_the_clients_finished_is_delivered(loop, tls_conn, echo):
    handler = handlers.Echo() if echo else Recorder()
    t, client, _ = tls_conn(handler)
    client.start_reading()
    client.handshake_step()
    client.sock.sendall(client.ciphertext())
    loop.run_until(lambda: client.done, what="client side of the handshake")
    # The server has not read the client's Finished yet (TLS 1.3): send the
    # first request behind it, in the same recv.
    assert not t.announced
    client.obj.write(b"early")
    client.sock.sendall(client.ciphertext())
    t._reader()  # the client's Finished and the request, in one recv
    assert t.announced
    if echo:
        loop.run_until(lambda: bytes(client.received) == b"early", what="the echo")
    else:
        assert bytes(handler.data) == b"early"


def test_mutual_tls_gives_the_client_cn(loop, tls_conn, pki, log):
    made = []
    cert = pki.client("ops")
    t, client, _ = tls_conn(Recorder(on_made=lambda tr: made.append(tr.client_cn)), True, cert)
    handshake(loop, t, client)
    assert made == ["ops"] and t.client_cn == "ops"
    ((_, opened),) = log.named("conn.open")
    assert opened["client_cn"] == "ops"


def test_mutual_tls_without_a_certificate_is_tls_fail(loop, tls_conn, log):
    handler = Recorder()
    t, client, tls = tls_conn(handler, client_ca=True)
    handshake(loop, t, client)
    loop.run_until(lambda: t.closed, what="the refusal")
    assert not hasattr(handler, "transport")  # never told
    ((level, fail),) = log.named("tls.fail")
    assert level == "warning" and fail["reason"] == "peer_did_not_return_a_certificate"
    assert fail["service"] == "echo" and fail["count"] == 1
    assert not log.named("conn.open") and not log.named("conn.close")
    assert tls.failures == {"peer_did_not_return_a_certificate": 1}
    assert not t.service.connections


@pytest.mark.parametrize(
    ("garbage", "reason"),
    [(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "http_request"), (bytes(range(256)) * 4, None)],
)
def test_garbage_instead_of_a_hello_is_tls_fail(loop, tls_conn, log, garbage, reason):
    t, client, tls = tls_conn(Recorder())
    client.sock.sendall(garbage)
    t._reader()
    assert t.closed
    ((_, fail),) = log.named("tls.fail")
    assert fail["reason"] == (reason or fail["reason"]) and fail["reason"]
    assert not log.named("conn.close")
    assert tls.handshaking == set() and not t.service.connections


def test_a_client_that_leaves_during_the_handshake_is_tls_fail_eof(loop, tls_conn, log):
    t, client, _ = tls_conn(Recorder())
    client.sock.shutdown(socket.SHUT_WR)
    t._reader()
    assert t.closed
    assert [f["reason"] for _, f in log.named("tls.fail")] == ["eof"]


def test_handshake_timeout_by_the_sweep(loop, tls_conn, log):
    service = make_service(loop.reactor)
    t, _client, tls = tls_conn(Recorder(), service=service)
    limit = service.config.limits.handshake_timeout
    tls.sweep(t.opened + limit / 2)
    assert not t.closed
    tls.sweep(t.opened + limit + 0.01)
    assert t.closed
    assert [f["reason"] for _, f in log.named("tls.fail")] == ["handshake_timeout"]
    assert not service.connections
    # The admission slot went back: the client's count is zero again.
    assert service.admission.connect(None, loop.reactor.now) is None


def test_a_finished_handshake_is_not_swept(loop, tls_conn, log):
    t, client, tls = tls_conn(handlers.Echo())
    handshake(loop, t, client)
    tls.sweep(t.opened + 3600)
    assert not t.closed and not log.named("tls.fail")


def test_draining_ends_a_handshake_quietly(loop, tls_conn, log):
    t, _client, _ = tls_conn(Recorder())
    t.protocol.drain()
    assert t.closed
    assert not log.named("tls.fail") and not log.named("conn.close")


def test_tls_fail_is_throttled_like_conn_reject(loop, tls_conn, log):
    made = [tls_conn(Recorder()) for _ in range(5)]
    tls = made[0][2]
    for t, client, _ in made:
        # All five on one ServerTLS, as on one listener.
        t.tls = tls
        tls.handshaking.add(t)
        client.sock.shutdown(socket.SHUT_WR)
        t._reader()
    assert len(log.named("tls.fail")) == 1  # the first at once, the rest summed
    loop.run_until(lambda: len(log.named("tls.fail")) == 2, limit=3, what="the summary line")
    assert log.named("tls.fail")[1][1]["count"] == 4


# --- data, backpressure, closing ----------------------------------------------------


def test_a_client_that_never_reads_is_held_at_write_high(loop, tls_conn):
    service = make_service(loop.reactor, "chargen", high=64 * KiB, low=16 * KiB)
    t, client, _ = tls_conn(handlers.Chargen(), service=service, sndbuf=16 * KiB)
    handshake(loop, t, client)
    client.stop_reading()
    loop.run_until(lambda: t.write_paused, what="write_high")
    loop.run_for(0.2)
    # Held: the queue stops within a chargen block of write_high, the
    # ciphertext waiting is that of queued plaintext (records add a few
    # bytes each), and the handler is not asked for more.
    block = len(chargen_cycle()) * (65536 // len(chargen_cycle()))
    assert t.buffered <= 64 * KiB + block
    assert len(t.records.cipher) <= t.buffered * 1.01 + 1024
    sent_before = t.bytes_out
    loop.run_for(0.1)
    assert t.bytes_out == sent_before
    client.start_reading()
    loop.run_until(lambda: len(client.received) > 1 * MiB, what="chargen resumed")
    cycle = chargen_cycle()
    data = bytes(client.received)
    assert data == (cycle * (len(data) // len(cycle) + 1))[: len(data)]


def test_echo_to_a_client_that_reads_late_loses_and_repeats_nothing(loop, tls_conn, records):
    """The echo path's own send meets a full kernel: from there its answers
    queue, and every byte still comes back once, in order."""
    t, client, _ = tls_conn(handlers.Echo(), sndbuf=8 * KiB)
    handshake(loop, t, client)
    client.stop_reading()
    data = counting_pattern(600 * KiB)
    for i in range(0, len(data), 1000):  # many records, as a client writes
        client.obj.write(data[i : i + 1000])
    wire = client.ciphertext()
    pos = 0
    while not t.write_paused:  # feed until the server stops reading
        sent = client.sock.send(wire[pos : pos + 32 * KiB])
        pos += sent
        t._reader()
    assert t.records.cipher and t.buffered > 0
    client.start_reading()
    Peer(loop.reactor, client.sock).send(wire[pos:])  # the rest, as the server takes it
    loop.run_until(lambda: len(client.received) >= len(data), what="every byte back")
    assert bytes(client.received) == data
    assert t.bytes_in == t.bytes_out == len(data)


def test_ciphertext_the_kernel_takes_in_part_is_sent_once(loop, tls_conn, records):
    """Writes far beyond the socket buffer: every partial send leaves
    ciphertext behind, and each byte must still arrive exactly once."""
    t, client, _ = tls_conn(Recorder(), sndbuf=8 * KiB)
    handshake(loop, t, client)
    data = counting_pattern(3 * MiB)
    pos = 0
    for size in (1, 70000, 3, 500000, 17, 1 * MiB):
        t.write(data[pos : pos + size])
        pos += size
    t.writelines([data[pos : pos + 5], memoryview(data)[pos + 5 :]])
    assert t.buffered > 0 and t.records.cipher
    loop.run_until(lambda: len(client.received) >= len(data), what="all of it")
    assert bytes(client.received) == data
    assert t.bytes_out == len(data) and t.buffered == 0 and not t.records.cipher


def test_close_when_flushed_waits_for_the_ciphertext(loop, tls_conn):
    t, client, _ = tls_conn(Recorder(), sndbuf=8 * KiB)
    handshake(loop, t, client)
    client.stop_reading()
    data = counting_pattern(1 * MiB)
    t.write(data)
    t.close_when_flushed(Reason.DONE)
    assert not t.closed
    client.start_reading()
    loop.run_until(lambda: client.clean_close or client.eof, what="the end")
    assert bytes(client.received) == data and client.clean_close


def test_close_sends_close_notify(loop, tls_conn, log):
    t, client, _ = tls_conn(handlers.Daytime())
    handshake(loop, t, client)
    loop.run_until(lambda: client.clean_close or client.eof, what="the close")
    assert client.clean_close  # not a ragged EOF
    assert client.received.endswith(b"\r\n")
    assert [f["reason"] for _, f in log.named("conn.close")] == ["done"]


def test_the_clients_close_notify_is_its_eof(loop, tls_conn, log):
    t, client, _ = tls_conn(handlers.Echo())
    handshake(loop, t, client)
    client.obj.write(b"bye")
    try:
        client.obj.unwrap()
    except ssl.SSLWantReadError:
        pass
    client.sock.sendall(client.ciphertext())
    loop.run_until(lambda: t.closed, what="the close")
    loop.run_until(lambda: client.clean_close, what="the server's close_notify")
    assert bytes(client.received) == b"bye"
    assert [f["reason"] for _, f in log.named("conn.close")] == ["eof"]


def test_eof_without_close_notify_is_eof(loop, tls_conn, log):
    t, client, _ = tls_conn(handlers.Echo())
    handshake(loop, t, client)
    client.sock.shutdown(socket.SHUT_WR)
    loop.run_until(lambda: t.closed)
    assert [f["reason"] for _, f in log.named("conn.close")] == ["eof"]


def test_a_peer_that_vanishes_mid_record_is_a_reset(loop, tls_conn, log):
    t, client, _ = tls_conn(Recorder())
    handshake(loop, t, client)
    client.obj.write(b"x" * 1000)
    wire = client.ciphertext()
    client.sock.sendall(wire[:100])
    client.sock.shutdown(socket.SHUT_WR)
    loop.run_until(lambda: t.closed)
    assert [f["reason"] for _, f in log.named("conn.close")] == ["reset"]


def test_a_tampered_record_closes_with_a_tls_error(loop, tls_conn, log):
    handler = Recorder()
    t, client, _ = tls_conn(handler)
    handshake(loop, t, client)
    client.obj.write(b"secret")
    wire = bytearray(client.ciphertext())
    wire[-1] ^= 1  # the record's authentication tag
    client.sock.sendall(bytes(wire))
    loop.run_until(lambda: t.closed)
    ((_, closed),) = log.named("conn.close")
    assert closed["reason"] == "error" and closed["error"].startswith("tls: ")
    assert not handler.data


def test_a_record_then_a_tampered_one_in_one_recv(loop, tls_conn, log):
    """The stream answers the good record first; its failure, met in the
    same recv, closes the connection on the loop's next turn although the
    socket has nothing more to read."""
    handler = Recorder()
    t, client, _ = tls_conn(handler)
    handshake(loop, t, client)
    client.obj.write(b"good")
    good = client.ciphertext()
    client.obj.write(b"bad")
    bad = bytearray(client.ciphertext())
    bad[-1] ^= 1
    client.sock.sendall(good + bytes(bad))
    t._reader()
    assert bytes(handler.data) == b"good" and not t.closed
    loop.run_until(lambda: t.closed, what="the close")
    ((_, closed),) = log.named("conn.close")
    assert closed["reason"] == "error" and closed["error"].startswith("tls: ")
