"""Block-quantized linears (W4A8, W8A8) over the native kernel in tokenmill/kernels/block_linear.cpp.

Weights are kept in blocks of 32 inputs of one output row, as GGUF ships them, so Q4_0/Q4_1/Q8_0 tensors
load without requantizing:
- w4a8: uint8 [N, K/2] nibbles (GGUF order: byte j = weight j low, weight j + 16 high), w = d * q + m.
  Q4_1 is (d, m) as shipped; Q4_0 is w = d * (q - 8), so m = -8 d.
- w8a8: int8 [N, K], w = d * q (+ m when a Q4 piece was widened into it: q - 8 and m + 8 d, both exact).
d and m are [N, K/32], float16 where exact (as GGUF ships them), else float32. The kernel quantizes activations to int8 per block of
32 and runs integer dot products, which is what makes one stream fast: these kernels read a quarter
(w4a8) or half (w8a8) of float32's bytes at little compute. Activation rounding makes them inexact;
`tokenmill eval` measures what that costs.

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


def pair_blocks(packed: torch.Tensor) -> torch.Tensor:
    """GGUF-order nibbles [N, K/2] -> the kernel's layout: byte j of pair (b, b + 1) = weight j of block b
    (low nibble) | weight j of block b + 1 (high nibble); an odd last block stays in GGUF order."""
    n, half = packed.shape
    nb = half * 2 // QK
    q = unpack_q4(packed).reshape(n, nb, QK)
    pairs = nb - nb % 2
    out = (q[:, 0:pairs:2] | (q[:, 1:pairs:2] << 4)).reshape(n, pairs * QK // 2)
    if nb % 2:
        out = torch.cat([out, packed[:, pairs * QK // 2:]], dim=1)
    return out.contiguous()


def unpair_blocks(paired: torch.Tensor) -> torch.Tensor:
    """The inverse of pair_blocks."""
    n, half = paired.shape
    nb = half * 2 // QK
    pairs = nb - nb % 2
    p = paired[:, : pairs * QK // 2].reshape(n, pairs // 2, QK)
    q = torch.stack([p & 0x0F, p >> 4], dim=2).reshape(n, pairs, QK)  # blocks b, b + 1 of each pair
    out = pack_q4(q.reshape(n, pairs * QK)) if pairs else paired[:, :0]
    if nb % 2:
        out = torch.cat([out, paired[:, pairs * QK // 2:]], dim=1)
    return out.contiguous()


def quantize_q4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float [N, K] -> (packed nibbles, d, m): asymmetric per block, d = (max - min) / 15, m = min."""
    n, k = w.shape
    wg = w.float().reshape(n, k // QK, QK)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    d = (hi - lo) / 15.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round((wg - lo[..., None]) * inv[..., None]).clamp_(0, 15).to(torch.uint8)
    return pack_q4(q.reshape(n, k)), d, lo


def quantize_q8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float [N, K] -> (int8 values, d): symmetric per block, d = max|w| / 127."""
    n, k = w.shape
    wg = w.float().reshape(n, k // QK, QK)
    d = wg.abs().amax(dim=-1) / 127.0
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
        # q4 values arrive in GGUF's nibble order and are held in the kernel's paired order.
        self.qs, self.q4 = (pair_blocks(qs) if q4 else qs.contiguous()), q4
        d, m = d.float(), (torch.zeros_like(d, dtype=torch.float32) if q4 and m is None else m)
        m = None if m is None else m.float()
        # Scales GGUF shipped as float16 stay float16 (exact, and a fifth fewer bytes per q4 row to read).
        if _exact_in_half(d) and (m is None or _exact_in_half(m)):
            d, m = d.half(), (None if m is None else m.half())
        self.d, self.m = d.contiguous(), (None if m is None else m.contiguous())
        self.n, self.k = d.shape[0], d.shape[1] * QK
        self.bias, self.dtype = bias, dtype
        self.dense = dense
        self._m_arg = self.m if self.m is not None else torch.empty(0)  # q8: empty means no offsets
        self._kernel = self.kernels.q4_linear if q4 else self.kernels.q8_linear

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
        return F.linear(x2.to(self.dense.dtype), self.dense).to(self.dtype)

    def _block(self, x2: torch.Tensor) -> torch.Tensor:
        y = self._kernel(x2, self.qs, self.d, self._m_arg)
        return y if self.dtype == torch.float32 else y.to(self.dtype)

    def dequantize(self) -> torch.Tensor:
        m = None if self.m is None else self.m.float()
        return dequantize(unpair_blocks(self.qs) if self.q4 else self.qs, self.d.float(), m, self.q4)

    @property
    def nbytes(self) -> int:
        """Bytes of the blocks (the dense copy, when held, is reported as dense_bytes)."""
        n = self.qs.numel() * self.qs.element_size() + self.d.numel() * self.d.element_size()
        return n + (self.m.numel() * self.m.element_size() if self.m is not None else 0)

    @property
    def dense_bytes(self) -> int:
        return 0 if self.dense is None else self.dense.numel() * self.dense.element_size()
