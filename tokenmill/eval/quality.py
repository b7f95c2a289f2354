"""Quality checks for quantized models: perplexity over held-out text, greedy agreement with a reference.

Both run through the whole engine (`LLM`), so they measure what a user gets: quantized weights, the
int8 KV cache (prefill reads the quantized cache back), batching and all.

The default held-out text (`data/heldout.txt`, ~1,450 words of varied English prose: a travel sketch,
an explanation of bicycle balance, a recipe, short fiction, practical advice) was written for this
project in 2026, so no model could have trained on it.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

logger = logging.getLogger(__name__)

DEFAULT_TEXT = Path(__file__).with_name("data") / "heldout.txt"

# Prompts for the agreement check: varied tasks, short enough that 16 of them run in one batch.
DEFAULT_PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "Explain why the sky is blue in two sentences.",
    "def fibonacci(n):",
    "List three uses for a paperclip:",
    "Translate 'good morning' into Spanish:",
    "The main causes of the First World War were",
    "Once upon a time, in a village at the edge of a forest,",
    "To make a cup of tea, first",
    "The difference between a virus and a bacterium is",
    "Q: What is 17 times 23?\nA:",
    "import numpy as np\n# compute the mean of each row\n",
    "The best way to learn a new language is",
    "Photosynthesis is the process by which",
    "Dear hiring manager, I am writing to apply for",
    "Three facts about the planet Mars:",
]


@dataclass
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens (each window's first token has no prediction)
    windows: int
    window: int

    def as_dict(self) -> dict:
        return asdict(self)


def read_text(path: str | Path | None) -> str:
    from tokenmill.errors import TokenmillError

    p = Path(path) if path else DEFAULT_TEXT
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenmillError(f"cannot read text file {p}: {e}") from None
    if not text.strip():
        raise TokenmillError(f"text file {p} is empty")
    return text


def perplexity(llm, text: str, window: int = 512, max_tokens: int | None = None) -> Perplexity:
    """Non-overlapping windows of `window` tokens, each scored from its own start (no carried context)."""
    from tokenmill import SamplingParams
    from tokenmill.errors import TokenmillError

    if window < 2:
        raise TokenmillError("the perplexity window must be at least 2 tokens")
    ids = llm.tokenizer.encode(text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    windows = [ids[i:i + window] for i in range(0, len(ids), window)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise TokenmillError("the text is shorter than two tokens")
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    outs = llm.generate(windows, params, use_tqdm=sys.stderr.isatty())  # a bar per window, on a terminal
    nll, n = 0.0, 0
    for w, o in zip(windows, outs, strict=True):
        for tok, entry in zip(w[1:], o.prompt_logprobs[1:], strict=True):
            nll -= entry[tok].logprob
            n += 1
    return Perplexity(math.exp(nll / n), nll / n, n, len(windows), window)


def greedy(llm, prompts: list[str], max_tokens: int) -> tuple[list[list[int]], list[list[int]]]:
    """-> (prompt token ids, greedy output token ids) per prompt; eos ignored so lengths match."""
    from tokenmill import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [o.prompt_token_ids for o in outs], [list(o.outputs[0].token_ids) for o in outs]


def teacher_forced_top1(llm, prompt_ids: list[list[int]], ref_outputs: list[list[int]]) -> list[list[int]]:
    """For each position of the reference output, the model's own top-1 token given the reference prefix."""
    from tokenmill import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
    seqs = [p + r for p, r in zip(prompt_ids, ref_outputs, strict=True)]
    outs = llm.generate(seqs, params, use_tqdm=False)
    top1: list[list[int]] = []
    for p, r, o in zip(prompt_ids, ref_outputs, outs, strict=True):
        # prompt_logprobs[i] scores token i given tokens < i: positions len(p) .. len(p)+len(r)-1.
        entries = o.prompt_logprobs[len(p):len(p) + len(r)]
        top1.append([max(e.items(), key=lambda kv: kv[1].logprob)[0] for e in entries])
    return top1


def agreement(ref_outputs: list[list[int]], outputs: list[list[int]], forced_top1: list[list[int]]) -> dict:
    """free-running: share of output tokens equal to the reference's until the first divergence, and
    how many sequences match entirely; teacher-forced: share of positions whose top-1 equals the
    reference token when both see the same prefix (no cascade after one different choice)."""
    total = sum(len(r) for r in ref_outputs)
    prefix = 0
    exact = 0
    for r, o in zip(ref_outputs, outputs, strict=True):
        k = next((i for i, (a, b) in enumerate(zip(r, o, strict=False)) if a != b), min(len(r), len(o)))
        prefix += k
        exact += int(r == o)
    forced = sum(int(a == b) for r, f in zip(ref_outputs, forced_top1, strict=True) for a, b in zip(r, f, strict=True))
    return {"prompts": len(ref_outputs), "tokens": total, "free_running_prefix_agreement": prefix / total,
            "exact_sequences": exact, "teacher_forced_agreement": forced / total}


def run_agreement(ref_options: dict, test_options: dict, prompts: list[str], max_tokens: int) -> dict:
    """Load the reference, take its greedy outputs, free it; load the model under test and compare."""
    import gc

    from tokenmill import LLM

    bar = tqdm(total=3, desc="agreement", disable=None)
    ref = LLM(**ref_options)
    prompt_ids, ref_out = greedy(ref, prompts, max_tokens)
    del ref
    gc.collect()
    bar.update(1)
    llm = LLM(**test_options)
    _, out = greedy(llm, prompts, max_tokens)
    bar.update(1)
    forced = teacher_forced_top1(llm, prompt_ids, ref_out)
    bar.update(1)
    bar.close()
    return agreement(ref_out, out, forced)
