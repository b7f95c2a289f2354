"""`tokenmill distill`: train a small Llama student to imitate the teacher, for use as a draft model.

1. Data: the teacher answers built-in seed instructions through its chat template (our own engine,
   sampled, several answers per instruction) and returns its top-20 logprobs at every generated
   position. No network, no corpus download: the text is the teacher's own.
2. Student: a Llama with the teacher's vocabulary and tokenizer, `layers` x `hidden`, tied embeddings
   initialised from the teacher's embedding projected onto its top `hidden` principal directions.
3. Loss: KL(teacher || student) over the teacher's top-20 tokens at each generated position (teacher
   probabilities renormalised over those 20, which carry nearly all of its mass), AdamW, cosine decay.
4. Output: a Hugging Face directory (config.json, model.safetensors, tokenizer.json +
   tokenizer_config.json, generation_config.json) that `--speculative draft --draft-model DIR` and
   `--model DIR` load, plus loss.png, distill.json (settings, the loss curve, the compute) and
   training_compute.json: the FLOPs this run spent (tokenmill.models.flops, counted as the server's
   ledger counts inference), which `tokenmill ledger --training-compute DIR` compares with serving:
   - training the student: every step's batch_size x seq_len positions (padding included: it is computed)
     through a forward pass (2 per active weight plus causal attention) and the backward pass (twice the
     forward): 3 x forward, i.e. 6 x params x tokens with attention;
   - the teacher's data: each answer as the server would count it (its prompt's prefill and its
     generated tokens, 2 per active weight plus attention; the top-20 logprobs come from logits computed
     anyway). The answers sampled from one prompt share its first blocks through the prefix cache: the
     tokens the teacher's engine found there (teacher_prefix_cache_hit_tokens) are not counted at 2 per
     weight; their attention (under 1 % of their cost at these lengths) stays counted, since the engine
     does not say which answer each hit belonged to.

With `exit_layer` it trains exit heads for early-exit self-speculation instead (spec/early_exit.py).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tokenmill.spec.distill_config import DistillConfig

logger = logging.getLogger(__name__)

TOP_LOGPROBS = 20  # the most the engine returns per position

SEED_INSTRUCTIONS = [
    "Explain how a bicycle works.", "Write a short story about a lost key.", "What is photosynthesis?",
    "Give me three tips for learning a new language.", "Describe the water cycle.",
    "Write a Python function that reverses a string.", "Why is the sky blue?", "Summarize the plot of a fairy tale.",
    "List five fruits and their colors.", "How do I make a cup of tea?", "What causes the seasons on Earth?",
    "Write a haiku about autumn.", "Explain what a computer program is to a child.",
    "What are the benefits of regular exercise?", "Describe a busy city street.", "How does a rainbow form?",
    "Write a polite email asking for a meeting.", "What is the difference between weather and climate?",
    "Give a recipe for a simple salad.", "Explain how the internet works in simple terms.",
    "Write a limerick about a cat.", "What should I pack for a weekend trip?", "How do plants grow from seeds?",
    "Describe your ideal weekend.", "Explain what gravity is.", "Write a JavaScript function that adds two numbers.",
    "What is the capital of Japan and what is it known for?", "How can I improve my sleep?",
    "Tell me a fun fact about the ocean.", "Explain the rules of chess briefly.",
    "Write a short poem about the moon.", "How do vaccines work?", "What is a healthy breakfast?",
    "Describe how to change a flat tire.", "Why do leaves change color in the fall?",
    "Write a SQL query that selects all rows from a table named users.", "What is machine learning?",
    "Give me advice for a job interview.", "Explain the difference between a list and a tuple in Python.",
    "Describe the life cycle of a butterfly.", "What are the planets of the solar system?",
    "Write a thank-you note to a teacher.", "How do I start running as a beginner?", "What is democracy?",
    "Explain how a refrigerator keeps food cold.", "Write a dialogue between a dog and a cat.",
    "What are some ways to save money?", "How does the heart pump blood?", "Describe a thunderstorm.",
    "Write a bash command that counts the lines in a file.", "What is the history of the bicycle?",
    "Explain recursion with an example.", "How do bees make honey?", "Give me a packing list for camping.",
    "What is the Pythagorean theorem?", "Write a short motivational speech.", "How do airplanes fly?",
    "Explain what an API is.", "Describe the taste of chocolate.", "What are good habits for studying?",
    "Write a C function that computes the factorial of n.", "How is paper made?",
    "Tell me about the Great Wall of China.", "What is the difference between a virus and a bacterium?",
]


# --------------------------------------------------------------------------------------------------------
# Teacher data
# --------------------------------------------------------------------------------------------------------


@dataclass
class Example:
    token_ids: list[int]  # prompt + generated answer
    first_target: int  # positions >= first_target - 1 predict a generated token
    top_ids: list[list[int]]  # per generated token: the teacher's top-20 ids
    top_logprobs: list[list[float]]


def teacher_examples(llm, cfg: DistillConfig) -> list[Example]:
    """The teacher answers every seed instruction samples_per_prompt times, with its top-20 logprobs."""
    from tokenmill.sampling_params import SamplingParams

    questions = SEED_INSTRUCTIONS[: cfg.num_prompts] if cfg.num_prompts else SEED_INSTRUCTIONS
    convs = [[{"role": "user", "content": q}] for q in questions]
    params = [SamplingParams(n=cfg.samples_per_prompt, max_tokens=cfg.gen_tokens, temperature=cfg.temperature,
                             top_p=0.95, seed=cfg.seed * 100_003 + i, logprobs=TOP_LOGPROBS)
              for i in range(len(convs))]
    if llm.tokenizer.chat_template is not None:
        outs = llm.chat(convs, params)
    else:
        outs = llm.generate(list(questions), params)
    examples = []
    for ro in outs:
        for c in ro.outputs:
            if not c.token_ids:
                continue
            tops = [sorted(d.values(), key=lambda lp: -lp.logprob)[:TOP_LOGPROBS] for d in c.logprobs]
            examples.append(Example(list(ro.prompt_token_ids) + list(c.token_ids), len(ro.prompt_token_ids),
                                    [[lp.token_id for lp in t] for t in tops],
                                    [[lp.logprob for lp in t] for t in tops]))
    return examples


def make_batch(examples: list[Example], batch_size: int, seq_len: int, rng: random.Random):
    """A random batch of windows; each keeps its answer's start when it fits. Returns input ids [B, T],
    then flat (row, position) of every target with its teacher top ids / logprobs."""
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
    rows, pos, top_ids, top_lps = [], [], [], []
    for b in range(batch_size):
        ex = examples[rng.randrange(len(examples))]
        n = len(ex.token_ids)
        # Start so that the window holds as many generated tokens as possible.
        start = max(0, min(ex.first_target - 8, n - seq_len))
        window = ex.token_ids[start:start + seq_len]
        ids[b, :len(window)] = torch.tensor(window)
        for t in range(max(ex.first_target, start + 1), start + len(window)):
            g = t - ex.first_target  # index of the generated token at position t
            rows.append(b)
            pos.append(t - start - 1)  # the position whose output predicts token t
            top_ids.append(ex.top_ids[g])
            top_lps.append(ex.top_logprobs[g])
    k = min(len(t) for t in top_ids)
    return (ids, torch.tensor(rows), torch.tensor(pos), torch.tensor([t[:k] for t in top_ids]),
            torch.tensor([t[:k] for t in top_lps]))


# --------------------------------------------------------------------------------------------------------
# Student
# --------------------------------------------------------------------------------------------------------


def student_hf_config(cfg: DistillConfig, teacher_arch, eos_token_ids: list[int], bos: int | None) -> dict:
    heads = cfg.heads or max(1, cfg.hidden // 64)
    kv_heads = cfg.kv_heads or max(1, heads // 2)
    inter = cfg.intermediate or 64 * math.ceil(cfg.hidden * 8 / 3 / 64)
    if cfg.hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden {cfg.hidden} must divide into {heads} heads, and heads into {kv_heads} kv heads")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": teacher_arch.vocab_size,
        "hidden_size": cfg.hidden, "intermediate_size": inter, "num_hidden_layers": cfg.layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": cfg.hidden // heads,
        "max_position_embeddings": teacher_arch.max_position_embeddings, "rms_norm_eps": 1e-5,
        "rope_theta": teacher_arch.rope_theta, "tie_word_embeddings": True, "hidden_act": "silu",
        "attention_bias": False, "bos_token_id": bos, "eos_token_id": eos_token_ids[0] if eos_token_ids else None,
        "torch_dtype": "float32",
    }


class Student(torch.nn.Module):
    """A plain Llama for training, parameters named as transformers' LlamaForCausalLM (tied head)."""

    def __init__(self, hf: dict):
        super().__init__()
        h, inter = hf["hidden_size"], hf["intermediate_size"]
        self.heads, self.kv_heads, self.head_dim = hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]
        self.eps = hf["rms_norm_eps"]
        self.embed = torch.nn.Parameter(torch.randn(hf["vocab_size"], h) * 0.02)
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim

        def lin(o: int, i: int) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.randn(o, i) * (0.02 if o != h else 0.02 / math.sqrt(2 * hf["num_hidden_layers"])))

        self.layers = torch.nn.ModuleList()
        for _ in range(hf["num_hidden_layers"]):
            layer = torch.nn.Module()
            layer.q, layer.k, layer.v, layer.o = lin(q, h), lin(kv, h), lin(kv, h), lin(h, q)
            layer.gate, layer.up, layer.down = lin(inter, h), lin(inter, h), lin(h, inter)
            layer.in_norm, layer.post_norm = torch.nn.Parameter(torch.ones(h)), torch.nn.Parameter(torch.ones(h))
            self.layers.append(layer)
        self.norm = torch.nn.Parameter(torch.ones(h))
        inv = 1.0 / (hf["rope_theta"] ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim))
        self.register_buffer("inv_freq", inv.float(), persistent=False)

    def hidden_states(self, ids: torch.Tensor, keep: list[int] | None = None):
        """The final normed hidden states [B, T, hidden]; with keep, {n: the residual stream after layer n}
        for each n in keep (1-based) instead."""
        b, t = ids.shape
        freqs = torch.outer(torch.arange(t, dtype=torch.float32), self.inv_freq)
        cos, sin = torch.cat([freqs.cos()] * 2, -1), torch.cat([freqs.sin()] * 2, -1)

        def rope(x: torch.Tensor) -> torch.Tensor:  # [B, H, T, D], rotate_half layout as transformers
            half = x.shape[-1] // 2
            return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

        x = F.embedding(ids, self.embed)
        kept = {}
        for n, L in enumerate(self.layers, 1):
            hn = F.rms_norm(x, L.in_norm.shape, L.in_norm, self.eps)
            q = F.linear(hn, L.q).view(b, t, self.heads, self.head_dim).transpose(1, 2)
            k = F.linear(hn, L.k).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            v = F.linear(hn, L.v).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            a = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True,
                                               enable_gqa=self.heads != self.kv_heads)
            x = x + F.linear(a.transpose(1, 2).reshape(b, t, -1), L.o)
            hn = F.rms_norm(x, L.post_norm.shape, L.post_norm, self.eps)
            x = x + self.mlp(L, hn)
            if keep is not None and n in keep:
                kept[n] = x
        if keep is not None:
            return kept
        return F.rms_norm(x, self.norm.shape, self.norm, self.eps)

    def mlp(self, L: torch.nn.Module, hn: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(F.linear(hn, L.gate)) * F.linear(hn, L.up), L.down)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.embed)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous().clone() for k, v in self._hf_params().items()}

    @torch.no_grad()
    def load_hf_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        for name, p in self._hf_params().items():
            p.copy_(sd[name])

    def _hf_params(self) -> dict[str, torch.Tensor]:
        sd = {"model.embed_tokens.weight": self.embed, "model.norm.weight": self.norm}
        names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"}
        for i, L in enumerate(self.layers):
            for ours, hf in names.items():
                sd[f"model.layers.{i}.{hf}.weight"] = getattr(L, ours)
            sd[f"model.layers.{i}.input_layernorm.weight"] = L.in_norm
            sd[f"model.layers.{i}.post_attention_layernorm.weight"] = L.post_norm
            sd |= {f"model.layers.{i}.{name}": t for name, t in self._mlp_params(L).items()}
        return sd

    def _mlp_params(self, L: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {"mlp.gate_proj.weight": L.gate, "mlp.up_proj.weight": L.up, "mlp.down_proj.weight": L.down}


@torch.no_grad()
def init_embedding_from_teacher(student: Student, teacher_embed: torch.Tensor) -> None:
    """The teacher's token embedding projected onto its top principal directions: a head start on
    which tokens are alike."""
    e = teacher_embed.float()
    h = student.embed.shape[1]
    c = e - e.mean(0)
    _, vecs = torch.linalg.eigh(c.T @ c)  # principal directions, ascending variance: cheaper than an SVD of e
    proj = e @ vecs[:, -h:].flip(-1)
    # Mean row norm 1: with a normalised final hidden state (norm ~sqrt(hidden)) the tied head starts with
    # logits of a few units, neither flat nor saturated.
    student.embed.copy_(proj / proj.norm(dim=1).mean())


def distill_loss(student: Student, ids, rows, pos, top_ids, top_lps) -> torch.Tensor:
    """KL(teacher || student) over the teacher's top tokens at every target position (mean per position)."""
    hidden = student.hidden_states(ids)[rows, pos]  # only the positions that predict a generated token
    logq = torch.log_softmax(student.logits(hidden), dim=-1).gather(1, top_ids)
    logp = torch.log_softmax(top_lps, dim=-1)  # renormalised over the top tokens
    return (logp.exp() * (logp - logq)).sum(-1).mean()


# --------------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------------


def save_student(student: Student, hf: dict, tokenizer, eos_token_ids: list[int], out: Path) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_token_ids}, indent=2))
    save_file(student.hf_state_dict(), str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(out)


def plot_loss(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(losses) + 1), losses, lw=0.8, alpha=0.5, label="step")
    w = max(1, len(losses) // 50)
    if len(losses) >= w > 1:
        smooth = [sum(losses[i - w:i]) / w for i in range(w, len(losses) + 1)]
        ax.plot(range(w, len(losses) + 1), smooth, lw=1.5, label=f"mean of {w}")
    ax.set_xlabel("step")
    ax.set_ylabel("KL(teacher || student), nats")
    ax.set_yscale("log")
    ax.set_title("distillation loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compute_count(cfg: DistillConfig, student_hf: dict, teacher_arch, examples: list[Example],
                  teacher_cache_hits: int = 0) -> dict:
    """The FLOPs a run spends: training the student and generating the teacher's data (see the module's
    docstring), the parts, the total and what they were counted from."""
    from tokenmill.models.arch import ModelArchConfig
    from tokenmill.models.flops import FlopModel

    h = student_hf
    student = FlopModel.of(ModelArchConfig(
        "llama", h["vocab_size"], h["hidden_size"], h["intermediate_size"], h["num_hidden_layers"],
        h["num_attention_heads"], h["num_key_value_heads"], h["head_dim"]))
    teacher = FlopModel.of(teacher_arch)
    sequences = cfg.steps * cfg.batch_size
    train = student.training_sequences(sequences, cfg.seq_len)
    answers = [(e.first_target, len(e.top_ids)) for e in examples]
    gen = sum(teacher.request(p, o) for p, o in answers) - 2.0 * teacher.active_params * teacher_cache_hits
    return {
        "total_flops": train + gen,
        "student_training_flops": train,
        "teacher_generation_flops": gen,
        "student": {"active_params": student.active_params,
                    "attention_flops_per_position": student.attention_per_position,
                    "steps": cfg.steps, "batch_size": cfg.batch_size, "seq_len": cfg.seq_len,
                    "tokens_trained": sequences * cfg.seq_len},
        "teacher": {"active_params": teacher.active_params,
                    "attention_flops_per_position": teacher.attention_per_position,
                    "answers": len(answers), "prompt_tokens": sum(p for p, _ in answers),
                    "generated_tokens": sum(o for _, o in answers),
                    "answer_lengths": [[p, o] for p, o in answers],
                    "teacher_prefix_cache_hit_tokens": teacher_cache_hits},
        "counted_as": "training: 3 x (2 x active params x tokens + causal attention), every step's batch_size x "
                      "seq_len positions; teacher: each answer's prefill and decode as the server's ledger "
                      "counts a request (2 x active params per token + attention), less 2 x active params per "
                      "prompt token the prefix cache spared",
    }


def distill(cfg: DistillConfig, teacher_options: dict | None = None) -> dict:
    """Generate teacher data, train the student, write the HF directory. Returns the summary it saves."""
    from tokenmill import LLM

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    out = Path(cfg.out).expanduser()
    t0 = time.monotonic()
    llm = LLM(cfg.teacher, kv_cache_memory=cfg.teacher_kv_cache_memory, dtype=cfg.teacher_dtype,
              **(teacher_options or {}))
    teacher_arch = llm.replica.source.arch
    tokenizer = llm.tokenizer
    hits_before = llm.engine.stats().prefix_cache_hits
    if cfg.exit_layer:
        from tokenmill.spec.early_exit import check_exit_layers

        check_exit_layers(cfg.exit_layer, teacher_arch, cfg.teacher)
    examples = teacher_examples(llm, cfg)
    teacher_cache_hits = llm.engine.stats().prefix_cache_hits - hits_before
    if cfg.exit_layer:  # an exit head for early-exit self-speculation instead of a student
        from tokenmill.spec.early_exit import train_exit_heads

        return train_exit_heads(cfg, llm, examples, t0)
    teacher_embed = llm.engine.runner.model.embed.detach().float().clone()
    del llm  # free the teacher before training
    n_targets = sum(len(e.top_ids) for e in examples)
    logger.info("teacher data: %d answers, %d target tokens in %.0f s", len(examples), n_targets,
                time.monotonic() - t0)

    hf = student_hf_config(cfg, teacher_arch, tokenizer.eos_token_ids, tokenizer.bos_token_id)
    student = Student(hf)
    init_embedding_from_teacher(student, teacher_embed)
    n_params = sum(p.numel() for p in student.parameters())
    logger.info("student: %d layers, hidden %d, %.1fM parameters", cfg.layers, cfg.hidden, n_params / 1e6)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.01)

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc="distill", unit="step")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = distill_loss(student, *make_batch(examples, cfg.batch_size, cfg.seq_len, rng))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()

    save_student(student, hf, tokenizer, tokenizer.eos_token_ids, out)
    plot_loss(losses, out / "loss.png")
    compute = compute_count(cfg, hf, teacher_arch, examples, teacher_cache_hits)
    (out / "training_compute.json").write_text(json.dumps(compute, indent=1))
    summary = {"config": asdict(cfg), "student": hf, "parameters": n_params, "teacher_answers": len(examples),
               "teacher_target_tokens": n_targets, "compute": compute, "losses": losses,
               "seconds": time.monotonic() - t0}
    (out / "distill.json").write_text(json.dumps(summary, indent=1))
    logger.info("wrote %s (loss %.3f -> %.3f) in %.0f s; compute %.4g FLOPs (training %.4g, teacher data %.4g)",
                out, losses[0], losses[-1], summary["seconds"], compute["total_flops"],
                compute["student_training_flops"], compute["teacher_generation_flops"])
    return summary
