"""The token-budget scheduler: one rule covers prefill chunks, decodes, prefix hits and resumes.

Each step hands `max_num_batched_tokens` to running requests first (most important first), then to
waiting ones. A request is handed `min(tokens it still has to compute, budget left)`, so long prompts are
prefilled in chunks and decodes ride in the same forward pass. When KV blocks run out, the least
important running request (lowest priority, then newest) is preempted: its blocks are freed and it
recomputes later. Pure Python: no torch.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import time
from dataclasses import dataclass, field

from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.request import Request, RequestStatus

logger = logging.getLogger(__name__)


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Request, int]] = field(default_factory=list)  # (request, tokens to compute)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_batched_tokens: int, max_num_seqs: int):
        self.kv = kv
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self._seq = itertools.count()
        self._order: dict[str, tuple] = {}  # request id -> sort key (priority, arrival, seq)
        self.waiting: list[Request] = []  # sorted by key: most important first
        self.running: list[Request] = []  # sorted by key, so victims come from the tail
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    # -- queue bookkeeping -------------------------------------------------------------------
    def _key(self, req: Request) -> tuple:
        return self._order[req.request_id]

    def _insert(self, queue: list[Request], req: Request) -> None:
        queue.insert(bisect.bisect(queue, self._key(req), key=self._key), req)

    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        self.requests[req.request_id] = req
        self._order[req.request_id] = (req.priority, req.arrival_time, next(self._seq))
        req.status = RequestStatus.WAITING
        self._insert(self.waiting, req)

    def abort_request(self, request_id: str) -> Request | None:
        req = self.requests.get(request_id)
        if req is None or req.status.finished:
            return None
        self._finish(req, RequestStatus.FINISHED_ABORTED)
        return req

    def _finish(self, req: Request, status: RequestStatus) -> None:
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self.kv.free(req)
        req.status = status
        req.finished_time = time.monotonic()
        del self.requests[req.request_id]
        del self._order[req.request_id]

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ----------------------------------------------------------------------------
    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.spec_token_ids = []
        req.num_preemptions += 1
        self.num_preemptions += 1
        logger.info("preempted request %s (priority %d, %d tokens) to free KV blocks",
                    req.request_id, req.priority, req.num_tokens)
        self._insert(self.waiting, req)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled_ids: set[str] = set()

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            # Speculative tokens are just more tokens to compute; the budget may cut some off.
            n = min(req.num_tokens_with_spec - req.num_computed_tokens, budget)
            while not self.kv.allocate_slots(req, n):
                if req.spec_token_ids:  # drop the proposals before preempting anyone to make room for them
                    req.spec_token_ids = []
                    n = min(req.num_tokens - req.num_computed_tokens, budget)
                    continue
                victim = self.running[-1]  # least important; never one already scheduled (they sit before i)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                out.scheduled.append((req, n))
                scheduled_ids.add(req.request_id)
                budget -= n
                i += 1
                continue
            break  # req preempted itself: everything after it was preempted already

        # Admit waiting requests only when nothing had to be preempted this step (it would thrash).
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            req = self.waiting[0]
            computed, num_cached = self.kv.get_computed_blocks(req)
            n = min(req.num_tokens - num_cached, budget)
            if not self.kv.allocate_slots(req, n, computed):
                break
            self.waiting.pop(0)
            req.num_computed_tokens = num_cached
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.monotonic()
                req.num_cached_tokens = num_cached
            req.status = RequestStatus.RUNNING
            self._insert(self.running, req)
            out.scheduled.append((req, n))
            budget -= n
        return out

    def update(self, out: SchedulerOutput, sampled: dict[str, int],
               spec_sampled: dict[str, list[int]] | None = None) -> list[tuple[Request, int]]:
        """Advance computed counts, append sampled tokens, finish requests that stopped. Returns the
        requests that got tokens this step with how many (finished ones have a finished status).

        spec_sampled holds, for requests that had speculative tokens verified, every token the
        verification emitted (accepted proposals, then the target's own token). The tokens are taken
        one at a time and stop conditions checked after each, so nothing past a stop is emitted;
        rejected proposals roll num_computed_tokens back and free their KV slots."""
        now = time.monotonic()
        touched = []
        for req, n in out.scheduled:
            if req.status != RequestStatus.RUNNING:
                continue  # aborted while the step ran
            num_spec = max(0, req.num_computed_tokens + n - req.num_tokens)  # proposals computed this step
            req.spec_token_ids = []
            toks = spec_sampled.get(req.request_id) if spec_sampled else None
            if toks is None:
                req.num_computed_tokens += n - num_spec
                tok = sampled.get(req.request_id)
                if tok is None:
                    continue  # a prefill chunk that did not reach the end of the prompt
                toks = [tok]
            else:
                # Accepted proposals (all but the last emitted token) had their KV computed correctly.
                req.num_computed_tokens += n - num_spec + len(toks) - 1
            emitted = 0
            stop = None
            for tok in toks:
                req.output_token_ids.append(tok)
                emitted += 1
                stop = req.check_stop()
                if stop is not None:
                    break
            if req.first_token_time is None:
                req.first_token_time = now
            if stop is not None:
                self._finish(req, stop)
            elif num_spec:
                self.kv.trim(req, req.num_tokens)
            touched.append((req, emitted))
        return touched
