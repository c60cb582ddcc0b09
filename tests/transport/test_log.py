"""The `log` object (evd/log/logger.py) as the daemon uses it: configure,
batched, flush, reopen -- on real files, without a daemon."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import pytest

from evd.log.logger import Log, log


@pytest.fixture(autouse=True)
def restore_log():
    """Tests point the process's one `log` elsewhere: back to stderr after."""
    yield
    log.configure("info", "json", "")


def rows(path: Path) -> list[dict]:
    return [json.loads(text) for text in path.read_text().splitlines()]


def test_a_lone_surrogate_loses_no_line_of_its_batch(tmp_path):
    """Issue 9 #3: at debug, a request whose id is "\\ud800" made the flush
    raise after the batch was taken: every line of that iteration was lost."""
    path = tmp_path / "evd.log"
    log.configure("debug", "json", str(path))
    with log.batched():
        log.info("conn.open", service="framed", peer="127.0.0.1:1", conn=1)
        log.debug("request", conn=1, svc="\ud800", id="\ud800", ok=False)
        log.info("daemon.note", text="\udfff after")
        log.info("conn.close", service="framed", peer="127.0.0.1:1", conn=1, reason="eof")
        log.sink.flush()
    got = rows(path)
    assert [row["event"] for row in got] == ["conn.open", "request", "daemon.note", "conn.close"]
    assert got[1]["id"] == "\ud800" and got[1]["svc"] == "\ud800"  # the escape reads back as sent
    assert got[2]["text"] == "\udfff after"


def test_reopen_after_the_directory_vanished_is_one_line_and_loses_nothing(tmp_path):
    """Issue 9 #17: a reopen that cannot open the file logged a traceback
    (into the deleted file).  Now: one error line, the lines wait, and the
    first reopen that works writes them."""
    folder = tmp_path / "logs"
    folder.mkdir()
    path = folder / "evd.log"
    log.configure("info", "json", str(path))
    log.info("before", n=1)
    shutil.rmtree(folder)
    log.reopen()
    log.info("while.gone", n=2)
    folder.mkdir()
    log.reopen()
    got = rows(path)
    failed = [row for row in got if row["event"] == "log.reopen" and row["ok"] is False]
    assert len(failed) == 1
    assert failed[0]["level"] == "error" and "exc_info" not in failed[0]
    assert failed[0]["error"] == "open: " + f"{path}: [Errno 2] No such file or directory"
    events = [row["event"] for row in got]
    assert events.index("log.reopen") < events.index("while.gone")  # in order
    assert got[-1]["event"] == "log.reopen" and got[-1]["ok"] is True


def test_reopen_that_cannot_open_keeps_the_file_it_has(tmp_path, monkeypatch):
    """EMFILE and the like: the old file is still the one at the path."""
    path = tmp_path / "evd.log"
    fresh = Log()
    fresh.configure("info", "json", str(path))
    real_open = os.open

    def refuse(name, *args, **kw):
        if str(name) == str(path):
            raise OSError(24, "Too many open files")
        return real_open(name, *args, **kw)

    monkeypatch.setattr(os, "open", refuse)
    fresh.reopen()
    monkeypatch.undo()
    fresh.info("after", n=1)
    got = rows(path)
    assert [row["event"] for row in got] == ["log.reopen", "after"]
    assert got[0]["ok"] is False and got[0]["error"] == "open: [Errno 24] Too many open files"


def test_configure_refuses_a_file_it_cannot_open_and_keeps_logging(tmp_path):
    path = tmp_path / "evd.log"
    log.configure("info", "json", str(path))
    with pytest.raises(OSError):
        log.configure("info", "json", str(tmp_path / "missing" / "evd.log"))
    log.info("still.here")
    assert rows(path)[-1]["event"] == "still.here"


def test_lines_queued_for_the_old_file_go_there_before_the_switch(tmp_path):
    first, second = tmp_path / "a.log", tmp_path / "b.log"
    log.configure("info", "json", str(first))
    with log.batched():
        log.info("queued", n=1)
        log.configure("info", "json", str(second))
        log.info("queued", n=2)
        log.sink.flush()
    assert [row["n"] for row in rows(first)] == [1]
    assert [row["n"] for row in rows(second)] == [2]


def test_levels_filter_and_info_on_follows():
    log.configure("warning", "json", "")
    assert not log.info_on and not log.enabled("info") and log.enabled("error")
    log.configure("debug", "json", "")
    assert log.info_on and log.enabled("debug")


def test_console_format_writes_one_line_per_event(tmp_path):
    path = tmp_path / "evd.log"
    log.configure("info", "console", str(path))
    log.info("conn.open", service="echo", peer="127.0.0.1:1", conn=7)
    text = path.read_text()
    assert text.count("\n") == 1 and "conn.open" in text and "conn=7" in text and " info " in text


def test_a_full_disk_never_tears_a_line(tiny_tmpfs):
    """Issue 9 #17: a full disk tore a JSON line in two."""
    path = tiny_tmpfs / "evd.log"
    log.configure("info", "json", str(path))
    fd = os.open(tiny_tmpfs / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    with contextlib.suppress(OSError):  # leave a little room: the file fills part way
        while os.write(fd, b"\0" * 4096):
            pass
    os.close(fd)
    os.truncate(tiny_tmpfs / "filler", os.stat(tiny_tmpfs / "filler").st_size - 6000)
    with log.batched():
        for i in range(400):
            log.info("conn.close", service="echo", peer="127.0.0.1:1", conn=i, reason="e" * (i % 23))
            if i % 5 == 0:
                log.sink.flush()
        log.sink.flush()
    for text in path.read_bytes().split(b"\n")[:-1]:
        json.loads(text)  # every line whole
    assert path.read_bytes().endswith(b"\n")
