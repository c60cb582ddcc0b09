"""A small blocking client for the framed protocol (used by `evd call`,
`evd status` and the tests).

It is deliberately simple: one socket with a timeout (TLS-wrapped when
given a context: the handshake, then the hello), the same sans-IO `Decoder`
the server uses, and one method per step of the protocol.
"""

from __future__ import annotations

import hmac
import socket
import ssl
from types import TracebackType
from typing import Any

from evd.config.addresses import dial
from evd.proto.framing import Decoder, Frame, encode

DEFAULT_TIMEOUT = 10.0
# Responses can be as large as a command's output cap plus a header; the
# client accepts what a default server may send.
CLIENT_MAX_HEADER = 1 << 20
CLIENT_MAX_BODY = 1 << 30


class ServerError(Exception):
    """The server answered `ok: false`."""

    def __init__(self, frame: Frame):
        error = frame.header.get("error") or {}
        self.frame = frame
        self.code = error.get("code", "unknown")
        self.message = error.get("message", "")
        super().__init__(f"{self.code}: {self.message}")


def tls_context(cafile: str | None = None, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """A client context: the server verified against `cafile` (default: the
    system's CAs) and its name or IP, TLS 1.2 at least; `cert` and `key`
    present a client certificate (mutual TLS)."""
    context = ssl.create_default_context(cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert:
        context.load_cert_chain(cert, key or None)
    return context


class Client:
    def __init__(
        self,
        address: str,
        timeout: float = DEFAULT_TIMEOUT,
        key: bytes | None = None,
        tls: ssl.SSLContext | None = None,
        key_name: str | None = None,
    ):
        family, sockaddr = dial(address)
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.decoder = Decoder(CLIENT_MAX_HEADER, CLIENT_MAX_BODY)
        try:
            self.sock.connect(sockaddr)
            if tls is not None:
                host = sockaddr if isinstance(sockaddr, str) else sockaddr[0]
                self.sock = tls.wrap_socket(self.sock, server_hostname=host)
            self.hello = self.recv().header
            # A client certificate may have authenticated the connection
            # already (mutual TLS: the hello names the key).
            if key is not None and self.hello.get("auth") == "hmac-sha256" and "key" not in self.hello:
                self.authenticate(key, key_name)
        except BaseException:
            self.sock.close()
            raise

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, header: dict[str, Any], body: bytes = b"") -> None:
        self.sock.sendall(encode(header, body))  # a client: blocking, under the socket timeout

    def recv(self) -> Frame:
        """The next frame; ConnectionError if the server closed first."""
        while True:
            frame = self.decoder.next_frame()
            if frame is not None:
                return frame
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the server closed the connection")
            self.decoder.feed(data)

    def call(self, svc: str, body: bytes = b"", **fields: Any) -> Frame:
        """One request and its response; ServerError if not ok."""
        self.send({"svc": svc, **fields}, body)
        frame = self.recv()
        if not frame.header.get("ok"):
            raise ServerError(frame)
        return frame

    def authenticate(self, key: bytes, name: str | None = None) -> None:
        """`auth` with the MAC of the hello's nonce; naming the key saves
        the server trying each (SPEC section 5)."""
        mac = hmac.new(key, bytes.fromhex(self.hello["nonce"]), "sha256").hexdigest()
        if name is None:
            self.call("auth", mac=mac)
        else:
            self.call("auth", mac=mac, key=name)
