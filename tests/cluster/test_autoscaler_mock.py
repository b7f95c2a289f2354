"""The autoscaler for real: `tokenmill router --spawn 1 --mock --autoscale min=0,max=3,...` under a demand
trace (calm, ramp up, burst, long streams while demand falls, silence, one request from zero).

Shown: the replica count follows demand (one replica while calm, three in the burst, back down, then zero);
the count changes a bounded number of times, all the way up before any way down (no flapping); replicas
removed while they still stream finish those streams (every request completes with all its tokens); a
request arriving at zero replicas waits for a cold start, and the router's TTFT includes that wait.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import pytest
from router_helpers import start_router

pytestmark = pytest.mark.slow

SHORT_TOKENS = 16
LONG_TOKENS = 300


@pytest.fixture(scope="module")
def router():
    r = start_router(
        "--spawn", "1", "--mock", "--routing", "least-load", "--max-num-seqs", "4",
        "--replica-args=--mock-base-ms 30", "--health-interval", "0.5", "--autoscale-interval", "0.5",
        "--autoscale", "min=0,max=3,queue=2,target=30,up_delay=1,down_delay=4,idle=3",
        replicas=1)
    yield r
    assert r.stop() == 0, r.log_text()


class Trace:
    """Closed-loop streaming clients whose number follows a schedule; every request's outcome is kept."""

    def __init__(self, url: str):
        self.client = httpx.AsyncClient(base_url=url, timeout=180,
                                        limits=httpx.Limits(max_connections=64))
        self.results: list[dict] = []
        self.t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def request(self, max_tokens: int, tag: str) -> dict:
        t0 = time.monotonic()
        out = {"tag": tag, "status": None, "tokens": 0, "done": False, "finish": None, "ttft": None}
        body = {"prompt": f"{tag} {len(self.results)}", "max_tokens": max_tokens, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        async with self.client.stream("POST", "/v1/completions", json=body) as r:
            out["status"] = r.status_code
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    out["done"] = True
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    out["tokens"] = event["usage"]["completion_tokens"]
                for c in event.get("choices", []):
                    if out["ttft"] is None and c.get("text"):
                        out["ttft"] = time.monotonic() - t0
                    out["finish"] = c.get("finish_reason") or out["finish"]
        self.results.append(out)
        return out

    async def clients(self, n: int, start: float, stop: asyncio.Event, max_tokens: int, tag: str) -> None:
        """n clients from `start` (seconds into the trace) until `stop` is set."""
        await asyncio.sleep(max(0.0, start - self.now()))

        async def loop() -> None:
            while not stop.is_set():  # a client finishes its request before it stops: no cut streams
                await self.request(max_tokens, tag)

        await asyncio.gather(*(loop() for _ in range(n)))


def _status(url: str) -> dict:
    return httpx.get(f"{url}/router/autoscaler", timeout=10).json()


def test_replica_count_follows_a_demand_trace_and_no_stream_is_dropped(router):
    samples: list[tuple[float, int]] = []

    async def sample(trace: Trace, stop: asyncio.Event) -> None:
        while not stop.is_set():
            samples.append((trace.now(), (await trace.client.get("/router/autoscaler")).json()["replicas"]))
            await asyncio.sleep(0.25)

    async def run() -> Trace:
        trace = Trace(router.url)
        done_sampling, calm_over, burst_over = asyncio.Event(), asyncio.Event(), asyncio.Event()
        sampler = asyncio.create_task(sample(trace, done_sampling))
        # Calm: 2 clients for 4 s.
        asyncio.get_running_loop().call_later(4, calm_over.set)
        await trace.clients(2, 0, calm_over, SHORT_TOKENS, "calm")
        # Ramp up to 6, then 12 clients, then a burst of 24, held until all three replicas serve (however
        # long they take to start on this machine) and 2 s more.
        t = trace.now()
        watcher = asyncio.create_task(_until_ready(trace, 3, burst_over))
        await asyncio.gather(trace.clients(6, t, burst_over, SHORT_TOKENS, "ramp"),
                             trace.clients(6, t + 3, burst_over, SHORT_TOKENS, "ramp"),
                             trace.clients(12, t + 6, burst_over, SHORT_TOKENS, "burst"))
        await watcher
        # Demand falls; long streams keep every replica busy while the autoscaler removes replicas.
        await asyncio.gather(*(trace.request(LONG_TOKENS, "long") for _ in range(6)))
        done_sampling.set()
        await sampler
        await trace.client.aclose()
        return trace

    trace = asyncio.run(run())
    status = _status(router.url)
    events = status["events"]

    # Every request completed, streams on removed replicas included.
    assert trace.results and all(r["status"] == 200 for r in trace.results), trace.results
    for r in trace.results:
        want = LONG_TOKENS if r["tag"] == "long" else SHORT_TOKENS
        assert r["done"] and r["finish"] == "length" and r["tokens"] == want, r
    # Follows demand: one replica while calm, up to max in the burst, down again.
    calm = [n for t, n in samples if t < 3.5]
    assert calm and max(calm) == 1, samples
    assert max(n for _, n in samples) == 3, samples
    ups = [e for e in events if e["to"] > e["from"]]
    downs = [e for e in events if e["to"] < e["from"]]
    assert ups and downs, events
    assert max(e["t"] for e in ups) < min(e["t"] for e in downs), events  # all the way up, then down: no flap
    assert len(events) <= 6, events
    assert all(e["from"] - e["to"] == 1 for e in downs), events  # one at a time
    # At least one replica was drained while it still had streams, and those streams completed (above).
    drained = [int(n) for n in re.findall(r"draining \((\d+) requests in flight\)", router.own_log())]
    assert drained and max(drained) >= 1, router.log_text()


def test_scale_to_zero_and_a_cold_start_counted_in_ttft(router):
    deadline = time.monotonic() + 90
    while _status(router.url)["replicas"] > 0:  # min=0, idle=3: the set empties once requests stop
        assert time.monotonic() < deadline, _status(router.url)
        time.sleep(0.5)
    assert _status(router.url)["events"][-1]["to"] == 0
    before = router.metrics()

    async def one() -> dict:
        trace = Trace(router.url)
        # A client that gives up while its request waits for the cold start: the router lets it go.
        with pytest.raises(httpx.ReadTimeout):
            await trace.client.post("/v1/completions", json={"prompt": "gone", "max_tokens": 4}, timeout=0.3)
        out = await trace.request(SHORT_TOKENS, "cold")
        await trace.client.aclose()
        return out

    out = asyncio.run(one())
    assert out["status"] == 200 and out["done"] and out["tokens"] == SHORT_TOKENS, out
    last = _status(router.url)["events"][-1]
    assert (last["from"], last["to"]) == (0, 1) and "zero" in last["reason"], last
    assert _status(router.url)["pending_in_router"] == 0
    after = router.metrics()
    key = "tokenmill:router_time_to_first_token_seconds"
    router_ttft = after[key + "_sum"] - before.get(key + "_sum", 0.0)
    assert after[key + "_count"] - before.get(key + "_count", 0.0) == 1
    # The router measured this request's TTFT from its arrival, so the replica's start-up is inside it.
    assert out["ttft"] > 0.3 and router_ttft >= 0.8 * out["ttft"], (out, router_ttft)
    assert after['tokenmill:router_scale_events_total{direction="up"}'] >= 2
    assert after['tokenmill:router_scale_events_total{direction="down"}'] >= 3
    assert "tokenmill:router_autoscaler_target_replicas" in after


async def _until_ready(trace: Trace, n: int, event: asyncio.Event, timeout: float = 120.0) -> None:
    deadline = trace.now() + timeout
    while trace.now() < deadline and (await trace.client.get("/router/autoscaler")).json()["ready"] < n:
        await asyncio.sleep(0.25)
    await asyncio.sleep(2)
    event.set()
