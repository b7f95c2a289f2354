"""Bad requests get 4xx with an OpenAI error body naming the problem: never 5xx, never a hang.

This module's server runs the engine in-process (--inproc), so both engine placements are exercised.
"""

from __future__ import annotations

import json

import httpx
import pytest
from server_helpers import ServerProcess, start_server

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server() -> ServerProcess:
    s = start_server("--inproc", "--max-body-bytes", "64KiB")
    yield s
    assert s.stop() == 0, s.log_text()
    s.assert_clean_log()
    s.remove_log()


@pytest.fixture(scope="module")
def http(server) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def _error(r: httpx.Response, status: int = 400, param: str | None = "<any>") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param != "<any>":
        assert err["param"] == param, err
    return err


CASES = [
    # (endpoint, body, expected param)
    ("completions", {"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ("completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("completions", {"prompt": "x", "max_tokens": 10**30}, "max_tokens"),
    ("completions", {"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ("completions", {"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    ("completions", {"prompt": "x", "temperature": -1}, "temperature"),
    ("completions", {"prompt": "x", "temperature": 1e308}, "temperature"),
    ("completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("completions", {"prompt": "x", "top_p": 2}, "top_p"),
    ("completions", {"prompt": "x", "top_k": -5}, "top_k"),
    ("completions", {"prompt": "x", "min_p": 3}, "min_p"),
    ("completions", {"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ("completions", {"prompt": "x", "presence_penalty": 9}, "presence_penalty"),
    ("completions", {"prompt": "x", "frequency_penalty": -9}, "frequency_penalty"),
    ("completions", {"prompt": "x", "n": 0}, "n"),
    ("completions", {"prompt": "x", "n": 10**6}, "n"),
    ("completions", {"prompt": "x", "logprobs": 100}, "logprobs"),
    ("completions", {"prompt": "x", "logprobs": -1}, "logprobs"),
    ("completions", {"prompt": "x", "seed": 2**70}, "seed"),
    ("completions", {"prompt": "x", "priority": 2**40}, "priority"),
    ("completions", {"prompt": "x", "min_tokens": 50, "max_tokens": 5}, "min_tokens"),
    ("completions", {"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
    ("completions", {"prompt": "x", "logit_bias": {"99999999": 1}}, "logit_bias"),
    ("completions", {"prompt": "x", "logit_bias": {"5": 1000}}, "logit_bias"),
    ("completions", {"prompt": "x", "logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ("completions", {"prompt": "x", "stop_token_ids": list(range(257))}, "stop_token_ids"),
    # The request once seen to lock every other client out: 16 prompts x n 64 x 4000 tokens x 21 logprobs.
    ("completions", {"prompt": ["x"] * 16, "n": 64, "max_tokens": 4000, "logprobs": 20}, "max_tokens"),
    ("completions", {"prompt": "x", "stop": ["a"] * 100}, "stop"),
    ("completions", {"prompt": "x", "stop": [""]}, "stop"),
    ("completions", {"prompt": "x", "stop": 5}, "stop"),
    ("completions", {"prompt": "x", "stop_token_ids": [10**9]}, "stop_token_ids"),
    ("completions", {"prompt": "x", "frobnicate": True}, "frobnicate"),
    ("completions", {"prompt": "x", "echo": "yes"}, "echo"),
    ("completions", {"prompt": "x", "guided_regex": "(a"}, "guided_regex"),
    ("completions", {"prompt": "x", "suffix": "tail"}, "suffix"),
    ("completions", {"prompt": "x", "best_of": 3}, "best_of"),
    ("completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ("completions", {"prompt": "x", "stream": True, "stream_options": {"bogus": 1}}, "stream_options"),
    ("completions", {"prompt": "x", "model": "gpt-9"}, "model"),
    ("completions", {"prompt": ""}, "prompt"),
    ("completions", {"prompt": []}, "prompt"),
    ("completions", {"prompt": [[]]}, "prompt"),
    ("completions", {"prompt": [-1, 5]}, "prompt"),
    ("completions", {"prompt": [10**9]}, "prompt"),
    ("completions", {"prompt": [1, "a"]}, "prompt"),
    ("completions", {"prompt": None}, "prompt"),
    ("completions", {"max_tokens": 5}, "prompt"),
    ("completions", {"prompt": [5] * 9000}, "prompt"),
    ("completions", {"prompt": "x", "max_tokens": 8192}, "max_tokens"),
    ("chat/completions", {"messages": []}, "messages"),
    ("chat/completions", {}, "messages"),
    ("chat/completions", {"messages": "hi"}, "messages"),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ("chat/completions", {"messages": [{"role": "user"}]}, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": None}]}, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi", "name": 5}]}, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi", "tool_calls": []}]}, "messages"),
    ("chat/completions", {"messages": [{"role": "tool"}]}, "messages"),
    ("chat/completions", {"messages": CHAT, "tools": [{"type": "function"}]}, "tools"),
    ("chat/completions", {"messages": CHAT, "response_format": {"type": "xml"}}, "response_format"),
    ("chat/completions", {"messages": CHAT, "response_format": {"type": "json_schema"}}, "response_format"),
    ("chat/completions", {"messages": CHAT, "top_logprobs": 3}, "top_logprobs"),
    ("chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 99}, "top_logprobs"),
    ("chat/completions", {"messages": CHAT, "max_completion_tokens": -3}, "max_completion_tokens"),
    ("chat/completions", {"messages": CHAT, "logprobs": 3}, "logprobs"),
    ("embeddings", {"input": "hi"}, "model"),  # this server has no embedding model
    ("embeddings", {"input": 5}, "input"),
]


@pytest.mark.parametrize("endpoint,body,param", CASES, ids=[f"{e}:{json.dumps(b)[:60]}" for e, b, _ in CASES])
def test_bad_value(http, endpoint, body, param):
    _error(http.post(f"/v1/{endpoint}", json=body), 400, param)


@pytest.mark.parametrize("raw", [b"{bad json", b'{"prompt": "\xff\xfe"}', b"", b"[]", b"42", b'"prompt"',
                                 b'{"prompt": "x", "prompt": 5}', b"\x00\x01\x02", b'{"prompt": "x"} trailing'])
def test_malformed_body(http, raw):
    for endpoint in ("completions", "chat/completions"):
        r = http.post(f"/v1/{endpoint}", content=raw, headers={"Content-Type": "application/json"})
        assert 400 <= r.status_code < 500, (raw, r.status_code, r.text)
        _error(r, r.status_code)


def test_huge_body(http):
    body = json.dumps({"prompt": "x" * 100_000}).encode()
    _error(http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"}), 413)

    def chunks():  # no Content-Length: the limit must hold while reading
        for _ in range(20):
            yield b" " * 8192

    _error(http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"}), 413)


def test_routes(http):
    _error(http.get("/v1/nothing"), 404)
    _error(http.get("/v1/completions"), 405)
    _error(http.post("/tokenize", json={"prompt": "a", "messages": CHAT}), 400)
    _error(http.post("/detokenize", json={"tokens": [-3]}), 400, "tokens")


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          None])
def test_a_body_that_is_not_declared_json_gets_415(http, content_type):
    """A web page may POST text/plain or a form to any origin without the browser asking first; such a
    request must not run a completion on this machine's server."""
    body = json.dumps({"prompt": "x", "max_tokens": 1}).encode()
    headers = {} if content_type is None else {"Content-Type": content_type}
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        _error(http.post(path, content=body, headers=headers), 415)
    ok = http.post("/v1/completions", content=body, headers={"Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 200, ok.text


def test_a_foreign_host_header_gets_400_on_a_loopback_server(http, server):
    """DNS rebinding: a page on evil.example re-points its name at 127.0.0.1 and calls the server with
    Host: evil.example. Bound to loopback, the server answers only loopback names."""
    port = server.url.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example"):
        _error(http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers={"Host": host}), 400)
        _error(http.get("/v1/models", headers={"Host": host}), 400)
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost"):
        assert http.get("/v1/models", headers={"Host": host}).status_code == 200, host


def test_good_request_still_served(http):
    r = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 2


# Property-based fuzzing over the whole request schema: tests/server/test_request_fuzz.py (1,000 requests
# through the server and the router).


def test_healthy_after_abuse(http):
    assert http.get("/health").json() == {"status": "ok"}
