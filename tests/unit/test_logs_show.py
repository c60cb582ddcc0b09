"""`evd logs show`'s pieces without a process: the selection rules and the
rendering for a person (the end-to-end tests run it on a real log)."""

from __future__ import annotations

import json

import pytest

from evd.tools.logs.events import parse_time_spec
from evd.tools.logs.show import Options, Renderer, Selector, ShowError, peer_matcher


def line(**fields) -> bytes:
    base = {"timestamp": "2026-03-01T10:00:00.000000Z", "level": "info", "event": "conn.open", "pid": 7}
    return json.dumps(base | fields).encode()


def test_peer_matching():
    v4 = peer_matcher("192.0.2.1")
    assert v4("192.0.2.1") and not v4("192.0.2.2") and not v4("unix")
    assert peer_matcher("192.0.2.0/24")("192.0.2.200")
    v6 = peer_matcher("[2001:db8::0001]")  # brackets and long forms accepted
    assert v6("2001:db8::1") and not v6("2001:db8::2")
    assert peer_matcher("unix")("unix") and not peer_matcher("unix")("192.0.2.1")
    with pytest.raises(ShowError):
        peer_matcher("example.com")


def test_selection_rules():
    def picks(options: Options, *lines: bytes) -> list[bool]:
        selector = Selector(options)
        return [selector.select(raw) is not None for raw in lines]

    warning = line(level="warning", event="conn.reject", service="echo", peer="[2001:db8::1]:5")
    error = line(level="error", event="error", where="echo.read")
    auth = line(level="warning", event="auth.fail", peer="192.0.2.1:9")
    opened = line(service="daytime", peer="unix")
    everything = (warning, error, auth, opened)
    assert picks(Options([], level="warning"), *everything) == [True, True, True, False]
    assert picks(Options([], level="error"), *everything) == [False, True, False, False]
    assert picks(Options([], events=["conn.*"]), *everything) == [True, False, False, True]
    assert picks(Options([], events=["auth.fail", "error"]), *everything) == [False, True, True, False]
    # `where` names the service of an error; auth belongs to the framed port
    assert picks(Options([], service="echo"), *everything) == [True, True, False, False]
    assert picks(Options([], service="framed"), *everything) == [False, False, True, False]
    assert picks(Options([], peer="2001:db8::/32"), *everything) == [True, False, False, False]
    assert picks(Options([], peer="unix"), *everything) == [False, False, False, True]
    early, late = line(timestamp="2026-03-01T09:59:59Z"), line(timestamp="2026-03-01T10:00:01+00:00")
    window = Options(
        [], since=parse_time_spec("2026-03-01T10:00:00Z"), until=parse_time_spec("2026-03-01T10:00:01Z")
    )
    assert picks(window, early, warning, late) == [False, True, False]
    selector = Selector(Options([]))
    assert [selector.select(raw) for raw in (b"oops", b"", b"[1]", b'{"event": "x"}')] == [None] * 4
    assert selector.skipped == 3  # a blank line is not counted


def test_rendering():
    event = json.loads(
        line(
            level="error",
            event="error",
            where="echo.read",
            conn=12,
            note="two words",
            exc_info="Traceback (most recent call last):\n  OSError: boom",
        )
    )
    plain = Renderer(colour=False)(event).splitlines()
    assert plain == [
        '2026-03-01 10:00:00.000000 error   error         [7] where=echo.read conn=12 note="two words"',
        "    Traceback (most recent call last):",
        "      OSError: boom",
    ]
    coloured = Renderer(colour=True)(event)
    assert "\033[1;31merror  \033[0m" in coloured and "\033[36mwhere\033[0m=echo.read" in coloured


def test_rendering_escapes_control_characters():
    """A client's bytes in a log line must not drive the terminal."""
    event = json.loads(line(event="conn.close\x1b[2J", peer="x\x1b]0;owned\x07", exc_info="boom \x1b[31m"))
    text = Renderer(colour=False)(event)
    assert "\x1b" not in text and "\x07" not in text
    assert "conn.close\\x1b[2J" in text and 'peer="x\\u001b]0;owned\\u0007"' in text
