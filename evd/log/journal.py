"""journald's native protocol: one event, one datagram.

An entry is a list of fields, each `NAME=value\\n`, or, when the value holds a
newline, `NAME\\n`, the value's length as 64-bit little-endian, the value and
`\\n` (systemd's `sd_journal_sendv` writes the same).  Field names are upper
case letters, digits and underscores, at most 64 bytes, not starting with an
underscore (those are journald's trusted fields).

An entry too large for one datagram goes as a sealed memfd passed with
SCM_RIGHTS in an empty datagram: journald reads the entry from it.

The socket is our own (never inherited), so it is non-blocking; a journal
that does not keep up answers EAGAIN, and the sink (log/sink.py) keeps the
entry and watches the socket for writability -- the socket is connected, so
the kernel reports writable once journald's queue has room again.

A journal that is not there (journald stopped or restarting: the socket
missing, or refusing) never stops evd (SPEC section 12): the target starts
unconnected, every write fails with OSError, and the sink keeps the
entries (up to log.buffer, the rest counted) and tries again every second;
each try connects afresh, so the first one after journald is back delivers.
`problem` says why the first connection failed, for the one warning line.
"""

from __future__ import annotations

import array
import errno
import fcntl
import json
import os
import re
import socket
import struct
from collections.abc import Mapping
from typing import Any

PRIORITY = {"debug": "7", "info": "6", "warning": "4", "error": "3", "critical": "2"}
_NAME_MAX = 64
_NOT_NAME = re.compile(r"[^A-Z0-9_]")
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
# Too large for a datagram: the memfd way (sd_journal_sendv's list).
_TOO_BIG = {errno.EMSGSIZE, errno.ENOBUFS}
# journald went away or restarted: a fresh socket may reach the new one.
_RECONNECT = {errno.ECONNREFUSED, errno.ENOTCONN, errno.ENOENT, errno.EBADF}

_names: dict[str, str] = {}
_json = json.JSONEncoder(default=repr, ensure_ascii=False).encode


def field_name(key: str) -> str:
    """`EVD_` + the key in upper case, anything else an underscore."""
    name = _names.get(key)
    if name is None:
        name = _names[key] = ("EVD_" + _NOT_NAME.sub("_", key.upper()))[:_NAME_MAX]
    return name


_INF = float("inf")
# What the console line shows of an event: the rest is in the journal's
# own fields (PRIORITY, _PID, the entry's time).
_NOT_SHOWN = frozenset({"timestamp", "level", "event", "pid"})


def text(value: Any) -> str:
    """Strings as they are, everything else as JSON."""
    kind = type(value)
    if isinstance(value, str):  # close reasons are a StrEnum: their text, not JSON
        return str(value)
    if kind is int:
        return int.__repr__(value)
    if kind is float and -_INF < value < _INF:
        return float.__repr__(value)
    return _json(value)


def _plain(string: str) -> bool:
    """Shown as it is after `key=` (else JSON-quoted, as a console would)."""
    return bool(string) and not (
        " " in string or '"' in string or "'" in string or "=" in string or "\t" in string
    )


def _bytes(string: str) -> bytes:
    try:
        return string.encode()
    except UnicodeEncodeError:  # a lone surrogate: its escape, never a lost entry
        return string.encode("utf-8", "backslashreplace")


def _binary_field(name: str, value: str) -> bytes:
    data = _bytes(value)
    return name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"


def message(event_dict: Mapping[str, Any]) -> str:
    """An event for a person: `EVENT key=value ...` in the order logged,
    strings quoted only when they must be, a value of several lines (a
    traceback) below.  The console format prints this after the timestamp
    and level; a journal entry's MESSAGE is this, journald keeping the time,
    priority and pid itself."""
    words = [str(event_dict.get("event"))]
    below = []
    for key, value in event_dict.items():
        if key in _NOT_SHOWN:
            continue
        string = text(value)
        if "\n" in string:
            below.append(string)
        elif type(value) is not str or _plain(string):
            words.append(f"{key}={string}")
        else:
            words.append(f"{key}={_json(string)}")
    return "\n".join([" ".join(words), *below])


