"""Settings of `tokenmill distill` (torch-free, so the CLI can build its flags without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DistillConfig:
    teacher: str = "default"
    out: str = "draft-model"
    layers: int = 4
    hidden: int = 256
    heads: int | None = None  # default: hidden / 64
    kv_heads: int | None = None  # default: heads / 2 (at least 1)
    intermediate: int | None = None  # default: ~8/3 hidden, rounded up to 64
    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 2e-3
    warmup: int = 50
    num_prompts: int | None = None  # seed instructions used (default: all of them)
    samples_per_prompt: int = 4  # teacher answers per seed instruction
    gen_tokens: int = 192  # tokens per teacher answer
    temperature: float = 0.8
    seed: int = 0
    teacher_kv_cache_memory: str = "512MiB"
    teacher_dtype: str = "auto"
    exit_layer: list[int] | None = None  # train early-exit heads after these layers instead of a student
    exit_vocab: int = 8192  # rows of an exit head: the most used tokens (0: the whole vocabulary)
