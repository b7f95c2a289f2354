"""Linear layers over float, int8 and int4 weights, and the builders that quantize them while loading.

- int8: symmetric, one scale per output channel: w[n, k] ~= q[n, k] * s[n], q in [-127, 127] (on CUDA
  the same aten op is called; NOT tested here, these machines have no GPU).
  Runs through `torch.ops.aten._weight_int8pack_mm` (activations float32 or bfloat16, scales in the
  activation dtype). From INT8_DEQUANT_ROWS rows up (prefill chunks) it dequantizes the matrix and runs
  the dense GEMM instead, which beats the weight-only kernel there.
- int4: asymmetric, one (scale, zero) pair per group of `group` input columns of each output channel:
  w[n, k] ~= (q[n, k] - 8) * scale[k // g, n] + zero[k // g, n], q in [0, 15]. That is the layout of
  aten's int4pack kernels (`scales_and_zeros` [K/g, N, 2]); GGUF Q4_0/Q4_1 blocks of 32 map onto it
  exactly (see tokenmill/quant/gguf.py). On CPU: `_convert_weight_to_int4pack_for_cpu` +
  `_weight_int4pack_mm_for_cpu` (float32 or bfloat16 activations). On CUDA: `_convert_weight_to_int4pack`
  + `_weight_int4pack_mm`, bfloat16 activations only -- written to the documented contract but NOT tested
  here (these machines have no GPU).

Activation dtype: both CPU kernels accept float32 and bfloat16, but with float32 activations they were an
order of magnitude slower than with bfloat16 beyond a single row (torch 2.13 on these Xeons; a quick check
on a busy machine, not a benchmark). So a float32 model computes its quantized linears in bfloat16 unless
told otherwise (`--quant-compute-dtype float32`); inputs and outputs stay float32.

A `LinearBuilder` receives a fused matrix's row ranges one source tensor at a time (q, k, v into qkv;
gate, up into gate_up) and quantizes each piece as it arrives, so no float copy of a quantized matrix
is ever held; `finish()` packs the whole matrix once.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from tokenmill.quant.block import BLOCK_MODES, BlockLinear, is_exact, piece_to_blocks
from tokenmill.quant.block import dequantize as block_dequantize
from tokenmill.quant.gguf import Q4_0, Q4_1, GGUFBlocks

logger = logging.getLogger(__name__)

QUANT_MODES = ("auto", "none", "int8", "int4", *BLOCK_MODES)
INT4_GROUP_SIZES = (32, 64, 128)
INT8_DEQUANT_ROWS = 128  # at and above this many rows an int8 linear dequantizes and runs a dense GEMM
_INNER_K_TILES = 8  # int4pack tiling along K (CUDA needs K % (16 * tiles) == 0; the CPU packer ignores it)


# --------------------------------------------------------------------------------------------------------
# Quantizers (pure functions; tests check their bounds)
# --------------------------------------------------------------------------------------------------------


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (int8 [N, K], float32 scales [N]); |w - q*s| <= s/2 per element."""
    w = w.float()
    s = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / s[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, s


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] float -> (uint8 values 0..15 [N, K], float32 scales [N, K/g], float32 zeros [N, K/g]).

    scale = (max - min) / 15 over the group, so |w - deq| <= scale/2 per element (plus float rounding).
    """
    n, k = w.shape
    wg = w.float().reshape(n, k // group, group)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-12)
    q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8)
    return q.reshape(n, k), scale, lo + 8.0 * scale


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    n, k = q.shape
    qg = q.float().reshape(n, k // group, group)
    return ((qg - 8.0) * scale[..., None] + zero[..., None]).reshape(n, k)


def pick_group(k: int, group: int) -> int | None:
    """The asked group if it divides K, else the largest supported one that does, else None."""
    for g in [group] + [g for g in sorted(INT4_GROUP_SIZES, reverse=True) if g < group]:
        if k % g == 0:
            return g
    return None


# --------------------------------------------------------------------------------------------------------
# Linear layers
# --------------------------------------------------------------------------------------------------------


class FloatLinear:
    kind = "none"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias = weight, bias

    def __call__(self, x: torch.Tensor, rows=None) -> torch.Tensor:  # noqa: ARG002  (see BlockLinear)
        return F.linear(x, self.weight, self.bias)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


class Int8Linear:
    kind = "int8"

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                 act_dtype: torch.dtype | None = None):
        """dtype: the model's (inputs and outputs); act_dtype: what the kernel computes in (default dtype)."""
        self.q = q.contiguous()
        self.act_dtype = act_dtype or dtype
        self.scales = scales.to(self.act_dtype)  # the kernel wants scales in the activation dtype
        self.bias = bias
        self.dtype = dtype

    def __call__(self, x: torch.Tensor, rows=None) -> torch.Tensor:  # noqa: ARG002  (see BlockLinear)
        x2 = x.reshape(-1, x.shape[-1]).to(self.act_dtype).contiguous()
        if x2.shape[0] >= INT8_DEQUANT_ROWS:
            # Prefill-sized: dequantizing the matrix once and running the dense GEMM is cheaper than the
            # weight-only kernel, whose cost grows with the rows (DESIGN.md: 3.6x bf16's at 256 rows).
            y = F.linear(x2, self.q.to(self.act_dtype) * self.scales[:, None]).to(self.dtype)
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.q, self.scales).to(self.dtype)
        y = y.view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scales.numel() * self.scales.element_size()


