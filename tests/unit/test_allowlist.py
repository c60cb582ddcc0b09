"""The allow-list's checks (evd/proto/allowlist.py): which command a request
names, and the argv it may run.  No processes: the runner's tests run them."""

from __future__ import annotations

import pytest

from evd.config.model import DEFAULT_ARG_PATTERN, CommandSpec
from evd.proto import allowlist
from evd.proto.allowlist import Refusal

TABLE = {
    "greet": CommandSpec("greet", ("echo", "hello"), args=True),
    "uptime": CommandSpec("uptime", ("uptime",)),
    "digits": CommandSpec("digits", ("echo",), args=True, arg_pattern=r"[0-9]+"),
    "loose": CommandSpec("loose", ("echo",), args=True, arg_pattern=r"^.{0,64}$"),
}


def argv(name: object, args: object) -> list[str]:
    return allowlist.argv(allowlist.command(TABLE, name), args)


def refusal(name: object, args: object) -> tuple[str, str]:
    with pytest.raises(Refusal) as info:
        argv(name, args)
    assert str(info.value) == info.value.message
    return info.value.code, info.value.message


def test_known_command_without_args():
    assert argv("uptime", None) == ["uptime"]
    assert argv("uptime", []) == ["uptime"]


def test_valid_args_are_appended():
    assert argv("greet", ["world", "a.b-c_d"]) == ["echo", "hello", "world", "a.b-c_d"]
    assert argv("greet", ["x" * 64]) == ["echo", "hello", "x" * 64]
    assert TABLE["greet"].argv == ("echo", "hello")  # the entry is not changed


@pytest.mark.parametrize("name", ["nope", "GREET", "x" * 65])
def test_unknown_command(name):
    assert refusal(name, None) == ("unknown_command", f"no command named {allowlist.quote(name)}")


@pytest.mark.parametrize("name", [None, "", 5, True, ["greet"], {"name": "greet"}])
def test_a_name_that_is_not_a_string_is_a_bad_request(name):
    """Issue 9 defect 1: a malformed request, and no Python words (None,
    True, reprs) in the message."""
    assert refusal(name, None) == ("bad_request", "name (a non-empty string) is required")


def test_args_refused_when_not_allowed():
    assert refusal("uptime", ["-p"]) == ("bad_args", 'command "uptime" takes no arguments')


@pytest.mark.parametrize("args", ["world", {"a": 1}, [1], ["ok", None], [["nested"]], 3])
def test_args_must_be_a_list_of_strings(args):
    assert refusal("greet", args) == ("bad_args", "args must be a list of strings")


@pytest.mark.parametrize(
    "arg",
    [";rm -rf /", "$(id)", "`id`", "a b", "a|b", "a&b", "a>b", "../../etc/passwd", "", "x" * 65,
     "abc\n", "\nabc", "ä", "a\x00b", "*", "~root", "--opt=$HOME"],
)  # fmt: skip
def test_the_default_pattern_refuses_shell_metacharacters(arg):
    code, message = refusal("greet", ["fine", arg])
    assert code == "bad_args" and message.startswith("argument 2 (")


def test_a_custom_pattern_must_match_the_whole_argument():
    assert argv("digits", ["123"]) == ["echo", "123"]
    for bad in ("12a", "a12", "1 2", ""):
        assert refusal("digits", [bad]) == ("bad_args", f'argument 1 ("{bad}") does not match [0-9]+')


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("a\x00b", r'argument 1 ("a\u0000b") contains a NUL character'),
        ("\x00", r'argument 1 ("\u0000") contains a NUL character'),
        ("\ud800", r'argument 1 ("\ud800") is not valid UTF-8 text'),
        # would reach the program as the raw byte 0xff (surrogateescape)
        ("\udcff", r'argument 1 ("\udcff") is not valid UTF-8 text'),
        ("caf\u00e9\udc80", r'argument 1 ("caf\u00e9\udc80") is not valid UTF-8 text'),
    ],
)
def test_nul_and_non_utf8_are_bad_args_even_when_the_pattern_allows_them(arg, message):
    """Issue 9 defect 12: before, Popen raised ValueError/UnicodeEncodeError
    (a traceback and `internal`), or ran the command with a raw byte."""
    assert refusal("loose", [arg]) == ("bad_args", message)


def test_non_ascii_text_is_an_argument_like_any_other():
    assert argv("loose", ["caf\u00e9 \u2603"]) == ["echo", "caf\u00e9 \u2603"]


def test_messages_quote_client_strings_as_json_never_as_reprs():
    assert allowlist.quote("n" * 200) == '"' + "n" * 64 + '..."'
    assert allowlist.quote("it's \x1b[31m") == '"it\'s \\u001b[31m"'
    assert refusal("greet", ["it's"])[1] == f'argument 1 ("it\'s") does not match {DEFAULT_ARG_PATTERN}'
