"""`tokenmill upcycle`: a dense model's MLPs turned into a mixture of experts, the router trained by distillation.

No small trained MoE ships offline, so we make one from the default model ("sparse upcycling"):
1. Every layer's MLP becomes `experts` SwiGLU experts, each a copy of it with a little Gaussian noise (relative
   to each matrix's own spread) so that they can drift apart, and a router (small random weights) picks
   `top_k` of them per token with Mixtral's rule (softmax, top k, renormalised).
2. The router (and, with --train-experts, the experts) is trained with `tokenmill distill`'s machinery: the
   dense model answers the built-in seed instructions with its top-20 logprobs, and the loss is KL(dense ||
   MoE) over those. Attention, norms and embeddings stay the dense model's, frozen.
3. Output: a Mixtral-format Hugging Face directory (transformers' MixtralForCausalLM loads it; so does
   `--model DIR`), loss.png, and upcycle.json with the loss curve and the quality report: perplexity on
   eval/data/heldout.txt and greedy agreement with the dense model, both through our engine.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tokenmill.spec.distill import (
    Student,
    distill_loss,
    make_batch,
    plot_loss,
    save_student,
    teacher_examples,
)
from tokenmill.spec.distill_config import DistillConfig
from tokenmill.training.upcycle_config import UpcycleConfig

logger = logging.getLogger(__name__)


class MoEStudent(Student):
    """Student's Llama with a Mixtral MLP in every layer, parameters named as MixtralForCausalLM's."""

    def __init__(self, hf: dict):
        super().__init__(hf)
        h, inter, e = hf["hidden_size"], hf["intermediate_size"], hf["num_local_experts"]
        self.top_k = hf["num_experts_per_tok"]
        for L in self.layers:
            del L.gate, L.up, L.down
            L.router = torch.nn.Parameter(torch.randn(e, h) * 0.02)
            L.w1 = torch.nn.Parameter(torch.empty(e, inter, h))  # gate
            L.w3 = torch.nn.Parameter(torch.empty(e, inter, h))  # up
            L.w2 = torch.nn.Parameter(torch.empty(e, h, inter))  # down

    def mlp(self, L: torch.nn.Module, hn: torch.Tensor) -> torch.Tensor:
        x = hn.reshape(-1, hn.shape[-1])
        probs = torch.softmax(F.linear(x, L.router).float(), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e in range(L.router.shape[0]):  # only the chosen experts run, as in serving
            tok, slot = (experts == e).nonzero(as_tuple=True)
            if tok.numel():
                xe = x[tok]
                y = F.linear(F.silu(F.linear(xe, L.w1[e])) * F.linear(xe, L.w3[e]), L.w2[e])
                out = out.index_add(0, tok, y * weights[tok, slot, None])
        return out.view_as(hn)

    def _mlp_params(self, L: torch.nn.Module) -> dict[str, torch.Tensor]:
        p = {"block_sparse_moe.gate.weight": L.router}
        for e in range(L.router.shape[0]):
            p |= {f"block_sparse_moe.experts.{e}.w1.weight": L.w1[e], f"block_sparse_moe.experts.{e}.w3.weight": L.w3[e],
                  f"block_sparse_moe.experts.{e}.w2.weight": L.w2[e]}
        return p


def check(cfg: UpcycleConfig) -> None:
    """The settings' own errors, before any model loads."""
    if cfg.experts < 1 or not 1 <= cfg.top_k <= cfg.experts:
        raise ValueError(f"top_k must be from 1 to the number of experts ({cfg.experts}), got {cfg.top_k}")
    if cfg.noise < 0 or cfg.steps < 0 or cfg.batch_size < 1 or cfg.seq_len < 2:
        raise ValueError("noise and steps must not be negative, batch size positive, sequence length at least 2")
    if cfg.eval_tokens is not None and cfg.eval_tokens < 2:
        raise ValueError("eval tokens must be at least 2 (perplexity needs a token to predict)")


def mixtral_config(arch, cfg: UpcycleConfig, eos_token_ids: list[int], bos: int | None) -> dict:
    if arch.architecture not in ("llama", "mistral") or arch.rope_scaling is not None or arch.attention_bias:
        raise ValueError("upcycling takes a plain Llama-architecture model (no rope scaling, no attention bias)")
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size, "intermediate_size": arch.intermediate_size,
        "num_hidden_layers": arch.num_layers, "num_attention_heads": arch.num_heads,
        "num_key_value_heads": arch.num_kv_heads, "head_dim": arch.head_dim,
        "max_position_embeddings": arch.max_position_embeddings, "rms_norm_eps": arch.rms_norm_eps,
        "rope_theta": arch.rope_theta, "tie_word_embeddings": arch.tie_word_embeddings, "hidden_act": "silu",
        "num_local_experts": cfg.experts, "num_experts_per_tok": cfg.top_k, "sliding_window": None,
        "bos_token_id": bos, "eos_token_id": eos_token_ids[0] if eos_token_ids else None, "torch_dtype": "float32",
    }


