"""Dropping root: `daemon.user` and `daemon.group`, after binding.

The order is the classic one and it matters: supplementary groups first
(setgroups needs root), then the group (setgid needs root too), then the
user -- after setuid nothing else can be changed.  Files evd goes on writing
(the log file, the pidfile) are handed to the new owner first, by the caller.

A name that does not exist is a configuration error; a drop that fails (not
root) is a start-up failure naming the system call.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Callable

from evd.config.model import ConfigError


class PrivilegeError(Exception):
    """Dropping failed; str() names the system call and errno."""


class Credentials:
    __slots__ = ("user", "uid", "gid", "groups")

    def __init__(self, user: str, uid: int, gid: int, groups: list[int]):
        self.user, self.uid, self.gid, self.groups = user, uid, gid, groups

    def __repr__(self) -> str:
        return f"Credentials({self.user!r}, uid={self.uid}, gid={self.gid}, groups={self.groups})"


def resolve(user: str, group: str, where: str = "daemon") -> Credentials | None:
    """The target identity for `daemon.user`/`daemon.group` (or those keys
    of `where`), or None to stay as we are.  Raises ConfigError for unknown
    names."""
    if not user and not group:
        return None
    errors: list[str] = []
    uid, gid, name = os.getuid(), os.getgid(), ""
    if user:
        try:
            entry = pwd.getpwnam(user)
            uid, gid, name = entry.pw_uid, entry.pw_gid, entry.pw_name
        except KeyError:
            errors.append(f'{where}.user: no such user "{user}"')
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            errors.append(f'{where}.group: no such group "{group}"')
    if errors:
        raise ConfigError(errors)
    # The user's own supplementary groups, as login would give them.
    groups = os.getgrouplist(name, gid) if name else [gid]
    return Credentials(name, uid, gid, groups)


def drop(creds: Credentials) -> None:
    """Become `creds` for good.  Nothing to do if we already are (a user
    that is not root may name itself; its groups are what its login gave)."""
    if (os.getuid(), os.geteuid(), os.getgid(), os.getegid()) == (creds.uid, creds.uid, creds.gid, creds.gid):
        return
    steps: list[tuple[str, Callable[[], None], object]] = [
        ("setgroups", lambda: os.setgroups(creds.groups), creds.groups),
        ("setgid", lambda: os.setgid(creds.gid), creds.gid),
        ("setuid", lambda: os.setuid(creds.uid), creds.uid),
    ]
    for syscall, call, arg in steps:
        try:
            call()
        except OSError as exc:
            raise PrivilegeError(
                f"cannot drop privileges: {syscall}({arg}): [Errno {exc.errno}] {exc.strerror}"
            ) from None
