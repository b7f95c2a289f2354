"""Gemma 3 (text): the Llama layer's parts arranged Gemma's way.

What differs from models/llama.py: embeddings scaled by sqrt(hidden); RMSNorm weights stored as w and applied as
(1 + w), in float32; a norm before and after both attention and the MLP (the residual adds the normed output);
per-head q/k norms; a GELU-tanh gated MLP; attention scaled by query_pre_attn_scalar; and two kinds of layer,
five sliding-window layers (local rope base) to each global one (the model's rope base). The sliding layers'
KV lives in their own groups of the paged cache, which free blocks that fall out of the window
(ModelArchConfig.kv_groups, engine/kv_cache_manager.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tokenmill.errors import StepInterrupted
from tokenmill.layers.attention import AttentionMetadata, paged_attention
from tokenmill.layers.ops import FusedOps, pick_ops
from tokenmill.layers.rotary import RotaryEmbedding
from tokenmill.models.arch import ModelArchConfig
from tokenmill.models.llama import LlamaLayer, LlamaModel, QuantSpec, linear_spec
from tokenmill.quant.block import RowKinds
from tokenmill.quant.linear import LinearBuilder


def gemma_norm(x: torch.Tensor, one_plus_w: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm as Hugging Face computes it: normalise and scale in float32, then back to x's dtype."""
    return F.rms_norm(x.float(), one_plus_w.shape, one_plus_w, eps).to(x.dtype)


class Gemma3Layer(LlamaLayer):
    def __init__(self, cfg: ModelArchConfig, dtype: torch.dtype, device: torch.device, quant: QuantSpec, idx: int):
        super().__init__(cfg, dtype, device, quant, idx)
        h = cfg.hidden_size
        self.pre_mlp_norm = torch.empty(h, dtype=dtype, device=device)
        self.post_mlp_norm = torch.empty(h, dtype=dtype, device=device)
        self.window = cfg.layer_window(idx)
        # (1 + w) in float32 for each norm, made once the weights are in (finish)
        self.norms: dict[str, torch.Tensor] = {}

    def slots(self, cfg: ModelArchConfig) -> dict[str, tuple[torch.Tensor | LinearBuilder, int, int]]:
        h = cfg.hidden_size
        return super().slots(cfg) | {"pre_feedforward_layernorm.weight": (self.pre_mlp_norm, 0, h),
                                     "post_feedforward_layernorm.weight": (self.post_mlp_norm, 0, h)}

    def finish(self) -> None:
        super().finish()
        self.norms = {name: 1.0 + w.float() for name, w in (
            ("in", self.in_norm), ("post_attn", self.post_norm), ("pre_mlp", self.pre_mlp_norm),
            ("post_mlp", self.post_mlp_norm), ("q", self.q_norm), ("k", self.k_norm))}


