"""Decode attention, this checkout's kernel against the one at another commit, timed in turns in one process.

    python benchmarks/attention_ab.py [--ref HEAD~1] [--batches 16 64] [--context 192] [--rounds 4] [--out FILE.json]

On a shared VM whose speed drifts by a fifth within minutes, two benchmark runs minutes apart cannot tell a
10 % change from the drift. This builds `tokenmill/kernels/paged_decode.cpp` (with `simd.h`) as it is at
--ref and as it is in the working tree into two small extensions, with the flags of this CPU's kernel
build, loads both, and times them in alternation on the same caches (attention_speed.py's shapes: the
default model's 30 layers, each its own cache, blocks scattered over the pool or --contiguous). Each
figure is the best of --rounds turns of 3 steps each, ms per 30-layer step. The first build takes a minute
per side; builds are cached under ~/.cache/tokenmill/attention_ab by source.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_speed import BS, FORMATS, D, H, caches  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("tokenmill/kernels/paged_decode.cpp", "tokenmill/kernels/simd.h")
BINDING = """#include <torch/extension.h>
#include "paged_decode.cpp"
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode);
  m.def("paged_decode_int8", &paged_decode_int8);
}
"""


def source_at(ref: str | None, path: str) -> bytes:
    if ref is None:
        return (ROOT / path).read_bytes()
    return subprocess.check_output(["git", "show", f"{ref}:{path}"], cwd=ROOT)


def build(ref: str | None):
    """The attention kernel as at `ref` (None: the working tree), as an extension module."""
    from torch.utils.cpp_extension import load

    from tokenmill.kernels.cpu import BASE_CFLAGS, cpu_isa

    isa, cflags = cpu_isa()
    files = {Path(p).name: source_at(ref, p) for p in SOURCES}
    digest = hashlib.sha256(b"".join(files.values()) + " ".join([*BASE_CFLAGS, *cflags]).encode()).hexdigest()[:12]
    root = Path(os.environ.get("TOKENMILL_CACHE") or Path.home() / ".cache" / "tokenmill") / "attention_ab"
    where = root / f"{isa}-{digest}"
    where.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (where / name).write_bytes(text)
    (where / "binding.cpp").write_text(BINDING)
    return load(name=f"attention_ab_{digest}", sources=[str(where / "binding.cpp")], build_directory=str(where),
                extra_cflags=[*BASE_CFLAGS, *cflags], extra_ldflags=["-fopenmp"], verbose=False)


def one_step(k, fmt: str, layers: list, q: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor) -> None:
    for c in layers:
        if fmt == "int8":
            k.paged_decode_int8(q, *c, tables, lens, D ** -0.5, 0)
        else:
            k.paged_decode(q, c[0], c[1], tables, lens, D ** -0.5, 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", default="HEAD~1", help="the commit to compare the working tree's kernel with")
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--context", type=int, default=192)
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--contiguous", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from tokenmill.kernels.cpu import cpu_isa, cpu_name

    sides = {args.ref: build(args.ref), "working tree": build(None)}
    rows = []
    print(f"CPU: {cpu_name()}, build {cpu_isa()[0]}, {torch.get_num_threads()} threads, context {args.context}, "
          f"{'contiguous' if args.contiguous else 'scattered'} blocks; ms per 30-layer step, best of {args.rounds} turns")
    print(f"| batch | cache | {args.ref} | working tree | {args.ref} / working tree |\n|---|---|---|---|---|")
    for batch in args.batches:
        g = torch.Generator().manual_seed(batch)
        per_seq = -(-args.context // BS)
        blocks = batch * per_seq + 1
        q = torch.randn(batch, H, D, generator=g)
        order = torch.arange(blocks - 1) if args.contiguous else torch.randperm(blocks - 1, generator=g)
        tables, lens = (order + 1).view(batch, per_seq), torch.full((batch,), args.context)
        for fmt in args.formats:
            layers = caches(fmt, blocks, g)
            best = {name: float("inf") for name in sides}
            for _ in range(args.rounds):
                for name, k in sides.items():
                    one_step(k, fmt, layers, q, tables, lens)
                    for _ in range(3):
                        t0 = time.perf_counter()
                        one_step(k, fmt, layers, q, tables, lens)
                        best[name] = min(best[name], (time.perf_counter() - t0) * 1e3)
            a, b = best[args.ref], best["working tree"]
            rows.append({"batch": batch, "format": fmt, "ref_ms": a, "working_tree_ms": b})
            print(f"| {batch} | {fmt} | {a:.2f} | {b:.2f} | {a / b:.2f} |", flush=True)
            del layers
    if args.out:
        args.out.write_text(json.dumps({"cpu": cpu_name(), "isa": cpu_isa()[0], "ref": args.ref,
                                        "ref_commit": subprocess.check_output(["git", "rev-parse", args.ref], cwd=ROOT,
                                                                              text=True).strip(),
                                        "threads": torch.get_num_threads(), "context": args.context,
                                        "contiguous": args.contiguous, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
