"""Answers that grow with the number of connections, made a slice at a time.

`conns` over 18,000 idle connections is 2.6 MB of JSON; built and encoded
in one callback it held the loop for over a second, and every other client
waited that long (issue 23 item 11).  HAProxy's `show sess` has the same
problem and the same cure: the answer is produced in steps, and the loop
serves everything else between two steps.

So a verb whose answer lists connections or clients does not build it: it
returns `Answer.rows(key, rows)`, the rows as a lazy iterator (nothing is
computed yet), and the driver `pace`s it: rows are taken BATCH at a time
and handed on (encoded to JSON for a client, sent as a part frame to a
supervisor), until SLICE seconds have gone; then a zero-delay timer resumes
the work on the next turn of the loop, after the I/O that came meanwhile.
No step holds the loop longer than about SLICE plus one batch, whatever the
count.  The steps that are not sliced: each process's sort of its
connections by id (about 2 ms at the descriptor limit, ~19,000, keyed in
C), the admission table's list of client IPs for `sources`, and joining
the encoded batches into one body (a copy of the bytes).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import Any

from evd.loop.reactor import Reactor

# Work per turn of the loop: well under the ~10 ms an echo client should
# ever wait for it, and long enough that a 2.6 MB answer takes a few hundred
# turns, not tens of thousands.
SLICE = 0.004
# Rows encoded at once between two looks at the clock: about a tenth of a
# millisecond of work, so the clock is read rarely and a slice overruns by
# little.
BATCH = 64

Row = dict[str, Any]


def pace(
    reactor: Reactor,
    rows: Iterable[Row],
    each: Callable[[list[Row]], None],
    done: Callable[[], None],
    budget: float | None = None,
    batch: int | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Take `rows` `batch` (BATCH) at a time and give each batch to `each`,
    for up to `budget` (SLICE) seconds per turn of the loop; then `done()`.
    The first slice runs now."""
    source = iter(rows)
    budget = SLICE if budget is None else budget
    size = BATCH if batch is None else batch

    def turn() -> float | None:
        deadline = clock() + budget
        while True:
            chunk = [row for _, row in zip(range(size), source, strict=False)]
            if chunk:
                each(chunk)
            if len(chunk) < size:
                done()
                return None
            if clock() >= deadline:
                return 0.0  # again on the next turn, after the I/O that waits

    if turn() is not None:
        reactor.call_later(0.0, turn)


def encode(key: str, chunks: list[bytes]) -> bytes:
    """The body `{"KEY": [ROW, ...]}` from rows encoded a batch at a time
    (`encode_batch`): the same JSON `json.dumps` writes for the whole."""
    return b'{"' + key.encode() + b'": [' + b", ".join(chunks) + b"]}"


def encode_batch(rows: list[Row]) -> bytes:
    """One batch's rows, comma-separated, without the brackets."""
    return json.dumps(rows)[1:-1].encode()
