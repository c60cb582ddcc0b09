"""What a run is asked to do, and the bounds every run stays within."""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("tcp", "udp", "connect", "framed", "idle")
DEFAULT_CONNECTIONS = {"tcp": 50, "udp": 20, "connect": 20, "framed": 50, "idle": 1000}
# Bounded runs: a typo cannot make a benchmark run for an hour.
MAX_DURATION = 300.0
MAX_WARMUP = 60.0
MAX_SIZE = 65507  # the largest UDP payload; streams use the same cap
MAX_DEPTH = 1024
MAX_CONNECTIONS = 100000
MAX_PROCESSES = 64
# A server's rate-bucket table holds 65,536 clients (proto/admission.py):
# more sources would measure its overflow, not what a client sees.
MAX_SOURCES = 65536
# Setting up every connection (idle mode opens thousands) before the start.
SETUP_TIMEOUT = 120.0


class BenchError(Exception):
    """The run could not be set up (bad target, refused, too few fds)."""


@dataclass
class Options:
    mode: str = "tcp"
    address: str = "127.0.0.1:7007"
    connections: int = 0  # 0: the mode's default
    size: int = 64
    duration: float = 5.0
    warmup: float = 1.0
    processes: int = 1
    depth: int = 1
    server_pid: int = 0
    allow_remote: bool = False
    sources: int = 0  # 0: 127.0.0.2-5 for streams, the kernel's choice for UDP
    tls: bool = False  # TLS over every stream connection (a `tls` listener)
    cafile: str = ""  # --tls: the CA to verify the server with ("": the system's)
    proxy_v2: bool = False  # each connection begins with a PROXY v2 header, as HAProxy's send-proxy-v2

    def check(self) -> None:
        """Fill in the mode's defaults; BenchError naming every bad value."""
        if self.mode not in MODES:
            raise BenchError(f"unknown mode {self.mode!r}; one of {', '.join(MODES)}")
        if not self.connections:
            self.connections = DEFAULT_CONNECTIONS[self.mode]
        bounds: tuple[tuple[str, float, float, float], ...] = (
            ("connections", self.connections, 1, MAX_CONNECTIONS),
            ("size", self.size, 1, MAX_SIZE),
            ("duration", self.duration, 0.1, MAX_DURATION),
            ("warmup", self.warmup, 0, MAX_WARMUP),
            ("processes", self.processes, 1, MAX_PROCESSES),
            ("depth", self.depth, 1, MAX_DEPTH),
            ("sources", self.sources, 0, MAX_SOURCES),
        )
        # `not lo <= v <= hi` is also true for NaN, which no bound admits.
        problems = [
            f"{name} must be in [{lo:g}, {hi:g}], got {v:g}"
            for name, v, lo, hi in bounds
            if not lo <= v <= hi
        ]
        if self.tls and self.mode == "udp":
            problems.append("tls: udp has no TLS (tcp, connect, framed or idle)")
        if self.proxy_v2 and (self.mode not in ("tcp", "connect") or self.tls):
            problems.append("proxy-v2: for tcp and connect, without --tls")
        if problems:
            raise BenchError("; ".join(problems))
        self.processes = min(self.processes, self.connections)
