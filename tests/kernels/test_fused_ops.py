"""Each fused op against its eager formula (tokenmill/layers/ops.py), within float32 rounding."""

from __future__ import annotations

import pytest
import torch

from tokenmill.kernels.cpu import fused
from tokenmill.layers.attention import AttentionMetadata
from tokenmill.layers.ops import EagerOps, FusedOps
from tokenmill.layers.rotary import RotaryEmbedding

pytestmark = pytest.mark.skipif(fused() is None, reason="no compiler here: the native kernels are not built")

ROPE = RotaryEmbedding(64, 256, 10000.0, None, torch.device("cpu"))
EAGER, FUSED = EagerOps(ROPE), FusedOps(ROPE)
TOL = dict(rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("rows", [1, 5, 40])
def test_norms(rows):
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 576, generator=g), torch.randn(576, generator=g)
    torch.testing.assert_close(FUSED.norm(x, w, 1e-5), EAGER.norm(x, w, 1e-5), **TOL)
    delta, res = torch.randn(rows, 576, generator=g), torch.randn(rows, 576, generator=g)
    want_h, want_res = EAGER.add_norm(delta, res.clone(), w, 1e-5)
    got_h, got_res = FUSED.add_norm(delta, res, w, 1e-5)
    assert got_res is res  # updated in place
    assert torch.equal(got_res, want_res)  # one float32 add: bit-identical
    torch.testing.assert_close(got_h, want_h, **TOL)


def test_silu_mul():
    gu = torch.randn(7, 2 * 1536, generator=torch.Generator().manual_seed(0)) * 4
    torch.testing.assert_close(FUSED.silu_mul(gu), EAGER.silu_mul(gu), **TOL)


def test_rope_writes_rotated_k_and_v_into_their_slots():
    g = torch.Generator().manual_seed(0)
    H, Hkv, D, bs = 9, 3, 64, 16
    starts, lens, tables = [5, 0, 40], [1, 3, 1], [[2], [0], [7, 3, 1]]
    meta = AttentionMetadata.build(starts, lens, tables, bs, torch.float32, torch.device("cpu"))
    positions = torch.tensor([5, 0, 1, 2, 40])
    qkv = torch.randn(5, (H + 2 * Hkv) * D, generator=g)
    caches = [(torch.zeros(8, bs, Hkv, D), torch.zeros(8, bs, Hkv, D)) for _ in range(2)]
    tables_ = ROPE.tables(positions, torch.float32)
    q_e, k_e, v_e = EAGER.rope_qkv(qkv, positions, tables_, H, Hkv, D, caches[0], meta)
    q_f, k_f, v_f = FUSED.rope_qkv(qkv, positions, tables_, H, Hkv, D, caches[1], meta)
    assert k_f is None and v_f is None
    torch.testing.assert_close(q_f, q_e, **TOL)
    k_slots = caches[1][0].view(-1, Hkv, D)[meta.slot_mapping]
    v_slots = caches[1][1].view(-1, Hkv, D)[meta.slot_mapping]
    torch.testing.assert_close(k_slots, k_e, **TOL)
    assert torch.equal(v_slots, v_e)
    assert caches[1][0].count_nonzero() == k_e.count_nonzero()  # nothing written elsewhere


def test_rope_into_an_int8_cache_quantizes_as_quantize_kv_does():
    """An int8 cache gets the same rotated K (and V) quantized on write by quantize_kv's formula, bit for bit:
    values, scales, and nothing written elsewhere."""
    from tokenmill.quant.kv import quantize_kv

    g = torch.Generator().manual_seed(1)
    H, Hkv, D, bs = 9, 3, 64, 16
    meta = AttentionMetadata.build([3, 0], [2, 2], [[4], [1]], bs, torch.float32, torch.device("cpu"))
    positions = torch.tensor([3, 4, 0, 1])
    qkv = torch.randn(4, (H + 2 * Hkv) * D, generator=g) * 3
    qkv[1, (H + 1) * D:(H + 2) * D] = 0  # an all-zero K head: the scale's floor
    tables = ROPE.tables(positions, torch.float32)
    plain = (torch.zeros(8, bs, Hkv, D), torch.zeros(8, bs, Hkv, D))
    q_plain, _, _ = FUSED.rope_qkv(qkv, positions, tables, H, Hkv, D, plain, meta)
    int8 = (torch.zeros(8, bs, Hkv, D, dtype=torch.int8), torch.zeros(8, bs, Hkv, D, dtype=torch.int8),
            torch.zeros(8, bs, Hkv), torch.zeros(8, bs, Hkv))
    q_int8, k, v = FUSED.rope_qkv(qkv, positions, tables, H, Hkv, D, int8, meta)
    assert k is None and v is None and torch.equal(q_int8, q_plain)
    slots = meta.slot_mapping
    for cache, scales, plain_cache in ((int8[0], int8[2], plain[0]), (int8[1], int8[3], plain[1])):
        want_q, want_s = quantize_kv(plain_cache.view(-1, Hkv, D)[slots])
        assert torch.equal(cache.view(-1, Hkv, D)[slots], want_q)
        assert torch.equal(scales.view(-1, Hkv)[slots], want_s)
        assert cache.count_nonzero() == want_q.count_nonzero()


def test_rope_into_a_float16_cache_rounds_as_the_eager_write_does():
    """A float16 cache beside a float32 model: the rotated K and the V rounded to nearest as the eager write
    (attention.to_cache_dtype) rounds them, saturating at float16's largest value instead of overflowing."""
    from tokenmill.layers.attention import to_cache_dtype

    g = torch.Generator().manual_seed(2)
    H, Hkv, D, bs = 9, 3, 64, 16
    meta = AttentionMetadata.build([3, 0], [2, 2], [[4], [1]], bs, torch.float32, torch.device("cpu"))
    positions = torch.tensor([3, 4, 0, 1])
    qkv = torch.randn(4, (H + 2 * Hkv) * D, generator=g) * 3
    qkv[0, (H + Hkv) * D] = 1e6  # a V beyond float16's range, both signs
    qkv[2, (H + Hkv) * D + 5] = -1e6
    tables = ROPE.tables(positions, torch.float32)
    q_e, k_e, v_e = EAGER.rope_qkv(qkv, positions, tables, H, Hkv, D, None, meta)
    half = (torch.zeros(8, bs, Hkv, D, dtype=torch.float16), torch.zeros(8, bs, Hkv, D, dtype=torch.float16))
    q_f, k, v = FUSED.rope_qkv(qkv, positions, tables, H, Hkv, D, half, meta)
    assert k is None and v is None
    torch.testing.assert_close(q_f, q_e, **TOL)
    slots = meta.slot_mapping
    v_got = half[1].view(-1, Hkv, D)[slots]
    assert torch.equal(v_got, to_cache_dtype(v_e, torch.float16))  # no rotation: the same float32 in, bit for bit
    assert v_got.isfinite().all() and v_got.abs().max() == 65504
    # K: the rotation itself rounds within float32's last bits (TOL above), which can move a float16 rounding by
    # one step of float16 (2^-10 relative).
    k_got = half[0].view(-1, Hkv, D)[slots]
    torch.testing.assert_close(k_got.float(), to_cache_dtype(k_e, torch.float16).float(), rtol=2 ** -10, atol=1e-7)
    assert half[0].count_nonzero() == k_got.count_nonzero()  # nothing written elsewhere
