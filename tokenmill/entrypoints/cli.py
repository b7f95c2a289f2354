"""`tokenmill` command line: generate, serve, router, ray-serve, bench, eval, distill, upcycle, rag. Engine flags come from
EngineConfig's fields."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

from tokenmill.bench.cli import add_bench_parser
from tokenmill.config import EngineConfig
from tokenmill.entrypoints.cascade_cli import add_cascade_parser
from tokenmill.entrypoints.config_args import add_config_args, config_from_args, external_defaults
from tokenmill.entrypoints.plan_cli import add_ledger_parser, add_plan_parser, add_profile_parser
from tokenmill.entrypoints.rag_cli import add_rag_parser
from tokenmill.entrypoints.ray_cli import add_ray_serve_parser
from tokenmill.entrypoints.router_cli import add_router_parser
from tokenmill.entrypoints.server_cli import add_serve_parser
from tokenmill.errors import TokenmillError
from tokenmill.eval.cli import add_eval_parser


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


def _cmd_distill(args: argparse.Namespace) -> int:
    from tokenmill.spec.distill import distill
    from tokenmill.spec.distill_config import DistillConfig

    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    cfg = DistillConfig(**{k: v for k, v in vars(args).items() if k in fields})
    options = {"num_threads": args.num_threads} if args.num_threads else {}
    summary = distill(cfg, options)
    if cfg.exit_layer:
        print(json.dumps({"out": cfg.out, "seconds": round(summary["seconds"], 1), "heads": {
            n: {k: h[k] for k in ("out", "held_out_agreement_before", "held_out_agreement_after")}
            for n, h in summary["heads"].items()}}))
        return 0
    print(json.dumps({"out": cfg.out, "loss_first": summary["losses"][0], "loss_last": summary["losses"][-1],
                      "parameters": summary["parameters"], "seconds": round(summary["seconds"], 1),
                      "compute_flops": summary["compute"]["total_flops"]}))
    return 0


def add_distill_parser(sub) -> None:
    from tokenmill.spec.distill_config import DistillConfig

    d = DistillConfig()
    p = sub.add_parser("distill", help="train a small draft model on the teacher's own outputs and logits",
                       description="Train a small Llama student (the teacher's tokenizer) with KL to the teacher's "
                       "top-20 distribution on answers the teacher generates from built-in seed instructions; "
                       "writes a Hugging Face directory for --speculative draft --draft-model DIR.")
    add = p.add_argument
    add("--teacher", default=d.teacher, help="teacher model: GGUF, HF directory or 'default' (default: default)")
    add("--out", required=True, help="output directory (config.json, model.safetensors, tokenizer, loss.png, "
        "training_compute.json: the FLOPs the run spent, for tokenmill ledger --training-compute)")
    add("--layers", type=int, default=d.layers, help=f"student layers (default: {d.layers})")
    add("--hidden", type=int, default=d.hidden, help=f"student hidden size (default: {d.hidden})")
    add("--heads", type=int, default=None, help="attention heads (default: hidden / 64)")
    add("--kv-heads", type=int, default=None, help="key/value heads (default: heads / 2)")
    add("--intermediate", type=int, default=None, help="MLP size (default: ~8/3 hidden)")
    add("--steps", type=int, default=d.steps, help=f"training steps (default: {d.steps})")
    add("--batch-size", type=int, default=d.batch_size, help=f"sequences per step (default: {d.batch_size})")
    add("--seq-len", type=int, default=d.seq_len, help=f"tokens per sequence (default: {d.seq_len})")
    add("--lr", type=float, default=d.lr, help=f"peak learning rate (default: {d.lr})")
    add("--warmup", type=int, default=d.warmup, help=f"warm-up steps (default: {d.warmup})")
    add("--num-prompts", type=int, default=None,
        help="use only the first N built-in seed instructions (default: all)")
    add("--samples-per-prompt", type=int, default=d.samples_per_prompt,
        help=f"teacher answers per seed instruction (default: {d.samples_per_prompt})")
    add("--gen-tokens", type=int, default=d.gen_tokens, help=f"tokens per teacher answer (default: {d.gen_tokens})")
    add("--temperature", type=float, default=d.temperature,
        help=f"teacher sampling temperature (default: {d.temperature})")
    add("--seed", type=int, default=d.seed, help=f"seed for data and initialisation (default: {d.seed})")
    add("--teacher-kv-cache-memory", default=d.teacher_kv_cache_memory,
        help=f"teacher KV cache while generating (default: {d.teacher_kv_cache_memory})")
    add("--teacher-dtype", default=d.teacher_dtype, choices=["auto", "float32", "bfloat16"],
        help="teacher dtype while generating (default: auto)")
    add("--exit-layer", type=int, nargs="+", default=None, metavar="L",
        help="instead of a student, train an exit head on the teacher's hidden state after layer L for "
        "--speculative early-exit (several: one OUT/layer-L directory each, from one pass over the data)")
    add("--exit-vocab", type=int, default=d.exit_vocab,
        help=f"exit head rows: the tokens the teacher data uses most, then the lowest ids; 0: the whole "
        f"vocabulary (default: {d.exit_vocab})")
    add("--num-threads", type=int, default=None, help="torch threads (default: all this process may use)")
    p.set_defaults(func=_cmd_distill)


def _cmd_upcycle(args: argparse.Namespace) -> int:
    from tokenmill.training.upcycle import upcycle
    from tokenmill.training.upcycle_config import UpcycleConfig

    fields = {f.name for f in dataclasses.fields(UpcycleConfig)}
    cfg = UpcycleConfig(**{k: v for k, v in vars(args).items() if k in fields})
    try:
        summary = upcycle(cfg)
    except ValueError as e:
        raise SystemExit(f"tokenmill: error: {e}") from None
    q = summary["quality"]
    print(json.dumps({"out": cfg.out, "loss_first": summary["losses"][0] if summary["losses"] else None,
                      "loss_last": summary["losses"][-1] if summary["losses"] else None,
                      "moe_perplexity": round(q["moe_perplexity"], 3), "dense_perplexity": round(q["dense_perplexity"], 3),
                      "teacher_forced_agreement": round(q["teacher_forced_agreement"], 3),
                      "seconds": round(summary["seconds"], 1)}))
    return 0


def add_upcycle_parser(sub) -> None:
    from tokenmill.training.upcycle_config import UpcycleConfig

    d = UpcycleConfig()
    p = sub.add_parser("upcycle", help="turn a dense model's MLPs into a mixture of experts (Mixtral format)",
                       description="Copy every MLP into N experts (with a little noise) behind a top-k router, train "
                       "the router (and optionally the experts) by distillation from the dense model, write a "
                       "Mixtral-format Hugging Face directory, and report its perplexity and greedy agreement "
                       "against the dense model.")
    add = p.add_argument
    add("--model", default=d.model, help="the dense model: GGUF, HF directory or 'default' (default: default)")
    add("--out", required=True, help="output directory")
    add("--experts", type=int, default=d.experts, help=f"experts per layer (default: {d.experts})")
    add("--top-k", type=int, default=d.top_k, help=f"experts each token runs (default: {d.top_k})")
    add("--noise", type=float, default=d.noise, help=f"expert copies' noise, relative to each matrix's spread "
                                                      f"(default: {d.noise})")
    add("--train-experts", action="store_true", help="train the experts too, not only the router")
    add("--steps", type=int, default=d.steps, help=f"training steps (default: {d.steps})")
    add("--batch-size", type=int, default=d.batch_size, help=f"sequences per step (default: {d.batch_size})")
    add("--seq-len", type=int, default=d.seq_len, help=f"tokens per sequence (default: {d.seq_len})")
    add("--lr", type=float, default=d.lr, help=f"the router's peak learning rate (default: {d.lr})")
    add("--expert-lr", type=float, default=d.expert_lr,
        help=f"the experts' peak learning rate with --train-experts (default: {d.expert_lr})")
    add("--num-prompts", type=int, default=d.num_prompts, help=f"seed instructions the dense model answers "
                                                               f"(default: {d.num_prompts})")
    add("--samples-per-prompt", type=int, default=d.samples_per_prompt,
        help=f"answers per instruction (default: {d.samples_per_prompt})")
    add("--gen-tokens", type=int, default=d.gen_tokens, help=f"tokens per answer (default: {d.gen_tokens})")
    add("--eval-prompts", type=int, default=d.eval_prompts,
        help=f"instructions for the greedy agreement check (default: {d.eval_prompts})")
    add("--eval-tokens", type=int, default=d.eval_tokens,
        help="held-out tokens scored for the perplexity figures (default: all of eval/data/heldout.txt)")
    add("--seed", type=int, default=d.seed)
    p.set_defaults(func=_cmd_upcycle)


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_level(text: str) -> str:
    if text.upper() not in _LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a logging level; use one of {', '.join(_LOG_LEVELS)}")
    return text.upper()


def build_parser(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """Every flag's default may also come from a TOKENMILL_<FLAG> environment variable or a --config YAML file."""
    parser = argparse.ArgumentParser(prog="tokenmill", description="Serve language models to many users at once.")
    parser.add_argument("--log-level", default="INFO", type=_log_level,
                        help="DEBUG, INFO, WARNING or ERROR (default: INFO)")
    parser.add_argument("--config", help="YAML file of flag: value pairs (e.g. max-num-seqs: 64), below the "
                                         "command line and above TOKENMILL_<FLAG> environment variables")
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
    add_eval_parser(sub, add_engine_args, engine_config)
    add_distill_parser(sub)
    add_upcycle_parser(sub)
    add_profile_parser(sub, add_engine_args, engine_config)
    add_plan_parser(sub, add_engine_args, engine_config)
    add_ledger_parser(sub)
    add_rag_parser(sub, add_engine_args, engine_config)
    add_cascade_parser(sub, add_engine_args, engine_config)
    for p in sub.choices.values():  # also after the subcommand, as vLLM takes them
        p.add_argument("--log-level", type=_log_level, default=argparse.SUPPRESS, help="as before the subcommand")
        p.add_argument("--config", default=argparse.SUPPRESS, help="as before the subcommand")
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    config_file = pre.parse_known_args(argv if argv is not None else sys.argv[1:])[0].config
    try:
        external_defaults(dict(sub.choices), config_file, dict(os.environ if environ is None else environ))
    except ValueError as e:
        parser.error(str(e))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
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
