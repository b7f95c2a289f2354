"""API keys from the flag, a file and the environment; several valid at once; the header checked for each."""

from __future__ import annotations

import pytest

from tokenmill.errors import ConfigError
from tokenmill.server.auth import ENV_VAR, authorized, load_api_keys
from tokenmill.server.config import ServerConfig


def test_keys_come_from_the_flag_the_file_and_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    f = tmp_path / "keys"
    f.write_text("# rotated monthly\nfile-key-1\n\n  file-key-2  # the new one\n")
    monkeypatch.setenv(ENV_VAR, "env-key")
    keys = load_api_keys("flag-a,flag-b", str(f))
    assert keys == {"flag-a", "flag-b", "file-key-1", "file-key-2", "env-key"}
    for k in keys:
        assert authorized(f"Bearer {k}", keys)
    assert not authorized("Bearer nope", keys)
    assert not authorized("", keys)
    assert not authorized("file-key-1", keys)  # the scheme is part of the header
    monkeypatch.delenv(ENV_VAR)
    assert load_api_keys(None, None) == frozenset() and authorized("", frozenset())


def test_a_bad_key_file_fails_at_start_up(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(ConfigError, match="cannot read"):
        ServerConfig(api_key_file=str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.write_text("# nothing here\n")
    with pytest.raises(ConfigError, match="holds no key"):
        ServerConfig(api_key_file=str(empty))