class Int4Linear:
    kind = "int4"

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int,
                 bias: torch.Tensor | None, dtype: torch.dtype, act_dtype: torch.dtype | None = None):
        """q uint8 values 0..15 [N, K]; scales, zeros [N, K/g]. act_dtype: what the kernel computes in."""
        self.n, self.k = q.shape
        self.group = group
        self.bias = bias
        self.dtype = dtype
        self.cuda = q.device.type == "cuda"
        # CUDA's kernel runs bfloat16 only; the CPU one float32 or bfloat16.
        self.act_dtype = torch.bfloat16 if self.cuda else (act_dtype or dtype)
        sz = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()  # [K/g, N, 2]
        self.scales_and_zeros = sz.to(self.act_dtype)
        if self.cuda:  # UNTESTED: the CUDA packer takes two values per byte, high nibble first
            packed = (q[:, ::2] << 4 | q[:, 1::2]).contiguous()
            self.packed = torch.ops.aten._convert_weight_to_int4pack(packed, _INNER_K_TILES)
        else:
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), _INNER_K_TILES)

    def __call__(self, x: torch.Tensor, rows=None) -> torch.Tensor:  # noqa: ARG002  (see BlockLinear)
        x2 = x.reshape(-1, self.k).to(self.act_dtype).contiguous()
        if self.cuda:  # UNTESTED here
            y = torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.group, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group, self.scales_and_zeros)
        y = y.to(self.dtype).view(*x.shape[:-1], self.n)
        return y if self.bias is None else y + self.bias

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + \
            self.scales_and_zeros.numel() * self.scales_and_zeros.element_size()


Linear = FloatLinear | Int8Linear | Int4Linear | BlockLinear


# --------------------------------------------------------------------------------------------------------
# Builder: quantize while loading
# --------------------------------------------------------------------------------------------------------


