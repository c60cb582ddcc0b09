"""A TLS service's certificate, key and client CA, read into a server context.

`server_context` is what preflight calls for every service with `tls`
listeners, at start, at every reload (SIGHUP is how certificates rotate)
and in `evd check-config`.  Whatever the operator points these keys at must
fail cleanly and name the key at fault, never hang or prompt:

- every file is first opened with O_NONBLOCK and must be a regular file (a
  FIFO would block OpenSSL's own open, and with it a running daemon's
  reload), then loaded by OpenSSL from its path;
- the private key follows the HMAC key files' rules (system/secrets.py):
  not accessible by group or others;
- an encrypted key is refused rather than prompted for: OpenSSL's default
  is to ask for the pass phrase on the terminal, which would stop a daemon
  (or a reload) for good;
- the certificate is parsed on its own first, so that a broken certificate
  and a broken or mismatched key are told apart (OpenSSL's error for both
  is "PEM lib").

The context allows TLS 1.2 and 1.3 only and refuses renegotiation (a
client-initiated renegotiation costs the server a handshake per request).
With a client CA it requires a client certificate that the CA verifies.
"""

from __future__ import annotations

import os
import ssl
import stat

from evd.system.secrets import SecretError, read_secret


class CertificateError(Exception):
    """The files cannot serve; `key` is the configuration key at fault
    ("tls_cert", "tls_key" or "tls_client_ca"), str() says why."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


class _Encrypted(Exception):
    """Raised by the pass phrase callback: the key is encrypted."""


def _no_pass_phrase() -> bytes:
    raise _Encrypted


def _why(exc: ssl.SSLError) -> str:
    """OpenSSL's reason in words ("key values mismatch"), without the
    source location CPython appends."""
    text = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
    return text.split(" (_ssl.c")[0]


def _check_file(key: str, path: str) -> None:
    """`path` can be opened without blocking and is a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise CertificateError(key, f"{path}: cannot read: [Errno {exc.errno}] {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CertificateError(key, f"{path} is not a regular file")
    finally:
        os.close(fd)


def server_context(cert: str, key: str, client_ca: str = "") -> ssl.SSLContext:
    """A server context for `cert` (PEM chain) and `key` (PEM private key),
    requiring client certificates verified by `client_ca` when given;
    CertificateError naming the key at fault otherwise."""
    _check_file("tls_cert", cert)
    try:
        read_secret(key)  # regular, private, not empty
    except SecretError as exc:
        raise CertificateError("tls_key", str(exc)) from None
    try:
        # Parsed alone first: the certificate's own errors are its own.
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile=cert)
    except ssl.SSLError as exc:
        raise CertificateError("tls_cert", f"{cert}: no usable PEM certificate ({_why(exc)})") from None
    except OSError as exc:  # gone since the check
        raise CertificateError("tls_cert", f"{cert}: cannot read: {exc.strerror}") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION
    try:
        context.load_cert_chain(cert, key, password=_no_pass_phrase)
    except _Encrypted:
        raise CertificateError("tls_key", f"{key} is encrypted; evd needs it without a pass phrase") from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise CertificateError("tls_key", f"{key} does not match the certificate {cert}") from None
        raise CertificateError("tls_key", f"{key}: no usable PEM private key ({_why(exc)})") from None
    except OSError as exc:
        raise CertificateError("tls_key", f"{key}: cannot read: {exc.strerror}") from None
    if client_ca:
        _check_file("tls_client_ca", client_ca)
        try:
            context.load_verify_locations(cafile=client_ca)
        except ssl.SSLError as exc:
            raise CertificateError(
                "tls_client_ca", f"{client_ca}: no usable PEM CA certificate ({_why(exc)})"
            ) from None
        except OSError as exc:
            raise CertificateError("tls_client_ca", f"{client_ca}: cannot read: {exc.strerror}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context
