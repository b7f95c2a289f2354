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
    tp.add_argument("--num-prompts", type=int, default=200, help="requests in the workload (default: %(default)s)")
    tp.add_argument("--input-len", type=int, nargs=2, default=[64, 1024], metavar=("MIN", "MAX"),
                    help="prompt lengths in tokens, uniform in [MIN, MAX] (default: 64 1024)")
    tp.add_argument("--output-len", type=int, nargs=2, default=[32, 512], metavar=("MIN", "MAX"),
                    help="output lengths in tokens, uniform in [MIN, MAX], EOS ignored (default: 32 512)")
    tp.add_argument("--workload-seed", type=int, default=0,
                    help="seed of the prompt and output lengths (default: %(default)s)")
    tp.add_argument("--peers", default="hf",
                    help="comma list of peers to time after tokenmill: hf (transformers), or none "
                         "(default: %(default)s)")
    tp.add_argument("--peer-requests", type=int, default=16,
                    help="requests (from the same workload) transformers one-at-a-time runs; it is slow "
                         "(default: %(default)s)")
    tp.add_argument("--latency", action="store_true",
                    help="also single-stream TTFT (512-token prompt), decode tok/s, and step overhead")
    tp.add_argument("--out", help="write the full report as JSON")
    add_engine_args(tp)
    tp.set_defaults(func=lambda a: _throughput(a, engine_config))

    from tokenmill.bench import serve as bserve

    sv = bsub.add_parser("serve", help="load an OpenAI-compatible server (any) with a dataset; TTFT/TPOT/ITL, "
                                       "throughput, goodput",
                         description="Async load generator: token-exact prompts, fixed output lengths (checked "
                                     "against what the server returns), Poisson/gamma arrivals. Imports no torch.")
    bserve.add_client_args(sv)
    sv.set_defaults(func=bserve.cmd_serve)

    sw = bsub.add_parser("sweep", help="bench serve over a list of rates (or concurrencies); goodput curve and "
                                       "the highest rate meeting the SLO",
                         description="Runs `bench serve` once per point, optionally against a fresh server per "
                                     "point (--launch). The SLO defaults to ttft=2.0,tpot=0.1 (p99, MLPerf style).")
    bserve.add_client_args(sw, sweep=True)
    axis = sw.add_mutually_exclusive_group(required=True)
    axis.add_argument("--rates", type=bserve.rate_list,
                      help="comma list of request rates, e.g. 0.5,1,2,4")
    axis.add_argument("--concurrencies", type=bserve.concurrency_list,
                      help="comma list of max concurrencies (rate inf), e.g. 1,4,16,32")
    sw.add_argument("--duration", type=float, default=None,
                    help="rate sweeps: num prompts = rate x DURATION seconds (instead of --num-prompts)")
    sw.add_argument("--per-concurrency", type=int, default=None,
                    help="concurrency sweeps: num prompts = this x concurrency")
    sw.add_argument("--min-prompts", type=int, default=4, help="floor of the per-point prompt count (default: 4)")
    sw.add_argument("--launch", default=None,
                    help="shell command starting a fresh server per point; {port} is replaced, e.g. "
                         "'benchmarks/peers/tokenmill.sh serve {port}'")
    sw.add_argument("--port", type=int, default=None, help="port for --launch (default: a free one)")
    sw.add_argument("--server-cpus", default=None, help="taskset CPU list for the launched server, e.g. 0-1")
    sw.add_argument("--log-dir", default="bench_results/logs", help="launched servers' logs (default: %(default)s)")
    sw.set_defaults(func=bserve.cmd_sweep)

    pl = bsub.add_parser("plot", help="PNG plots (latency CDFs, goodput vs rate, throughput vs concurrency) "
                                      "from result JSONs, overlaid")
    pl.add_argument("results", nargs="+", help="JSON files from bench serve / sweep (or lists of results)")
    pl.add_argument("--out-dir", default="bench_results/plots", help="where the PNGs go (default: %(default)s)")
    pl.set_defaults(func=_plot)


def _plot(args: argparse.Namespace) -> int:
    from tokenmill.bench.plot import plot

    for p in plot(args.results, args.out_dir):
        print(p)
    return 0
