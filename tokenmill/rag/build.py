"""`tokenmill rag index`: documents -> chunks -> embeddings -> a RagStore on disk. Re-indexing into an existing
index keeps the chunks and vectors of every file whose bytes are unchanged and embeds only new or changed
files; files no longer given are dropped."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokenmill.errors import TokenmillError
from tokenmill.rag.chunking import Chunk, split_text
from tokenmill.rag.documents import find_files, read_document
from tokenmill.rag.store import Manifest, RagStore

logger = logging.getLogger(__name__)

EMBED_BATCH = 32


@dataclass
class IndexReport:
    files: int
    reused_files: int
    embedded_files: int
    dropped_files: int
    chunks: int
    embedded_chunks: int


def build_index(paths: list[str], out: str | Path, embedding_model: str = "default", chunk_tokens: int = 200,
                overlap: int = 40, progress: bool = True) -> IndexReport:
    from tqdm import tqdm

    from tokenmill.models.bert import BertEncoder
    from tokenmill.models.sentence_model import load_embedding_tokenizer, resolve_embedding_model

    model_dir = resolve_embedding_model(embedding_model)
    tokenizer = load_embedding_tokenizer(model_dir)
    encoder = BertEncoder(model_dir)
    limit = encoder.config.max_seq_length - 2  # [CLS] and [SEP]
    if chunk_tokens > limit:
        raise TokenmillError(f"chunk size {chunk_tokens} is past the embedding model's limit of {limit} tokens")
    files = find_files(paths)
    if not files:
        raise TokenmillError(f"no documents found under {', '.join(paths)}")

    old = _reusable(Path(out), embedding_model, encoder.dim, chunk_tokens, overlap)
    kept: dict[str, tuple[list[Chunk], np.ndarray]] = {}
    todo = []
    for f in files:
        prior = old.get(f.name)
        if prior is not None and prior[0] == f.sha256:
            kept[f.name] = prior[1]
        else:
            todo.append(f)
    new_chunks: list[Chunk] = []
    for f in todo:
        title, text = read_document(f.path)
        # The title is read with each chunk, so a chunk holds fewer of the document's own tokens.
        room = chunk_tokens - min(len(tokenizer.encode(title, add_special_tokens=False).ids), chunk_tokens // 4)
        new_chunks += split_text(text, f.name, tokenizer, room, min(overlap, room // 2), title)
    vectors = np.zeros((len(new_chunks), encoder.dim), dtype=np.float32)
    bar = tqdm(total=len(new_chunks), unit="chunk", desc="embedding", disable=not progress or not new_chunks)
    # Longest first: a batch pads to its longest member, so similar lengths waste the least.
    order = sorted(range(len(new_chunks)), key=lambda i: -len(new_chunks[i].searchable()))
    for b in range(0, len(order), EMBED_BATCH):
        idx = order[b:b + EMBED_BATCH]
        ids = [e.ids[:limit + 1] + e.ids[-1:] if len(e.ids) > limit + 2 else e.ids
               for e in tokenizer.encode_batch([new_chunks[i].searchable() for i in idx])]
        vectors[idx] = encoder.embed(ids).numpy()
        bar.update(len(idx))
    bar.close()
    fresh: dict[str, list[int]] = {}
    for i, c in enumerate(new_chunks):
        fresh.setdefault(c.source, []).append(i)

    chunks: list[Chunk] = []
    parts: list[np.ndarray] = []
    info: dict[str, dict] = {}
    for f in files:  # canonical order: by name, then place in the file
        if f.name in kept:
            cs, vs = kept[f.name]
        else:
            rows = fresh.get(f.name, [])
            cs, vs = [new_chunks[i] for i in rows], vectors[rows]
        chunks += cs
        parts.append(vs)
        info[f.name] = {"sha256": f.sha256, "chunks": len(cs)}
    all_vectors = np.concatenate(parts) if parts else np.zeros((0, encoder.dim), np.float32)
    manifest = Manifest(embedding_model, encoder.dim, chunk_tokens, overlap, info)
    RagStore.build(manifest, chunks, all_vectors).save(Path(out))
    return IndexReport(len(files), len(kept), len(todo), len(set(old) - {f.name for f in files}), len(chunks),
                       len(new_chunks))


def _reusable(out: Path, embedding_model: str, dim: int, chunk_tokens: int,
              overlap: int) -> dict[str, tuple[str, tuple[list[Chunk], np.ndarray]]]:
    """name -> (sha256, (chunks, vectors)) from an index already at `out` built the same way; else empty."""
    if not (out / "manifest.json").is_file():
        return {}
    try:
        store = RagStore.load(out)
    except TokenmillError as e:
        logger.warning("rebuilding %s from scratch: %s", out, e)
        return {}
    m = store.manifest
    if (m.embedding_model, m.dim, m.chunk_tokens, m.overlap) != (embedding_model, dim, chunk_tokens, overlap):
        logger.warning("rebuilding %s from scratch: built with other settings", out)
        return {}
    rows: dict[str, list[int]] = {}
    for i, c in enumerate(store.chunks):
        rows.setdefault(c.source, []).append(i)
    return {name: (meta["sha256"], ([store.chunks[i] for i in rows.get(name, [])], store.vectors[rows.get(name, [])]))
            for name, meta in m.files.items()}
