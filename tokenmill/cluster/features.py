"""Request features for routing: an OpenAI request body -> `RequestFeatures` (prompt length, decode work,
the prompt's block-hash chain), made exactly as a replica's frontend will tokenize the prompt.

No torch and no I/O beyond loading the tokenizer: the router uses it, and so can a Ray deployment or a
simulator that wants the same decisions.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

from tokenmill.cluster.policy import RequestFeatures, block_hashes
from tokenmill.config import EngineConfig
from tokenmill.server.tools import chat_text
from tokenmill.tokenizer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_TOKENIZE_INLINE_CHARS = 8192  # longer prompts are tokenized off the event loop
_CHAT_DEFAULT_MAX_TOKENS = 256  # decode work assumed for a chat request without max_tokens
_COMPLETION_DEFAULT_MAX_TOKENS = 16  # the OpenAI (and tokenmill) default


def load_tokenizer(config: EngineConfig) -> Tokenizer:
    """The model's tokenizer and chat template, from metadata only (tensors, and torch, stay untouched)."""
    from tokenmill.models.loader import open_model

    return Tokenizer.from_source(open_model(config.model), config.tokenizer, config.chat_template)


class Featurizer:
    """Turns request bodies into RequestFeatures. Without a tokenizer (not loaded yet, or none) the features
    carry no prompt, and every policy falls back to load alone."""

    def __init__(self, block_size: int, hash_prompts: bool, tokenizer: Tokenizer | None = None,
                 seed: int | None = None):
        self.block_size = block_size
        self.hash_prompts = hash_prompts
        self.tokenizer = tokenizer
        self._seq = 0
        self._rng = random.Random(seed)

    async def features(self, body: Any) -> RequestFeatures:
        self._seq += 1
        seq, rand = self._seq, self._rng.getrandbits(32)
        if not isinstance(body, dict):
            return RequestFeatures(0, 0, (), seq, rand)
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            max_tokens = _CHAT_DEFAULT_MAX_TOKENS if "messages" in body else _COMPLETION_DEFAULT_MAX_TOKENS
        n = body.get("n")
        n = n if isinstance(n, int) and n > 0 else 1
        ids = None
        if self.tokenizer is not None:
            try:
                ids = await self.prompt_ids(body)
            except Exception:  # malformed request: the replica will say what is wrong with it
                ids = None
        if not ids:
            return RequestFeatures(0, max_tokens * n, (), seq, rand)
        hashes = block_hashes(ids, self.block_size) if self.hash_prompts else ()
        return RequestFeatures(len(ids), max_tokens * n, hashes, seq, rand)

    async def prompt_ids(self, body: dict) -> list[int] | None:
        """The token ids a replica will see for this body's (first) prompt, made as its frontend makes them."""
        tok = self.tokenizer
        assert tok is not None
        if "messages" in body:
            text = chat_text(tok, body["messages"], body.get("tools"), body.get("tool_choice"))
            special = False  # the template placed any BOS already
        else:
            p = body.get("prompt")
            if isinstance(p, list) and p and not isinstance(p[0], int):
                p = p[0]
            if isinstance(p, list):
                return [t for t in p if isinstance(t, int)]
            if not isinstance(p, str):
                return None
            text, special = p, True
        if len(text) <= _TOKENIZE_INLINE_CHARS:
            return tok.encode(text, add_special_tokens=special)
        return await asyncio.to_thread(tok.encode, text, special)
