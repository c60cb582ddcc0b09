"""Listening sockets for a set of listeners, bound all at once or not at all.

Start-up (server/launch.py) binds the whole configuration; a reload, of the
daemon or the supervisor, binds only what the plan adds (server/reload_plan.py).
Either way a port in use must leave nothing half-bound behind, so
`bind_slots` closes what it bound before raising.

With `workers = N` each TCP/UDP listener is bound once per worker slot with
SO_REUSEPORT (see server/supervisor.py for why the supervisor binds them);
UNIX sockets, which cannot be shared that way, and sockets systemd passed
are one socket that every slot shares.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Mapping
from dataclasses import replace

from evd.net.listeners import bind, bound_identity, unlink_if_ours
from evd.server.reload_plan import ListenerKey

# {listener key: [socket per worker slot]}; a single process has one slot.
Slots = dict[ListenerKey, list[socket.socket]]


def bind_slots(
    keys: Iterable[ListenerKey], count: int = 1, adopted: Mapping[ListenerKey, socket.socket] | None = None
) -> Slots:
    """Every listener of `keys`, `count` sockets each (see the module's
    docstring); those in `adopted` (systemd's) are used, not bound.  All
    or nothing: BindError names the first that failed."""
    slots: Slots = {}
    try:
        for key in keys:
            address = key[1]
            if adopted and key in adopted:
                slots[key] = [adopted[key]] * count
            elif address.proto == "unix" or count == 1:
                slots[key] = [bind(address)] * count
            else:
                copies = slots[key] = [bind(address, reuse_port=True)]
                # The first copy resolved port 0; the others share its port.
                actual = replace(address, port=copies[0].getsockname()[1])
                for _ in range(count - 1):
                    copies.append(bind(actual, reuse_port=True))
    except BaseException:
        unbind({k: s for k, s in slots.items() if not (adopted and k in adopted)})
        raise
    return slots


def unbind(slots: Slots) -> None:
    """Undo `bind_slots` when the reload that bound them fails later: close
    the sockets and remove the UNIX paths they created a moment ago."""
    for key in slots:
        if key[1].proto == "unix":
            unlink_if_ours(key[1].host, bound_identity(key[1].host))
    close_sockets(slots.values())


def close_sockets(socket_lists: Iterable[list[socket.socket]]) -> None:
    """Close every socket once (a shared one appears in every slot)."""
    for sock in {id(s): s for socks in socket_lists for s in socks}.values():
        sock.close()
