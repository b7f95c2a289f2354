"""Router options: everything `tokenmill router` adds on top of the engine flags (which it passes to the
replicas it spawns and uses itself for the tokenizer and the prefix-cache block size)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.cluster.policy import POLICIES
from tokenmill.errors import ConfigError
from tokenmill.server.config import ExposureConfig


def _opt(default, help: str, **extra):  # noqa: A002 - 'help' mirrors argparse
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class RouterConfig(ExposureConfig):
    """How the router listens, finds its replicas, routes and checks health."""

    replicas: str | None = _opt(None, "Comma-separated base URLs of running replicas, e.g. "
                                      "http://10.0.0.2:8000,http://10.0.0.3:8000.")
    spawn: int = _opt(0, "Start and supervise this many local `tokenmill serve` replicas on free loopback ports "
                         "(restarted with backoff when they crash).")
    mock: bool = _opt(False, "Spawned replicas serve a mock engine (`tokenmill serve --mock`: no model, no torch).")
    replica_args: str = _opt("", "Extra `tokenmill serve` flags for spawned replicas, written with '=', e.g. "
                                 "--replica-args='--max-queued-requests 64 --mock-base-ms 20' (engine flags given "
                                 "to the router pass through by themselves).")
    replica_log_dir: str | None = _opt(None, "Directory for spawned replicas' logs (default: a new temporary one).")
    routing: str = _opt("prefix-aware", "Routing policy.", choices=list(POLICIES))
    imbalance_ratio: float = _opt(
        2.0, "prefix-aware: route to the least-loaded replica instead of the longest prefix match when the match's "
             "outstanding tokens exceed this times the least-loaded one's plus --imbalance-tokens.")
    imbalance_tokens: int = _opt(512, "prefix-aware: the absolute part of that bound, in tokens.")
    kv_pressure_tokens: int = _opt(2048, "kv-aware: cost in tokens of a full KV cache (scaled by its usage).")
    prefix_index_blocks: int = _opt(16384, "Block hashes remembered per replica for prefix-aware routing (LRU).")
    health_interval: float = _opt(1.0, "Seconds between active health and /metrics checks of each replica.")
    health_timeout: float = _opt(3.0, "Seconds one health check may take before it counts as failed.")
    max_failures: int = _opt(3, "Consecutive failures (5xx, timeouts, failed health checks) that take a replica "
                                "out of rotation; a passing health check brings it back.")
    connect_timeout: float = _opt(5.0, "Seconds to open a connection to a replica.")
    upstream_timeout: float = _opt(600.0, "Seconds the router waits for the next byte from a replica before "
                                          "it counts as failed.")
    restart_backoff_max: float = _opt(30.0, "Longest wait, in seconds, before restarting a crashed spawned "
                                            "replica (the wait doubles from 0.5s after each quick crash).")
    autoscale: str | None = _opt(
        None, "With --spawn: grow and shrink the local replicas with demand, e.g. 'min=1,max=4,target=2'. Keys: "
              "min, max, target (p90 TTFT seconds), queue (waiting requests per replica), kv (KV cache use), "
              "up_delay / down_delay (seconds of overload / low load before acting), idle (seconds without "
              "requests before scaling to zero, when min=0), low, tolerance. --spawn N is the starting count.")
    autoscale_interval: float = _opt(1.0, "Seconds between autoscaler decisions.")
    autoscale_signal: str = _opt(
        "load", "What the autoscaler scales on: load (queue, KV use and TTFT as observed) or predicted (also the "
        "replicas the planner predicts the last 30 s of demand needs to hold the TTFT target, with the step time "
        "of --autoscale-profile: it scales as the arrival rate rises, before queues and TTFT show it).",
        choices=["load", "predicted"])
    autoscale_profile: str | None = _opt(None, "The `tokenmill profile` JSON the predicted signal simulates with.")
    drain_timeout: float = _opt(60.0, "Seconds a replica the autoscaler removes may take to finish its requests.")
    cold_start_timeout: float = _opt(
        120.0, "Seconds a request waits in the router for a replica when none is ready (scale from zero).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.spawn < 0:
            raise ConfigError("spawn must be >= 0")
        if bool(self.replicas) == bool(self.spawn):
            raise ConfigError("give exactly one of --replicas URL,URL,... or --spawn N")
        if self.routing not in POLICIES:
            raise ConfigError(f"unknown routing policy {self.routing!r}; choose one of {', '.join(POLICIES)}")
        if self.health_interval <= 0 or self.health_timeout <= 0:
            raise ConfigError("health_interval and health_timeout must be > 0")
        if self.max_failures < 1:
            raise ConfigError("max_failures must be >= 1")
        if self.prefix_index_blocks < 1:
            raise ConfigError("prefix_index_blocks must be >= 1")
        if self.imbalance_tokens < 0 or self.imbalance_ratio < 1:
            raise ConfigError("imbalance_tokens must be >= 0 and imbalance_ratio >= 1")
        if self.autoscale is not None:
            from tokenmill.cluster.autoscale_policy import AutoscaleConfig

            auto = AutoscaleConfig.parse(self.autoscale)
            if not self.spawn:
                raise ConfigError("--autoscale needs --spawn N (it scales the replicas this router starts)")
            if not max(1, auto.min) <= self.spawn <= auto.max:
                raise ConfigError(f"--spawn {self.spawn} must lie within the autoscale range "
                                  f"[{max(1, auto.min)}, {auto.max}]")
        if self.autoscale_signal == "predicted" and not self.autoscale_profile:
            raise ConfigError("--autoscale-signal predicted needs --autoscale-profile (from `tokenmill profile`)")
        if self.autoscale_interval <= 0 or self.drain_timeout < 0 or self.cold_start_timeout <= 0:
            raise ConfigError("autoscale_interval and cold_start_timeout must be > 0, drain_timeout >= 0")
        for url in self.replica_urls:
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"replica URL {url!r} must start with http:// or https://")

    @property
    def replica_urls(self) -> list[str]:
        return [u.strip().rstrip("/") for u in (self.replicas or "").split(",") if u.strip()]