class Gemma3Model(LlamaModel):
    layer_class = Gemma3Layer

    def __init__(self, cfg: ModelArchConfig, dtype: torch.dtype, device: torch.device, max_positions: int,
                 quant: QuantSpec | None = None):
        super().__init__(cfg, dtype, device, max_positions, quant)
        self.rope_local = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_local_theta or cfg.rope_theta, None,
                                          device)
        self.scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
        # HF keeps sqrt(hidden) as a float32 tensor and multiplies in the weights' dtype
        self.embed_scale = torch.tensor(cfg.hidden_size ** 0.5, dtype=torch.float32).to(dtype)
        self.act = (lambda g: F.gelu(g, approximate="tanh")) if cfg.hidden_act == "gelu_pytorch_tanh" else F.silu
        self.final_norm: torch.Tensor | None = None
        self.ops_local = self.ops  # the sliding layers' rotary (set with self.ops once the formats are known)
        self.norm_fn: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] = gemma_norm

    def load_weights(self, tensors, source: str) -> None:
        super().load_weights(tensors, source)
        self.final_norm = 1.0 + self.norm.float()
        # Block formats round anyway: rotary + KV write as one native call then (a set of ops per rope base);
        # float weights keep the eager formulas, the exact reference.
        block = any(lin.kind in ("w4a8", "w8a8") for layer in self.layers for lin in layer.linears())
        self.ops = pick_ops(self.rope, block, self.device)
        self.ops_local = pick_ops(self.rope_local, block, self.device)
        if isinstance(self.ops, FusedOps):  # the norms as one native call each too, (1 + w) in the model dtype
            kernels = self.ops.k
            self.norm_fn = lambda x, w, eps: kernels.rms_norm(x.contiguous(), w, eps)  # noqa: E731
            for layer in self.layers:
                layer.norms = {name: w.to(self.dtype) for name, w in layer.norms.items()}
            self.final_norm = self.final_norm.to(self.dtype)
        self.native = self._native_decoder()

    def _native_decoder(self):
        """decoder.cpp's Gemma loop, where it covers the model: the fused ops (block formats on CPU), every
        linear on the block kernel or a float matrix. It computes what forward's loop computes, bit for bit."""
        from tokenmill.kernels.cpu import decoder

        kernels = decoder()
        if (kernels is None or os.environ.get("TOKENMILL_NATIVE_DECODER") == "0" or self.final_norm is None
                or not isinstance(self.ops, FusedOps)):
            return None  # (LlamaModel.load_weights asks before the Gemma norms and ops are set: not yet)
        spec = lambda lin: linear_spec(kernels, lin, self.embed)  # noqa: E731
        if any(spec(lin) is None for lin in [*(lin for layer in self.layers for lin in layer.linears()), self.lm_head]):
            return None
        cfg = self.cfg
        dec = kernels.Decoder(cfg.num_heads, cfg.num_kv_heads, cfg.rms_norm_eps, self.scale, self.embed,
                              self.final_norm, self.rope.cos, self.rope.sin, spec(self.lm_head))
        dec.set_gemma(self.embed_scale, self.rope_local.cos, self.rope_local.sin, cfg.head_dim)
        for i, layer in enumerate(self.layers):
            n = layer.norms
            dec.add_gemma_layer(*(spec(lin) for lin in layer.linears()), n["in"], n["post_attn"], n["pre_mlp"],
                                n["post_mlp"], n["q"], n["k"], layer.window or 0, self.layer_group[i])
        return dec

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata | list[AttentionMetadata], kv_caches: list[tuple[torch.Tensor, ...]],
                logits_rows: torch.Tensor, interrupt: Callable[[], bool] | None = None, rows: RowKinds | None = None,
                logits_rows_kinds: RowKinds | None = None) -> torch.Tensor:
        """As LlamaModel.forward; `meta` is one AttentionMetadata per KV group (one for all layers when a list
        is not given)."""
        cfg = self.cfg
        eps, d = cfg.rms_norm_eps, cfg.head_dim
        metas = meta if isinstance(meta, list) else [meta] * len(self.kv_groups)
        if self._native_covers(metas, rows, logits_rows_kinds):
            return self._forward_native(input_ids, positions, metas, kv_caches, logits_rows, interrupt)
        norm = self.norm_fn
        global_tables = self.rope.tables(positions, self.dtype)
        local_tables = self.rope_local.tables(positions, self.dtype)
        residual = F.embedding(input_ids, self.embed) * self.embed_scale
        t = residual.shape[0]
        stop_checks = len(self.layers) // 2 if interrupt is not None else 0
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            if i < stop_checks and interrupt():
                raise StepInterrupted
            n = layer.norms
            qkv = layer.qkv(norm(residual, n["in"], eps), rows)
            q, k, v = qkv.split([layer.q_size, layer.kv_size, layer.kv_size], dim=-1)
            q = norm(q.reshape(-1, d), n["q"], eps).reshape(t, -1)
            k = norm(k.reshape(-1, d), n["k"], eps).reshape(t, -1)
            ops, tables = (self.ops_local, local_tables) if layer.window is not None else (self.ops, global_tables)
            q, k, v = ops.rope_qkv(torch.cat([q, k, v], dim=-1), positions, tables, cfg.num_heads, cfg.num_kv_heads,
                                   d, kv_cache, metas[self.layer_group[i]])
            attn = paged_attention(q, k, v, kv_cache[0], kv_cache[1], metas[self.layer_group[i]], self.scale,
                                   *kv_cache[2:], window=layer.window)
            residual = residual + norm(layer.o(attn, rows), n["post_attn"], eps)
            gate, up = layer.gate_up(norm(residual, n["pre_mlp"], eps), rows).chunk(2, dim=-1)
            residual = residual + norm(layer.down(self.act(gate) * up, rows), n["post_mlp"], eps)
        x = norm(residual.index_select(0, logits_rows).contiguous(), self.final_norm, eps)
        return self.lm_head(x, logits_rows_kinds).float()
