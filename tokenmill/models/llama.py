"""The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM): GQA, RMSNorm, SwiGLU, tied embeddings.

Weights arrive tensor by tensor in Hugging Face naming; q/k/v and gate/up are fused into one matrix
each as they load, so a layer runs two fewer matmuls per step.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from tokenmill.errors import ModelLoadError
from tokenmill.layers.attention import AttentionMetadata, paged_attention
from tokenmill.layers.rotary import RotaryEmbedding
from tokenmill.models.arch import ModelArchConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:  # one fused kernel; bit-identical to the formula below in float32
        return F.rms_norm(x, weight.shape, weight, eps)
    # As Hugging Face: normalise in float32, scale in the model dtype.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class LlamaLayer:
    def __init__(self, cfg: ModelArchConfig, dtype: torch.dtype, device: torch.device):
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * d, cfg.num_kv_heads * d
        e = lambda *shape: torch.empty(*shape, dtype=dtype, device=device)  # noqa: E731
        self.qkv = e(self.q_size + 2 * self.kv_size, h)
        self.qkv_bias = e(self.q_size + 2 * self.kv_size) if cfg.attention_bias else None
        self.o = e(h, self.q_size)
        self.gate_up = e(2 * cfg.intermediate_size, h)
        self.down = e(h, cfg.intermediate_size)
        self.in_norm = e(h)
        self.post_norm = e(h)


class LlamaModel:
    def __init__(self, cfg: ModelArchConfig, dtype: torch.dtype, device: torch.device, max_positions: int):
        self.cfg = cfg
        self.dtype = dtype
        self.device = device
        self.layers = [LlamaLayer(cfg, dtype, device) for _ in range(cfg.num_layers)]
        self.embed = torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        self.norm = torch.empty(cfg.hidden_size, dtype=dtype, device=device)
        self.lm_head = self.embed if cfg.tie_word_embeddings else torch.empty_like(self.embed)
        self.rope = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling, device)
        self.scale = cfg.head_dim ** -0.5

    # -- loading -----------------------------------------------------------------------------
    def _slot(self, name: str) -> tuple[torch.Tensor, int, int] | None:
        """Where a Hugging Face tensor goes: (destination, first row, last row)."""
        top = {"model.embed_tokens.weight": self.embed, "model.norm.weight": self.norm}
        if name in top:
            t = top[name]
            return t, 0, t.shape[0]
        if name == "lm_head.weight":
            if self.cfg.tie_word_embeddings:
                return None  # tied: the embedding already holds it
            return self.lm_head, 0, self.lm_head.shape[0]
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if not m or int(m.group(1)) >= len(self.layers):
            return None
        layer, rest = self.layers[int(m.group(1))], m.group(2)
        q, kv, inter = layer.q_size, layer.kv_size, self.cfg.intermediate_size
        table = {
            "self_attn.q_proj.weight": (layer.qkv, 0, q),
            "self_attn.k_proj.weight": (layer.qkv, q, q + kv),
            "self_attn.v_proj.weight": (layer.qkv, q + kv, q + 2 * kv),
            "self_attn.o_proj.weight": (layer.o, 0, layer.o.shape[0]),
            "mlp.gate_proj.weight": (layer.gate_up, 0, inter),
            "mlp.up_proj.weight": (layer.gate_up, inter, 2 * inter),
            "mlp.down_proj.weight": (layer.down, 0, layer.down.shape[0]),
            "input_layernorm.weight": (layer.in_norm, 0, layer.in_norm.shape[0]),
            "post_attention_layernorm.weight": (layer.post_norm, 0, layer.post_norm.shape[0]),
        }
        if layer.qkv_bias is not None:
            table.update({
                "self_attn.q_proj.bias": (layer.qkv_bias, 0, q),
                "self_attn.k_proj.bias": (layer.qkv_bias, q, q + kv),
                "self_attn.v_proj.bias": (layer.qkv_bias, q + kv, q + 2 * kv),
            })
        return table.get(rest)

    def expected_tensors(self) -> set[str]:
        names = {"model.embed_tokens.weight", "model.norm.weight"}
        if not self.cfg.tie_word_embeddings:
            names.add("lm_head.weight")
        per = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
               "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
               "input_layernorm.weight", "post_attention_layernorm.weight"]
        if self.cfg.attention_bias:
            per += ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
        for i in range(len(self.layers)):
            names.update(f"model.layers.{i}.{p}" for p in per)
        return names

    @torch.no_grad()
    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
        missing = self.expected_tensors()
        for name, t in tensors:
            slot = self._slot(name)
            if slot is None:
                continue  # e.g. rotary inv_freq buffers some checkpoints carry
            dst, lo, hi = slot
            view = dst[lo:hi]
            if tuple(t.shape) != tuple(view.shape):
                raise ModelLoadError(source, f"tensor {name} has shape {tuple(t.shape)}, expected {tuple(view.shape)}")
            view.copy_(t)
            missing.discard(name)
        if missing:
            raise ModelLoadError(source, f"missing tensor(s): {', '.join(sorted(missing)[:5])}")

    # -- forward -----------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], logits_rows: torch.Tensor) -> torch.Tensor:
        """Flattened tokens of every scheduled sequence -> float32 logits of the rows in logits_rows."""
        cfg = self.cfg
        eps = cfg.rms_norm_eps
        t = input_ids.shape[0]
        d = cfg.head_dim
        cos, sin = self.rope.tables(positions, self.dtype)
        x = F.embedding(input_ids, self.embed)
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches, strict=True):
            h = rms_norm(x, layer.in_norm, eps)
            qkv = F.linear(h, layer.qkv, layer.qkv_bias)
            qk, v = qkv.split([layer.q_size + layer.kv_size, layer.kv_size], dim=-1)
            qk = self.rope.apply(qk.view(t, -1, d), cos, sin)  # q and k heads rotated in one pass
            q, k = qk.split([cfg.num_heads, cfg.num_kv_heads], dim=1)
            attn = paged_attention(q, k, v.reshape(t, -1, d), k_cache, v_cache, meta, self.scale)
            x = x + F.linear(attn, layer.o)
            h = rms_norm(x, layer.post_norm, eps)
            gate, up = F.linear(h, layer.gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, layer.down)
        x = rms_norm(x.index_select(0, logits_rows), self.norm, eps)
        return F.linear(x, self.lm_head).float()
