"""The log sink's batches (evd/core/log.py): what reaches the file, and in which
writes.  No daemon here: a recording file stands in for stderr."""

from __future__ import annotations

import json

from evd.core.log import ATOMIC_WRITE, LogSink


class Recording:
    """A file that remembers each write."""

    def __init__(self):
        self.writes: list[str] = []

    def write(self, text: str) -> None:
        self.writes.append(text)

    def flush(self) -> None:
        pass


def sink_with(lines: list[str]) -> Recording:
    sink = LogSink()
    sink._file = out = Recording()
    sink.batching = True
    for line in lines:
        sink.write(line)
    assert out.writes == []  # batching: nothing written before the flush
    sink.flush()
    return out


def test_a_batch_is_one_write_when_it_fits():
    lines = [json.dumps({"event": "conn.open", "conn": i}) for i in range(20)]
    out = sink_with(lines)
    assert out.writes == ["\n".join(lines) + "\n"]


def test_a_large_batch_goes_out_in_whole_lines_of_at_most_pipe_buf_bytes():
    # Workers share one stderr pipe: only writes up to PIPE_BUF stay whole.
    lines = [json.dumps({"event": "conn.close", "conn": i, "peer": "é" * (i % 50)}) for i in range(500)]
    out = sink_with(lines)
    assert len(out.writes) > 1
    assert "".join(out.writes) == "\n".join(lines) + "\n"  # nothing lost, order kept
    for text in out.writes:
        assert text.endswith("\n") and len(text.encode()) <= ATOMIC_WRITE
    # Each write is as full as whole lines allow.
    for text, following in zip(out.writes, out.writes[1:], strict=False):
        first_next = following.split("\n", 1)[0] + "\n"
        assert len(text.encode()) + len(first_next.encode()) > ATOMIC_WRITE


def test_a_line_longer_than_pipe_buf_goes_alone():
    long = json.dumps({"event": "error", "exception": "x" * (2 * ATOMIC_WRITE)})
    out = sink_with(["a", long, "b"])
    assert out.writes == ["a\n", long + "\n", "b\n"]
