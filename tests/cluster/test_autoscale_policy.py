"""The autoscaler's decision function: unit cases, then a simulated replica set driven by a demand trace
(ramp up, burst, ramp down, silence) to show the count follows demand without flapping. Pure; milliseconds."""

import math
import random

import pytest

from tokenmill.cluster.autoscale_policy import AutoscaleConfig, Observation, decide, pressure
from tokenmill.errors import ConfigError

CFG = AutoscaleConfig(min=1, max=6, target=2.0, queue=4, kv=0.8, up_delay=2, down_delay=20, idle=30)


def _steady(current: int, seconds: float, step: float = 0.5, **load) -> list[Observation]:
    return [Observation(t=i * step, replicas=current, **load) for i in range(int(seconds / step) + 1)]


def test_parse_reads_every_key_and_rejects_nonsense():
    cfg = AutoscaleConfig.parse("min=0, max=8,target=1.5,queue=2,kv=0.7,up-delay=1,down_delay=10,idle=5")
    assert (cfg.min, cfg.max, cfg.target, cfg.queue, cfg.kv, cfg.up_delay, cfg.down_delay, cfg.idle) == \
        (0, 8, 1.5, 2, 0.7, 1, 10, 5)
    assert isinstance(cfg.min, int) and isinstance(cfg.target, float)
    for bad, match in [("min=3,max=2", "min <= max"), ("max", "key=value"), ("speed=3", "keys"),
                       ("max=two", "number"), ("target=0", "target"), ("low=1.5", "low")]:
        with pytest.raises(ConfigError, match=match):
            AutoscaleConfig.parse(bad)


def test_pressure_is_the_worst_of_queue_kv_and_ttft():
    assert pressure(Observation(0, replicas=2, waiting=4), CFG) == pytest.approx(0.5)
    assert pressure(Observation(0, replicas=2, waiting=4, kv_usage=0.8), CFG) == pytest.approx(1.0)
    assert pressure(Observation(0, replicas=2, waiting=0, ttft_p90=5.0), CFG) == pytest.approx(2.5)
    assert pressure(Observation(0, replicas=0, waiting=1), CFG) == math.inf
    assert pressure(Observation(0, replicas=0), CFG) == 0


def test_scale_up_needs_sustained_overload_then_jumps_in_proportion():
    window = _steady(2, 1.5, waiting=24)  # pressure 3 but only 1.5 s of it
    assert decide(window, 2, 0.0, CFG).replicas == 2
    window = _steady(2, 2.5, waiting=24)
    assert decide(window, 2, 0.0, CFG).replicas == 6  # ceil(2 x 3)
    window = _steady(2, 2.5, waiting=100)
    assert decide(window, 2, 0.0, CFG).replicas == CFG.max


def test_one_spike_does_not_scale_up():
    window = _steady(2, 3, waiting=0)
    window[-2] = Observation(window[-2].t, 2, waiting=50, ttft_p90=30)
    assert decide(window, 2, 0.0, CFG).replicas == 2


def test_no_second_step_while_added_replicas_are_starting():
    window = [Observation(t=i * 0.5, replicas=4, starting=2, waiting=40) for i in range(10)]
    assert decide(window, 4, 0.0, CFG).replicas == 4


def test_scale_down_is_slow_one_at_a_time_and_leaves_headroom():
    assert decide(_steady(4, 10, waiting=0), 4, 0.0, CFG).replicas == 4  # 10 s < down_delay
    assert decide(_steady(4, 21, waiting=0), 4, 0.0, CFG).replicas == 3
    # Under `low` now, but 2 replicas at pressure 0.45 would be 0.9 on one, too near overload -> stays.
    assert decide(_steady(2, 21, waiting=0, kv_usage=0.36), 2, 0.0, CFG).replicas == 2
    assert decide(_steady(3, 21, waiting=0, kv_usage=0.36), 3, 0.0, CFG).replicas == 2  # 0.675 on two: fine
    assert decide(_steady(1, 60, waiting=0), 1, 0.0, CFG).replicas == 1  # never below min


def test_only_observations_after_the_last_change_count():
    window = _steady(4, 40, waiting=0)
    assert decide(window, 4, last_change=window[-1].t - 5, cfg=CFG).replicas == 4


def test_scale_to_zero_and_back():
    cfg = AutoscaleConfig(min=0, max=4, idle=30, down_delay=20)
    assert decide(_steady(1, 31, waiting=0, inflight=0), 1, 0.0, cfg).replicas == 0
    busy_once = _steady(1, 31)
    busy_once[5] = Observation(busy_once[5].t, 1, inflight=1)
    assert decide(busy_once, 1, 0.0, cfg).replicas == 1
    booting = [Observation(t=i * 0.5, replicas=1, starting=1) for i in range(70)]
    assert decide(booting, 1, 0.0, cfg).replicas == 1  # a replica still starting is not idle
    assert decide([Observation(0, replicas=0, waiting=1)], 0, 0.0, cfg).replicas == 1  # at once
    assert decide([Observation(0, replicas=0)], 0, 0.0, cfg).replicas == 0
    # min > 0 never scales to zero.
    assert decide(_steady(1, 200), 1, 0.0, CFG).replicas == 1


