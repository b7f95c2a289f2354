"""`tokenmill bench serve` and `tokenmill bench sweep`: build a dataset, drive a server, save the JSON.

A result JSON holds the run's settings, the metrics (metrics.compute) and every request's raw timestamps,
so any figure can be recomputed later. A sweep JSON holds one such result per point plus the
goodput-vs-rate curve and the highest rate that met the SLO.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import math
import platform
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from tokenmill.bench import datasets, loadgen
from tokenmill.bench.metrics import RequestRecord, compute, parse_goodput, parse_slo
from tokenmill.errors import ConfigError, TokenmillError

if TYPE_CHECKING:
    from tokenmill.tokenizer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


def load_tokenizer(spec: str) -> Tokenizer:
    """'default', a GGUF file or a HF directory -> our Tokenizer (torch-free)."""
    from tokenmill.models.loader import resolve_model_path
    from tokenmill.tokenizer.tokenizer import Tokenizer

    return Tokenizer.from_path(resolve_model_path(spec))


def dataset_from_args(args: argparse.Namespace, tok: Tokenizer | None = None) -> list[datasets.BenchRequest]:
    tok = tok or load_tokenizer(args.tokenizer)
    vocab = (100, tok.vocab_size - 100)
    return datasets.build(args.dataset, tok, args.num_prompts, seed=args.seed,
                          input_len=tuple(args.input_len) if args.input_len else None,
                          output_len=tuple(args.output_len) if args.output_len else None, vocab=vocab,
                          groups=args.groups, prefix_len=args.prefix_len, suffix_len=args.suffix_len,
                          doc_len=args.doc_len, path=args.dataset_path)


def _rate(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a request rate: give requests per second, "
                                         "e.g. 2 or 0.5, or inf") from None
    if not v > 0:
        raise argparse.ArgumentTypeError("a request rate must be positive (or inf)")
    return v


def rate_list(text: str) -> list[float]:
    """'0.5,1,inf' -> [0.5, 1.0, inf]"""
    return [_rate(x) for x in text.split(",")]


def concurrency_list(text: str) -> list[int]:
    """'1,4,16' -> [1, 4, 16]"""
    try:
        out = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of whole numbers, e.g. 1,4,16") from None
    if any(c < 1 for c in out):
        raise argparse.ArgumentTypeError("each concurrency must be at least 1")
    return out


def run_point(base_url: str, requests: list[datasets.BenchRequest], *, backend: str, model: str | None,
              request_rate: float, burstiness: float, max_concurrency: int | None, seed: int,
              slo: dict[str, float], warmup: int = 2, api_key: str | None = None, label: str = "",
              extra: dict | None = None, show_progress: bool = True) -> dict:
    """One benchmark run against a live server -> result dict (settings, metrics, raw records)."""
    be = loadgen.BACKENDS[backend]
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    if warmup:
        _warm_up(base_url, requests[:warmup], be, model, api_key)
    bar = tqdm(total=len(requests), desc=f"{label or base_url} rate={request_rate:g}", unit="req",
               disable=not show_progress)
    started = datetime.datetime.now(datetime.UTC)
    try:
        records = asyncio.run(loadgen.run(base_url, requests, backend=be, model=model, request_rate=request_rate,
                                          burstiness=burstiness, max_concurrency=max_concurrency, seed=seed,
                                          api_key=api_key, progress=bar.update))
    finally:
        bar.close()
    metrics = compute(records, slo)
    for r in records:
        if r.status in ("short", "long"):
            logger.warning("request %d asked for %d tokens and got %s (%s): flagged, not counted", r.index,
                           r.output_len, r.output_tokens, r.tokens_source)
        elif r.status == "error":
            logger.warning("request %d failed: %s", r.index, r.error or "no output")
    mismatched = sum(1 for r in records if r.prompt_tokens is not None and r.prompt_tokens != r.prompt_len)
    return {
        "kind": "serve",
        "label": label,
        "date": started.isoformat(timespec="seconds"),
        "machine": {"node": platform.node(), "processor": platform.processor() or platform.machine()},
        "settings": {"base_url": base_url, "backend": backend, "model": model, "request_rate": request_rate,
                     "burstiness": burstiness, "max_concurrency": max_concurrency, "seed": seed,
                     "num_prompts": len(requests), "slo": slo, **(extra or {})},
        "metrics": metrics | {"prompt_len_mismatches": mismatched},
        "requests": [asdict(r) for r in records],
    }


def _warm_up(base_url: str, requests: list[datasets.BenchRequest], be: loadgen.Backend, model: str | None,
             api_key: str | None, patience_s: float = 120.0) -> None:
    """Untimed short requests first (lazy initialisation on some servers). A server still starting (503)
    is waited for; any other failure stops the run here with the server's own message."""
    import time

    # Short reversed prompts: the same vocabulary, but nothing a prefix cache could reuse later.
    warm = [datasets.BenchRequest(r.prompt_token_ids[::-1][:64], r.prompt[::-1][:256], 4) for r in requests]
    deadline = time.monotonic() + patience_s
    while True:
        recs = asyncio.run(loadgen.run(base_url, warm, backend=be, model=model, max_concurrency=1, api_key=api_key))
        errors = [r.error or "no output" for r in recs if r.status == "error"]
        if not errors:
            break
        if not all(e.startswith("HTTP 503") for e in errors) or time.monotonic() > deadline:
            raise TokenmillError(f"warm-up request failed against {base_url}: {errors[0]}")
        time.sleep(1.0)
    for r in recs:
        if r.status != "ok":
            logger.warning("warm-up asked for 4 tokens and got %s: does the server honour fixed output lengths "
                           "with --backend %s?", r.output_tokens, be.name)


