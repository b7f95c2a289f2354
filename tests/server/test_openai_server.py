"""The real server through the official `openai` client: same text as the offline LLM, streaming and not,
sync and async; 64 concurrent streams; 32 streams cut mid-way free their KV blocks."""

from __future__ import annotations

import asyncio
import gc

import httpx
import openai
import pytest
from server_helpers import ServerProcess, start_server

from tokenmill import LLM, SamplingParams

pytestmark = pytest.mark.slow

API_KEY = "test-key"
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name three colors."}]
# (name, kind, offline SamplingParams, request kwargs)
CASES = [
    ("greedy", "completion", SamplingParams(max_tokens=8, temperature=0.0), dict(max_tokens=8, temperature=0)),
    ("sampled", "completion", SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=1234),
     dict(max_tokens=8, temperature=0.9, top_p=0.9, seed=1234)),
    ("chat-greedy", "chat", SamplingParams(max_tokens=8, temperature=0.0), dict(max_tokens=8, temperature=0)),
    ("chat-sampled", "chat", SamplingParams(max_tokens=8, temperature=1.0, seed=7, top_k=40),
     dict(max_tokens=8, temperature=1.0, seed=7, extra_body={"top_k": 40})),
    ("n2", "completion", SamplingParams(n=2, max_tokens=6, temperature=1.0, seed=5),
     dict(n=2, max_tokens=6, temperature=1.0, seed=5)),
]


@pytest.fixture(scope="module")
def offline() -> dict[str, list[str]]:
    """Reference texts from the offline LLM, computed before the server loads its own copy of the model."""
    llm = LLM(kv_cache_memory="256MiB", dtype="float32", quantization="none")  # exact whatever the batch shape
    ref = {}
    for name, kind, params, _ in CASES:
        outs = llm.generate(PROMPT, params, use_tqdm=False) if kind == "completion" else llm.chat(CHAT, params,
                                                                                                  use_tqdm=False)
        ref[name] = [o.text for o in outs[0].outputs]
    stop_word = ref["greedy"][0].split()[1]
    ref["stop"] = [llm.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0.0, stop=[stop_word]),
                                use_tqdm=False)[0].outputs[0].text, stop_word]
    del llm
    gc.collect()
    return ref


@pytest.fixture(scope="module")
def server(offline) -> ServerProcess:
    # The engine in its own process here (the IPC path); test_server_bad_inputs runs it in-process.
    s = start_server("--no-inproc", "--dtype", "float32", "--quantization", "none", api_key=API_KEY)
    yield s
    assert s.stop() == 0, s.log_text()
    s.assert_clean_log()
    s.remove_log()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def aclient(server):
    """A factory: an async client's connections belong to one event loop, so each asyncio.run makes its own."""
    return lambda: openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=300)


def _case(name: str):
    return next(c for c in CASES if c[0] == name)


def test_sync_matches_offline(client, offline):
    for name, kind, _, kw in CASES:
        if kind == "completion":
            r = client.completions.create(model="default", prompt=PROMPT, **kw)
            texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
        else:
            r = client.chat.completions.create(model="default", messages=CHAT, **kw)
            texts = [c.message.content for c in sorted(r.choices, key=lambda c: c.index)]
        assert texts == offline[name], name
        assert r.usage.completion_tokens <= kw["max_tokens"] * kw.get("n", 1)
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_sync_stream_matches_offline(client, offline):
    for name in ("sampled", "chat-greedy", "n2"):
        _, kind, _, kw = _case(name)
        n = kw.get("n", 1)
        texts = [""] * n
        finish = [None] * n
        usage = None
        if kind == "completion":
            stream = client.completions.create(model="default", prompt=PROMPT, stream=True,
                                               stream_options={"include_usage": True}, **kw)
            for chunk in stream:
                usage = chunk.usage or usage
                for c in chunk.choices:
                    texts[c.index] += c.text
                    finish[c.index] = c.finish_reason or finish[c.index]
        else:
            stream = client.chat.completions.create(model="default", messages=CHAT, stream=True,
                                                    stream_options={"include_usage": True}, **kw)
            for chunk in stream:
                usage = chunk.usage or usage
                for c in chunk.choices:
                    texts[c.index] += c.delta.content or ""
                    finish[c.index] = c.finish_reason or finish[c.index]
        assert texts == offline[name], name
        assert all(f in ("stop", "length") for f in finish)
        assert usage is not None and usage.completion_tokens <= kw["max_tokens"] * n


def test_async_matches_offline(aclient, offline):
    async def run() -> None:
        client = aclient()
        _, _, _, kw = _case("chat-sampled")
        r = await client.chat.completions.create(model="default", messages=CHAT, **kw)
        assert r.choices[0].message.content == offline["chat-sampled"][0]
        _, _, _, kw = _case("greedy")
        text = ""
        stream = await client.completions.create(model="default", prompt=PROMPT, stream=True, **kw)
        async for chunk in stream:
            text += chunk.choices[0].text if chunk.choices else ""
        assert text == offline["greedy"][0]

    asyncio.run(run())


def test_stop_string_matches_offline(client, offline):
    expected, word = offline["stop"]
    r = client.completions.create(model="default", prompt=PROMPT, max_tokens=8, temperature=0, stop=[word])
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason == "stop"


