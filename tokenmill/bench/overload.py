"""Open-loop overload scenarios against a running server: request classes and tenants, TTFT per request,
every outcome accounted for (completed, 429, timeout, other error), fairness arithmetic.

Used by the end-to-end scheduling tests and by benchmarks/overload.py. Talks HTTP only (httpx, streaming
completions with logprobs=0 so every token arrives as its own event), so it runs in any process.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

from tokenmill.gc_control import collector_paused


@dataclass
class Arrival:
    at: float  # seconds after the scenario starts
    cls: str  # label of the request's class ("high", "low", a tenant name, ...)
    tenant: str
    body: dict


@dataclass
class Outcome:
    cls: str
    tenant: str
    status: str  # "ok" | "rejected" (429) | "timeout" (408 or a timeout error event) | "error"
    sent: float  # time.monotonic()
    ttft: float | None = None
    done: float | None = None
    tokens: int = 0
    expected_tokens: int = 0
    http_status: int = 0
    retry_after: float | None = None
    message: str = ""
    token_times: list[float] = field(default_factory=list)
    response_id: str = ""  # the server's id for the request ("cmpl-..."), from its first event


def prompt_words(i: int, words: int) -> str:
    # Distinct prompts, so the prefix cache does not turn an overload test into a cache benchmark.
    return f"Request {i}: " + " ".join(f"w{(i * 7919 + k * 31) % 1009}" for k in range(words))


def completion_body(i: int, *, max_tokens: int, words: int = 12, **extra) -> dict:
    return {"prompt": prompt_words(i, words), "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0,
            "stream": True, "logprobs": 0, **extra}


async def send(client: httpx.AsyncClient, a: Arrival) -> Outcome:
    out = Outcome(a.cls, a.tenant, "error", time.monotonic(), expected_tokens=a.body["max_tokens"])
    try:
        async with client.stream("POST", "/v1/completions", json=a.body) as r:
            out.http_status = r.status_code
            if r.status_code != 200:
                body = json.loads(await r.aread())
                out.message = body.get("error", {}).get("message", "")
                if r.status_code == 429:
                    out.status = "rejected"
                    out.retry_after = float(r.headers.get("retry-after", "nan"))
                elif r.status_code == 408:
                    out.status = "timeout"
                out.done = time.monotonic()
                return out
            finished = None
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    out.status = "timeout" if ev["error"].get("type") == "timeout" else "error"
                    out.message = ev["error"].get("message", "")
                    finished = "error"
                    continue
                out.response_id = out.response_id or ev.get("id", "")
                choice = ev["choices"][0]
                n = len(choice["logprobs"]["tokens"]) if choice.get("logprobs") else 0
                if n:
                    now = time.monotonic()
                    if out.ttft is None:
                        out.ttft = now - out.sent
                    out.tokens += n
                    out.token_times.append(now)
                if choice.get("finish_reason"):
                    finished = choice["finish_reason"]
            if finished in ("length", "stop"):
                out.status = "ok"
            elif finished is None:
                out.message = "the stream ended without a finish reason"
    except httpx.HTTPError as e:
        out.message = f"{type(e).__name__}: {e}"
    out.done = time.monotonic()
    return out


async def run_open_loop(url: str, arrivals: Sequence[Arrival], headers: dict[str, str] | None = None,
                        timeout_s: float = 600.0) -> list[Outcome]:
    """Send each request at its arrival time whatever happened to earlier ones (an open loop: overload
    builds up as it would in production)."""
    limits = httpx.Limits(max_connections=len(arrivals) + 8, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, headers=headers or {}, timeout=timeout_s, limits=limits) as client:
        t0 = time.monotonic()

        async def at(a: Arrival) -> Outcome:
            await asyncio.sleep(max(0.0, t0 + a.at - time.monotonic()))
            return await send(client, a)

        with collector_paused():  # this process's collections would land inside the TTFTs it measures
            return list(await asyncio.gather(*(at(a) for a in arrivals)))


async def measure_capacity(url: str, concurrency: int, num: int, max_tokens: int, words: int = 12,
                           headers: dict[str, str] | None = None, start_index: int = 10**6) -> dict[str, float]:
    """Closed loop at `concurrency`: completed requests per second and the per-request latencies it took."""
    arrivals = [Arrival(0.0, "capacity", "capacity", completion_body(start_index + i, max_tokens=max_tokens,
                                                                       words=words)) for i in range(num)]
    outcomes: list[Outcome] = []
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers or {}, timeout=600, limits=limits) as client:
        queue = list(arrivals)
        t0 = time.monotonic()

        async def worker() -> None:
            while queue:
                outcomes.append(await send(client, queue.pop()))

        with collector_paused():
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.monotonic() - t0
    bad = [o for o in outcomes if o.status != "ok"]
    if bad:
        raise RuntimeError(f"capacity run: {len(bad)} requests failed, e.g. {bad[0].http_status} {bad[0].message}")
    return {"req_per_s": num / wall, "wall_s": wall,
            "ttft_p50_s": percentile([o.ttft for o in outcomes if o.ttft is not None], 50),
            "e2e_p50_s": percentile([o.done - o.sent for o in outcomes if o.done is not None], 50)}


def engine_step_counters(url: str) -> dict[str, int]:
    """The server's step counters from /metrics: `engine_steps` (steps run) and `engine_steps_interrupted`
    (steps abandoned for an arrival that outranked them)."""
    from prometheus_client.parser import text_string_to_metric_families

    got = {"engine_steps": 0, "engine_steps_interrupted": 0}
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        name = fam.name.removeprefix("tokenmill:")
        if name in got:
            got[name] += int(sum(smp.value for smp in fam.samples if smp.name.endswith("_total")))
    return got


def poisson_times(rate: float, n: int, rng: random.Random) -> list[float]:
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


# -- a light tenant beside a flood (tests/server/test_server_fair_load.py, benchmarks/fair_flood.py) ------------

LIGHT_TENANTS = ("light-0", "light-1", "light-2")
FLOOD_TENANT = "heavy"


def light_arrivals(rate: float, per_tenant: int, seed: int, first_prompt: int, max_tokens: int,
                   words: int = 12) -> list[Arrival]:
    """Each light tenant's Poisson arrivals at `rate` (tenant k seeded with seed + k; class "light"), every
    prompt new text of `words` words: numbered from first_prompt, 1000 apart per tenant."""
    out = []
    for k, tenant in enumerate(LIGHT_TENANTS):
        for j, t in enumerate(poisson_times(rate, per_tenant, random.Random(seed + k))):
            out.append(Arrival(t, "light", tenant, completion_body(first_prompt + k * 1000 + j, max_tokens=max_tokens,
                                                                   words=words, user=tenant)))
    return out


def flood_arrivals(rate: float, num: int, span: float, seed: int, first_prompt: int,
                   max_tokens: int, words: int = 12, timeout_share: float = 0.5) -> list[Arrival]:
    """The flooding tenant: Poisson arrivals at 10x `rate` inside `span` seconds (at most `num`; class
    "heavy"), each with a timeout of max(2, span * timeout_share) s, so the flood's backlog ends with the
    phase."""
    times = [t for t in poisson_times(10 * rate, num, random.Random(seed)) if t <= span]
    return [Arrival(t, "heavy", FLOOD_TENANT, completion_body(first_prompt + j, max_tokens=max_tokens, words=words,
                                                              user=FLOOD_TENANT, timeout=max(2.0, span * timeout_share)))
            for j, t in enumerate(times)]


# -- arithmetic ----------------------------------------------------------------------------------------------

def percentile(xs: Sequence[float], p: float) -> float:
    """Linear-interpolated percentile (numpy's default); nan for no data."""
    if not xs:
        return math.nan
    s = sorted(xs)
    k = (len(s) - 1) * p / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def jain_index(xs: Sequence[float]) -> float:
    """(sum x)^2 / (n * sum x^2): 1 when all equal, 1/n when one gets everything."""
    if not xs or not any(xs):
        return math.nan
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs))


def max_min_shares(total: float, demands: Sequence[float]) -> list[float]:
    """Max-min fair split of `total` among demands (water filling): nobody gets more than it asked for,
    what is left is shared equally among the rest."""
    shares = [0.0] * len(demands)
    left = total
    open_ = sorted(range(len(demands)), key=lambda i: demands[i])
    while open_:
        each = left / len(open_)
        i = open_[0]
        if demands[i] <= each:
            shares[i] = demands[i]
            left -= demands[i]
            open_.pop(0)
        else:
            for j in open_:
                shares[j] = each
            break
    return shares


def fairness(service: dict[str, float], demand: dict[str, float]) -> float:
    """Jain index over tenants of service / max-min fair share: 1 when every tenant got its fair share of
    what was served (all it asked for, or an equal part of the rest)."""
    names = sorted(demand)
    shares = max_min_shares(sum(service.get(t, 0.0) for t in names), [demand[t] for t in names])
    return jain_index([service.get(t, 0.0) / s for t, s in zip(names, shares, strict=True) if s > 0])
