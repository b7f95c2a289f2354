"""Scheduling policies: who is admitted first, whose prefill chunk goes first, who is preempted.

The scheduler keeps two lists, `waiting` and `running`, sorted by a policy's `waiting_key` / `running_key`
(smaller = more important; the running list's tail is the preemption victim). A policy whose keys move
with time or service (`resort = True`) has both lists re-sorted at the start of every step, with `now`
frozen for that step so every key in the list is computed against the same clock.

- fcfs: (priority, arrival). Exactly the scheduler's historical order: priority levels are strict classes,
  first come first served within one; no aging, no preemption to admit.
- priority: the same order, but a waiting request's priority improves by one level for every
  `aging_s` seconds it has waited (the starvation guard; on a tie the native priority wins, so a request
  overtakes the fresh requests of a better class only once it has aged strictly past it), its effective
  priority is frozen when it is admitted, and a waiting request that outranks the least important running
  one may preempt it.
- deadline: earliest deadline first. Deadline = arrival + TTFT target (the request's own, else its
  priority class's from --slo-classes; none = best effort, after every request that has one). Running
  requests that are decoding come before running prefills, so a burst of new prompts cannot stretch the
  decode steps of requests already streaming (their TPOT); prefill chunks go in EDF order.
- fair: Virtual Token Counter (Sheng et al., "Fairness in Serving Large Language Models", OSDI'24). Each
  tenant has a counter of the service it received (w_p per prompt token computed, w_q per token
  generated); the waiting request of the tenant with the smallest counter goes next. A tenant that
  becomes active again is lifted to the smallest counter of the tenants waiting (or to that of the last
  tenant to leave the queue) less its credit: how far it had fallen behind that floor while it was active
  (served below the fair pace), at most `--fair-burst` units; idling earns nothing, and a tenant never
  seen starts level. The paper lifts with no credit, which serves a light tenant's burst of a few
  requests at the flood's pace, one request each time the flood's counter catches up; with it, the burst
  is served at once, and no tenant gets more than its fair share plus one burst. Beyond the paper: when every
  slot is taken, a waiting request may preempt the running request of the most-served tenant if their
  counters differ by more than the work the preemption throws away, or if its tenant (no more served)
  holds at least two slots fewer than the victim's (a tenant that sends a request now and then gets a
  slot at once, not after the flood's; moving one slot can never be undone by the reverse move, so
  nothing bounces).

Each policy also answers two questions for the step in flight: does a request that arrived while it runs
outrank one in it (`outranks`; the engine then abandons the step: a better priority level, an earlier
deadline, a tenant with nothing else queued that ranks ahead of the flood, the most-served tenant with
requests queued), and does a running prefill chunk or a waiting request sit a step out for a prompt it
ranks below (`sits_out_for`; only fair: the flood's chunk or admission, for a tenant with nothing else
queued). A step abandoned part-way is taken back (`abandon_step`: fair refunds its prompt charges).

Pure Python (the engine core imports no torch); every method takes the scheduler's clock value.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tokenmill.engine.request import Request, RequestStatus
from tokenmill.errors import ConfigError

if TYPE_CHECKING:
    from tokenmill.config import EngineConfig

POLICIES = ("fcfs", "priority", "deadline", "fair")
# VTC weights of the paper: an output token costs twice an input token.
FAIR_PROMPT_WEIGHT = 1.0
FAIR_OUTPUT_WEIGHT = 2.0
# Most credit (counter units: prompt tokens + 2 x output tokens) a tenant served below the fair pace
# keeps: a few chat requests' worth.
DEFAULT_FAIR_BURST = 1024.0
DEFAULT_TENANT = "default"
MAX_IDLE_TENANTS = 4096  # counters kept for tenants with nothing in flight


@dataclass(frozen=True)
class SloClass:
    ttft: float  # seconds from arrival to first token


def parse_slo_classes(spec: str | None) -> dict[int | None, SloClass]:
    """'0:ttft=0.5,1:ttft=5,*:ttft=30' -> {0: SloClass(0.5), 1: SloClass(5.0), None: SloClass(30.0)}.
    Keys are priority values; '*' is the class of every other priority."""
    out: dict[int | None, SloClass] = {}
    if not spec:
        return out
    for item in spec.split(","):
        item = item.strip()
        m = re.fullmatch(r"(-?\d+|\*)\s*:\s*(\w+)\s*=\s*([0-9]*\.?[0-9]+)", item)
        if not m:
            raise ConfigError(f"cannot read SLO class {item!r}; write PRIORITY:ttft=SECONDS, e.g. 0:ttft=0.5,1:ttft=5")
        key = None if m.group(1) == "*" else int(m.group(1))
        if m.group(2) != "ttft":
            raise ConfigError(f"SLO class {item!r}: unknown target {m.group(2)!r} (supported: ttft)")
        value = float(m.group(3))
        if not 0 < value < math.inf:
            raise ConfigError(f"SLO class {item!r}: the target must be a positive number of seconds")
        if key in out:
            raise ConfigError(f"SLO class for priority {m.group(1)} given twice")
        out[key] = SloClass(value)
    return out


def class_ttft(classes: dict[int | None, SloClass], priority: int) -> float | None:
    c = classes.get(priority, classes.get(None))
    return None if c is None else c.ttft


class SchedulingPolicy:
    """fcfs: (priority, arrival, admission order) for both lists; the scheduler's historical behaviour."""

    name = "fcfs"
    resort = False  # keys change with time or service: re-sort both lists every step
    preempt_to_admit = False  # may a waiting request preempt a running one (see should_preempt)

    def __init__(self) -> None:
        self.now = 0.0
        self._count = itertools.count()
        self._seq: dict[str, int] = {}

    # -- lifecycle hooks (the scheduler calls these) ----------------------------------------------------
    def add(self, req: Request, now: float) -> None:
        self._seq[req.request_id] = next(self._count)

    def remove(self, req: Request, was_waiting: bool) -> None:
        """The request finished or was aborted (from the waiting list if was_waiting)."""
        self._seq.pop(req.request_id, None)

    def begin_step(self, now: float) -> None:
        self.now = now

    def end_step(self) -> None:
        """The step planned since begin_step was computed: its charges stand."""

    def abandon_step(self) -> None:
        """The step planned since begin_step was abandoned before anything of it was computed."""

    def admitted(self, req: Request) -> None:
        """Moved from waiting to running (first time or after a preemption)."""

    def preempted(self, req: Request) -> None:
        """Moved from running back to waiting."""

    def scheduled(self, req: Request, num_tokens: int) -> None:
        """num_tokens of req will be computed this step (req.num_computed_tokens not yet advanced)."""

    def generated(self, req: Request) -> None:
        """req got a new output token."""

    # -- ordering -------------------------------------------------------------------------------------
    def waiting_key(self, req: Request) -> tuple:
        return (req.priority, req.arrival_time, self._seq[req.request_id])

    def running_key(self, req: Request) -> tuple:
        return self.waiting_key(req)

    def pick(self, waiting: list[Request]) -> Request:
        """The next waiting request to admit (the list is sorted by waiting_key at the step's start)."""
        return waiting[0]

    def should_preempt(self, waiting: Request, victim: Request) -> bool:
        return False

    def sits_out_for(self, req: Request, seated: Request) -> bool:
        """Does `req` (a running prefill, or a waiting request the step could admit) compute nothing in a
        step where `seated`, which the policy ranks above it, starts its prompt (rather than take the budget
        that request leaves)?"""
        return False

    def outranks(self, arrival: Request, req: Request) -> bool:
        """Had `arrival` come just before this step was planned, would it have gone ahead of `req`, which
        the step holds? (The engine abandons a step for such an arrival: see EngineCore.step.) Here: only a
        strictly better priority level; a later arrival of the same level waits its turn."""
        return arrival.priority < req.priority


