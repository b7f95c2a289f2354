"""Seeded synthetic workloads: token-exact prompts of chosen lengths, fixed output lengths."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class WorkItem:
    prompt_token_ids: list[int]
    output_len: int


def random_workload(num: int, input_range: tuple[int, int], output_range: tuple[int, int], vocab_lo: int,
                    vocab_hi: int, seed: int = 0) -> list[WorkItem]:
    """Distinct random prompts (no accidental prefix sharing), lengths uniform in the given ranges."""
    rng = random.Random(seed)
    items = []
    for _ in range(num):
        n_in = rng.randint(*input_range)
        items.append(WorkItem([rng.randrange(vocab_lo, vocab_hi) for _ in range(n_in)], rng.randint(*output_range)))
    return items
