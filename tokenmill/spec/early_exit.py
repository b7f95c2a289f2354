"""Early-exit self-speculation (LayerSkip-style, exact): the target's first L layers plus a trained exit head
draft tokens that the full model verifies.

The exit head is a final RMSNorm and a projection onto the vocabulary, or onto a subset of it (the tokens the
teacher data uses most, then the lowest ids: BPE ids rise roughly as tokens grow rarer), since on a 135M
model the head costs as much to run as a third of the layers. `tokenmill distill --exit-layer L` trains it
on the target's hidden state after layer L (the body frozen: its features are computed once), with KL to the
full model's top-20 distribution on the teacher's own answers: a translator (hidden x hidden, from the identity,
as the tuned lens has it), then the target's final norm and LM head rows, all trained; saved folded into one
norm + matrix that proposes the same greedy tokens (drafting is greedy). It is saved as
`exit_head.safetensors` (norm, weight, token_ids) and `exit_head.json` (the exit layer, the base model's identity,
training figures).

Serving (`--speculative early-exit --exit-head PATH`): `LlamaModel.early_exit_view` makes a model of the
target's first L layers (their weights shared, not copied; on the block formats the view has its own native
decoder over the same tensors) under the exit head, stored in the target's head format; the draft proposer
(spec/draft.py) runs it with its own KV cache for those L layers.
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

from tokenmill.errors import ConfigError

logger = logging.getLogger(__name__)

HEAD_FILE = "exit_head.safetensors"
META_FILE = "exit_head.json"


# --------------------------------------------------------------------------------------------------------
# The file
# --------------------------------------------------------------------------------------------------------


def base_identity(arch, name: str) -> dict:
    """What an exit head must match in the model it serves with."""
    return {"model": name, "architecture": arch.architecture, "num_layers": arch.num_layers,
            "hidden_size": arch.hidden_size, "vocab_size": arch.vocab_size}


def save_exit_head(out: Path, norm: torch.Tensor, weight: torch.Tensor, token_ids: torch.Tensor, exit_layer: int,
                   base: dict, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({"norm": norm.detach().float().contiguous(), "weight": weight.detach().float().contiguous(),
               "token_ids": token_ids.to(torch.int64).contiguous()}, str(out / HEAD_FILE), metadata={"format": "pt"})
    (out / META_FILE).write_text(json.dumps({"exit_layer": exit_layer, "vocab_rows": int(token_ids.numel()),
                                             "base_model": base, **(extra or {})}, indent=1))


def load_exit_head(path: str | Path, arch) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(exit layer, norm [hidden], weight [rows, hidden], token ids [rows]) from a directory written by
    `tokenmill distill --exit-layer` (or its exit_head.safetensors), checked against the target's arch."""
    from safetensors.torch import load_file

    p = Path(path).expanduser()
    head_file = p / HEAD_FILE if p.is_dir() else p
    meta_file = head_file.with_name(META_FILE)
    if not head_file.is_file() or not meta_file.is_file():
        raise ConfigError(f"--exit-head {path}: expected a directory holding {HEAD_FILE} and {META_FILE} "
                          "(written by `tokenmill distill --exit-layer L`)")
    meta = json.loads(meta_file.read_text())
    base = meta.get("base_model", {})
    want = base_identity(arch, "")
    for key in ("architecture", "num_layers", "hidden_size", "vocab_size"):
        if base.get(key) != want[key]:
            raise ConfigError(f"--exit-head {path} was trained for a model with {key} = {base.get(key)!r} "
                              f"({base.get('model')}); this model has {want[key]!r}")
    layer = meta.get("exit_layer")
    if not isinstance(layer, int) or not 1 <= layer <= arch.num_layers:
        raise ConfigError(f"--exit-head {path}: exit layer {layer!r} is not in 1..{arch.num_layers}")
    t = load_file(str(head_file))
    norm, weight, ids = t.get("norm"), t.get("weight"), t.get("token_ids")
    h = arch.hidden_size
    if norm is None or weight is None or ids is None or tuple(norm.shape) != (h,) or weight.dim() != 2 \
            or weight.shape[1] != h or tuple(ids.shape) != (weight.shape[0],):
        raise ConfigError(f"--exit-head {path}: expected tensors norm [{h}], weight [rows, {h}], token_ids [rows]")
    if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= arch.vocab_size:
        raise ConfigError(f"--exit-head {path}: token ids outside the vocabulary of {arch.vocab_size}")
    return layer, norm, weight, ids.long()


