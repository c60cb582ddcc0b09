"""The failures fail2ban must find, made by real clients against a real evd:
one configuration and the clients that fail, shared by the JSON-file test
(tests/e2e/test_logs_fail2ban.py) and the journal test
(tests/e2e/test_logs_journal.py), so both filters are judged on the same
events.  Addresses are as evd logs them: "HOST:PORT" or "[V6]:PORT"."""

from __future__ import annotations

import hmac
import socket

import pytest

from evd.tools.client import Client, ServerError
from support.daemon import WAIT

BANNING = ("access", "rate", "per_source", "banned")  # the rejects the filters count

# Echo refuses everyone (only_from), discard is full after one connection
# (max_connections: not the client's doing), framed has a key to get wrong.
# Each test adds its own [daemon] and [log] tables and the other services.
SERVICES = """\
[limits]
rate = 0.0
auth_ban = 60.0

[services.echo]
tcp = ["127.0.0.1:0", "[::1]:0"]
udp = []
only_from = ["10.0.0.0/8"]

[services.discard]
enabled = true
tcp = ["127.0.0.1:0"]
udp = []
max_connections = 1

[services.framed]
tcp = ["127.0.0.1:0", "[::1]:0"]
key_file = "{tmp}/key"
"""


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


def wrong_auth(address: str, times: int) -> None:
    """`times` failed `auth` on one connection (three: closed and banned)."""
    with Client(address, timeout=WAIT) as client:
        for _ in range(times):
            with pytest.raises(ServerError):
                client.call("auth", mac=hmac.new(b"wrong", b"nonce", "sha256").hexdigest())


def dial(address: str) -> tuple[str, int]:
    """("::1", 7007) for "[::1]:7007": what socket.create_connection takes."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def refused(address: str) -> None:
    """Connect and read until evd closes (a refusal, or a one-shot answer)."""
    with socket.create_connection(dial(address), timeout=WAIT) as sock:
        while sock.recv(4096):
            pass
