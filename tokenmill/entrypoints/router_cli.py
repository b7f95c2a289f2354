"""`tokenmill router`: the OpenAI-compatible router. Flags: RouterConfig's fields plus every engine flag
(the router reads the tokenizer and block size from them and passes them to the replicas it spawns)."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable

from tokenmill.cluster.config import RouterConfig
from tokenmill.config import EngineConfig


def add_router_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("router", "where the replicas are, how requests are routed, health checks")
    hints = typing.get_type_hints(RouterConfig)
    for f in dataclasses.fields(RouterConfig):
        flag = "--" + f.name.replace("_", "-")
        hint, default, doc = hints[f.name], f.default, f.metadata["help"]
        if hint is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=doc)
            continue
        typ = {int: int, float: float}.get(hint, str)
        group.add_argument(flag, type=typ, default=default, choices=f.metadata.get("choices"),
                           help=doc + ("" if default in (None, "") else f" (default: {default})"))


def router_config(args: argparse.Namespace) -> RouterConfig:
    return RouterConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RouterConfig)})


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
        from tokenmill.cluster.router import run_router

        return run_router(router_config(args), engine_config(args))

    p.set_defaults(func=run)
