"""The planner's discrete-event simulation: the real serving logic on a virtual clock.

Each replica is the real EngineCore (token-budget scheduler, scheduling policy, KV block pool with its prefix
cache, preemption) over a MockRunner whose step takes the profiled time (tokenmill.engine.step_time) on a
clock that jumps instead of sleeping (each step stretched as the profile's measured steps strayed from the
fit, in runs as they came, seeded: StepNoise). In front of the replicas: the server's admission caps (429 past
--max-queued-requests / --max-queued-tokens) and the router's policy (tokenmill.cluster.policy.route with its
prefix index). No torch, no sockets: a simulated hour takes seconds.

Events are processed in time order: a request the client sends at time T reaches the server after its way in
(a profiled request's, drawn for the requests then in flight), is routed and admitted then, and joins its
replica's next step; the client has each token its way out after the engine made it. Each replica runs its
steps back to back while it has work. A step in flight polls for arrivals as the server's engine loop does
(EngineCore.step(poll), at the runner's check points in its first half): one due by then joins the scheduler
at once, and under --interruptible-steps the step is abandoned and redone for it
when the policy ranks it above the step's work. An arrival is taken mid-step only when no other event (another
replica's step, an autoscaler tick, a replica coming up) falls before it, so every decision still sees the
state at its own time; otherwise it waits for its turn, as before.
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenmill.cluster.autoscale_policy import AutoscaleConfig, Observation, decide
from tokenmill.cluster.policy import (
    PolicyParams,
    PrefixIndex,
    ReplicaView,
    RequestFeatures,
    block_hashes,
    route,
)
from tokenmill.config import EngineConfig
from tokenmill.engine.step_time import StepNoise, StepTimeModel
from tokenmill.planning.workload import Arrival, percentile, percentiles, prompt_ids
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.admission import (
    PRIORITY_ORDERED,
    ArrivalMeter,
    DrainMeter,
    QueuedWork,
    predict_wait,
    work_ahead,
)
from tokenmill.server.admission import decide as admission_decide
from tokenmill.server.mock_engine import StepSeconds, mock_core


@dataclass(frozen=True)
class Limits:
    """The server's admission caps (ServerConfig) the simulation applies per replica."""

    max_queued_requests: int = 256
    max_queued_tokens: int = 262144
    max_queue_delay: float | None = None  # --max-queue-delay: 429 when the predicted wait exceeds it


@dataclass(frozen=True)
class Slo:
    ttft_s: float = math.inf  # p99 target
    tpot_s: float = math.inf  # p99 target


@dataclass
class RequestRecord:
    arrival: Arrival  # its t: when the client sends it
    in_s: float = 0.0  # its way to the server: the server takes it at arrival.t + in_s
    out_s: float = 0.0  # each token's way from the engine back to the client
    replica: int | None = None
    rejected: bool = False
    first_t: float | None = None  # the engine's first token (the client has it out_s later)
    end_t: float | None = None
    tokens: int = 0

    @property
    def ttft(self) -> float | None:
        """As the client measures it: from sending to having the first token."""
        return None if self.first_t is None else self.first_t + self.out_s - self.arrival.t

    @property
    def e2e(self) -> float | None:
        return None if self.end_t is None else self.end_t + self.out_s - self.arrival.t

    @property
    def tpot(self) -> float | None:
        if self.end_t is None or self.first_t is None or self.tokens < 2:
            return None
        return (self.end_t - self.first_t) / (self.tokens - 1)


