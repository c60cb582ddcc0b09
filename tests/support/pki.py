"""Certificates for the TLS tests, made per test by trustme: a CA, server
certificates for 127.0.0.1, client certificates with a chosen CN, written
as PEM files (keys mode 0600, as evd requires) into the test's directory."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import trustme


def write_private(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT
    return path


class Pki:
    def __init__(self, directory: Path, name: str = "ca"):
        self.dir = directory
        self.ca = trustme.CA()
        self.cafile = directory / f"{name}.pem"
        self.ca.cert_pem.write_to_path(str(self.cafile))

    def server(self, name: str = "server") -> tuple[Path, Path]:
        """(certificate chain, key) for 127.0.0.1 and localhost."""
        leaf = self.ca.issue_cert("127.0.0.1", "localhost")
        return self._write(leaf, name)

    def client(self, cn: str, name: str | None = None) -> tuple[Path, Path]:
        """(certificate, key) of a client whose subject CN is `cn`."""
        leaf = self.ca.issue_cert(f"{cn}.clients.evd.test", common_name=cn)
        return self._write(leaf, name or f"client-{cn}")

    def _write(self, leaf: trustme.LeafCert, name: str) -> tuple[Path, Path]:
        cert = self.dir / f"{name}.pem"
        cert.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
        key = write_private(self.dir / f"{name}.key", leaf.private_key_pem.bytes())
        return cert, key

    def client_context(self, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
        """A client that trusts this CA (and presents `cert`, if given)."""
        context = ssl.create_default_context(cafile=str(self.cafile))
        if cert is not None:
            context.load_cert_chain(str(cert[0]), str(cert[1]))
        return context
