"""GGUF Q8_0 / Q4_0 / Q4_1 blocks decoded in torch, and repacked into our int4 layout.

Block layouts (ggml, 32 weights per block, little-endian):
- Q8_0: fp16 d, 32 x int8 q                 -> w = d * q
- Q4_0: fp16 d, 16 bytes of nibbles         -> w = d * (q - 8)
- Q4_1: fp16 d, fp16 m, 16 bytes of nibbles -> w = d * q + m
Nibbles: byte j holds weight j in its low nibble and weight j + 16 in its high nibble.

Our int4 layout computes w = (q - 8) * scale + zero per group, so at group 32:
Q4_0 -> scale = d, zero = 0 and Q4_1 -> scale = d, zero = m + 8 d, with the 4-bit values unchanged.
Q4_0 is exact; Q4_1 is exact up to the float32 rounding of m + 8 d (and, for bfloat16 activations, the
kernel's bfloat16 copy of scale and zero). Q8_0 has per-32 scales that no int8-per-channel or int4 layout
holds, so it is dequantized (one tensor) and requantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Q4_0, Q4_1, Q8_0 = 2, 3, 8  # gguf.GGMLQuantizationType values
REPACKABLE = {Q4_0: 18, Q4_1: 20, Q8_0: 34}  # type -> bytes per block of 32


@dataclass
class GGUFBlocks:
    """One 2-D GGUF tensor still in its blocks: raw uint8 [rows, K/32 * block bytes]."""

    qtype: int
    raw: torch.Tensor
    shape: tuple[int, int]

    def _blocks(self) -> torch.Tensor:
        rows, k = self.shape
        return self.raw.reshape(rows, k // 32, REPACKABLE[self.qtype])

    def decode(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """-> (integer values [rows, K] (int8 for Q8_0, uint8 0..15 for Q4_*), d [rows, K/32], m or None)."""
        b = self._blocks()
        rows, k = self.shape
        d = b[..., 0:2].contiguous().view(torch.float16).squeeze(-1).float()
        if self.qtype == Q8_0:
            return b[..., 2:34].contiguous().view(torch.int8).reshape(rows, k), d, None
        m = None
        if self.qtype == Q4_1:
            m = b[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float()
        nib = b[..., -16:]
        q = torch.cat([nib & 0x0F, nib >> 4], dim=-1)  # [rows, K/32, 32]: low nibbles first
        return q.reshape(rows, k), d, m

    def dequantize(self) -> torch.Tensor:
        q, d, m = self.decode()
        rows, k = self.shape
        qg = q.float().reshape(rows, k // 32, 32)
        if self.qtype == Q8_0:
            w = qg * d[..., None]
        elif self.qtype == Q4_0:
            w = (qg - 8.0) * d[..., None]
        else:
            w = qg * d[..., None] + m[..., None]
        return w.reshape(rows, k)

    def to_int4(self, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Q4_0/Q4_1 at group 32 -> (values, scales, zeros) of our int4 layout; None if not directly mappable."""
        if group != 32 or self.qtype not in (Q4_0, Q4_1):
            return None
        q, d, m = self.decode()
        zero = torch.zeros_like(d) if m is None else m + 8.0 * d
        return q, d, zero

    def permute_rows(self, perm_fn) -> GGUFBlocks:
        """Apply a row permutation (e.g. llama.cpp's q/k rope un-permutation) to whole rows of blocks."""
        return GGUFBlocks(self.qtype, perm_fn(self.raw), self.shape)


class GGUFDecoded(GGUFBlocks):
    """A 2-D GGUF tensor shipped in a type our layouts do not hold as is (Q5_0, the K-quants...), decoded to
    float32 (`raw`): still marked as quantized, so `--quantization auto` requantizes it to 8-bit blocks (at most
    6 bits of precision going into 8) instead of keeping a float matrix 4x the size."""

    def decode(self):
        raise TypeError("a decoded GGUF tensor has no blocks of ours")

    def dequantize(self) -> torch.Tensor:
        return self.raw

    def to_int4(self, group: int) -> None:
        return None

    def permute_rows(self, perm_fn) -> GGUFDecoded:
        return GGUFDecoded(self.qtype, perm_fn(self.raw), self.shape)
