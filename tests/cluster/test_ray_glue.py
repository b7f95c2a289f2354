"""The Ray Serve glue without a Ray cluster: options, the Serve config file, and the request router's own
book-keeping (what it tells the routing policy). Builds objects only; starts nothing."""

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tokenmill.cluster import ray_serve
from tokenmill.cluster.asgi_bridge import HttpCall
from tokenmill.cluster.policy import RequestFeatures
from tokenmill.cluster.ray_config import RayServeConfig
from tokenmill.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_autoscaling_options_become_serves_autoscaling_config():
    assert RayServeConfig(replicas=3).autoscaling is None
    auto = RayServeConfig(min_replicas=0, max_replicas=4, target_ongoing_requests=6).autoscaling
    assert auto["min_replicas"] == 0 and auto["max_replicas"] == 4 and auto["initial_replicas"] == 1
    assert auto["target_ongoing_requests"] == 6
    assert auto["upscale_delay_s"] < auto["downscale_delay_s"]  # up fast, down slow


@pytest.mark.parametrize("kwargs,match", [
    ({"min_replicas": 1}, "both"), ({"min_replicas": 3, "max_replicas": 2}, "min_replicas"),
    ({"replicas": 0}, "replicas"), ({"replica_cpus": -1}, "replica_cpus"), ({"detach": True}, "--address"),
    ({"object_store_memory": "lots"}, "size"), ({"routing": "random"}, "routing policy"),
    ({"address": "auto", "num_cpus": 4}, "private Ray"),
])
def test_bad_ray_options_are_clear_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        RayServeConfig(**kwargs)


@pytest.mark.parametrize("path", ["deploy/ray/serve-config.yaml", "deploy/ray/rayservice.yaml"])
def test_the_shipped_serve_configs_build_the_application(path):
    doc = yaml.safe_load((REPO / path).read_text())
    if doc.get("kind") == "RayService":
        doc = yaml.safe_load(doc["spec"]["serveConfigV2"])
    (app,) = doc["applications"]
    assert app["import_path"] == "tokenmill.cluster.ray_serve:app_builder"
    built = ray_serve.app_builder(app["args"])
    assert type(built).__name__ == "Application"


def test_app_builder_rejects_unknown_options_and_ones_it_would_ignore():
    with pytest.raises(ValueError, match="num_thread"):
        ray_serve.app_builder({"num_thread": 2})
    with pytest.raises(ValueError, match="port"):
        ray_serve.app_builder({"port": 9000})


def _replica(name: str, **stats):
    from ray.serve._private.common import DeploymentID, ReplicaID

    rid = ReplicaID(unique_id=name, deployment_id=DeploymentID(name="EngineReplica", app_name="t"))
    return SimpleNamespace(replica_id=rid, routing_stats=stats)


def _pending(rid: str, prompt_tokens: int, max_tokens: int, hashes: tuple[int, ...] = ()):
    call = HttpCall("POST", "/v1/completions", features=RequestFeatures(prompt_tokens, max_tokens, hashes))
    return SimpleNamespace(args=[call], metadata=SimpleNamespace(internal_request_id=rid),
                           routing_context=SimpleNamespace(should_backoff=False))


def _router(policy: str):
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID

    r = ray_serve.TokenmillRequestRouter(deployment_id=DeploymentID(name="EngineReplica", app_name="t"),
                                         handle_source=DeploymentHandleSource.UNKNOWN)
    r.initialize_state(policy=policy, block_size=16)
    return r


def _ranked(router, replicas, pending) -> list[str]:
    ranks = asyncio.run(router.choose_replicas(replicas, pending))
    assert all(len(r) == 1 for r in ranks)  # singleton ranks: Serve tries them in order
    names = [r[0].replica_id.unique_id for r in ranks]
    assert sorted(names) == sorted(r.replica_id.unique_id for r in replicas)  # every replica, once
    return names


