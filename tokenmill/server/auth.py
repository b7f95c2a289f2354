"""API keys: where they come from (flag, file, environment) and the constant-time check of a request's header.

A key on the command line is visible to every user of the machine through `ps`; a file or the environment is
not, so both are accepted, and several keys may be valid at once (rotation: add the new one, then drop the old).
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from tokenmill.errors import ConfigError

ENV_VAR = "TOKENMILL_API_KEY"


def load_api_keys(flag: str | None, key_file: str | None) -> frozenset[str]:
    """Keys from --api-key (comma-separated), --api-key-file (one per line, # comments) and
    $TOKENMILL_API_KEY (comma-separated); empty: no key required."""
    keys: list[str] = []
    for source in (flag, os.environ.get(ENV_VAR)):
        if source:
            keys += source.split(",")
    if key_file:
        try:
            text = Path(key_file).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read --api-key-file {key_file}: {e}") from None
        keys += [line.split("#", 1)[0] for line in text.splitlines()]
    keys = [k.strip() for k in keys if k.strip()]
    if key_file and not keys:
        raise ConfigError(f"--api-key-file {key_file} holds no key")
    return frozenset(keys)


def authorized(header: str, keys: frozenset[str]) -> bool:
    """Does 'Authorization: Bearer KEY' name one of the keys? Every key is compared, in constant time each."""
    if not keys:
        return True
    given = header.encode()
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given, f"Bearer {key}".encode())
    return ok
