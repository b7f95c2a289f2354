"""Attention over the paged KV cache.

The runner builds one `AttentionMetadata` per step; every layer reuses it.

On CPU with the native kernel, every query row of the step, prompt or output, is one row of the paged
kernel: it attends to its own sequence's KV up to its own position, read in place, with the same
arithmetic whatever else the step holds. So a position computes bit for bit the same cold or after a
prefix-cache hit, in one prompt chunk or several, decoded or verified by speculation, alone or in a
batch (with SDPA, a chunk after a cached prefix took a masked path and a cold prompt a causal one, and
the two round differently).

Elsewhere (CUDA, or no compiler): decoding sequences (one query token each) are attended in one batched
call over their gathered, padded KV; prefill chunks one sequence at a time with SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenmill.kernels.cpu import native
from tokenmill.quant.kv import quantize_kv


@dataclass
class PrefillChunk:
    tok_start: int  # rows of the flattened batch holding this chunk's queries
    tok_end: int
    kv_len: int  # tokens of KV the chunk attends to (cached prefix + the chunk itself)
    block_ids: torch.Tensor  # blocks covering kv_len
    mask: torch.Tensor | None  # [T, kv_len] bool, None when plain causal (no cached prefix)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] KV slot of each new token
    decode_rows: torch.Tensor | None  # rows of the batch that are single-token decodes
    decode_block_table: torch.Tensor | None  # [B, max_blocks]
    decode_lens: torch.Tensor | None  # [B] KV length of each decoding sequence
    prefills: list[PrefillChunk]
    all_decode: bool  # every row is a decode, in row order: skip the scatter back

    @classmethod
    def build(cls, starts: list[int], lens: list[int], block_tables: list[list[int]], block_size: int,
              dtype: torch.dtype, device: torch.device) -> AttentionMetadata:
        if device.type == "cpu" and native() is not None:
            return cls._rows_on_the_kernel(starts, lens, block_tables, block_size, device)
        slots: list[int] = []
        dec_rows: list[int] = []
        dec_tables: list[list[int]] = []
        dec_lens: list[int] = []
        prefills: list[PrefillChunk] = []
        row = 0
        for start, n, table in zip(starts, lens, block_tables, strict=True):
            for p in range(start, start + n):
                slots.append(table[p // block_size] * block_size + p % block_size)
            kv_len = start + n
            nblk = -(-kv_len // block_size)
            if n == 1:
                dec_rows.append(row)
                dec_tables.append(table[:nblk])
                dec_lens.append(kv_len)
            else:
                mask = None
                if start > 0:
                    q_pos = torch.arange(start, kv_len, device=device)
                    mask = torch.arange(kv_len, device=device)[None, :] <= q_pos[:, None]
                prefills.append(PrefillChunk(row, row + n, kv_len,
                                             torch.tensor(table[:nblk], dtype=torch.long, device=device), mask))
            row += n
        meta = cls(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            decode_rows=None, decode_block_table=None, decode_lens=None,
            prefills=prefills, all_decode=not prefills,
        )
        if dec_rows:
            width = max(len(t) for t in dec_tables)
            meta.decode_rows = torch.tensor(dec_rows, dtype=torch.long, device=device)
            meta.decode_block_table = torch.tensor([t + [0] * (width - len(t)) for t in dec_tables],
                                                   dtype=torch.long, device=device)
            meta.decode_lens = torch.tensor(dec_lens, dtype=torch.long, device=device)
        return meta

    @classmethod
    def _rows_on_the_kernel(cls, starts: list[int], lens: list[int], block_tables: list[list[int]], block_size: int,
                            device: torch.device) -> AttentionMetadata:
        """Every row a kernel row: the query at position p of a sequence attends to its first p + 1 tokens."""
        slots: list[int] = []
        kv_lens: list[torch.Tensor] = []
        tables: list[tuple[int, list[int]]] = []
        for start, n, table in zip(starts, lens, block_tables, strict=True):
            for p in range(start, start + n):
                slots.append(table[p // block_size] * block_size + p % block_size)
            kv_lens.append(torch.arange(start + 1, start + n + 1, dtype=torch.long))
            tables.append((n, table[:-(-(start + n) // block_size)]))
        width = max(len(t) for _, t in tables)
        table = torch.zeros(sum(lens), width, dtype=torch.long)
        row = 0
        for n, t in tables:
            table[row:row + n, :len(t)] = torch.tensor(t, dtype=torch.long)
            row += n
        return cls(slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
                   decode_rows=torch.arange(sum(lens), device=device), decode_block_table=table.to(device),
                   decode_lens=torch.cat(kv_lens).to(device), prefills=[], all_decode=True)


def _gather(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """[num_blocks, bs, Hkv, D] cache, [..., nblk] table -> [..., Hkv, nblk*bs, D]."""
    nb, bs, hkv, d = cache.shape
    g = cache.view(nb, -1).index_select(0, block_table.reshape(-1))
    g = g.view(*block_table.shape[:-1], block_table.shape[-1] * bs, hkv, d)
    return g.transpose(-3, -2)


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """K or V as a cache of `dtype` stores it: a float16 cache beside a float32 model saturates at float16's
    largest value (an infinity would be a NaN in every score that reads it), as the native write does."""
    if dtype == torch.float16 and x.dtype != dtype:
        return x.clamp(-65504.0, 65504.0).to(dtype)
    return x


def _gather_kv(cache: torch.Tensor, scales: torch.Tensor | None, block_table: torch.Tensor,
               dtype: torch.dtype) -> torch.Tensor:
    """Gathered [..., Hkv, L, D] K or V in `dtype`, dequantized when the cache is int8 (widened when float16)."""
    g = _gather(cache, block_table)
    if scales is None:
        return g.to(dtype)
    s = _gather(scales.unsqueeze(-1), block_table)  # [..., Hkv, L, 1]
    return (g.float() * s).to(dtype)


def paged_attention(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                    window: int | None = None) -> torch.Tensor:
    """q [T, H, D], k/v [T, Hkv, D] for this step's tokens (None: already in the cache) -> [T, H*D].

    window: a sliding window, the query at position p reading positions p - window + 1 .. p only (the blocks
    before them may have been freed: their table entries are never read).

    Writes this step's K/V into the cache first, so each query sees its own token and every token
    computed before it, including other sequences' blocks shared through the prefix cache.
    An int8 cache (k_scale/v_scale [num_blocks, bs, Hkv] given) is quantized on write and every path,
    prefill included, reads the quantized values back: a prefix-cache hit then equals a cold run.
    """
    t, h, d = q.shape
    hkv = k_cache.shape[2]
    group = h // hkv
    if k is None:  # already written by a fused rotary + cache-write op
        pass
    elif k_scale is not None:
        kq, ks = quantize_kv(k)
        vq, vs = quantize_kv(v)
        k_cache.view(-1, hkv, d).index_copy_(0, meta.slot_mapping, kq)
        v_cache.view(-1, hkv, d).index_copy_(0, meta.slot_mapping, vq)
        k_scale.view(-1, hkv).index_copy_(0, meta.slot_mapping, ks)
        v_scale.view(-1, hkv).index_copy_(0, meta.slot_mapping, vs)
    else:
        k_cache.view(-1, hkv, d).index_copy_(0, meta.slot_mapping, to_cache_dtype(k, k_cache.dtype))
        v_cache.view(-1, hkv, d).index_copy_(0, meta.slot_mapping, to_cache_dtype(v, v_cache.dtype))
    kv = (k_cache, v_cache, k_scale, v_scale)

    if meta.all_decode:
        return _decode(q, kv, meta, scale, group, window).reshape(t, h * d)

    out = torch.empty_like(q)
    if meta.decode_rows is not None:
        out[meta.decode_rows] = _decode(q[meta.decode_rows], kv, meta, scale, group, window)
    for c in meta.prefills:
        qc = q[c.tok_start:c.tok_end].transpose(0, 1).unsqueeze(0)  # [1, H, T, D]
        kc = _gather_kv(k_cache, k_scale, c.block_ids, q.dtype)[:, :c.kv_len].unsqueeze(0)  # [1, Hkv, L, D]
        vc = _gather_kv(v_cache, v_scale, c.block_ids, q.dtype)[:, :c.kv_len].unsqueeze(0)
        mask = c.mask
        if window is not None:
            q_pos = torch.arange(c.kv_len - (c.tok_end - c.tok_start), c.kv_len, device=q.device)[:, None]
            k_pos = torch.arange(c.kv_len, device=q.device)[None, :]
            mask = (k_pos <= q_pos) & (k_pos > q_pos - window)
        o = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, is_causal=mask is None,
                                           scale=scale, enable_gqa=group > 1)
        out[c.tok_start:c.tok_end] = o[0].transpose(0, 1)
    return out.reshape(t, h * d)


def _decode(q: torch.Tensor, kv: tuple, meta: AttentionMetadata, scale: float, group: int,
            window: int | None) -> torch.Tensor:
    """One query token per sequence."""
    k_cache, v_cache, k_scale, v_scale = kv
    if q.device.type == "cpu":
        kernels = native()
        if kernels is not None:  # reads the blocks in place: no gathered copy of the KV
            if k_scale is not None:
                return kernels.paged_decode_int8(q, k_cache, v_cache, k_scale, v_scale, meta.decode_block_table,
                                                 meta.decode_lens, scale, window or 0)
            return kernels.paged_decode(q, k_cache, v_cache, meta.decode_block_table, meta.decode_lens, scale,
                                        window or 0)
    return decode_reference(q, k_cache, v_cache, meta, scale, group, k_scale, v_scale, window)


def decode_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                     scale: float, group: int, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None, window: int | None = None) -> torch.Tensor:
    """Plain PyTorch decode: gather each sequence's blocks, pad, mask. The query heads sharing a KV
    head are laid along the query axis, so grouped-query attention needs no repeated K/V."""
    b, h, d = q.shape
    hkv = h // group
    kd = _gather_kv(k_cache, k_scale, meta.decode_block_table, q.dtype)  # [B, Hkv, L, D]
    vd = _gather_kv(v_cache, v_scale, meta.decode_block_table, q.dtype)
    key = torch.arange(kd.shape[2], device=q.device)[None, :]
    valid = key < meta.decode_lens[:, None]
    if window is not None:
        valid &= key >= meta.decode_lens[:, None] - window
    mask = torch.zeros(valid.shape, dtype=q.dtype, device=q.device).masked_fill_(~valid, float("-inf"))
    qd = q.view(b, hkv, group, d)
    o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask[:, None, None, :], scale=scale)
    return o.reshape(b, h, d)
