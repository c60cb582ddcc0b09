"""Drop-in files (SPEC section 11): merging, errors naming their file,
`check-config --origin`, and reloads that re-read the directory.  Loader
tests use real files in tmp_path; the reload test a real daemon
(tests/conftest.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BASE_CONFIG, ROOT, WAIT

from evd.core import loader
from evd.core.config import ConfigError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def main_file(tmp: Path, body: str = "", patterns: tuple[str, ...] = ("d/*.toml",)) -> Path:
    include = ", ".join(f'"{tmp}/{p}"' for p in patterns)
    return write(tmp / "evd.toml", f"include = [{include}]\n{body}")


def errors_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        loader.load_all(str(path))
    return info.value.errors


def evd_cli(*args: str, cwd: Path = ROOT, timeout: float = 3 * WAIT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "evd", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


# -- merging ------------------------------------------------------------------------


def test_lexical_order_later_wins_tables_merge_lists_replace(tmp_path):
    main = main_file(
        tmp_path,
        '[limits]\nrate = 5.0\nburst = 7\n[services.echo]\ntcp = ["127.0.0.1:7100", "127.0.0.1:7101"]\n',
    )
    # lexical, not numeric: "10-" < "50-" < "9-"
    write(tmp_path / "d/9-last.toml", "[limits]\nrate = 9.0\n")
    write(tmp_path / "d/50-middle.toml", "[limits]\nrate = 50.0\n[services.echo]\ntcp = []\n")
    write(tmp_path / "d/10-first.toml", '[limits]\nrate = 10.0\n[services.echo]\nudp = ["127.0.0.1:7102"]\n')
    loaded = loader.load_all(str(main))
    d = tmp_path / "d"
    assert loaded.files == (str(d / "10-first.toml"), str(d / "50-middle.toml"), str(d / "9-last.toml"))
    c = loaded.config
    assert c.limits.rate == 9.0  # the last file read wins
    assert c.limits.burst == 7  # a table merges key by key: the main file's burst stays
    echo = c.services["echo"]
    assert echo.tcp == ()  # a list is replaced, not appended to
    assert [str(a) for a in echo.udp] == ["127.0.0.1:7102"]
    assert loaded.origins.of("limits.rate") == str(d / "9-last.toml")
    assert loaded.origins.of("limits.burst") == str(main)
    assert loaded.origins.of("services.echo.tcp") == str(d / "50-middle.toml")
    assert loaded.origins.of("services.echo.rate") == str(d / "9-last.toml")  # [limits] in force for echo
    assert loaded.origins.of("limits.idle_timeout") is None  # the default


def test_patterns_in_order_duplicates_once_hidden_and_main_skipped(tmp_path):
    main = main_file(tmp_path, "", ("b/*.toml", "a/*.toml", "*/*.toml", "*.toml"))
    b = write(tmp_path / "b/z.toml", "[limits]\nrate = 1.0\n")
    a = write(tmp_path / "a/a.toml", "[limits]\nrate = 2.0\n")
    write(tmp_path / "a/.a.toml.swp", "not toml at all [")
    loaded = loader.load_all(str(main))
    # the patterns' order, then each pattern's matches in lexical order;
    # b/z.toml and a/a.toml matched again by "*/*.toml" are read once; the
    # main file matched by "*.toml" is not its own drop-in
    assert loaded.files == (str(b), str(a))
    assert loaded.config.limits.rate == 2.0


def test_pattern_matching_nothing_is_fine(tmp_path):
    main = main_file(tmp_path, "", ("nowhere/*.toml", "d/*.conf"))
    loaded = loader.load_all(str(main))
    assert loaded.files == () and loaded.config.services["echo"].enabled


def test_command_allow_list_from_every_file(tmp_path):
    main = main_file(tmp_path, '[commands.a]\nargv = ["true"]\n')
    write(tmp_path / "d/10.toml", '[commands.b]\nargv = ["false"]\n')
    write(tmp_path / "d/20.toml", "[commands.a]\nargs = true\n")
    commands = loader.load_all(str(main)).config.commands
    assert list(commands) == ["a", "b"]  # the union; the examples (uptime, greet) are not in it
    assert commands["a"].argv == ("true",) and commands["a"].args  # [commands.a] merged key by key


def test_example_commands_only_while_no_file_names_one(tmp_path):
    main = main_file(tmp_path)
    assert list(loader.load_all(str(main)).config.commands) == ["uptime", "greet"]
    write(tmp_path / "d/10.toml", '[commands.backup]\nargv = ["/usr/local/bin/backup"]\n')
    assert list(loader.load_all(str(main)).config.commands) == ["backup"]


def test_reread_globs_again(tmp_path):
    main = main_file(tmp_path)
    config = loader.load(str(main))
    assert not config.services["discard"].enabled
    dropped = write(tmp_path / "d/50-discard.toml", "[services.discard]\nenabled = true\n")
    assert loader.reread(config).services["discard"].enabled
    dropped.unlink()
    assert not loader.reread(config).services["discard"].enabled


# -- errors name their file -----------------------------------------------------------


def test_errors_name_the_drop_in(tmp_path):
    main = main_file(tmp_path, '[log]\nlevel = "loud"\n')
    one = write(tmp_path / "d/10.toml", "[services.echo]\nenabled = 1\n[limits]\nrate2 = 1\n")
    two = write(tmp_path / "d/20.toml", '[services.daytime]\ntcp = ["127.0.0.1:7007"]\n')
    assert errors_of(main) == [
        "log.level: must be one of debug, info, warning, error",  # the main file: plain KEY.PATH
        f"{one}: limits.rate2: unknown key",
        f"{one}: services.echo.enabled: expected a boolean, got integer",
        # a clash is the fault of the file that set the second address
        f"{two}: services.daytime.tcp[0]: tcp 127.0.0.1:7007 is already used by services.echo.tcp[0]",
    ]


def test_key_missing_in_a_file_is_blamed_on_the_table_it_completes(tmp_path):
    main = main_file(tmp_path)
    tls = write(tmp_path / "d/10.toml", '[services.echo]\ntls = ["127.0.0.1:7443"]\n')
    assert errors_of(main) == [
        f"{tls}: services.echo.tls_cert: required when tls is not empty",
        f"{tls}: services.echo.tls_key: required when tls is not empty",
    ]


def test_syntax_errors_with_line_and_column_from_every_file(tmp_path):
    main = main_file(tmp_path)
    one = write(tmp_path / "d/10.toml", "[services.echo]\nenabled = yes\n")
    two = write(tmp_path / "d/20.toml", "[limits\n")
    errors = errors_of(main)
    assert len(errors) == 2
    assert errors[0].startswith(f"{one}: TOML syntax error: ") and "(at line 2, column 11)" in errors[0]
    assert errors[1].startswith(f"{two}: TOML syntax error: ") and "line 1" in errors[1]


def test_a_file_that_cannot_be_read_is_an_error(tmp_path):
    main = main_file(tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "d/10-gone.toml").symlink_to(tmp_path / "nowhere.toml")
    (tmp_path / "d/20-dir.toml").mkdir()
    write(tmp_path / "d/30-latin1.toml", "").write_bytes(b'[log]\nfile = "/caf\xe9"\n')
    errors = errors_of(main)
    assert errors[0] == f"{tmp_path}/d/10-gone.toml: cannot read: [Errno 2] No such file or directory"
    assert errors[1] == f"{tmp_path}/d/20-dir.toml: cannot read: [Errno 21] Is a directory"
    assert errors[2].startswith(f"{tmp_path}/d/30-latin1.toml: not UTF-8")
    assert len(errors) == 3


def test_a_drop_in_may_not_include(tmp_path):
    main = main_file(tmp_path)
    nested = write(tmp_path / "d/10.toml", f'include = ["{tmp_path}/more/*.toml"]\n')
    assert errors_of(main) == [f"{nested}: include: only the main file may include drop-ins"]


def test_check_config_lists_drop_in_errors(tmp_path):
    main = main_file(tmp_path)
    bad = write(tmp_path / "d/10.toml", "[services.echo]\nenabled = 1\n")
    out = evd_cli("check-config", "-c", str(main))
    assert out.returncode == 78
    assert out.stderr == f"{bad}: services.echo.enabled: expected a boolean, got integer\n"


# -- check-config --origin ----------------------------------------------------------


def test_check_config_origin(tmp_path):
    main = main_file(tmp_path, "[limits]\nburst = 7\n")
    drop = write(tmp_path / "d/50-echo.toml", "[services.echo]\nenabled = false\nrate = 3.0\n")
    out = evd_cli("check-config", "--origin", "-c", str(main))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:2] == [f"# read: {main}", f"# read: {drop}"]
    assert f'include = ["{tmp_path}/d/*.toml"]  # from {main}' in lines
    assert f"burst = 7  # from {main}" in lines
    assert "max_connections = 1024  # default" in lines
    echo = lines[lines.index("[services.echo]") :]
    assert echo[1] == f"enabled = false  # from {drop}"
    assert f"rate = 3.0  # from {drop}" in echo
    assert f"burst = 7  # from {main}" in echo  # [limits] in force for echo
    assert 'argv = ["uptime"]  # default' in lines
    # every key line says where it came from
    keys = [line for line in lines if " = " in line and not line.startswith("#")]
    assert all("  # from " in line or line.endswith("  # default") for line in keys)
    # the annotated form is TOML too, and means the same configuration
    assert loader.parse(out.stdout, str(main)) == loader.load(str(main))
    # and the plain form is still the effective configuration, without comments
    plain = evd_cli("check-config", "-c", str(main))
    assert plain.returncode == 0 and "# " not in plain.stdout
    assert loader.parse(plain.stdout).services["echo"].limits.rate == 3.0


# -- a running daemon re-reads the directory -------------------------------------------


def test_sighup_picks_up_an_added_and_a_removed_drop_in(start_evd, tmp_path):
    config = f'include = ["{tmp_path}/evd.d/*.toml"]\n' + BASE_CONFIG
    evd = start_evd(config)
    off = write(tmp_path / "evd.d/50-echo.toml", "[services.echo]\nenabled = false\n")
    mark = len(evd.drain_events())
    evd.send(signal.SIGHUP)
    reload = evd.wait_for_since(mark, "config.reload")
    assert reload["ok"] is True and reload["changed"] == ["echo"]
    assert sorted(reload["removed"]) == sorted(
        ["echo tcp 127.0.0.1:0", "echo udp 127.0.0.1:0", f"echo unix {tmp_path}/echo.sock"]
    )
    off.unlink()
    mark = len(evd.drain_events())
    evd.send(signal.SIGHUP)
    reload = evd.wait_for_since(mark, "config.reload")
    assert reload["ok"] is True and reload["removed"] == []
    assert sorted(reload["added"]) == sorted(
        ["echo tcp 127.0.0.1:0", "echo udp 127.0.0.1:0", f"echo unix {tmp_path}/echo.sock"]
    )
    opened = evd.wait_for_since(mark, "listener.open", service="echo", proto="tcp")
    host, _, port = opened["address"].rpartition(":")
    with socket.create_connection((host, int(port)), timeout=WAIT) as sock:  # echo serves again
        sock.sendall(b"back\n")
        assert sock.recv(16) == b"back\n"
    # a broken drop-in: the reload fails naming the file, nothing changes
    bad = write(tmp_path / "evd.d/60-bad.toml", "[services.echo]\nenabled = 1\n")
    mark = len(evd.drain_events())
    evd.send(signal.SIGHUP)
    reload = evd.wait_for_since(mark, "config.reload")
    assert reload["ok"] is False
    assert reload["error"] == f"{bad}: services.echo.enabled: expected a boolean, got integer"
    assert evd.stop() == 0
