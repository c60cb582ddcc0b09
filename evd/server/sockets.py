"""Listening sockets for a set of listeners, bound all at once or not at all.

Every bind of the daemon goes through `bind_slots`: start-up
(server/launch.py) binds the whole configuration and the control and
metrics sockets (server/control/endpoints.py); a reload, of the daemon or
the supervisor, binds only what the plan adds (server/reload_plan.py); `evd
ctl enable` binds a service switched back on (server/control/verbs.py).
Either way a port in use must leave nothing half-bound behind, so
`bind_slots` closes (and unlinks) what it bound before raising.

With `workers = N` each TCP/UDP listener is bound once per worker slot with
SO_REUSEPORT (see server/supervisor.py for why the supervisor binds them);
UNIX sockets, which cannot be shared that way, and sockets systemd passed
are one socket that every slot shares.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace

from evd.config.addresses import Address
from evd.net.listeners import bind, bound_identity, unlink_if_ours
from evd.server.reload_plan import ListenerKey

# {listener key: [socket per worker slot]}; a single process has one slot.
Slots = dict[ListenerKey, list[socket.socket]]
# How one key's first (or only) socket is bound: the control socket needs
# its file mode set (server/control/endpoints.py); everything else is `bind`.
BindOne = Callable[[ListenerKey, Address], socket.socket]


def plain(key: ListenerKey, address: Address) -> socket.socket:
    return bind(address)


def bind_slots(
    keys: Iterable[ListenerKey],
    count: int = 1,
    adopted: Mapping[ListenerKey, socket.socket] | None = None,
    *,
    at: Mapping[ListenerKey, Address] | None = None,
    bind_one: BindOne = plain,
) -> Slots:
    """Every listener of `keys`, `count` sockets each (see the module's
    docstring); those in `adopted` (systemd's) are used, not bound.  A key
    in `at` is bound there instead of at its own address (`enable`: the
    port a port-0 listener had), and stays keyed as configured.  All or
    nothing: BindError names the first that failed."""
    slots: Slots = {}
    try:
        for key in keys:
            address = at.get(key, key[1]) if at else key[1]
            if adopted and key in adopted:
                slots[key] = [adopted[key]] * count
            elif address.proto == "unix" or count == 1:
                slots[key] = [bind_one(key, address)] * count
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


def firsts(slots: Slots) -> dict[ListenerKey, socket.socket]:
    """One socket per key: what a single process serves."""
    return {key: socks[0] for key, socks in slots.items()}


def unbind(slots: Slots) -> None:
    """Undo `bind_slots` when what bound them fails later: close the
    sockets and remove the UNIX paths they created a moment ago."""
    for key in slots:
        if key[1].proto == "unix":
            unlink_if_ours(key[1].host, bound_identity(key[1].host))
    close_sockets(slots.values())


def close_sockets(socket_lists: Iterable[list[socket.socket]]) -> None:
    """Close every socket once (a shared one appears in every slot)."""
    for sock in {id(s): s for socks in socket_lists for s in socks}.values():
        sock.close()
