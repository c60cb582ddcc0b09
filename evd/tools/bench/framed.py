"""framed mode: C framed connections, `depth` echo requests in flight on each.

The usual answer is compared with the bytes evd sends for it; anything else
is decoded and checked field by field, so a server that formats its header
differently is still measured, and a wrong answer is still caught.
"""

from __future__ import annotations

import socket
import time

from evd.proto.framing import Decoder, FrameError, encode
from evd.tools.bench.loop import RECV, Stream, StreamMode
from evd.tools.bench.measure import VARIANTS
from evd.tools.bench.options import MAX_SIZE, BenchError, Options
from evd.tools.bench.target import Target


class FramedMode(StreamMode):
    """Framed echo, `depth` requests in flight per connection."""

    def __init__(self, opts: Options, target: Target, first: int, count: int):
        super().__init__(opts, target, first, count)
        self.requests = [encode({"svc": "echo", "id": i}, p) for i, p in enumerate(self.payloads)]
        # What evd sends today; anything else is decoded and checked properly.
        self.expected = [encode({"id": i, "ok": True}, p) for i, p in enumerate(self.payloads)]

    def greet(self, sock: socket.socket) -> None:
        decoder = Decoder(1 << 20, 1 << 20)
        while (frame := decoder.next_frame()) is None:
            chunk = sock.recv(RECV)  # the socket's timeout bounds it
            if not chunk:
                raise ConnectionError("closed before its hello")
            decoder.feed(chunk)
        if "echo" not in frame.header.get("services", []) or decoder.buffered:
            raise BenchError(f"not a framed echo port: hello {frame.header}")

    def begin(self, s: Stream, now: int) -> None:
        self._ask(s, self.opts.depth, now)

    def _ask(self, s: Stream, count: int, now: int) -> None:
        batch = []
        for _ in range(count):
            s.pending.append((s.idx, now))
            batch.append(self.requests[s.idx])
            s.idx = (s.idx + 1) % VARIANTS
        s.sent_at = s.pending[0][1]
        self.send(s, b"".join(batch))

    def received(self, s: Stream, data: bytes) -> None:
        s.buf += data
        done = time.monotonic_ns()
        answered = self._responses(s, done)
        if answered > 0:
            self._ask(s, answered, done)

    def _responses(self, s: Stream, done: int) -> int:
        """Consume every whole response in s.buf; their number, or -1 (dropped)."""
        buf, pos, answered = s.buf, 0, 0
        counting, lat = self.window.open, self.stats.latencies
        while pos < len(buf):
            if not s.pending:
                self.drop(s, "unasked")
                return -1
            idx, sent_at = s.pending[0]
            want = self.expected[idx]
            if buf.startswith(want, pos):
                pos += len(want)
            else:
                used = self._check_frame(buf, pos, idx)
                if used == 0:
                    break
                if used < 0:
                    self.drop(s, "mismatch")
                    return -1
                pos += used
            s.pending.popleft()
            answered += 1
            if counting:
                self.stats.requests += 1
                lat.append(done - sent_at)
        del buf[:pos]
        return answered

    def _check_frame(self, buf: bytearray, pos: int, idx: int) -> int:
        """The slow path: bytes used by one whole, correct echo response at
        `pos`; 0 if it has not all arrived; -1 if it is wrong."""
        if len(buf) - pos < 4:
            return 0
        h = int.from_bytes(buf[pos : pos + 4], "big")
        decoder = Decoder(max(2, min(h, 1 << 20)), MAX_SIZE)
        decoder.feed(bytes(buf[pos:]))
        try:
            frame = decoder.next_frame()
        except FrameError:
            return -1
        if frame is None:
            return 0
        header = frame.header
        if header.get("ok") is not True or header.get("id") != idx or frame.body != self.payloads[idx]:
            return -1
        return 4 + h + len(frame.body)