def format_metrics(m: dict) -> str:
    lines = [f"completed {m['completed']}/{m['num_requests']} (short {m['short']}, long {m['long']}, "
             f"errors {m['errors']}) in {m['duration_s']:.2f} s",
             f"throughput: {m['request_throughput']:.3f} req/s, input {m['input_throughput']:.1f} tok/s, "
             f"output {m['output_throughput']:.1f} tok/s"]
    if "goodput" in m:
        lines.append(f"goodput: {m['goodput']:.3f} req/s ({m['good_requests']} met {m['slo']})")
    lines.append(f"{'ms':6s} {'mean':>9s} {'median':>9s} {'p90':>9s} {'p99':>9s}")
    for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        s = m[key]
        lines.append(f"{key[:-2].upper():6s} " + " ".join(f"{1e3 * s[k]:9.1f}" for k in ("mean", "median", "p90", "p99")))
    return "\n".join(lines)


def save(path: str | Path, payload: dict) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(payload, indent=1, default=_json_default, allow_nan=True))
    logger.info("wrote %s", p)


def _json_default(o):
    if isinstance(o, RequestRecord):
        return asdict(o)
    return str(o)


def apply_vllm_names(args: argparse.Namespace) -> dict[str, float]:
    """Fold vLLM's flag names into ours (in place); -> the goodput limits in seconds, from --slo or --goodput."""
    if args.endpoint == "/v1/chat/completions":
        if args.backend not in ("openai", "openai-chat"):
            raise ConfigError(f"--endpoint /v1/chat/completions takes --backend openai, not {args.backend}")
        args.backend = "openai-chat"
    r = args.random_range_ratio
    if not 0 <= r < 1:
        raise ConfigError(f"--random-range-ratio must be in [0, 1), got {r}")
    for name in ("input", "output"):
        n = getattr(args, f"random_{name}_len")
        if n is not None:
            if n < 1:
                raise ConfigError(f"--random-{name}-len must be >= 1, got {n}")
            setattr(args, f"{name}_len", [max(1, round(n * (1 - r))), max(1, round(n * (1 + r)))])
    if args.save_result and not args.out:
        name = args.result_filename or f"{args.label or 'bench'}-rate{args.request_rate:g}-" \
                                       f"{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
        args.out = str(Path(args.result_dir) / name)
    if args.slo and args.goodput:
        raise ConfigError("give the limits once: --slo (ttft=2s) or --goodput (ttft:2000)")
    return parse_goodput(args.goodput) if args.goodput else parse_slo(args.slo)


def cmd_serve(args: argparse.Namespace) -> int:
    slo = apply_vllm_names(args)
    reqs = dataset_from_args(args)
    result = run_point(args.base_url, reqs, backend=args.backend, model=args.model, request_rate=args.request_rate,
                       burstiness=args.burstiness, max_concurrency=args.max_concurrency, seed=args.seed, slo=slo,
                       warmup=args.warmup, api_key=args.api_key, label=args.label,
                       extra=_dataset_settings(args))
    print(format_metrics(result["metrics"]))
    if args.out:
        save(args.out, result)
    return 0 if result["metrics"]["completed"] else 1


