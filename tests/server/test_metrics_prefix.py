"""/metrics as vLLM users scrape it: --metrics-prefix tokenmill | vllm | both, the process_* series,
request_time_per_output_token_seconds and iteration_tokens_total; the router reads a replica under either
prefix. A mock-engine server (the real app and engine core, no model) shows the live exposition."""

from __future__ import annotations

import httpx
import pytest
from server_helpers import parse_metrics, start_server

from tokenmill.cluster.replicas import parse_replica_metrics
from tokenmill.engine.core import EngineStats
from tokenmill.server.metrics import ServerMetrics


def _stats(prompt: int, gen: int, running: int = 3) -> EngineStats:
    return EngineStats(num_running=running, num_waiting=1, kv_cache_usage=0.5, prefix_cache_queries=0,
                       prefix_cache_hits=0, num_preemptions=0, prompt_tokens=prompt, generation_tokens=gen,
                       num_steps=1)


def test_prefixes():
    m = ServerMetrics("m")
    m.engine.stats = _stats(10, 5)
    m.step(_stats(10, 5))
    m.step(_stats(30, 9))  # a step of 24 tokens
    m.time_per_output_token.observe(0.02)
    own, vllm, both = (m.exposition(p).decode() for p in ("tokenmill", "vllm", "both"))
    assert "tokenmill:num_requests_running" in own and "vllm:" not in own
    assert "vllm:num_requests_running" in vllm and "tokenmill:" not in vllm
    assert "vllm:num_requests_running" in both and "tokenmill:num_requests_running" in both
    for text in (own, vllm, both):
        assert "process_resident_memory_bytes" in text and "python_info" in text
    values = parse_metrics(vllm)
    assert values['vllm:iteration_tokens_total_sum'] == 24.0
    assert values['vllm:request_time_per_output_token_seconds_count'] == 1.0
    # The router reads the engine's load from either, never double-counting "both".
    for text in (own, vllm, both):
        assert parse_replica_metrics(text)["num_requests_running"] == 3.0


@pytest.mark.slow
def test_live_server_speaks_vllm():
    """vLLM's metric names, and (--lenient-fields) another vendor's extra fields ignored with a warning."""
    s = start_server("--mock", "--metrics-prefix", "vllm", "--lenient-fields")
    try:
        r = httpx.post(f"{s.url}/v1/completions", timeout=30,
                       json={"prompt": "hello", "max_tokens": 5, "vendor_knob": {"x": 1}})
        assert r.status_code == 200, r.text
        r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "hello", "max_tokens": "5"}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"  # known fields stay strict
        values = parse_metrics(httpx.get(f"{s.url}/metrics", timeout=10).text)
        assert values['vllm:request_success_total{finished_reason="length"}'] == 1.0
        assert values["vllm:iteration_tokens_total_count"] >= 1.0
        assert values["vllm:request_time_per_output_token_seconds_count"] == 1.0
        assert values["process_resident_memory_bytes"] > 0
        assert not any(k.startswith("tokenmill:") for k in values)
        assert "ignoring the unknown request field 'vendor_knob'" in s.log_text(200)
    finally:
        assert s.stop() == 0
        s.remove_log()


def test_moe_expert_load_series_and_their_msgpack_round_trip():
    """An MoE model's tokens per expert, by layer, reach /metrics; the stats survive the engine -> frontend
    codec (int keys included)."""
    from tokenmill.server.protocol import Updates, from_engine_codec

    stats = _stats(10, 5)
    stats.moe_expert_tokens = {0: [3, 0, 5], 2: [1, 1, 6]}
    enc, dec = from_engine_codec()
    back = dec.decode(enc.encode(Updates(0.0, [], stats))).stats
    assert back.moe_expert_tokens == {0: [3, 0, 5], 2: [1, 1, 6]}
    m = ServerMetrics("m")
    m.engine.stats = back
    values = parse_metrics(m.exposition("tokenmill").decode())
    assert values['tokenmill:moe_expert_tokens_total{expert="2",layer="2"}'] == 6.0
    assert values['tokenmill:moe_expert_tokens_total{expert="1",layer="0"}'] == 0.0
    dense = ServerMetrics("m")
    dense.engine.stats = _stats(10, 5)
    assert "moe_expert_tokens" not in dense.exposition("tokenmill").decode()
