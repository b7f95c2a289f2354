"""A retrieval index on disk and the searches over it. No torch: the server's frontend loads it.

Layout of an index directory:
  manifest.json   embedding model, chunking settings, each source file's sha256 and chunk count
  chunks.jsonl    the chunks in canonical order (source name, then place in the source): a chunk's id is its line
  vectors.npy     float32 [chunks, dim], the embedding model's normalised vectors, row = chunk id
  bm25/           the bm25s index over the same chunks

Dense search is faiss: exact inner product up to EXACT_LIMIT chunks (on our corpora it answers in well under a
millisecond and needs no tuning), HNSW above it (benchmarks/vector_index.py measured the choice). Hybrid search
fuses the dense and BM25 rankings by reciprocal rank.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tokenmill.errors import TokenmillError
from tokenmill.rag.chunking import Chunk

FORMAT_VERSION = 1
EXACT_LIMIT = 100_000  # chunks; past this, HNSW
RRF_K = 60  # reciprocal rank fusion's damping constant (Cormack et al.'s value)


@dataclass(frozen=True)
class Hit:
    chunk_id: int
    score: float  # dense: cosine; bm25: BM25 score; hybrid: the fused reciprocal-rank score
    chunk: Chunk


@dataclass
class Manifest:
    embedding_model: str
    dim: int
    chunk_tokens: int
    overlap: int
    files: dict[str, dict]  # name -> {"sha256", "chunks"}
    version: int = FORMAT_VERSION


def index_embedding_model(path: str | Path) -> str:
    """The embedding model an index was built with (its queries must be embedded by the same)."""
    manifest = Path(path) / "manifest.json"
    if not manifest.is_file():
        raise TokenmillError(f"{path} is not a tokenmill RAG index (no manifest.json); build one with "
                             f"`tokenmill rag index DOCS --out {path}`")
    return json.loads(manifest.read_text())["embedding_model"]


def bm25_tokens(texts: list[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


class RagStore:
    def __init__(self, manifest: Manifest, chunks: list[Chunk], vectors: np.ndarray, bm25, path: Path | None = None):
        if len(chunks) != len(vectors):
            raise TokenmillError(f"index {path}: {len(chunks)} chunks but {len(vectors)} vectors")
        self.manifest, self.chunks, self.vectors, self.bm25, self.path = manifest, chunks, vectors, bm25, path
        self._dense = _dense_index(vectors) if len(chunks) else None

    # -- building and files ------------------------------------------------------------------------------------
    @classmethod
    def build(cls, manifest: Manifest, chunks: list[Chunk], vectors: np.ndarray) -> RagStore:
        import bm25s

        bm25 = None
        if chunks:
            bm25 = bm25s.BM25()
            bm25.index(bm25_tokens([c.searchable() for c in chunks]), show_progress=False)
        return cls(manifest, chunks, np.ascontiguousarray(vectors, dtype=np.float32), bm25)

    def save(self, out: Path) -> None:
        """Written beside the target and renamed into place: a reader never sees half an index."""
        out = Path(out)
        tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / "manifest.json").write_text(json.dumps(asdict(self.manifest), indent=1))
        with open(tmp / "chunks.jsonl", "w") as f:
            for c in self.chunks:
                f.write(json.dumps(asdict(c), ensure_ascii=False) + "\n")
        np.save(tmp / "vectors.npy", self.vectors)
        if self.bm25 is not None:
            self.bm25.save(str(tmp / "bm25"))
        old = out.with_name(out.name + f".old-{os.getpid()}")
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
        self.path = out

    @classmethod
    def load(cls, path: str | Path) -> RagStore:
        import bm25s

        path = Path(path)
        index_embedding_model(path)  # the clear error for a directory that is no index
        raw = json.loads((path / "manifest.json").read_text())
        if raw.get("version") != FORMAT_VERSION:
            raise TokenmillError(f"{path}: index format {raw.get('version')}, this tokenmill reads "
                                 f"{FORMAT_VERSION}; rebuild it")
        manifest = Manifest(**raw)
        with open(path / "chunks.jsonl") as f:
            chunks = [Chunk(**json.loads(line)) for line in f]
        vectors = np.load(path / "vectors.npy")
        bm25 = bm25s.BM25.load(str(path / "bm25")) if chunks else None
        return cls(manifest, chunks, vectors, bm25, path)

    # -- search ------------------------------------------------------------------------------------------------
    def dense(self, query: np.ndarray, k: int) -> list[Hit]:
        if self._dense is None or k <= 0:
            return []
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
        if q.shape[1] != self.manifest.dim:
            raise TokenmillError(f"query vector has {q.shape[1]} dimensions, the index {self.manifest.dim}")
        scores, ids = self._dense.search(q, min(k, len(self.chunks)))
        return [Hit(int(i), float(s), self.chunks[i]) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0]

    def lexical(self, query: str, k: int) -> list[Hit]:
        """BM25; chunks sharing no word with the query are not hits."""
        if self.bm25 is None or k <= 0:
            return []
        tokens = bm25_tokens([query])[0]
        if not tokens:
            return []
        scores = self.bm25.get_scores(tokens)
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.lexsort((top, -scores[top]))]  # by score, ties by id: deterministic
        return [Hit(int(i), float(scores[i]), self.chunks[i]) for i in top if scores[i] > 0]

    def search(self, query_text: str, query_vector: np.ndarray | None, k: int, mode: str = "hybrid") -> list[Hit]:
        """mode: 'dense', 'bm25' or 'hybrid' (each ranking's candidates fused by reciprocal rank)."""
        if mode == "dense":
            return self.dense(query_vector, k)
        if mode == "bm25":
            return self.lexical(query_text, k)
        if mode != "hybrid":
            raise TokenmillError(f"search mode must be dense, bm25 or hybrid, got {mode!r}")
        pool = max(4 * k, 20)
        fused: dict[int, float] = {}
        for ranking in (self.dense(query_vector, pool), self.lexical(query_text, pool)):
            for rank, hit in enumerate(ranking):
                fused[hit.chunk_id] = fused.get(hit.chunk_id, 0.0) + 1.0 / (RRF_K + rank + 1)
        best = sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        return [Hit(i, s, self.chunks[i]) for i, s in best]


def _dense_index(vectors: np.ndarray):
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build it tried, at INFO
    import faiss

    faiss.omp_set_num_threads(1)  # one query at a time: threads would only cost (and take the engine's cores)
    n, dim = vectors.shape
    if n <= EXACT_LIMIT:
        index = faiss.IndexFlatIP(dim)
    else:
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = 128
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index
