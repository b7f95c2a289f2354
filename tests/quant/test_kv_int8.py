"""int8 KV cache: the quantizer's bound; attention over an int8 cache (native kernel, both its AVX-512 head
sizes and the generic path; the PyTorch decode; prefill) equals attention over the dequantized K/V, and
stays within a stated distance of attention over the float K/V."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill.kernels.cpu import native
from tokenmill.layers.attention import AttentionMetadata, decode_reference, paged_attention
from tokenmill.models.arch import ModelArchConfig
from tokenmill.quant.kv import dequantize_kv, quantize_kv


def test_quantize_kv_bound():
    x = torch.randn(50, 3, 64, generator=torch.Generator().manual_seed(0)) * 4
    q, s = quantize_kv(x)
    assert q.dtype == torch.int8 and s.shape == (50, 3) and s.dtype == torch.float32
    assert ((dequantize_kv(q, s, torch.float32) - x).abs() <= s[..., None] / 2 * 1.0001 + 1e-7).all()


def test_int8_block_holds_about_4x_float32_tokens():
    # head_dim 64 -> 68 bytes per token-head for int8 against 256 for float32; 128 -> 132 against 256 (bf16)
    def arch(head_dim):
        return ModelArchConfig("llama", 100, head_dim * 4, 256, num_layers=2, num_heads=4, num_kv_heads=2,
                               head_dim=head_dim)
    assert arch(64).kv_block_bytes(16, "auto", 4) == 2 * 2 * 16 * 2 * 256
    assert arch(64).kv_block_bytes(16, "auto", 4) / arch(64).kv_block_bytes(16, "int8", 4) > 3.7
    assert arch(128).kv_block_bytes(16, "auto", 2) / arch(128).kv_block_bytes(16, "int8", 2) > 1.9


def dense(q, ks, vs, starts, lens, scale, group):
    outs, row = [], 0
    for s, n, k, v in zip(starts, lens, ks, vs, strict=True):
        qs = q[row:row + n].float().transpose(0, 1)
        kk = k.float().repeat_interleave(group, dim=1).transpose(0, 1)
        vv = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
        mask = torch.arange(s + n)[None, :] <= torch.arange(s, s + n)[:, None]
        outs.append(F.scaled_dot_product_attention(qs, kk, vv, attn_mask=mask, scale=scale).transpose(0, 1))
        row += n
    return torch.cat(outs).flatten(1)


def setup(dtype, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    H, Hkv, bs, NB = 6, 2, 8, 120
    caches = (torch.zeros(NB, bs, Hkv, D, dtype=torch.int8), torch.zeros(NB, bs, Hkv, D, dtype=torch.int8),
              torch.zeros(NB, bs, Hkv), torch.zeros(NB, bs, Hkv))
    shapes = [(9, 1), (0, 7), (40, 1), (5, 6), (0, 1), (16, 1), (100, 1)]
    perm = torch.randperm(NB, generator=g).tolist()
    tables, ks, vs, used = [], [], [], 0
    for s, n in shapes:
        nblk = -(-(s + n) // bs)
        table = perm[used:used + nblk]
        used += nblk
        tables.append(table)
        k = (torch.randn(s + n, Hkv, D, generator=g) * 2).to(dtype)
        v = torch.randn(s + n, Hkv, D, generator=g).to(dtype)
        kq, kscale = quantize_kv(k)
        vq, vscale = quantize_kv(v)
        for p in range(s):  # history already in the cache, quantized as a write would have
            blk, off = table[p // bs], p % bs
            caches[0][blk, off], caches[1][blk, off] = kq[p], vq[p]
            caches[2][blk, off], caches[3][blk, off] = kscale[p], vscale[p]
        ks.append(k)
        vs.append(v)
    starts, lens = [s for s, _ in shapes], [n for _, n in shapes]
    q = torch.randn(sum(lens), H, D, generator=g).to(dtype)
    meta = AttentionMetadata.build(starts, lens, tables, bs, dtype, torch.device("cpu"))
    return q, ks, vs, starts, lens, caches, meta, H // Hkv


def dq(x):
    q, s = quantize_kv(x)
    return dequantize_kv(q, s, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 32])  # 64: the AVX-512 path; 32: the generic C++ loop
@pytest.mark.parametrize("use_native", [True, False])
def test_int8_cache_attention(dtype, D, use_native, monkeypatch):
    if use_native and native() is None:
        pytest.skip("no compiler here: the native kernel is not built")
    if not use_native:
        monkeypatch.setattr("tokenmill.layers.attention.native", lambda: None)
    q, ks, vs, starts, lens, caches, meta, group = setup(dtype, D)
    k_new = torch.cat([k[s:] for k, s in zip(ks, starts, strict=True)])
    v_new = torch.cat([v[s:] for v, s in zip(vs, starts, strict=True)])
    out = paged_attention(q, k_new, v_new, caches[0], caches[1], meta, D ** -0.5, caches[2], caches[3])
    assert out.dtype == dtype
    # 1. Exactly the attention over the dequantized K/V (what the cache holds), up to float rounding.
    ref_dq = dense(q, [dq(k) for k in ks], [dq(v) for v in vs], starts, lens, D ** -0.5, group)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), ref_dq, atol=tol, rtol=tol)
    # 2. Close to attention over the float K/V: int8 per-token-head rounding moves outputs (|v| ~ 1) by
    #    well under 0.05 here; a cache read without its scales would be off by orders of magnitude.
    ref = dense(q, ks, vs, starts, lens, D ** -0.5, group)
    assert (out.float() - ref).abs().max() < 0.05 + tol


def test_native_int8_decode_equals_reference_on_long_contexts():
    if native() is None:
        pytest.skip("no compiler here: the native kernel is not built")
    g = torch.Generator().manual_seed(1)
    H, Hkv, D, bs, NB = 9, 3, 64, 16, 300
    kf = torch.randn(NB, bs, Hkv, D, generator=g)
    vf = torch.randn(NB, bs, Hkv, D, generator=g)
    kq, ksc = quantize_kv(kf.view(-1, Hkv, D))
    vq, vsc = quantize_kv(vf.view(-1, Hkv, D))
    kq, vq = kq.view(NB, bs, Hkv, D), vq.view(NB, bs, Hkv, D)
    ksc, vsc = ksc.view(NB, bs, Hkv), vsc.view(NB, bs, Hkv)
    lens = [1, 17, 300, 900, 64]
    perm = torch.randperm(NB, generator=g).tolist()
    tables, used = [], 0
    for n in lens:
        tables.append(perm[used:used - (-n // bs)])
        used += -(-n // bs)
    meta = AttentionMetadata.build([n - 1 for n in lens], [1] * len(lens), tables, bs, torch.float32,
                                   torch.device("cpu"))
    q = torch.randn(len(lens), H, D, generator=g)
    got = native().paged_decode_int8(q, kq, vq, ksc, vsc, meta.decode_block_table, meta.decode_lens, D ** -0.5)
    ref = decode_reference(q, kq, vq, meta, D ** -0.5, H // Hkv, ksc, vsc)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
