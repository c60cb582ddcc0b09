"""The benchmark's own virtualenv, bench/.venv: evd (editable, from
this checkout, with its test extra: attacks.py drives evd with the tests'
harness) plus requirements.txt (the peers, the plot).  The bench
scripts re-execute themselves in it, so `python3 bench/SCRIPT.py`
works on a fresh machine and the peers never become evd's dependencies."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENV = HERE / ".venv"
VENV_PY = VENV / "bin" / "python"

# The built-in services a single-service benchmark turns off (echo is on by
# default and each script configures it; discard and chargen are off).
OTHERS_OFF = """\
[services.daytime]
enabled = false
[services.time]
enabled = false
[services.timefmt]
enabled = false
[services.framed]
enabled = false
"""


def free_port() -> int:
    """A loopback TCP port nothing listens on now (for a server that cannot
    be given port 0: a peer, or a configuration written before the start).
    SO_REUSEADDR, as the servers bind: after a connect-mode run every
    ephemeral port may be in TIME_WAIT, which a plain bind refuses."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ensure_venv(script: str) -> None:
    """Re-run `script` inside bench/.venv, creating it if needed."""
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    stamp = VENV / ".installed"
    evd = f"{ROOT}[test]"
    want = hashlib.sha256(
        (HERE / "requirements.txt").read_bytes() + (ROOT / "pyproject.toml").read_bytes() + evd.encode()
    ).hexdigest()
    if not VENV_PY.exists() or not stamp.exists() or stamp.read_text() != want:
        print(
            f"bench: setting up {VENV.relative_to(ROOT)} (evd + {HERE.name}/requirements.txt)",
            file=sys.stderr,
        )
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, timeout=300)
        subprocess.run(
            [str(VENV_PY), "-m", "pip", "install", "-q", "-e", evd, "-r", str(HERE / "requirements.txt")],
            check=True,
            timeout=900,
        )
        stamp.write_text(want)
    os.execv(str(VENV_PY), [str(VENV_PY), str(Path(script).resolve()), *sys.argv[1:]])
