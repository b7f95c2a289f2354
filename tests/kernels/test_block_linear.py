"""The W4A8 / W8A8 block kernel against the same arithmetic in PyTorch, the GGUF pieces it loads exactly,
and the ISA-keyed build cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenmill.kernels import cpu
from tokenmill.quant.block import BlockLinear, RowKinds, dequantize, piece_to_blocks, quantize_q4, quantize_q8
from tokenmill.quant.gguf import Q4_0, Q4_1, Q8_0, GGUFBlocks

kernels = cpu.block_linear()
pytestmark = pytest.mark.skipif(kernels is None, reason="no compiler here: the native kernel is not built")


def quantized_activations_reference(x: torch.Tensor) -> torch.Tensor:
    """x as the kernel sees it: per block of 32, d = max|x| / 127, round-half-even(x * (1 / d)) * d."""
    m, k = x.shape
    xb = x.float().reshape(m, k // 32, 32)
    d = xb.abs().amax(-1) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    return (torch.round(xb * inv[..., None]) * d[..., None]).reshape(m, k)


def test_activation_quantizer_is_exactly_the_formula():
    x = torch.randn(7, 96) * torch.logspace(-3, 2, 96)
    x[2, :32] = 0  # an all-zero block: scale 0, values 0
    xq, xd, xs = kernels.quantize_activations(x)
    xb = x.reshape(7, 3, 32)
    d = xb.abs().amax(-1) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(xb * inv[..., None]).to(torch.int8)
    assert torch.equal(xq.reshape(7, 3, 32), q)
    assert torch.equal(xd, d)
    torch.testing.assert_close(xs, d * q.float().sum(-1), rtol=0, atol=0)


@pytest.mark.parametrize("q4", [True, False])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 33])
def test_kernel_matches_the_same_arithmetic_in_torch(q4, rows):
    g = torch.Generator().manual_seed(rows)
    n, k = 67, 160  # odd row count (threads split mid-tile), 5 blocks (two pairs and a lone one)
    w = torch.randn(n, k, generator=g) * 0.05
    qs, d, m = quantize_q4(w) if q4 else (*quantize_q8(w), None)
    lin = BlockLinear(qs, d, m, q4, None, torch.float32)
    x = torch.randn(rows, k, generator=g)
    want = quantized_activations_reference(x).double() @ dequantize(qs, d, m, q4).double().T
    got = lin(x)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert torch.equal(got[-1:], lin(x[-1:]))  # batched = alone, bit for bit
    # Against the float matmul, only quantization error remains.
    err = (got - x @ w.T).abs().max() / (x @ w.T).abs().max()
    assert err < (0.25 if q4 else 0.03)


@pytest.mark.parametrize("q4", [True, False])
def test_float16_scales_give_the_float32_result_bit_for_bit(q4):
    """Scales exact in float16 (GGUF's) are held as float16, and the kernel's answer does not change."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(45, 96, generator=g) * 0.05
    qs, d, m = quantize_q4(w) if q4 else (*quantize_q8(w), None)
    d = d.half().float()
    m = None if m is None else m.half().float()
    held = BlockLinear(qs, d, m, q4, None, torch.float32)
    assert held.d.dtype == torch.float16 and (m is None or held.m.dtype == torch.float16)
    x = torch.randn(5, 96, generator=g)
    m_arg = torch.empty(0) if m is None else m
    want = (kernels.q4_linear if q4 else kernels.q8_linear)(x, held.qs, d, m_arg)  # float32 scales
    assert torch.equal(held(x), want)
    assert torch.equal(held.dequantize(), dequantize(qs, d, m, q4))
    # Scales that float16 cannot hold stay float32.
    assert BlockLinear(qs, d + 1e-6, m, q4, None, torch.float32).d.dtype == torch.float32


def test_q8_with_offsets_and_bias_and_the_dense_copy_for_prefill_rows():
    g = torch.Generator().manual_seed(1)
    qs = torch.randint(-127, 128, (40, 64), dtype=torch.int8, generator=g)
    d = torch.rand(40, 2, generator=g) * 0.01
    m = torch.randn(40, 2, generator=g) * 0.01
    bias = torch.randn(40, generator=g)
    dense = dequantize(qs, d, m, False)
    lin = BlockLinear(qs, d, m, False, bias, torch.float32, dense=dense)
    x = torch.randn(7, 64, generator=g)
    want = quantized_activations_reference(x) @ dense.T + bias
    torch.testing.assert_close(lin(x), want, rtol=1e-5, atol=1e-5)
    prompt = [False, True, True, False, True, False, False]  # output positions: block kernel; prompt: dense
    mixed = lin(x, RowKinds.from_mask(prompt, x.device))
    out_rows = torch.tensor([i for i, p in enumerate(prompt) if not p])
    in_rows = torch.tensor([i for i, p in enumerate(prompt) if p])
    assert torch.equal(mixed[out_rows], lin(x[out_rows]))  # a row's result does not depend on the rows beside it
    assert torch.equal(mixed[in_rows], torch.nn.functional.linear(x[in_rows], dense) + bias)
    assert torch.equal(lin(x, RowKinds.from_mask([True] * 7, x.device)), torch.nn.functional.linear(x, dense) + bias)
    assert RowKinds.from_mask([False] * 7, x.device) is None


def _gguf_blocks(qtype: int, rows: int, k: int, rng: np.random.Generator) -> GGUFBlocks:
    nb = k // 32
    d = rng.uniform(0.001, 0.02, (rows, nb)).astype(np.float16)
    if qtype == Q8_0:
        q = rng.integers(-127, 128, (rows, nb, 32)).astype(np.int8)
        raw = np.concatenate([d[..., None].view(np.uint8), q.view(np.uint8)], axis=-1)
    else:
        q = rng.integers(0, 16, (rows, nb, 32)).astype(np.uint8)
        nib = q[..., :16] | (q[..., 16:] << 4)
        parts = [d[..., None].view(np.uint8)]
        if qtype == Q4_1:
            parts.append(rng.uniform(-0.1, 0.1, (rows, nb, 1)).astype(np.float16).view(np.uint8))
        raw = np.concatenate([*parts, nib], axis=-1)
    return GGUFBlocks(qtype, torch.from_numpy(raw.reshape(rows, -1).copy()), (rows, k))


@pytest.mark.parametrize("qtype,q4", [(Q4_0, True), (Q4_1, True), (Q4_0, False), (Q4_1, False), (Q8_0, False)])
def test_gguf_pieces_load_as_shipped(qtype, q4):
    """Q4_0/Q4_1 into either layout and Q8_0 into w8a8 hold the shipped weights: dequantized, they equal the
    GGUF decoder's (to float32 rounding of Q4_1's widened offset)."""
    blocks = _gguf_blocks(qtype, 6, 96, np.random.default_rng(qtype))
    qs, d, m = piece_to_blocks(blocks, q4)
    torch.testing.assert_close(dequantize(qs, d, m, q4), blocks.dequantize(), rtol=0, atol=1e-6)


def test_build_cache_is_keyed_by_isa(monkeypatch):
    isa, flags = cpu.cpu_isa()
    path = cpu._build_dir("tokenmill_block_linear")
    assert f"-{isa}-" in path.name
    assert kernels.isa() in {"avx512-vnni": ("avx512-vnni",), "avx2": ("avx2",), "x86-64": ("scalar",)}[isa]
    cpu.cpu_isa.cache_clear()
    monkeypatch.setenv("TOKENMILL_KERNEL_ISA", "x86-64")
    try:
        assert cpu.cpu_isa() == ("x86-64", ())
        assert cpu._build_dir("tokenmill_block_linear") != path
    finally:
        cpu.cpu_isa.cache_clear()


@pytest.mark.parametrize("blocks", [1, 2, 3, 18])
def test_pairing_the_nibbles_is_lossless(blocks):
    from tokenmill.quant.block import pack_q4, pair_blocks, unpair_blocks

    q = torch.randint(0, 16, (5, 32 * blocks), dtype=torch.uint8)
    packed = pack_q4(q)
    assert torch.equal(unpair_blocks(pair_blocks(packed)), packed)