def test_request_router_counts_its_inflight_work_per_replica():
    router = _router("least-load")
    a, b = _replica("a"), _replica("b")
    big = _pending("r1", 1500, 500)
    assert _ranked(router, [a, b], big)[0] in ("a", "b")
    assert big.routing_context.should_backoff  # Serve backs off between rounds when all are full
    router.on_request_routed(big, a.replica_id, None)  # (Serve may route elsewhere than ranked first)
    # While the big request runs on a, small ones go to b.
    assert all(_ranked(router, [a, b], _pending(f"s{i}", 5, 8))[0] == "b" for i in range(4))
    router.on_request_completed(a.replica_id, "r1")
    assert router._work[a.replica_id].in_flight == 0 and router._work[a.replica_id].outstanding_tokens == 0
    router.on_request_completed(a.replica_id, "unknown-id")  # completions of requests it never saw: ignored


def test_request_router_reads_the_replicas_reported_load():
    router = _router("least-load")
    busy, idle = _replica("busy", running=9, waiting=5, kv_cache_usage=0.9), _replica("idle", running=0)
    assert _ranked(router, [busy, idle], _pending("r", 5, 4)) == ["idle", "busy"]


def test_prefix_aware_sends_a_shared_prefix_back_to_the_replica_that_has_it():
    router = _router("prefix-aware")
    reps = [_replica(n) for n in "abc"]
    prefix = tuple(range(100, 108))  # 8 blocks of a shared system prompt
    first = _pending("p0", 140, 8, prefix + (1,))
    where = _ranked(router, reps, first)[0]
    router.on_request_routed(first, next(r.replica_id for r in reps if r.replica_id.unique_id == where), None)
    router.on_request_completed(next(r.replica_id for r in reps if r.replica_id.unique_id == where), "p0")
    for i in range(3):
        assert _ranked(router, reps, _pending(f"p{i + 1}", 140, 8, prefix + (2 + i,)))[0] == where


def test_prefix_aware_falls_back_to_least_load_when_the_match_is_overloaded():
    router = _router("prefix-aware")
    a, b = _replica("a"), _replica("b")
    prefix = tuple(range(200, 208))
    for i in range(6):  # pile long requests with the prefix onto a
        p = _pending(f"h{i}", 140, 2000, prefix)
        router.on_request_routed(p, a.replica_id, None)
    assert _ranked(router, [a, b], _pending("next", 140, 8, prefix))[0] == "b"


def test_replicas_that_leave_are_forgotten():
    router = _router("prefix-aware")
    a, b = _replica("a"), _replica("b")
    router.on_request_routed(_pending("x", 140, 8, (1, 2, 3)), a.replica_id, None)

    async def update():  # Serve calls it on its event loop
        router.update_replicas([b])

    asyncio.run(update())
    assert a.replica_id not in router._work


def test_round_robin_visits_each_replica_in_turn():
    router = _router("round-robin")
    reps = [_replica(n) for n in "abc"]
    firsts = [_ranked(router, reps, None)[0] for _ in range(6)]
    assert firsts == firsts[:3] * 2 and sorted(firsts[:3]) == ["a", "b", "c"]


class _Upstream:
    """A replica's response generator: yields its chunks, then stalls for ever if told to."""

    def __init__(self, chunks: list[bytes], stall: bool):
        self.chunks, self.stall, self.cancelled = list(chunks), stall, False

    def __aiter__(self):
        return self

    async def __anext__(self) -> bytes:
        if self.chunks:
            return self.chunks.pop(0)
        if self.stall:
            await asyncio.sleep(3600)
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled = True


def test_a_stream_whose_replica_stalls_ends_with_an_error_event_and_is_cancelled():
    async def relay(up: _Upstream) -> list[bytes]:
        return [c async for c in ray_serve._relay(up, b"data: {}\n\n", True, 0.2)]

    stalled = _Upstream([b"data: {\"a\": 1}\n\n"], stall=True)
    out = asyncio.run(asyncio.wait_for(relay(stalled), 10))
    assert out[:2] == [b"data: {}\n\n", b"data: {\"a\": 1}\n\n"]
    assert b"sent nothing for 0.2s" in out[2] and b'"error"' in out[2] and out[3] == b"data: [DONE]\n\n"
    assert stalled.cancelled
    healthy = _Upstream([b"data: [DONE]\n\n"], stall=False)
    assert asyncio.run(relay(healthy)) == [b"data: {}\n\n", b"data: [DONE]\n\n"] and not healthy.cancelled


def test_upstream_timeout_option_is_checked():
    assert RayServeConfig().upstream_timeout == 600.0
    with pytest.raises(ConfigError, match="upstream_timeout"):
        RayServeConfig(upstream_timeout=0)
