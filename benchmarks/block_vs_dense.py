"""The block kernel (w4a8) against a dense float32 F.linear on the default model's two widest shapes, by row
count: what tokenmill/quant/tuning.py decides at start-up, shown in full.

    python benchmarks/block_vs_dense.py [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from tokenmill.kernels.cpu import cpu_name
from tokenmill.quant.block import BlockLinear, pack_q4


def per_call(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{cpu_name()}, {args.threads} threads")
    for n, k in [(3072, 576), (576, 1536)]:  # gate+up, down
        q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
        d = torch.rand(n, k // 32).half().float() * 0.01
        m = -torch.rand(n, k // 32).half().float() * 0.05
        block = BlockLinear(pack_q4(q), d, m, True, None, torch.float32)
        dense = block.dequantize()
        for rows in [1, 4, 16, 64, 256]:
            x = torch.randn(rows, k)
            reps = max(3, 400 // rows)
            tb = per_call(lambda: block(x), reps)  # noqa: B023
            td = per_call(lambda: F.linear(x, dense), reps)  # noqa: B023
            print(f"{n}x{k} rows {rows:4d}: w4a8 kernel {tb * 1e3:7.3f} ms, dense float32 {td * 1e3:7.3f} ms "
                  f"({td / tb:.2f}x)")


if __name__ == "__main__":
    main()
