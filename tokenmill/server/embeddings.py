"""/v1/embeddings, the frontend's side: the embedding model's tokenizer, length checks, and the requests in
flight to the engine process (which runs the model between steps). No torch here."""

from __future__ import annotations

import asyncio
import base64
import itertools
import struct
from typing import Any

from tokenmill.errors import InvalidRequestError, TokenmillError
from tokenmill.models.sentence_model import BertConfig, load_embedding_tokenizer, resolve_embedding_model
from tokenmill.server.protocol import Embedded, EmbedRequest

MAX_INPUTS = 2048  # OpenAI's limit per request


class EmbeddingService:
    def __init__(self, name: str):
        path = resolve_embedding_model(name)
        self.config = BertConfig.from_dir(path)
        self.tokenizer = load_embedding_tokenizer(path)
        self.model_name = "all-MiniLM-L6-v2" if path.name == "model" and "minilm" in str(path).lower() else path.name
        self._pending: dict[str, asyncio.Future[list[list[float]]]] = {}
        self._ids = itertools.count()

    def encode(self, inputs: Any) -> list[list[int]]:
        """OpenAI's input (a string, strings, token ids, lists of token ids) -> the model's token ids,
        each within its length limit."""
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs:
            raise InvalidRequestError("input must be a non-empty string or list", param="input")
        if all(isinstance(t, int) for t in inputs):
            inputs = [inputs]
        if len(inputs) > MAX_INPUTS:
            raise InvalidRequestError(f"at most {MAX_INPUTS} inputs per request, got {len(inputs)}", param="input")
        vocab, limit = self.config.vocab_size, self.config.max_seq_length
        out: list[list[int]] = []
        texts = [(i, x) for i, x in enumerate(inputs) if isinstance(x, str)]
        encoded = dict(zip([i for i, _ in texts], self.tokenizer.encode_batch([t for _, t in texts]), strict=True))
        for i, x in enumerate(inputs):
            if isinstance(x, str):
                if not x:
                    raise InvalidRequestError(f"input[{i}] is empty", param="input")
                ids = encoded[i].ids
            elif isinstance(x, list) and x and all(isinstance(t, int) and 0 <= t < vocab for t in x):
                ids = list(x)  # token ids are the model's input as given (vLLM's behaviour)
            else:
                raise InvalidRequestError(f"input[{i}] must be a non-empty string or token ids in [0, {vocab})",
                                          param="input")
            if len(ids) > limit:
                raise InvalidRequestError(f"input[{i}] has {len(ids)} tokens; the embedding model takes at most "
                                          f"{limit}", param="input")
            out.append(ids)
        return out

    async def embed(self, send, token_ids: list[list[int]]) -> list[list[float]]:
        rid = f"emb-{next(self._ids)}"
        fut: asyncio.Future[list[list[float]]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            send(EmbedRequest(rid, token_ids))
            return await fut
        finally:
            self._pending.pop(rid, None)

    def on_result(self, msg: Embedded) -> None:
        fut = self._pending.get(msg.request_id)
        if fut is None or fut.done():
            return
        if msg.error is not None:  # the engine could not embed: its failure, not the caller's (500)
            fut.set_exception(TokenmillError(msg.error))
        else:
            fut.set_result(msg.embeddings)

    def fail_all(self, error: BaseException) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(error)


def encode_vector(v: list[float], fmt: str) -> list[float] | str:
    """float: the list; base64: little-endian float32 bytes (what the openai client asks for by default)."""
    if fmt == "base64":
        return base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()
    return v
