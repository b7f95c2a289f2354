"""The planner's discrete-event simulation: the real serving logic on a virtual clock.

Each replica is the real EngineCore (token-budget scheduler, scheduling policy, KV block pool with its prefix
cache, preemption) over a MockRunner whose step takes the profiled time (tokenmill.engine.step_time) on a
clock that jumps instead of sleeping. In front of the replicas: the server's admission caps (429 past
--max-queued-requests / --max-queued-tokens) and the router's policy (tokenmill.cluster.policy.route with its
prefix index). No torch, no sockets: a simulated hour takes seconds.

Events are processed in time order: an arrival at time T is routed and admitted at T, and joins its replica's
next step (a replica mid-step finishes that step first, as the real engine does); each replica runs its steps
back to back while it has work.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenmill.cluster.policy import (
    PolicyParams,
    PrefixIndex,
    ReplicaView,
    RequestFeatures,
    block_hashes,
    route,
)
from tokenmill.config import EngineConfig
from tokenmill.planning.workload import Arrival, percentile, percentiles, prompt_ids
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.mock_engine import StepSeconds, mock_core


@dataclass(frozen=True)
class Limits:
    """The server's admission caps (ServerConfig) the simulation applies per replica."""

    max_queued_requests: int = 256
    max_queued_tokens: int = 262144


@dataclass(frozen=True)
class Slo:
    ttft_s: float = math.inf  # p99 target
    tpot_s: float = math.inf  # p99 target


@dataclass
class RequestRecord:
    arrival: Arrival
    replica: int | None = None
    rejected: bool = False
    first_t: float | None = None
    end_t: float | None = None
    tokens: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_t is None else self.first_t - self.arrival.t

    @property
    def tpot(self) -> float | None:
        if self.end_t is None or self.first_t is None or self.tokens < 2:
            return None
        return (self.end_t - self.first_t) / (self.tokens - 1)


class _Replica:
    def __init__(self, index: int, config: EngineConfig, arch: Any, model: StepSeconds, num_blocks: int | None,
                 prefix_index_blocks: int):
        self.index = index
        self.now = 0.0
        self.busy_s = 0.0
        self.prefill_s = 0.0  # busy time attributed to prompt rows (for the cost split)
        self.engine = mock_core(config, arch, _Attributing(model, self), num_blocks=num_blocks,
                                sleep=self._advance, clock=lambda: self.now)
        self.queued: dict[str, int] = {}  # admitted, no first token yet: request id -> prompt tokens
        self.outstanding: dict[str, int] = {}  # the router's view: prefill not done + output not yet sent
        self.prefixes = PrefixIndex(prefix_index_blocks)

    def _advance(self, seconds: float) -> None:
        self.now += seconds
        self.busy_s += seconds

    def view(self, matched_tokens: int) -> ReplicaView:
        s = self.engine.stats()
        return ReplicaView(str(self.index), sum(self.outstanding.values()), len(self.outstanding), s.num_running,
                           s.num_waiting, s.kv_cache_usage, matched_tokens)


@dataclass
class _Attributing:
    """The step-time model, noting how much of each step went to prompt rows (by row share)."""

    model: StepSeconds
    replica: _Replica

    def step_seconds(self, seqs) -> float:
        t = self.model.step_seconds(seqs)
        rows = sum(len(s.token_ids) for s in seqs)
        prompt_rows = sum(len(s.token_ids) for s in seqs if s.start_pos < len(s.prompt_token_ids))
        if rows:
            self.replica.prefill_s += t * prompt_rows / rows
        return t


@dataclass
class SimResult:
    records: list[RequestRecord]
    replicas: int
    span_s: float
    busy_s: list[float]
    prefill_s: float
    timeline: list[tuple[float, int, int]] = field(default_factory=list)  # (t, waiting, running), all replicas
    wall_s: float = 0.0

    def summary(self, slo: Slo = Slo()) -> dict[str, Any]:
        done = [r for r in self.records if r.end_t is not None]
        ttft = [r.ttft for r in done if r.ttft is not None]
        tpot = [r.tpot for r in done if r.tpot is not None]
        e2e = [r.end_t - r.arrival.t for r in done]
        good = [r for r in done if (r.ttft or 0) <= slo.ttft_s and (r.tpot or 0) <= slo.tpot_s]
        out_tokens = sum(r.tokens for r in done)
        span = max(self.span_s, 1e-9)

        return {
            "replicas": self.replicas, "requests": len(self.records), "completed": len(done),
            "rejected_429": sum(r.rejected for r in self.records),
            "ttft_s": percentiles(ttft), "tpot_s": percentiles(tpot), "e2e_s": percentiles(e2e),
            "output_tokens_per_s": out_tokens / span, "requests_per_s": len(done) / span,
            "goodput_requests_per_s": len(good) / span,
            "utilisation": [b / span for b in self.busy_s],
            "meets_slo": bool(done) and percentile(ttft, 99) <= slo.ttft_s and
            (not tpot or percentile(tpot, 99) <= slo.tpot_s) and not any(r.rejected for r in self.records),
            "simulated_s": span, "wall_s": self.wall_s,
        }

    def cost(self, price_per_replica_hour: float) -> dict[str, float]:
        """Cost per million input and output tokens at this utilisation: the replicas' hours over the span,
        split between prompt and output by the busy time each took (idle time shared in the same ratio)."""
        dollars = price_per_replica_hour * self.replicas * self.span_s / 3600
        busy = sum(self.busy_s)
        share_in = self.prefill_s / busy if busy else 0.5
        done = [r for r in self.records if r.end_t is not None]
        tokens_in = sum(r.arrival.prompt_tokens for r in done)
        tokens_out = sum(r.tokens for r in done)
        return {"dollars": dollars,
                "per_million_input_tokens": dollars * share_in / tokens_in * 1e6 if tokens_in else math.nan,
                "per_million_output_tokens": dollars * (1 - share_in) / tokens_out * 1e6 if tokens_out else math.nan}