class LinearBuilder:
    """Collects the rows of one (possibly fused) [N, K] weight piece by piece, quantizing each piece."""

    def __init__(self, n: int, k: int, mode: str, group: int, dtype: torch.dtype, device: torch.device,
                 name: str = "", act_dtype: torch.dtype | None = None, dense_from_rows: int | None = None):
        """mode auto / w4a8 / w8a8 collect the pieces as they come (GGUF blocks stay compact) and pack at
        finish(); dense_from_rows: the measured batch size from which a dense GEMM beats the block kernel
        (tokenmill/quant/tuning.py), None if never: the block formats keep a dense copy only when it wins."""
        if mode not in QUANT_MODES:
            raise ValueError(f"unknown quantization {mode!r}")
        self.n, self.k, self.dtype, self.device, self.name = n, k, dtype, device, name
        self.act_dtype = act_dtype
        self.dense_from_rows = dense_from_rows
        self.mode = mode
        self.group = group
        self.exact_pieces = 0  # pieces repacked from GGUF blocks without requantizing (reported in tests/logs)
        if mode in ("auto", *BLOCK_MODES):
            self.pieces: list[tuple[int, int, torch.Tensor | GGUFBlocks]] = []
            return
        if mode == "int4":
            g = pick_group(k, group)
            if g is None:
                logger.warning("%s: %d input columns fit no int4 group; kept in %s", name, k, dtype)
                self.mode = "none"
            elif g != group:
                logger.warning("%s: %d input columns are not a multiple of group %d; using group %d",
                               name, k, group, g)
            self.group = g or group
        if self.mode == "none":
            self.weight = torch.empty(n, k, dtype=dtype, device=device)
        elif self.mode == "int8":
            self.q = torch.empty(n, k, dtype=torch.int8, device=device)
            self.scales = torch.empty(n, dtype=torch.float32, device=device)
        else:
            self.q = torch.empty(n, k, dtype=torch.uint8, device=device)
            self.scales = torch.empty(n, k // self.group, dtype=torch.float32, device=device)
            self.zeros = torch.empty_like(self.scales)

    def add(self, lo: int, hi: int, w: torch.Tensor | GGUFBlocks) -> None:
        """Rows [lo, hi) of the matrix: a float tensor or GGUF blocks."""
        if self.mode in ("auto", *BLOCK_MODES):
            self.pieces.append((lo, hi, w))
            return
        if self.mode == "none":
            self.weight[lo:hi].copy_(w.dequantize() if isinstance(w, GGUFBlocks) else w)
            return
        if self.mode == "int4" and isinstance(w, GGUFBlocks):
            direct = w.to_int4(self.group)
            if direct is not None:  # Q4_0 / Q4_1 at group 32: the shipped values, as they are
                q, scale, zero = direct
                self.q[lo:hi].copy_(q)
                self.scales[lo:hi].copy_(scale)
                self.zeros[lo:hi].copy_(zero)
                self.exact_pieces += 1
                return
        wf = (w.dequantize() if isinstance(w, GGUFBlocks) else w).to(self.device)
        if self.mode == "int8":
            q, s = quantize_int8(wf)
            self.q[lo:hi].copy_(q)
            self.scales[lo:hi].copy_(s)
        else:
            q, scale, zero = quantize_int4(wf, self.group)
            self.q[lo:hi].copy_(q)
            self.scales[lo:hi].copy_(scale)
            self.zeros[lo:hi].copy_(zero)

    def block_mode(self) -> str:
        """What an auto builder packs into: the format its pieces were shipped in, when a native kernel
        runs it (Q4_0/Q4_1 -> w4a8, with Q8_0 or another GGUF quantization among them -> w8a8), else the
        model's float dtype."""
        if self.mode != "auto":
            if self.k % 32:
                logger.warning("%s: %d input columns are not a multiple of 32; kept in %s", self.name, self.k,
                               self.dtype)
                return "none"
            return self.mode
        types = {p.qtype if isinstance(p, GGUFBlocks) else None for _, _, p in self.pieces}
        if None in types or not types or self.device.type != "cpu" or self.k % 32:
            return "none"
        from tokenmill.kernels.cpu import block_linear

        if block_linear() is None:
            return "none"
        return "w4a8" if types <= {Q4_0, Q4_1} else "w8a8"

    def _finish_collected(self, bias: torch.Tensor | None, dense: torch.Tensor | None) -> Linear:
        mode = self.block_mode()
        pieces, self.pieces = sorted(self.pieces, key=lambda p: p[0]), []
        if mode == "none":
            weight = torch.empty(self.n, self.k, dtype=self.dtype, device=self.device)
            for lo, hi, w in pieces:
                weight[lo:hi].copy_(w.dequantize() if isinstance(w, GGUFBlocks) else w)
            return FloatLinear(weight, bias)
        q4 = mode == "w4a8"
        parts = [piece_to_blocks(w, q4) for _, _, w in pieces]
        self.exact_pieces = sum(is_exact(w, q4) for _, _, w in pieces)
        qs = torch.cat([q for q, _, _ in parts])
        d = torch.cat([s for _, s, _ in parts])
        m = None
        if any(off is not None for _, _, off in parts):
            m = torch.cat([off if off is not None else torch.zeros_like(s) for _, s, off in parts])
        del parts, pieces
        if self.dense_from_rows is not None and dense is None:
            dense = block_dequantize(qs, d, m, q4).to(self.dtype)
        return BlockLinear(qs, d, m, q4, bias, self.dtype, dense if self.dense_from_rows is not None else None)

    def finish(self, bias: torch.Tensor | None = None, dense: torch.Tensor | None = None) -> Linear:
        """dense: a float copy of this matrix the model already holds (a tied embedding), used as the
        block formats' dense copy instead of dequantizing one."""
        if self.mode in ("auto", *BLOCK_MODES):
            return self._finish_collected(bias, dense)
        if self.mode == "none":
            return FloatLinear(self.weight, bias)
        if self.mode == "int8":
            return Int8Linear(self.q, self.scales, bias, self.dtype, self.act_dtype)
        return Int4Linear(self.q, self.scales, self.zeros, self.group, bias, self.dtype, self.act_dtype)
