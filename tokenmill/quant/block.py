"""Block-quantized linears (W4A8, W8A8) over the native kernel in tokenmill/kernels/block_linear.cpp.

Weights are kept in blocks of 32 inputs of one output row, as GGUF ships them, so Q4_0/Q4_1/Q8_0 tensors
load without requantizing:
- w4a8: 4-bit values, w = d * q + m. Q4_1 is (d, m) as shipped; Q4_0 is w = d * (q - 8), so m = -8 d.
  Held with rows interleaved in groups of 8 or 16 (interleave_q4: one row per lane of the kernel build's
  vector, group_rows()), the order the kernel reads them in.
- w8a8: int8, w = d * q (+ m when a Q4 piece was widened into it: q - 8 and m + 8 d, both exact). Held with
  rows interleaved in groups likewise (interleave_q8).
d and m are float16 where exact (as GGUF ships them), else float32. The kernel quantizes activations to
int8 per block of 32 and runs integer dot products, which is what makes one stream fast: these kernels
read a quarter (w4a8) or half (w8a8) of float32's bytes at little compute. Activation rounding makes them
inexact; `tokenmill eval` measures what that costs.

For prefill chunks a float GEMM on a dense copy in the model dtype beats an int8 dot product on CPUs
without VNNI/AMX. Whether it does on this CPU is measured at start-up (tokenmill/quant/tuning.py: the
fewest rows from which it wins); the dense copy is made only when it wins somewhere, and then prefill rows
run on it while output positions always run the block kernel (see BlockLinear.__call__ for why).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenmill.kernels.cpu import block_linear
from tokenmill.quant.gguf import Q4_0, Q4_1, Q8_0, GGUFBlocks

QK = 32
BLOCK_MODES = ("w4a8", "w8a8")


def pack_q4(q: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 [N, K] in weight order -> [N, K/2] bytes in GGUF's nibble order."""
    n, k = q.shape
    g = q.reshape(n, k // QK, QK)
    return (g[..., : QK // 2] | (g[..., QK // 2:] << 4)).reshape(n, k // 2).contiguous()


def unpack_q4(packed: torch.Tensor) -> torch.Tensor:
    n, half = packed.shape
    g = packed.reshape(n, half * 2 // QK, QK // 2)
    return torch.cat([g & 0x0F, g >> 4], dim=-1).reshape(n, half * 2)


DENSE_MIN_ROWS = 16  # the fewest rows a dense-copy GEMM is called with (BlockLinear._dense says why)


def group_rows() -> int:
    """Rows interleaved per group (q4 and q8) in the kernel build this CPU runs: one row per 32-bit lane of its
    vector, 8 with AVX2, 16 with AVX-512."""
    kernels = block_linear()
    return 8 if kernels is None else int(kernels.group_rows())


def _lanes(t: torch.Tensor, g: int, nb: int, group: int) -> torch.Tensor:
    """Per-block scales of `group` g rows [group g, nb] -> [g, nb, group]: a group's rows side by side, one per
    lane."""
    return t.reshape(g, group, nb).transpose(1, 2).contiguous()


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of _lanes, padding rows dropped."""
    g, nb, group = t.shape
    return t.transpose(1, 2).reshape(g * group, nb)[:n]


def interleave_q4(packed: torch.Tensor, d: torch.Tensor, m: torch.Tensor, group: int | None = None) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor]:
    """GGUF-order nibbles [N, K/2] and per-block d, m [N, K/32] -> the kernel's layout: rows in groups of G
    (group_rows() unless given; zero rows pad N to a multiple of G), qs [N/G, K/32, 16 G] where byte
    4 G u + 4r + i of (group, block) holds weight 8u + i of the group's row r (low nibble) and weight 8u + 4 + i
    (high nibble); d and m [N/G, K/32, G], one row per lane. Values and scales are moved, never changed."""
    gr = group or group_rows()
    n, half = packed.shape
    nb = half * 2 // QK
    pad = -n % gr
    q = unpack_q4(packed)
    if pad:
        q = torch.cat([q, q.new_zeros(pad, q.shape[1])])
        d = torch.cat([d, d.new_zeros(pad, nb)])
        m = torch.cat([m, m.new_zeros(pad, nb)])
    g = (n + pad) // gr
    q = q.reshape(g, gr, nb, 4, 2, 4)  # [group, row, block, u, low/high, i]
    byte = q[..., 0, :] | (q[..., 1, :] << 4)  # [group, row, block, u, i]
    qs = byte.permute(0, 2, 3, 1, 4).reshape(g, nb, 4 * gr * 4)
    return qs.contiguous(), _lanes(d, g, nb, gr), _lanes(m, g, nb, gr)


def deinterleave_q4(qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                         torch.Tensor]:
    """The inverse of interleave_q4, padding dropped: (GGUF-order nibbles [n, K/2], d, m [n, K/32])."""
    g, nb, _ = qs.shape
    gr = d.shape[-1]
    byte = qs.reshape(g, nb, 4, gr, 4).permute(0, 3, 1, 2, 4)  # [group, row, block, u, i]
    q = torch.stack([byte & 0x0F, byte >> 4], dim=4).reshape(g * gr, nb * QK)[:n]
    return pack_q4(q), _rows(d, n), _rows(m, n)


def interleave_q8(qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, group: int | None = None) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """int8 values [N, K] and per-block d (m or None) [N, K/32] -> the kernel's layout: rows in groups of G
    (group_rows() unless given; zero rows pad N), qs [N/G, K/32, 32 G] where byte 4 G u + 4r + i of (group,
    block) holds weight 4u + i of the group's row r; d and m [N/G, K/32, G]. Values and scales are moved, never
    changed."""
    gr = group or group_rows()
    n, k = qs.shape
    nb, pad = k // QK, -n % gr
    if pad:
        qs = torch.cat([qs, qs.new_zeros(pad, k)])
        d = torch.cat([d, d.new_zeros(pad, nb)])
        m = None if m is None else torch.cat([m, m.new_zeros(pad, nb)])
    g = (n + pad) // gr
    q = qs.reshape(g, gr, nb, 8, 4).permute(0, 2, 3, 1, 4).reshape(g, nb, gr * QK)
    return q.contiguous(), _lanes(d, g, nb, gr), (None if m is None else _lanes(m, g, nb, gr))


def deinterleave_q8(qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, n: int) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The inverse of interleave_q8, padding dropped: (int8 values [n, K], d, m or None [n, K/32])."""
    g, nb, _ = qs.shape
    gr = d.shape[-1]
    q = qs.reshape(g, nb, 8, gr, 4).permute(0, 3, 1, 2, 4).reshape(g * gr, nb * QK)[:n]
    return q, _rows(d, n), (None if m is None else _rows(m, n))


HALF_NORMAL_MIN, HALF_MAX = 2.0 ** -14, 65504.0


def _through_half(t: torch.Tensor) -> torch.Tensor:
    """t rounded to float16 (as float32) when every value is 0 or a normal float16 number, else t: scales a
    block kernel reads as float16, like GGUF's, a fifth fewer bytes a q4 row. The values are then quantized
    against the rounded scales, so the rounding moves a weight by a few parts in 10^4 of its block's step."""
    a = t.abs()
    if bool(((a == 0) | ((a >= HALF_NORMAL_MIN) & (a <= HALF_MAX))).all()):
        return t.half().float()
    return t


def quantize_q4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float [N, K] -> (packed nibbles, d, m): asymmetric per block, d = (max - min) / 15, m = min (both held
    in float16 where they fit, as GGUF's Q4_1 holds them)."""
    n, k = w.shape
    wg = w.float().reshape(n, k // QK, QK)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    lo = _through_half(lo)
    d = _through_half((hi - lo) / 15.0)
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round((wg - lo[..., None]) * inv[..., None]).clamp_(0, 15).to(torch.uint8)
    return pack_q4(q.reshape(n, k)), d, lo


def quantize_q8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float [N, K] -> (int8 values, d): symmetric per block, d = max|w| / 127 (float16 where it fits)."""
    n, k = w.shape
    wg = w.float().reshape(n, k // QK, QK)
    d = _through_half(wg.abs().amax(dim=-1) / 127.0)
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(wg * inv[..., None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(n, k), d


def dequantize(qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, q4: bool) -> torch.Tensor:
    q = unpack_q4(qs) if q4 else qs
    n, k = q.shape
    w = q.float().reshape(n, k // QK, QK) * d[..., None]
    if m is not None:
        w = w + m[..., None]
    return w.reshape(n, k)


def piece_to_blocks(piece: torch.Tensor | GGUFBlocks, q4: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One loaded piece (rows of a matrix) -> (values, d, m or None) in the w4a8 or w8a8 layout.

    GGUF Q4_0/Q4_1 go into either layout exactly and Q8_0 into w8a8 exactly; anything else is quantized."""
    if isinstance(piece, GGUFBlocks) and piece.qtype in (Q4_0, Q4_1):
        q, d, m = piece.decode()
        if q4:
            return pack_q4(q), d, (-8.0 * d if m is None else m)
        return (q.to(torch.int16) - 8).to(torch.int8), d, (None if m is None else m + 8.0 * d)
    if isinstance(piece, GGUFBlocks) and piece.qtype == Q8_0 and not q4:
        q, d, _ = piece.decode()
        return q, d, None
    w = piece.dequantize() if isinstance(piece, GGUFBlocks) else piece
    if q4:
        return quantize_q4(w)
    q, d = quantize_q8(w)
    return q, d, None


def is_exact(piece: torch.Tensor | GGUFBlocks, q4: bool) -> bool:
    """Does this piece go into the layout without requantizing?"""
    if not isinstance(piece, GGUFBlocks):
        return False
    return piece.qtype in (Q4_0, Q4_1) or (piece.qtype == Q8_0 and not q4)


@dataclass
class RowKinds:
    """A step's rows split by kind: dense (prompt positions) and block (output positions); None where a
    kind has no rows."""

    dense: torch.Tensor | None
    block: torch.Tensor | None

    @classmethod
    def from_mask(cls, is_prompt: list[bool], device: torch.device) -> RowKinds | None:
        if not any(is_prompt):
            return None
        if all(is_prompt):
            return cls(torch.arange(len(is_prompt), device=device), None)
        t = torch.tensor(is_prompt, device=device)
        return cls(t.nonzero().squeeze(1), (~t).nonzero().squeeze(1))

    def subset(self, rows: torch.Tensor) -> RowKinds | None:
        """The kinds of the rows `rows` (indices into this step's rows), in that order."""
        n = int(rows.max()) + 1 if rows.numel() else 0
        is_prompt = torch.zeros(max(n, 1), dtype=torch.bool, device=rows.device)
        if self.dense is not None:
            is_prompt[self.dense[self.dense < n]] = True
        return RowKinds.from_mask(is_prompt[rows].tolist(), rows.device)


def _exact_in_half(t: torch.Tensor) -> bool:
    return bool(torch.equal(t.half().float(), t))


class BlockLinear:
    """y = x W^T (+ bias) over w4a8 / w8a8 blocks; prefill rows on a dense copy when one is held."""

    def __init__(self, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, q4: bool,
                 bias: torch.Tensor | None, dtype: torch.dtype, dense: torch.Tensor | None = None):
        self.kernels = block_linear()
        if self.kernels is None:
            raise RuntimeError("the native block-linear kernel is not available")
        self.kind = "w4a8" if q4 else "w8a8"
        self.q4 = q4
        self.n, self.k = d.shape[0], d.shape[1] * QK
        d, m = d.float(), (torch.zeros_like(d, dtype=torch.float32) if q4 and m is None else m)
        m = None if m is None else m.float()
        # Scales GGUF shipped as float16 stay float16 (exact, and a fifth fewer bytes per q4 row to read).
        if _exact_in_half(d) and (m is None or _exact_in_half(m)):
            d, m = d.half(), (None if m is None else m.half())
        # Values arrive row by row (q4 in GGUF's nibble order) and are held in the kernel's interleaved groups.
        qs, d, m = interleave_q4(qs, d, m) if q4 else interleave_q8(qs, d, m)
        self.qs, self.d, self.m = qs.contiguous(), d.contiguous(), (None if m is None else m.contiguous())
        self.bias, self.dtype = bias, dtype
        self.dense = dense
        self.m_arg = self.m if self.m is not None else torch.empty(0)  # the kernel's m: empty means none (q8)

    def __call__(self, x: torch.Tensor, rows: RowKinds | None = None) -> torch.Tensor:
        """rows: which rows are prompt positions (run on the dense copy, when one is held) and which are
        output positions (always the block kernel). The kind follows the position, never the step: a
        prompt position is computed the same way in one chunk or several, beside other requests or not,
        and an output position the same as a decode, a speculative verification or a preemption's
        recompute; the block kernel's rows are independent of each other, bit for bit."""
        if x.dim() == 2 and (self.dense is None or rows is None or rows.dense is None):
            y = self._block(x)  # the decode path, kept short: at batch 1 each call costs microseconds
            return y if self.bias is None else y + self.bias
        x2 = x.reshape(-1, self.k)
        if self.dense is None or rows is None or rows.dense is None:
            y = self._block(x2)
        elif rows.block is None:
            y = self._dense(x2)
        else:
            y = x2.new_empty(x2.shape[0], self.n, dtype=self.dtype)
            y.index_copy_(0, rows.block, self._block(x2.index_select(0, rows.block)))
            y.index_copy_(0, rows.dense, self._dense(x2.index_select(0, rows.dense)))
        y = y.view(*x.shape[:-1], self.n)
        return y if self.bias is None else y + self.bias

    def _dense(self, x2: torch.Tensor) -> torch.Tensor:
        # A float GEMM's rounding of one row can depend on how many rows the call has: below a dozen rows
        # the BLAS takes other code paths (GEMV at one row, small-M kernels), from there on a row comes out
        # the same in any call (tests/kernels/test_block_linear.py checks it on each CPU). A short call, a
        # prompt's last few tokens, is padded with zero rows so a prompt position never depends on its chunk.
        m = x2.shape[0]
        if m < DENSE_MIN_ROWS:
            x2 = torch.cat([x2, x2.new_zeros(DENSE_MIN_ROWS - m, x2.shape[1])])
        y = F.linear(x2.to(self.dense.dtype), self.dense).to(self.dtype)
        return y if m >= DENSE_MIN_ROWS else y[:m]

    def _block(self, x2: torch.Tensor) -> torch.Tensor:
        if self.q4:
            y = self.kernels.q4_linear(x2, self.qs, self.d, self.m, self.n)
        else:
            y = self.kernels.q8_linear(x2, self.qs, self.d, self.m_arg, self.n)
        return y if self.dtype == torch.float32 else y.to(self.dtype)

    def dequantize(self) -> torch.Tensor:
        if self.q4:
            qs, d, m = deinterleave_q4(self.qs, self.d.float(), self.m.float(), self.n)
            return dequantize(qs, d, m, True)
        qs, d, m = deinterleave_q8(self.qs, self.d.float(), None if self.m is None else self.m.float(), self.n)
        return dequantize(qs, d, m, False)

    @property
    def nbytes(self) -> int:
        """Bytes of the blocks (the dense copy, when held, is reported as dense_bytes)."""
        n = self.qs.numel() * self.qs.element_size() + self.d.numel() * self.d.element_size()
        return n + (self.m.numel() * self.m.element_size() if self.m is not None else 0)

    @property
    def dense_bytes(self) -> int:
        return 0 if self.dense is None else self.dense.numel() * self.dense.element_size()
