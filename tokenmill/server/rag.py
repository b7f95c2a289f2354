"""/v1/rag/chat/completions, the frontend's side: retrieve passages for the last user message (its vector from
the engine's embedding model, BM25 over the same chunks), place them in the prompt within a token budget and
in the index's order (so the prefix cache serves requests that share passages), then answer as a chat
completion does, with the passages cited. No torch: the index is numpy, faiss and bm25s."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

from tokenmill.errors import InvalidRequestError
from tokenmill.rag.prompt import Context, build_context, query_of, with_context
from tokenmill.rag.store import RagStore

DEFAULT_TOP_K = 4
MAX_TOP_K = 64
DEFAULT_CONTEXT_TOKENS = 1024


class RagService:
    def __init__(self, index_path: str, tokenizer):
        self.store = RagStore.load(index_path)
        self.tokenizer = tokenizer  # the generating model's: budgets are in its tokens
        self._tokens: dict[int, int] = {}  # chunk id -> passage tokens, counted once

    def count_tokens(self, chunk_id: int, text: str) -> int:
        n = self._tokens.get(chunk_id)
        if n is None:
            n = self._tokens[chunk_id] = len(self.tokenizer.encode(text, add_special_tokens=False))
        return n

    async def retrieve(self, embeddings, send, messages: list[dict], options: dict[str, Any]) -> tuple[Context, float]:
        """-> the context to place and the seconds retrieval took (embedding the query included)."""
        top_k = options.get("top_k")
        top_k = DEFAULT_TOP_K if top_k is None else top_k
        if not 1 <= top_k <= MAX_TOP_K:
            raise InvalidRequestError(f"rag.top_k must be in [1, {MAX_TOP_K}], got {top_k}", param="rag.top_k")
        budget = options.get("max_context_tokens")
        budget = DEFAULT_CONTEXT_TOKENS if budget is None else budget
        if budget < 1:
            raise InvalidRequestError(f"rag.max_context_tokens must be positive, got {budget}",
                                      param="rag.max_context_tokens")
        hybrid = options.get("hybrid")
        query = query_of(messages)
        if not query or not query.strip():
            raise InvalidRequestError("retrieval needs a user message with text to search for", param="messages")
        start = time.monotonic()
        ids = embeddings.tokenizer.encode(query).ids
        limit = embeddings.config.max_seq_length
        if len(ids) > limit:  # a long question is searched for by its start ([SEP] kept)
            ids = ids[:limit - 1] + ids[-1:]
        vector = np.asarray((await embeddings.embed(send, [ids]))[0], dtype=np.float32)
        hits = await asyncio.to_thread(self.store.search, query, vector, top_k,
                                       "dense" if hybrid is False else "hybrid")
        context = build_context(hits, self.count_tokens, budget, order=options.get("order") or "index")
        return context, time.monotonic() - start

    @staticmethod
    def augment(messages: list[dict], context: Context) -> list[dict]:
        return with_context(messages, context)

    @staticmethod
    def citations(context: Context) -> list[dict[str, Any]]:
        return [{"index": i + 1, "chunk_id": h.chunk_id, "source": h.chunk.source, "score": round(h.score, 6),
                 "text": h.chunk.text} for i, h in enumerate(context.hits)]
