"""int8 KV cache: one float32 scale per token per KV head, symmetric, quantized on write.

x[t, h, :] ~= q[t, h, :] * s[t, h] with s = max|x[t, h, :]| / 127, so |x - q*s| <= s/2 per element.
"""

from __future__ import annotations

import torch

KV_CACHE_DTYPES = ("auto", "int8")


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, Hkv, D] float -> (int8 [T, Hkv, D], float32 [T, Hkv])."""
    xf = x.float()
    s = (xf.abs().amax(dim=-1) / 127.0).clamp(min=1e-12)
    return torch.round(xf / s[..., None]).clamp_(-127, 127).to(torch.int8), s


def dequantize_kv(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 [..., D] and scales [...] -> dtype [..., D] (the product taken in float32)."""
    return (q.float() * s.unsqueeze(-1)).to(dtype)
