"""int8 / int4 weight-only linears against float, within bounds derived from the quantizers, on random
and real (default GGUF) weights; GGUF Q8_0/Q4_0/Q4_1 block decoding and the int4 repack."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

from tokenmill.quant.gguf import GGUFBlocks, GGUFDecoded
from tokenmill.quant.linear import (
    Int4Linear,
    LinearBuilder,
    dequantize_int4,
    pick_group,
    quantize_int4,
    quantize_int8,
)

CPU = torch.device("cpu")


def output_bound(x: torch.Tensor, elem_err: torch.Tensor) -> torch.Tensor:
    """|x @ (W - Wq).T| <= |x| @ |W - Wq|.T <= |x| @ elem_err.T (elem_err [N, K], per-element bounds)."""
    return x.abs().float() @ elem_err.T


def int8_elem_bound(w: torch.Tensor) -> torch.Tensor:
    s = w.float().abs().amax(dim=1, keepdim=True) / 127
    return (s / 2).expand_as(w) * 1.001 + 1e-7


def int4_elem_bound(w: torch.Tensor, g: int) -> torch.Tensor:
    n, k = w.shape
    wg = w.float().reshape(n, k // g, g)
    scale = (wg.amax(-1) - wg.amin(-1)) / 15
    return (scale / 2).repeat_interleave(g, dim=1) * 1.001 + 1e-6


def build(w, mode: str, group: int = 32, dtype=torch.float32):
    b = LinearBuilder(w.shape[0], w.shape[1], mode, group, dtype, CPU, "test")
    half = w.shape[0] // 3  # two pieces, as q and k/v arrive into the fused qkv
    b.add(0, half, w[:half])
    b.add(half, w.shape[0], w[half:])
    return b.finish(), b


def test_quantizers_respect_their_bounds():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * torch.rand(64, 1, generator=g) * 3
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert ((q.float() * s[:, None] - w).abs() <= int8_elem_bound(w)).all()
    for grp in (32, 64, 128):
        q4, sc, z = quantize_int4(w, grp)
        assert q4.min() >= 0 and q4.max() <= 15
        assert ((dequantize_int4(q4, sc, z, grp) - w).abs() <= int4_elem_bound(w, grp)).all()


@pytest.mark.parametrize("mode,group", [("int8", 32), ("int4", 32), ("int4", 128)])  # int8 has no groups
def test_random_weights_float32_within_bound(mode, group):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(320, 512, generator=g)
    x = torch.randn(7, 512, generator=g)
    lin, _ = build(w, mode, group)
    err = (lin(x) - x @ w.T).abs()
    bound = output_bound(x, int8_elem_bound(w) if mode == "int8" else int4_elem_bound(w, group))
    assert (err <= bound + 1e-3).all(), (err - bound).max()
    # and not trivially: a quantized layer does differ from float, but by far less than the output scale
    assert 0 < err.max() < 0.2 * (x @ w.T).abs().max()


def test_int8_prefill_sized_batches_take_the_dequantized_path_and_agree():
    from tokenmill.quant.linear import INT8_DEQUANT_ROWS

    g = torch.Generator().manual_seed(8)
    w = torch.randn(96, 128, generator=g)
    x = torch.randn(INT8_DEQUANT_ROWS + 3, 128, generator=g)
    lin, _ = build(w, "int8")
    big = lin(x)  # dense path
    small = torch.cat([lin(x[i:i + 8]) for i in range(0, x.shape[0], 8)])  # the int8 kernel
    torch.testing.assert_close(big, small, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_bfloat16_activations(mode):
    """Both kernels take bfloat16 activations; the result is within bf16 rounding of the float32 one."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(256, 384, generator=g)
    x = torch.randn(5, 384, generator=g)
    lin32, _ = build(w, mode)
    lin16, _ = build(w, mode, dtype=torch.bfloat16)
    y16 = lin16(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    ref = lin32(x)
    rel = (y16.float() - ref).norm() / ref.norm()
    assert rel < 2e-2


def test_bias_is_added():
    g = torch.Generator().manual_seed(3)
    w, bias, x = torch.randn(64, 64, generator=g), torch.randn(64, generator=g), torch.randn(3, 64, generator=g)
    for mode in ("int8", "int4"):
        b = LinearBuilder(64, 64, mode, 32, torch.float32, CPU)
        b.add(0, 64, w)
        lin, plain = b.finish(bias), None
        b2 = LinearBuilder(64, 64, mode, 32, torch.float32, CPU)
        b2.add(0, 64, w)
        plain = b2.finish()
        torch.testing.assert_close(lin(x), plain(x) + bias)


def test_group_falls_back_when_k_is_not_a_multiple():
    assert pick_group(576, 128) == 64  # SmolLM2's hidden size
    assert pick_group(576, 32) == 32
    assert pick_group(100, 32) is None
    b = LinearBuilder(8, 100, "int4", 32, torch.float32, CPU)
    assert b.mode == "none"  # no group fits: kept in float, with a warning


# ---------------------------------------------------------------------------------------------------------
# GGUF blocks
# ---------------------------------------------------------------------------------------------------------


def gguf_blocks(w: np.ndarray, qtype: T) -> GGUFBlocks:
    raw = quantize(w.astype(np.float32), qtype)
    return GGUFBlocks(int(qtype), torch.from_numpy(raw.copy()), w.shape)


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_1])
def test_block_decode_equals_gguf_dequantize(qtype):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((48, 256)).astype(np.float32) * rng.uniform(0.01, 2, (48, 1)).astype(np.float32)
    blocks = gguf_blocks(w, qtype)
    ref = torch.from_numpy(dequantize(blocks.raw.numpy(), qtype).astype(np.float32)).reshape(w.shape)
    assert torch.equal(blocks.dequantize(), ref)  # exact: same arithmetic in float32


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1])
def test_q4_repack_is_the_shipped_values(qtype):
    """Q4_0/Q4_1 at group 32 map onto int4 (scale, zero) with the 4-bit values unchanged: dequantizing the
    repack equals gguf's dequantization (Q4_1: up to float32 rounding of m + 8d), and so does the kernel."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((96, 512)).astype(np.float32)
    blocks = gguf_blocks(w, qtype)
    ref = torch.from_numpy(dequantize(blocks.raw.numpy(), qtype).astype(np.float32)).reshape(w.shape)
    q, scale, zero = blocks.to_int4(32)
    deq = dequantize_int4(q, scale, zero, 32)
    if qtype == T.Q4_0:
        assert torch.equal(deq, ref)
    else:
        torch.testing.assert_close(deq, ref, atol=1e-6, rtol=1e-6)
    b = LinearBuilder(96, 512, "int4", 32, torch.float32, CPU)
    b.add(0, 96, blocks)
    assert b.exact_pieces == 1
    x = torch.randn(4, 512, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(b.finish()(x), x @ ref.T, atol=1e-4, rtol=1e-4)


def test_q8_0_and_other_groups_are_requantized_within_bound():
    rng = np.random.default_rng(6)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(1))
    for qtype, mode, group in [(T.Q8_0, "int4", 32), (T.Q8_0, "int8", 32), (T.Q4_1, "int4", 64),
                               (T.Q4_0, "int8", 32)]:
        blocks = gguf_blocks(w, qtype)
        ref = blocks.dequantize()
        b = LinearBuilder(64, 256, mode, group, torch.float32, CPU)
        b.add(0, 64, blocks)
        assert b.exact_pieces == 0
        bound = output_bound(x, int8_elem_bound(ref) if mode == "int8" else int4_elem_bound(ref, group))
        assert ((b.finish()(x) - x @ ref.T).abs() <= bound + 1e-4).all()


def test_other_gguf_quantizations_run_as_w8a8_under_auto():
    """Q5_0 / Q5_1 (and the K-quants, which gguf-py cannot write: Gemma 3's file has them, test_gemma3.py) have no
    layout of ours: --quantization auto puts them on the w8a8 block kernel, requantized from their decoded values
    (8 bits holding at most 6), not float."""
    from tokenmill.kernels.cpu import block_linear

    if block_linear() is None:
        pytest.skip("no compiler here: the block kernel is not built")
    rng = np.random.default_rng(7)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(2))
    for qtype in (T.Q5_0, T.Q5_1):
        ref = torch.from_numpy(dequantize(quantize(w, qtype), qtype).copy())
        b = LinearBuilder(64, 256, "auto", 32, torch.float32, CPU, "test")
        b.add(0, 64, GGUFDecoded(int(qtype), ref, (64, 256)))
        assert b.block_mode() == "w8a8"
        lin = b.finish()
        assert lin.kind == "w8a8" and b.exact_pieces == 0
        # the kernel also quantizes activations per block of 32: a loose bound, but far below a float/int mix-up
        err = (lin(x) - x @ ref.T).abs().max()
        assert err < 0.05 * (x @ ref.T).abs().max(), qtype.name


@pytest.mark.slow
def test_real_weights_of_the_default_model(gguf_path):
    """Layer 0's tensors of the shipped GGUF: Q4_1 repacks exactly into int4; int8 within its bound; the
    Q8_0 embedding (the tied LM head) within the int8 and int4 bounds."""
    from tokenmill.models.loader import open_model

    src = open_model(str(gguf_path))
    x = torch.randn(4, 1536, generator=torch.Generator().manual_seed(2))
    seen = 0
    for name, t in src.iter_tensors(keep_blocks=True):
        if not isinstance(t, GGUFBlocks):
            continue
        if name.startswith("model.layers.1."):
            break
        if name == "model.embed_tokens.weight":  # 49,152 rows: a slice of them keeps the test short
            t = GGUFBlocks(t.qtype, t.raw[:2048], (2048, t.shape[1]))
        ref = t.dequantize()
        xs = x[:, :ref.shape[1]]
        for mode in ("int8", "int4"):
            b = LinearBuilder(*ref.shape, mode, 32, torch.float32, CPU)
            b.add(0, ref.shape[0], t)
            lin = b.finish()
            err = (lin(xs) - xs @ ref.T).abs()
            if mode == "int4" and t.qtype != int(T.Q8_0):
                assert b.exact_pieces == 1 and err.max() < 1e-3, name
            else:
                bound = output_bound(xs, int8_elem_bound(ref) if mode == "int8" else int4_elem_bound(ref, 32))
                assert (err <= bound + 1e-3).all(), name
        seen += 1
    assert seen == 8  # the embedding + q, k, v, o, gate, up, down of layer 0


def test_int4_linear_packs_large_row_counts():
    """The LM head's shape class: many rows, K = 576 (groups of 32 and 64 only)."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(4096, 576, generator=g)
    q, s, z = quantize_int4(w, 64)
    lin = Int4Linear(q, s, z, 64, None, torch.float32)
    x = torch.randn(2, 576, generator=g)
    deq = dequantize_int4(q, s, z, 64)
    torch.testing.assert_close(lin(x), x @ deq.T, atol=1e-3, rtol=1e-4)
