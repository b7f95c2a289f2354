"""The block kernels alone, on the default model's shapes, one build against another on this CPU.

    python benchmarks/kernel_speed.py [--isa avx512-vnni,avx2] [--rounds 3] [--out FILE.json]

For each kernel build (TOKENMILL_KERNEL_ISA; a build this CPU cannot run is skipped) a child process times
one decoder step's linear layers, 30 x (qkv, o, gate_up, down) as w4a8 like the shipped Q4_1, and the
LM head as w8a8 like the shipped Q8_0, at 1 / 16 / 64 / 256 rows. Builds are visited in turn, --rounds times,
and each figure is the best visit (this VM's speed drifts by a fifth within minutes). Prints tokens/s of
the layers and the multiply-accumulates per second they reach; the head at one row as GB/s of weights read.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROWS = (1, 16, 64, 256)
LAYERS = 30
SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}  # (out, in)
HEAD = (49152, 576)


def child() -> None:
    """One build: times, as JSON on stdout."""
    import torch

    from tokenmill.kernels.cpu import block_linear
    from tokenmill.quant.block import BlockLinear, quantize_q4, quantize_q8

    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    g = torch.Generator().manual_seed(0)

    def block(n: int, k: int, q4: bool) -> BlockLinear:
        w = torch.randn(n, k, generator=g) * 0.05
        qs, d, m = quantize_q4(w) if q4 else (*quantize_q8(w), None)
        return BlockLinear(qs, d.half().float(), None if m is None else m.half().float(), q4, None, torch.float32)

    layer = {name: block(n, k, True) for name, (n, k) in SHAPES.items()}  # one layer's matrices, run 30 times
    head = block(*HEAD, False)

    def best_of(fn, seconds: float) -> float:
        fn()
        best, end = float("inf"), time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best

    kernels = block_linear()
    rows_per_group = getattr(kernels, "group_rows", lambda: 8)()  # builds before 16-row groups had 8
    out = {"isa": kernels.isa(), "group_rows": int(rows_per_group), "layers_s": {}, "head_s": {}}
    for rows in ROWS:
        xs = {name: torch.randn(rows, k, generator=g) for name, (_, k) in SHAPES.items()}

        def step(xs: dict = xs) -> None:
            for _ in range(LAYERS):
                for name, lin in layer.items():
                    lin(xs[name])

        out["layers_s"][rows] = best_of(step, 1.5)
        xh = torch.randn(rows, HEAD[1], generator=g)
        out["head_s"][rows] = best_of(lambda xh=xh: head(xh), 0.5)
    out["head_bytes"] = head.nbytes
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--isa", default="avx512-vnni,avx2", help="kernel builds to compare, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from tokenmill.kernels.cpu import cpu_isa, cpu_name

    have = cpu_isa()[0]
    order = ["avx512-vnni", "avx2", "x86-64"]
    isas = [i for i in args.isa.split(",") if i in order and order.index(i) >= order.index(have)]
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for isa in isas:
            env = {**os.environ, "TOKENMILL_KERNEL_ISA": isa, "THREADS": str(args.threads)}
            r = json.loads(subprocess.run([sys.executable, __file__, "--child"], env=env, check=True,
                                          capture_output=True, text=True).stdout.strip().splitlines()[-1])
            if isa in best:
                for key in ("layers_s", "head_s"):
                    r[key] = {k: min(v, best[isa][key][k]) for k, v in r[key].items()}
            best[isa] = r
    macs = LAYERS * sum(n * k for n, k in SHAPES.values())
    print(f"CPU: {cpu_name()}, {args.threads} threads; best of {args.rounds} visits per build")
    print("| build | rows/group | " + " | ".join(f"{r} rows: tok/s (GMAC/s)" for r in ROWS) + " | head, 1 row GB/s |")
    print("|---|---|" + "---|" * len(ROWS) + "---|")
    for isa, r in best.items():
        cells = [f"{int(rows) / t:,.0f} ({macs * int(rows) / t / 1e9:.0f})" for rows, t in r["layers_s"].items()]
        head_gbs = r["head_bytes"] / r["head_s"]["1"] / 1e9
        print(f"| {isa} | {r['group_rows']} | " + " | ".join(cells) + f" | {head_gbs:.1f} |")
    if len(best) > 1:
        first, *rest = best
        for other in rest:
            ratios = [best[other]["layers_s"][k] / best[first]["layers_s"][k] for k in best[first]["layers_s"]]
            print(f"{first} over {other}: " + ", ".join(f"{r}x" for r in (f"{x:.2f}" for x in ratios)) +
                  f" at {', '.join(map(str, ROWS))} rows")
    if args.out:
        args.out.write_text(json.dumps({"cpu": cpu_name(), "threads": args.threads, "builds": best}, indent=1))


if __name__ == "__main__":
    child() if "--child" in sys.argv else main()