# --------------------------------------------------------------------------------------------------------
# Serving
# --------------------------------------------------------------------------------------------------------


def early_exit_proposer(target, path: str, num_blocks: int, block_size: int, max_len: int):
    """The draft proposer over the target's first L layers and the exit head at `path`."""
    from tokenmill.models.llama import LlamaModel
    from tokenmill.quant.linear import LinearBuilder
    from tokenmill.spec.draft import DraftProposer

    if type(target) is not LlamaModel:
        raise ConfigError(f"--speculative early-exit runs Llama-family models, not {type(target).__name__}")
    layer, norm, weight, ids = load_exit_head(path, target.cfg)
    # The exit head in the target head's format (on the block formats the native decoder runs it); no dense copy:
    # the proposer's rows all run the block kernel.
    kind = target.lm_head.kind
    q = target.quant
    builder = LinearBuilder(weight.shape[0], weight.shape[1], kind, q.group_size, target.dtype, target.device,
                            "exit head", q.act_dtype, None)
    builder.add(0, weight.shape[0], weight.to(target.dtype))
    view = target.early_exit_view(layer, norm.to(device=target.device, dtype=target.dtype), builder.finish())
    logger.info("early exit after layer %d of %d, head of %d rows (%s); draft KV cache %d blocks", layer,
                target.cfg.num_layers, weight.shape[0], kind, num_blocks)
    full = ids.numel() == target.cfg.vocab_size and bool((ids == torch.arange(ids.numel())).all())
    return DraftProposer(view, num_blocks, block_size, max_len, None if full else ids.to(target.device))


# --------------------------------------------------------------------------------------------------------
# Training (`tokenmill distill --exit-layer L`)
# --------------------------------------------------------------------------------------------------------


def pick_vocab(examples, vocab_size: int, rows: int) -> torch.Tensor:
    """The head's token ids: those the teacher data holds (its text and its top-20 lists), most frequent first,
    then the lowest ids; `rows` of them (0: the whole vocabulary), sorted."""
    if rows <= 0 or rows >= vocab_size:
        return torch.arange(vocab_size)
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for ex in examples:
        counts.index_add_(0, torch.tensor(ex.token_ids), torch.ones(len(ex.token_ids), dtype=torch.float64))
        counts.index_add_(0, torch.tensor(ex.top_ids).flatten(), torch.full((sum(map(len, ex.top_ids)),), 0.1,
                                                                            dtype=torch.float64))
    # Seen tokens by count, then unseen ones by id (a tiny decreasing bonus orders the ties by id).
    score = counts + (vocab_size - torch.arange(vocab_size, dtype=torch.float64)) / (vocab_size * 1e3)
    return score.topk(rows).indices.sort().values


def check_exit_layers(layers: list[int], arch, name: str) -> None:
    """Refuse a teacher or layer --exit-layer cannot train on (before any teacher data is generated)."""
    if arch.is_gemma or arch.moe is not None or arch.attention_bias or arch.qk_norm or arch.clip_qkv is not None \
            or arch.rope_scaling is not None or arch.sliding_window is not None:
        raise ConfigError("--exit-layer trains on dense Llama-family teachers without rope scaling, biases, "
                          f"q/k norms or sliding windows; {name} is {arch.architecture}")
    bad = [n for n in layers if not 1 <= n <= arch.num_layers]
    if bad:
        raise ConfigError(f"--exit-layer {bad[0]}: the teacher has layers 1..{arch.num_layers}")


