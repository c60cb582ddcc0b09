"""`evd completion bash|zsh`: the scripts parse in their shells, and bash
completes through the real functions the script defines, with the real
`evd` answering for the values it looks up at TAB time."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.daemon import WAIT

BIN = Path(sys.executable).parent  # the virtualenv's bin/, where `evd` is
BASH_COMPLETION = Path("/usr/share/bash-completion/bash_completion")

# Drives the script as bash does on TAB: COMP_WORDS/COMP_CWORD set, the
# function that `complete -F` names called, COMPREPLY printed.
DRIVER = """
[ -r {bash_completion} ] && source {bash_completion}
source {script}
function_name=$(complete -p evd | sed -E 's/.* -F ([^ ]+) .*/\\1/')
for line in "$@"; do
  read -r -a COMP_WORDS <<< "$line"
  case "$line" in *" ") COMP_WORDS+=("") ;; esac
  COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
  COMP_LINE="$line"; COMP_POINT=${{#line}}
  COMPREPLY=()
  "$function_name" evd "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
  echo "${{COMPREPLY[*]}}"
done
"""


def script(shell: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "evd", "completion", shell], capture_output=True, text=True, timeout=WAIT
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}", **extra}


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_the_script_parses_in_its_shell(shell: str, tmp_path: Path) -> None:
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed (Debian: {shell})")
    path = tmp_path / f"evd.{shell}"
    path.write_text(script(shell))
    check = subprocess.run([shell, "-n", str(path)], capture_output=True, text=True, timeout=WAIT)
    assert check.returncode == 0, check.stderr


def complete(tmp_path: Path, *lines: str, **extra: str) -> list[list[str]]:
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    if not (BIN / "evd").exists():
        pytest.skip(f"no evd console script in {BIN} (pip install -e . first)")
    path = tmp_path / "evd.bash"
    path.write_text(script("bash"))
    driver = tmp_path / "driver.sh"
    driver.write_text(DRIVER.format(bash_completion=BASH_COMPLETION, script=path))
    out = subprocess.run(
        ["bash", str(driver), *lines], capture_output=True, text=True, timeout=3 * WAIT, env=env(**extra)
    )
    assert out.returncode == 0, out.stderr
    answers = out.stdout.splitlines()
    assert len(answers) == len(lines), out.stdout + out.stderr
    return [sorted(a.split()) for a in answers]


def test_bash_completes_subcommands_ctl_commands_and_choices(tmp_path: Path) -> None:
    ct, ctl, ctl_json, log_format, call = complete(
        tmp_path, "evd ct", "evd ctl ", "evd ctl --json ", "evd run --log-format ", "evd call "
    )
    assert ct == ["ctl"]
    commands = sorted(["info", "services", "conns", "sources", "kill", "disable", "enable", "set", "reload"])
    assert ctl == commands and ctl_json == commands
    assert log_format == ["console", "journal", "json"]
    assert call == ["command", "echo", "stats", "time"]


def test_bash_completes_service_names_from_the_configuration(tmp_path: Path) -> None:
    config = tmp_path / "evd.toml"
    config.write_text("[services.echo]\nenabled = false\n")
    enable, ctl_disable, ctl_disable_ec, event = complete(
        tmp_path, "evd enable ", "evd ctl disable ", "evd ctl disable ec", "evd logs show --event conn.c",
        EVD_CONFIG=str(config),
    )  # fmt: skip
    services = sorted(
        ["echo", "discard", "chargen", "daytime", "time", "timefmt", "framed", "command", "stats"]
    )
    assert set(services) <= set(enable) and set(services) <= set(ctl_disable)
    assert ctl_disable_ec == ["echo"]
    assert event == ["conn.close"]


def test_a_broken_configuration_completes_nothing_and_says_nothing(tmp_path: Path) -> None:
    config = tmp_path / "evd.toml"
    config.write_text("[services.echo\n")
    out = subprocess.run(
        [sys.executable, "-m", "evd", "completion", "--values", "services"],
        capture_output=True,
        text=True,
        timeout=WAIT,
        env=env(EVD_CONFIG=str(config)),
    )
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")
    (enable,) = complete(tmp_path, "evd enable ", EVD_CONFIG=str(config))
    assert "echo" not in enable
