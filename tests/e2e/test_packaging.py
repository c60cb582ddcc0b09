"""The wheel is complete: built with `pip wheel`, installed into a fresh
virtualenv, it runs and carries what an installed evd prints itself (the
completion script and the manual pages: `evd man`, since a wheel cannot put
files where man(1) looks)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from support.daemon import ROOT

BUILD_TIMEOUT = 180.0  # seconds: an isolated build installs setuptools first


def build_wheel(out: Path) -> Path:
    # Without isolation when this environment can build (setuptools and
    # wheel present): the same backend, without downloading setuptools again.
    can_build = all(importlib.util.find_spec(m) for m in ("setuptools", "wheel"))
    isolation = ["--no-build-isolation"] if can_build else []
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
    )
    if built.returncode != 0 and (
        "No matching distribution" in built.stderr or "connection" in built.stderr.lower()
    ):
        pytest.skip(f"pip cannot build the wheel here (offline?): {built.stderr.strip()[-300:]}")
    assert built.returncode == 0, built.stderr
    (wheel,) = out.glob("evd-*.whl")
    return wheel


def test_the_wheel_installs_and_runs_in_a_fresh_virtualenv(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path / "dist")
    names = zipfile.ZipFile(wheel).namelist()
    assert "evd/default.toml" in names and not any(n.startswith("tests/") for n in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    # The dependencies come from this environment (read-only, through a .pth
    # file), so the test needs no index; evd itself only from the wheel.
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    site.mkdir(parents=True, exist_ok=True)
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    python = venv / "bin" / "python"
    installed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert installed.returncode == 0, installed.stderr
    evd = venv / "bin" / "evd"

    def run(*args: str) -> str:
        out = subprocess.run([str(evd), *args], capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        return out.stdout

    where = subprocess.run(
        [str(python), "-c", "import evd; print(evd.__file__)"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert where.stdout.startswith(str(venv)), (
        where.stdout + where.stderr
    )  # the wheel's evd, not the checkout's
    assert run("--version").startswith("evd ")
    assert "complete -o bashdefault -F _shtab_evd evd" in run("completion", "bash")
    page = run("man", "evd.toml")
    assert ".TH" in page and "shutdown_timeout" in page
    assert "check\\-config" in run("man", "evd")
