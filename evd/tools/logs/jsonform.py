"""The `--json` form of `evd logs summary`: SPEC section 8's object,
field for field, as types (scripts depend on it: nothing added, nothing
renamed), and the few figures only the text report shows."""

from __future__ import annotations

from typing import TypedDict


# SPEC section 8's `--json` object, field for field.  Percentiles are null
# when nothing was measured (a service with refusals only).
class ServiceDurations(TypedDict):
    p50: float | None
    p95: float | None
    p99: float | None
    max: float | None


class CommandDurations(TypedDict):
    p50: float | None
    p95: float | None
    max: float | None


class ServiceJson(TypedDict):
    connections: int
    reasons: dict[str, int]
    duration_ms: ServiceDurations
    bytes_in: int
    bytes_out: int
    rejected: dict[str, int]
    udp_drops: dict[str, int]


class PeerJson(TypedDict):
    peer: str
    connections: int
    rejected: int
    auth_failures: int


class CommandJson(TypedDict):
    runs: int
    exit: dict[str, int]
    timed_out: int
    truncated: int
    duration_ms: CommandDurations


class SummaryJson(TypedDict):
    lines: int
    skipped: int
    first: str | None
    last: str | None
    services: dict[str, ServiceJson]
    peers: list[PeerJson]
    commands: dict[str, CommandJson]
    errors: dict[str, int]
    reloads: dict[str, int]
    starts: int
    stops: int


class Extras(TypedDict):
    """What the text report shows beyond the JSON object."""

    overlong: int  # of the skipped lines, those longer than reading.MAX_LINE

    unix_connections: dict[str, int]
    tls_failures: dict[str, int]
    command_keys: dict[str, dict[str, int]]
