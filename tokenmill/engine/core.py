"""The engine core: a busy loop of schedule -> run the model -> update, knowing nothing of HTTP or text."""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.policy import SchedulingPolicy
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.scheduler import Scheduler
from tokenmill.errors import InvalidRequestError, StepInterrupted
from tokenmill.runner.batch import Logprobs, ProposeInput, RunnerOutput, SeqInput
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class Runner(Protocol):
    """What the engine needs of a model runner (the real one, or a fake in tests)."""

    num_blocks: int
    block_size: int
    max_model_len: int

    def execute(self, seqs: list[SeqInput], interrupt: Callable[[], bool] | None = None) -> RunnerOutput:
        """Compute one step. A runner that can stop part-way calls interrupt() at points where stopping still
        saves time, and raises StepInterrupted (having changed nothing the engine reads) when it says so."""
        ...

    def release(self, request_ids: list[str]) -> None: ...

    def propose(self, inputs: list[ProposeInput]) -> dict[str, list[int]]:
        """Speculative proposals for decoding requests (only called when speculation is on)."""
        ...


@dataclass
class RequestUpdate:
    """New tokens of one request after a step. Timestamps are time.monotonic()."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "timeout"
    new_logprobs: list[Logprobs] = field(default_factory=list)
    prompt_logprobs: list[Logprobs | None] | None = None  # first token of the prompt has none
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    prompt_tokens: int
    generation_tokens: int
    num_steps: int
    num_interrupted_steps: int = 0  # abandoned part-way for a request that outranked them (and redone)
    # Speculative decoding (vLLM's spec_decode_* counters): verified proposal runs, proposed tokens
    # verified, accepted tokens, and accepted tokens by position in the proposal.
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_pos: list[int] = field(default_factory=list)
    # Mixture-of-experts models: tokens each expert has run, by MoE layer (the expert load).
    moe_expert_tokens: dict[int, list[int]] = field(default_factory=dict)


class EngineCore:
    def __init__(self, runner: Runner, vocab_size: int, eos_token_ids: list[int], *,
                 max_num_batched_tokens: int, max_num_seqs: int, enable_prefix_caching: bool = True,
                 policy: SchedulingPolicy | None = None, clock: Callable[[], float] = time.monotonic,
                 num_speculative_tokens: int = 0, speculative_max_batch: int = 1 << 30,
                 interruptible_steps: bool = True):
        self.runner = runner
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.max_model_len = runner.max_model_len
        self.clock = clock
        # One KV group (full attention) unless the runner splits the layers (sliding-window models).
        self.kv = KVCacheManager(runner.num_blocks, runner.block_size, enable_prefix_caching,
                                 windows=getattr(runner, "kv_group_windows", (None,)))
        self.scheduler = Scheduler(self.kv, max_num_batched_tokens, max_num_seqs, policy, clock)
        self._expiry: list[tuple[float, str]] = []  # heap of (expires_at, request id)
        self._ids = itertools.count()
        self._pending_aborts: list[RequestUpdate] = []
        self._prompt_lp: dict[str, list[Logprobs | None]] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.num_steps = 0
        self.interruptible_steps = interruptible_steps
        self.num_interrupted_steps = 0
        self._redo = False  # the last step was abandoned: this one runs to the end, so nothing starves
        self.num_spec_tokens = num_speculative_tokens  # 0: no speculation
        self.spec_max_batch = speculative_max_batch
        self.spec_num_drafts = 0
        self.spec_num_draft_tokens = 0
        self.spec_num_accepted_tokens = 0
        self.spec_accepted_per_pos = [0] * num_speculative_tokens

    # -- requests in and out -----------------------------------------------------------------
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, *, request_id: str | None = None,
                    priority: int = 0, arrival_time: float | None = None, cache_salt: str | None = None,
                    tenant: str | None = None, ttft_target: float | None = None,
                    expires_at: float | None = None) -> str:
        """expires_at: clock time past which the request is aborted with finish_reason "timeout"."""
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]!r} is outside the vocabulary [0, {self.vocab_size})",
                                      param="prompt")
        if n >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {n} tokens; this model's context is {self.max_model_len} tokens "
                "and at least one must be left for the output", param="prompt")
        total = min(self.max_model_len, n + params.max_tokens)
        chunk = self.scheduler.max_num_batched_tokens
        if not self.kv.can_fit(total, chunk):
            raise InvalidRequestError(
                f"prompt + max_tokens ({total} tokens) does not fit in the KV cache "
                f"({self.kv.max_request_tokens(chunk)} tokens for one request)", param="max_tokens")
        if ttft_target is not None and not 0 < ttft_target < math.inf:
            raise InvalidRequestError(f"ttft_target must be a positive number of seconds, got {ttft_target!r}",
                                      param="ttft_target")
        req = Request(rid, list(prompt_token_ids), params, max_total_tokens=total,
                      eos_token_ids=self.eos_token_ids, priority=priority,
                      arrival_time=arrival_time if arrival_time is not None else self.clock(),
                      cache_salt=cache_salt, tenant=tenant, ttft_target=ttft_target, expires_at=expires_at)
        self.scheduler.add_request(req)
        if expires_at is not None:
            heapq.heappush(self._expiry, (expires_at, rid))
        return rid

    def abort_request(self, request_id: str, status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> bool:
        req = self.scheduler.abort_request(request_id, status)
        if req is None:
            return False
        self.runner.release([request_id])
        self._prompt_lp.pop(request_id, None)
        self._pending_aborts.append(self._update(req, []))
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending_aborts)

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(len(s.running), len(s.waiting), self.kv.usage, self.kv.prefix_cache_queries,
                           self.kv.prefix_cache_hits, s.num_preemptions, self.prompt_tokens,
                           self.generation_tokens, self.num_steps, self.num_interrupted_steps, self.spec_num_drafts,
                           self.spec_num_draft_tokens, self.spec_num_accepted_tokens,
                           list(self.spec_accepted_per_pos), self._expert_tokens())

    def _expert_tokens(self) -> dict[int, list[int]]:
        counts = getattr(self.runner, "expert_tokens", None)  # optional: a runner of a dense model has none
        return counts() if counts is not None else {}

    # -- one step ----------------------------------------------------------------------------
    def _expire(self) -> None:
        """Abort every request whose deadline has passed (finish_reason "timeout"); their blocks go back."""
        now = self.clock()
        heap = self._expiry
        while heap and heap[0][0] <= now:
            _, rid = heapq.heappop(heap)
            if self.abort_request(rid, RequestStatus.FINISHED_TIMEOUT):
                logger.info("request %s timed out; aborted", rid)

    def step(self, poll: Callable[[], bool] | None = None) -> list[RequestUpdate]:
        """Schedule and run one step. `poll`, if given, is called while the step runs (between the model's
        layers); it may add requests, and returns True when it did. If one of them is a request the policy
        ranks above one in the step and can seat at once, the step is abandoned and the next one plans
        afresh with it: it need not wait for the step in flight. A step that follows an abandoned one runs
        to the end, and the runner offers to stop only in the first half of a step, so an arrival never
        throws away more work than it is spared."""
        if self._expiry:
            self._expire()
        updates, self._pending_aborts = self._pending_aborts, []
        out = self.scheduler.schedule()
        if not out.scheduled:
            return updates
        seqs = [self._seq_input(req, n) for req, n in out.scheduled]
        interrupt = None
        if poll is not None and self.interruptible_steps and not self._redo:
            interrupt = lambda: poll() and self.scheduler.arrival_outranks(out)  # noqa: E731
        try:
            result = self.runner.execute(seqs, interrupt)
        except StepInterrupted:
            self.scheduler.unschedule(out)
            self.num_interrupted_steps += 1
            self._redo = True
            return updates
        self._redo = False
        self.num_steps += 1
        for req, _ in out.scheduled:
            lps = result.prompt_logprobs.get(req.request_id)
            if lps is not None:
                if req.num_computed_tokens == 0:  # first chunk (or a restart after preemption)
                    self._prompt_lp[req.request_id] = [None]
                self._prompt_lp[req.request_id].extend(lps)
        self._count_spec(seqs, result)
        for req, m in self.scheduler.update(out, result.sampled, result.spec_sampled):
            self.generation_tokens += m
            if len(req.output_token_ids) == m:
                self.prompt_tokens += req.num_prompt_tokens
            if req.request_id in result.spec_logprobs:
                lps = result.spec_logprobs[req.request_id][:m]
            else:
                lp = result.logprobs.get(req.request_id)
                lps = [lp] if lp else []
            updates.append(self._update(req, req.output_token_ids[-m:], lps))
            if req.status.finished:
                self.runner.release([req.request_id])
        if self.num_spec_tokens:
            self._propose()
        return updates

    # -- speculative decoding ----------------------------------------------------------------
    def _propose(self) -> None:
        """Ask the runner for proposals for the next step, for every request that is decoding."""
        running = self.scheduler.running
        if not running or len(running) > self.spec_max_batch:
            return  # a big batch is compute-bound already: verification would cost more than it saves
        inputs = []
        for req in running:
            # Never propose past max_tokens / the context: the last proposal's successor must still fit.
            k = min(self.num_spec_tokens, req.max_total_tokens - req.num_tokens - 1)
            if k > 0 and req.output_token_ids and req.num_computed_tokens == req.num_tokens - 1:
                inputs.append(ProposeInput(req.request_id, req.prompt_token_ids, req.output_token_ids, k))
        if not inputs:
            return
        proposals = self.runner.propose(inputs)
        for p in inputs:
            toks = proposals.get(p.request_id)
            if toks:
                self.scheduler.requests[p.request_id].spec_token_ids = list(toks[: p.max_tokens])

    def _count_spec(self, seqs: list[SeqInput], result: RunnerOutput) -> None:
        for s in seqs:
            toks = result.spec_sampled.get(s.request_id)
            if s.num_spec and toks is not None:
                accepted = len(toks) - 1
                self.spec_num_drafts += 1
                self.spec_num_draft_tokens += s.num_spec
                self.spec_num_accepted_tokens += accepted
                for i in range(accepted):
                    self.spec_accepted_per_pos[i] += 1

    def _seq_input(self, req: Request, n: int) -> SeqInput:
        start = req.num_computed_tokens
        num_spec = max(0, start + n - req.num_tokens)
        s = SeqInput(req.request_id, req.tokens_slice_with_spec(start, start + n), start, self.kv.block_ids(req),
                     req.params, sample=start + n >= req.num_tokens, prompt_token_ids=req.prompt_token_ids,
                     output_token_ids=req.output_token_ids, num_spec=num_spec)
        if req.params.prompt_logprobs is not None and start < req.num_prompt_tokens:
            p = req.num_prompt_tokens
            s.prompt_next_ids = [req.prompt_token_ids[i + 1] if i + 1 < p else None for i in range(start, start + n)]
        return s

    def _update(self, req: Request, new: list[int], lps: list[Logprobs] | None = None) -> RequestUpdate:
        u = RequestUpdate(
            req.request_id, new, req.status.finish_reason, lps or [], None, req.num_prompt_tokens,
            req.num_cached_tokens, req.num_preemptions, req.arrival_time, req.first_scheduled_time,
            req.first_token_time, req.finished_time)
        if len(req.output_token_ids) == 1 and new and req.request_id in self._prompt_lp:
            u.prompt_logprobs = self._prompt_lp.pop(req.request_id)
        if req.status in (RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_TIMEOUT):
            u.new_token_ids = []
        return u
