"""`tokenmill serve`: the OpenAI-compatible server. Flags: ServerConfig's fields plus every engine flag."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable

from tokenmill.config import EngineConfig
from tokenmill.server.config import ServerConfig


def add_server_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server", "how the HTTP frontend listens, admits and sheds load")
    hints = typing.get_type_hints(ServerConfig)
    for f in dataclasses.fields(ServerConfig):
        flag = "--" + f.name.replace("_", "-")
        hint, default, doc = hints[f.name], f.default, f.metadata["help"]
        if hint is bool or hint == bool | None:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=doc)
            continue
        if isinstance(hint, types.UnionType):  # X | None: the flag takes an X (other unions: a string)
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            hint = args[0] if len(args) == 1 else str
        typ = {int: int, float: float}.get(hint, str)
        group.add_argument(flag, type=typ, default=default,
                           help=doc + ("" if default is None else f" (default: {default})"))


def server_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServerConfig)})


def add_serve_parser(subparsers, add_engine_args: Callable[[argparse.ArgumentParser], None],
                     engine_config: Callable[[argparse.Namespace], EngineConfig]) -> None:
    p = subparsers.add_parser(
        "serve", help="serve the OpenAI-compatible HTTP API",
        description="Serve one model over the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models), "
                    "plus /health, /metrics, /tokenize and /detokenize. SIGTERM drains in-flight requests; if the "
                    "engine dies the server exits non-zero so a supervisor can restart it.")
    add_server_args(p)
    add_engine_args(p)

    def run(args: argparse.Namespace) -> int:
        from tokenmill.server.launcher import run_server

        return run_server(engine_config(args), server_config(args))

    p.set_defaults(func=run)
