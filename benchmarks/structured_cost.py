"""What structured output costs a decode step: the default model generating B x 64 tokens (ignore_eos, so
both runs take the same steps) unconstrained and under a JSON constraint, alternately, same run.

    python benchmarks/structured_cost.py [--batches 1 32] [--rounds 3] [--out benchmarks/results/structured_cost.json]

Two figures per constraint: the step-time ratio of each round's constrained and unconstrained runs (the
median over rounds; wall clock, so a shared VM's noise is in it), and the time the step spends on
structured output itself (bringing matchers up to date, computing the masks where they are computed
inline, waiting for them otherwise, applying them), timed directly, as a share of the unconstrained step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from tokenmill import LLM, SamplingParams
from tokenmill.kernels.cpu import cpu_name
from tokenmill.runner import model_runner
from tokenmill.structured.grammar import StructuredOutput

TOPICS = ["a person", "a city", "a book", "a car", "a recipe", "a planet", "a song", "a company"]
SCHEMA = {"type": "object", "required": ["name", "facts"], "properties": {
    "name": {"type": "string"}, "year": {"type": "integer"},
    "facts": {"type": "array", "items": {"type": "object", "properties": {
        "key": {"type": "string"}, "value": {"type": ["string", "number", "boolean"]}}}}}}
CONSTRAINTS = {"json_schema": StructuredOutput(json=SCHEMA), "json_object": StructuredOutput(json_object=True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/structured_cost.json")
    args = ap.parse_args()

    # Time the step spends on structured output, measured where it happens.
    mask_s = [0.0]

    def timed(fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                mask_s[0] += time.perf_counter() - t0
        return wrapper

    class TimedFuture:
        def __init__(self, future):
            self.future = future

        def result(self):
            return timed(self.future.result)()

    start_masks = model_runner.ModelRunner._start_masks
    model_runner.ModelRunner._start_masks = lambda self, seqs: (
        None if (f := timed(start_masks)(self, seqs)) is None else TimedFuture(f))
    model_runner.apply_token_bitmask = timed(model_runner.apply_token_bitmask)
    llm = LLM("default")
    cpu = cpu_name()
    print(cpu)
    results = []
    for b in args.batches:
        convs = [[{"role": "user", "content": f"Describe {TOPICS[i % len(TOPICS)]} as JSON (#{i})."}] for i in range(b)]
        runs: dict[str, list[float]] = {"none": [], **{k: [] for k in CONSTRAINTS}}
        mask_per_step: dict[str, list[float]] = {k: [] for k in CONSTRAINTS}
        llm.chat(convs, SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)  # warm-up
        for _ in range(args.rounds):
            for name in runs:
                so = CONSTRAINTS.get(name)
                params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True, structured_output=so)
                steps0, mask_s[0] = llm.engine.num_steps, 0.0
                t0 = time.perf_counter()
                llm.chat(convs, params, use_tqdm=False)
                wall = time.perf_counter() - t0
                steps = llm.engine.num_steps - steps0
                runs[name].append(wall / steps)
                if so is not None:
                    mask_per_step[name].append(mask_s[0] / steps)
        base = statistics.median(runs["none"])
        row = {"batch": b, "tokens": args.tokens, "step_ms_unconstrained": base * 1e3}
        for name in CONSTRAINTS:
            # Each round runs the three back to back: the overhead is the median of the rounds' own ratios,
            # which a slow minute on a shared VM moves less than a ratio of medians.
            ratios = sorted(c / u - 1 for c, u in zip(runs[name], runs["none"], strict=True))
            row[f"step_ms_{name}"] = statistics.median(runs[name]) * 1e3
            row[f"overhead_{name}"] = statistics.median(ratios)
            row[f"overhead_{name}_range"] = [ratios[0], ratios[-1]]
            row[f"structured_ms_per_step_{name}"] = statistics.median(mask_per_step[name]) * 1e3
            row[f"structured_share_{name}"] = statistics.median(mask_per_step[name]) / base
        results.append(row)
        print(json.dumps(row))
    Path(args.out).write_text(json.dumps({"cpu": cpu, "rounds": args.rounds, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
