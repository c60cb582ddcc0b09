"""What the configuration names on the machine (server/preflight.py): key
files and users, checked the same way by `run`, a reload and `check-config`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from evd.config.loader import parse
from evd.config.model import ConfigError
from evd.server import preflight

ROOT = Path(__file__).resolve().parents[2]


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        preflight.check(parse(text))
    return info.value.errors


def framed_key(path: Path) -> str:
    return f'[services.framed]\nkey_file = "{path}"\n'


def test_a_private_key_file_is_read_without_its_newline(tmp_path):
    key = tmp_path / "key"
    key.write_bytes(b"secret\r\n")
    key.chmod(0o600)
    assert preflight.check(parse(framed_key(key))).secrets == {"default": b"secret"}


def test_key_file_permissions(tmp_path):
    key = tmp_path / "key"
    key.write_text("secret\n")
    key.chmod(0o644)
    assert problems(framed_key(key)) == [
        f"services.framed.key_file: {key} is accessible by group/others (mode 0644); chmod 600 it"
    ]
    key.chmod(0o640)
    assert preflight.check(parse(framed_key(key) + "enabled = false\n")).secrets == {}  # framed off


def test_key_file_missing(tmp_path):
    missing = tmp_path / "nope"
    assert problems(framed_key(missing)) == [
        f"services.framed.key_file: {missing}: cannot read: [Errno 2] No such file or directory"
    ]


@pytest.mark.parametrize("content", [b"", b"\n", b"\n\n\r\n"])
def test_an_empty_key_file_is_refused(tmp_path, content):
    key = tmp_path / "key"
    key.write_bytes(content)
    key.chmod(0o600)
    assert problems(framed_key(key)) == [f"services.framed.key_file: {key} is empty"]


def test_a_directory_is_not_a_key_file(tmp_path):
    key = tmp_path / "keydir"
    key.mkdir(mode=0o700)
    assert problems(framed_key(key)) == [f"services.framed.key_file: {key} is not a regular file"]


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    """Opening a FIFO for reading blocks until a writer comes; the check
    must neither hang nor read from it (the test would time out)."""
    key = tmp_path / "keyfifo"
    os.mkfifo(key, 0o600)
    assert problems(framed_key(key)) == [f"services.framed.key_file: {key} is not a regular file"]


def test_unknown_user_and_group_are_listed_with_the_key_problem(tmp_path):
    missing = tmp_path / "nope"
    errors = problems(
        '[daemon]\nuser = "no-such-user-evd"\ngroup = "no-such-group-evd"\n' + framed_key(missing)
    )
    assert errors == [
        f"services.framed.key_file: {missing}: cannot read: [Errno 2] No such file or directory",
        'daemon.user: no such user "no-such-user-evd"',
        'daemon.group: no such group "no-such-group-evd"',
    ]


def test_named_key_files_are_checked_under_their_own_key(tmp_path):
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text("g\n")
    good.chmod(0o600)
    bad.write_text("b\n")
    bad.chmod(0o604)
    text = f'[keys.ops]\nfile = "{good}"\n[keys.ci]\nfile = "{bad}"\n'
    assert problems(text) == [f"keys.ci.file: {bad} is accessible by group/others (mode 0604); chmod 600 it"]
    bad.chmod(0o600)
    assert preflight.check(parse(text)).secrets == {"ops": b"g", "ci": b"b"}


@pytest.mark.parametrize(
    "setup, expected",
    [
        ('[daemon]\nuser = "no-such-user-evd"\n', 'daemon.user: no such user "no-such-user-evd"'),
        ("EMPTYKEY", "is empty"),
        ("DIRKEY", "is not a regular file"),
    ],
)
def test_check_config_refuses_what_run_refuses(tmp_path, setup, expected):
    """`evd check-config` exits 78 on everything `evd run` exits 78 on."""
    key = tmp_path / "k"
    if setup == "EMPTYKEY":
        key.write_text("\n")
        key.chmod(0o600)
        setup = framed_key(key)
    elif setup == "DIRKEY":
        key.mkdir(mode=0o700)
        setup = framed_key(key)
    path = tmp_path / "evd.toml"
    path.write_text(f'[daemon]\npidfile = "{tmp_path}/evd.pid"\n' + setup.replace("[daemon]\n", ""))
    for command in ("check-config", "run"):
        out = subprocess.run(
            [sys.executable, "-m", "evd", command, "-c", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
        )
        assert out.returncode == 78, (command, out.stderr)
        assert expected in out.stderr, (command, out.stderr)
