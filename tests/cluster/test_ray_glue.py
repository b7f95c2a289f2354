"""The Ray Serve glue without a Ray cluster: options, the Serve config file, and the request router's own
book-keeping (what it tells the routing policy). Builds objects only; starts nothing."""

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tokenmill.cluster.asgi_bridge import HttpCall, RoutingHint
from tokenmill.cluster.ray_config import RayServeConfig
from tokenmill.errors import ConfigError

ray_serve = pytest.importorskip("tokenmill.cluster.ray_serve", reason="needs the 'ray' extra")
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
    ({"object_store_memory": "lots"}, "size"),
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


def test_app_builder_rejects_unknown_options():
    with pytest.raises(ValueError, match="num_thread"):
        ray_serve.app_builder({"num_thread": 2})


def _replica(name: str, **stats):
    from ray.serve._private.common import DeploymentID, ReplicaID

    rid = ReplicaID(unique_id=name, deployment_id=DeploymentID(name="EngineReplica", app_name="t"))
    return SimpleNamespace(replica_id=rid, routing_stats=stats)


def _pending(rid: str, prompt: str, max_tokens: int):
    call = HttpCall("POST", "/v1/completions", hint=RoutingHint(prompt[:100], len(prompt), max_tokens))
    return SimpleNamespace(args=[call], metadata=SimpleNamespace(internal_request_id=rid),
                           routing_context=SimpleNamespace(should_backoff=False))


def _router(policy: str):
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID

    r = ray_serve.TokenmillRequestRouter(deployment_id=DeploymentID(name="EngineReplica", app_name="t"),
                                         handle_source=DeploymentHandleSource.UNKNOWN)
    r.initialize_state(policy=policy)
    return r


def test_request_router_counts_its_inflight_work_per_replica_and_ranks_every_replica():
    router = _router("least-load")
    a, b = _replica("a"), _replica("b")

    def rank(pending):
        ranks = asyncio.run(router.choose_replicas([a, b], pending))
        assert all(len(r) == 1 for r in ranks) and {r[0].replica_id.unique_id for r in ranks} == {"a", "b"}
        return [r[0].replica_id.unique_id for r in ranks]

    big = _pending("r1", "x" * 4000, 500)  # ~1,500 tokens of work
    first = rank(big)[0]
    assert first in ("a", "b")
    router.on_request_routed(big, a.replica_id, None)
    assert big.routing_context.should_backoff  # Serve backs off between rounds when all are full
    # While the big request runs on a, small ones go to b.
    assert rank(_pending("r2", "hi", 8))[0] == "b"
    router.on_request_completed(a.replica_id, "r1")
    assert router._per_replica == {}
    router.on_request_completed(a.replica_id, "unknown-id")  # completions of requests it never saw: ignored


def test_request_router_reads_the_replicas_reported_load():
    router = _router("least-load")
    busy, idle = _replica("busy", running=9, waiting=5, kv_cache_usage=0.9), _replica("idle", running=0)
    ranks = asyncio.run(router.choose_replicas([busy, idle], _pending("r", "hello", 4)))
    assert ranks[0][0] is idle


def test_round_robin_visits_each_replica_in_turn():
    router = _router("round-robin")
    reps = [_replica(n) for n in "abc"]
    firsts = [asyncio.run(router.choose_replicas(reps, None))[0][0].replica_id.unique_id for _ in range(6)]
    assert sorted(firsts) == sorted("abcabc") and firsts[:3] != firsts[1:4]
