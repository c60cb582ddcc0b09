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

Steering.  Left alone, the kernel spreads a reuseport group by a hash of
the whole 4-tuple, so one client's connections land on every worker -- and
per_source, rate and auth_ban, which each worker keeps for itself, would
hold per worker, not per client (a banned client simply got the next
worker).  `steer` attaches a classic BPF program to the group
(SO_ATTACH_REUSEPORT_CBPF) that picks the socket from the client's source
address alone: every connection and datagram of one IP goes to one worker,
chosen by the kernel, and the loop pays nothing.  The program returns an
index into the group, and the group is ordered by joining (bind for UDP,
listen for TCP, both done by `bind` at once): copy i, bound i-th, is slot i.
The supervisor keeps its copies open for its whole life, so the order
never changes under it (closing a member would move the last one into
its place).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace

from evd.config.addresses import Address
from evd.net.listeners import BindError, bind, bound_identity, unlink_if_ours
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
                steer(copies[0], count)
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


# <linux/filter.h> and <asm-generic/socket.h>: not in Python's socket module.
SO_ATTACH_REUSEPORT_CBPF = 51
_NET = -0x100000  # SKF_NET_OFF: loads relative to the IP header
_LD_B, _LD_W = 0x30, 0x20  # BPF_LD | BPF_B/BPF_W | BPF_ABS
_RSH_K, _XOR_X, _MUL_K, _MOD_K = 0x74, 0xAC, 0x24, 0x94  # BPF_ALU | op | K/X
_JEQ_K, _JA, _TAX, _RET_A = 0x15, 0x05, 0x07, 0x16


def steering_program(count: int) -> list[tuple[int, int, int, int]]:
    """The classic BPF program of `steer`: (code, jt, jf, k) each.  When the
    program runs, the packet data starts past the transport header, so the
    source address is read relative to the IP header (SKF_NET_OFF): an IPv4
    address, or the four words of an IPv6 one folded by XOR (a dual-stack
    socket sees both).  A multiplicative mix spreads neighbouring addresses
    (127.0.0.2, .3, ...) over the workers; the remainder is the socket index."""
    return [
        (_LD_B, 0, 0, _NET),  # A = first byte of the IP header
        (_RSH_K, 0, 0, 4),  # its version
        (_JEQ_K, 0, 2, 4),
        (_LD_W, 0, 0, _NET + 12),  # IPv4 source address
        (_JA, 0, 0, 10),
        (_LD_W, 0, 0, _NET + 8),  # IPv6 source address, word by word
        (_TAX, 0, 0, 0),
        (_LD_W, 0, 0, _NET + 12),
        (_XOR_X, 0, 0, 0),
        (_TAX, 0, 0, 0),
        (_LD_W, 0, 0, _NET + 16),
        (_XOR_X, 0, 0, 0),
        (_TAX, 0, 0, 0),
        (_LD_W, 0, 0, _NET + 20),
        (_XOR_X, 0, 0, 0),
        (_TAX, 0, 0, 0),  # mix: A = (A ^ A >> 16) * c; A ^= A >> 16
        (_RSH_K, 0, 0, 16),
        (_XOR_X, 0, 0, 0),
        (_MUL_K, 0, 0, 0x45D9F3B),
        (_TAX, 0, 0, 0),
        (_RSH_K, 0, 0, 16),
        (_XOR_X, 0, 0, 0),
        (_MOD_K, 0, 0, count),
        (_RET_A, 0, 0, 0),
    ]


def worker_for(host: str, count: int) -> int:
    """The slot `steering_program` picks for a client at `host` (an IP
    literal): the same arithmetic, for tests and for load generators that
    must spread their sources over the workers."""
    if host.lower().startswith("::ffff:") and "." in host:
        host = host[7:]  # a mapped IPv4 client arrives with an IPv4 header
    packed = socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    a = 0
    for (word,) in struct.iter_unpack("!I", packed):
        a ^= word
    a = ((a ^ (a >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    return (a ^ (a >> 16)) % count


def steer(sock: socket.socket, count: int) -> None:
    """Make `sock`'s reuseport group pick its socket by client address (see
    the module's docstring).  A kernel without it (before Linux 4.5) fails
    the start: per-client limits would silently hold per worker."""
    import ctypes  # only a supervisor needs it

    code = b"".join(
        struct.pack("HBBI", c, jt, jf, k & 0xFFFFFFFF) for c, jt, jf, k in steering_program(count)
    )
    program = ctypes.create_string_buffer(code)
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }
    fprog = struct.pack("HP", len(code) // 8, ctypes.addressof(program))  # native alignment pads
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
    except OSError as exc:
        raise BindError(f"cannot steer clients to workers: setsockopt: {exc.strerror or exc}") from None