class _Replica:
    def __init__(self, index: int, config: EngineConfig, arch: Any, model: StepSeconds, num_blocks: int | None,
                 prefix_index_blocks: int, born: float = 0.0, ready_at: float = 0.0):
        self.index = index
        self.now = ready_at
        self.born = born  # when it was asked for (its cost starts), ready_at when it takes requests
        self.ready_at = ready_at
        self.gone_at: float | None = None  # removed after draining
        self.draining = False
        self.busy_s = 0.0
        self.prefill_s = 0.0  # busy time attributed to prompt rows (for the cost split)
        self.engine = mock_core(config, arch, _Attributing(model, self), num_blocks=num_blocks,
                                sleep=self._advance, clock=lambda: self.now)
        self.queued: dict[str, int] = {}  # admitted, no first token yet: request id -> prompt tokens
        # The frontend's predictive admission, fed as the frontend feeds it (tokenmill/server/admission.py).
        self.queued_work: dict[str, QueuedWork] = {}
        self.drain = DrainMeter()
        self.arrived = ArrivalMeter()
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
    replica_s: float = 0.0  # replica-seconds paid for (each replica from asked-for to removed)
    scale_events: list[dict[str, Any]] = field(default_factory=list)  # autoscaling: t, from, to, reason

    def summary(self, slo: Slo = Slo()) -> dict[str, Any]:
        done = [r for r in self.records if r.end_t is not None]
        ttft = [r.ttft for r in done if r.ttft is not None]
        tpot = [r.tpot for r in done if r.tpot is not None]
        e2e = [r.e2e for r in done]
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
            "replica_hours": self.replica_s / 3600, "scale_events": len(self.scale_events),
            "meets_slo": bool(done) and percentile(ttft, 99) <= slo.ttft_s and
            (not tpot or percentile(tpot, 99) <= slo.tpot_s) and not any(r.rejected for r in self.records),
            "simulated_s": span, "wall_s": self.wall_s,
        }

    def cost(self, price_per_replica_hour: float) -> dict[str, float]:
        """Cost per million input and output tokens at this utilisation: the replicas' hours over the span,
        split between prompt and output by the busy time each took (idle time shared in the same ratio)."""
        dollars = price_per_replica_hour * self.replica_s / 3600
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
             prefix_index_blocks: int = 16384, autoscale: AutoscaleConfig | None = None,
             autoscale_interval: float = 1.0, cold_start_s: float = 10.0, step_noise: bool = True,
             noise_runs: bool = True, path_latency: bool = True, seed: int = 0) -> SimResult:
    """Run `arrivals` (sorted by t) through `replicas` simulated replicas; every request completes or is
    rejected (429). With `autoscale`, `replicas` is the starting count and the router's autoscaler decision
    function (tokenmill.cluster.autoscale_policy.decide) runs every `autoscale_interval` seconds on what the
    replicas report; a replica it adds takes requests `cold_start_s` later, one it removes drains first.
    A profile that kept its steps' spread (StepTimeModel.noise) steps each replica in a time drawn from it,
    seeded by `seed` and the replica's index, unless `step_noise` is off: then every step takes its fitted time.
    The stretches come in runs as the profiled steps' did (StepTimeModel.noise_trace), or with `noise_runs`
    off each step's independently.
    A profile that kept its requests' way outside the engine (StepTimeModel.path) delays each request's arrival
    at the server and its tokens' at the client by a pair drawn from the profiled requests sent with about as
    many in flight (seeded; the bin's median when `step_noise` is off), so TTFT and e2e are the client's;
    `path_latency` off leaves them the server's."""
    return _Simulation(arrivals, config, arch, model, replicas, limits, routing, policy_params, num_blocks,
                       prefix_index_blocks, autoscale, autoscale_interval, cold_start_s, step_noise, noise_runs,
                       path_latency, seed).run()


PATH_BIN_REQUESTS = 40  # at least this many profiled requests to a bin of the path model, at most PATH_BINS
PATH_BINS = 4


