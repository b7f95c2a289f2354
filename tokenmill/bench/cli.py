"""`tokenmill bench throughput|latency`: offline figures with transformers measured in the same run."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import platform

logger = logging.getLogger(__name__)


def _throughput(args: argparse.Namespace, engine_config) -> int:
    import torch

    from tokenmill import LLM
    from tokenmill.bench import offline
    from tokenmill.bench.workload import random_workload

    cfg = engine_config(args)
    llm = LLM(**dataclasses.asdict(cfg))
    dtype = str(llm.engine.runner.dtype).removeprefix("torch.")
    vocab = llm.engine.vocab_size
    items = random_workload(args.num_prompts, tuple(args.input_len), tuple(args.output_len), 100, vocab - 100,
                            seed=args.workload_seed)
    llm.generate([items[0].prompt_token_ids[:32]], use_tqdm=False)  # warm-up
    results = [offline.tokenmill_throughput(llm, items, dtype)]
    report: dict = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "workload": {"num_prompts": args.num_prompts, "input_len": args.input_len,
                                 "output_len": args.output_len, "seed": args.workload_seed},
                    "engine": dataclasses.asdict(cfg)}
    if args.latency:
        report["tokenmill_latency"] = offline.tokenmill_latency(llm)
        report["tokenmill_step_overhead"] = [offline.step_overhead(llm, b) for b in (1, 64)]
    report["tokenmill_peak_rss_mib"] = offline.peak_rss_mib()
    report["tokenmill_kv_mib"] = llm.engine.runner.kv_bytes / 2**20
    source_path = llm.replica.source.path
    del llm
    gc.collect()
    if "hf" in args.peers:
        model = offline.load_hf(source_path, getattr(torch, dtype))
        sub = items[: args.peer_requests]
        results.append(offline.hf_one_at_a_time(model, sub, dtype))
        results.append(offline.hf_static_batches(model, items[: max(args.peer_requests, 16)], dtype))
        if args.latency:
            report["hf_latency"] = offline.hf_latency(model)
    report["results"] = [dataclasses.asdict(r) | {"output_tok_s": r.output_tok_s} for r in results]
    base = results[0].output_tok_s
    for r in results:
        print(f"{r.system:45s} {r.dtype:9s} {r.requests:4d} req {r.output_tokens:7d} out tok "
              f"{r.seconds:8.1f} s {r.output_tok_s:8.1f} tok/s  tokenmill/this = {base / r.output_tok_s:5.2f}x")
    for k in ("tokenmill_latency", "hf_latency", "tokenmill_step_overhead", "tokenmill_peak_rss_mib",
              "tokenmill_kv_mib"):
        if k in report:
            print(k, json.dumps(report[k]))
    if args.out:
        offline.save(args.out, report)
    return 0


def add_bench_parser(sub, add_engine_args, engine_config) -> None:
    bench = sub.add_parser("bench", help="measure tokenmill against peers")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    tp = bsub.add_parser("throughput", help="offline output tokens/s over a seeded random workload")
    tp.add_argument("--num-prompts", type=int, default=200)
    tp.add_argument("--input-len", type=int, nargs=2, default=[64, 1024], metavar=("MIN", "MAX"))
    tp.add_argument("--output-len", type=int, nargs=2, default=[32, 512], metavar=("MIN", "MAX"))
    tp.add_argument("--workload-seed", type=int, default=0, help="seed of the prompt and output lengths")
    tp.add_argument("--peers", default="hf", help="comma list of peers to time after tokenmill: hf, or none")
    tp.add_argument("--peer-requests", type=int, default=16,
                    help="requests (from the same workload) transformers one-at-a-time runs; it is slow")
    tp.add_argument("--latency", action="store_true",
                    help="also single-stream TTFT (512-token prompt), decode tok/s, and step overhead")
    tp.add_argument("--out", help="write the full report as JSON")
    add_engine_args(tp)
    tp.set_defaults(func=lambda a: _throughput(a, engine_config))
