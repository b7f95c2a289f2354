"""When to add or remove replicas: a pure function over a window of load observations.

Pressures, each the ratio of what is observed to its target (1.0 = exactly at target):
  queue      requests waiting (in the replicas' queues and in the router) per replica / `queue`
  kv         mean KV cache use of the replicas / `kv`
  ttft       p90 time to first token of recent requests (as the router saw it, cold starts included) / `target`
  predicted  (--autoscale-signal predicted) replicas the planner says the recent demand needs to hold
             `target` / replicas: it rises with the arrival rate, before any queue or TTFT shows the overload
The pressure of an observation is the largest of them.

  * Up fast: when every observation of the last `up_delay` seconds is above 1 + `tolerance`, grow to
    ceil(replicas x smallest pressure in that window) (at least one more), capped at `max`; not again
    while replicas added before are still starting.
  * Down slow: when every observation of the last `down_delay` seconds is below `low` (a band well under 1,
    the hysteresis) and the load would stay under it on one replica fewer, remove one replica.
  * Nothing changes within `up_delay` / `down_delay` of the last change, and a decision only looks at
    observations made after it, so a replica's own start-up cannot trigger another change.
  * Scale to zero (min = 0): no request anywhere, and no replica starting, for `idle` seconds. From zero, the first waiting request
    brings one replica back at once (its cold start shows up in TTFT).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

from tokenmill.errors import ConfigError


@dataclass(frozen=True)
class AutoscaleConfig:
    min: int = 1
    max: int = 4
    target: float = 2.0  # p90 TTFT target, seconds
    queue: float = 4.0  # waiting requests per replica at target
    kv: float = 0.8  # KV cache use at target
    tolerance: float = 0.1  # pressure above 1 + tolerance counts as overload
    low: float = 0.5  # pressure below this counts as idle capacity (hysteresis band: low .. 1 + tolerance)
    up_delay: float = 2.0  # seconds of overload before scaling up
    down_delay: float = 30.0  # seconds of low load before removing one replica
    idle: float = 60.0  # seconds without any request before scaling to zero (only when min == 0)

    def __post_init__(self) -> None:
        if self.min < 0 or self.max < 1 or self.min > self.max:
            raise ConfigError(f"autoscale needs 0 <= min <= max and max >= 1 (got min={self.min}, max={self.max})")
        for name in ("target", "queue", "kv", "up_delay", "down_delay", "idle"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"autoscale {name} must be > 0")
        if not 0 < self.low < 1 or self.tolerance < 0:
            raise ConfigError("autoscale low must be in (0, 1) and tolerance >= 0")

    @classmethod
    def parse(cls, spec: str) -> AutoscaleConfig:
        """'min=1,max=4,target=1.5' (any field, key=value, comma separated) -> AutoscaleConfig."""
        types = {f.name: (int if f.type in ("int", int) else float) for f in fields(cls)}
        kwargs = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, sep, value = part.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in types:
                raise ConfigError(f"cannot read autoscale option {part!r}; use key=value with keys "
                                  f"{', '.join(types)}")
            try:
                kwargs[key] = types[key](value)
            except ValueError:
                raise ConfigError(f"autoscale {key} must be a number, got {value!r}") from None
        return cls(**kwargs)


@dataclass(frozen=True, slots=True)
class Observation:
    """The replica set's load at one moment (only replicas that take requests: not starting, not draining)."""

    t: float  # monotonic seconds
    replicas: int  # replicas counted by the decision: ready ones plus those starting
    starting: int = 0  # of those, how many are not ready yet
    waiting: int = 0  # requests waiting: replicas' queues plus the router's own (no replica free / none ready)
    inflight: int = 0  # requests the router has accepted and not yet seen finish
    kv_usage: float = 0.0  # mean over ready replicas, 0..1
    ttft_p90: float | None = None  # over requests whose first token came since the last observation
    needed: int | None = None  # replicas the planner predicts the recent demand needs (predicted signal)


@dataclass(frozen=True, slots=True)
class Decision:
    replicas: int  # the target count
    reason: str  # why (for the log and the scale-event metric)


def pressure(obs: Observation, cfg: AutoscaleConfig) -> float:
    """Largest of queue, KV and TTFT pressure (1.0 = at target). With no replica, any waiting work is infinite."""
    if obs.replicas <= 0:
        return math.inf if obs.waiting or obs.inflight else 0.0
    p = max(obs.waiting / (obs.replicas * cfg.queue), obs.kv_usage / cfg.kv)
    if obs.ttft_p90 is not None:
        p = max(p, obs.ttft_p90 / cfg.target)
    if obs.needed is not None:
        p = max(p, obs.needed / obs.replicas)
    return p


def decide(window: Sequence[Observation], current: int, last_change: float, cfg: AutoscaleConfig) -> Decision:
    """The replica count to aim for, given observations (oldest first), the current count (ready + starting)
    and when the count last changed. Returns `current` when nothing should change."""
    if not window:
        return Decision(current, "no observations")
    now = window[-1].t
    if current < cfg.min:
        return Decision(cfg.min, f"below min={cfg.min}")
    if current > cfg.max:
        return Decision(cfg.max, f"above max={cfg.max}")
    latest = window[-1]
    if current == 0:
        if latest.waiting or latest.inflight:
            return Decision(1, "scale from zero: a request is waiting")
        return Decision(0, "idle at zero")

    since_change = [o for o in window if o.t >= last_change]

    # Up fast.
    recent = _span(since_change, now, cfg.up_delay)
    if recent is not None:
        lowest = min(pressure(o, cfg) for o in recent)
        # One step at a time: while added replicas are still starting, their capacity is not in the numbers.
        if lowest > 1 + cfg.tolerance and current < cfg.max and latest.starting == 0:
            want = min(cfg.max, max(current + 1, math.ceil(current * lowest)))
            return Decision(want, f"overloaded for {cfg.up_delay:g}s (pressure {_fmt(lowest)})")

    # Scale to zero after a long idle spell.
    if cfg.min == 0:
        idle = _span(since_change, now, cfg.idle)
        # (Ready replicas only: a replica still starting has not had its chance to be used.)
        if idle is not None and all(o.waiting == 0 and o.inflight == 0 and o.starting == 0 for o in idle):
            return Decision(0, f"no requests for {cfg.idle:g}s")

    # Down slow, one at a time, only if one replica fewer would still be under the band.
    if current > max(cfg.min, 1):
        calm = _span(since_change, now, cfg.down_delay)
        if calm is not None:
            highest = max(pressure(o, cfg) for o in calm)
            # Queue pressure grows as replicas shrink; KV and TTFT roughly so. Project all of it.
            if highest * current / (current - 1) < cfg.low + (1 - cfg.low) / 2 and highest < cfg.low:
                return Decision(current - 1, f"under-used for {cfg.down_delay:g}s (pressure {_fmt(highest)})")
    return Decision(current, "within band")


def _span(window: Sequence[Observation], now: float, seconds: float) -> list[Observation] | None:
    """The observations of the last `seconds`, or None when the window does not yet cover that long."""
    if not window or now - window[0].t < seconds:
        return None
    return [o for o in window if o.t >= now - seconds]


def _fmt(p: float) -> str:
    return "inf" if math.isinf(p) else f"{p:.2f}"
