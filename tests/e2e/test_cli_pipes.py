"""Every command's stdout may be a pipe whose reader has left
(`evd ctl services | head -3`): the command ends quietly, without a
BrokenPipeError traceback (issue 23, item 8).  The pipe's read end is
closed before the command starts, so its first write fails: no race."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from support.ctl import CONFIG
from support.daemon import ROOT, WAIT


def into_a_closed_pipe(*args: str) -> subprocess.CompletedProcess[str]:
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", "evd", *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=3 * WAIT,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
        )
    finally:
        os.close(write_end)


def test_ctl_into_a_closed_pipe(start_evd):
    evd = start_evd(CONFIG)
    for words in (["services"], ["info"], ["conns", "--json"]):
        out = into_a_closed_pipe("ctl", "-c", str(evd.config_path), *words)
        assert out.returncode == 0 and out.stderr == "", (words, out.stderr)
    assert evd.stop() == 0


@pytest.mark.parametrize("args", [("check-config",), ("explain", "echo")])
def test_offline_commands_into_a_closed_pipe(tmp_path, args):
    config = tmp_path / "evd.toml"
    config.write_text(CONFIG.format(tmp=tmp_path))
    out = into_a_closed_pipe(*args, "-c", str(config))
    assert out.returncode == 0 and out.stderr == "", out.stderr


def test_a_socket_error_is_not_taken_for_a_closed_stdout(monkeypatch, capsys):
    """Only stdout's own broken pipe is hidden: any other is still a bug."""
    from evd import cli

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli.ctl, "cmd_ctl", broken)
    monkeypatch.setattr(cli.failures, "stdout_closed", lambda: False)
    with pytest.raises(BrokenPipeError):
        cli.main(["ctl", "--socket", "/nonexistent", "info"])
