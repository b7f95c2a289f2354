"""Weight and KV quantization on the default model: speed, memory and quality, all in one run.

For each dtype x weights {none, int8, int4} x KV cache {auto, int8}:
- decode tok/s at batch 1, 16 and 64: all requests prefilled first, then `--decode-steps` pure decode
  steps timed around `EngineCore.step()` (batch x steps / seconds);
- offline throughput: output tok/s over a small seeded random workload through `LLM.generate`;
- KV capacity: tokens the block pool holds in the fixed `--kv-cache-memory` budget, and how many
  sequences of `--context` tokens that is;
- weight bytes by format and load time;
- perplexity over the held-out text (tokenmill/eval/data/heldout.txt) and its change against the
  none/auto model of the same dtype;
- greedy agreement with that none/auto model (teacher-forced top-1 and free-running prefix).
transformers (the same GGUF, dequantized; `--no-hf` skips it) is timed in the same run: single-stream
decode tok/s and perplexity over the same windows, per dtype.

Writes JSON and a Markdown table. Run on an idle machine:
    python benchmarks/quant.py --out bench_results/quant.json
(about 6-8 minutes on the 2-core machines; `--quick` is a ~1-minute smoke run of the same code).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import time
from pathlib import Path

import torch
from tqdm import tqdm

from tokenmill import LLM, SamplingParams
from tokenmill.bench.offline import peak_rss_mib
from tokenmill.bench.workload import random_workload
from tokenmill.eval.quality import (
    DEFAULT_PROMPTS,
    agreement,
    greedy,
    perplexity,
    read_text,
    teacher_forced_top1,
)

logger = logging.getLogger("bench.quant")


def decode_rate(llm: LLM, batch: int, prompt_len: int, steps: int, seed: int) -> float:
    """Prefill `batch` requests, then time `steps` engine steps that are pure decode at that batch."""
    eng = llm.engine
    eng.kv.reset_prefix_cache()
    items = random_workload(batch, (prompt_len, prompt_len), (1, 1), 100, eng.vocab_size - 100, seed=seed)
    # Long enough that no request finishes inside the timed steps (early ones decode during others' prefill).
    params = SamplingParams(temperature=0.0, max_tokens=eng.max_model_len - prompt_len - 1, ignore_eos=True)
    rids = [eng.add_request(it.prompt_token_ids, params) for it in items]
    started: set[str] = set()
    while len(started) < batch:  # prefill (chunked by the token budget) until every request has a token
        started.update(u.request_id for u in eng.step() if u.new_token_ids)
    t = time.perf_counter()
    produced = 0
    for _ in range(steps):
        produced += sum(len(u.new_token_ids) for u in eng.step())
    dt = time.perf_counter() - t
    for r in rids:
        eng.abort_request(r)
    while eng.has_unfinished():
        eng.step()
    assert produced == batch * steps, "a request left the batch during the timed steps"
    return produced / dt


def throughput(llm: LLM, num: int, seed: int = 0) -> dict:
    items = random_workload(num, (64, 256), (32, 128), 100, llm.engine.vocab_size - 100, seed=seed)
    params = [SamplingParams(temperature=0.0, max_tokens=it.output_len, ignore_eos=True) for it in items]
    llm.engine.kv.reset_prefix_cache()
    t = time.perf_counter()
    outs = llm.generate([it.prompt_token_ids for it in items], params, use_tqdm=False)
    dt = time.perf_counter() - t
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"requests": num, "output_tokens": n, "seconds": dt, "output_tok_s": n / dt}


def hf_numbers(source_path: Path, dtype: torch.dtype, windows: list[list[int]], steps: int) -> dict:
    from tokenmill.bench.offline import load_hf

    model = load_hf(source_path, dtype)
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(torch.tensor([w])).logits[0, :-1].float()
            lp = torch.log_softmax(logits, -1)
            nll -= lp.gather(1, torch.tensor(w[1:])[:, None]).sum().item()
            n += len(w) - 1
        ids = torch.tensor([random_workload(1, (64, 64), (1, 1), 100, 40000, seed=3)[0].prompt_token_ids])
        kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
        model.generate(ids, max_new_tokens=2, **kw)  # warm-up
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **kw)
        ttft = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=steps + 1, min_new_tokens=steps + 1, **kw)
        total = time.perf_counter() - t
    del model
    gc.collect()
    return {"perplexity": float(torch.tensor(nll / n).exp()), "decode_tok_s_batch1": steps / (total - ttft)}


def run(args: argparse.Namespace) -> dict:
    text = read_text(args.text)
    prompts = (DEFAULT_PROMPTS * 4)[:args.agreement_prompts]
    configs = [(dt, w, kv) for dt in args.dtypes for w in args.weights for kv in args.kv]
    report: dict = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "args": vars(args), "results": [], "hf": {}}
    refs: dict[str, dict] = {}
    bar = tqdm(configs, desc="quant bench")
    source_path = None
    for dt, w, kv in bar:
        bar.set_postfix_str(f"{dt} {w} kv={kv}")
        t0 = time.perf_counter()
        llm = LLM(model=args.model, dtype=dt, quantization=w, kv_cache_dtype=kv, kv_cache_memory=args.kv_cache_memory,
                  max_model_len=args.context, max_num_seqs=max(args.batches), num_threads=args.num_threads,
                  quant_compute_dtype=args.quant_compute_dtype)
        load_s = time.perf_counter() - t0
        source_path = llm.replica.source.path
        runner = llm.engine.runner
        llm.generate([[100, 200, 300]], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
        r: dict = {"dtype": dt, "weights": w, "kv_cache_dtype": kv, "load_s": load_s,
                   "weights_report": runner.model.weight_report(),
                   "kv_tokens": runner.num_blocks * runner.block_size, "kv_mib": runner.kv_bytes / 2**20}
        r["max_seqs_at_context"] = r["kv_tokens"] // args.context
        r["decode_tok_s"] = {str(b): decode_rate(llm, b, args.prompt_len, args.decode_steps, seed=b)
                             for b in args.batches}
        r["offline"] = throughput(llm, args.offline_requests)
        ppl = perplexity(llm, text, window=args.window, max_tokens=args.ppl_tokens)
        r["perplexity"] = ppl.perplexity
        r["ppl_tokens"] = ppl.tokens
        prompt_ids, out = greedy(llm, prompts, args.agreement_tokens)
        if (w, kv) == ("none", "auto"):
            refs[dt] = {"prompt_ids": prompt_ids, "out": out, "ppl": ppl.perplexity}
        if dt in refs:
            ref = refs[dt]
            forced = teacher_forced_top1(llm, ref["prompt_ids"], ref["out"])
            r["agreement"] = agreement(ref["out"], out, forced)
            r["ppl_change_pct"] = 100 * (ppl.perplexity / ref["ppl"] - 1)
        r["peak_rss_mib"] = peak_rss_mib()
        report["results"].append(r)
        logger.info("%s", json.dumps(r))
        del llm, runner
        gc.collect()
    if args.hf and source_path is not None:
        from tokenmill.config import EngineConfig
        from tokenmill.engine.replica import load_tokenizer

        _, tok = load_tokenizer(EngineConfig(model=args.model))
        ids = tok.encode(text)[:args.ppl_tokens]  # the ids our perplexity scored
        windows = [ids[i:i + args.window] for i in range(0, len(ids), args.window)]
        windows = [x for x in windows if len(x) >= 2]
        for dt in args.dtypes:
            report["hf"][dt] = hf_numbers(source_path, getattr(torch, dt), windows, args.decode_steps)
    return report


def markdown(report: dict) -> str:
    batches = [str(b) for b in report["args"]["batches"]]
    lines = ["| dtype | weights | KV | linear weights MiB | KV tokens in budget | "
             + " | ".join(f"decode tok/s b{b}" for b in batches)
             + " | offline tok/s | perplexity | Δppl | teacher-forced agree | free-run prefix agree |",
             "|---" * (10 + len(batches)) + "|"]
    base: dict[str, dict] = {}
    for r in report["results"]:
        if (r["weights"], r["kv_cache_dtype"]) == ("none", "auto"):
            base[r["dtype"]] = r
    for r in report["results"]:
        wb = sum(v for k, v in r["weights_report"].items() if k.endswith("_bytes")) / 2**20
        d = r["decode_tok_s"]
        b = base.get(r["dtype"])

        def rate(key: str, r=r, b=b, d=d) -> str:
            if key not in d:
                return "—"
            ratio = f" ({d[key] / b['decode_tok_s'][key]:.2f}×)" if b and key in b["decode_tok_s"] else ""
            return f"{d[key]:.1f}{ratio}"

        ag = r.get("agreement", {})
        lines.append(
            f"| {r['dtype']} | {r['weights']} | {r['kv_cache_dtype']} | {wb:.0f} | {r['kv_tokens']} | "
            + " | ".join(rate(b) for b in batches) + f" | {r['offline']['output_tok_s']:.1f} | "
            f"{r['perplexity']:.3f} | {r.get('ppl_change_pct', 0):+.2f} % | "
            f"{ag.get('teacher_forced_agreement', float('nan')):.3f} | "
            f"{ag.get('free_running_prefix_agreement', float('nan')):.3f} |")
    if report.get("hf"):
        lines += ["", "| transformers (same GGUF), dtype | decode tok/s b1 | perplexity |", "|---|---|---|"]
        for dt, h in report["hf"].items():
            lines.append(f"| {dt} | {h['decode_tok_s_batch1']:.1f} | {h['perplexity']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    p.add_argument("--weights", nargs="+", default=["none", "int8", "int4"], choices=["none", "int8", "int4"])
    p.add_argument("--kv", nargs="+", default=["auto", "int8"], choices=["auto", "int8"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens of the decode-rate requests")
    p.add_argument("--decode-steps", type=int, default=24)
    p.add_argument("--offline-requests", type=int, default=32)
    p.add_argument("--ppl-tokens", type=int, default=1024)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--agreement-prompts", type=int, default=16)
    p.add_argument("--agreement-tokens", type=int, default=32)
    p.add_argument("--kv-cache-memory", default="1GiB", help="the fixed KV budget every config gets")
    p.add_argument("--context", type=int, default=1024, help="max model length; KV capacity is given in these")
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--quant-compute-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="activation dtype inside the int8/int4 kernels (see tokenmill/quant/linear.py)")
    p.add_argument("--text", default=None, help="held-out text (default: tokenmill's heldout.txt)")
    p.add_argument("--no-hf", dest="hf", action="store_false", help="skip transformers")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of the same code")
    p.add_argument("--out", default="bench_results/quant.json", help="JSON path; the .md goes beside it")
    args = p.parse_args()
    if args.quick:
        args.batches, args.decode_steps, args.offline_requests = [1, 4], 3, 4
        args.ppl_tokens, args.agreement_prompts, args.agreement_tokens = 128, 2, 4
        args.prompt_len, args.context, args.window = 16, 256, 64
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    report = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    md = markdown(report)
    out.with_suffix(".md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
