"""Admission control: predict a new request's wait before spending compute on it; bounded metric labels.

The prediction is queueing arithmetic on two live quantities:
- the work ahead of the request: prompt tokens of requests admitted but not yet answering (the frontend's
  queue) that the engine's scheduling policy will serve before it, plus its own prompt;
- the drain rate: queued prompt tokens that reached their first token per second, measured only over
  intervals when the queue was not empty (so it is the engine's service rate under backlog, whichever
  resource binds: compute, KV blocks or --max-num-seqs; not the arrival rate of a quiet server).

predicted wait = work ahead / (drain rate − the rate at which strictly more important work arrives). The
subtraction matters under priority order (fcfs and priority): requests of a better class that arrive while
this one waits go before it, so it gets only what they leave of the drain; it is left out under deadline
and fair order, where later arrivals overtake by deadline or by tenant service. If the prediction exceeds
the request's TTFT target (its own, its priority class's, or --max-queue-delay), the request gets 429 with
Retry-After = the excess: the time after which the same work ahead would have drained enough for it to
make its target. No rate measured yet, or nothing ahead of the request: admit (retrying could not do
better). Everything here is pure and unit-tested.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

RETRY_AFTER_MAX_S = 60


@dataclass(frozen=True, slots=True)
class QueuedWork:
    """One queued sequence as admission sees it."""

    priority: int
    deadline: float  # arrival + TTFT target; inf without one (the deadline policy's order)
    tenant: str
    tokens: int  # prompt tokens still to prefill


def work_ahead(policy: str, queued: Iterable[QueuedWork], new: QueuedWork) -> int:
    """Prompt tokens the engine will prefill before `new` gets its first token (its own included), under
    the scheduling policy's order. Aging (priority) and counter history (fair) are left out: the former
    only matters for requests that already waited long, the latter is approximated by round robin."""
    if policy in ("fcfs", "priority"):
        return new.tokens + sum(q.tokens for q in queued if q.priority <= new.priority)
    if policy == "deadline":
        return new.tokens + sum(q.tokens for q in queued if q.deadline <= new.deadline)
    if policy == "fair":
        per_tenant: dict[str, int] = {}
        for q in queued:
            per_tenant[q.tenant] = per_tenant.get(q.tenant, 0) + q.tokens
        mine = per_tenant.pop(new.tenant, 0) + new.tokens
        # Fair sharing: every other tenant is served about as much as this one needs, or all it has queued.
        return mine + sum(min(t, mine) for t in per_tenant.values())
    raise ValueError(f"unknown scheduling policy {policy!r}")


# Least share of the drain a request is predicted to get however much better work arrives (aging, or the
# better classes' bursts ending, leave it something).
MIN_DRAIN_SHARE = 0.05
PRIORITY_ORDERED = ("fcfs", "priority")  # policies where a better class's later arrivals overtake


def predict_wait(work_tokens: int, drain_rate: float | None, overtaking_rate: float = 0.0) -> float | None:
    """Seconds until the first token of a request with `work_tokens` of prefill ahead (its own included),
    while better work arrives at `overtaking_rate` prompt tokens/s; None when no rate is known yet."""
    if drain_rate is None or drain_rate <= 0:
        return None
    return work_tokens / max(drain_rate - overtaking_rate, MIN_DRAIN_SHARE * drain_rate)


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: str  # "ttft_target" | "queue_delay"
    limit_s: float
    predicted_s: float
    retry_after_s: int


def decide(predicted_s: float | None, ttft_target: float | None, max_queue_delay: float | None,
           nothing_ahead: bool = False) -> Rejection | None:
    """Reject exactly when the prediction exceeds the tighter of the request's TTFT target and the server's
    --max-queue-delay. Retry-After is the excess wait, in whole seconds, at least 1."""
    if predicted_s is None or nothing_ahead:
        return None
    limits = [(v, r) for v, r in ((ttft_target, "ttft_target"), (max_queue_delay, "queue_delay")) if v is not None]
    if not limits:
        return None
    limit, reason = min(limits)
    if predicted_s <= limit:
        return None
    retry = max(1, min(RETRY_AFTER_MAX_S, math.ceil(predicted_s - limit)))
    return Rejection(reason, limit, predicted_s, retry)


class DrainMeter:
    """Queued prompt tokens leaving the queue per second of backlog, over a sliding window."""

    def __init__(self, window_s: float = 10.0, min_backlog_s: float = 0.2):
        self.window_s = window_s
        self.min_backlog_s = min_backlog_s
        self._samples: deque[tuple[float, float, int]] = deque()  # (time, backlogged seconds, tokens)
        self._last: float | None = None
        self._dt = 0.0
        self._tokens = 0

    def observe(self, now: float, tokens: int, backlogged: bool) -> None:
        """An engine step reported at `now`: `tokens` queued prompt tokens got their first token, and the
        queue was (not) empty since the previous report."""
        dt = 0.0 if self._last is None or not backlogged else max(0.0, now - self._last)
        self._last = now
        if dt == 0.0 and tokens == 0:
            return
        self._samples.append((now, dt, tokens))
        self._dt += dt
        self._tokens += tokens
        while self._samples and self._samples[0][0] < now - self.window_s:
            _, d, k = self._samples.popleft()
            self._dt -= d
            self._tokens -= k

    @property
    def rate(self) -> float | None:
        if self._dt < self.min_backlog_s or self._tokens <= 0:
            return None
        return self._tokens / self._dt


class ArrivalMeter:
    """Prompt tokens admitted per second, by priority, over a sliding window. Per-priority sums are kept
    as samples enter and leave, so a query costs one pass over the priority levels, not the samples."""

    def __init__(self, window_s: float = 10.0):
        self.window_s = window_s
        self._samples: deque[tuple[float, int, int]] = deque()  # (time, priority, tokens)
        self._sums: dict[int, int] = {}

    def _expire(self, now: float) -> None:
        while self._samples and self._samples[0][0] < now - self.window_s:
            _, p, k = self._samples.popleft()
            left = self._sums.get(p, 0) - k
            if left:
                self._sums[p] = left
            else:  # no entry per priority value once its window is empty (clients choose the values)
                self._sums.pop(p, None)

    def observe(self, now: float, priority: int, tokens: int) -> None:
        self._expire(now)
        self._samples.append((now, priority, tokens))
        self._sums[priority] = self._sums.get(priority, 0) + tokens

    def rate_above(self, now: float, priority: int) -> float:
        """Tokens/s admitted in the last window by requests strictly more important than `priority`."""
        self._expire(now)
        return sum(k for p, k in self._sums.items() if p < priority) / self.window_s


class LabelLimiter:
    """Bounded label cardinality: the first `limit` distinct values keep their name, later ones are 'other'."""

    OTHER = "other"

    def __init__(self, limit: int):
        self.limit = limit
        self._known: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._known:
            return value
        if len(self._known) < self.limit:
            self._known.add(value)
            return value
        return self.OTHER
