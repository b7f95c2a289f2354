"""Options of `tokenmill ray-serve`: where the Ray cluster is and how engine replicas are placed and scaled.

Plain data (no Ray import), so `--help` works without the optional `ray` extra installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.cluster.policy import POLICIES
from tokenmill.config import parse_size
from tokenmill.errors import ConfigError


def _opt(default, help: str, **extra):  # noqa: A002 - 'help' mirrors argparse
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class RayServeConfig:
    """How tokenmill runs as a Ray Serve application: a router deployment in front of engine replicas."""

    address: str | None = _opt(
        None, "Ray cluster to join: 'auto' (the one `ray start` made on this machine), host:port or "
              "ray://host:10001. Default: start a private Ray instance on this machine.")
    num_cpus: int | None = _opt(None, "CPUs of the private Ray instance (not with --address).")
    object_store_memory: int | str | None = _opt(
        None, "Object store size of the private Ray instance, e.g. 128MiB (not with --address).")
    replicas: int = _opt(1, "Engine replicas when not autoscaling.")
    min_replicas: int | None = _opt(
        None, "Autoscale the engine replicas between --min-replicas and --max-replicas (Ray Serve's "
              "autoscaler, on ongoing requests per replica).")
    max_replicas: int | None = _opt(None, "Upper bound of the engine replicas when autoscaling.")
    target_ongoing_requests: float = _opt(
        8.0, "Autoscaling target: requests in flight per engine replica.")
    replica_cpus: float = _opt(1.0, "Ray CPUs each engine replica reserves (fractions allowed, e.g. 0.5).")
    replica_gpus: float = _opt(0.0, "Ray GPUs each engine replica reserves (fractions allowed).")
    router_cpus: float = _opt(0.25, "Ray CPUs the router deployment reserves.")
    router_replicas: int = _opt(1, "Replicas of the router deployment (stateless; more for more HTTP traffic).")
    routing: str = _opt("prefix-aware", "How the router picks an engine replica (the policies of "
                        "`tokenmill router`).", choices=list(POLICIES))
    max_ongoing_requests: int = _opt(
        256, "Most requests Ray Serve sends one engine replica at once (the replica's own queue limits "
             "still apply); beyond it requests wait in the router.")
    max_waiting_requests: int = _opt(
        1024, "Most requests waiting in the router for a free replica; beyond it clients get 429.")
    routing_stats_period: float = _opt(1.0, "Seconds between engine replicas' load reports to the router.")
    upstream_timeout: float = _opt(
        600.0, "Seconds the router waits for the next part of a replica's answer: before the first byte the "
               "request is retried once elsewhere (then 504), after it a stream ends with an error event.")
    app_name: str = _opt("tokenmill", "Name of the Ray Serve application.")
    detach: bool = _opt(
        False, "Deploy and exit, leaving the application running on the cluster (needs --address).")

    def __post_init__(self) -> None:
        self.object_store_memory = parse_size(self.object_store_memory)
        if self.replicas < 1:
            raise ConfigError("replicas must be >= 1")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ConfigError("give both --min-replicas and --max-replicas to autoscale, or neither")
        if self.min_replicas is not None:
            assert self.max_replicas is not None
            if self.min_replicas < 0 or self.max_replicas < max(1, self.min_replicas):
                raise ConfigError("need 0 <= min_replicas <= max_replicas and max_replicas >= 1")
        if self.target_ongoing_requests <= 0:
            raise ConfigError("target_ongoing_requests must be > 0")
        if self.replica_cpus < 0 or self.replica_gpus < 0 or self.router_cpus < 0:
            raise ConfigError("replica_cpus, replica_gpus and router_cpus must be >= 0")
        if self.router_replicas < 1 or self.max_ongoing_requests < 1 or self.max_waiting_requests < 1:
            raise ConfigError("router_replicas, max_ongoing_requests and max_waiting_requests must be >= 1")
        if self.routing not in POLICIES:
            raise ConfigError(f"unknown routing policy {self.routing!r}; choose one of {', '.join(POLICIES)}")
        if self.routing_stats_period <= 0 or self.upstream_timeout <= 0:
            raise ConfigError("routing_stats_period and upstream_timeout must be > 0")
        if self.address is not None and (self.num_cpus is not None or self.object_store_memory is not None):
            raise ConfigError("--num-cpus and --object-store-memory size a private Ray instance; with --address "
                              "the cluster's own `ray start` settings apply")
        if self.detach and self.address is None:
            raise ConfigError("--detach needs --address: a private Ray instance ends with this process")

    @property
    def autoscaling(self) -> dict | None:
        """Ray Serve's autoscaling_config for the engine deployment, or None for a fixed replica count."""
        if self.min_replicas is None:
            return None
        return {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "initial_replicas": max(self.min_replicas, 1),
                "target_ongoing_requests": self.target_ongoing_requests,
                # Up fast, down slow: a replica costs a model load, so do not drop one on a lull.
                "upscale_delay_s": 5.0, "downscale_delay_s": 60.0}
