"""The control protocol (SPEC section 9), sans-IO: requests, answers, and
the answers of several workers made into one.

On the wire both directions use the frame codec (proto/framing.py).  A
request is one frame with the header `{"cmd": NAME, "args": [TEXT...]}`
and no body.  The answer is one frame: header `{"ok": BOOL, "len": N}`
plus, when not ok, `"error": {"code", "message"}`; the body is the answer
object as JSON (a `conns` answer over 10,000 connections is far larger than
a header should be).  A failed `reload` is not ok and still has its body,
the reload's five fields.

Error codes, and the client's exit status for each (SPEC section 2):
`refused` (2: an unknown connection or service, a bad value),
`bad_request` and `unknown_command` (2), `failed` (1: a reload that failed,
workers that did not answer).

The same requests go from the supervisor to its workers (server/control/fanout.py),
who answer their share; `merge_*` below turn the shares into the answer a
single process would give, with figures summed.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

Body = dict[str, Any]

# Requests are a verb and a few words; this bounds what a client can make
# the daemon buffer and parse.  (Answers are bounded by what they describe.)
MAX_REQUEST_HEADER = 4096
ARG_MAX = 256

REFUSED = "refused"
FAILED = "failed"
BAD_REQUEST = "bad_request"
UNKNOWN_COMMAND = "unknown_command"
EXIT_STATUS = {REFUSED: 2, BAD_REQUEST: 2, UNKNOWN_COMMAND: 2, FAILED: 1}


@dataclass(frozen=True, slots=True)
class Request:
    command: str
    args: tuple[str, ...] = ()

    def header(self) -> Body:
        return {"cmd": self.command, "args": list(self.args)}


@dataclass(frozen=True, slots=True)
class Answer:
    ok: bool
    body: Body | None = None
    code: str | None = None  # when not ok
    message: str | None = None
    # An answer that lists connections or clients: `{KEY: [row, ...]}` with
    # the rows not made yet -- the driver makes and sends them a slice at a
    # time (server/control/slices.py).  `body` is None then.
    rows: tuple[str, Iterator[Body]] | None = None

    @classmethod
    def done(cls, body: Body) -> Answer:
        return cls(True, body)

    @classmethod
    def listing(cls, key: str, rows: Iterable[Body]) -> Answer:
        return cls(True, rows=(key, iter(rows)))

    @classmethod
    def refused(cls, message: str, code: str = REFUSED) -> Answer:
        return cls(False, None, code, message)

    @classmethod
    def failed(cls, message: str, body: Body | None = None) -> Answer:
        return cls(False, body, FAILED, message)

    def header(self) -> Body:
        if self.ok:
            return {"ok": True}
        return {"ok": False, "error": {"code": self.code, "message": self.message}}

    @classmethod
    def from_wire(cls, header: Mapping[str, Any], body: Body | None) -> Answer:
        if header.get("ok") is True:
            return cls(True, body)
        error = header.get("error")
        error = error if isinstance(error, dict) else {}
        return cls(False, body, str(error.get("code", FAILED)), str(error.get("message", "")))


# How a backend gives its answer: at once, or later (workers).
Reply = Callable[[Answer], None]


def arity(usage: str) -> tuple[int, int]:
    """The least and most arguments of a usage line: "conns [SERVICE]" is
    (0, 1), "set SERVICE KEY VALUE" (3, 3)."""
    words = usage.split()[1:]
    return sum(not w.startswith("[") for w in words), len(words)


def unknown_command(command: str, known: Iterable[str]) -> Answer:
    return Answer.refused(f"no command {command!r} (known: {', '.join(known)})", UNKNOWN_COMMAND)


def parse(header: Mapping[str, Any], usages: Mapping[str, str]) -> Request | Answer:
    """The request a header asks for, or the refusal it gets; `usages`:
    each verb's usage line (server/control/verbs.py's table)."""
    command = header.get("cmd")
    if not isinstance(command, str):
        return Answer.refused("cmd (a string) is required", BAD_REQUEST)
    usage = usages.get(command)
    if usage is None:
        return unknown_command(command, usages)
    args = header.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) and len(a) <= ARG_MAX for a in args):
        return Answer.refused(f"args must be a list of strings of at most {ARG_MAX} characters", BAD_REQUEST)
    least, most = arity(usage)
    if not least <= len(args) <= most:
        return Answer.refused(f"usage: {usage}", BAD_REQUEST)
    return Request(command, tuple(args))


# -- one answer from the workers' shares ----------------------------------------


def merge_info(own: Body, shares: Iterable[Body]) -> Body:
    """The supervisor's `info` (pid, uptime, last reload are its own) with
    the workers' connections and running commands summed."""
    out = dict(own)
    for share in shares:
        out["connections"] += share["connections"]
        out["commands_running"] += share["commands_running"]
    return out


def merge_services(own: Mapping[str, Body], shares: Iterable[Body]) -> Body:
    """`own`: what the supervisor knows of each service (enabled, its
    listeners, limits); the workers' counts summed into it."""
    services = {
        name: {**entry, "connections_current": 0, "connections_total": 0, "rejected": {}}
        for name, entry in own.items()
    }
    for share in shares:
        for name, entry in share["services"].items():
            mine = services.get(name)
            if mine is None:
                continue
            mine["connections_current"] += entry["connections_current"]
            mine["connections_total"] += entry["connections_total"]
            for reason, n in entry["rejected"].items():
                mine["rejected"][reason] = mine["rejected"].get(reason, 0) + n
    return {"services": services}


# The merges of listings take each worker's rows in order (`conns` by
# connection id, `sources` by service and IP) and give the merged rows
# lazily, in the same order: the driver takes them a slice at a time.


def merge_conns(shares: Iterable[list[Body]]) -> Iterator[Body]:
    return heapq.merge(*shares, key=lambda c: c["conn"])


def source_key(row: Body) -> tuple[str, str]:
    return (row["service"], row["ip"])


def merge_sources(shares: Iterable[list[Body]]) -> Iterator[Body]:
    """One row per (service, IP): counts and tokens summed (each worker
    has its own bucket), the longest ban."""
    for _, group in itertools.groupby(heapq.merge(*shares, key=source_key), key=source_key):
        same = list(group)
        mine = dict(same[0])
        for row in same[1:]:
            mine["connections"] += row["connections"]
            mine["rejected"] += row["rejected"]
            if row["tokens"] is not None:
                mine["tokens"] = round((mine["tokens"] or 0.0) + row["tokens"], 3)
            mine["banned_for_s"] = max(mine["banned_for_s"], row["banned_for_s"])
        yield mine