def _teacher_layers(source, num_layers: int):
    """A trainable-model copy (distill.Student) of the teacher's first num_layers layers in float32, and its final
    norm and LM head."""
    from tokenmill.spec.distill import Student

    arch = source.arch
    hf = {"vocab_size": arch.vocab_size, "hidden_size": arch.hidden_size, "intermediate_size": arch.intermediate_size,
          "num_hidden_layers": num_layers, "num_attention_heads": arch.num_heads,
          "num_key_value_heads": arch.num_kv_heads, "head_dim": arch.head_dim, "rms_norm_eps": arch.rms_norm_eps,
          "rope_theta": arch.rope_theta}
    body = Student(hf)
    params = body._hf_params()
    norm = head = None
    with torch.no_grad():
        for name, t in source.iter_tensors():
            t = t.float()
            if name in params:
                params[name].copy_(t)
            if name == "model.norm.weight":
                norm = t.clone()
            if name == "lm_head.weight" or (name == "model.embed_tokens.weight" and arch.tie_word_embeddings):
                head = t.clone()
    body.requires_grad_(False)
    return body, norm, head


@torch.no_grad()
def _features(body, examples, layers: list[int]) -> dict[int, torch.Tensor]:
    """Each layer's output (the residual stream, before any norm) at every position that predicts a generated
    token, all examples concatenated in order."""
    per_layer: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for ex in examples:
        states = body.hidden_states(torch.tensor([ex.token_ids]), keep=layers)
        for layer in layers:
            per_layer[layer].append(states[layer][0, ex.first_target - 1: len(ex.token_ids) - 1])
    return {layer: torch.cat(xs) for layer, xs in per_layer.items()}


class _ExitHead(torch.nn.Module):
    """What trains: a translator (hidden x hidden, from the identity: the tuned lens's map from layer L's
    residual stream into the last layer's), the final norm and the head's rows (from the target's own)."""

    def __init__(self, norm: torch.Tensor, weight: torch.Tensor, eps: float):
        super().__init__()
        self.translate = torch.nn.Parameter(torch.eye(norm.shape[0]))
        self.norm = torch.nn.Parameter(norm.clone())
        self.weight = torch.nn.Parameter(weight.clone())
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.rms_norm(F.linear(x, self.translate), self.norm.shape, self.norm, self.eps), self.weight)

    @torch.no_grad()
    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm, weight) of a plain norm + head with the same greedy token at every position: W diag(w) A h / rms(A h)
        and W diag(w) A h / rms(h) differ by a positive factor per row, which moves no argmax."""
        return torch.ones_like(self.norm), (self.weight * self.norm) @ self.translate


def _head_loss(head: _ExitHead, x, cols, mask, top_lps) -> torch.Tensor:
    """KL(teacher || head) over the teacher's top tokens the head holds (teacher renormalised over them)."""
    logq = torch.log_softmax(head(x), -1).gather(1, cols)
    logp = torch.log_softmax(top_lps.masked_fill(~mask, -math.inf), -1)
    p = logp.exp()
    return (p * (logp - logq)).masked_fill(~mask, 0.0).sum(-1).mean()


@torch.no_grad()
def _agreement(norm, weight, eps, x, token_ids, teacher_top1) -> float:
    """Share of positions where a plain norm + head's greedy token is the teacher's (what a first proposal's
    acceptance would be under greedy decoding)."""
    hits = 0
    for i in range(0, x.shape[0], 2048):
        logits = F.linear(F.rms_norm(x[i:i + 2048], norm.shape, norm, eps), weight)
        hits += int((token_ids[logits.argmax(-1)] == teacher_top1[i:i + 2048]).sum())
    return hits / max(1, x.shape[0])


