"""API keys: where they come from (flag, file, environment), what each grants, and the constant-time check of
a request's header.

A key on the command line is visible to every user of the machine through `ps`; a file or the environment is
not, so both are accepted, and several keys may be valid at once (rotation: add the new one, then drop the old).
A line of the key file may bind what its requests count as, so a client cannot claim another tenant's share or
a priority it was not given:

    sk-team-a   tenant=team-a  priority=0..5
    sk-batch    tenant=batch   priority=10
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from tokenmill.errors import ConfigError

ENV_VAR = "TOKENMILL_API_KEY"


@dataclass(frozen=True)
class KeyGrant:
    """What requests made with one key count as: tenant (None: the key's own hash, or the request's `user`)
    and the range their `priority` is clamped into (None: the server's --priority-range)."""

    tenant: str | None = None
    priority: tuple[int, int] | None = None


Keys = dict[str, KeyGrant]


def load_api_keys(flag: str | None, key_file: str | None) -> Keys:
    """Keys from --api-key (comma-separated), --api-key-file (one per line, # comments, optional tenant= and
    priority= bindings) and $TOKENMILL_API_KEY (comma-separated); empty: no key required."""
    keys: Keys = {}
    for source in (flag, os.environ.get(ENV_VAR)):
        for k in (source or "").split(","):
            if k.strip():
                keys[k.strip()] = KeyGrant()
    if key_file:
        try:
            text = Path(key_file).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read --api-key-file {key_file}: {e}") from None
        found = 0
        for n, line in enumerate(text.splitlines(), 1):
            words = line.split("#", 1)[0].split()
            if words:
                keys[words[0]] = _grant(words[1:], f"--api-key-file {key_file} line {n}")
                found += 1
        if not found:
            raise ConfigError(f"--api-key-file {key_file} holds no key")
    return keys


def _grant(words: list[str], where: str) -> KeyGrant:
    fields: dict[str, str] = {}
    for w in words:
        name, sep, value = w.partition("=")
        if not sep or name not in ("tenant", "priority") or not value or name in fields:
            raise ConfigError(f"{where}: expected 'KEY [tenant=NAME] [priority=LO..HI]', got {w!r}")
        fields[name] = value
    return KeyGrant(fields.get("tenant"), parse_priority_range(fields.get("priority"), where))


def parse_priority_range(text: str | None, where: str) -> tuple[int, int] | None:
    """'LO..HI' (or one number N: N..N) -> (LO, HI); None -> None (no clamp)."""
    if text is None:
        return None
    lo, sep, hi = text.partition("..")
    try:
        bounds = (int(lo), int(hi if sep else lo))
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not a priority range such as 0..10") from None
    if not -(2**31) <= bounds[0] <= bounds[1] < 2**31:
        raise ConfigError(f"{where}: {text!r} must be LO..HI with LO <= HI, both 32-bit integers")
    return bounds


def match_key(header: str, keys: Keys) -> str | None:
    """The key 'Authorization: Bearer KEY' names, or None. Every key is compared, in constant time each."""
    given = header.encode()
    found = None
    for key in keys:
        if hmac.compare_digest(given, f"Bearer {key}".encode()):
            found = key
    return found


def authorized(header: str, keys: Keys) -> bool:
    """May a request with this Authorization header in? (Always, when no key is configured.)"""
    return not keys or match_key(header, keys) is not None
