"""If the engine process dies, in-flight and new requests get 503 and the frontend exits non-zero (so a
supervisor restarts it) instead of hanging forever."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest
from server_helpers import ServerProcess, start_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server() -> ServerProcess:
    s = start_server("--no-inproc")  # an engine process to kill
    yield s
    s.stop()
    s.remove_log()


def test_engine_death_gives_503_and_nonzero_exit(server):
    result: dict = {}

    def long_request() -> None:
        body = {"prompt": "Write a long story.", "max_tokens": 2000, "ignore_eos": True}
        try:
            result["response"] = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
        except httpx.HTTPError as e:
            result["error"] = e

    t = threading.Thread(target=long_request)
    t.start()
    deadline = time.monotonic() + 60
    while server.metrics().get("tokenmill:num_requests_running", 0) < 1:
        assert time.monotonic() < deadline, server.log_text()
        time.sleep(0.1)
    os.kill(server.engine_pid(), signal.SIGKILL)
    t.join(60)
    r = result.get("response")
    assert r is not None, result
    assert r.status_code == 503, r.text
    assert "engine" in r.json()["error"]["message"]
    try:  # the frontend may already be gone; if not, it still says 503
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 503
    except httpx.ConnectError:
        pass
    code = server.proc.wait(30)
    assert code != 0
    assert "engine is dead" in server.log_text()


def test_engine_that_cannot_start_exits_nonzero(tmp_path):
    """A model that fails to load: 503 meanwhile (if it is quick enough to ask), then a non-zero exit."""
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF not really")
    s = ServerProcess("--no-inproc", "--model", str(bad))
    try:
        code = s.proc.wait(120)
    finally:
        s.stop()
    assert code != 0
    assert "broken.gguf" in s.log_text()
    s.remove_log()
