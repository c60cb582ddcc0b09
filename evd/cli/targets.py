"""Where a client command dials, found in the configuration: the first
framed listener (`evd call`, `evd status`), the echo listener (`evd bench`),
and the key a client may read to authenticate."""

from __future__ import annotations

from evd.config.addresses import dialable
from evd.config.model import Config
from evd.system.secrets import SecretError, read_secret


def framed_address(config: Config, tls: bool = False) -> str | None:
    """The first framed listener (TCP, else UNIX; with `tls`, the first
    TLS one), as a client dials it."""
    framed = config.services["framed"]
    listed = framed.tls if tls else framed.tcp + framed.unix
    return dialable(listed[0]) if listed else None


def status_address(config: Config) -> str | None:
    """Where `evd status` asks for figures: the first framed listener whose
    address is known without asking the daemon (port 0 is not)."""
    framed = config.services["framed"]
    if not framed.enabled or not config.services["stats"].enabled:
        return None
    known = [a for a in framed.tcp + framed.unix if a.proto == "unix" or a.port]
    return dialable(known[0]) if known else None


def echo_address(config: Config, udp: bool, tls: bool = False) -> str | None:
    echo = config.services["echo"]
    listed = echo.udp if udp else echo.tls if tls else echo.tcp + echo.unix
    return dialable(listed[0]) if echo.enabled and listed else None


def server_key(config: Config) -> bytes | None:
    """The server's key_file, if this user may read it; else go without
    (the server then refuses what needs authentication, and says so)."""
    path = config.services["framed"].key_file
    if not path:
        return None
    try:
        return read_secret(path, private=False)
    except SecretError:
        return None
