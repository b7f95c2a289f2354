"""`tokenmill` command line: generate, serve, router, ray-serve, bench. Engine flags come from EngineConfig's
fields."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from tokenmill.bench.cli import add_bench_parser
from tokenmill.config import EngineConfig
from tokenmill.entrypoints.config_args import add_config_args, config_from_args
from tokenmill.entrypoints.ray_cli import add_ray_serve_parser
from tokenmill.entrypoints.router_cli import add_router_parser
from tokenmill.entrypoints.server_cli import add_serve_parser
from tokenmill.errors import TokenmillError


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser, EngineConfig, "engine", "how the replica loads its model and schedules requests")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return config_from_args(EngineConfig, args)


def _cmd_generate(args: argparse.Namespace) -> int:
    from tokenmill import LLM, SamplingParams

    prompts = list(args.prompt)
    if args.prompts_file:
        with open(args.prompts_file) as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise TokenmillError("give at least one prompt, or --prompts-file")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.sample_seed)
    llm = LLM(**dataclasses.asdict(engine_config(args)))
    if args.chat:
        outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    else:
        outs = llm.generate(prompts, params)
    for p, o in zip(prompts, outs, strict=True):
        if args.json:
            print(json.dumps({"prompt": p, "text": o.outputs[0].text, "finish_reason": o.outputs[0].finish_reason}))
        else:
            print(o.outputs[0].text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description="Serve language models to many users at once.")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text offline for one or many prompts")
    gen.add_argument("prompt", nargs="*", help="prompt text(s)")
    gen.add_argument("--prompts-file", help="a file with one prompt per line")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    gen.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per prompt (default: 64)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--sample-seed", type=int, default=None, help="per-request sampling seed")
    gen.add_argument("--json", action="store_true", help="one JSON line per prompt")
    add_engine_args(gen)
    gen.set_defaults(func=_cmd_generate)

    add_serve_parser(sub, add_engine_args, engine_config)
    add_router_parser(sub, add_engine_args, engine_config)
    add_bench_parser(sub, add_engine_args, engine_config)
    add_ray_serve_parser(sub, add_engine_args, engine_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        return args.func(args)
    except TokenmillError as e:
        print(f"tokenmill: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
