"""Which vector index `tokenmill rag` uses: faiss (exact, and HNSW), usearch and hnswlib on the same vectors.

    python benchmarks/vector_index.py --out benchmarks/results/vector_index_zen4      # ~10 min on one core

Vectors: 384-dimensional, normalised (all-MiniLM-L6-v2's shape), drawn around random centres so neighbours
exist, at N = 2,000 (a RAG corpus of a few hundred documents), 50,000 and 200,000. For each library: build
seconds, query latency (one query at a time, as a server asks: p50 and p99 over 500 queries), recall@10 against
exact search. Every library runs on one thread (the engine has the other cores). Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from tokenmill.kernels.cpu import cpu_name

DIM, K, QUERIES = 384, 10, 500


def data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(16, n // 50), DIM)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.6 * rng.standard_normal((n, DIM)).astype(np.float32)
    q = centres[rng.integers(0, len(centres), QUERIES)] + 0.6 * rng.standard_normal((QUERIES, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return x, q


def libraries():
    import faiss
    import hnswlib
    from usearch.index import Index

    faiss.omp_set_num_threads(1)

    def faiss_flat(x):
        ix = faiss.IndexFlatIP(DIM)
        ix.add(x)
        return lambda q: ix.search(q[None], K)[1][0]

    def faiss_hnsw(x):
        ix = faiss.IndexHNSWFlat(DIM, 32, faiss.METRIC_INNER_PRODUCT)
        ix.hnsw.efConstruction = 80
        ix.add(x)
        ix.hnsw.efSearch = 128
        return lambda q: ix.search(q[None], K)[1][0]

    def usearch_hnsw(x):
        ix = Index(ndim=DIM, metric="ip", dtype="f32", connectivity=32, expansion_add=80, expansion_search=128)
        ix.add(np.arange(len(x)), x, threads=1)
        return lambda q: ix.search(q, K, threads=1).keys

    def hnswlib_hnsw(x):
        ix = hnswlib.Index(space="ip", dim=DIM)
        ix.init_index(max_elements=len(x), ef_construction=80, M=32)
        ix.set_num_threads(1)
        ix.add_items(x, np.arange(len(x)))
        ix.set_ef(128)
        return lambda q: ix.knn_query(q, k=K)[0][0]

    return {"faiss exact (IndexFlatIP)": faiss_flat, "faiss HNSW": faiss_hnsw, "usearch HNSW": usearch_hnsw,
            "hnswlib HNSW": hnswlib_hnsw}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2000,50000,200000")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        x, qs = data(n)
        exact = np.argsort(-(qs @ x.T), axis=1)[:, :K]
        for name, make in libraries().items():
            t = time.perf_counter()
            search = make(x)
            build = time.perf_counter() - t
            lat, recall = [], 0
            for q, truth in zip(qs, exact, strict=True):
                t = time.perf_counter()
                got = search(q)
                lat.append(time.perf_counter() - t)
                recall += len(set(map(int, got)) & set(map(int, truth)))
            lat.sort()
            row = {"n": n, "library": name, "build_s": build, "p50_ms": 1e3 * lat[len(lat) // 2],
                   "p99_ms": 1e3 * lat[int(len(lat) * 0.99)], "recall_at_10": recall / (K * len(qs))}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    result = {"cpu": cpu_name(), "rows": rows}
    Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [f"CPU: {result['cpu']}, one thread.", "", "| vectors | library | build s | query p50 ms | query p99 ms "
             "| recall@10 |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['n']:,} | {r['library']} | {r['build_s']:.2f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | "
              f"{r['recall_at_10']:.3f} |" for r in rows]
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
