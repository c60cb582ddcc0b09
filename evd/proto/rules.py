"""What every framed connection of one configuration shares, sans-IO.

`Rules` is the framed port's configuration as sessions (proto/session.py)
use it: the services offered, which need authentication, the allow-list of
commands, and the keys -- `[keys.NAME]` entries and `key_file` as the key
"default" (SPEC section 10) -- with their HMAC secrets as server/preflight.py
read them.  It is built once per start and per reload, never changed: a
reload builds a new one and every session takes it from its next request
on.

Checking a MAC against the keys lives here too, because how it is done is
a property of the key set: every candidate key is computed and compared in
full, whichever matches, so the time an `auth` takes depends on how many
keys there are and never on which one (if any) was right.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field

from evd.config.model import CommandSpec, Config, KeySpec


@dataclass(frozen=True, slots=True)
class Rules:
    services: tuple[str, ...] = ("echo", "time")  # offered, in dispatch order
    auth_required: frozenset[str] = frozenset()  # empty unless a key exists
    keys: Mapping[str, KeySpec] = field(default_factory=dict)
    secrets: Mapping[str, bytes] = field(default_factory=dict)  # HMAC keys only
    commands: Mapping[str, CommandSpec] = field(default_factory=dict)

    def key_for_cn(self, client_cn: str) -> str | None:
        """The key a verified TLS client certificate with this CN is."""
        for name, spec in self.keys.items():
            if spec.client_cn and spec.client_cn == client_cn:
                return name
        return None

    def match(self, nonce: bytes, mac: object, named: str | None) -> str | None:
        """The key whose HMAC-SHA256 of `nonce` is `mac` (hex, any case):
        the key `named`, or without a name any HMAC key.  None if none is.
        Anything but a string of ASCII is simply a wrong MAC."""
        given = mac.lower().encode("ascii") if type(mac) is str and mac.isascii() else b""
        if named is None:
            candidates = list(self.secrets.items())
        elif named in self.secrets:
            candidates = [(named, self.secrets[named])]
        else:  # as much work as a real key, for a name that is not one
            candidates = [("", nonce)]
        matched = None
        for name, secret in candidates:
            expected = hmac.new(secret, nonce, "sha256").hexdigest().encode("ascii")
            if hmac.compare_digest(given, expected) and name and matched is None:
                matched = name
        return matched


def rules_for(config: Config, secrets: Mapping[str, bytes]) -> Rules:
    """The Rules of `config`; `secrets` by key name, as server/preflight.py
    read them."""
    framed = config.services["framed"]
    enabled = {name for name in ("command", "stats") if config.services[name].enabled}
    keys = config.all_keys()
    return Rules(
        services=tuple(s for s in framed.dispatch if s in ("echo", "time") or s in enabled),
        auth_required=frozenset(framed.auth_required) if keys else frozenset(),
        keys=keys,
        secrets={name: secrets[name] for name in keys if name in secrets},
        commands=dict(config.commands),
    )
