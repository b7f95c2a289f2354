"""Compute per token, from a model's shape: what the server's usage ledger counts and what the lifetime
ledger compares with training compute. Pure arithmetic on tokenmill.models.arch.ModelArchConfig.

A token through the model costs 2 FLOPs per active weight it meets (a multiply and an add): every linear
layer and the LM head (the embedding lookup is a read, not a product). Attention adds, per layer, 2 FLOPs
per query-key product and 2 per weighted value: 4 x heads x head_dim per earlier position attended. A
prompt token found in the prefix cache costs nothing: it is not computed again.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FlopModel:
    active_params: int  # weights each token meets (linear layers + LM head)
    attention_per_position: int  # FLOPs per token per earlier position attended, all layers
    window: int | None = None  # sliding-window attention: positions attended are capped

    @classmethod
    def of(cls, arch) -> FlopModel:
        d, q, kv = arch.hidden_size, arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
        per_layer = d * (q + 2 * kv) + q * d + 3 * d * arch.intermediate_size
        return cls(arch.num_layers * per_layer + arch.vocab_size * d,
                   4 * arch.num_layers * q, arch.sliding_window)

    def _attended(self, lo: int, hi: int) -> int:
        """Positions attended, summed over query positions whose context lengths run lo .. hi (inclusive):
        each attends over its whole context, or the window if it is shorter. Closed form: no loop per token."""
        if hi < lo:
            return 0
        w = hi + 1 if self.window is None else self.window
        below = max(0, min(hi, w) - lo + 1)  # lengths under the window: lo .. min(hi, w)
        first = lo
        last = lo + below - 1
        return (first + last) * below // 2 + (hi - lo + 1 - below) * w

    def prefill(self, prompt_tokens: int, cached_tokens: int = 0) -> float:
        """FLOPs to compute prompt positions cached_tokens .. prompt_tokens - 1 (each attends over itself and
        every earlier position)."""
        n = max(0, prompt_tokens - cached_tokens)
        attended = self._attended(cached_tokens + 1, prompt_tokens)
        return 2.0 * self.active_params * n + float(self.attention_per_position) * attended

    def decode(self, prompt_tokens: int, output_tokens: int) -> float:
        """FLOPs of the generated tokens: each but the first is a forward pass over its whole context (the
        first came out of the prompt's last pass)."""
        steps = max(0, output_tokens - 1)
        attended = self._attended(prompt_tokens + 1, prompt_tokens + steps)  # contexts prompt + 1 .. + steps
        return 2.0 * self.active_params * steps + float(self.attention_per_position) * attended

    def request(self, prompt_tokens: int, output_tokens: int, cached_tokens: int = 0) -> float:
        return self.prefill(prompt_tokens, cached_tokens) + self.decode(prompt_tokens, output_tokens)

    def training(self, tokens: float) -> float:
        """The usual estimate of training compute: 6 FLOPs per parameter per token (forward and backward)."""
        return 6.0 * self.active_params * tokens

    def training_sequences(self, count: int, seq_len: int) -> float:
        """FLOPs to train on `count` sequences of `seq_len` tokens, counted as the ledger counts inference: a
        forward pass over every position (2 per active weight, plus causal attention), and twice that again for
        the backward pass (3x in all: 6 x params x tokens, attention included)."""
        return 3.0 * count * self.prefill(seq_len)
