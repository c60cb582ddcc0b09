"""Certificates for the TLS loads, made at run time with trustme (evd's
test dependency, so it is in the benchmark's venv too): a throw-away CA and
a server certificate for 127.0.0.1, written to a directory the run owns."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class Certs:
    ca: Path  # the CA a client trusts
    cert: Path  # the server's certificate chain
    key: Path  # the server's private key (mode 0600: evd refuses anything laxer)


def make(directory: Path) -> Certs:
    """A CA and a 127.0.0.1 server certificate in `directory`, made once."""
    certs = Certs(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    if certs.ca.exists() and certs.cert.exists() and certs.key.exists():
        return certs
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(certs.ca))
    leaf.cert_chain_pems[0].write_to_path(str(certs.cert))
    for pem in leaf.cert_chain_pems[1:]:
        pem.write_to_path(str(certs.cert), append=True)
    fd = os.open(certs.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(leaf.private_key_pem.bytes())
    return certs
