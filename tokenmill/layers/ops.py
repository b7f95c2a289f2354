"""The element-wise steps of a decoder layer, in two interchangeable sets.

`EagerOps` are the reference formulas in PyTorch (exact against Hugging Face in float32). `FusedOps` run
each step as one native call (tokenmill/kernels/fused.cpp): at batch 1 a layer's element-wise work is
~60 aten calls of a few microseconds each, more than its matmuls cost. They differ from the eager ones by
float rounding only, so the model uses them with the block-quantized formats, which round anyway.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.kernels.cpu import fused
from tokenmill.layers.attention import AttentionMetadata
from tokenmill.layers.rotary import RotaryEmbedding


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:  # one fused kernel; bit-identical to the formula below in float32
        return F.rms_norm(x, weight.shape, weight, eps)
    # As Hugging Face: normalise in float32, scale in the model dtype.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class EagerOps:
    name = "eager"

    def __init__(self, rope: RotaryEmbedding):
        self.rope = rope

    def norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return rms_norm(x, weight, eps)

    def add_norm(self, delta: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + delta), residual + delta)."""
        residual = residual + delta
        return rms_norm(residual, weight, eps), residual

    def rope_qkv(self, qkv: torch.Tensor, positions: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor],
                 num_heads: int, num_kv_heads: int, head_dim: int, kv_cache: tuple[torch.Tensor, ...],
                 meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """-> (q, k, v) rotated; k and v None when they are already in the cache."""
        t = qkv.shape[0]
        cos, sin = tables
        qk, v = qkv.split([(num_heads + num_kv_heads) * head_dim, num_kv_heads * head_dim], dim=-1)
        qk = self.rope.apply(qk.view(t, -1, head_dim), cos, sin)  # q and k heads rotated in one pass
        q, k = qk.split([num_heads, num_kv_heads], dim=1)
        return q, k, v.reshape(t, -1, head_dim)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class FusedOps(EagerOps):
    name = "fused"

    def __init__(self, rope: RotaryEmbedding):
        super().__init__(rope)
        self.k = fused()
        if self.k is None:
            raise RuntimeError("the native fused ops are not available")

    def norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self.k.rms_norm(x, weight, eps)

    def add_norm(self, delta, residual, weight, eps):
        return self.k.add_rms_norm_(delta, residual, weight, eps), residual

    def rope_qkv(self, qkv, positions, tables, num_heads, num_kv_heads, head_dim, kv_cache, meta):
        # K and V go straight into the cache (an int8 one quantized on write, as quantize_kv does).
        q = self.k.rope_qkv_write(qkv, positions, self.rope.cos, self.rope.sin, kv_cache[0], kv_cache[1],
                                  meta.slot_mapping, num_heads, num_kv_heads, *kv_cache[2:])
        return q, None, None

    def silu_mul(self, gate_up):
        return self.k.silu_mul(gate_up)


def pick_ops(rope: RotaryEmbedding, want_fused: bool, device: torch.device) -> EagerOps:
    if want_fused and device.type == "cpu" and fused() is not None:
        return FusedOps(rope)
    return EagerOps(rope)
