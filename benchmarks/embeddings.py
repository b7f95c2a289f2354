"""Embedding throughput: our BERT encoder (what /v1/embeddings runs in the engine process) against
sentence-transformers' `encode` on the same weights and texts, alternately, same run.

    python benchmarks/embeddings.py [--texts 512] [--batch 32] [--rounds 3] [--out benchmarks/results/embeddings.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from tokenmill.kernels.cpu import cpu_name
from tokenmill.models.bert import BertEncoder
from tokenmill.models.sentence_model import load_embedding_tokenizer, resolve_embedding_model

WORDS = ("the model serves many users at once while the scheduler batches tokens over a paged cache and "
         "retrieval finds the passages a question needs before the answer is written").split()


def texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(8, 120)))) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--texts", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/embeddings.json")
    args = ap.parse_args()
    from sentence_transformers import SentenceTransformer

    path = resolve_embedding_model("default")
    ours, tok = BertEncoder(path), load_embedding_tokenizer(path)
    ref = SentenceTransformer(str(path), device="cpu")
    data = texts(args.texts)

    def run_ours() -> np.ndarray:
        ids = [e.ids for e in tok.encode_batch(data)]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # as the engine loop batches: by length
        out = np.empty((len(ids), ours.dim), dtype=np.float32)
        for s in range(0, len(order), args.batch):
            chunk = order[s:s + args.batch]
            out[chunk] = ours.embed([ids[i] for i in chunk]).numpy()
        return out

    def run_ref() -> np.ndarray:
        return ref.encode(data, batch_size=args.batch, convert_to_numpy=True)

    times: dict[str, list[float]] = {"tokenmill": [], "sentence-transformers": []}
    run_ours(), run_ref()  # warm-up
    for _ in range(args.rounds):
        for name, fn in (("tokenmill", run_ours), ("sentence-transformers", run_ref)):
            t0 = time.perf_counter()
            vecs = fn()
            times[name].append(time.perf_counter() - t0)
    diff = float(np.abs(run_ours() - run_ref()).max())
    rate = {k: args.texts / statistics.median(v) for k, v in times.items()}
    result = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "texts": args.texts, "batch": args.batch,
              "texts_per_s": rate, "ratio": rate["tokenmill"] / rate["sentence-transformers"], "max_abs_diff": diff,
              "dim": int(vecs.shape[1])}
    print(json.dumps(result, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
