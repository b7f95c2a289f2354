"""The router end to end: `tokenmill router --spawn 3 --mock` (real router, real servers, mock engines)
driven by the official openai client, streaming and not, at a few hundred requests."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

import httpx
import openai
import pytest
from router_helpers import maps_torch, parse_metrics, start_router

pytestmark = pytest.mark.slow

# Slow enough decode steps that a 400-token stream is still running when the test walks away from it.
MOCK_ARGS = ("--mock", "--replica-args=--mock-base-ms 4 --mock-decode-ms-per-seq 0.2")


@pytest.fixture(scope="module")
def router():
    r = start_router("--spawn", "3", *MOCK_ARGS, "--routing", "prefix-aware", "--health-interval", "0.5",
                     replicas=3)
    yield r
    code = r.stop()
    assert code == 0, r.log_text()
    assert "Traceback" not in r.own_log(), r.own_log()


@pytest.fixture(scope="module")
def client(router):
    return openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0, timeout=120)


def words(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "ember", "maple",
                                "quartz", "violet", "harbor"]) for _ in range(n))


def test_completion_and_chat_through_the_router(client, router):
    r = client.completions.with_raw_response.create(model="default", prompt="The capital of France is",
                                                    max_tokens=12, temperature=0)
    assert r.headers["x-tokenmill-replica"].startswith("replica-")
    out = r.parse()
    assert out.choices[0].finish_reason == "length" and out.choices[0].text
    assert out.usage.completion_tokens == 12 and out.usage.prompt_tokens > 0

    chunks = list(client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=20, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 20

    assert [m.id for m in client.models.list().data] == ["default"]
    tok = httpx.post(f"{router.url}/tokenize", json={"prompt": "hello world"}, timeout=30).json()
    assert tok["count"] == len(tok["tokens"]) > 0


def test_client_errors_pass_through_and_do_not_count_as_replica_failures(client, router):
    before = router.metrics()
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="default", prompt="hi", max_tokens=-1)
    with pytest.raises(openai.BadRequestError, match="does not exist"):
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=4)
    r = httpx.post(f"{router.url}/v1/completions", content=b"{not json", timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.get(f"{router.url}/v1/nothing-here", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["message"]
    # A request's own timeout is its error, not the replica's: a 408, or in a stream an error event with code
    # 408, passed through as it came, however many arrive (they once took every replica out of rotation).
    for i in range(8):
        body = {"model": "default", "prompt": f"hi {i}", "max_tokens": 50, "timeout": 1e-9, "stream": i % 2 == 0}
        r = httpx.post(f"{router.url}/v1/completions", json=body, timeout=30)
        if body["stream"]:
            assert r.status_code == 200, r.text
            events = [ln.removeprefix("data: ") for ln in r.text.splitlines() if ln.startswith("data: ")]
            assert events[-1] == "[DONE]" and '"code":408' in events[-2].replace(" ", ""), r.text
        else:
            assert r.status_code == 408 and "timed out" in r.json()["error"]["message"], r.text
    after = router.metrics()
    fails = {k: v for k, v in after.items() if k.startswith("tokenmill:router_replica_failures")}
    assert fails == {k: v for k, v in before.items() if k in fails}
    assert after.get("tokenmill:router_retries_total{reason=\"status_5xx\"}", 0) == 0
    assert all(r["state"] == "healthy" for r in router.replicas())


def test_prefix_aware_routing_keeps_a_shared_prefix_on_one_replica(client, router):
    def cache_counters() -> dict[str, tuple[float, float]]:
        out = {}
        for rep in router.replicas():
            m = parse_metrics(httpx.get(f"{rep['url']}/metrics", timeout=10).text)
            out[rep["name"]] = (m["tokenmill:prefix_cache_hits_total"], m["tokenmill:prefix_cache_queries_total"])
        return out

    before = cache_counters()
    system = words(400, seed=1)
    served = []
    for i in range(8):
        r = client.completions.with_raw_response.create(model="default", prompt=f"{system}\nQuestion {i}: why?",
                                                        max_tokens=4)
        served.append(r.headers["x-tokenmill-replica"])
    assert len(set(served)) == 1, served  # an idle cluster: the match wins every time
    m = router.metrics()
    assert m['tokenmill:router_routing_decisions_total{policy="prefix-aware",reason="prefix_hit"}'] >= 7
    # The replica's own prefix cache agrees: after the first request, nearly every prompt token was cached.
    after = cache_counters()
    hits = after[served[0]][0] - before[served[0]][0]
    queries = after[served[0]][1] - before[served[0]][1]
    assert hits > 0.75 * queries, (hits, queries)


def test_hundreds_of_concurrent_requests_all_complete_across_replicas(router):
    async def run() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0, timeout=300)
        systems = [words(200, seed=100 + g) for g in range(6)]

        async def one(i: int) -> str:
            prompt = f"{systems[i % 6]}\nUser {i}: hello"
            if i % 2:
                r = await aclient.completions.with_raw_response.create(model="default", prompt=prompt, max_tokens=16)
                assert r.parse().usage.completion_tokens == 16
                return r.headers["x-tokenmill-replica"]
            n = 0
            stream = await aclient.completions.create(model="default", prompt=prompt, max_tokens=16, stream=True)
            async for c in stream:
                n += 1 if c.choices[0].text else 0
                finish = c.choices[0].finish_reason
            assert n > 0 and finish == "length"
            return "stream"

        try:
            return await asyncio.gather(*(one(i) for i in range(240)))
        finally:
            await aclient.close()

    before = router.metrics()
    served = asyncio.run(run())
    assert len(served) == 240
    after = router.metrics()
    per = {r: after[f'tokenmill:router_requests_total{{replica="{r}"}}'] -
           before.get(f'tokenmill:router_requests_total{{replica="{r}"}}', 0) for r in ("replica-0", "replica-1",
                                                                                       "replica-2")}
    assert sum(per.values()) == 240 and min(per.values()) > 0, per
    assert Counter(s for s in served if s != "stream")  # non-streaming answers named their replica
    assert after['tokenmill:router_replicas{state="healthy"}'] == 3
    # Everything finished: the router's own books are back to zero.
    assert all(r["in_flight"] == 0 and r["outstanding_tokens"] == 0 for r in router.replicas())


def test_client_disconnect_aborts_the_request_on_the_replica(client, router):
    def aborts() -> float:
        total = 0.0
        for rep in router.replicas():
            m = parse_metrics(httpx.get(f"{rep['url']}/metrics", timeout=10).text)
            total += m.get('tokenmill:request_success_total{finished_reason="abort"}', 0.0)
        return total

    before = aborts()
    stream = client.completions.create(model="default", prompt="Count to a thousand.", max_tokens=2000,
                                       stream=True)
    got = 0
    for _ in stream:
        got += 1
        if got == 3:
            break
    stream.close()
    deadline = time.monotonic() + 30
    while aborts() == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert aborts() == before + 1
    deadline = time.monotonic() + 10
    while any(r["in_flight"] for r in router.replicas()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(r["in_flight"] == 0 for r in router.replicas())


def test_router_features_tokenize_exactly_as_the_replicas_do(router):
    from tokenmill.cluster.features import Featurizer, load_tokenizer
    from tokenmill.config import EngineConfig

    feat = Featurizer(16, hash_prompts=True, tokenizer=load_tokenizer(EngineConfig()))
    replica = router.replicas()[0]["url"]
    bodies = [{"messages": [{"role": "developer", "content": "Be brief."},
                            {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text",
                                                                                     "text": "there"}]}]},
              {"prompt": "The capital of France is"}]
    for body in bodies:
        expected = httpx.post(f"{replica}/tokenize", json=body, timeout=30).json()["tokens"]
        assert asyncio.run(feat.prompt_ids(body)) == expected
        f = asyncio.run(feat.features({**body, "max_tokens": 7, "n": 2}))
        assert f.prompt_tokens == len(expected) and f.max_tokens == 14
        assert len(f.block_hashes) == len(expected) // 16


def test_router_and_mock_replicas_never_load_torch(router):
    assert not maps_torch(router.proc.pid)
    pids = [r["pid"] for r in router.replicas()]
    assert len(pids) == 3 and not any(maps_torch(p) for p in pids)


def test_router_metrics_exposition(router):
    m = router.metrics()
    for name in ('tokenmill:router_replicas{state="healthy"}', 'tokenmill:router_in_flight{replica="replica-0"}',
                 'tokenmill:router_retries_total{reason="connect"}', "tokenmill:router_time_to_first_token_seconds_count",
                 'tokenmill:router_replica_kv_usage{replica="replica-2"}'):
        assert name in m, name
    assert m["tokenmill:router_time_to_first_token_seconds_count"] > 0
    page = httpx.get(f"{router.url}/dashboard", timeout=10)  # the page the server serves, over these series
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and b"/metrics" in page.content


def test_the_router_guards_its_door_as_the_server_does(router):
    """Bound to loopback: a foreign Host is refused (DNS rebinding); POST bodies must be JSON (a page cannot
    send that cross-origin without a preflight); bodies past --max-body-bytes get 413; each is counted."""
    url = f"{router.url}/v1/completions"
    body = {"model": "default", "prompt": "hi", "max_tokens": 2}
    r = httpx.post(url, json=body, headers={"Host": "evil.example"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host"
    r = httpx.post(url, content=b'{"prompt": "hi"}', headers={"Content-Type": "text/plain"}, timeout=30)
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    r = httpx.post(url, content=b"x" * (5 << 20), headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 413
    assert httpx.post(url, json=body, timeout=30).status_code == 200
    m = router.metrics()
    for reason in ("bad_host", "unsupported_media_type", "body_too_large"):
        assert m[f'tokenmill:router_unrouted_total{{reason="{reason}"}}'] >= 1, reason


def test_the_router_checks_api_keys_and_its_replicas_do_too():
    r = start_router("--spawn", "1", "--mock", "--api-key", "k1,k2", "--protect-all-paths", replicas=1)
    try:
        url = f"{r.url}/v1/completions"
        body = {"model": "default", "prompt": "hi", "max_tokens": 2}
        assert httpx.post(url, json=body, timeout=30).status_code == 401
        assert httpx.post(url, json=body, headers={"Authorization": "Bearer nope"}, timeout=30).status_code == 401
        for key in ("k1", "k2"):
            got = httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)
            assert got.status_code == 200, got.text
        assert httpx.get(f"{r.url}/health", timeout=30).status_code == 200  # health needs no key
        # --protect-all-paths: the router's pages need the key too
        for page in ("/metrics", "/router/replicas", "/docs", "/dashboard"):
            assert httpx.get(f"{r.url}{page}", timeout=30).status_code == 401, page
        # The spawned replica got the router's key (through its environment): it is no way around the router.
        replica = r.replicas()[0]["url"]
        assert httpx.post(f"{replica}/v1/completions", json=body, timeout=30).status_code == 401
        ok = httpx.post(f"{replica}/v1/completions", json=body, headers={"Authorization": "Bearer k2"}, timeout=30)
        assert ok.status_code == 200, ok.text
    finally:
        assert r.stop() == 0, r.log_text()
