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


def _long_request_running(server: ServerProcess, max_tokens: int) -> tuple[threading.Thread, dict]:
    """A long completion in a thread, returned once the engine runs it; its response (or HTTP error) lands in
    the dict when it ends."""
    result: dict = {}

    def long_request() -> None:
        body = {"prompt": "Write a long story.", "max_tokens": max_tokens, "ignore_eos": True}
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
    return t, result


def test_engine_death_gives_503_and_nonzero_exit(server):
    t, result = _long_request_running(server, 2000)
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


def test_a_wedged_engine_still_gets_answers_and_health_says_so():
    """A stopped (SIGSTOP) engine neither enforces deadlines nor reports: the frontend answers requests past
    their `timeout` with 408 itself, and after --engine-watchdog seconds of silence fails in-flight requests
    with 503 and says 503 on /health, until the engine speaks again."""
    s = start_server("--no-inproc", "--engine-watchdog", "8")
    try:
        t, result = _long_request_running(s, 4000)
        pid = s.engine_pid()
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            t0 = time.monotonic()
            r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "hi", "max_tokens": 8, "timeout": 1.5},
                           timeout=30)
            assert r.status_code == 408 and "timed out" in r.json()["error"]["message"], r.text
            assert time.monotonic() - t0 < 5
            with httpx.stream("POST", f"{s.url}/v1/completions", timeout=30,
                              json={"prompt": "hi", "max_tokens": 8, "timeout": 1.5, "stream": True}) as r:
                text = r.read().decode()
            assert '"code":408' in text.replace(" ", "") and text.rstrip().endswith("data: [DONE]"), text

            while time.monotonic() - stopped_at < 8.5:
                time.sleep(0.25)
            deadline = time.monotonic() + 5
            while (h := httpx.get(f"{s.url}/health", timeout=5)).status_code == 200:
                assert time.monotonic() < deadline, s.log_text()
                time.sleep(0.25)
            assert h.status_code == 503 and h.json()["status"] == "engine_unresponsive"
            r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "hi", "max_tokens": 8}, timeout=30)
            assert r.status_code == 503 and "not answered" in r.json()["error"]["message"], r.text
            t.join(30)
            assert "response" in result, result
            assert result["response"].status_code == 503, result["response"].text
        finally:
            os.kill(pid, signal.SIGCONT)
        deadline = time.monotonic() + 30
        while httpx.get(f"{s.url}/health", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, s.log_text()
            time.sleep(0.25)
        r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "hi", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
        assert "taken as wedged" in s.log_text() and "answers again" in s.log_text()
    finally:
        assert s.stop() == 0, s.log_text()
        s.remove_log()
