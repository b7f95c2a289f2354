"""Paged attention against a dense per-sequence reference, for every path (native decode kernel,
PyTorch decode, prefill with and without a cached prefix), in float32, float32 over a float16 cache, and
bfloat16, with and without a sliding window (whose freed blocks are never read)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill.kernels.cpu import native
from tokenmill.layers.attention import AttentionMetadata, decode_reference, paged_attention


def dense_reference(q, ks, vs, starts, lens, scale, group, window=None):
    """Each sequence alone: full K/V history, causal from its start position (within the window), heads repeated."""
    outs, row = [], 0
    for s, n, k, v in zip(starts, lens, ks, vs, strict=True):
        qs = q[row:row + n].float().transpose(0, 1)  # [H, n, D]
        kk = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [H, L, D]
        vv = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
        mask = torch.arange(s + n)[None, :] <= torch.arange(s, s + n)[:, None]
        if window is not None:
            mask &= torch.arange(s + n)[None, :] > torch.arange(s, s + n)[:, None] - window
        outs.append(F.scaled_dot_product_attention(qs, kk, vv, attn_mask=mask, scale=scale).transpose(0, 1))
        row += n
    return torch.cat(outs).flatten(1)


# A float16 cache is given K/V that float16 holds exactly, so the reference reads the same values and 1e-5
# checks the arithmetic (the rounding on write is test_kv_float16.py's).
@pytest.mark.parametrize("dtype,cache_dtype,atol", [(torch.float32, torch.float32, 1e-5),
                                                    (torch.float32, torch.float16, 1e-5),
                                                    (torch.bfloat16, torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("use_native", [True, False])
@pytest.mark.parametrize("D,window", [(32, None), (32, 6), (64, None), (256, 6)])  # 64, 256: the SIMD path
def test_mixed_batch_matches_dense(dtype, cache_dtype, atol, use_native, D, window, monkeypatch):
    if use_native and native() is None:
        pytest.skip("no compiler here: the native kernel is not built")
    if not use_native:
        monkeypatch.setattr("tokenmill.layers.attention.native", lambda: None)
    g = torch.Generator().manual_seed(0)
    H, Hkv, bs, NB = 8, 2, 4, 200
    k_cache = torch.zeros(NB, bs, Hkv, D, dtype=cache_dtype)
    v_cache = torch.zeros_like(k_cache)
    # (already cached tokens, new tokens): decodes, a cold prefill, a prefill after a cached prefix
    shapes = [(9, 1), (0, 7), (30, 1), (5, 6), (1, 1), (0, 1), (16, 1)]
    perm = (torch.randperm(NB - 1, generator=g) + 1).tolist()  # block 0 stands for freed blocks
    tables, ks, vs, used = [], [], [], 0
    for s, n in shapes:
        nblk = -(-(s + n) // bs)
        table = perm[used:used + nblk]
        used += nblk
        tables.append(table)
        k = torch.randn(s + n, Hkv, D, generator=g).to(cache_dtype).to(dtype)
        v = torch.randn(s + n, Hkv, D, generator=g).to(cache_dtype).to(dtype)
        for p in range(s):  # the history already in the cache
            k_cache[table[p // bs], p % bs] = k[p]
            v_cache[table[p // bs], p % bs] = v[p]
        ks.append(k)
        vs.append(v)
    starts, lens = [s for s, _ in shapes], [n for _, n in shapes]
    q = torch.randn(sum(lens), H, D, generator=g).to(dtype)
    k_new = torch.cat([k[s:] for k, s in zip(ks, starts, strict=True)])
    v_new = torch.cat([v[s:] for v, s in zip(vs, starts, strict=True)])
    if window is not None:  # blocks wholly before every query's window, freed: their table entries point at garbage
        junk = float("nan") if use_native else 1e4  # the PyTorch path gathers them and masks the scores
        k_cache[0], v_cache[0] = junk, junk
        for (s, _), table in zip(shapes, tables, strict=True):
            for i in range(max(0, s - window + 1) // bs):
                table[i] = 0
    meta = AttentionMetadata.build(starts, lens, tables, bs, dtype, torch.device("cpu"))
    out = paged_attention(q, k_new, v_new, k_cache, v_cache, meta, D ** -0.5, window=window)
    ref = dense_reference(q, ks, vs, starts, lens, D ** -0.5, H // Hkv, window)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=atol)


def test_native_decode_equals_reference_on_long_contexts():
    if native() is None:
        pytest.skip("no compiler here: the native kernel is not built")
    g = torch.Generator().manual_seed(1)
    H, Hkv, D, bs, NB = 9, 3, 64, 16, 400
    k_cache = torch.randn(NB, bs, Hkv, D, generator=g)
    v_cache = torch.randn(NB, bs, Hkv, D, generator=g)
    lens = [1, 17, 300, 1000, 64]
    perm = torch.randperm(NB, generator=g).tolist()
    tables, used = [], 0
    for n in lens:
        tables.append(perm[used:used - (-n // bs)])
        used += -(-n // bs)
    meta = AttentionMetadata.build([n - 1 for n in lens], [1] * len(lens), tables, bs, torch.float32,
                                   torch.device("cpu"))
    q = torch.randn(len(lens), H, D, generator=g)
    got = native().paged_decode(q, k_cache, v_cache, meta.decode_block_table, meta.decode_lens, D ** -0.5)
    torch.testing.assert_close(got, decode_reference(q, k_cache, v_cache, meta, D ** -0.5, H // Hkv),
                               atol=1e-5, rtol=1e-5)