@torch.no_grad()
def init_from_dense(student: MoEStudent, dense, noise: float, gen: torch.Generator) -> None:
    """Copy the dense model (our float32 LlamaModel) into the student: attention, norms, embedding as they are;
    each expert a noisy copy of the layer's MLP."""
    if not dense.cfg.tie_word_embeddings:
        raise ValueError("upcycling takes a model with tied embeddings (as the default model)")
    student.embed.copy_(dense.embed)
    student.norm.copy_(dense.norm)
    for L, layer in zip(student.layers, dense.layers, strict=True):
        q, kv = layer.q_size, layer.kv_size
        L.q.copy_(layer.qkv.weight[:q])
        L.k.copy_(layer.qkv.weight[q:q + kv])
        L.v.copy_(layer.qkv.weight[q + kv:])
        L.o.copy_(layer.o.weight)
        L.in_norm.copy_(layer.in_norm)
        L.post_norm.copy_(layer.post_norm)
        inter = layer.gate_up.weight.shape[0] // 2
        for dst, src in ((L.w1, layer.gate_up.weight[:inter]), (L.w3, layer.gate_up.weight[inter:]),
                         (L.w2, layer.down.weight)):
            dst.copy_(src.expand_as(dst) + noise * src.std() * torch.randn(dst.shape, generator=gen))


def quality(model_dir: str, dense: str, cfg: UpcycleConfig) -> dict:
    """Perplexity of both models on the held-out text and the MoE's greedy agreement with the dense model,
    through our engine in float32."""
    from tokenmill import LLM
    from tokenmill.eval.quality import agreement, greedy, perplexity, read_text, teacher_forced_top1
    from tokenmill.spec.distill import SEED_INSTRUCTIONS

    opts = dict(dtype="float32", quantization="none", kv_cache_memory="256MiB", max_model_len=1024)
    prompts = SEED_INSTRUCTIONS[:cfg.eval_prompts]
    out = {}
    ref = LLM(dense, **opts)
    out["dense_perplexity"] = perplexity(ref, read_text(None), window=128, max_tokens=cfg.eval_tokens).perplexity
    ids, ref_out = greedy(ref, prompts, 24)
    del ref
    moe = LLM(model_dir, **opts)
    scored = perplexity(moe, read_text(None), window=128, max_tokens=cfg.eval_tokens)
    out["moe_perplexity"], out["perplexity_tokens"] = scored.perplexity, scored.tokens
    _, moe_out = greedy(moe, prompts, 24)
    out |= agreement(ref_out, moe_out, teacher_forced_top1(moe, ids, ref_out))
    out["experts_used_per_layer"] = {i: sum(1 for c in counts if c) for i, counts in
                                     moe.engine.runner.model.expert_tokens().items()}
    return out


def upcycle(cfg: UpcycleConfig) -> dict:
    from tokenmill import LLM

    check(cfg)
    torch.manual_seed(cfg.seed)
    rng, gen = random.Random(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    out = Path(cfg.out).expanduser()
    t0 = time.monotonic()
    llm = LLM(cfg.model, dtype="float32", quantization="none", kv_cache_memory="512MiB")
    arch, tokenizer = llm.replica.source.arch, llm.tokenizer
    hf = mixtral_config(arch, cfg, tokenizer.eos_token_ids, tokenizer.bos_token_id)
    data = DistillConfig(num_prompts=cfg.num_prompts, samples_per_prompt=cfg.samples_per_prompt,
                         gen_tokens=cfg.gen_tokens, seed=cfg.seed)
    examples = teacher_examples(llm, data)
    student = MoEStudent(hf)
    init_from_dense(student, llm.engine.runner.model, cfg.noise, gen)
    del llm
    # The router starts from nothing and takes a large step; the experts are trained copies, which Adam's
    # first steps (each weight moved by ~lr) would wreck at the router's rate.
    groups = [{"params": [L.router for L in student.layers], "peak": cfg.lr}]
    if cfg.train_experts:
        groups.append({"params": [p for L in student.layers for p in (L.w1, L.w2, L.w3)], "peak": cfg.expert_lr})
    for p in student.parameters():
        p.requires_grad_(False)
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    logger.info("upcycled: %d experts, top %d; training %.1fM parameters on %d teacher answers", cfg.experts,
                cfg.top_k, sum(p.numel() for g in groups for p in g["params"]) / 1e6, len(examples))
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc="upcycle", unit="step")
    for step in bar:
        for g in opt.param_groups:  # cosine decay to a tenth
            g["lr"] = g["peak"] * (0.1 + 0.45 * (1 + math.cos(math.pi * step / max(1, cfg.steps))))
        loss = distill_loss(student, *make_batch(examples, cfg.batch_size, cfg.seq_len, rng))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    save_student(student, hf, tokenizer, tokenizer.eos_token_ids, out)
    if losses:
        plot_loss(losses, out / "loss.png")
    del student
    report = quality(str(out), cfg.model, cfg)
    summary = {"config": asdict(cfg), "mixtral_config": hf, "losses": losses, "quality": report,
               "seconds": time.monotonic() - t0}
    (out / "upcycle.json").write_text(json.dumps(summary, indent=1))
    logger.info("wrote %s: perplexity %.2f (dense %.2f), greedy agreement %.2f, in %.0f s", out,
                report["moe_perplexity"], report["dense_perplexity"], report["teacher_forced_agreement"],
                summary["seconds"])
    return summary