FCFSPolicy = SchedulingPolicy


class PriorityPolicy(SchedulingPolicy):
    name = "priority"
    resort = True
    preempt_to_admit = True

    def __init__(self, aging_s: float = 0.0) -> None:
        super().__init__()
        self.aging_s = aging_s
        self._frozen: dict[str, int] = {}

    def effective_priority(self, req: Request) -> int:
        if self.aging_s <= 0:
            return req.priority
        waited = max(0.0, self.now - req.arrival_time)
        return req.priority - int(waited // self.aging_s)

    def remove(self, req: Request, was_waiting: bool) -> None:
        super().remove(req, was_waiting)
        self._frozen.pop(req.request_id, None)

    def admitted(self, req: Request) -> None:
        # Frozen, so an aged request is not preempted at once by the fresh arrivals it has just overtaken.
        self._frozen[req.request_id] = self.effective_priority(req)

    def waiting_key(self, req: Request) -> tuple:
        # An aged request that has only caught up with a better class ties with it and the native priority
        # breaks the tie: it overtakes that class's fresh requests once it has aged strictly past them.
        return (self.effective_priority(req), req.priority, req.arrival_time, self._seq[req.request_id])

    def running_key(self, req: Request) -> tuple:
        p = self._frozen.get(req.request_id, req.priority)
        return (p, req.priority, req.arrival_time, self._seq[req.request_id])

    def should_preempt(self, waiting: Request, victim: Request) -> bool:
        return self.waiting_key(waiting)[0] < self.running_key(victim)[0]

    def outranks(self, arrival: Request, req: Request) -> bool:
        return self.should_preempt(arrival, req)


class DeadlinePolicy(SchedulingPolicy):
    name = "deadline"
    resort = True

    def __init__(self, classes: dict[int | None, SloClass] | None = None) -> None:
        super().__init__()
        self.classes = classes or {}

    def ttft_target(self, req: Request) -> float | None:
        return req.ttft_target if req.ttft_target is not None else class_ttft(self.classes, req.priority)

    def deadline(self, req: Request) -> float:
        t = self.ttft_target(req)
        return math.inf if t is None else req.arrival_time + t

    def waiting_key(self, req: Request) -> tuple:
        # Best-effort requests (no target) come after every deadline, first come first served among them.
        return (self.deadline(req), req.arrival_time, self._seq[req.request_id])

    def running_key(self, req: Request) -> tuple:
        prefilling = req.num_computed_tokens < req.num_prompt_tokens
        return (prefilling, *self.waiting_key(req))

    def outranks(self, arrival: Request, req: Request) -> bool:
        return self.deadline(arrival) < self.deadline(req)


class FairPolicy(SchedulingPolicy):
    """VTC. Counters grow with service actually computed: prompt tokens when first computed (a recompute
    after preemption is our doing, not the tenant's, and is free), output tokens when generated."""

    name = "fair"
    resort = True
    preempt_to_admit = True

    def __init__(self, prompt_weight: float = FAIR_PROMPT_WEIGHT, output_weight: float = FAIR_OUTPUT_WEIGHT,
                 burst: float = DEFAULT_FAIR_BURST) -> None:
        super().__init__()
        self.wp = prompt_weight
        self.wq = output_weight
        self.burst = burst
        self.counters: dict[str, float] = {}
        self._waiting: dict[str, int] = {}  # tenant -> its requests in the waiting list
        self._live: dict[str, int] = {}  # tenant -> its unfinished requests
        self._charged: dict[str, int] = {}  # request -> prompt positions already charged
        self._last_left = 0.0  # counter of the last tenant whose queue emptied
        self._floor = 0.0  # where a joining tenant's lift starts: see _lift_floor
        self._credit: dict[str, float] = {}  # idle tenant -> the credit it held when it went idle
        self._step_start: dict[str, float] = {}  # counters of the step's tenants before its charges
        # The step's prompt charges, (request, tenant, position charged before, amount), taken back if the
        # step is abandoned.
        self._step_charges: list[tuple[str, str, int | None, float]] = []

    @staticmethod
    def tenant(req: Request) -> str:
        return req.tenant or DEFAULT_TENANT

    def _lift_floor(self) -> float:
        """The least-served waiting tenant's counter (the last tenant to leave the queue's when nobody
        waits), never moving back: a tenant spending its credit sits below it and must not pull it down
        (each joiner would start further ahead than the last)."""
        # Counters as the step in flight was planned: its charges are taken back if it is abandoned, and a
        # tenant lifted mid-step must not then sit ahead of the tenants it was lifted level with.
        backlogged = [self._planned_counter(u) for u, n in self._waiting.items() if n]
        self._floor = max(self._floor, min(backlogged) if backlogged else self._last_left)
        return self._floor

    def add(self, req: Request, now: float) -> None:
        super().add(req, now)
        t = self.tenant(req)
        if not self._waiting.get(t):
            # Counter lift (VTC): a tenant joining the queue starts no lower than the floor less its credit.
            # A tenant with requests running is active and may be up to `burst` behind; one back from idle
            # gets the credit it had when it went idle (none if unknown): idling earns nothing.
            credit = self.burst if self._live.get(t) else self._credit.pop(t, 0.0)
            self.counters[t] = max(self.counters.get(t, -math.inf), self._lift_floor() - credit)
        self._waiting[t] = self._waiting.get(t, 0) + 1
        self._live[t] = self._live.get(t, 0) + 1

    def _left_queue(self, t: str) -> None:
        self._waiting[t] -= 1
        if not self._waiting[t]:
            del self._waiting[t]
            self._last_left = self.counters[t]

    def admitted(self, req: Request) -> None:
        self._left_queue(self.tenant(req))

    def preempted(self, req: Request) -> None:
        t = self.tenant(req)
        self._waiting[t] = self._waiting.get(t, 0) + 1

    def remove(self, req: Request, was_waiting: bool) -> None:
        super().remove(req, was_waiting)
        t = self.tenant(req)
        if was_waiting:
            self._left_queue(t)
        self._charged.pop(req.request_id, None)
        self._live[t] -= 1
        if not self._live[t]:
            del self._live[t]
            # Credit earned while active (served below the fair pace), kept for the tenant's return.
            credit = min(self.burst, self._lift_floor() - self.counters[t])
            if credit > 0:
                self._credit[t] = credit
            if len(self.counters) > MAX_IDLE_TENANTS:
                # Bounded memory under tenant churn: an idle tenant's counter is dropped (the lift on its
                # return puts it level with the least-served waiting tenant, with no credit).
                del self.counters[t]
                self._credit.pop(t, None)

    def begin_step(self, now: float) -> None:
        super().begin_step(now)
        self._step_start = {}
        self._step_charges = []

    def end_step(self) -> None:
        self._step_start = {}
        self._step_charges = []

    def abandon_step(self) -> None:
        # Nothing was computed: the step's requests, its admissions among them, rank in the redo as they did
        # when it was planned (an admission left charged could lose its place to the requests it had passed).
        for rid, t, before, amount in reversed(self._step_charges):
            if t in self.counters:
                self.counters[t] -= amount
            if rid in self._charged:  # still live
                if before is None:
                    del self._charged[rid]
                else:
                    self._charged[rid] = before
        self.end_step()

    def scheduled(self, req: Request, num_tokens: int) -> None:
        t = self.tenant(req)
        self._step_start.setdefault(t, self.counters[t])
        start = max(req.num_computed_tokens, self._charged.get(req.request_id, 0))
        end = min(req.num_computed_tokens + num_tokens, req.num_prompt_tokens)
        if end > start:
            self._step_charges.append((req.request_id, t, self._charged.get(req.request_id), self.wp * (end - start)))
            self._charged[req.request_id] = end
            self.counters[t] += self.wp * (end - start)

    def generated(self, req: Request) -> None:
        self.counters[self.tenant(req)] += self.wq

    def _num_running(self, t: str) -> int:
        return self._live.get(t, 0) - self._waiting.get(t, 0)

    def waiting_key(self, req: Request) -> tuple:
        # Equal counters (a tenant just lifted level with the others): the one with fewer running goes first.
        t = self.tenant(req)
        return (self.counters[t], self._num_running(t), req.priority, req.arrival_time, self._seq[req.request_id])

    def running_key(self, req: Request) -> tuple:
        return (self.counters[self.tenant(req)], req.priority, req.arrival_time, self._seq[req.request_id])

    def should_preempt(self, waiting: Request, victim: Request) -> bool:
        t, v = self.tenant(waiting), self.tenant(victim)
        if t == v:
            return False
        gap = self.counters[v] - self.counters[t]
        if gap >= 0 and self._num_running(t) + 1 < self._num_running(v):
            # A tenant that has just become active (the lift made it level with the least-served waiting
            # tenant) or runs few requests should not queue for a slot behind a flooding tenant. After the
            # move it still holds no more slots than the victim's tenant, so the move is never reversed.
            return True
        # Otherwise only when the unfairness exceeds the work the preemption throws away (the victim
        # recomputes), so two backlogged tenants never bounce a slot back and forth.
        return gap > self.wp * victim.num_computed_tokens

    def _queued_besides(self, req: Request) -> int:
        """How many of req's tenant's requests wait, req itself not counted."""
        n = self._waiting.get(self.tenant(req), 0)
        return n - 1 if req.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED) else n

    def _floods(self, req: Request) -> bool:
        """Is req's tenant the flood: requests of its own queued besides req, and no tenant with requests
        queued served more? (A light tenant with two requests waiting a moment is not.)"""
        if not self._queued_besides(req):
            return False
        c = self.counters[self.tenant(req)]
        return all(self.counters[u] <= c for u in self._waiting)

    def sits_out_for(self, req: Request, seated: Request) -> bool:
        # The flood gets all the service it can take; one chunk or admission fewer costs it little, and a
        # tenant with nothing else queued gets its first token sooner (its step holds its prompt and the
        # decodes). Two backlogged tenants keep sharing steps: neither waits for latency's sake. Only while
        # the flood is ahead by more than the first token's charge: one level with the lighter tenant (a
        # tenant new to the queue is lifted level) would fall behind it by sitting out, and seating its
        # next request would then preempt the light request to even them up.
        t, s = self.tenant(req), self.tenant(seated)
        return (t != s and self._floods(req) and self._queued_besides(seated) == 0
                and self._planned_counter(t) > self._planned_counter(s) + self.wq)

    def _planned_counter(self, t: str) -> float:
        """Tenant t's counter when this step was planned, before its charges for the step."""
        return self._step_start.get(t, self.counters[t])

    def outranks(self, arrival: Request, req: Request) -> bool:
        # Only the flood's step is abandoned (see _floods), only for a tenant with nothing else queued (one
        # with requests waiting gains nothing from one more: backlogged tenants never abandon each other's
        # steps), and only if the next step would take the arrival first (its counter, then its running
        # count, below the flood's, this step's charges included).
        t, a = self.tenant(req), self.tenant(arrival)
        if a == t or not self._floods(req) or self._queued_besides(arrival):
            return False
        return (self.counters[a], self._num_running(a)) < (self.counters[t], self._num_running(t))

    def pick(self, waiting: list[Request]) -> Request:
        # Counters move within a step (admission charges the prompt), so take the minimum now.
        return min(waiting, key=self.waiting_key)


def make_policy(name: str, *, aging_s: float = 0.0, slo_classes: str | None = None,
                fair_burst: float = DEFAULT_FAIR_BURST) -> SchedulingPolicy:
    if name == "fcfs":
        return SchedulingPolicy()
    if name == "priority":
        return PriorityPolicy(aging_s)
    if name == "deadline":
        return DeadlinePolicy(parse_slo_classes(slo_classes))
    if name == "fair":
        return FairPolicy(burst=fair_burst)
    raise ConfigError(f"unknown scheduling policy {name!r}; choose one of {', '.join(POLICIES)}")


def policy_from_config(config: EngineConfig) -> SchedulingPolicy:
    """The policy an engine built from `config` schedules with (the real engine and the mock alike)."""
    return make_policy(config.scheduling_policy, aging_s=config.priority_aging, slo_classes=config.slo_classes,
                       fair_burst=config.fair_burst)
