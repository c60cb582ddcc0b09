"""Drop-in files (SPEC section 11): merging, errors naming their file,
`check-config --origin`, reloads that re-read the directory, and
`evd enable/disable [--now]`.  Loader tests use real files in tmp_path; the
reload and `--now` tests a real daemon (tests/conftest.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support.daemon import BASE_CONFIG, ROOT, WAIT, logged_config

from evd.config import loader
from evd.config.model import EMBEDDED_SOURCE, ConfigError
from evd.tools import dropin


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


def test_a_clash_with_a_default_is_blamed_on_the_file_that_caused_it(tmp_path):
    """The validator reports the clash at daytime's (default) address; the
    file to blame is the one that put chargen there, not the last one
    that happened to touch some other service."""
    main = main_file(tmp_path, "[services.daytime]\nudp = []\n")
    chargen = write(tmp_path / "d/10.toml", '[services.chargen]\nenabled = true\ntcp = ["127.0.0.1:7013"]\n')
    write(tmp_path / "d/20.toml", "[services.echo]\nrate = 1.0\n")
    assert errors_of(main) == [
        f"{chargen}: services.daytime.tcp[0]: tcp 127.0.0.1:7013 is already used by services.chargen.tcp[0]"
    ]


def test_an_error_in_no_file_is_not_blamed_on_one(tmp_path):
    """daytime's table is in no file; that 20.toml touched [services]
    (for echo) says nothing about daytime: no file is named."""
    main = main_file(tmp_path)
    write(tmp_path / "d/20.toml", "[services.echo]\nrate = 1.0\n")
    origins = loader.load_all(str(main)).origins
    assert origins.blame("services.daytime.tls_cert: x") == "services.daytime.tls_cert: x"


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


# -- evd enable / disable ---------------------------------------------------------------


def test_enable_and_disable_write_the_drop_in(tmp_path):
    main = main_file(tmp_path)
    out = evd_cli("enable", "discard", "-c", str(main))
    target = tmp_path / "d/50-discard.toml"
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"discard enabled: wrote {target}\n"
    assert target.read_text() == "[services.discard]\nenabled = true\n"
    assert target.stat().st_mode & 0o777 == 0o644
    assert loader.load(str(main)).services["discard"].enabled
    out = evd_cli("disable", "discard", "-c", str(main))
    assert out.returncode == 0, out.stderr
    assert target.read_text() == "[services.discard]\nenabled = false\n"
    assert not loader.load(str(main)).services["discard"].enabled
    assert sorted(os.listdir(tmp_path / "d")) == ["50-discard.toml"]  # no temporary file left


def test_enable_twice_is_harmless(tmp_path):
    main = main_file(tmp_path)
    assert evd_cli("enable", "discard", "-c", str(main)).returncode == 0
    target = tmp_path / "d/50-discard.toml"
    before = target.stat()
    out = evd_cli("enable", "discard", "-c", str(main))
    assert out.returncode == 0 and out.stdout == f"discard enabled already ({target} unchanged)\n"
    after = target.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_enable_creates_the_directory(tmp_path):
    main = main_file(tmp_path, "", ("evd.d/*.toml",))
    out = evd_cli("enable", "chargen", "-c", str(main))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "evd.d/50-chargen.toml").read_text() == "[services.chargen]\nenabled = true\n"


def test_enable_refuses_an_invalid_result_and_writes_nothing(tmp_path):
    # discard would listen where echo already does: valid while discard is off
    main = main_file(tmp_path, '[services.discard]\ntcp = ["127.0.0.1:7007"]\nudp = []\n')
    out = evd_cli("enable", "discard", "-c", str(main))
    assert out.returncode == 78
    assert out.stderr == (
        "services.discard.tcp[0]: tcp 127.0.0.1:7007 is already used by services.echo.tcp[0]\n"
        "evd: nothing written: the configuration would be invalid\n"
    )
    assert not (tmp_path / "d").exists()
    # an existing file is left as it was
    existing = write(tmp_path / "d/50-discard.toml", "[services.discard]\nenabled = false\n")
    assert evd_cli("enable", "discard", "-c", str(main)).returncode == 78
    assert existing.read_text() == "[services.discard]\nenabled = false\n"
    assert sorted(os.listdir(tmp_path / "d")) == ["50-discard.toml"]


def test_enable_is_as_strict_as_run(tmp_path):
    """A key file `run` would refuse makes the result invalid too (preflight)."""
    key = write(tmp_path / "framed.key", "secret")
    key.chmod(0o644)
    main = main_file(tmp_path, f'[services.framed]\nkey_file = "{key}"\n')
    out = evd_cli("enable", "discard", "-c", str(main))
    assert out.returncode == 78 and out.stderr.startswith("services.framed.key_file: ")
    assert not (tmp_path / "d").exists()
    # set in a drop-in, the error names it
    main = main_file(tmp_path)
    framed = write(tmp_path / "d/20-framed.toml", f'[services.framed]\nkey_file = "{key}"\n')
    out = evd_cli("enable", "discard", "-c", str(main))
    assert out.returncode == 78 and out.stderr.startswith(f"{framed}: services.framed.key_file: ")
    assert sorted(os.listdir(tmp_path / "d")) == ["20-framed.toml"]


def test_enable_replaces_a_broken_drop_in_of_its_own(tmp_path):
    """The result is what counts: a bad 50-echo.toml is fixed by replacing it."""
    main = main_file(tmp_path)
    broken = write(tmp_path / "d/50-echo.toml", "[services.echo]\nenabled = maybe\n")
    assert evd_cli("check-config", "-c", str(main)).returncode == 78
    out = evd_cli("enable", "echo", "-c", str(main))
    assert out.returncode == 0, out.stderr
    assert broken.read_text() == "[services.echo]\nenabled = true\n"


def test_enable_without_include(tmp_path):
    main = write(tmp_path / "evd.toml", "[limits]\nrate = 1.0\n")
    out = evd_cli("enable", "discard", "-c", str(main))
    assert out.returncode == 1
    assert out.stderr.startswith(f"evd: {main} has no include: add one")
    assert sorted(os.listdir(tmp_path)) == ["evd.toml"]
    with pytest.raises(dropin.SwitchError, match=r"^the embedded default configuration has no include"):
        dropin.target((), EMBEDDED_SOURCE, "echo")


def test_enable_unknown_service_is_a_configuration_error(tmp_path):
    main = main_file(tmp_path)
    out = evd_cli("enable", "../../etc/passwd", "-c", str(main))
    assert out.returncode == 78
    assert out.stderr.startswith("services.../../etc/passwd: unknown service (known: echo, ")
    assert not (tmp_path / "d").exists()


def test_enable_refused_when_a_later_drop_in_decides(tmp_path):
    main = main_file(tmp_path)
    local = write(tmp_path / "d/90-local.toml", "[services.discard]\nenabled = false\n")
    out = evd_cli("enable", "discard", "-c", str(main))
    assert out.returncode == 1
    assert out.stderr == (
        f"evd: {local} sets services.discard.enabled and is read after "
        f"{tmp_path}/d/50-discard.toml: change it there\n"
    )
    assert sorted(os.listdir(tmp_path / "d")) == ["90-local.toml"]


def test_enable_needs_a_directory_without_wildcards(tmp_path):
    main = main_file(tmp_path, "", ("*/*.toml",))
    out = evd_cli("enable", "discard", "-c", str(main))
    assert out.returncode == 1
    assert out.stderr == (
        f"evd: the first include pattern {tmp_path}/*/*.toml has wildcards in its directory: write where?\n"
    )


def test_enable_needs_the_first_pattern_to_read_the_file(tmp_path):
    main = main_file(tmp_path, "", ("d/*.conf", "d/*.toml"))
    out = evd_cli("enable", "discard", "-c", str(main))
    assert out.returncode == 1
    assert (
        out.stderr
        == f"evd: the first include pattern {tmp_path}/d/*.conf would not read {tmp_path}/d/50-discard.toml\n"
    )


# -- the write is atomic ------------------------------------------------------------------


def test_write_replaces_the_file_whole(tmp_path):
    """A reader of the old file keeps the old text whole; the new one is a
    new file renamed into place, never the old one rewritten."""
    target = write(tmp_path / "d/50-echo.toml", "old\n")
    with open(target) as reader:
        dropin.write_atomically(str(target), "new\n")
        assert reader.read() == "old\n"
    assert target.read_text() == "new\n"
    assert os.listdir(tmp_path / "d") == ["50-echo.toml"]


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, failing):
    target = write(tmp_path / "d/50-echo.toml", "old\n")

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, failing, fail)
    with pytest.raises(dropin.SwitchError, match=f"cannot write {target}: No space left on device"):
        dropin.write_atomically(str(target), "new\n")
    monkeypatch.undo()
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path / "d") == ["50-echo.toml"]


def test_the_temporary_file_is_never_read_as_a_drop_in(tmp_path):
    """Its name starts with "." and ends in ".tmp": no glob matches it, so
    a reload in the middle of a write does not see it."""
    main = main_file(tmp_path, "", ("d/*", "d/*.toml"))
    write(tmp_path / "d/.50-echo.toml.abc123.tmp", "[services.echo\n")
    assert loader.load_all(str(main)).files == ()


# -- --now -----------------------------------------------------------------------------------


def include_config(tmp: Path, config: str) -> str:
    return f'include = ["{tmp}/evd.d/*.toml"]\n' + config


def test_now_reloads_the_running_daemon_and_reports(control, tmp_path):
    control.write(include_config(tmp_path, logged_config(BASE_CONFIG)))
    pid = control.start()
    out = control("disable", "discard", "--now")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        f"discard disabled: wrote {tmp_path}/evd.d/50-discard.toml",
        f"reloaded, pid {pid}; added: nothing; removed: discard tcp 127.0.0.1:0, discard udp 127.0.0.1:0; "
        "changed: discard",
    ]
    control.log.wait_for("config.reload", ok=True, changed=["discard"])
    out = control("enable", "discard", "--now")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1] == (
        f"reloaded, pid {pid}; added: discard tcp 127.0.0.1:0, discard udp 127.0.0.1:0; "
        "removed: nothing; changed: discard"
    )
    assert len(control.log.find("config.reload")) == 2
    assert control("stop").returncode == 0


def test_now_reports_a_failed_reload(control, tmp_path):
    """The file is valid, but the daemon cannot apply it: the port is taken."""
    control.write(include_config(tmp_path, logged_config(BASE_CONFIG)))
    pid = control.start()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        write(tmp_path / "evd.d/10-port.toml", f'[services.discard]\ntcp = ["127.0.0.1:{port}"]\n')
        control("disable", "discard")  # so that enabling it binds the port
        out = control("enable", "discard", "--now")
    assert out.returncode == 1
    assert out.stderr.startswith(f"evd: reload failed, pid {pid}: ")
    assert f"127.0.0.1:{port}" in out.stderr
    assert control("stop").returncode == 0


def test_now_with_nothing_running(tmp_path):
    main = main_file(tmp_path, f'[daemon]\npidfile = "{tmp_path}/evd.pid"\n')
    out = evd_cli("enable", "discard", "--now", "-c", str(main))
    assert out.returncode == 1
    assert out.stdout == f"discard enabled: wrote {tmp_path}/d/50-discard.toml\n"
    assert out.stderr == f"evd: cannot reload: evd is not running (pidfile {tmp_path}/evd.pid)\n"


def test_now_without_a_log_file_still_signals(start_evd, tmp_path):
    """Logging to stderr: the signal is sent, and the result is the daemon's to log."""
    evd = start_evd(include_config(tmp_path, BASE_CONFIG))
    mark = len(evd.drain_events())
    out = evd_cli("disable", "discard", "--now", "-c", str(evd.config_path))
    assert out.returncode == 0, out.stderr
    assert f"reload signal sent to pid {evd.proc.pid}; its result is in the daemon's log" in out.stdout
    reload = evd.wait_for_since(mark, "config.reload")
    assert reload["ok"] is True and reload["changed"] == ["discard"]
    assert evd.stop() == 0


def test_start_with_a_relative_path_then_reload(control, tmp_path):
    """`evd start -c evd.toml` detaches into "/": its reloads must still
    find the file (the path is made absolute when it is resolved)."""
    control.write(include_config(tmp_path, logged_config(BASE_CONFIG)))
    out = evd_cli("start", "-c", "evd.toml", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    control.pids.append(int(out.stdout.split()[-1]))
    out = evd_cli("disable", "discard", "--now", "-c", "evd.toml", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "reloaded, pid" in out.stdout and "changed: discard" in out.stdout
    assert control("stop").returncode == 0
