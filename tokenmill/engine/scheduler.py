"""The token-budget scheduler: one rule covers prefill chunks, decodes, prefix hits and resumes.

Each step hands `max_num_batched_tokens` to running requests first (most important first), then to
waiting ones. Decodes always go: a running prefill chunk leaves a token for each decode ranked below it,
and room for the first chunks of the waiting requests that this step admits and the policy ranks above
it, so prefill tokens go in policy order (or, where the policy says so, sits the step out for them, as
may a waiting request the admission loop reaches after them). A request is handed `min(tokens it still
has to compute, budget left)`, so long prompts are prefilled in chunks and decodes ride in the same
forward pass. When KV blocks run out, the least important running request is preempted: its blocks are
freed and it recomputes later. A step abandoned part-way for a request that arrived while it ran
(`unschedule`) leaves no trace: its prefix-cache registrations and the policy's charges are taken back
and its admissions undone. What "important" means is the scheduling policy's business
(tokenmill/engine/policy.py): it orders both lists, picks the next request to admit and may let a waiting
request preempt a running one. Pure Python: no torch.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.policy import SchedulingPolicy
from tokenmill.engine.request import Request, RequestStatus

logger = logging.getLogger(__name__)
MAX_PREEMPT_TO_ADMIT = 4  # per step: enough to seat a burst of urgent arrivals quickly, few enough not to thrash


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Request, int]] = field(default_factory=list)  # (request, tokens to compute)
    preempted: list[Request] = field(default_factory=list)
    admitted: list[Request] = field(default_factory=list)  # moved from waiting to running by this step

    @property
    def num_batched_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_batched_tokens: int, max_num_seqs: int,
                 policy: SchedulingPolicy | None = None, clock: Callable[[], float] = time.monotonic):
        self.kv = kv
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.policy = policy if policy is not None else SchedulingPolicy()
        self.clock = clock
        self.waiting: list[Request] = []  # sorted by policy.waiting_key: most important first
        self.running: list[Request] = []  # sorted by policy.running_key, so victims come from the tail
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self._arrivals: list[Request] = []  # added since the last schedule(): the step in flight never saw them

    # -- queue bookkeeping -------------------------------------------------------------------
    def _insert(self, queue: list[Request], req: Request) -> None:
        key = self.policy.running_key if queue is self.running else self.policy.waiting_key
        queue.insert(bisect.bisect(queue, key(req), key=key), req)

    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        self.requests[req.request_id] = req
        self.policy.add(req, self.clock())
        req.status = RequestStatus.WAITING
        self._insert(self.waiting, req)
        self._arrivals.append(req)

    def abort_request(self, request_id: str, status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> Request | None:
        req = self.requests.get(request_id)
        if req is None or req.status.finished:
            return None
        self._finish(req, status)
        return req

    def _finish(self, req: Request, status: RequestStatus) -> None:
        was_waiting = req.status != RequestStatus.RUNNING
        if was_waiting:
            self.waiting.remove(req)
        else:
            self.running.remove(req)
        self.kv.free(req)
        req.status = status
        req.finished_time = self.clock()
        del self.requests[req.request_id]
        self.policy.remove(req, was_waiting)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ----------------------------------------------------------------------------
    def _preempt(self, req: Request, reason: str) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.spec_token_ids = []
        req.num_preemptions += 1
        self.num_preemptions += 1
        logger.info("preempted request %s (priority %d, %d tokens) %s", req.request_id, req.priority, req.num_tokens,
                    reason)
        self.policy.preempted(req)
        self._insert(self.waiting, req)

    def _victim_for(self, req: Request) -> Request | None:
        """The least important running request the policy would preempt to seat `req`, if any. Not only the
        last: under fair the most-served tenant may hold one slot and keep it, while the flood just before
        it in the running order holds the rest."""
        if not self.policy.preempt_to_admit:
            return None
        return next((v for v in reversed(self.running) if self.policy.should_preempt(req, v)), None)

    def _seat_waiting(self) -> tuple[list[Request], list[tuple[tuple, int, Request]]]:
        """Before anything is scheduled: find the waiting requests this step will admit, in the policy's
        order: those that fit in a free slot and free blocks, then, while the next ones have no room and
        the policy would preempt a running request for each, the least important such one (a victim per
        seated request, at most MAX_PREEMPT_TO_ADMIT per step, so a burst is seated within a step or two
        and nothing thrashes).

        Returns the victims, and each seated request's waiting key with its first chunk (and itself): a running
        prefill chunk the policy ranks below a seated request leaves that chunk in the budget, so the step's
        prefill tokens go in policy order (a light tenant's prompt is not starved by the flood's chunks
        that happened to be admitted a step earlier, and a slot freed by preemption is used at once)."""
        victims: list[Request] = []
        seated: list[tuple[tuple, int, Request]] = []
        policy = self.policy
        free_slots = self.max_num_seqs - len(self.running)
        free_tokens = self.kv.free_tokens()
        # The waiting list is sorted by waiting_key (re-sorted at this step's start where keys move), and
        # nothing has been charged yet this step: its order is the policy's. A copy, as victims join it.
        for req in list(self.waiting):
            if len(victims) >= MAX_PREEMPT_TO_ADMIT:
                break
            first_chunk = min(req.num_tokens, self.max_num_batched_tokens)
            if free_slots > 0 and free_tokens >= first_chunk:
                free_slots -= 1  # it has room already; the admission loop takes it
                free_tokens -= first_chunk
                seated.append((policy.waiting_key(req), first_chunk, req))
                continue
            victim = self._victim_for(req)
            if victim is None:
                break
            free_tokens += self.kv.held_tokens(victim) - first_chunk
            self._preempt(victim, f"to seat {req.request_id}, which the policy ranks above it")
            victims.append(victim)
            seated.append((policy.waiting_key(req), first_chunk, req))
        return victims, seated

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        policy = self.policy
        self._arrivals = []
        policy.begin_step(self.clock())
        if policy.resort:  # keys moved with time or service since the last step
            self.waiting.sort(key=policy.waiting_key)
            self.running.sort(key=policy.running_key)
        admit_victims, seated = self._seat_waiting()
        seated.sort(key=lambda s: s[0])  # already in the policy's order, bar ties a preemption reordered
        seated_keys = [k for k, _, _ in seated]
        seated_tokens = list(itertools.accumulate((n for _, n, _ in seated), initial=0))  # [j]: first j's chunks

        # Decodes always go: a prefill chunk leaves a token for each decode ranked below it (without, a chunk
        # can take a small budget whole and stall every decode behind it), and room for the first chunks
        # of the seated requests ranked above it. Preemption only shortens the list: the room stays spare.
        decodes_after = [0] * (len(self.running) + 1)
        for j in range(len(self.running) - 1, -1, -1):
            decodes_after[j] = decodes_after[j + 1] + (not self.running[j].is_prefilling)
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            cap = budget
            if req.is_prefilling:
                cap -= decodes_after[i + 1]
                if seated:
                    j = bisect.bisect_left(seated_keys, policy.waiting_key(req))
                    # A chunk may sit the step out for a prompt that starts in it (under fair: a backlogged
                    # tenant's, for a lighter tenant's), keeping that step short: its first token comes sooner.
                    if any(policy.sits_out_for(req, s) for _, _, s in seated[:j]):
                        cap = 0
                    cap -= seated_tokens[j]
                if cap <= 0:
                    i += 1  # this chunk waits a step; the request stays running and unscheduled
                    continue
            # Speculative tokens are just more tokens to compute; the budget may cut some off.
            n = min(req.num_tokens_with_spec - req.num_computed_tokens, cap)
            while not self.kv.allocate_slots(req, n):
                if req.spec_token_ids:  # drop the proposals before preempting anyone to make room for them
                    req.spec_token_ids = []
                    n = min(req.num_tokens - req.num_computed_tokens, cap)
                    continue
                victim = self.running[-1]  # least important: req itself or after it, never one already scheduled
                self._preempt(victim, "to free KV blocks")
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                out.scheduled.append((req, n))
                policy.scheduled(req, n)
                budget -= n
                i += 1
                continue
            break  # req preempted itself: everything after it was preempted already

        # Admit waiting requests only when nothing had to be preempted for lack of blocks (it would thrash).
        thrashing = bool(out.preempted)
        out.preempted.extend(admit_victims)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not thrashing:
            req = policy.pick(self.waiting)
            if any(policy.sits_out_for(req, a) for a in out.admitted):
                break  # as for running chunks: the rest waits a step, this one's prompt runs in a short step
            got = self.kv.allocate_admission(req, budget)
            if got is None:
                break
            num_cached, n = got
            self.waiting.remove(req)
            req.num_computed_tokens = num_cached
            if req.first_scheduled_time is None:
                req.first_scheduled_time = self.clock()
                req.num_cached_tokens = num_cached
            req.status = RequestStatus.RUNNING
            policy.admitted(req)
            self._insert(self.running, req)
            out.admitted.append(req)
            out.scheduled.append((req, n))
            policy.scheduled(req, n)
            budget -= n
        return out

    # -- abandoning a step -------------------------------------------------------------------
    def arrival_outranks(self, out: SchedulerOutput) -> bool:
        """While `out` is being computed: did a request arrive that this step would have served ahead of
        one it holds, had it come before the step was planned, that the next step can seat (a free slot,
        or a victim the policy would preempt for it), and whose first chunk the redone step can hold? Its
        room is the budget the step left, plus the prefill chunks of the requests it outranks: decodes
        always go, so a step full of other prompts has no room for it however many decodes it outranks.

        And the redo must not just be this step plus the arrival's prompt when the step holds a prompt
        chunk the arrival does not outrank: that chunk's request would wait out the time already spent and
        then a longer step, while the arrival, waiting for the next step, would have lost little more than
        the time this step has left. So such a step is abandoned only if the redo drops prefill work the
        arrival outranks; a step of decodes only (which are short) may be abandoned for any arrival."""
        policy = self.policy
        spare = self.max_num_batched_tokens - out.num_batched_tokens
        for a in self._arrivals:
            if a.status != RequestStatus.WAITING:
                continue
            seatable = len(self.running) < self.max_num_seqs or self._victim_for(a) is not None
            if not seatable:
                continue
            outranks = [policy.outranks(a, req) for req, _ in out.scheduled]
            displaced = sum(n for (req, n), o in zip(out.scheduled, outranks, strict=True) if o and req.is_prefilling)
            kept = sum(n for (req, n), o in zip(out.scheduled, outranks, strict=True) if not o and req.is_prefilling)
            if (any(outranks) and spare + displaced >= min(a.num_tokens, self.max_num_batched_tokens)
                    and (displaced or not kept)):
                return True
        return False

    def unschedule(self, out: SchedulerOutput) -> None:
        """The runner abandoned `out` part-way: none of it was computed. Blocks registered in the prefix
        cache for its tokens are taken out (their KV is not there), and the requests it admitted go back to
        waiting, giving back their blocks: a prefix hit this step found may be among those just taken out.
        Preemptions it made stand. The policy takes back what it charged for the step (abandon_step)."""
        self.policy.abandon_step()  # first: the waiting list's order below is the one the step was planned with
        for req, _ in out.scheduled:
            self.kv.forget_uncomputed(req)
        for req in out.admitted:
            self.running.remove(req)
            self.kv.free(req)
            if req.num_preemptions == 0 and not req.output_token_ids:
                req.first_scheduled_time = None  # its first admission: its queue time goes on
            req.num_computed_tokens = 0
            req.spec_token_ids = []
            req.status = RequestStatus.WAITING
            self.policy.preempted(req)  # back in the waiting list: the policy's bookkeeping as for a preemption
            self._insert(self.waiting, req)

    def update(self, out: SchedulerOutput, sampled: dict[str, int],
               spec_sampled: dict[str, list[int]] | None = None) -> list[tuple[Request, int]]:
        """Advance computed counts, append sampled tokens, finish requests that stopped. Returns the
        requests that got tokens this step with how many (finished ones have a finished status).

        spec_sampled holds, for requests that had speculative tokens verified, every token the
        verification emitted (accepted proposals, then the target's own token). The tokens are taken
        one at a time and stop conditions checked after each, so nothing past a stop is emitted;
        rejected proposals roll num_computed_tokens back and free their KV slots."""
        self.policy.end_step()  # computed: its charges stand (and requests finishing below see them)
        now = self.clock()
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
                self.policy.generated(req)
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
