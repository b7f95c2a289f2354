"""Engine step time beside a CPU-bound neighbour process, against the same step on an idle machine.

    python benchmarks/neighbour.py [--batches 1 32] [--steps 40] [--out benchmarks/results/neighbour_<cpu>.json]

A server shares its cores with its frontend, a router, a load generator, a log shipper. On a 2-core machine
one busy neighbour takes half of one core; an engine whose math threads wait for each other at every op
(OpenMP barriers) can then stall far more than the share it lost. For each thread setting (each in a
fresh process, since OpenMP reads its wait policy once) and each batch size, this times decode steps idle
and with a neighbour (`while True: pass`) pinned to the last core, alternately, and prints the ratio.
"governed" is the default engine: it gives up a thread while others keep a core busy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SPIN = "while True: pass"
VARIANTS = {  # name -> (torch threads, --adapt-threads, extra environment)
    "2 threads, governed": (2, True, {}),  # the default: tokenmill/runner/threads.py
    "2 threads": (2, False, {}),
    "2 threads, passive wait": (2, False, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "1 thread": (1, False, {}),
}
SETTLE_S = 1.2  # the governor looks once a second, at the CPU used since it last looked


def child(threads: int, adapt: bool, batches: list[int], steps: int, rounds: int) -> None:
    import torch

    from tokenmill import LLM, SamplingParams

    torch.set_num_threads(threads)
    llm = LLM(model="default", num_threads=threads, adapt_threads=adapt)
    eng = llm.engine
    last = os.cpu_count() - 1
    out: dict[str, dict[str, list[float]]] = {}
    for b in batches:
        params = SamplingParams(temperature=0.0, max_tokens=10_000, ignore_eos=True)
        for i in range(b):
            eng.add_request(llm.tokenizer.encode(f"Request {i}: tell me about the mill and the river, part {i}."), params,
                            request_id=f"b{b}-{i}")
        for _ in range(8):  # every prompt in (they fit a step or two): the timed steps are decode only
            eng.step()
        times: dict[str, list[float]] = {"idle": [], "neighbour": [], "idle_threads": [], "neighbour_threads": []}
        for _ in range(rounds):
            for cond in ("idle", "neighbour"):
                spin = None
                if cond == "neighbour":
                    spin = subprocess.Popen([sys.executable, "-c", SPIN])
                    os.sched_setaffinity(spin.pid, {last})
                # Steady state: an untimed step after one interval (its look spans both conditions), then a
                # second interval, so the first timed step's look sees only this one.
                time.sleep(SETTLE_S)
                eng.step()
                time.sleep(SETTLE_S)
                try:
                    for _ in range(steps):
                        t0 = time.perf_counter()
                        eng.step()
                        times[cond].append(time.perf_counter() - t0)
                        times[f"{cond}_threads"].append(torch.get_num_threads())
                finally:
                    if spin is not None:
                        spin.kill()
                        spin.wait()
        for i in range(b):
            eng.abort_request(f"b{b}-{i}")
        while eng.has_unfinished():
            eng.step()
        out[str(b)] = times
    print("RESULT " + json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--steps", type=int, default=30, help="steps timed per phase")
    ap.add_argument("--rounds", type=int, default=3, help="idle/neighbour phases, alternating")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--adapt", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child, args.adapt, args.batches, args.steps, args.rounds)
        return

    from tokenmill.kernels.cpu import cpu_name

    results = {"cpu": cpu_name(), "cores": os.cpu_count(), "steps": args.steps, "rounds": args.rounds, "variants": {}}
    for name in args.variants:
        threads, adapt, env = VARIANTS[name]
        cmd = [sys.executable, __file__, "--child", str(threads), "--steps", str(args.steps), "--rounds",
               str(args.rounds), "--batches", *map(str, args.batches), *(["--adapt"] if adapt else [])]
        proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, check=False)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{name}: no result\n{proc.stderr[-3000:]}")
        per_batch = json.loads(line.removeprefix("RESULT "))
        results["variants"][name] = {}
        for b, t in per_batch.items():
            idle, busy = statistics.median(t["idle"]), statistics.median(t["neighbour"])
            results["variants"][name][b] = {"idle_ms": idle * 1e3, "neighbour_ms": busy * 1e3, "ratio": busy / idle,
                                            "neighbour_p90_ms": sorted(t["neighbour"])[int(0.9 * len(t["neighbour"]))] * 1e3,
                                            "idle_threads_mean": statistics.mean(t["idle_threads"]),
                                            "neighbour_threads_mean": statistics.mean(t["neighbour_threads"])}
            print(f"{name:>24} batch {b:>3}: idle {idle * 1e3:7.1f} ms, neighbour {busy * 1e3:7.1f} ms "
                  f"({busy / idle:.2f}x), neighbour p90 {results['variants'][name][b]['neighbour_p90_ms']:.1f} ms; "
                  f"threads {statistics.mean(t['idle_threads']):.1f} / {statistics.mean(t['neighbour_threads']):.1f}",
                  flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
