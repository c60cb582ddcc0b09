"""Following a log file (`evd logs show -f`), in-process, with both ways of
waiting: inotify and the polling fallback.  The end-to-end test with a
real evd and a real rename is in test_logs_e2e.py."""

from __future__ import annotations

import os
import select

import pytest

from evd.tools.logs import follow


def lines_of(followed: follow.Followed) -> list[bytes]:
    return [line for block in followed.read() for line in block]


@pytest.fixture(params=["inotify", "poll"])
def watcher(request):
    made = follow.InotifyWatcher() if request.param == "inotify" else follow.PollWatcher()
    yield made
    made.close()


def test_growing_file_and_partial_lines(tmp_path, watcher):
    path = tmp_path / "evd.log"
    path.write_bytes(b"one\ntw")
    followed = follow.Followed(str(path), watcher)
    assert lines_of(followed) == [b"one"]  # "tw" is not a line yet
    with open(path, "ab") as f:
        f.write(b"o\nthree\n")
    assert lines_of(followed) == [b"two", b"three"]
    assert lines_of(followed) == []
    followed.close()


def test_rename_then_new_file(tmp_path, watcher):
    """logrotate: rename, evd goes on writing the old file until SIGUSR1,
    then writes the new one.  Nothing is lost, nothing repeated."""
    path = tmp_path / "evd.log"
    path.write_bytes(b"a\n")
    followed = follow.Followed(str(path), watcher)
    assert lines_of(followed) == [b"a"]
    old = open(path, "ab", buffering=0)  # the daemon's descriptor
    os.rename(path, tmp_path / "evd.log.1")
    old.write(b"b\n")  # after the rename, before the reopen
    assert lines_of(followed) == [b"b"]  # the path is missing for now
    path.write_bytes(b"")  # logrotate's `create`: a new, empty file
    old.write(b"c\n")
    assert lines_of(followed) == [b"c"]  # the old file is still read
    old.write(b"d\n")  # the last line before the daemon reopens...
    old.close()
    with open(path, "ab") as new:
        new.write(b"e\n")  # ...and the first after
    assert lines_of(followed) == [b"d", b"e"]
    assert followed.old is None  # the old file is let go once the new one is written
    with open(path, "ab") as new:
        new.write(b"f\n")
    assert lines_of(followed) == [b"f"]
    followed.close()


def test_copytruncate(tmp_path, watcher):
    path = tmp_path / "evd.log"
    path.write_bytes(b"a\nb\n")
    followed = follow.Followed(str(path), watcher)
    assert lines_of(followed) == [b"a", b"b"]
    with open(path, "r+b") as f:
        f.truncate(0)
    with open(path, "ab") as f:
        f.write(b"c\n")
    assert lines_of(followed) == [b"c"]
    followed.close()


def test_inotify_wakes_on_a_write(tmp_path):
    """A write makes the inotify descriptor readable at once (no waiting
    for the backstop), and wait() drains it."""
    path = tmp_path / "evd.log"
    path.write_bytes(b"")
    watcher = follow.InotifyWatcher()
    try:
        follow.Followed(str(path), watcher).close()
        assert select.select([watcher.fd], [], [], 0)[0] == []
        with open(path, "ab") as f:
            f.write(b"x\n")
        assert select.select([watcher.fd], [], [], 5.0)[0] == [watcher.fd]
        watcher.wait()
        assert select.select([watcher.fd], [], [], 0)[0] == []
    finally:
        watcher.close()


def test_inotify_passes_over_other_files_of_the_directory(tmp_path):
    """A busy /var/log: writes to other files are events too, and must not
    count as news of the followed file; its own writes, rename and a new
    file of its name do."""
    path = tmp_path / "evd.log"
    path.write_bytes(b"")
    watcher = follow.InotifyWatcher()
    try:
        followed = follow.Followed(str(path), watcher)
        (tmp_path / "syslog").write_bytes(b"other news\n")
        assert not watcher.relevant()
        with open(path, "ab") as f:
            f.write(b"x\n")
        assert watcher.relevant()
        os.rename(path, tmp_path / "evd.log.1")
        assert watcher.relevant()  # the followed inode moved
        assert lines_of(followed) == [b"x"]
        path.write_bytes(b"y\n")
        assert watcher.relevant()  # a new file of the followed name
        assert lines_of(followed) == [b"y"]  # the new file, from its start
        followed.close()
    finally:
        watcher.close()


def test_the_fallback_is_chosen_without_inotify(monkeypatch):
    def no_inotify() -> follow.InotifyWatcher:
        raise OSError("no inotify here")

    monkeypatch.setattr(follow, "InotifyWatcher", no_inotify)
    assert isinstance(follow.watcher(), follow.PollWatcher)


def test_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(follow.InputError):
        follow.Followed(str(tmp_path / "nope.log"), follow.PollWatcher())


def test_an_over_long_line_is_let_go_while_following(tmp_path, watcher):
    """A writer that never ends its line (a run of NUL bytes after a crash):
    what is kept of it stays bounded, and it is skipped as one line."""
    from evd.tools.logs.reading import MAX_LINE, OVERLONG

    path = tmp_path / "evd.log"
    path.write_bytes(b"a\n")
    followed = follow.Followed(str(path), watcher)
    assert lines_of(followed) == [b"a"]
    with open(path, "ab") as f:
        for _ in range(3):
            f.write(b"\0" * MAX_LINE)
            assert lines_of(followed) == []
            assert len(followed.carry.carry) <= MAX_LINE
        f.write(b"\nb\n")
    assert lines_of(followed) == [OVERLONG, b"b"]
    followed.close()