def train_exit_heads(cfg, llm, examples, t0: float) -> dict:
    """Train one exit head per layer in cfg.exit_layer on the teacher's examples; write each (OUT, or
    OUT/layer-L for several layers). Returns the summary (per layer) it saves."""
    from tokenmill.spec.distill import plot_loss

    source = llm.replica.source
    arch = source.arch
    layers = sorted(set(cfg.exit_layer))
    check_exit_layers(layers, arch, source.path.name)
    base = base_identity(arch, cfg.teacher)
    body, final_norm, head = _teacher_layers(source, max(layers))
    token_ids = pick_vocab(examples, arch.vocab_size, cfg.exit_vocab)
    col_of = torch.full((arch.vocab_size,), -1, dtype=torch.long)
    col_of[token_ids] = torch.arange(token_ids.numel())
    feats = _features(body, examples, layers)
    del body
    k = min(len(t) for ex in examples for t in ex.top_ids)
    top_ids = torch.tensor([t[:k] for ex in examples for t in ex.top_ids])
    top_lps = torch.tensor([t[:k] for ex in examples for t in ex.top_logprobs])
    mask = col_of[top_ids] >= 0
    cols = col_of[top_ids].clamp(min=0)  # (masked out where the head lacks the token)
    n = top_ids.shape[0]
    rng = random.Random(cfg.seed)
    order = list(range(n))
    rng.shuffle(order)
    held = torch.tensor(sorted(order[: max(1, n // 10)]))  # a tenth held out for the agreement figures
    train = torch.tensor(sorted(order[max(1, n // 10):]))
    batch = cfg.batch_size * cfg.seq_len
    eps = arch.rms_norm_eps
    logger.info("exit heads after layer(s) %s: %d positions (%d held out), %d head rows, %d positions a step",
                layers, n, held.numel(), token_ids.numel(), batch)
    summary: dict = {"config": asdict(cfg), "positions": n, "held_out": held.numel(), "vocab_rows": token_ids.numel(),
                     "heads": {}}
    for layer in layers:
        torch.manual_seed(cfg.seed)
        x = feats[layer]
        module = _ExitHead(final_norm, head[token_ids], eps)
        before = _agreement(final_norm, head[token_ids], eps, x[held], token_ids, top_ids[held, 0])
        # The head's rows start from the target's and move a tenth as fast as the translator and norm.
        opt = torch.optim.AdamW([{"params": [module.translate, module.norm]},
                                 {"params": [module.weight], "lr_scale": 0.1}], lr=cfg.lr, betas=(0.9, 0.95),
                                weight_decay=0.0)
        losses: list[float] = []
        for step in range(cfg.steps):
            frac = step / max(1, cfg.steps)
            lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup)) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
            for g in opt.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            pick = train[torch.randint(train.numel(), (min(batch, train.numel()),))]
            loss = _head_loss(module, x[pick], cols[pick], mask[pick], top_lps[pick])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        norm, weight = module.folded()
        after = _agreement(norm, weight, eps, x[held], token_ids, top_ids[held, 0])
        out = Path(cfg.out).expanduser() / (f"layer-{layer}" if len(layers) > 1 else "")
        figures = {"held_out_agreement_before": before, "held_out_agreement_after": after, "losses": losses}
        save_exit_head(out, norm, weight, token_ids, layer, base, figures)
        if losses:
            plot_loss(losses, out / "loss.png")
        logger.info("exit head after layer %d: KL %.3f -> %.3f, held-out greedy agreement %.3f -> %.3f; wrote %s",
                    layer, losses[0] if losses else math.nan, losses[-1] if losses else math.nan, before, after, out)
        summary["heads"][layer] = {"out": str(out), **figures}
    summary["seconds"] = time.monotonic() - t0
    (Path(cfg.out).expanduser() / "distill.json").write_text(json.dumps(summary, indent=1))
    return summary
