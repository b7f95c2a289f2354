"""ReplicaSet book-keeping without a network: health transitions, load accounting, stats from a real
server's /metrics exposition, cache retention for kv-aware routing."""

from __future__ import annotations

import asyncio

from prometheus_client import generate_latest

from tokenmill.cluster.replicas import Load, ReplicaSet, ReplicaState, parse_replica_metrics
from tokenmill.engine.core import EngineStats
from tokenmill.server.metrics import ServerMetrics


def make_set(max_failures: int = 3) -> ReplicaSet:
    return ReplicaSet(index_blocks=100, max_failures=max_failures, health_interval=1.0, health_timeout=1.0,
                      connect_timeout=1.0, upstream_timeout=10.0)


def exposition(hits: int, queries: int, running: int = 2, waiting: int = 5, kv: float = 0.4) -> str:
    m = ServerMetrics("default")
    m.engine.stats = EngineStats(running, waiting, kv, queries, hits, 0, 0, 0, 0)
    return generate_latest(m.registry).decode()


def test_stats_are_read_from_a_real_server_exposition():
    vals = parse_replica_metrics(exposition(hits=640, queries=1000))
    assert vals == {"num_requests_running": 2, "num_requests_waiting": 5, "kv_cache_usage_perc": 0.4,
                    "prefix_cache_queries": 1000, "prefix_cache_hits": 640}


def test_failures_take_a_replica_out_and_a_passing_check_is_needed_to_return():
    rs = make_set(max_failures=3)
    r = rs.add("http://127.0.0.1:1")
    r.state = ReplicaState.HEALTHY
    r.index.insert((1, 2, 3))
    rs.record_failure(r, "status_5xx", "500")
    rs.record_failure(r, "timeout", "slow")
    assert r.routable
    rs.record_success(r)  # consecutive failures only
    for _ in range(3):
        rs.record_failure(r, "reset", "gone")
    assert r.state is ReplicaState.UNHEALTHY and rs.routable() == []
    assert len(r.index) == 0  # whatever comes back has a cold cache
    r2 = rs.add("http://127.0.0.1:2")
    r2.state = ReplicaState.HEALTHY
    rs.record_failure(r2, "connect", "refused", fatal=True)  # nothing listens: out at once
    assert r2.state is ReplicaState.UNHEALTHY


def test_a_draining_replica_never_rejoins_and_reports_idle():
    async def run() -> None:
        rs = make_set()
        r = rs.add("http://127.0.0.1:1", name="a")
        r.state = ReplicaState.HEALTHY
        load = Load(r, prefill_tokens=100, decode_tokens=20)
        assert (r.in_flight, r.outstanding_tokens) == (1, 120)
        rs.drain("a")
        rs._set_state(r, ReplicaState.HEALTHY, "health passed")
        assert r.state is ReplicaState.DRAINING and rs.routable() == []
        assert not await rs.wait_idle("a", timeout=0.05)
        load.first_token()
        load.tokens(5)
        assert r.outstanding_tokens == 15
        load.release()
        load.release()  # idempotent
        assert (r.in_flight, r.outstanding_tokens) == (0, 0)
        assert await rs.wait_idle("a", timeout=1)
        await rs.remove("a")
        assert rs.all() == []

    asyncio.run(run())


def test_cache_retention_follows_reported_hits_against_expected_ones():
    rs = make_set()
    r = rs.add("http://127.0.0.1:1")
    rs._update_stats(r, exposition(hits=0, queries=0))
    r.expected_hits = 1000
    rs._update_stats(r, exposition(hits=1000, queries=1200))  # everything expected was there
    assert r.retention == 1.0
    for _ in range(10):  # the replica keeps reporting a quarter of what the router expected
        r.expected_hits = 1000
        hits = r.stats.prefix_cache_hits + 250
        rs._update_stats(r, exposition(hits=int(hits), queries=int(hits) * 2))
    assert 0.25 <= r.retention < 0.3
    assert r.stats.waiting == 5 and r.stats.kv_usage == 0.4
    assert r.view(matched_tokens=64).cache_retention == r.retention
