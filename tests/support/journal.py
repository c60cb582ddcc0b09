"""Shared by several test modules: a datagram socket in journald's place, and its entries parsed."""

from __future__ import annotations

import array
import contextlib
import fcntl
import os
import socket
import struct
from pathlib import Path

from support.daemon import WAIT


def parse(data: bytes) -> dict[str, list[bytes]]:
    """journald's native protocol, as journald reads it."""
    fields: dict[str, list[bytes]] = {}
    at = 0
    while at < len(data):
        end = data.index(b"\n", at)
        head = data[at:end]
        if b"=" in head:
            name, value = head.split(b"=", 1)
            at = end + 1
        else:
            name = head
            (size,) = struct.unpack("<Q", data[end + 1 : end + 9])
            value = data[end + 9 : end + 9 + size]
            assert data[end + 9 + size : end + 10 + size] == b"\n"
            at = end + 10 + size
        text = name.decode()
        assert text.isupper() or "_" in text, text
        assert len(name) <= 64 and not text.startswith("_")
        fields.setdefault(text, []).append(value)
    return fields


class FakeJournal:
    """A datagram socket where journald's would be."""

    def __init__(self, path: Path, rcvbuf: int | None = None):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind(str(path))
        self.memfds = 0

    def receive(self, timeout: float = WAIT) -> dict[str, list[bytes]]:
        self.sock.settimeout(timeout)
        data, ancdata, _flags, _addr = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(4))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                (fd,) = array.array("i", payload[:4])
                try:
                    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
                    assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SEAL  # journald demands it
                    data = os.pread(fd, os.fstat(fd).st_size, 0)
                finally:
                    os.close(fd)
                self.memfds += 1
        return parse(data)

    def all_now(self) -> list[dict[str, list[bytes]]]:
        entries = []
        with contextlib.suppress(BlockingIOError, TimeoutError):
            while True:
                entries.append(self.receive(timeout=0.05))
        return entries

    def close(self) -> None:
        self.sock.close()


def one(entry: dict[str, list[bytes]], name: str) -> str:
    (value,) = entry[name]
    return value.decode()
