"""Draft-model proposals: a smaller model with the target's tokenizer, run greedily for k tokens.

The draft keeps its own paged KV cache (its own tensors and block pool, sized for as many tokens as the
target's). Per request it remembers how many tokens it has computed; each call first catches up on the
tokens it has not seen (the whole prompt of a new request, the tokens accepted since its last
proposal, everything after it was evicted), in one batched pass that also yields the first proposal,
then decodes the rest one token per pass. Its KV for its own proposals is never trusted: the next call
recomputes from the last real token, so rejected proposals need no rollback here.

The proposer runs any model with `LlamaModel.forward`'s signature: a draft model of its own
(`DraftProposer.from_source`), or a view of the target's first layers with an exit head
(`spec/early_exit.py`), whose logits may cover a subset of the vocabulary (`token_ids` maps them back).
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from tokenmill.engine.block_pool import Block, BlockPool
from tokenmill.errors import ConfigError
from tokenmill.layers.attention import AttentionMetadata
from tokenmill.models.llama import LlamaModel
from tokenmill.models.loader import ModelSource
from tokenmill.models.registry import model_class
from tokenmill.runner.batch import ProposeInput
from tokenmill.runner.model_runner import attention_entries
from tokenmill.runner.sampler import argmax_rows

logger = logging.getLogger(__name__)


class _DraftSeq:
    __slots__ = ("blocks", "num_computed")

    def __init__(self) -> None:
        self.blocks: list[Block] = []
        self.num_computed = 0  # tokens whose draft KV holds real (verified) tokens


class DraftProposer:
    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int, max_len: int,
                 token_ids: torch.Tensor | None = None):
        """model: run greedily over its own paged KV cache (num_blocks blocks, a tensor pair per layer);
        token_ids: the vocabulary id of each logits column, where the model's head covers a subset."""
        self.model = model
        self.max_len = max_len
        self.device = model.device
        self.dtype = model.dtype
        self.token_ids = token_ids
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_caching=False)
        # Its own cache: a tensor pair per layer and one block table, every block kept (a sliding layer's window
        # is applied in attention), so one AttentionMetadata serves every layer.
        arch = model.cfg
        shape = (num_blocks, block_size, arch.num_kv_heads, arch.head_dim)
        z = lambda: torch.zeros(shape, dtype=self.dtype, device=self.device)  # noqa: E731
        self.kv_caches = [(z(), z()) for _ in range(len(model.layers))]
        self.seqs: OrderedDict[str, _DraftSeq] = OrderedDict()  # least recently used first

    @classmethod
    def from_source(cls, source: ModelSource, target_vocab_size: int, dtype: torch.dtype, device: torch.device,
                    num_blocks: int, block_size: int, max_model_len: int) -> DraftProposer:
        """A draft model of its own (--draft-model), sharing the target's tokenizer."""
        arch = source.arch
        if arch.vocab_size != target_vocab_size:
            raise ConfigError(f"draft model {source.path} has a vocabulary of {arch.vocab_size} tokens, the "
                              f"target {target_vocab_size}: a draft must share the target's tokenizer")
        if arch.max_position_embeddings < max_model_len:
            logger.warning("draft model context %d < max_model_len %d: no proposals past its context",
                           arch.max_position_embeddings, max_model_len)
        max_len = min(max_model_len, arch.max_position_embeddings)
        model = model_class(arch)(arch, dtype, device, max_len)
        model.load_weights(source.iter_tensors(), str(source.path))
        logger.info("draft model %s: %d layers, hidden %d; draft KV cache %d blocks", source.path.name,
                    arch.num_layers, arch.hidden_size, num_blocks)
        return cls(model, num_blocks, block_size, max_len)

    def release(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            seq = self.seqs.pop(rid, None)
            if seq is not None and seq.blocks:
                self.pool.free(reversed(seq.blocks))

    def _reserve(self, rid: str, num_slots: int, keep: set[str]) -> _DraftSeq | None:
        """Blocks for num_slots tokens of rid, evicting idle requests' draft KV if need be."""
        seq = self.seqs.get(rid)
        if seq is None:
            seq = self.seqs[rid] = _DraftSeq()
        self.seqs.move_to_end(rid)
        need = -(-num_slots // self.block_size) - len(seq.blocks)
        while need > self.pool.num_free_blocks:
            victim = next((r for r in self.seqs if r not in keep), None)
            if victim is None:
                return None
            self.release([victim])  # it recomputes from scratch when it next asks
        if need > 0:
            seq.blocks.extend(self.pool.allocate(need))
        return seq

    @torch.no_grad()
    def _forward(self, chunks: list[tuple[_DraftSeq, list[int], int]]) -> list[int]:
        """One draft pass over (seq, tokens, first position) chunks -> the greedy next token of each."""
        ids: list[int] = []
        pos: list[int] = []
        last_rows: list[int] = []
        for _, toks, start in chunks:
            ids.extend(toks)
            pos.extend(range(start, start + len(toks)))
            last_rows.append(len(ids) - 1)
        dev = self.device
        # Short catch-up chunks (the tokens accepted since the last proposal) attend as decodes.
        entries = attention_entries([(start, len(toks), [b.block_id for b in s.blocks], start > 0)
                                     for s, toks, start in chunks])
        meta = AttentionMetadata.build(*entries, self.block_size, self.dtype, dev)
        logits = self.model.forward(torch.tensor(ids, dtype=torch.long, device=dev),
                                    torch.tensor(pos, dtype=torch.long, device=dev), meta, self.kv_caches,
                                    torch.tensor(last_rows, dtype=torch.long, device=dev))
        best = argmax_rows(logits)
        return (best if self.token_ids is None else self.token_ids[best]).tolist()

    def propose(self, inputs: list[ProposeInput]) -> dict[str, list[int]]:
        keep = {p.request_id for p in inputs}
        active: list[tuple[ProposeInput, _DraftSeq, int]] = []
        for p in inputs:
            n = p.num_tokens
            k = min(p.max_tokens, self.max_len - n + 1)  # proposal j sits at position n - 1 + j
            if k <= 0:
                continue
            seq = self._reserve(p.request_id, n + k - 1, keep)
            if seq is None:
                continue  # no room even after evicting: no proposal this step
            active.append((p, seq, k))
        if not active:
            return {}
        # Pass 1: catch up on unseen real tokens; the last row's prediction is the first proposal.
        chunks = []
        for p, seq, _ in active:
            n = p.num_tokens
            start = min(seq.num_computed, n - 1)
            toks = (p.prompt_token_ids + p.output_token_ids)[start:] if start < len(p.prompt_token_ids) \
                else p.output_token_ids[start - len(p.prompt_token_ids):]
            chunks.append((seq, toks, start))
            seq.num_computed = n
        out = {p.request_id: [t] for (p, _, _), t in zip(active, self._forward(chunks), strict=True)}
        # Passes 2..k: one token each for every request that wants more.
        for j in range(1, max(k for _, _, k in active)):
            step = [(p, seq) for p, seq, k in active if k > j]
            toks = self._forward([(seq, [out[p.request_id][-1]], p.num_tokens - 1 + j) for p, seq in step])
            for (p, _), t in zip(step, toks, strict=True):
                out[p.request_id].append(t)
        return out
