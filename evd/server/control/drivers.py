"""The two drivers of the verb table that carry verbs out in a daemon process.

`Local` answers the control clients of a single process; `WorkerEnd`
answers a worker's supervisor over its channel (link.py).  Both look the
verb up in server/control/verbs.py's table and run its `local` function;
they differ only in where `enable`'s sockets come from: a single process
binds them, a worker is handed the supervisor's copies with the request.
The supervisor's driver is fanout.py's `Fanout`.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from typing import Any

from evd.config.addresses import Address
from evd.net.listeners import BindError
from evd.proto.control import Answer, Reply, Request
from evd.server.control import slices
from evd.server.control.daemon_verbs import Served
from evd.server.control.link import Link
from evd.server.control.supervisor_verbs import decode_key
from evd.server.control.verbs import VERBS, unknown
from evd.server.metrics.snapshot import Figures
from evd.server.reload_plan import ListenerKey
from evd.server.sockets import bind_slots, firsts

Sockets = dict[ListenerKey, socket.socket]
# A worker's last figures, as it exits, may wait this long for the socket.
LAST_WORDS = 1.0


class Local:
    """The control backend of a single process: every answer at once."""

    def __init__(self, daemon: Served):
        self.daemon = daemon

    def handle(self, request: Request, reply: Reply) -> None:
        reply(self.answer(request))

    def scrape(self, done: Callable[[Figures | None], None]) -> None:
        """/metrics of a single process: its figures and its reloads."""
        daemon = self.daemon
        done({**daemon.figures(), "reloads": dict(daemon.reloads.count), "pids": [os.getpid()]})

    def answer(self, request: Request) -> Answer:
        daemon = self.daemon
        verb = VERBS.get(request.command)
        if verb is None or verb.own is None:  # the supervisor's own questions are not a client's
            return unknown(request.command)
        if verb.reconfigures and (daemon.stopping or daemon.retiring):
            return Answer.refused("evd is stopping")
        return verb.local(daemon, request.args, self.bind)

    def bind(self, name: str, wanted: list[tuple[ListenerKey, Address]]) -> Sockets | Answer:
        """`enable`: a single process binds its own sockets."""
        try:
            self.daemon.prepare_tls(name)
            return firsts(bind_slots([key for key, _ in wanted], at=dict(wanted)))
        except BindError as exc:
            return Answer.refused(str(exc))


class WorkerEnd:
    """A worker's side of its channel: each request carried out as a single
    process would, and answered."""

    def __init__(self, daemon: Served, sock: socket.socket):
        self.daemon = daemon
        self.link = Link(daemon.reactor, sock, self._frame, lambda: None)
        self.handed: Sockets = {}  # the sockets that came with the request being carried out

    def _frame(self, header: dict[str, Any], body: bytes) -> None:
        request = Request(str(header.get("cmd")), tuple(header.get("args") or ()))
        keys = [decode_key(k) for k in header.get("keys") or ()]
        fds = self.link.take_fds(len(keys))
        self.handed = {key: socket.socket(fileno=fd) for key, fd in zip(keys, fds, strict=False)}
        try:
            answer = self._answer(request)
        finally:
            for sock in self.handed.values():  # not taken: not ours to keep
                sock.close()
            self.handed = {}
        if not header.get("id"):
            return
        reply = {"id": header["id"], **answer.header(), "figures": header.get("figures", False)}
        if answer.rows is None:
            self.link.send(reply, b"" if answer.body is None else json.dumps(answer.body).encode())
            return
        # A listing: its rows go up a slice at a time, each batch a part
        # frame the supervisor parses on its own, then the answer itself.
        key, rows = answer.rows
        part = {"id": header["id"], "part": True}

        def each(batch: list[slices.Row]) -> None:
            self.link.send(part, b"[" + slices.encode_batch(batch) + b"]")

        def done() -> None:
            self.link.send({**reply, "rows": key})

        slices.pace(self.daemon.reactor, rows, each, done)

    def _answer(self, request: Request) -> Answer:
        verb = VERBS.get(request.command)
        if verb is None:
            return unknown(request.command)
        return verb.local(self.daemon, request.args, self.bind)

    def bind(self, name: str, wanted: list[tuple[ListenerKey, Address]]) -> Sockets | Answer:
        """`enable`: the supervisor bound them; they came with the request."""
        try:
            self.daemon.prepare_tls(name)
        except BindError as exc:
            return Answer.refused(str(exc))
        handed, self.handed = self.handed, {}
        return handed

    def last_words(self) -> None:
        """At exit: this worker's final counts, for the supervisor's totals."""
        self.link.send_last({"last": True}, json.dumps(self.daemon.figures()).encode(), LAST_WORDS)
