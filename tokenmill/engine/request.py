"""A request's state inside the engine: the tokens it has, how many are computed, where it stands."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from tokenmill.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again, its KV freed; it recomputes on resume
    FINISHED_STOPPED = "stop"  # eos or a stop token
    FINISHED_LENGTH = "length"  # max_tokens or the context limit
    FINISHED_ABORTED = "abort"
    FINISHED_TIMEOUT = "timeout"  # aborted because its deadline (the request's timeout) passed

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED,
                        RequestStatus.FINISHED_TIMEOUT)

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.finished else None


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_total_tokens: int  # context limit: prompt + output never exceeds it
    eos_token_ids: tuple[int, ...] = ()
    priority: int = 0  # lower is sooner, as vLLM
    arrival_time: float = field(default_factory=time.monotonic)
    # Sibling requests of one n>1 call share this salt, so they share prompt blocks even with prefix caching off.
    cache_salt: str | None = None
    tenant: str | None = None  # who is asking (API key or `user`): the fair policy shares service by it
    ttft_target: float | None = None  # seconds, arrival to first token: the deadline policy's target
    expires_at: float | None = None  # monotonic time past which the request is aborted (its timeout)

    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first schedule
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    # Chained hashes of this request's full blocks, filled lazily by the KV cache manager.
    block_hashes: list[int] = field(default_factory=list)
    # Speculative tokens proposed for the next step: computed after the last real token and verified
    # by the target in the same forward pass; never part of the output until accepted.
    spec_token_ids: list[int] = field(default_factory=list)
    # Engine timestamps (time.monotonic()); the frontend derives TTFT / ITL / queue time from them.
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens_with_spec(self) -> int:
        return self.num_tokens + len(self.spec_token_ids)

    @property
    def is_prefilling(self) -> bool:
        """More than the one token a decode computes is still to compute: a prompt, or a recompute."""
        return self.num_tokens - self.num_computed_tokens > 1

    def token_at(self, i: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < n else self.output_token_ids[i - n]

    def tokens_slice(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    def tokens_slice_with_spec(self, start: int, end: int) -> list[int]:
        """Like tokens_slice, over prompt + output + speculative tokens."""
        n = self.num_tokens
        if end <= n:
            return self.tokens_slice(start, end)
        return self.tokens_slice(min(start, n), n)[max(0, start - n):] + self.spec_token_ids[max(0, start - n):end - n]

    def check_stop(self) -> RequestStatus | None:
        """After a token was appended: has the request finished, and why?"""
        n_out = len(self.output_token_ids)
        last = self.output_token_ids[-1]
        if n_out >= self.params.min_tokens:
            if not self.params.ignore_eos and last in self.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if last in self.params.stop_token_ids:
                return RequestStatus.FINISHED_STOPPED
        if n_out >= self.params.max_tokens or self.num_tokens >= self.max_total_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None
