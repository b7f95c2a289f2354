"""Where an engine step's time goes, at batch 1 and 64: the native decoder against the Python loop it replaced.

    python benchmarks/step_breakdown.py [--batches 1 64] [--steps 48] [--rounds 3] [--out benchmarks/results/step_breakdown_<cpu>]

The default model through the `LLM` engine, decode steps only (the prompts are prefilled first, then each
sequence decodes `--steps` tokens). Two runs per batch size, alternating `--rounds` times, each in its own
process: the native decoder (one call per step, `kernels/decoder.cpp`) and the Python loop over the same
kernels (`TOKENMILL_NATIVE_DECODER=0`). In the native run the decoder times each kind of kernel work
itself (linear layers, LM head, attention, element-wise; `--kv-cache-dtype int8` for the int8 cache); the rest of a step is the runner, sampler and
scheduler ("Python and engine"). The Python loop runs the same kernels on the same shapes, so its kernel
time is taken as the native run's, and what its forward pass takes beyond that is the per-op dispatch
("Python per-op dispatch"). Offline engine: no IPC. Writes OUT.json and OUT.png (stacked bars, ms per step).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

KINDS = ["linear", "lm_head", "attention", "elementwise"]


def measure(batch: int, steps: int, kv_cache_dtype: str) -> dict:
    """In this process: decode `steps` tokens for `batch` sequences; ms per step by kind."""
    import time

    from tokenmill import LLM, SamplingParams
    from tokenmill.bench.workload import random_workload

    llm = LLM("default", kv_cache_memory="1GiB", max_model_len=1024, kv_cache_dtype=kv_cache_dtype)
    vocab = llm.tokenizer.vocab_size
    prompts = [w.prompt_token_ids for w in random_workload(batch, (128, 128), (1, 1), 100, vocab - 100, seed=1)]
    llm.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    engine, model = llm.engine, llm.engine.runner.model
    forward = model.forward
    fw: list[float] = []

    def timed_forward(*a, **k):
        t0 = time.perf_counter()
        out = forward(*a, **k)
        fw.append(time.perf_counter() - t0)
        return out

    model.forward = timed_forward
    # Prefill every prompt (one token out), then time the decode steps alone.
    params = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(p, params, request_id=f"r{i}")
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running) or \
            engine.scheduler.waiting:
        engine.step()
    fw.clear()
    native = model.native
    if native is not None:
        native.set_profiling(True)
        native.take_profile()
    n = 0
    t0 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
        n += 1
    total = time.perf_counter() - t0
    prof = native.take_profile() if native is not None else {}
    return {"batch": batch, "steps": n, "native": native is not None, "step_ms": 1e3 * total / n,
            "forward_ms": 1e3 * sum(fw) / n, "kernels_ms": {k: 1e3 * prof.get(k, 0.0) / n for k in KINDS}}


def run_child(batch: int, steps: int, native: bool, kv_cache_dtype: str) -> dict:
    env = {**os.environ, "TOKENMILL_NATIVE_DECODER": "1" if native else "0"}
    out = subprocess.run([sys.executable, __file__, "--child", str(batch), str(steps), kv_cache_dtype], env=env,
                         check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def breakdown(native: dict, loop: dict) -> dict[str, dict[str, float]]:
    """ms per step by kind for each run (the loop's kernels taken as the native run's)."""
    k = native["kernels_ms"]
    after = {**k, "Python per-op dispatch": native["forward_ms"] - sum(k.values()),
             "Python and engine": native["step_ms"] - native["forward_ms"]}
    before = {**k, "Python per-op dispatch": loop["forward_ms"] - sum(k.values()),
              "Python and engine": loop["step_ms"] - loop["forward_ms"]}
    return {"Python loop": before, "native decoder": after}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted(results, key=int)
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4.5), squeeze=False)
    colors = dict(zip([*KINDS, "Python per-op dispatch", "Python and engine"],
                      ["#4878d0", "#6acc64", "#ee854a", "#d65f5f", "#956cb4", "#8c613c"], strict=True))
    for ax, b in zip(axes[0], batches, strict=True):
        runs = results[b]["breakdown"]
        names = list(runs)
        bottom = [0.0] * len(names)
        for kind, color in colors.items():
            vals = [max(runs[n][kind], 0.0) for n in names]
            ax.bar(names, vals, bottom=bottom, color=color, label=kind)
            bottom = [x + v for x, v in zip(bottom, vals, strict=True)]
        for i, total in enumerate(bottom):
            ax.text(i, total, f"{total:.1f} ms", ha="center", va="bottom")
        ax.set_title(f"batch {b}: one decode step")
        ax.set_ylabel("ms per step")
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        import logging

        logging.disable(logging.INFO)
        print(json.dumps(measure(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])))
        return
    from tokenmill.kernels.cpu import cpu_isa, cpu_name

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kv-cache-dtype", default="auto", help="the engine's --kv-cache-dtype (auto, model, float16 or int8)")
    ap.add_argument("--out", default=f"benchmarks/results/step_breakdown_{cpu_isa()[0]}")
    args = ap.parse_args()
    results: dict = {}
    for b in args.batches:
        runs: dict[str, list[dict]] = {"native": [], "loop": []}
        for r in range(args.rounds):
            for native in (True, False):
                res = run_child(b, args.steps, native, args.kv_cache_dtype)
                runs["native" if native else "loop"].append(res)
                print(f"batch {b} round {r} {'native' if native else 'loop'}: step {res['step_ms']:.2f} ms, "
                      f"forward {res['forward_ms']:.2f} ms", flush=True)
        # The median round of each, by step time.
        med = {k: sorted(v, key=lambda x: x["step_ms"])[len(v) // 2] for k, v in runs.items()}
        results[str(b)] = {"runs": runs, "breakdown": breakdown(med["native"], med["loop"]),
                           "step_ms_median": {k: statistics.median(x["step_ms"] for x in v) for k, v in runs.items()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"cpu": cpu_name(), "isa": cpu_isa()[0], "args": vars(args),
                                                    "results": results}, indent=2))
    plot(results, out.with_suffix(".png"))
    for b, r in results.items():
        print(f"batch {b}:", json.dumps({n: {k: round(v, 2) for k, v in d.items()} for n, d in r["breakdown"].items()}))


if __name__ == "__main__":
    main()
