"""Reading a secret from a file: HMAC keys (`key_file`, `[keys.NAME] file`).

A key file is read at start, at every reload and by `evd check-config`, so
whatever the operator points it at must fail cleanly rather than hang or
crash: it is opened with O_NONBLOCK (a FIFO would otherwise block the open
until a writer comes -- and with it a running daemon's reload), and must
then be a regular file (checked on the open descriptor, so nothing can be
swapped in between).  The key is the file's bytes without trailing newlines;
a file of nothing else is refused as empty.  A server's key must not be
accessible by group or others: whoever can read it can run commands.
"""

from __future__ import annotations

import os
import stat

# A key is a short secret; anything bigger is not a key file.
MAX_SECRET = 65536


class SecretError(Exception):
    """The file cannot serve as a key; str() says why, naming the file."""


def read_secret(path: str, private: bool = True) -> bytes:
    """The key in `path`; SecretError if missing, not a regular file,
    accessible by group/others (when `private`), or empty."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise SecretError(f"{path}: cannot read: [Errno {exc.errno}] {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise SecretError(f"{path} is not a regular file")
        if private and mode & 0o077:
            raise SecretError(f"{path} is accessible by group/others (mode {mode & 0o777:04o}); chmod 600 it")
        data = os.read(fd, MAX_SECRET + 1)
    except OSError as exc:
        raise SecretError(f"{path}: cannot read: [Errno {exc.errno}] {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_SECRET:
        raise SecretError(f"{path} is larger than {MAX_SECRET} bytes: not a key")
    key = data.rstrip(b"\r\n")
    if not key:
        raise SecretError(f"{path} is empty")
    return key