def test_logprobs_shapes(client):
    r = client.completions.create(model="default", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(t) == 3 for t in lp.top_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text
    # Greedy: the chosen token is the most likely one.
    assert all(abs(max(t.values()) - v) < 1e-4 for t, v in zip(lp.top_logprobs, lp.token_logprobs, strict=True))
    c = client.chat.completions.create(model="default", messages=CHAT, max_tokens=3, temperature=0, logprobs=True,
                                       top_logprobs=2, extra_body={"ignore_eos": True})
    content = c.choices[0].logprobs.content
    assert len(content) == 3 and all(len(e.top_logprobs) == 2 for e in content)
    assert "".join(e.token for e in content) == c.choices[0].message.content


def test_models_health_tokenize(server):
    h = server.headers
    models = httpx.get(f"{server.url}/v1/models", headers=h).json()
    assert models["data"][0]["id"] == "default" and models["data"][0]["max_model_len"] > 0
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    toks = httpx.post(f"{server.url}/tokenize", json={"prompt": PROMPT}, headers=h).json()
    assert toks["count"] == len(toks["tokens"]) > 0
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": toks["tokens"]}, headers=h).json()["prompt"]
    assert text == PROMPT
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": CHAT}, headers=h).json()
    assert chat["count"] > toks["count"]


def test_api_key_required(server):
    body = {"prompt": "x", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(f"{server.url}/v1/completions", json=body, headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.get(f"{server.url}/metrics").status_code == 200  # probes need no key


def test_64_concurrent_streams(server, aclient):
    """All complete; the streamed tokens (counted via per-token logprobs) and usage agree with max_tokens."""

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[int, int, str | None]:
        max_tokens = 2 + i % 4
        stream = await client.completions.create(
            model="default", prompt=f"Story number {i}:", max_tokens=max_tokens, temperature=0.8, seed=i,
            logprobs=0, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        n_tokens, usage, finish = 0, None, None
        async for chunk in stream:
            usage = chunk.usage or usage
            for c in chunk.choices:
                n_tokens += len(c.logprobs.tokens) if c.logprobs else 0
                finish = c.finish_reason or finish
        assert usage is not None
        assert usage.completion_tokens == max_tokens
        assert usage.total_tokens == usage.prompt_tokens + max_tokens
        return max_tokens, n_tokens, finish

    async def run():
        client = aclient()
        return await asyncio.gather(*(one(client, i) for i in range(64)))

    results = asyncio.run(run())
    assert len(results) == 64
    for max_tokens, n_tokens, finish in results:
        assert n_tokens == max_tokens
        assert finish == "length"
    m = server.metrics()
    assert m["tokenmill:request_success_total{finished_reason=\"length\"}"] >= 64


def _wait_idle(server: ServerProcess, timeout: float = 60.0) -> dict[str, float]:
    import time

    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if (m["tokenmill:num_requests_running"] == 0 and m["tokenmill:num_requests_waiting"] == 0
                and m["tokenmill:kv_cache_usage_perc"] == 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.2)


def test_32_cut_streams_free_their_blocks(server):
    """Clients that leave mid-stream (and before the first token, and while waiting non-streamed) abort."""
    before = server.metrics()['tokenmill:request_success_total{finished_reason="abort"}']
    body = {"model": "default", "max_tokens": 400, "temperature": 0.7, "ignore_eos": True, "stream": True}

    async def cut(i: int, client: httpx.AsyncClient) -> int:
        seen = 0
        async with client.stream("POST", "/v1/completions", json={**body, "prompt": f"Tell me about {i}"}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    seen += 1
                    if seen >= 1 + i % 3:
                        break  # leaving the context manager closes the connection mid-stream
        return seen

    async def run():
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=120) as client:
            return await asyncio.gather(*(cut(i, client) for i in range(32)))

    assert all(s >= 1 for s in asyncio.run(run()))
    # A non-streaming client that gives up before its answer.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", headers=server.headers, timeout=1.5,
                   json={**body, "stream": False, "prompt": "Patience"})
    m = _wait_idle(server)
    assert m["tokenmill:num_requests_running"] == 0
    assert m["tokenmill:num_requests_waiting"] == 0
    assert m["tokenmill:kv_cache_usage_perc"] == 0
    assert m['tokenmill:request_success_total{finished_reason="abort"}'] - before == 33
    # No request ran to its 400 tokens.
    assert m['tokenmill:request_generation_tokens_bucket{le="200.0"}'] == m["tokenmill:request_generation_tokens_count"]


def test_metrics_names(server):
    httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 1})  # no key: rejected
    httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 2, "ignore_eos": True},
               headers=server.headers, timeout=60)
    m = server.metrics()
    for name in ("tokenmill:num_requests_running", "tokenmill:num_requests_waiting", "tokenmill:kv_cache_usage_perc",
                 "tokenmill:prefix_cache_queries_total", "tokenmill:prefix_cache_hits_total",
                 "tokenmill:num_preemptions_total", "tokenmill:prompt_tokens_total",
                 "tokenmill:generation_tokens_total", "tokenmill:time_to_first_token_seconds_count",
                 "tokenmill:inter_token_latency_seconds_count", "tokenmill:e2e_request_latency_seconds_count",
                 "tokenmill:request_queue_time_seconds_count", "tokenmill:request_prefill_time_seconds_count",
                 "tokenmill:request_decode_time_seconds_count",
                 'tokenmill:request_rejected_total{reason="queue_requests"}',
                 'tokenmill:request_success_total{finished_reason="stop"}'):
        assert name in m, name
    assert m["tokenmill:generation_tokens_total"] > 0
    assert m["tokenmill:time_to_first_token_seconds_count"] > 0
    assert m['tokenmill:request_rejected_total{reason="unauthorized"}'] >= 1
