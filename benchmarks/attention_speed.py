"""Decode attention alone, per KV cache format: the native paged kernel over one step's 30 layers of the
default model's shapes (9 query heads, 3 KV heads of 64), every sequence at the same context length, its
blocks scattered over the pool (or --contiguous), each layer its own cache (so the KV streams from memory as
in the engine).

    python benchmarks/attention_speed.py [--batches 1 16 64] [--context 192] [--threads N] [--contiguous] [--out FILE.json]
    TOKENMILL_KERNEL_ISA=avx2 python benchmarks/attention_speed.py   # another build on the same CPU

--contiguous gives each sequence consecutive blocks instead (as a fresh pool hands out a prompt's blocks).

Prints ms per step and the KV bytes read per second for float32, float16 and int8 caches, best of --rounds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

LAYERS, H, HKV, D, BS = 30, 9, 3, 64, 16
FORMATS = ("float32", "float16", "int8")


def caches(fmt: str, blocks: int, g: torch.Generator) -> list[tuple[torch.Tensor, ...]]:
    shape = (blocks, BS, HKV, D)
    out = []
    for _ in range(LAYERS):
        k, v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        if fmt == "int8":
            out.append(((k * 40).to(torch.int8), (v * 40).to(torch.int8), torch.rand(shape[:3], generator=g),
                        torch.rand(shape[:3], generator=g)))
        else:
            out.append((k.to(getattr(torch, fmt)), v.to(getattr(torch, fmt))))
    return out


def kv_bytes(c: tuple[torch.Tensor, ...], tokens: int, blocks: int) -> float:
    """Bytes of one layer's cache that a step reads: its share of the tensors for `tokens` cached tokens."""
    return sum(t.numel() * t.element_size() for t in c) * tokens / (blocks * BS)


def measure(batch: int, context: int, fmt: str, rounds: int, steps: int, contiguous: bool = False) -> dict:
    from tokenmill.kernels.cpu import native

    k = native()
    g = torch.Generator().manual_seed(batch)
    per_seq = -(-context // BS)
    blocks = batch * per_seq + 1
    layers = caches(fmt, blocks, g)
    q = torch.randn(batch, H, D, generator=g)
    # the pool hands out blocks in no particular order once requests come and go
    order = torch.arange(blocks - 1) if contiguous else torch.randperm(blocks - 1, generator=g)
    tables = (order + 1).view(batch, per_seq)
    lens = torch.full((batch,), context)
    if fmt == "int8":
        def step():
            for c in layers:
                k.paged_decode_int8(q, *c, tables, lens, D ** -0.5, 0)
    else:
        def step():
            for c in layers:
                k.paged_decode(q, c[0], c[1], tables, lens, D ** -0.5, 0)
    step()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, (time.perf_counter() - t0) / steps)
    read = LAYERS * kv_bytes(layers[0], batch * context, blocks)
    return {"ms_per_step": 1e3 * best, "kv_gb_per_s": read / best / 1e9, "kv_mb_per_step": read / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--context", type=int, default=192)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, help="torch threads (default: as torch starts)")
    ap.add_argument("--contiguous", action="store_true", help="each sequence's blocks consecutive, not scattered")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from tokenmill.kernels.cpu import cpu_isa, cpu_name, native

    if native() is None:
        raise SystemExit("the native kernel did not build on this machine")
    res = {"cpu": cpu_name(), "isa": cpu_isa()[0], "threads": torch.get_num_threads(), "context": args.context,
           "blocks": "contiguous" if args.contiguous else "scattered", "results": {}}
    print(f"CPU: {res['cpu']}, build {res['isa']}, {res['threads']} threads, context {args.context} tokens, "
          f"{res['blocks']} blocks")
    print("| batch | " + " | ".join(f"{f} ms/step (GB/s)" for f in FORMATS) + " | float32 / float16 |")
    print("|---|" + "---|" * (len(FORMATS) + 1))
    for b in args.batches:
        row = {f: measure(b, args.context, f, args.rounds, args.steps, args.contiguous) for f in FORMATS}
        res["results"][b] = row
        cells = " | ".join(f"{row[f]['ms_per_step']:.2f} ({row[f]['kv_gb_per_s']:.1f})" for f in FORMATS)
        print(f"| {b} | {cells} | {row['float32']['ms_per_step'] / row['float16']['ms_per_step']:.2f} |", flush=True)
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
