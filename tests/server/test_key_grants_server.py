"""An API key's grants hold on the real server (mock engine: the bindings are the frontend's): its requests
count against the tenant it is bound to whatever `user` they claim, and their priority is clamped into its
range (else --priority-range)."""

from __future__ import annotations

import re
import time

import httpx
import pytest
from server_helpers import start_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys"
    keys.write_text("sk-team tenant=team-a priority=0..5\nsk-plain\n")
    s = start_server("--mock", "--api-key-file", str(keys), "--priority-range", "2..3")
    yield s
    s.stop()
    s.assert_clean_log()
    s.remove_log()


def _finished(server, key: str, **fields) -> tuple[str, str]:
    body = {"prompt": "hi", "max_tokens": 2, **fields}
    r = httpx.post(f"{server.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 200, r.text
    rid = r.json()["id"]
    for _ in range(50):
        m = re.search(rf"id={rid}-0-0 .* priority_class=(\S+) tenant=(\S+)", server.log_text(400))
        if m:
            return m.group(1), m.group(2)
        time.sleep(0.1)
    raise AssertionError(server.log_text())


def test_a_bound_key_sets_the_tenant_and_clamps_priority(server):
    assert _finished(server, "sk-team", user="someone-else", priority=-1000) == ("0", "tenant:team-a")
    assert _finished(server, "sk-team", priority=99) == ("5", "tenant:team-a")
    assert _finished(server, "sk-team", priority=4) == ("4", "tenant:team-a")


def test_an_unbound_key_gets_the_server_range_and_its_own_tenant(server):
    prio, tenant = _finished(server, "sk-plain", priority=-1000)
    assert prio == "2" and tenant.startswith("key:")  # a hash of the key, never the key itself
    assert _finished(server, "sk-plain", priority=99, user="bob") == ("3", "user:bob")