def _dataset_settings(args: argparse.Namespace) -> dict:
    return {"dataset": args.dataset, "input_len": args.input_len, "output_len": args.output_len,
            "groups": args.groups, "prefix_len": args.prefix_len, "suffix_len": args.suffix_len,
            "doc_len": args.doc_len, "tokenizer": args.tokenizer, "dataset_path": args.dataset_path}


def max_rate_meeting_slo(points: list[dict], slo: dict[str, float]) -> float | None:
    """MLPerf server scenario: the highest rate whose p99 TTFT and p99 TPOT stay within the limits (and
    every request completed)."""
    best = None
    for p in points:
        m = p["metrics"]
        ok = (m["completed"] == m["num_requests"]
              and ("ttft" not in slo or m["ttft_s"]["p99"] <= slo["ttft"])
              and ("tpot" not in slo or m["tpot_s"]["p99"] <= slo["tpot"])
              and ("e2e" not in slo or m["e2e_s"]["p99"] <= slo["e2e"]))
        p["meets_slo"] = ok
        if ok and (best is None or p["settings"]["request_rate"] > best):
            best = p["settings"]["request_rate"]
    return best


def sweep_object(label: str, axis: str, slo: dict[str, float], points: list[dict], launch: str | None = None) -> dict:
    """Points of one system along one axis ("request_rate" or "max_concurrency") -> a sweep result."""
    best = max_rate_meeting_slo(points, slo) if axis == "request_rate" else None
    return {"kind": "sweep", "label": label, "axis": axis, "slo": slo, "launch": launch, "points": points,
            "max_rate_meeting_slo": best,
            "curve": [{"x": p["settings"][axis], "goodput": p["metrics"].get("goodput"),
                       "output_throughput": p["metrics"]["output_throughput"],
                       "p99_ttft_s": p["metrics"]["ttft_s"]["p99"], "p99_tpot_s": p["metrics"]["tpot_s"]["p99"],
                       "meets_slo": p.get("meets_slo")} for p in points]}


def cmd_sweep(args: argparse.Namespace) -> int:
    from tokenmill.bench.launch import ServerProcess, free_port

    slo = apply_vllm_names(args)
    if not slo:
        slo = {"ttft": 2.0, "tpot": 0.1}
    tok = load_tokenizer(args.tokenizer)
    axis = [("request_rate", r) for r in args.rates] if args.rates else [("max_concurrency", c) for c in args.concurrencies]
    points = []
    for key, value in axis:
        rate = value if key == "request_rate" else float("inf")
        conc = value if key == "max_concurrency" else args.max_concurrency
        n = args.num_prompts
        if key == "request_rate" and args.duration and math.isfinite(rate):
            n = max(args.min_prompts, round(rate * args.duration))
        elif key == "max_concurrency" and args.per_concurrency:
            n = max(args.min_prompts, args.per_concurrency * value)
        args.num_prompts = n
        reqs = dataset_from_args(args, tok)
        server = None
        base_url = args.base_url
        if args.launch:
            port = args.port or free_port()
            server = ServerProcess(args.launch, port, Path(args.log_dir) / f"server_{key}_{value:g}.log",
                                   cpus=args.server_cpus).start()
            base_url = server.base_url
        try:
            res = run_point(base_url, reqs, backend=args.backend, model=args.model, request_rate=rate,
                            burstiness=args.burstiness, max_concurrency=conc, seed=args.seed, slo=slo,
                            warmup=args.warmup, api_key=args.api_key, label=args.label,
                            extra=_dataset_settings(args) | {"sweep_axis": key})
        finally:
            if server:
                server.stop()
        m = res["metrics"]
        print(f"{key}={value:g}: goodput {m.get('goodput', float('nan')):.3f} req/s, output "
              f"{m['output_throughput']:.1f} tok/s, p99 TTFT {m['ttft_s']['p99']:.3f} s, p99 TPOT "
              f"{m['tpot_s']['p99'] * 1e3:.1f} ms")
        points.append(res)
    out = sweep_object(args.label, axis[0][0], slo, points, args.launch)
    best = out["max_rate_meeting_slo"]
    if args.rates:
        print(f"highest rate meeting p99 {slo}: {best if best is not None else 'none of those tried'}")
    if args.out:
        save(args.out, out)
    return 0


