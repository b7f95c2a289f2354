"""The router's Prometheus metrics (`tokenmill:router_*`), in a registry of its own.

Per-replica gauges (state, in-flight, outstanding tokens, the replica's own running/waiting/KV usage as
last polled) are read from the live ReplicaSet at scrape time, so replicas that come and go never leave
stale series behind. Counters count what happened: requests per replica, decisions by reason, retries,
failures, streams cut after their first token, restarts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from tokenmill.cluster.replicas import Replica

disable_created_metrics()

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0,
                 60.0, 120.0, 240.0)
REPLICA_STATES = ("starting", "healthy", "unhealthy", "draining")
DECISION_REASONS = ("round_robin", "least_load", "prefix_hit", "prefix_miss", "prefix_imbalance", "kv_cost")


class _ReplicaCollector(Collector):
    def __init__(self, replicas: Callable[[], list[Replica]]):
        self.replicas = replicas

    def collect(self) -> Iterator[Metric]:
        reps = self.replicas()
        count = GaugeMetricFamily("tokenmill:router_replicas", "Replicas known to the router, by state.",
                                  labels=["state"])
        for state in REPLICA_STATES:
            count.add_metric([state], sum(1 for r in reps if r.state.value == state))
        yield count
        per = {
            "in_flight": ("Requests the router has in flight on the replica.", lambda r: r.in_flight),
            "outstanding_tokens": ("Tokens of work the router has sent the replica and not seen done "
                                   "(prefill not started + output not yet streamed).", lambda r: r.outstanding_tokens),
            "replica_running": ("The replica's tokenmill:num_requests_running, last polled.",
                                lambda r: r.stats.running),
            "replica_waiting": ("The replica's tokenmill:num_requests_waiting, last polled.",
                                lambda r: r.stats.waiting),
            "replica_kv_usage": ("The replica's tokenmill:kv_cache_usage_perc, last polled.",
                                 lambda r: r.stats.kv_usage),
            "replica_cache_retention": ("Prefix hits the replica reported over hits the router expected there "
                                        "(smoothed; 1 = its cache keeps what was sent).", lambda r: r.retention),
            "replica_healthy": ("1 when the replica is in rotation.", lambda r: float(r.state.value == "healthy")),
        }
        for name, (doc, get) in per.items():
            g = GaugeMetricFamily(f"tokenmill:router_{name}", doc, labels=["replica"])
            for r in reps:
                g.add_metric([r.name], float(get(r)))
            yield g


class RouterMetrics:
    def __init__(self, policy: str):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.policy = policy
        self.requests = Counter("tokenmill:router_requests", "Requests sent to each replica (retries included).",
                                ["replica"], registry=r)
        self.decisions = Counter("tokenmill:router_routing_decisions", "Routing decisions, by policy and reason.",
                                 ["policy", "reason"], registry=r)
        self.retries = Counter("tokenmill:router_retries", "Requests retried on another replica, by cause.",
                               ["reason"], registry=r)
        self.failures = Counter("tokenmill:router_replica_failures",
                                "Failures seen talking to a replica (connect, 5xx, timeout, reset), by kind.",
                                ["replica", "kind"], registry=r)
        self.stream_errors = Counter("tokenmill:router_stream_errors",
                                     "Streams ended with an error event after their first token.", ["replica"],
                                     registry=r)
        self.unrouted = Counter("tokenmill:router_unrouted", "Requests answered by the router itself with an "
                                "error, by reason.", ["reason"], registry=r)
        self.restarts = Counter("tokenmill:router_replica_restarts", "Spawned replica processes restarted.",
                                ["replica"], registry=r)
        self.ttft = Histogram("tokenmill:router_time_to_first_token_seconds",
                              "Router arrival to the first token event sent to the client (streams), seconds.",
                              registry=r, buckets=_TTFT_BUCKETS)
        for reason in DECISION_REASONS:
            self.decisions.labels(policy, reason)
        for reason in ("connect", "status_5xx", "status_429", "timeout", "reset", "down"):
            self.retries.labels(reason)
        for reason in ("no_replica", "body_too_large", "unauthorized", "bad_host", "unsupported_media_type"):
            self.unrouted.labels(reason)

    def watch(self, replicas: Callable[[], list[Replica]]) -> None:
        self.registry.register(_ReplicaCollector(replicas))

    def decided(self, reason: str) -> None:
        self.decisions.labels(self.policy, reason).inc()
