"""`tokenmill router`: the OpenAI-compatible router. Flags: RouterConfig's fields plus every engine flag
(the router reads the tokenizer and block size from them and passes them to the replicas it spawns)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from tokenmill.cluster.config import RouterConfig
from tokenmill.config import EngineConfig
from tokenmill.entrypoints.config_args import add_config_args, config_from_args


def add_router_args(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser, RouterConfig, "router", "where the replicas are, how requests are routed, health checks")


def router_config(args: argparse.Namespace) -> RouterConfig:
    return config_from_args(RouterConfig, args)


def add_router_parser(subparsers, add_engine_args: Callable[[argparse.ArgumentParser], None],
                      engine_config: Callable[[argparse.Namespace], EngineConfig]) -> None:
    p = subparsers.add_parser(
        "router", help="route OpenAI API requests across engine replicas",
        description="An OpenAI-compatible endpoint (same routes as `tokenmill serve`) in front of replicas given "
                    "by --replicas, or spawned and supervised here with --spawn N. Routing policies: round-robin, "
                    "least-load (outstanding tokens, power of two choices), prefix-aware (longest cached prompt "
                    "prefix, bounded imbalance), kv-aware (uncached prefill + load + KV pressure). GET "
                    "/router/replicas lists the replicas and their state; /metrics has tokenmill:router_*.",
        epilog="example: tokenmill router --spawn 3 --num-threads 1 --routing prefix-aware --port 8000")
    add_router_args(p)
    add_engine_args(p)

    def run(args: argparse.Namespace) -> int:
        from tokenmill.cluster.router import Router, run_router

        config, engine = router_config(args), engine_config(args)
        if not config.autoscale:
            return run_router(Router(config, engine))
        from tokenmill.cluster.autoscale_policy import AutoscaleConfig
        from tokenmill.cluster.autoscaler import AutoscalingRouter

        predictor = None
        if config.autoscale_signal == "predicted":
            from tokenmill.planning.predictor import replicas_needed

            predictor = replicas_needed(config.autoscale_profile, engine, config.routing,
                                        AutoscaleConfig.parse(config.autoscale))
        return run_router(AutoscalingRouter(config, engine, predictor))

    p.set_defaults(func=run)
