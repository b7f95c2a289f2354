"""Settings of `tokenmill upcycle` (torch-free, so the CLI can build its flags without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class UpcycleConfig:
    model: str = "default"
    out: str = "upcycled-moe"
    experts: int = 8
    top_k: int = 2
    noise: float = 0.01  # expert copies: + noise * (each matrix's std) * N(0, 1)
    train_experts: bool = False
    steps: int = 60
    batch_size: int = 4
    seq_len: int = 128
    lr: float = 1e-2  # the router's peak learning rate
    expert_lr: float = 1e-5  # the experts' (--train-experts): they start trained
    num_prompts: int | None = 24
    samples_per_prompt: int = 2
    gen_tokens: int = 96
    seed: int = 0
    eval_prompts: int = 8  # greedy agreement with the dense model on this many seed instructions
    eval_tokens: int | None = None  # held-out tokens scored for perplexity (None: the whole file)