def entry(event_dict: Mapping[str, Any]) -> bytes:
    """The datagram for one event: MESSAGE (see `message`), PRIORITY,
    SYSLOG_IDENTIFIER, then every key of the event as EVD_KEY."""
    level = event_dict.get("level")
    lines = [
        "",  # MESSAGE, once the fields are known
        "PRIORITY=" + PRIORITY.get(level if type(level) is str else "", "6"),
        "SYSLOG_IDENTIFIER=evd",
    ]
    several = []  # (name, value) of values with a newline: the binary-safe form
    for key, value in event_dict.items():
        string = text(value)
        name = _names.get(key) or field_name(key)
        if "\n" in string:
            several.append((name, string))
        else:
            lines.append(f"{name}={string}")
    shown = message(event_dict)
    if "\n" in shown:
        several.insert(0, ("MESSAGE", shown))
        del lines[0]
    else:
        lines[0] = "MESSAGE=" + shown
    data = _bytes("\n".join(lines) + "\n")
    return data + b"".join(_binary_field(name, value) for name, value in several) if several else data


class JournalTarget:
    """The sink's target for format = journal: a datagram socket connected
    to `log.journal_socket`."""

    datagram = True
    chunk = 0  # unused: one entry per send
    path = ""  # not a file: nothing for launch to keep across detaching

    def __init__(self, socket_path: str):
        self.socket_path = socket_path
        self.problem = ""  # why the journal could not be reached at start
        self._sock: socket.socket | None = None
        self._identity: tuple[int, int] | None = None
        try:
            self._sock = self._connect()
        except OSError as exc:
            self.problem = f"[Errno {exc.errno}] {exc.strerror}"
        else:
            self._identity = identity(self._sock.fileno())

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            sock.connect(self.socket_path)
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, exc.strerror, self.socket_path) from None
        return sock

    @property
    def fd(self) -> int | None:
        # Unconnected: nothing to watch, the sink retries on a timer.
        return None if self._sock is None else self._sock.fileno()

    def write(self, data: bytes) -> int:
        if self._sock is not None:
            try:
                return self._send(self._sock, data)
            except OSError as exc:
                if exc.errno not in _RECONNECT:
                    raise
        self.reopen()
        assert self._sock is not None
        return self._send(self._sock, data)

    def _send(self, sock: socket.socket, data: bytes) -> int:
        try:
            sock.send(data)
        except OSError as exc:
            if exc.errno not in _TOO_BIG:
                raise
            self._send_memfd(sock, data)
        return len(data)

    def _send_memfd(self, sock: socket.socket, data: bytes) -> None:
        fd = os.memfd_create("evd-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(data)
            while view:  # memory, not a disk: never waits
                view = view[os.write(fd, view) :]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        finally:
            os.close(fd)

    def reopen(self) -> str | None:
        """A fresh socket (journald restarted); OSError if it cannot connect."""
        sock = self._connect()
        if self._sock is not None:
            self._sock.close()
        self._sock = sock
        self._identity = identity(sock.fileno())
        return None

    def after_fork(self) -> None:
        """Still our socket?  `evd start` detaching closes every descriptor
        it was not told to keep, and the number may be someone else's now."""
        if self._sock is not None and identity(self._sock.fileno()) != self._identity:
            self._sock.detach()  # not ours any more: never close it
            self._sock = None
            self._sock = self._connect()
            self._identity = identity(self._sock.fileno())

    def isatty(self) -> bool:
        return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()


def identity(fd: int) -> tuple[int, int] | None:
    """The file a descriptor is (device, inode): after a fork, a sink checks
    its descriptor is still the one it opened.  None if closed."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino
