"""Early-exit self-speculation against plain decoding, n-gram and draft speculation: single-stream decode speed
and acceptance on a chat workload and a long-input workload (copy a passage of source code), greedy.

    python benchmarks/early_exit.py --exit-heads HEADS/layer-6 HEADS/layer-10 --ks 2 4 \\
        --draft-model DRAFT --out benchmarks/results/early_exit

HEADS from `tokenmill distill --exit-layer 6 10 --out HEADS`, DRAFT from `tokenmill distill --out DRAFT`.
Every configuration is loaded once, side by side, and the prompts are run one at a time, each prompt through
every configuration in turn (the order rotating), so a shared machine's load falls on all of them alike.
A prompt is prefilled into the prefix cache first (a max_tokens=1 run), so decode speed is output tokens over
the wall time of the generate call (for the draft methods it includes the draft's own pass over the prompt,
which the prefix cache does not spare it), with the time per engine step spent in the target's forward pass and
verification and in the proposer. Ratios are against the plain model in the same run. The script checks that
every method produced the plain model's greedy tokens (exits 1 if not).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from spec import CHAT_QUESTIONS, long_input_messages  # noqa: E402

logger = logging.getLogger("bench.early_exit")


def configs(args) -> dict[str, dict]:
    out: dict[str, dict] = {"none": {}, f"ngram k={args.ngram_k}": dict(speculative="ngram",
                                                                           num_speculative_tokens=args.ngram_k)}
    if args.draft_model:
        out[f"draft k={args.draft_k}"] = dict(speculative="draft", draft_model=args.draft_model,
                                              num_speculative_tokens=args.draft_k)
    for head in args.exit_heads:
        layer = json.loads((Path(head) / "exit_head.json").read_text())["exit_layer"]
        for k in args.ks:
            out[f"early-exit L={layer} k={k}"] = dict(speculative="early-exit", exit_head=head, num_speculative_tokens=k)
    return out


def _time_runner(runner) -> dict[str, float]:
    """Seconds spent in the runner's forward pass + verification (execute) and in its proposer (propose)."""
    spent = {"execute": 0.0, "propose": 0.0}
    for what in spent:
        call = getattr(runner, what)

        def timed(*a, _call=call, _what=what, **k):
            t = time.perf_counter()
            try:
                return _call(*a, **k)
            finally:
                spent[_what] += time.perf_counter() - t

        setattr(runner, what, timed)
    return spent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--exit-heads", nargs="*", default=[], help="exit head directories (tokenmill distill --exit-layer)")
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4], help="proposals per step for early exit")
    p.add_argument("--draft-model", default=None)
    p.add_argument("--draft-k", type=int, default=4)
    p.add_argument("--ngram-k", type=int, default=4)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--chat", type=int, default=6, help="chat prompts")
    p.add_argument("--long", type=int, default=3, help="long-input prompts")
    p.add_argument("--long-chars", type=int, default=2400, help="characters of source per long input (~700 tokens)")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--kv-cache-memory", default="128MiB")
    p.add_argument("--out", default="benchmarks/results/early_exit", help="writes OUT.json and OUT.md")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("tokenmill").setLevel(logging.WARNING)

    import torch

    from tokenmill import LLM, SamplingParams
    from tokenmill.kernels.cpu import cpu_isa, cpu_name

    workloads = {"chat": [[{"role": "user", "content": q}] for q in CHAT_QUESTIONS[: args.chat]],
                 "long-input": long_input_messages(args.long, args.long_chars)}
    cfgs = configs(args)
    base = dict(dtype=args.dtype, kv_cache_memory=args.kv_cache_memory, max_model_len=2048, speculative_max_batch=1)
    t0 = time.perf_counter()
    llms = {name: LLM(args.model, **base, **opts) for name, opts in cfgs.items()}
    timers = {name: _time_runner(llm.engine.runner) for name, llm in llms.items()}
    logger.info("loaded %d configurations in %.0f s", len(llms), time.perf_counter() - t0)
    greedy = SamplingParams(temperature=0.0, max_tokens=args.output_len)
    acc = {(w, n): {"tokens": 0, "wall": 0.0, "drafted": 0, "accepted": 0, "steps": 0, "outputs": []}
           for w in workloads for n in cfgs}
    names = list(cfgs)
    turn = 0
    for wname, convs in workloads.items():
        for conv in convs:
            order = names[turn % len(names):] + names[: turn % len(names)]
            turn += 1
            for name in order:
                llm = llms[name]
                llm.chat([conv], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)  # prefill
                s0 = llm.engine.stats()
                timers[name].update(execute=0.0, propose=0.0)
                t = time.perf_counter()
                out = llm.chat([conv], greedy, use_tqdm=False)[0].outputs[0]
                wall = time.perf_counter() - t
                s1 = llm.engine.stats()
                a = acc[(wname, name)]
                a["tokens"] += len(out.token_ids)
                a["wall"] += wall
                a["drafted"] += s1.spec_num_draft_tokens - s0.spec_num_draft_tokens
                a["accepted"] += s1.spec_num_accepted_tokens - s0.spec_num_accepted_tokens
                a["steps"] += s1.num_steps - s0.num_steps
                a["execute_s"] = a.get("execute_s", 0.0) + timers[name]["execute"]
                a["propose_s"] = a.get("propose_s", 0.0) + timers[name]["propose"]
                a["outputs"].append(list(out.token_ids))
            logger.info("%s prompt %d done", wname, len(acc[(wname, 'none')]["outputs"]))
    rows = []
    identical = True
    for (wname, name), a in acc.items():
        same = a["outputs"] == acc[(wname, "none")]["outputs"]
        identical &= same
        rows.append({"workload": wname, "method": name, "output_tokens": a["tokens"], "wall_s": a["wall"],
                     "tok_s": a["tokens"] / a["wall"], "steps": a["steps"], "draft_tokens": a["drafted"],
                     "accepted_tokens": a["accepted"],
                     "acceptance_rate": a["accepted"] / a["drafted"] if a["drafted"] else None,
                     "tokens_per_step": a["tokens"] / a["steps"] if a["steps"] else None,
                     "execute_ms_per_step": 1e3 * a["execute_s"] / a["steps"],
                     "propose_ms_per_step": 1e3 * a["propose_s"] / a["steps"],
                     "same_as_none": same})
    for r in rows:
        r["vs_none"] = r["tok_s"] / next(b["tok_s"] for b in rows if b["workload"] == r["workload"] and b["method"] == "none")
    report = {"machine": f"{cpu_name()} ({cpu_isa()[0]})", "threads": torch.get_num_threads(),
              "model": args.model, "dtype": args.dtype, "output_len": args.output_len, "prompts":
              {w: len(c) for w, c in workloads.items()}, "rows": rows, "outputs_identical": identical,
              "seconds": time.perf_counter() - t0}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    lines = [f"# Early-exit self-speculation, {report['machine']}, {report['threads']} threads, {args.dtype}, "
             f"single stream, {args.output_len} output tokens", "",
             "| workload | method | decode tok/s | vs none | acceptance | tokens per step | target ms/step | "
             "proposer ms/step | greedy = none |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc_s = "—" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"
        lines.append(f"| {r['workload']} | {r['method']} | {r['tok_s']:.1f} | {r['vs_none']:.2f}× | {acc_s} | "
                     f"{r['tokens_per_step']:.2f} | {r['execute_ms_per_step']:.1f} | {r['propose_ms_per_step']:.1f} | "
                     f"{'yes' if r['same_as_none'] else 'NO'} |")
    lines.append(f"\nGreedy outputs identical across methods: {identical}.")
    md = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