def path_bins(path: Sequence[Sequence[float]]) -> list[list[Sequence[float]]]:
    """A profile's request paths ([in, out, in flight]) in up to PATH_BINS equal-count bins by requests in
    flight, each of at least PATH_BIN_REQUESTS (fewer bins when there are fewer requests)."""
    by_load = sorted(path, key=lambda p: p[2])
    n = max(1, min(PATH_BINS, len(by_load) // PATH_BIN_REQUESTS))
    return [by_load[b * len(by_load) // n:(b + 1) * len(by_load) // n] for b in range(n)] if by_load else []


class _Paths:
    """Each request's (in, out) seconds outside the engine, from the profile's measured requests
    (StepTimeModel.path: [in, out, requests in flight when it was sent]). The way grows with the streams the
    frontend and the client serve at once, so the profiled requests are binned by that count (equal-count
    bins) and a request draws from the bin of the count at its own sending: seeded, or the bin's median."""

    def __init__(self, model: StepSeconds, drawn: bool, seed: int):
        self.bins = path_bins(getattr(model, "path", None) or [])
        self.lows = [b[0][2] for b in self.bins]
        self.medians = [sorted(b, key=lambda p: p[0] + p[1])[len(b) // 2] for b in self.bins]
        self.rng = random.Random(seed * 7_919 + 1) if drawn else None

    def draw(self, in_flight: int) -> tuple[float, float]:
        if not self.bins:
            return 0.0, 0.0
        b = max(0, bisect.bisect_right(self.lows, in_flight) - 1)
        pair = self.bins[b][self.rng.randrange(len(self.bins[b]))] if self.rng else self.medians[b]
        return pair[0], pair[1]


class _Simulation:
    def __init__(self, arrivals, config, arch, model, replicas, limits, routing, policy_params, num_blocks,
                 prefix_index_blocks, autoscale, autoscale_interval, cold_start_s, step_noise, noise_runs,
                 path_latency, seed):
        self.arrivals, self.config, self.arch, self.model = arrivals, config, arch, model
        self.records = [RequestRecord(a) for a in arrivals]
        self.paths = _Paths(model if path_latency else None, step_noise, seed)
        self.in_flight = 0  # sent by the client, not yet finished or turned away
        self.incoming: list[tuple[float, int]] = []  # (when the server takes it, arrival index): on their way in
        self.step_noise, self.seed = step_noise and isinstance(model, StepTimeModel) and bool(model.noise), seed
        self.noise_runs = noise_runs
        self.limits, self.routing, self.params = limits, routing, policy_params
        self.num_blocks, self.index_blocks = num_blocks, prefix_index_blocks
        self.autoscale, self.interval, self.cold_start_s = autoscale, autoscale_interval, cold_start_s
        self.reps: list[_Replica] = []
        for _ in range(replicas):
            self.reps.append(self._new_replica(0.0, 0.0))
        self.now = 0.0  # the time of the event being handled
        self.by_id: dict[str, RequestRecord] = {}
        self.pending: list[int] = []  # arrivals waiting in the router for a replica to be ready
        self.timeline: list[tuple[float, int, int]] = []
        self.window: deque[Observation] = deque()
        self.last_change = 0.0
        self.ttfts: list[float] = []  # first tokens since the last autoscaler observation
        self.events: list[dict[str, Any]] = []
        self.seq = 0
        self.i = 0  # the next arrival to send
        self.next_tick = math.inf

    def _new_replica(self, born: float, ready_at: float) -> _Replica:
        index = len(self.reps)
        model = (StepNoise(self.model, self.seed * 1_000_003 + index, self.noise_runs) if self.step_noise
                 else self.model)
        return _Replica(index, self.config, self.arch, model, self.num_blocks, self.index_blocks, born, ready_at)

    def _routable(self, now: float) -> list[_Replica]:
        return [r for r in self.reps if not r.draining and r.gone_at is None and r.ready_at <= now]

    def run(self) -> SimResult:
        import time

        wall0 = time.perf_counter()
        n = len(self.arrivals)
        self.next_tick = self.interval if self.autoscale else math.inf
        while True:
            i, next_tick = self.i, self.next_tick
            live = [r for r in self.reps if r.gone_at is None]
            busy = [r for r in live if r.engine.has_unfinished()]
            step = min(busy, key=lambda r: r.now) if busy else None
            starting = [r.ready_at for r in live if r.ready_at > self.now and not r.draining]
            ready = min(starting, default=math.inf) if self.pending else math.inf
            t_send = self.arrivals[i].t if i < n else math.inf
            t_in = self.incoming[0][0] if self.incoming else math.inf
            t_step = step.now if step else math.inf
            if i >= n and not self.incoming and step is None and not self.pending:
                break
            t = min(t_send, t_in, t_step, next_tick, ready)
            if t == math.inf:
                break  # requests wait for a replica that nothing will start (no replicas, no autoscaler)
            self.now = max(self.now, t)
            if t == t_send:
                self._send(i)
            elif t == t_in:
                self.pending.append(heapq.heappop(self.incoming)[1])
                self._route_pending(t)
            elif t == ready:
                self._route_pending(t)
            elif t == next_tick:
                self._tick(t)
                self.next_tick += self.interval
            else:
                self._step(step)
        span = max([r.now for r in self.reps] + [a.t for a in self.arrivals[-1:]] + [0.0])
        replica_s = sum((r.gone_at if r.gone_at is not None else span) - r.born for r in self.reps)
        return SimResult(self.records, len(self.reps), span, [r.busy_s for r in self.reps],
                         sum(r.prefill_s for r in self.reps), self.timeline, time.perf_counter() - wall0,
                         max(replica_s, 0.0), self.events)

    def _send(self, k: int) -> None:
        """The client sends arrival k: it reaches the server after its way in, drawn for the requests in
        flight now."""
        self.i += 1
        self.in_flight += 1
        rec = self.records[k]
        rec.in_s, rec.out_s = self.paths.draw(self.in_flight)
        heapq.heappush(self.incoming, (rec.arrival.t + rec.in_s, k))

    def _next_event_t(self) -> float:
        """When the next send or arrival at the server happens."""
        t_send = self.arrivals[self.i].t if self.i < len(self.arrivals) else math.inf
        return min(t_send, self.incoming[0][0] if self.incoming else math.inf)

    def _route_pending(self, now: float) -> None:
        targets = self._routable(now)
        if not targets:
            return  # they wait in the router for a replica (scale from zero, or every one starting)
        for k in self.pending:
            self._admit(k, now, targets)
        self.pending.clear()

    def _admit(self, k: int, now: float, targets: list[_Replica]) -> None:
        a, rec = self.arrivals[k], self.records[k]
        ids = prompt_ids(a, k, self.arch.vocab_size)
        bs = self.config.block_size
        hashes = block_hashes(ids, bs) if self.routing in ("prefix-aware", "kv-aware") else ()
        if len(targets) == 1:
            target = targets[0]
        else:
            views = [r.view(r.prefixes.match(hashes) * bs if hashes else 0) for r in targets]
            feat = RequestFeatures(a.prompt_tokens, a.output_tokens, hashes, self.seq, hash((self.seq, 7)) & 0xFFFF)
            picked = route(self.routing, feat, views, self.params).replica
            target = next(r for r in targets if str(r.index) == picked)
        self.seq += 1
        rec.replica = target.index
        if (len(target.queued) + 1 > self.limits.max_queued_requests
                or sum(target.queued.values()) + a.prompt_tokens > self.limits.max_queued_tokens):
            rec.rejected = True
            self.in_flight -= 1
            return
        work = QueuedWork(a.priority, math.inf, a.tenant or "", a.prompt_tokens)
        if self.limits.max_queue_delay is not None:  # as the frontend: the same arithmetic on the same meters
            policy = self.config.scheduling_policy
            ahead = work_ahead(policy, target.queued_work.values(), work)
            overtaking = target.arrived.rate_above(now, a.priority) if policy in PRIORITY_ORDERED else 0.0
            if admission_decide(predict_wait(ahead, target.drain.rate, overtaking), None,
                                self.limits.max_queue_delay, nothing_ahead=ahead <= a.prompt_tokens) is not None:
                rec.rejected = True
                self.in_flight -= 1
                return
        target.arrived.observe(now, a.priority, a.prompt_tokens)
        target.now = max(target.now, now)  # an idle replica wakes at the arrival
        rid = f"sim-{k}"
        target.engine.add_request(ids, SamplingParams(max_tokens=a.output_tokens, ignore_eos=True),
                                  request_id=rid, priority=a.priority, arrival_time=a.t + rec.in_s, tenant=a.tenant)
        target.queued[rid] = a.prompt_tokens
        target.queued_work[rid] = work
        target.outstanding[rid] = a.prompt_tokens + a.output_tokens
        if hashes:
            target.prefixes.insert(hashes)
        self.by_id[rid] = rec

    def _poll(self, r: _Replica) -> bool:
        """While `r` steps (its clock inside the step): handle the arrivals due by now, if no other event comes
        before them. True when one was admitted (to any replica: the engine asks its policy about its own)."""
        before = len(r.queued)
        while not self.pending:
            t = self._next_event_t()
            others = [x.now for x in self.reps if x is not r and x.gone_at is None and x.engine.has_unfinished()]
            if t > r.now or t >= min(others, default=math.inf) or t >= self.next_tick or any(
                    self.now < x.ready_at <= t for x in self.reps if x.gone_at is None and not x.draining):
                break
            self.now = max(self.now, t)
            if self.incoming and self.incoming[0][0] == t:
                self.pending.append(heapq.heappop(self.incoming)[1])
                self._route_pending(t)
            else:
                self._send(self.i)
        return len(r.queued) > before

    def _step(self, r: _Replica) -> None:
        backlogged, drained = bool(r.queued), 0
        for u in r.engine.step(lambda: self._poll(r)):
            rec = self.by_id[u.request_id]
            if u.new_token_ids:
                if rec.first_t is None:
                    rec.first_t = r.now
                    self.ttfts.append(r.now - rec.arrival.t - rec.in_s)  # as the server measures it
                    drained += r.queued.pop(u.request_id, 0)
                    r.queued_work.pop(u.request_id, None)
                    r.outstanding[u.request_id] -= rec.arrival.prompt_tokens
                rec.tokens += len(u.new_token_ids)
                r.outstanding[u.request_id] -= len(u.new_token_ids)
            if u.finish_reason is not None:
                rec.end_t = r.now
                self.in_flight -= 1
                r.queued.pop(u.request_id, None)
                r.queued_work.pop(u.request_id, None)
                r.outstanding.pop(u.request_id, None)
        r.drain.observe(r.now, drained, backlogged)
        if r.draining and not r.engine.has_unfinished():
            r.gone_at = r.now
        stats = [x.engine.stats() for x in self.reps if x.gone_at is None]
        self.timeline.append((r.now, sum(s.num_waiting for s in stats) + len(self.pending),
                              sum(s.num_running for s in stats)))

    def _tick(self, now: float) -> None:
        """One autoscaler decision, on what the replicas would report at `now` (as the router's Autoscaler)."""
        cfg = self.autoscale
        counted = [r for r in self.reps if r.gone_at is None and not r.draining]
        ready = [r for r in counted if r.ready_at <= now]
        stats = [r.engine.stats() for r in ready]
        ttfts, self.ttfts = sorted(self.ttfts), []
        obs = Observation(t=now, replicas=len(counted), starting=len(counted) - len(ready),
                          waiting=sum(s.num_waiting for s in stats) + len(self.pending),
                          inflight=sum(len(r.outstanding) for r in ready) + len(self.pending),
                          kv_usage=sum(s.kv_cache_usage for s in stats) / len(stats) if stats else 0.0,
                          ttft_p90=ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))] if ttfts else None)
        self.window.append(obs)
        keep = max(cfg.up_delay, cfg.down_delay, cfg.idle) + 2 * self.interval
        while self.window and self.window[0].t < now - keep:
            self.window.popleft()
        d = decide(self.window, obs.replicas, self.last_change, cfg)
        if d.replicas == obs.replicas:
            return
        self.events.append({"t": now, "from": obs.replicas, "to": d.replicas, "reason": d.reason})
        self.last_change = now
        for _ in range(d.replicas - obs.replicas):
            self.reps.append(self._new_replica(now, now + self.cold_start_s))
        for _ in range(obs.replicas - d.replicas):  # the least loaded drains: no new requests, then gone
            victim = min(counted, key=lambda r: (r.ready_at <= now, len(r.outstanding)))
            counted.remove(victim)
            victim.draining = True
            if not victim.engine.has_unfinished():
                victim.gone_at = max(now, victim.now)


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