class SimulatedFleet:
    """Replicas that each run up to `slots` requests of `service` seconds; a router queue in front."""

    def __init__(self, cfg: AutoscaleConfig, slots: int = 4, service: float = 1.0, startup: float = 3.0):
        self.cfg, self.slots, self.service, self.startup = cfg, slots, service, startup
        self.ready: list[list[float]] = [[] for _ in range(cfg.min)]  # per replica: finish times
        self.starting: list[float] = []  # ready-at times
        self.draining: list[list[float]] = []
        self.queue: list[float] = []  # arrival times
        self.window: list[Observation] = []
        self.last_change = 0.0
        self.changes: list[tuple[float, int]] = []
        self.dropped = 0

    def step(self, now: float, arrivals: int, dt: float) -> None:
        self.queue += [now] * arrivals
        for r in self.ready + self.draining:
            r[:] = [f for f in r if f > now]
        self.draining = [r for r in self.draining if r]  # a drained replica leaves once empty
        for at in [s for s in self.starting if s <= now]:
            self.starting.remove(at)
            self.ready.append([])
        ttfts = []
        for r in sorted(self.ready, key=len):
            while self.queue and len(r) < self.slots:
                ttfts.append(now - self.queue.pop(0) + 0.1)
                r.append(now + self.service)
        n = len(self.ready) + len(self.starting)
        obs = Observation(now, n, len(self.starting), len(self.queue),
                          sum(map(len, self.ready)) + len(self.queue),
                          sum(len(r) for r in self.ready) / (self.slots * len(self.ready)) if self.ready else 0.0,
                          sorted(ttfts)[int(0.9 * (len(ttfts) - 1))] if ttfts else None)
        self.window = [o for o in self.window if o.t > now - 120] + [obs]
        d = decide(self.window, n, self.last_change, self.cfg)
        if d.replicas != n:
            self.changes.append((now, d.replicas))
            self.last_change = now
            for _ in range(d.replicas - n):
                self.starting.append(now + self.startup)
            for _ in range(n - d.replicas):  # drain the least busy: it takes no new work, finishes the rest
                if self.starting:
                    self.starting.pop()
                else:
                    victim = min(self.ready, key=len)
                    self.ready.remove(victim)
                    self.draining.append(victim)

    @property
    def count(self) -> int:
        return len(self.ready) + len(self.starting)


def _trace(t: float) -> float:
    """Requests per second: idle-ish, ramp up, burst, ramp down, quiet."""
    if t < 20:
        return 2
    if t < 60:
        return 2 + (t - 20) * 0.35  # to 16/s
    if t < 70:
        return 20  # burst
    if t < 110:
        return 16 - (t - 70) * 0.35  # down to 2/s
    return 1


def test_replica_count_follows_a_demand_trace_without_flapping():
    cfg = AutoscaleConfig(min=1, max=8, target=1.5, queue=4, kv=0.9, up_delay=2, down_delay=15)
    fleet = SimulatedFleet(cfg)
    rng = random.Random(0)
    dt, carry, counts = 0.5, 0.0, {}
    for i in range(int(220 / dt)):
        t = i * dt
        carry += _trace(t) * dt
        n = int(carry)
        carry -= n
        # Arrivals jitter a little around the trace.
        n = max(0, n + rng.choice((-1, 0, 0, 1)))
        fleet.step(t, n, dt)
        counts[t] = fleet.count
    capacity = fleet.slots / fleet.service  # requests per second per replica
    # Follows demand: enough replicas during the burst, back to min after the quiet spell.
    assert max(counts[t] for t in counts if 62 <= t < 70) >= math.ceil(20 / capacity)
    assert counts[max(counts)] == cfg.min
    assert counts[15.0] == cfg.min  # no scale-up at the calm start
    # No flapping: ups only while demand rises, downs only once it falls, and few changes in all.
    directions = []
    prev = cfg.min
    for t, n in fleet.changes:
        directions.append((t, "up" if n > prev else "down"))
        prev = n
    last_up = max(t for t, d in directions if d == "up")
    first_down = min(t for t, d in directions if d == "down")
    assert last_up < first_down, directions
    assert len(fleet.changes) <= 14, fleet.changes
    # Scale-down gaps respect down_delay.
    downs = [t for t, d in directions if d == "down"]
    assert all(b - a >= cfg.down_delay for a, b in zip(downs, downs[1:], strict=False)), downs
    # Queue never left to grow without bound: everything that arrived got served by the end.
    assert not fleet.queue
