"""A mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): route, then run each chosen expert once.

The router's softmax picks each token's top k experts. The step's (token, expert) pairs are then sorted by
expert, so every expert that some token chose runs one matmul pair over all of its tokens, and an expert no
token chose runs nothing: per-token compute follows the active parameters, not the total. Contributions are
added into each token's row expert by expert in ascending order, as Hugging Face adds them, so float32
results match its implementation. Experts are ordinary linears from the quantization builders, so every
weight format of the dense layers (float, int8, int4, w4a8, w8a8) serves experts too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from tokenmill.kernels.cpu import native
from tokenmill.models.arch import ModelArchConfig

if TYPE_CHECKING:
    from tokenmill.models.llama import QuantSpec
    from tokenmill.quant.linear import Linear, LinearBuilder


class MoEBlock:
    """One layer's experts. While loading, the linears are builders (`gate_up_b[e]`, `down_b[e]`); `finish()`
    turns them into the callables the forward pass uses."""

    def __init__(self, cfg: ModelArchConfig, dtype: torch.dtype, device: torch.device, quant: QuantSpec, idx: int):
        moe = cfg.moe
        assert moe is not None
        h, inter = cfg.hidden_size, moe.intermediate_size
        self.num_experts, self.top_k, self.renormalize = moe.num_experts, moe.top_k, moe.norm_topk_prob
        self.router = torch.empty(moe.num_experts, h, dtype=dtype, device=device)
        self.gate_up_b: list[LinearBuilder] = [quant.builder(2 * inter, h, dtype, device, f"layer {idx} expert {e} gate_up")
                                               for e in range(moe.num_experts)]
        self.down_b: list[LinearBuilder] = [quant.builder(h, inter, dtype, device, f"layer {idx} expert {e} down")
                                            for e in range(moe.num_experts)]
        self.gate_up: list[Linear] = []
        self.down: list[Linear] = []
        s = moe.shared_intermediate_size
        self.shared_gate_up_b = quant.builder(2 * s, h, dtype, device, f"layer {idx} shared gate_up") if s else None
        self.shared_down_b = quant.builder(h, s, dtype, device, f"layer {idx} shared down") if s else None
        self.shared_gate = torch.empty(1, h, dtype=dtype, device=device) if s else None
        self.shared_gate_up: Linear | None = None
        self.shared_down: Linear | None = None
        # Tokens each expert has run since load (the /metrics expert load); plain ints, no tensor op per step.
        self.expert_tokens = [0] * moe.num_experts

    def slots(self, cfg: ModelArchConfig) -> dict[str, tuple[torch.Tensor | LinearBuilder, int, int]]:
        """Hugging Face tensor name (inside the layer) -> (destination, first row, last row)."""
        names, inter = cfg.expert_names(), cfg.moe.intermediate_size
        table: dict[str, tuple[torch.Tensor | LinearBuilder, int, int]] = {
            names.router: (self.router, 0, self.num_experts)}
        for e in range(self.num_experts):
            p = names.expert.format(e=e)
            table[p + names.gate] = (self.gate_up_b[e], 0, inter)
            table[p + names.up] = (self.gate_up_b[e], inter, 2 * inter)
            table[p + names.down] = (self.down_b[e], 0, cfg.hidden_size)
        if self.shared_gate_up_b is not None:
            s = cfg.moe.shared_intermediate_size
            table |= {"mlp.shared_expert.gate_proj.weight": (self.shared_gate_up_b, 0, s),
                      "mlp.shared_expert.up_proj.weight": (self.shared_gate_up_b, s, 2 * s),
                      "mlp.shared_expert.down_proj.weight": (self.shared_down_b, 0, cfg.hidden_size),
                      "mlp.shared_expert_gate.weight": (self.shared_gate, 0, 1)}
        return table

    def builders(self) -> list[LinearBuilder]:
        shared = [self.shared_gate_up_b, self.shared_down_b] if self.shared_gate_up_b is not None else []
        return [*self.gate_up_b, *self.down_b, *shared]

    def finish(self) -> None:
        self.gate_up = [b.finish() for b in self.gate_up_b]
        self.down = [b.finish() for b in self.down_b]
        if self.shared_gate_up_b is not None:
            self.shared_gate_up, self.shared_down = self.shared_gate_up_b.finish(), self.shared_down_b.finish()
        del self.gate_up_b, self.down_b, self.shared_gate_up_b, self.shared_down_b

    def linears(self) -> list[Linear]:
        shared = [self.shared_gate_up, self.shared_down] if self.shared_gate_up is not None else []
        return [*self.gate_up, *self.down, *shared]

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k] in the model dtype, expert ids [T, k]): softmax in float32, top k, renormalised
        where the architecture says so. On the CPU with the native kernels built, their router does the
        softmax and top k: the one the native decoder uses, so both paths route alike to the last bit."""
        logits = F.linear(h, self.router).float()
        kernels = native() if logits.device.type == "cpu" else None
        if kernels is not None:
            weights, experts = kernels.moe_route(logits, self.top_k, self.renormalize)
            return weights.to(h.dtype), experts
        probs = torch.softmax(logits, dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(h.dtype), experts

    def __call__(self, h: torch.Tensor, silu_mul: Callable[[torch.Tensor], torch.Tensor], rows=None) -> torch.Tensor:
        """h [T, hidden] -> the MLP's output [T, hidden]; rows: prompt/output kinds, passed to each linear (an
        expert's rows are a subset of the step's, so the kinds are re-derived for the subset)."""
        weights, experts = self.route(h)
        if h.shape[0] == 1:
            return self._one_token(h, weights, experts, silu_mul, rows)
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert, tokens ascending
        counts = torch.bincount(flat, minlength=self.num_experts)
        tokens = order // self.top_k
        pair_weights = weights.reshape(-1)[order].unsqueeze(1)
        out = torch.zeros_like(h)
        start = 0
        for e, n in enumerate(counts.tolist()):  # a loop over experts, never over tokens
            if n == 0:
                continue
            self.expert_tokens[e] += n
            sel = tokens[start:start + n]
            sub = None if rows is None else rows.subset(sel)
            y = self.down[e](silu_mul(self.gate_up[e](h.index_select(0, sel), sub)), sub)
            out.index_add_(0, sel, y * pair_weights[start:start + n])
            start += n
        return self._add_shared(h, out, silu_mul, rows)

    def _one_token(self, h, weights, experts, silu_mul, rows) -> torch.Tensor:
        """A step of one token (single-stream decode): its experts in ascending order, without the sort, gather
        and scatter; the same sums as the general path (0 + a + b is a + b)."""
        out = None
        for e, w in sorted(zip(experts[0].tolist(), weights[0].tolist(), strict=True)):
            self.expert_tokens[e] += 1
            y = self.down[e](silu_mul(self.gate_up[e](h, rows)), rows) * w
            out = y if out is None else out + y
        return self._add_shared(h, out, silu_mul, rows)

    def _add_shared(self, h, out, silu_mul, rows) -> torch.Tensor:
        if self.shared_gate_up is None:
            return out
        shared = self.shared_down(silu_mul(self.shared_gate_up(h, rows)), rows)
        return out + torch.sigmoid(F.linear(h, self.shared_gate)) * shared
