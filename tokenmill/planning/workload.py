"""Demand for the planner: request arrivals with their sizes, from a rate (Poisson, with optional bursts) or
from a CSV trace. The same arrivals drive the simulator and, in validation, the real server."""

from __future__ import annotations

import csv
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenmill.bench.overload import percentile
from tokenmill.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Arrival:
    t: float  # seconds from the start
    prompt_tokens: int
    output_tokens: int
    tenant: str = "default"
    priority: int = 0
    prefix_group: int = -1  # requests of one group share their first prefix_tokens tokens (-1: none)
    prefix_tokens: int = 0


def prompt_ids(a: Arrival, index: int, vocab: int) -> list[int]:
    """Token ids for an arrival: a group's shared prefix, then ids unique to this request (no accidental
    prefix-cache hits), all ordinary tokens (>= 100)."""
    span = max(1000, vocab - 200)
    shared = min(a.prefix_tokens, a.prompt_tokens) if a.prefix_group >= 0 else 0
    ids = [100 + (a.prefix_group * 7919 + j * 31 + 17) % span for j in range(shared)]
    ids += [100 + (index * 104729 + j * 7919 + 11) % span for j in range(a.prompt_tokens - shared)]
    return ids


@dataclass(frozen=True)
class Sizes:
    """Prompt and output lengths: uniform in [mean * (1 - spread), mean * (1 + spread)]."""

    prompt_tokens: int = 128
    output_tokens: int = 128
    spread: float = 0.0

    def draw(self, rng: random.Random) -> tuple[int, int]:
        def one(mean: int) -> int:
            return max(1, round(mean * (1 + self.spread * (2 * rng.random() - 1))))

        return one(self.prompt_tokens), one(self.output_tokens)


def poisson(rate: float | Sequence[tuple[float, float]], duration: float, sizes: Sizes, seed: int = 0,
            tenant: str = "default") -> list[Arrival]:
    """Arrivals of a Poisson process over [0, duration). rate: requests/s, or a piecewise-constant curve
    [(from_t, rate), ...] (thinning against its peak)."""
    rng = random.Random(seed)
    curve = [(0.0, float(rate))] if isinstance(rate, int | float) else sorted((float(t), float(r)) for t, r in rate)
    peak = max(r for _, r in curve)
    if peak <= 0:
        return []
    out: list[Arrival] = []
    t = 0.0
    while True:
        t += rng.expovariate(peak)
        if t >= duration:
            return out
        r = next(r for start, r in reversed(curve) if start <= t) if t >= curve[0][0] else 0.0
        if rng.random() < r / peak:
            p, o = sizes.draw(rng)
            out.append(Arrival(t, p, o, tenant))


def burst(base: list[Arrival], at: float, count: int, sizes: Sizes, seed: int = 1, span: float = 1.0,
          tenant: str = "burst") -> list[Arrival]:
    """`count` extra arrivals spread over [at, at + span)."""
    rng = random.Random(seed)
    extra = [Arrival(at + span * rng.random(), *sizes.draw(rng), tenant) for _ in range(count)]
    return sorted(base + extra, key=lambda a: a.t)


def load_trace(path: str | Path, sizes: Sizes, seed: int = 0) -> list[Arrival]:
    """A CSV trace, one of two kinds by its header:
    - per request: `t,prompt_tokens,output_tokens[,tenant,priority,prefix_group,prefix_tokens]`;
    - a demand curve: `t,rate` (requests/s from t on), turned into Poisson arrivals of `sizes`, ending at the
      last row's t (give a final row with the end time)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise ConfigError(f"cannot read the trace {path}: {e}") from None
    if not rows:
        raise ConfigError(f"the trace {path} has no rows")
    cols = set(rows[0])
    try:
        if {"t", "rate"} <= cols:
            curve = [(float(r["t"]), float(r["rate"])) for r in rows]
            return poisson(curve, curve[-1][0], sizes, seed)
        if {"t", "prompt_tokens", "output_tokens"} <= cols:
            return sorted((Arrival(float(r["t"]), int(r["prompt_tokens"]), int(r["output_tokens"]),
                                   r.get("tenant") or "default", int(r.get("priority") or 0),
                                   int(r.get("prefix_group") or -1), int(r.get("prefix_tokens") or 0))
                           for r in rows), key=lambda a: a.t)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"bad value in the trace {path}: {e}") from None
    raise ConfigError(f"the trace {path} needs columns t,rate or t,prompt_tokens,output_tokens; got "
                      f"{', '.join(sorted(cols))}")


def save_trace(arrivals: Sequence[Arrival], path: str | Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t", "prompt_tokens", "output_tokens", "tenant", "priority", "prefix_group", "prefix_tokens"])
        for a in arrivals:
            w.writerow([f"{a.t:.6f}", a.prompt_tokens, a.output_tokens, a.tenant, a.priority, a.prefix_group,
                        a.prefix_tokens])


def replay(url: str, arrivals: Sequence[Arrival], vocab: int, headers: dict[str, str] | None = None,
           run: int = 0) -> list[Any]:
    """Send `arrivals` to a real server at their times (open loop), as token-id prompts of exactly their
    lengths, streamed; the bench harness's outcomes (status, ttft, token times) in arrival order. `run` makes
    the prompts of a repeated replay differ, so a second run finds nothing of the first in the prefix cache."""
    import asyncio

    from tokenmill.bench import overload

    reqs = [overload.Arrival(a.t, a.tenant, a.tenant, {
        "prompt": prompt_ids(a, i + run * 1_000_003, vocab), "max_tokens": a.output_tokens, "ignore_eos": True, "temperature": 0.0,
        "stream": True, "logprobs": 0, "priority": a.priority, "user": a.tenant}) for i, a in enumerate(arrivals)]
    return asyncio.run(overload.run_open_loop(url, reqs, headers))


def measured(outcomes: Sequence[Any]) -> dict[str, Any]:
    """Replay outcomes summarised as the simulator summarises (TTFT, TPOT, e2e percentiles in seconds)."""
    ok = [o for o in outcomes if o.status == "ok"]
    tpot = [(o.token_times[-1] - o.token_times[0]) / (o.tokens - 1) for o in ok if o.tokens > 1]

    return {"requests": len(outcomes), "completed": len(ok),
            "rejected_429": sum(o.status == "rejected" for o in outcomes),
            "ttft_s": percentiles([o.ttft for o in ok]), "tpot_s": percentiles(tpot),
            "e2e_s": percentiles([o.done - o.sent for o in ok])}


def percentiles(xs: Sequence[float]) -> dict[str, float]:
    return {"p50": percentile(xs, 50), "p90": percentile(xs, 90), "p99": percentile(xs, 99)}
