"""`evd logs summary`: the aggregation behind SPEC section 8's report.

Speed comes from doing little per line:

- evd's own `conn.open` and `conn.close` lines (nearly all of a busy log)
  are recognised by byte tests: the slice after evd's prefix and a 27-byte
  UTC timestamp says `"level": "info", "event": "conn.open"` (or close).
  Their timestamp is sliced from the bytes, never decoded.  A conn.open
  adds only that timestamp and its count, so it is never parsed (except
  under `--service`: bytes cannot tell its service); a conn.close is parsed
  with orjson (a C parser, several times faster than `json`) and counted
  inline in the loop.
- Every other line, and these two when spelled otherwise (another
  writer's separators, a timestamp without its fraction), takes the
  general path: parsed, checked, one method call per event kind.
- Large inputs are shared out between processes (runner.py); every figure
  here merges exactly (`merge`).

Memory: per selected `conn.close` (and `command.end`), its duration, 8
bytes in an `array('d')`, because exact nearest-rank percentiles need
every value; while the percentiles are computed at the end, the values of
one service at a time as a sorted list of floats (32 bytes each); per
distinct client IP, a row of three counters; per service, command, reason
and error place, a few counters.  The input is read in blocks
(reading.py), so its size does not matter, only what is selected.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable

import orjson

from evd.tools.logs.entries import is_entry, to_event
from evd.tools.logs.events import SHAPE, ZEROS, is_key, line_service, peer_ip, ts_key
from evd.tools.logs.jsonform import Extras, PeerJson, SummaryJson
from evd.tools.logs.reading import OVERLONG
from evd.tools.logs.stats import CommandStats, ServiceStats, add, by_count, exit_key, merge_counts

PREFIX = b'{"timestamp": "'
# What follows a 27-byte timestamp in evd's own conn.open and conn.close
# lines (always level info): one slice, line[42:83], and one comparison
# tell such a line from every other.
OPEN_AT_42 = b'", "level": "info", "event": "conn.open",'
CLOSE_AT_42 = b'", "level": "info", "event": "conn.close"'
# Sort after every timestamp key: "no line yet", "no upper bound".
NO_KEY = "\uffff"
NO_KEY_B = b"\xff"

Json = dict[str, object]


class Summary:
    """Feed it lines (`feed`, then `feed_tail` for a file's unterminated
    last line); `to_json` is SPEC section 8's object."""

    def __init__(self, since: str | None = None, until: str | None = None, service: str | None = None):
        # Bounds and extremes as text for parsed lines, as bytes for the
        # fast paths, which never decode a timestamp.
        self.since = since or ""
        self.until = until or NO_KEY
        self.since_b, self.until_b = self.since.encode(), until.encode() if until else NO_KEY_B
        self.timed = since is not None or until is not None
        self.service = service
        self.lines = 0
        self.skipped = 0
        self.first, self.last = NO_KEY, ""
        self.raw_first, self.raw_last = NO_KEY_B, b""
        self.services: dict[str, ServiceStats] = {}
        self.peers: dict[str, list[int]] = {}  # ip -> [connections, rejected, auth failures]
        self.commands: dict[str, CommandStats] = {}
        self.errors: dict[str, int] = {}
        self.reloads = {"ok": 0, "failed": 0}
        self.starts = 0
        self.stops = 0
        self.second = b""  # see feed
        self.overlong = 0  # of the skipped lines, those over reading.MAX_LINE

    def _service(self, name: str) -> ServiceStats:
        stats = self.services.get(name)
        if stats is None:
            stats = self.services[name] = ServiceStats()
        return stats

    def _peer(self, peer: str) -> list[int] | None:
        """The counters of a peer's IP; None for UNIX clients (no IP);
        ValueError for a port without an address (":5")."""
        ip = peer_ip(peer)
        if ip == peer:  # "unix", or no port to strip: not an IP
            return None
        if not ip:
            raise ValueError(peer)
        row = self.peers.get(ip)
        if row is None:
            row = self.peers[ip] = [0, 0, 0]
        return row

    def feed(self, lines: Iterable[bytes]) -> None:
        """Count the selected events among `lines` (complete lines).  One
        long loop on purpose: for evd's own lines a function call would
        cost about as much as the counting it did."""
        loads = orjson.loads
        timed, service = self.timed, self.service
        since_b, until_b = self.since_b, self.until_b
        raw_first, raw_last, count, skipped = self.raw_first, self.raw_last, self.lines, self.skipped
        services, peers, general = self.services, self.peers, self._general
        # The second of the last timestamp checked whole (is_key): the
        # lines of one second, hundreds in a busy log, then only have their
        # shape checked (one bytes.translate) and their second compared;
        # the date and time are known to exist.
        second = self.second
        for line in lines:
            head = line[42:83]
            if head == CLOSE_AT_42 and line[:15] == PREFIX:
                ts = line[15:42]
                sec = ts[:19]
                if ts.translate(ZEROS) != SHAPE or (sec != second and not is_key(ts)):
                    verdict = general(line)  # not evd's spelling: what the general path says
                    skipped += verdict is None
                    continue
                second = sec
                if timed and not since_b <= ts < until_b:
                    continue
                # Inline, because this is half of a busy log; the general
                # path does the same through _close (the tests compare them).
                try:
                    event = loads(line)
                    svc = event["service"]
                    duration = event["duration_ms"]
                    bytes_in = event["bytes_in"]
                    bytes_out = event["bytes_out"]
                    peer = event["peer"]
                    host, sep, _ = peer.rpartition(":")
                    reason = event["reason"]
                    if type(bytes_in) is not int or type(bytes_out) is not int:
                        raise TypeError
                    if not host or host[0] == "[" or ":" in host:  # not IPv4:port: the general rule
                        host = peer_ip(peer)
                        if not host:  # ":5", "[]:5": a port without an address
                            raise ValueError
                        sep = "" if host == peer else ":"  # "unix" or an IP
                    if service is not None and svc != service:
                        continue
                    stats = services.get(svc)
                    if stats is None:
                        stats = self._service(svc)
                    reasons = stats.reasons
                    seen = reasons.get(reason, 0)  # fails (unhashable) before any change
                    stats.durations.append(duration)  # fails (not a number) likewise
                except (ValueError, KeyError, TypeError, AttributeError):
                    skipped += 1
                    continue
                reasons[reason] = seen + 1
                stats.bytes_in += bytes_in
                stats.bytes_out += bytes_out
                if sep:
                    row = peers.get(host)
                    if row is None:
                        peers[host] = [1, 0, 0]
                    else:
                        row[0] += 1
                else:  # "unix": no address, no port
                    stats.unix_connections += 1
            elif head == OPEN_AT_42 and service is None and line[:15] == PREFIX:
                # Its timestamp and its count are all a conn.open adds.
                ts = line[15:42]
                sec = ts[:19]
                if ts.translate(ZEROS) != SHAPE or (sec != second and not is_key(ts)):
                    verdict = general(line)
                    skipped += verdict is None
                    continue
                second = sec
                if timed and not since_b <= ts < until_b:
                    continue
            else:
                verdict = general(line)
                if verdict is None:
                    skipped += 1
                elif verdict:
                    count += 1
                continue
            if ts < raw_first:
                raw_first = ts
            if ts > raw_last:
                raw_last = ts
            count += 1
        self.raw_first, self.raw_last, self.lines, self.skipped = raw_first, raw_last, count, skipped
        self.second = second

    def _general(self, line: bytes) -> bool | None:
        """Any line but evd's own conn.open and conn.close (and those when
        spelled otherwise, or conn.open under --service, or a journal
        entry): True if counted, False if not selected (or blank), None if
        it is not an event."""
        try:
            event = orjson.loads(line)
            if is_entry(event):  # a line of `journalctl -o json` (SPEC section 12)
                event = to_event(event)
            name = event["event"]
            stamp = event["timestamp"]
            if type(stamp) is not str or type(name) is not str:
                raise TypeError
        except (ValueError, KeyError, TypeError):
            self.overlong += line is OVERLONG
            return False if not line.strip() else None
        key = ts_key(stamp)
        if key is None:
            return None
        if self.timed and not self.since <= key < self.until:
            return False
        if self.service is not None and line_service(event) != self.service:
            return False
        if not (self._close(event) if name == "conn.close" else self._other(name, event)):
            return None
        if key < self.first:
            self.first = key
        if key > self.last:
            self.last = key
        return True

    def _close(self, event: Json) -> bool:
        """A conn.close as the fast path in `feed` counts it; False if it
        is malformed (then nothing of it is counted)."""
        svc = event.get("service")
        duration = event.get("duration_ms")
        peer = event.get("peer")
        reason = event.get("reason")
        bytes_in, bytes_out = event.get("bytes_in"), event.get("bytes_out")
        if (
            svc is None
            or not isinstance(duration, int | float)
            or type(bytes_in) is not int
            or type(bytes_out) is not int
            or type(peer) is not str
            or type(reason) is not str
        ):
            return False
        try:
            row = self._peer(peer)  # before anything is counted: it may refuse the line
            stats = self._service(svc)  # type: ignore[arg-type]
        except (TypeError, ValueError):  # unhashable; ":5"
            return False
        stats.durations.append(duration)
        add(stats.reasons, reason)
        stats.bytes_in += bytes_in
        stats.bytes_out += bytes_out
        if row is not None:
            row[0] += 1
        else:  # "unix": no address, no port
            stats.unix_connections += 1
        return True

    def presort(self) -> None:
        """Sort the kept durations (a worker does, so that the parent's final
        sort only merges sorted runs, which timsort does in one pass)."""
        for service in self.services.values():
            service.durations = array("d", sorted(service.durations))
        for command in self.commands.values():
            command.durations = array("d", sorted(command.durations))

    def merge(self, other: Summary) -> None:
        """Add what `other` (the same selection, other lines) counted."""
        self.lines += other.lines
        self.skipped += other.skipped
        self.overlong += other.overlong
        self.first, self.last = min(self.first, other.first), max(self.last, other.last)
        self.raw_first = min(self.raw_first, other.raw_first)
        self.raw_last = max(self.raw_last, other.raw_last)
        for name, service in other.services.items():
            self._service(name).merge(service)
        for ip, (connections, rejected, auth_failures) in other.peers.items():
            row = self.peers.setdefault(ip, [0, 0, 0])
            row[0] += connections
            row[1] += rejected
            row[2] += auth_failures
        for name, command in other.commands.items():
            self.commands.setdefault(name, CommandStats()).merge(command)
        merge_counts(self.errors, other.errors)
        merge_counts(self.reloads, other.reloads)
        self.starts += other.starts
        self.stops += other.stops

    def feed_tail(self, line: bytes) -> None:
        """A file's last line without its newline: a complete event (a file
        that just lacks the final newline) counts; half a line is skipped."""
        if not line.strip():
            return
        try:
            orjson.loads(line)
        except ValueError:
            self.skipped += 1
            self.overlong += line is OVERLONG
            return
        self.feed((line,))

    def _other(self, name: str, event: Json) -> bool:
        """Every event but conn.open/conn.close; False if it is malformed."""
        try:
            if name in ("conn.reject", "udp.drop", "tls.fail"):
                self._refusal(name, event)
            elif name == "auth.fail":
                row = self._peer(event["peer"])  # type: ignore[arg-type]
                if row is not None:
                    row[2] += 1
            elif name == "command.end":
                self._command(event)
            elif name == "error":
                add(self.errors, str(event.get("where", "?")))
            elif name == "config.reload":
                add(self.reloads, "ok" if event["ok"] is True else "failed")
            elif name == "daemon.start":
                self.starts += 1
            elif name == "daemon.stop":
                self.stops += 1
        except (KeyError, TypeError, AttributeError, ValueError):
            return False
        return True

    def _refusal(self, name: str, event: Json) -> None:
        """conn.reject, udp.drop, tls.fail: a throttled line stands for
        `count` refusals, the last of which came from its `peer`."""
        count = event.get("count", 1)
        reason = event["reason"]
        if type(count) is not int or type(reason) is not str:
            raise TypeError
        # The peer first: a line it refuses must leave nothing behind.
        row = self._peer(event["peer"]) if name == "conn.reject" else None  # type: ignore[arg-type]
        stats = self._service(event["service"])  # type: ignore[arg-type]
        if name == "udp.drop":
            add(stats.udp_drops, reason, count)
            return
        if name == "tls.fail":
            stats.tls_failures += count
            return
        add(stats.rejected, reason, count)
        if row is not None:
            row[1] += count

    def _command(self, event: Json) -> None:
        name = event["name"]
        duration = event["duration_ms"]
        if type(name) is not str or not isinstance(duration, int | float):
            raise TypeError
        stats = self.commands.get(name)
        if stats is None:
            stats = self.commands[name] = CommandStats()
        stats.runs += 1
        stats.durations.append(duration)
        add(stats.exit, exit_key(event.get("exit"), event.get("signal")))
        stats.timed_out += event.get("timed_out") is True
        stats.truncated += event.get("truncated") is True
        key = event.get("key")
        if isinstance(key, str):
            add(stats.keys, key)

    def top_peers(self, top: int) -> list[PeerJson]:
        """The `top` client IPs by connections (then rejects, auth failures,
        address), every one of them for `top` 0."""
        rows = sorted(self.peers.items(), key=lambda kv: (-kv[1][0], -kv[1][1], -kv[1][2], kv[0]))
        if top > 0:
            rows = rows[:top]
        return [{"peer": ip, "connections": c, "rejected": r, "auth_failures": a} for ip, (c, r, a) in rows]

    def to_json(self, top: int = 10) -> SummaryJson:
        """SPEC section 8's object, exactly."""
        first = min(self.first, self.raw_first.decode("latin-1").replace("\xff", NO_KEY))
        last = max(self.last, self.raw_last.decode("latin-1"))
        return {
            "lines": self.lines,
            "skipped": self.skipped,
            "first": first if self.lines else None,
            "last": last if self.lines else None,
            "services": {str(name): self.services[name].to_json() for name in sorted(self.services, key=str)},
            "peers": self.top_peers(top),
            "commands": {name: self.commands[name].to_json() for name in sorted(self.commands)},
            "errors": by_count(self.errors),
            "reloads": dict(self.reloads),
            "starts": self.starts,
            "stops": self.stops,
        }

    def extras(self) -> Extras:
        return {
            "overlong": self.overlong,
            "unix_connections": {
                str(k): v.unix_connections for k, v in self.services.items() if v.unix_connections
            },
            "tls_failures": {str(k): v.tls_failures for k, v in self.services.items() if v.tls_failures},
            "command_keys": {k: by_count(v.keys) for k, v in self.commands.items() if v.keys},
        }
