"""`tokenmill serve`: the OpenAI-compatible server. Flags: ServerConfig's fields plus every engine flag."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from tokenmill.config import EngineConfig
from tokenmill.entrypoints.config_args import add_config_args, config_from_args
from tokenmill.server.config import ServerConfig


def add_server_args(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser, ServerConfig, "server", "how the HTTP frontend listens, admits and sheds load")


def add_cascade_args(parser: argparse.ArgumentParser) -> None:
    from tokenmill.cluster.cascade_config import CascadeConfig

    add_config_args(parser, CascadeConfig, "cascade", "a small and a large model, escalating hard requests")


def server_config(args: argparse.Namespace) -> ServerConfig:
    return config_from_args(ServerConfig, args)


def add_serve_parser(subparsers, add_engine_args: Callable[[argparse.ArgumentParser], None],
                     engine_config: Callable[[argparse.Namespace], EngineConfig]) -> None:
    p = subparsers.add_parser(
        "serve", help="serve the OpenAI-compatible HTTP API",
        description="Serve one model over the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models), "
                    "plus /health, /metrics, /tokenize and /detokenize. SIGTERM drains in-flight requests; if the "
                    "engine dies the server exits non-zero so a supervisor can restart it.")
    p.add_argument("model_path", nargs="?", metavar="MODEL", default=None,
                   help="the model, as `vllm serve MODEL` takes it: a path, 'default', or a Hugging Face id found in "
                        "the local Hugging Face cache (wins over --model)")
    add_server_args(p)
    add_cascade_args(p)
    add_engine_args(p)

    def run(args: argparse.Namespace) -> int:
        from tokenmill.cluster.cascade_config import CascadeConfig

        if args.model_path is not None:  # the positional name wins over --model
            args.model = args.model_path
        cascade = config_from_args(CascadeConfig, args)
        if cascade.cascade:
            from tokenmill.cluster.cascade import run_cascade

            return run_cascade(engine_config(args), server_config(args), cascade)
        from tokenmill.server.launcher import run_server

        return run_server(engine_config(args), server_config(args))

    p.set_defaults(func=run)
