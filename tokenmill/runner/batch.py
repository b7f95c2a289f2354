"""What the engine hands the runner each step, and what comes back. Plain data: no torch here,
so the engine core stays importable (and testable) without it."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.sampling_params import SamplingParams

# (logprob of the chosen token, top-N token ids, their logprobs)
Logprobs = tuple[float, list[int], list[float]]


@dataclass
class SeqInput:
    request_id: str
    token_ids: list[int]  # the tokens to compute this step
    start_pos: int  # position of token_ids[0] (= tokens already in the KV cache)
    # One block table per KV group, each covering start_pos + len(token_ids); a sliding-window group's
    # table has 0 (the null block) for blocks wholly before its window.
    block_ids: list[list[int]]
    params: SamplingParams
    # Set when this chunk reaches the last known token, so the step samples the next one.
    sample: bool = False
    prompt_token_ids: list[int] = field(default_factory=list)  # for penalties
    output_token_ids: list[int] = field(default_factory=list)
    # When prompt logprobs are asked for: the token each position of this chunk predicts (None past the prompt).
    prompt_next_ids: list[int] | None = None
    # The last num_spec of token_ids are speculative proposals: the runner verifies them (logits at
    # every position from the last real token on) instead of sampling one token.
    num_spec: int = 0


@dataclass
class ProposeInput:
    """A decoding request asking for up to max_tokens speculative proposals. The lists are the
    request's own (not copies): read them, never change them."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    max_tokens: int

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)


@dataclass
class RunnerOutput:
    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, Logprobs] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[Logprobs]] = field(default_factory=dict)
    # Requests whose proposals were verified: every emitted token (accepted proposals, then the
    # target's own), in order, and their logprobs when asked for. Such requests are not in `sampled`.
    spec_sampled: dict[str, list[int]] = field(default_factory=dict)
    spec_logprobs: dict[str, list[Logprobs]] = field(default_factory=dict)
