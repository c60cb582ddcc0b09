"""`evd explain SERVICE`: what applies to one service, and which file said so.

djb's `tcprulescheck` answered "what would happen to this address" from the
rules alone; this does the same for evd, from the configuration alone (no
daemon): whether the service is on, where it listens, each limit in force
and the file that set it, and for an address the access verdict and the
`only_from`/`no_access` entry that decided it -- decided by the function the
daemon's admission uses (proto/access.py).

The answer is a plain dict, the `--json` shape of SPEC section 11:
{"service", "enabled", "listeners", "limits": {KEY: {"value", "from"}},
"access": {"ip", "verdict", "rule"} or null}, and for the PROXY protocol
(SPEC section 13) "proxy": {"protocol", "from"} and, in "access", "proxy":
{"trusted", "rule"} -- whether the address is one of the service's trusted
proxies (`proxy_from`), by which entry.  Behind a proxy the access verdict
is the one for a client the proxy names; the proxy itself must be trusted.
"""

from __future__ import annotations

from typing import Any

from evd.config.loader import Loaded
from evd.config.model import ServiceConfig
from evd.config.schema import LIMITS, SERVICE_KEYS
from evd.proto.access import AccessList, first_match

DEFAULT = "default"  # "from" of a value no file set

# Which limits act on a connection or datagram of each protocol (see
# proto/admission.py and net/): UDP has no connections, only the per-IP
# rate; a UNIX peer has no IP, so no per-IP limits; TLS adds the handshake.
_STREAM = ("max_connections", "per_source", "rate", "burst", "idle_timeout", "write_high", "write_low")
BY_PROTO = {
    "tcp": _STREAM,
    "tls": _STREAM + ("handshake_timeout",),
    "unix": ("max_connections", "idle_timeout", "write_high", "write_low"),
    "udp": ("rate", "burst"),
}
FRAMED_ONLY = ("max_header", "max_body", "auth_ban")  # frames and `auth` exist on the framed port only
COMMAND_KEYS = ("timeout", "max_output", "max_concurrent")
# Reached through the framed port: its listeners and access lists are theirs.
THROUGH_FRAMED = ("command", "stats")


def limit_keys(svc: ServiceConfig, proto: str | None) -> list[str]:
    """The limits that act on `svc`, in schema order: over `proto` if
    given, else over the protocols it has listeners for (all it can have
    if none).  Behind the PROXY protocol every stream connection has a
    client IP (the header's, UNIX ones too) and a header to wait for."""
    if svc.name == "command":
        return list(COMMAND_KEYS)
    by_proto = dict(BY_PROTO)
    if svc.proxy_protocol:
        by_proto = {p: _STREAM + ("handshake_timeout",) if p != "udp" else k for p, k in by_proto.items()}
    possible = [p for p in BY_PROTO if p in SERVICE_KEYS[svc.name]]  # framed has no udp; stats none
    if proto is not None:
        protos = [proto] if proto in possible else []
    else:
        protos = [p for p in possible if getattr(svc, p)] or possible
    wanted = {k for p in protos for k in by_proto[p]}
    if svc.name == "framed" and protos:
        wanted |= set(FRAMED_ONLY)
    return [k for k in LIMITS if k in wanted]


def _listeners(svc: ServiceConfig, proto: str | None) -> list[str]:
    return [f"{a.proto} {a}" for a in svc.addresses if proto is None or a.proto == proto]


def explain(loaded: Loaded, service: str, ip: str | None = None, proto: str | None = None) -> dict[str, Any]:
    """The explanation of `service` (one of SERVICE_NAMES)."""
    config = loaded.config
    svc = config.services[service]
    gate = config.services["framed"] if service in THROUGH_FRAMED else svc
    limits = {}
    for key in limit_keys(svc, proto):
        value = getattr(svc if service == "command" else svc.limits, key)
        limits[key] = {"value": value, "from": loaded.origins.of(f"services.{service}.{key}") or DEFAULT}
    access = None
    if ip is not None:
        verdict = AccessList(gate.only_from, gate.no_access).decide(ip)
        trusted = first_match(ip, gate.proxy_from)
        access = {
            "ip": ip,
            "verdict": verdict.word,
            "rule": verdict.rule,
            "proxy": {
                "trusted": trusted is not None,
                "rule": None if trusted is None else f"proxy_from {trusted}",
            },
        }
    return {
        "service": service,
        "enabled": svc.enabled,
        "listeners": _listeners(svc, proto),
        "limits": limits,
        "access": access,
        "proxy": {"protocol": gate.proxy_protocol, "from": [str(n) for n in gate.proxy_from]},
    }


def render(answer: dict[str, Any], loaded: Loaded) -> str:
    """The explanation for a person: one fact a line, each with its file."""
    name = answer["service"]
    config, origins = loaded.config, loaded.origins
    state = "enabled" if answer["enabled"] else "disabled"
    lines = [f"{name}: {state}  (from {origins.of(f'services.{name}.enabled') or DEFAULT})"]
    gate_name = "framed" if name in THROUGH_FRAMED else name
    if name in THROUGH_FRAMED:
        framed = config.services["framed"]
        reachable = framed.enabled and name in framed.dispatch
        lines.append(f"listeners: those of framed ({'dispatched there' if reachable else 'NOT reachable'})")
    else:
        idle = "" if answer["enabled"] or not answer["listeners"] else "  (not listening: disabled)"
        lines.append(f"listeners: {', '.join(answer['listeners']) or 'none'}{idle}")
    if answer["limits"]:
        lines.append("limits:")
        width = max(len(k) for k in answer["limits"])
        for key, limit in answer["limits"].items():
            lines.append(f"  {key:<{width}} = {limit['value']!r:<9}  from {limit['from']}")
    gate = config.services[gate_name]
    for key in ("only_from", "no_access"):
        shown = ", ".join(str(n) for n in getattr(gate, key)) or "(empty)"
        lines.append(f"{key}: {shown}  (from {origins.of(f'services.{gate_name}.{key}') or DEFAULT})")
    proxy = answer["proxy"]
    where = origins.of(f"services.{gate_name}.proxy_protocol") or DEFAULT
    if proxy["protocol"]:
        lines.append(f"proxy_protocol: on, from {', '.join(proxy['from'])}  (from {where})")
    if answer["access"] is not None:
        if proxy["protocol"]:
            lines.append(_proxy_line(answer["access"], gate_name))
        lines.append(_access_line(answer["access"], proxy["protocol"]))
    return "\n".join(lines) + "\n"


def _proxy_line(access: dict[str, Any], service: str) -> str:
    """Behind the PROXY protocol: may this address connect at all."""
    trusted = access["proxy"]
    if trusted["trusted"]:
        return (
            f"{access['ip']} is a trusted proxy of {service} (by {trusted['rule']}): its connections "
            "must begin with a PROXY header, and the client it names is checked as below"
        )
    return (
        f"{access['ip']} is NOT a trusted proxy of {service}: its connections are refused "
        '(conn.reject reason "proxy"); as a client named by a trusted proxy:'
    )


def _access_line(access: dict[str, Any], proxied: bool = False) -> str:
    rule = access["rule"]
    if rule is not None:
        why = f"by {rule}"
    elif access["verdict"] == "deny":
        why = "matches no only_from entry"
    else:
        why = "only_from is empty and no no_access entry matches"
    what = "access for client" if proxied else "access from"
    return f"{what} {access['ip']}: {access['verdict']} ({why})"
