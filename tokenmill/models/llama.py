"""The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM): GQA, RMSNorm, SwiGLU, tied embeddings; and the
mixture-of-experts models built on the same layer (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE: models/moe.py for the
experts, plus the q/k norms and clipping of the last two).

Weights arrive tensor by tensor in Hugging Face naming; q/k/v and gate/up are fused into one matrix
each as they load, so a layer runs two fewer matmuls per step.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tokenmill.errors import ModelLoadError, StepInterrupted
from tokenmill.layers.attention import AttentionMetadata, paged_attention
from tokenmill.layers.ops import EagerOps, FusedOps, pick_ops
from tokenmill.layers.rotary import RotaryEmbedding
from tokenmill.models.arch import ModelArchConfig
from tokenmill.models.moe import MoEBlock
from tokenmill.quant.block import BlockLinear, RowKinds
from tokenmill.quant.gguf import GGUFBlocks
from tokenmill.quant.linear import FloatLinear, Linear, LinearBuilder


class LlamaLayer:
    """One decoder layer. While loading, its linears are `LinearBuilder`s; `finish()` turns them into
    callables (float, int8 or int4) that the forward pass uses."""

    def __init__(self, cfg: ModelArchConfig, dtype: torch.dtype, device: torch.device, quant: QuantSpec, idx: int):
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * d, cfg.num_kv_heads * d
        e = lambda *shape: torch.empty(*shape, dtype=dtype, device=device)  # noqa: E731
        b = lambda n, k, what: quant.builder(n, k, dtype, device, f"layer {idx} {what}")  # noqa: E731
        self.qkv_b = b(self.q_size + 2 * self.kv_size, h, "qkv")
        self.qkv_bias = e(self.q_size + 2 * self.kv_size) if cfg.attention_bias else None
        self.o_b = b(h, self.q_size, "o")
        # q/k RMSNorm before rotary: over each head (Qwen3) or the whole projection (OLMoE)
        per_head = cfg.qk_norm == "head"
        self.q_norm = e(d if per_head else self.q_size) if cfg.qk_norm else None
        self.k_norm = e(d if per_head else self.kv_size) if cfg.qk_norm else None
        self.moe = MoEBlock(cfg, dtype, device, quant, idx) if cfg.is_moe_layer(idx) else None
        if self.moe is None:
            self.gate_up_b = b(2 * cfg.intermediate_size, h, "gate_up")
            self.down_b = b(h, cfg.intermediate_size, "down")
        self.in_norm = e(h)
        self.post_norm = e(h)
        self.qkv: Linear
        self.o: Linear
        self.gate_up: Linear | None = None  # the dense MLP (None in an MoE layer)
        self.down: Linear | None = None

    def slots(self, cfg: ModelArchConfig) -> dict[str, tuple[torch.Tensor | LinearBuilder, int, int]]:
        """Hugging Face tensor name (inside the layer) -> (destination, first row, last row)."""
        q, kv, h = self.q_size, self.kv_size, cfg.hidden_size
        table = {
            "self_attn.q_proj.weight": (self.qkv_b, 0, q),
            "self_attn.k_proj.weight": (self.qkv_b, q, q + kv),
            "self_attn.v_proj.weight": (self.qkv_b, q + kv, q + 2 * kv),
            "self_attn.o_proj.weight": (self.o_b, 0, h),
            "input_layernorm.weight": (self.in_norm, 0, h),
            "post_attention_layernorm.weight": (self.post_norm, 0, h),
        }
        if self.qkv_bias is not None:
            table |= {"self_attn.q_proj.bias": (self.qkv_bias, 0, q),
                      "self_attn.k_proj.bias": (self.qkv_bias, q, q + kv),
                      "self_attn.v_proj.bias": (self.qkv_bias, q + kv, q + 2 * kv)}
        if self.q_norm is not None:
            table |= {"self_attn.q_norm.weight": (self.q_norm, 0, self.q_norm.shape[0]),
                      "self_attn.k_norm.weight": (self.k_norm, 0, self.k_norm.shape[0])}
        if self.moe is not None:
            return table | self.moe.slots(cfg)
        inter = cfg.intermediate_size
        return table | {"mlp.gate_proj.weight": (self.gate_up_b, 0, inter),
                        "mlp.up_proj.weight": (self.gate_up_b, inter, 2 * inter),
                        "mlp.down_proj.weight": (self.down_b, 0, h)}

    def builders(self) -> list[LinearBuilder]:
        mlp = self.moe.builders() if self.moe is not None else [self.gate_up_b, self.down_b]
        return [self.qkv_b, self.o_b, *mlp]

    def linears(self) -> list[Linear]:
        mlp = self.moe.linears() if self.moe is not None else [self.gate_up, self.down]
        return [self.qkv, self.o, *mlp]

    def finish(self) -> None:
        self.qkv = self.qkv_b.finish(self.qkv_bias)
        self.o = self.o_b.finish()
        del self.qkv_b, self.o_b
        if self.moe is not None:
            self.moe.finish()
        else:
            self.gate_up, self.down = self.gate_up_b.finish(), self.down_b.finish()
            del self.gate_up_b, self.down_b

    def mlp(self, h: torch.Tensor, ops: EagerOps, rows: RowKinds | None) -> torch.Tensor:
        if self.moe is not None:
            return self.moe(h, ops.silu_mul, rows)
        return self.down(ops.silu_mul(self.gate_up(h, rows)), rows)


def linear_spec(kernels, lin: Linear, dtype_like: torch.Tensor):
    """A linear for the native decoder (its tensors shared): the block kernel's or a float matrix; None for a
    format it does not run (torch's int8 / int4)."""
    if isinstance(lin, BlockLinear):
        return kernels.block_linear_spec(lin.qs, lin.d, lin.m_arg, lin.n, lin.q4, lin.bias, dtype_like)
    if isinstance(lin, FloatLinear):
        return kernels.float_linear_spec(lin.weight, lin.bias)
    return None


@dataclass(frozen=True)
class QuantSpec:
    """How the linear layers store their weights: auto (as shipped: GGUF Q4/Q8 blocks run as w4a8/w8a8, float
    stays float), none, int8 (per channel), int4 (group-wise), w4a8 / w8a8 (blocks of 32, int8 activations)."""

    mode: str = "auto"
    group_size: int = 32
    lm_head: str = "auto"  # auto: as shipped under auto, int8 / w8a8 when quantizing, else none
    act_dtype: torch.dtype | None = None  # what torch's int8/int4 kernels compute in; None: the model dtype
    dense_from_rows: int | None = None  # block formats: measured dense-GEMM crossover; None keeps no dense copy

    @property
    def lm_head_mode(self) -> str:
        if self.lm_head != "auto":
            return self.lm_head
        # int4 hurts the logits most, so a quantized head is 8-bit.
        return {"auto": "auto", "none": "none", "w4a8": "w8a8", "w8a8": "w8a8"}.get(self.mode, "int8")

    def builder(self, n: int, k: int, dtype: torch.dtype, device: torch.device, name: str,
                mode: str | None = None) -> LinearBuilder:
        return LinearBuilder(n, k, mode or self.mode, self.group_size, dtype, device, name, self.act_dtype,
                             self.dense_from_rows)


class LlamaModel:
    layer_class = LlamaLayer

    def __init__(self, cfg: ModelArchConfig, dtype: torch.dtype, device: torch.device, max_positions: int,
                 quant: QuantSpec | None = None):
        self.cfg = cfg
        self.dtype = dtype
        self.device = device
        self.quant = quant = quant or QuantSpec()
        self.layers = [self.layer_class(cfg, dtype, device, quant, i) for i in range(cfg.num_layers)]
        # The paged cache's layer groups (ModelArchConfig.kv_groups): each has its own block tables, so its own
        # AttentionMetadata in a step; and each layer's sliding window (None: full attention).
        self.kv_groups = cfg.kv_groups()
        self.layer_group = [0] * cfg.num_layers
        for g, (_, members) in enumerate(self.kv_groups):
            for i in members:
                self.layer_group[i] = g
        self.windows = [cfg.layer_window(i) for i in range(cfg.num_layers)]
        self.embed = torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        self.norm = torch.empty(cfg.hidden_size, dtype=dtype, device=device)
        head_mode = quant.lm_head_mode
        # A tied float head is the embedding itself; a quantized one is its own packed copy (the
        # embedding stays float: a lookup reads one row per token, the head reads the whole matrix).
        self._head_shares_embed = cfg.tie_word_embeddings and head_mode == "none"
        self.lm_head_b: LinearBuilder | None = None
        if not self._head_shares_embed:
            self.lm_head_b = quant.builder(cfg.vocab_size, cfg.hidden_size, dtype, device, "lm_head", head_mode)
        self.lm_head: Linear
        self.repacked_pieces = 0
        self.rope = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling, device)
        self.scale = cfg.head_dim ** -0.5
        self.ops = pick_ops(self.rope, False, device)  # eager until load_weights knows the formats
        self.native = None  # the whole forward pass as one native call, where it covers the model
        self._native_caches: list | None = None  # the KV caches last handed to it

    # -- loading -----------------------------------------------------------------------------
    def _slots(self, name: str) -> list[tuple[torch.Tensor | LinearBuilder, int, int]]:
        """Where a Hugging Face tensor goes: [(destination, first row, last row)], empty if nowhere."""
        if name == "model.embed_tokens.weight":
            slots = [(self.embed, 0, self.embed.shape[0])]
            if self.cfg.tie_word_embeddings and self.lm_head_b is not None:
                slots.append((self.lm_head_b, 0, self.cfg.vocab_size))
            return slots
        if name == "model.norm.weight":
            return [(self.norm, 0, self.norm.shape[0])]
        if name == "lm_head.weight":
            if self.cfg.tie_word_embeddings:
                return []  # tied: the embedding already holds it
            return [(self.lm_head_b, 0, self.cfg.vocab_size)]
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if not m or int(m.group(1)) >= len(self.layers):
            return []
        slot = self._layer_slots[int(m.group(1))].get(m.group(2))
        return [slot] if slot is not None else []

    def expected_tensors(self) -> set[str]:
        names = {"model.embed_tokens.weight", "model.norm.weight"}
        if not self.cfg.tie_word_embeddings:
            names.add("lm_head.weight")
        for i in range(len(self.layers)):
            names.update(f"model.layers.{i}.{p}" for p in self.cfg.layer_shapes(i))
        return names

    @torch.no_grad()
    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor | GGUFBlocks]], source: str) -> None:
        """Tensors arrive one at a time (float, or GGUF blocks when quantizing); each is copied or
        quantized into place and dropped before the next arrives."""
        missing = self.expected_tensors()
        self._layer_slots = [layer.slots(self.cfg) for layer in self.layers]
        # A bar on a terminal (quantizing a large model takes a while); nothing in logs.
        for name, t in tqdm(tensors, total=len(missing), desc="loading weights", unit="tensor", disable=None,
                            leave=False):
            for dst, lo, hi in self._slots(name):
                cols = (dst.k,) if isinstance(dst, LinearBuilder) else tuple(dst.shape[1:])
                if tuple(t.shape) != (hi - lo, *cols):
                    raise ModelLoadError(source, f"tensor {name} has shape {tuple(t.shape)}, "
                                                 f"expected {(hi - lo, *cols)}")
                if isinstance(dst, LinearBuilder):
                    dst.add(lo, hi, t)
                else:
                    dst[lo:hi].copy_(t.dequantize() if isinstance(t, GGUFBlocks) else t)
                missing.discard(name)
        if missing:
            raise ModelLoadError(source, f"missing tensor(s): {', '.join(sorted(missing)[:5])}")
        self._layer_slots = []
        builders = [b for layer in self.layers for b in layer.builders()]
        builders += [self.lm_head_b] if self.lm_head_b is not None else []
        for layer in self.layers:
            layer.finish()
        tied = self.cfg.tie_word_embeddings
        if self.lm_head_b is None or (tied and self.lm_head_b.block_mode() == "none"):
            self.lm_head = FloatLinear(self.embed)  # a tied float head is the embedding itself
        else:  # a tied block head runs prompt positions on the embedding, which is its dense copy already
            self.lm_head = self.lm_head_b.finish(dense=self.embed if tied else None)
        self.repacked_pieces = sum(b.exact_pieces for b in builders)  # known once each has packed
        self.lm_head_b = None
        # Block formats round anyway: their fast path also takes the fused element-wise ops. Float weights
        # keep the eager formulas, the exact reference.
        block = any(lin.kind in ("w4a8", "w8a8") for layer in self.layers for lin in layer.linears())
        self.ops = pick_ops(self.rope, block, self.device)
        self.native = self._native_decoder()

    def _native_decoder(self):
        """decoder.cpp's forward pass over this model's tensors (shared, not copied), where it covers it: the
        fused ops (block formats on CPU), every linear on the block kernel or a float matrix. It computes
        what forward's Python loop computes, bit for bit; TOKENMILL_NATIVE_DECODER=0 keeps the loop."""
        from tokenmill.kernels.cpu import decoder

        kernels = decoder()
        if (kernels is None or os.environ.get("TOKENMILL_NATIVE_DECODER") == "0"
                or not isinstance(self.ops, FusedOps) or any(w is not None for w in self.windows)):
            return None

        spec = lambda lin: linear_spec(kernels, lin, self.embed)  # noqa: E731

        linears = [lin for layer in self.layers for lin in layer.linears()]
        if any(spec(lin) is None for lin in [*linears, self.lm_head]):
            return None
        cfg = self.cfg
        dec = kernels.Decoder(cfg.num_heads, cfg.num_kv_heads, cfg.rms_norm_eps, self.scale, self.embed, self.norm,
                              self.rope.cos, self.rope.sin, spec(self.lm_head))
        for layer in self.layers:
            moe = layer.moe
            if moe is None:
                dec.add_layer(spec(layer.qkv), spec(layer.o), spec(layer.gate_up), spec(layer.down), layer.in_norm,
                              layer.post_norm)
            else:
                shared = moe.shared_gate_up is not None
                dec.add_moe_layer(spec(layer.qkv), spec(layer.o), layer.in_norm, layer.post_norm, moe.router,
                                  [spec(lin) for lin in moe.gate_up], [spec(lin) for lin in moe.down], moe.top_k,
                                  moe.renormalize, spec(moe.shared_gate_up) if shared else None,
                                  spec(moe.shared_down) if shared else None, moe.shared_gate if shared else None)
            if layer.q_norm is not None or cfg.clip_qkv is not None:
                dec.set_qk_norm(layer.q_norm, layer.k_norm, cfg.qk_norm == "head", cfg.clip_qkv, layer.q_size,
                                layer.kv_size, cfg.head_dim)
        return dec

    def early_exit_view(self, num_layers: int, norm: torch.Tensor, lm_head: Linear) -> LlamaModel:
        """This model's first num_layers layers (their weights shared, not copied) under another final norm and
        head: a model in its own right (forward over num_layers KV caches, the native decoder where this model
        has one), which early-exit speculation drafts with."""
        if type(self) is not LlamaModel:
            raise TypeError(f"early exit runs Llama-family models, not {type(self).__name__}")
        view = copy.copy(self)
        view.layers = self.layers[:num_layers]
        view.layer_group = self.layer_group[:num_layers]
        view.windows = self.windows[:num_layers]
        view.norm, view.lm_head = norm, lm_head
        view._native_caches = None
        view.native = view._native_decoder() if self.native is not None else None
        return view

    def expert_tokens(self) -> dict[int, list[int]]:
        """Tokens each expert has run since load, by MoE layer ({} for a dense model)."""
        if self.cfg.moe is None:
            return {}
        native = self.native.expert_tokens() if self.native is not None else {}
        return {i: [a + b for a, b in zip(layer.moe.expert_tokens, native.get(i, [0] * len(layer.moe.expert_tokens)),
                                          strict=True)]
                for i, layer in enumerate(self.layers) if layer.moe is not None}

    def weight_report(self) -> dict[str, int]:
        """Bytes of linear-layer weights by format, and how many GGUF pieces were repacked as shipped."""
        linears = [lin for layer in self.layers for lin in layer.linears()]
        linears.append(self.lm_head)
        out: dict[str, int] = {"gguf_pieces_repacked_as_shipped": self.repacked_pieces}
        for lin in linears:
            out[f"{lin.kind}_bytes"] = out.get(f"{lin.kind}_bytes", 0) + lin.nbytes
            if getattr(lin, "dense_bytes", 0) and lin is not self.lm_head:  # a tied head's copy is the embedding
                out["dense_copy_bytes"] = out.get("dense_copy_bytes", 0) + lin.dense_bytes
        return out

    # -- forward -----------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata | list[AttentionMetadata], kv_caches: list[tuple[torch.Tensor, ...]],
                logits_rows: torch.Tensor, interrupt: Callable[[], bool] | None = None, rows: RowKinds | None = None,
                logits_rows_kinds: RowKinds | None = None) -> torch.Tensor:
        """Flattened tokens of every scheduled sequence -> float32 logits of the rows in logits_rows.

        meta: the step's attention metadata, one per KV group (self.kv_groups) or one for a model of one group.
        Each layer's cache is (K, V) in the model dtype, or (K, V, K scales, V scales) for an int8 cache.
        rows / logits_rows_kinds: prompt and output positions among the rows / logits_rows (block formats
        may run prompt positions on a dense copy; see BlockLinear). interrupt() is asked before each layer
        of the first half; when it says so, StepInterrupted is raised (the layers run so far wrote K/V for
        these positions, which the step that recomputes them overwrites)."""
        metas = meta if isinstance(meta, list) else [meta] * len(self.kv_groups)
        if self._native_covers(metas, rows, logits_rows_kinds):
            return self._forward_native(input_ids, positions, metas, kv_caches, logits_rows, interrupt)
        cfg = self.cfg
        eps = cfg.rms_norm_eps
        ops = self.ops
        tables = self.rope.tables(positions, self.dtype)
        residual = F.embedding(input_ids, self.embed)
        h = ops.norm(residual, self.layers[0].in_norm, eps)
        stop_checks = len(self.layers) // 2 if interrupt is not None else 0
        delta = None  # the last layer's MLP output, added to the residual by the next norm
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            if i < stop_checks and interrupt():
                raise StepInterrupted
            if delta is not None:
                h, residual = ops.add_norm(delta, residual, layer.in_norm, eps)
            qkv = layer.qkv(h, rows)
            if layer.q_norm is not None or cfg.clip_qkv is not None:
                qkv = self._norm_clip_qkv(layer, qkv)
            m = metas[self.layer_group[i]]
            q, k, v = ops.rope_qkv(qkv, positions, tables, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, kv_cache, m)
            attn = paged_attention(q, k, v, kv_cache[0], kv_cache[1], m, self.scale, *kv_cache[2:],
                                   window=self.windows[i])
            h, residual = ops.add_norm(layer.o(attn, rows), residual, layer.post_norm, eps)
            delta = layer.mlp(h, ops, rows)
        x = residual + delta
        x = ops.norm(x.index_select(0, logits_rows).contiguous(), self.norm, eps)
        return self.lm_head(x, logits_rows_kinds).float()

    def _norm_clip_qkv(self, layer: LlamaLayer, qkv: torch.Tensor) -> torch.Tensor:
        """Qwen3's per-head / OLMoE's whole-projection RMSNorm on q and k, then OLMoE's clipping of q, k, v."""
        cfg = self.cfg
        q, k, v = qkv.split([layer.q_size, layer.kv_size, layer.kv_size], dim=-1)
        if layer.q_norm is not None:
            t, d = qkv.shape[0], cfg.head_dim
            if cfg.qk_norm == "head":
                q = self.ops.norm(q.reshape(-1, d), layer.q_norm, cfg.rms_norm_eps).reshape(t, -1)
                k = self.ops.norm(k.reshape(-1, d), layer.k_norm, cfg.rms_norm_eps).reshape(t, -1)
            else:
                q = self.ops.norm(q.contiguous(), layer.q_norm, cfg.rms_norm_eps)
                k = self.ops.norm(k.contiguous(), layer.k_norm, cfg.rms_norm_eps)
        qkv = torch.cat([q, k, v], dim=-1)
        if cfg.clip_qkv is not None:
            qkv = qkv.clamp_(-cfg.clip_qkv, cfg.clip_qkv)
        return qkv

    def _native_covers(self, metas: list[AttentionMetadata], rows: RowKinds | None,
                       logits_rows_kinds: RowKinds | None) -> bool:
        """Can the native decoder run this step: every row on the paged kernel, none on a dense copy?"""
        return (self.native is not None and all(m.all_decode for m in metas)
                and (rows is None or rows.dense is None)
                and (logits_rows_kinds is None or logits_rows_kinds.dense is None))

    def _forward_native(self, input_ids: torch.Tensor, positions: torch.Tensor, metas: list[AttentionMetadata],
                        kv_caches: list[tuple[torch.Tensor, ...]], logits_rows: torch.Tensor,
                        interrupt: Callable[[], bool] | None) -> torch.Tensor:
        """forward as one native call: every row on the paged kernel (a float or int8 cache), every linear on the block
        kernel (or float); per KV group its slots, block tables and lengths."""
        if kv_caches is not self._native_caches:  # a runner's caches are made once; a draft model has its own
            self.native.set_kv_caches([list(c) for c in kv_caches])
            self._native_caches = kv_caches
        logits = self.native.forward(input_ids, positions, [m.slot_mapping for m in metas],
                                     [m.decode_block_table for m in metas], [m.decode_lens for m in metas],
                                     logits_rows, interrupt)
        if logits is None:
            raise StepInterrupted
        return logits
