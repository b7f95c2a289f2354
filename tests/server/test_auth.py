"""API keys from the flag, a file and the environment; several valid at once; the header checked for each."""

from __future__ import annotations

import pytest

from tokenmill.errors import ConfigError
from tokenmill.server.auth import ENV_VAR, KeyGrant, authorized, load_api_keys, match_key
from tokenmill.server.config import ServerConfig


def test_keys_come_from_the_flag_the_file_and_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    f = tmp_path / "keys"
    f.write_text("# rotated monthly\nfile-key-1\n\n  file-key-2  # the new one\n")
    monkeypatch.setenv(ENV_VAR, "env-key")
    keys = load_api_keys("flag-a,flag-b", str(f))
    assert set(keys) == {"flag-a", "flag-b", "file-key-1", "file-key-2", "env-key"}
    for k in keys:
        assert authorized(f"Bearer {k}", keys)
    assert not authorized("Bearer nope", keys)
    assert not authorized("", keys)
    assert not authorized("file-key-1", keys)  # the scheme is part of the header
    monkeypatch.delenv(ENV_VAR)
    assert load_api_keys(None, None) == {} and authorized("", {})


def test_a_bad_key_file_fails_at_start_up(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(ConfigError, match="cannot read"):
        ServerConfig(api_key_file=str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.write_text("# nothing here\n")
    with pytest.raises(ConfigError, match="holds no key"):
        ServerConfig(api_key_file=str(empty))


def test_a_key_file_line_binds_tenant_and_priority(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    f = tmp_path / "keys"
    f.write_text("sk-a tenant=team-a priority=0..5\nsk-b  priority=10   # batch jobs\nsk-c\n")
    keys = load_api_keys(None, str(f))
    assert keys == {"sk-a": KeyGrant("team-a", (0, 5)), "sk-b": KeyGrant(None, (10, 10)), "sk-c": KeyGrant()}
    assert match_key("Bearer sk-b", keys) == "sk-b" and match_key("Bearer sk-", keys) is None


@pytest.mark.parametrize("line", ["sk tenant", "sk team=a", "sk priority=5..1", "sk priority=high",
                                  "sk tenant=a tenant=b", "sk priority=0..99999999999"])
def test_a_malformed_binding_fails_at_start_up_naming_the_line(tmp_path, monkeypatch, line):
    monkeypatch.delenv(ENV_VAR, raising=False)
    f = tmp_path / "keys"
    f.write_text("# header\n" + line + "\n")
    with pytest.raises(ConfigError, match="line 2"):
        ServerConfig(api_key_file=str(f))
