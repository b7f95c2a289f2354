"""The W4A8 / W8A8 block kernel against the same arithmetic in PyTorch, the GGUF pieces it loads exactly,
and the ISA-keyed build cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenmill.kernels import cpu
from tokenmill.quant.block import (
    DENSE_MIN_ROWS,
    BlockLinear,
    RowKinds,
    dequantize,
    interleave_q4,
    interleave_q8,
    piece_to_blocks,
    quantize_q4,
    quantize_q8,
)
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
    n, k = 67, 160  # rows not a multiple of 8 or 16 (a padded group; threads split mid-way), 5 blocks
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
@pytest.mark.parametrize("counts", [[1, 1], [0, 3, 0, 9, 1, 0], [8, 8, 8, 8, 8, 8, 8, 8], [17, 0, 2]])
def test_many_matrices_in_one_call_give_each_call_alone_bit_for_bit(q4, counts):
    """An MoE layer's experts run as one call over the step's rows sorted by expert: each run of rows comes
    out exactly as its own call gives it, whatever the other runs, and a matrix with no rows is never read."""
    g = torch.Generator().manual_seed(sum(counts))
    n, k = 67, 160
    lins = []
    for _ in counts:
        w = torch.randn(n, k, generator=g) * 0.05
        qs, d, m = quantize_q4(w) if q4 else (*quantize_q8(w), None)
        lins.append(BlockLinear(qs, d, m, q4, None, torch.float32))
    x = torch.randn(sum(counts), k, generator=g)
    many = kernels.q4_linear_many if q4 else kernels.q8_linear_many
    unread = torch.empty(0, dtype=torch.uint8 if q4 else torch.int8)  # a zero-row matrix's tensors: not checked
    got = many(x, counts, [lin.qs if c else unread for lin, c in zip(lins, counts, strict=True)],
               [lin.d if c else unread.float() for lin, c in zip(lins, counts, strict=True)],
               [lin.m_arg for lin in lins], n)
    start = 0
    for lin, c in zip(lins, counts, strict=True):
        assert torch.equal(got[start:start + c], lin(x[start:start + c]))
        start += c
    with pytest.raises(RuntimeError, match="add up"):
        many(x[1:], counts, [lin.qs for lin in lins], [lin.d for lin in lins], [lin.m_arg for lin in lins], n)

@pytest.mark.parametrize("n, k", [(960, 576), (3072, 576), (576, 1536)])
def test_dense_copy_rows_come_out_the_same_in_any_chunk(n, k):
    """Prompt positions on the dense copy: a row's result must not depend on how many rows its call had
    (a prompt split into chunks, or beside other prompts), or the same request samples differently alone
    and in a batch. The BLAS rounds short calls differently; BlockLinear pads them (DENSE_MIN_ROWS)."""
    g = torch.Generator().manual_seed(n)
    w = torch.randn(n, k, generator=g) * 0.05
    qs, d, m = quantize_q4(w)
    lin = BlockLinear(qs, d, m, True, None, torch.float32, dense=w)
    x = torch.randn(64, k, generator=g)
    whole = lin(x, RowKinds.from_mask([True] * 64, x.device))
    start = 0
    for size in [1, 2, 3, 5, 7, 9, 11, 13, 4, 8, 1]:
        part = lin(x[start:start + size], RowKinds.from_mask([True] * size, x.device))
        assert torch.equal(part, whole[start:start + size]), (size, start)
        start += size


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
    if q4:  # the same values with float32 scales, in the kernel's layout
        want = kernels.q4_linear(x, held.qs, *interleave_q4(qs, d, m)[1:], 45)
    else:
        want = kernels.q8_linear(x, held.qs, interleave_q8(qs, d, None)[1], torch.empty(0), 45)
    assert torch.equal(held(x), want)
    assert torch.equal(held.dequantize(), dequantize(qs, d, m, q4))
    # Scales that float16 cannot hold stay float32.
    assert BlockLinear(qs, d + 1e-6, m, q4, None, torch.float32).d.dtype == torch.float32


def test_q8_with_offsets_and_bias_and_the_dense_copy_for_prefill_rows():
    g = torch.Generator().manual_seed(1)
    qs = torch.randint(-128, 128, (40, 64), dtype=torch.int8, generator=g)
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

    def padded_dense(rows: torch.Tensor) -> torch.Tensor:  # a short call runs as DENSE_MIN_ROWS rows
        full = torch.cat([rows, rows.new_zeros(DENSE_MIN_ROWS - len(rows), rows.shape[1])])
        return torch.nn.functional.linear(full, dense)[:len(rows)] + bias

    assert torch.equal(mixed[in_rows], padded_dense(x[in_rows]))
    assert torch.equal(lin(x, RowKinds.from_mask([True] * 7, x.device)), padded_dense(x))
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
    path = cpu._build_dir("tokenmill_native")
    assert f"-{isa}-" in path.name
    assert kernels.isa() in {"avx512-vnni": ("avx512-vnni",), "avx2": ("avx2",), "x86-64": ("scalar",)}[isa]
    cpu.cpu_isa.cache_clear()
    monkeypatch.setenv("TOKENMILL_KERNEL_ISA", "x86-64")
    try:
        assert cpu.cpu_isa() == ("x86-64", ())
        assert cpu._build_dir("tokenmill_native") != path
    finally:
        cpu.cpu_isa.cache_clear()


@pytest.mark.parametrize("group", [8, 16])  # the AVX2 and the AVX-512 builds' layouts
@pytest.mark.parametrize("rows", [1, 8, 13, 17])
@pytest.mark.parametrize("blocks", [1, 3, 18])
@pytest.mark.parametrize("offsets", [False, True])
def test_interleaving_the_q8_rows_is_lossless(rows, blocks, offsets, group):
    from tokenmill.quant.block import deinterleave_q8

    g = torch.Generator().manual_seed(rows * blocks)
    qs = torch.randint(-128, 128, (rows, blocks * 32), dtype=torch.int8, generator=g)
    d, m = torch.rand(rows, blocks, generator=g), (torch.rand(rows, blocks, generator=g) if offsets else None)
    iq, idd, im = interleave_q8(qs, d, m, group)
    assert iq.shape == (-(-rows // group), blocks, 32 * group)
    # byte 4 G u + 4r + i of (group, block) is weight 4u + i of the group's row r
    r = rows - 1
    assert iq[r // group, blocks - 1, 4 * group * 7 + 4 * (r % group) + 3] == qs[r, (blocks - 1) * 32 + 4 * 7 + 3]
    back = deinterleave_q8(iq, idd, im, rows)
    assert torch.equal(back[0], qs) and torch.equal(back[1], d)
    assert (back[2] is None) if m is None else torch.equal(back[2], m)


@pytest.mark.parametrize("group", [8, 16])
@pytest.mark.parametrize("rows", [1, 8, 13, 17])
@pytest.mark.parametrize("blocks", [1, 3, 18])
def test_interleaving_the_q4_rows_is_lossless(rows, blocks, group):
    from tokenmill.quant.block import deinterleave_q4, interleave_q4, pack_q4

    q = torch.randint(0, 16, (rows, 32 * blocks), dtype=torch.uint8)
    packed, d, m = pack_q4(q), torch.randn(rows, blocks), torch.randn(rows, blocks)
    qs, d8, m8 = interleave_q4(packed, d, m, group)
    assert qs.shape == (-(-rows // group), blocks, 16 * group) and d8.shape == (-(-rows // group), blocks, group)
    back = deinterleave_q4(qs, d8, m8, rows)
    assert all(torch.equal(a, b) for a, b in zip(back, (packed, d, m), strict=True))
    # Lane r of group g is row G g + r: weight 8u + i of a block in the low nibble of byte 4 G u + 4r + i.
    r, u = rows - 1, blocks % 4
    byte = qs[r // group, 0, 4 * group * u + 4 * (r % group) + 1]
    assert (byte & 0x0F) == q[r, 8 * u + 1] and (byte >> 4) == q[r, 8 * u + 4 + 1]
    assert d8[r // group, blocks - 1, r % group] == d[r, blocks - 1]