def simulate(arrivals: Sequence[Arrival], *, config: EngineConfig, arch: Any, model: StepSeconds,
             replicas: int = 1, limits: Limits = Limits(), routing: str = "round-robin",
             policy_params: PolicyParams = PolicyParams(), num_blocks: int | None = None,
             prefix_index_blocks: int = 16384, on_progress: Callable[[float], None] | None = None) -> SimResult:
    """Run `arrivals` (sorted by t) through `replicas` simulated replicas; every request completes or is
    rejected (429)."""
    import time

    wall0 = time.perf_counter()
    reps = [_Replica(i, config, arch, model, num_blocks, prefix_index_blocks) for i in range(replicas)]
    records = [RequestRecord(a) for a in arrivals]
    by_id: dict[str, RequestRecord] = {}
    timeline: list[tuple[float, int, int]] = []
    i, n, seq = 0, len(arrivals), 0
    vocab = arch.vocab_size
    while True:
        busy = [r for r in reps if r.engine.has_unfinished()]
        next_step = min(busy, key=lambda r: r.now) if busy else None
        if i < n and (next_step is None or arrivals[i].t <= next_step.now):
            a, rec = arrivals[i], records[i]
            ids = prompt_ids(a, i, vocab)
            hashes = block_hashes(ids, config.block_size) if routing in ("prefix-aware", "kv-aware") else ()
            views = [r.view(r.prefixes.match(hashes) * config.block_size if hashes else 0) for r in reps]
            feat = RequestFeatures(a.prompt_tokens, a.output_tokens, hashes, seq, hash((seq, 7)) & 0xFFFF)
            seq += 1
            target = reps[int(route(routing, feat, views, policy_params).replica)] if replicas > 1 else reps[0]
            rec.replica = target.index
            if (len(target.queued) + 1 > limits.max_queued_requests
                    or sum(target.queued.values()) + a.prompt_tokens > limits.max_queued_tokens):
                rec.rejected = True
            else:
                target.now = max(target.now, a.t)  # an idle replica wakes at the arrival
                rid = f"sim-{i}"
                target.engine.add_request(ids, SamplingParams(max_tokens=a.output_tokens, ignore_eos=True),
                                          request_id=rid, priority=a.priority, arrival_time=a.t, tenant=a.tenant)
                target.queued[rid] = a.prompt_tokens
                target.outstanding[rid] = a.prompt_tokens + a.output_tokens
                if hashes:
                    target.prefixes.insert(hashes)
                by_id[rid] = rec
            i += 1
            continue
        if next_step is None:
            break
        r = next_step
        for u in r.engine.step():
            rec = by_id[u.request_id]
            if u.new_token_ids:
                if rec.first_t is None:
                    rec.first_t = r.now
                    r.queued.pop(u.request_id, None)
                    r.outstanding[u.request_id] -= rec.arrival.prompt_tokens
                rec.tokens += len(u.new_token_ids)
                r.outstanding[u.request_id] -= len(u.new_token_ids)
            if u.finish_reason is not None:
                rec.end_t = r.now
                r.queued.pop(u.request_id, None)
                r.outstanding.pop(u.request_id, None)
        stats = [x.engine.stats() for x in reps]
        timeline.append((r.now, sum(s.num_waiting for s in stats), sum(s.num_running for s in stats)))
        if on_progress is not None and len(timeline) % 256 == 0:
            on_progress(r.now)
    span = max([r.now for r in reps] + [a.t for a in arrivals[-1:]] + [0.0])
    return SimResult(records, replicas, span, [r.busy_s for r in reps], sum(r.prefill_s for r in reps), timeline,
                     time.perf_counter() - wall0)


def find_replicas(run: Callable[[int], SimResult], slo: Slo, max_replicas: int = 64) -> tuple[int, list[SimResult]]:
    """The fewest replicas whose simulation meets the SLO (doubling, then bisecting); every run made."""
    tried: dict[int, SimResult] = {}

    def ok(k: int) -> bool:
        if k not in tried:
            tried[k] = run(k)
        return tried[k].summary(slo)["meets_slo"]

    hi = 1
    while not ok(hi):
        if hi >= max_replicas:
            return -1, [tried[k] for k in sorted(tried)]
        hi = min(hi * 2, max_replicas)
    lo = max(hi // 2, 0)  # lo fails (or is 0), hi meets
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi, [tried[k] for k in sorted(tried)]