def add_client_args(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (default: %(default)s)")
    p.add_argument("--model", default=None, help="model name to send (default: none, the server's own)")
    p.add_argument("--backend", default="openai", choices=sorted(loadgen.BACKENDS),
                   help="how to ask this server for fixed-length, token-exact output: openai (tokenmill, vLLM: "
                        "token ids + ignore_eos), openai-text (the same with text prompts), llama.cpp (same as openai), "
                        "min-tokens (min_tokens instead of ignore_eos), transformers (text prompt + "
                        "generation_config) (default: %(default)s)")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY' (default: none)")
    d = p.add_argument_group("dataset (built and tokenized before the run)")
    d.add_argument("--dataset", "--dataset-name", dest="dataset", default="random", choices=datasets.DATASETS,
                   help="random token ids, chat turns over real text, shared-prefix groups, or one long "
                        "document per request (default: %(default)s)")
    d.add_argument("--dataset-path", default=None, help="sharegpt: a ShareGPT JSON file; jsonl: one "
                                                        '{"prompt": ..., "output_len": N} per line')
    d.add_argument("--num-prompts", type=int, default=100, help="requests in the run (default: %(default)s)")
    d.add_argument("--input-len", type=int, nargs=2, metavar=("MIN", "MAX"),
                   help="prompt length range (random: default 128 128; chat: clip range, default 16 1024)")
    d.add_argument("--output-len", type=int, nargs=2, metavar=("MIN", "MAX"),
                   help="output length range (random: 128 128; chat: clip range 4 512; shared-prefix and "
                        "long-input: MIN is the fixed length, default 64)")
    d.add_argument("--groups", type=int, default=4, help="shared-prefix: number of system prompts (default: 4)")
    d.add_argument("--prefix-len", type=int, default=1024, help="shared-prefix: system prompt tokens (default: 1024)")
    d.add_argument("--suffix-len", type=int, default=32, help="shared-prefix: question tokens (default: 32)")
    d.add_argument("--doc-len", type=int, default=2048, help="long-input: prompt tokens (default: 2048)")
    d.add_argument("--tokenizer", default="default", help="GGUF file or HF directory whose tokenizer makes the "
                                                          "prompts token-exact (default: the default model)")
    d.add_argument("--seed", type=int, default=0, help="seed of the dataset and the arrival times (default: 0)")
    lg = p.add_argument_group("load")
    if not sweep:
        lg.add_argument("--request-rate", type=_rate, default=float("inf"),
                        help="requests per second, Poisson (gamma with --burstiness); inf sends all at once "
                             "(default: inf)")
    lg.add_argument("--burstiness", type=float, default=1.0,
                    help="gamma shape of the inter-arrival gaps: 1 Poisson, <1 burstier (default: 1)")
    lg.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight (default: no cap)")
    lg.add_argument("--slo", default=None, help="goodput limits, e.g. ttft=2s,tpot=100ms (also e2e=); a bare "
                                                "number is seconds")
    lg.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                    help="vLLM's form of the same limits, in milliseconds: --goodput ttft:300 tpot:50")
    lg.add_argument("--warmup", type=int, default=2, help="short untimed requests first (default: 2)")
    p.add_argument("--label", default="", help="name of this system in reports and plots")
    p.add_argument("--out", help="write the result JSON here")
    v = p.add_argument_group("vLLM's `bench serve` names (the same run, its units)")
    v.add_argument("--endpoint", default=None, choices=["/v1/completions", "/v1/chat/completions"],
                   help="/v1/chat/completions sends each prompt as a chat message (the server's template wraps it)")
    v.add_argument("--random-input-len", type=int, default=None, help="random dataset: mean prompt tokens")
    v.add_argument("--random-output-len", type=int, default=None, help="random dataset: mean output tokens")
    v.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths drawn from [len * (1 - r), len * (1 + r)] (default: 0, exact)")
    v.add_argument("--save-result", action="store_true", help="write the result JSON to --result-dir")
    v.add_argument("--result-dir", default=".", help="where --save-result writes (default: .)")
    v.add_argument("--result-filename", default=None, help="file name for --save-result (default: one with "
                                                           "the label, rate and time)")
