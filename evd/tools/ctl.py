"""`evd ctl`: one request to the control socket, its answer for a person.

The client is small and blocking, with one timeout for the whole exchange:
connect to `control.unix`, send the request frame, read the answer frame
(proto/control.py says what both look like).  What it prints is `render`:
aligned tables for lists, `key: value` lines for the rest; `--json`
prints the answer object itself.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterable, Sequence
from typing import Any

from evd.proto.control import Answer, Body, Request
from evd.proto.framing import Decoder, FrameError, encode

# Answers list connections: allow what a daemon with many may send.
MAX_BODY = 1 << 30
MAX_HEADER = 1 << 20


def request(path: str, command: Request, timeout: float) -> Answer:
    """Ask the daemon at `path`; OSError if it cannot be reached or does
    not answer within `timeout` seconds (TimeoutError), ConnectionError if
    it hangs up first."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(encode(command.header()))  # a client: blocking, under the timeout
        decoder = Decoder(MAX_HEADER, MAX_BODY)
        while (frame := decoder.next_frame()) is None:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            data = sock.recv(262144)
            if not data:
                raise ConnectionError("the daemon closed the connection without an answer")
            decoder.feed(data)
    body = json.loads(frame.body) if frame.body else None
    return Answer.from_wire(frame.header, body)


# -- finding the daemon without its configuration --------------------------------

# /proc/net/unix: a listening socket has __SO_ACCEPTCON in its flags.
_LISTENING = 0x10000


def listening_sockets(pid: int) -> list[str]:
    """The paths of the UNIX sockets process `pid` listens on, from /proc
    (its descriptors' socket inodes, named in /proc/PID/net/unix)."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:  # closed meanwhile
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        with open(f"/proc/{pid}/net/unix") as table:
            rows = [line.split() for line in table.readlines()[1:]]
    except OSError:  # gone, or not ours to look at
        return []
    return [
        row[7]
        for row in rows
        if len(row) >= 8 and int(row[3], 16) & _LISTENING and row[6] in inodes and row[7].startswith("/")
    ]


def control_socket_of(pid: int, timeout: float) -> str | None:
    """The control socket of the evd with pid `pid`: the one of its UNIX
    listeners that answers `info` as that very daemon (a service's UNIX
    listener does not).  None if there is none."""
    for path in listening_sockets(pid):
        try:
            answer = request(path, Request("info"), min(timeout, 1.0))
        except (OSError, FrameError, ValueError):
            continue
        if answer.ok and isinstance(answer.body, dict) and answer.body.get("pid") == pid:
            return path
    return None


# -- for a person ----------------------------------------------------------------


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """Columns padded to their widest cell; numbers aligned right."""
    cells = [list(headers)] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all(_is_number(row[i]) for row in cells[1:]) and len(cells) > 1 for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric, strict=True)]
        lines.append("  ".join(parts).rstrip())
    return lines


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}" if abs(value) >= 1000 else f"{value:.3f}".rstrip("0").rstrip(".")
    return str(value)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text == "-"
    return True


def _reasons(counts: dict[str, int]) -> str:
    return ",".join(f"{r}={n}" for r, n in sorted(counts.items())) or "-"


def render(command: str, body: Body) -> list[str]:
    """`body`, the answer to `command`, for a person."""
    if command == "info":
        last = body.get("last_reload")
        reload_text = "never" if not last else f"{last['time']} ({'ok' if last['ok'] else 'failed'})"
        pairs: list[tuple[str, Any]] = [
            ("pid", body["pid"]),
            ("version", body["version"]),
            ("uptime", f"{body['uptime']:.0f} s"),
            ("config", body["config"]),
            ("workers", body["workers"]),
            ("connections", body["connections"]),
            ("commands running", body["commands_running"]),
            ("last reload", reload_text),
        ]
        width = max(len(k) for k, _ in pairs)
        return [f"{k + ':':<{width + 1}} {v}" for k, v in pairs]
    if command == "services":
        return _services(body["services"])
    if command == "conns":
        rows = [
            [
                c["conn"],
                c["service"],
                c["peer"],
                c["age_s"],
                c["idle_s"],
                c["bytes_in"],
                c["bytes_out"],
                c["worker"],
                c.get("exec_pid"),  # a program service's child (SPEC section 14)
            ]
            for c in body["conns"]
        ]
        return table(("CONN", "SERVICE", "PEER", "AGE_S", "IDLE_S", "IN", "OUT", "WORKER", "EXEC_PID"), rows)
    if command == "sources":
        rows = [
            [s["service"], s["ip"], s["connections"], s["rejected"], s["tokens"], s["banned_for_s"]]
            for s in body["sources"]
        ]
        return table(("SERVICE", "IP", "CONNS", "REJECTED", "TOKENS", "BANNED_S"), rows)
    if command == "kill":
        return [f"connection {body['conn']} closed"]
    if command in ("disable", "enable"):
        state = "enabled" if body["enabled"] else "disabled"
        verb = "opened" if body["enabled"] else "closed"
        return [f"{body['service']} {state}; {verb}: {', '.join(body['listeners']) or 'nothing'}"]
    if command == "set":
        return [f"{body['service']}: {body['key']} = {body['value']} (was {body['was']})"]
    if command == "reload":
        return [reload_text_of(body)]
    return [json.dumps(body)]


def reload_text_of(body: Body) -> str:
    if not body.get("ok"):
        return f"reload failed: {body.get('error')}"
    parts = [
        f"{what}: {', '.join(body.get(what) or []) or 'nothing'}" for what in ("added", "removed", "changed")
    ]
    return "reloaded; " + "; ".join(parts)


def _services(services: dict[str, Body]) -> list[str]:
    rows = [
        [
            name,
            "yes" if s["enabled"] else "no",
            s["connections_current"],
            s["connections_total"],
            _reasons(s["rejected"]),
            ", ".join(s["listeners"]) or "-",
        ]
        for name, s in services.items()
    ]
    lines = table(("SERVICE", "ENABLED", "CURRENT", "TOTAL", "REJECTED", "LISTENERS"), rows)
    lines.append("")
    enabled = {name: s for name, s in services.items() if s["enabled"]}  # the others' have no effect
    keys = list(next(iter(enabled.values()))["limits"]) if enabled else []
    limit_rows = [[name, *(s["limits"][k] for k in keys)] for name, s in enabled.items()]
    return lines + table(("LIMITS", *keys), limit_rows)
