"""`tokenmill eval perplexity|agreement`: what quantization costs in quality."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging

logger = logging.getLogger(__name__)


def _perplexity(args: argparse.Namespace, engine_config) -> int:
    from tokenmill import LLM
    from tokenmill.eval.quality import perplexity, read_text

    text = read_text(args.text)
    cfg = engine_config(args)
    llm = LLM(**dataclasses.asdict(cfg))
    res = perplexity(llm, text, window=args.window, max_tokens=args.max_tokens)
    out = res.as_dict() | {"text": args.text or "builtin heldout.txt", "quantization": cfg.quantization,
                           "kv_cache_dtype": cfg.kv_cache_dtype,
                           "dtype": str(llm.engine.runner.dtype).removeprefix("torch.")}
    print(json.dumps(out) if args.json else
          f"perplexity {res.perplexity:.4f} over {res.tokens} tokens ({res.windows} windows of {res.window})")
    return 0


def _agreement(args: argparse.Namespace, engine_config) -> int:
    from tokenmill.errors import TokenmillError
    from tokenmill.eval.quality import DEFAULT_PROMPTS, run_agreement

    prompts = list(DEFAULT_PROMPTS)
    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                prompts = [line.rstrip("\n") for line in f if line.strip()]
        except OSError as e:
            raise TokenmillError(f"cannot read prompts file: {e}") from None
    if args.num_prompts < 1 or args.max_tokens < 1:
        raise TokenmillError("--num-prompts and --max-tokens must be >= 1")
    prompts = (prompts * (args.num_prompts // len(prompts) + 1))[:args.num_prompts] if prompts else []
    if not prompts:
        raise TokenmillError("no prompts")
    test = dataclasses.asdict(engine_config(args))
    ref = test | {"quantization": "none", "kv_cache_dtype": "auto", "lm_head_quantization": "none"}
    if args.reference_dtype:
        ref["dtype"] = args.reference_dtype
    res = run_agreement(ref, test, prompts, args.max_tokens)
    res |= {"quantization": test["quantization"], "kv_cache_dtype": test["kv_cache_dtype"],
            "reference": {k: ref[k] for k in ("quantization", "kv_cache_dtype", "dtype")}}
    if args.json:
        print(json.dumps(res))
    else:
        print(f"teacher-forced agreement {res['teacher_forced_agreement']:.4f}, free-running prefix agreement "
              f"{res['free_running_prefix_agreement']:.4f}, {res['exact_sequences']}/{res['prompts']} sequences "
              f"identical ({res['tokens']} reference tokens)")
    return 0


def add_eval_parser(sub, add_engine_args, engine_config) -> None:
    ev = sub.add_parser("eval", help="quality of a (quantized) model: perplexity, agreement with the float model")
    esub = ev.add_subparsers(dest="eval_command", required=True)
    pp = esub.add_parser("perplexity", help="perplexity over held-out text, through the engine")
    pp.add_argument("--text", help="UTF-8 text file (default: the ~1,450-word held-out text shipped in "
                                   "tokenmill/eval/data/heldout.txt, written for this project)")
    pp.add_argument("--window", type=int, default=512, help="tokens per scored window (default: 512)")
    pp.add_argument("--max-tokens", type=int, default=None, help="score only the text's first N tokens")
    pp.add_argument("--json", action="store_true", help="print one JSON object")
    add_engine_args(pp)
    pp.set_defaults(func=lambda a: _perplexity(a, engine_config))

    ag = esub.add_parser("agreement", help="greedy token agreement with the unquantized model (same dtype "
                                           "unless --reference-dtype), float KV cache")
    ag.add_argument("--num-prompts", type=int, default=16, help="prompts (builtin list, cycled; default: 16)")
    ag.add_argument("--prompts-file", help="one prompt per line instead of the builtin list")
    ag.add_argument("--max-tokens", type=int, default=64, help="greedy tokens per prompt (default: 64)")
    ag.add_argument("--reference-dtype", choices=["float32", "bfloat16"], help="dtype of the reference model")
    ag.add_argument("--json", action="store_true", help="print one JSON object")
    add_engine_args(ag)
    ag.set_defaults(func=lambda a: _agreement(a, engine_config))
