"""Speculative decoding on this machine: decode tok/s with none / ngram / draft, on a long-input workload
(the answer copies spans of the prompt: prompt lookup pays) and a chat workload, at batch sizes from 1 up;
acceptance rates; and the batch size where each method stops paying (the crossover), which is what
`--speculative-max-batch` should be set to.

    python benchmarks/spec.py --draft-model DIR --out benchmarks/results/spec   # ~6-8 min on an idle machine

Decode tok/s = output tokens / wall time of one `generate` call for the batch, with the prompts already in
the prefix cache (a max_tokens=1 warm-up run first), so prefill hardly counts. Greedy, so every method
produces the same tokens (the script checks it). Speculation is forced on at every batch size here
(speculative_max_batch is set huge) to find where it stops paying.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import logging
import platform
import time
from pathlib import Path

logger = logging.getLogger("bench.spec")

CHAT_QUESTIONS = [
    "Explain how a bicycle works.", "What is photosynthesis?", "Give me three tips for learning a new language.",
    "Describe the water cycle.", "Why is the sky blue?", "How do I make a cup of tea?",
    "What causes the seasons on Earth?", "Explain what a computer program is to a child.",
    "What are the benefits of regular exercise?", "How does a rainbow form?",
    "What is the difference between weather and climate?", "Explain how the internet works in simple terms.",
    "How do plants grow from seeds?", "Explain what gravity is.", "How can I improve my sleep?",
    "How do vaccines work?", "Describe how to change a flat tire.", "What is machine learning?",
    "Give me advice for a job interview.", "Describe the life cycle of a butterfly.", "How do airplanes fly?",
    "What are some ways to save money?", "How does the heart pump blood?", "Explain recursion with an example.",
    "How do bees make honey?", "What is the Pythagorean theorem?", "How is paper made?", "What is democracy?",
    "Explain what an API is.", "What are good habits for studying?", "Why do leaves change color in the fall?",
    "Tell me about the Great Wall of China.",
]
# Standard-library modules whose source makes the long inputs: real text, on every machine, no download.
SOURCE_MODULES = ["textwrap", "shlex", "heapq", "bisect", "fnmatch", "glob", "csv", "json.decoder", "base64",
                  "colorsys", "getopt", "gettext", "netrc", "numbers", "operator", "pprint", "queue", "sched",
                  "secrets", "statistics", "string", "tabnanny", "timeit", "tokenize", "uu", "wave", "zipapp",
                  "calendar", "codeop", "copy", "dis", "filecmp"]


def long_input_messages(n: int, chars: int) -> list[list[dict]]:
    import importlib

    out = []
    for name in SOURCE_MODULES:
        try:
            src = inspect.getsource(importlib.import_module(name))
        except (ImportError, OSError, TypeError):
            continue
        body = src[len(src) // 4: len(src) // 4 + chars]
        body = body[body.find("\n") + 1:]  # start on a line boundary
        out.append([{"role": "user", "content": f"```python\n{body}\n```\nRepeat the code above exactly, "
                     "then add a one-line comment above each function."}])
        if len(out) == n:
            break
    return out


def run_method(method: str, args, workloads: dict[str, list[list[dict]]]) -> list[dict]:
    from tokenmill import LLM, SamplingParams

    opts = dict(dtype=args.dtype, kv_cache_memory=args.kv_cache_memory, max_model_len=args.max_model_len)
    if method != "none":
        opts.update(speculative=method, num_speculative_tokens=args.k, speculative_max_batch=1 << 20)
    if method == "draft":
        opts["draft_model"] = args.draft_model
    if args.num_threads:
        opts["num_threads"] = args.num_threads
    llm = LLM(args.model, **opts)
    rows = []
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len)
    for wname, convs in workloads.items():
        for b in args.batch_sizes:
            if b > len(convs):
                continue
            batch = convs[:b]
            llm.chat(batch, SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)  # prefill into the cache
            s0 = llm.engine.stats()
            t0 = time.perf_counter()
            outs = llm.chat(batch, params, use_tqdm=False)
            wall = time.perf_counter() - t0
            s1 = llm.engine.stats()
            ntok = sum(len(o.outputs[0].token_ids) for o in outs)
            drafted = s1.spec_num_draft_tokens - s0.spec_num_draft_tokens
            accepted = s1.spec_num_accepted_tokens - s0.spec_num_accepted_tokens
            per_pos = [a - b0 for a, b0 in zip(s1.spec_accepted_per_pos, s0.spec_accepted_per_pos or
                                               [0] * len(s1.spec_accepted_per_pos), strict=True)]
            drafts = s1.spec_num_drafts - s0.spec_num_drafts
            rows.append({
                "method": method, "workload": wname, "batch": b, "output_tokens": ntok, "wall_s": wall,
                "tok_s": ntok / wall, "steps": s1.num_steps - s0.num_steps,
                "draft_tokens": drafted, "accepted_tokens": accepted,
                "acceptance_rate": accepted / drafted if drafted else None,
                "acceptance_by_position": [a / drafts for a in per_pos] if drafts else None,
                "tokens": [o.outputs[0].token_ids for o in outs],
            })
            logger.info("%-5s %-10s batch %2d: %7.1f tok/s%s", method, wname, b, ntok / wall,
                        f", acceptance {accepted / drafted:.2f}" if drafted else "")
    del llm
    gc.collect()
    return rows


def crossover(rows: list[dict], method: str, workload: str) -> dict:
    """Largest batch where `method` is faster than none, and the first batch size where it is not."""
    base = {r["batch"]: r["tok_s"] for r in rows if r["method"] == "none" and r["workload"] == workload}
    pays, stops = None, None
    for r in sorted((r for r in rows if r["method"] == method and r["workload"] == workload), key=lambda r: r["batch"]):
        if r["batch"] not in base:
            continue
        if r["tok_s"] > base[r["batch"]] and stops is None:
            pays = r["batch"]
        elif stops is None:
            stops = r["batch"]
    return {"method": method, "workload": workload, "pays_up_to_batch": pays, "stops_paying_at_batch": stops}


def suggest(cross: list[dict], method: str) -> int | None:
    """--speculative-max-batch for `method`: the largest batch up to which it pays on every workload where
    it pays single-stream (where it never pays, speculation costs nothing to switch off); None if it
    pays nowhere."""
    limits = [c["pays_up_to_batch"] for c in cross if c["method"] == method and c["pays_up_to_batch"]]
    return min(limits) if limits else None


def markdown(report: dict) -> str:
    rows = report["rows"]
    base = {(r["workload"], r["batch"]): r["tok_s"] for r in rows if r["method"] == "none"}
    lines = [f"# Speculative decoding, {report['machine']}, {report['threads']} threads, k = {report['k']}, "
             f"{report['dtype']}", "",
             "| workload | method | batch | decode tok/s | vs none | acceptance | accepted per draft, by position |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        sp = r["tok_s"] / base[(r["workload"], r["batch"])] if (r["workload"], r["batch"]) in base else None
        acc = "—" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"
        pos = "—" if not r["acceptance_by_position"] else " / ".join(f"{a:.2f}" for a in r["acceptance_by_position"])
        lines.append(f"| {r['workload']} | {r['method']} | {r['batch']} | {r['tok_s']:.1f} | "
                     f"{'—' if sp is None else f'{sp:.2f}x'} | {acc} | {pos} |")
    lines += ["", "| method | workload | pays up to batch | stops paying at batch |", "|---|---|---|---|"]
    for c in report["crossover"]:
        lines.append(f"| {c['method']} | {c['workload']} | {c['pays_up_to_batch']} | {c['stops_paying_at_batch']} |")
    lines += ["", "Suggested `--speculative-max-batch` (largest batch up to which the method pays on every "
              "workload where it pays single-stream): " + ", ".join(
                  f"{m}: {v}" for m, v in report["suggested_speculative_max_batch"].items()) + ".",
              f"Greedy outputs identical across methods: {report['outputs_identical']}."]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--draft-model", default=None, help="draft directory (e.g. from tokenmill distill); "
                   "without it the draft method is skipped")
    p.add_argument("--k", type=int, default=4, help="speculative tokens per step (default: 4)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--long-chars", type=int, default=2400, help="characters of source per long input (~700 tokens)")
    p.add_argument("--kv-cache-memory", default="1GiB")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--out", default="benchmarks/results/spec", help="writes OUT.json and OUT.md")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in ("tokenmill",):
        logging.getLogger(name).setLevel(logging.WARNING)

    import torch

    n = max(args.batch_sizes)
    workloads = {"long-input": long_input_messages(n, args.long_chars),
                 "chat": [[{"role": "user", "content": q}] for q in (CHAT_QUESTIONS * (n // len(CHAT_QUESTIONS) + 1))[:n]]}
    methods = ["none", "ngram"] + (["draft"] if args.draft_model else [])
    t0 = time.perf_counter()
    rows = []
    for m in methods:
        rows += run_method(m, args, workloads)
    ref = {(r["workload"], r["batch"]): r["tokens"] for r in rows if r["method"] == "none"}
    identical = all(r["tokens"] == ref[(r["workload"], r["batch"])] for r in rows)
    for r in rows:
        del r["tokens"]
    cross = [crossover(rows, m, w) for m in methods if m != "none" for w in workloads]
    suggested = {m: suggest(cross, m) for m in methods if m != "none"}
    report = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "model": args.model, "draft_model": args.draft_model, "k": args.k, "dtype": args.dtype,
              "output_len": args.output_len, "rows": rows, "crossover": cross,
              "suggested_speculative_max_batch": suggested, "outputs_identical": identical,
              "seconds": time.perf_counter() - t0}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    for c in cross:
        print(f"crossover: {c['method']} on {c['workload']} pays up to batch {c['pays_up_to_batch']}, "
              f"stops paying at batch {c['stops_paying_at_batch']}")
    for m, v in suggested.items():
        print(f"suggested --speculative-max-batch for {m}: {v}")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
