"""Async load generator against any OpenAI-compatible completions server (tokenmill, llama.cpp's
llama-server, vLLM, `transformers serve`, ...).

Requests arrive on a seeded schedule (Poisson at a rate, or gamma with a burstiness factor, or all at
once), optionally capped at a number in flight, and stream their output over SSE; every chunk's arrival
time is kept, and metrics.compute turns those raw timestamps into TTFT / TPOT / ITL / e2e, throughput and
goodput. Outputs have a fixed length: the request asks the server not to stop at EOS in the way that
server understands (`Backend`), and the token count the server returns is checked against it.

This module imports no torch: it runs in its own process next to the server it measures.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from tokenmill.bench.datasets import BenchRequest
from tokenmill.bench.metrics import RequestRecord
from tokenmill.gc_control import collector_paused

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backend:
    """How one server family wants a fixed-length, token-exact streaming completion asked for."""

    name: str
    prompt_as_tokens: bool  # send token ids (exact by construction) or the text that encodes to them
    fixed_length: str  # "ignore_eos", "min_tokens" or "generation_config" (transformers serve)
    stream_usage: bool  # send stream_options.include_usage
    chat: bool = False  # /v1/chat/completions with the prompt text as one user message (not token-exact)

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.chat else "/v1/completions"


BACKENDS = {
    # tokenmill, vLLM, SGLang: token-id prompts, ignore_eos, usage in the last chunk.
    "openai": Backend("openai", True, "ignore_eos", True),
    # llama.cpp's llama-server: the same wire format (it takes ignore_eos and token-id prompts).
    "llama.cpp": Backend("llama.cpp", True, "ignore_eos", True),
    # The same, with text prompts (the server tokenizes them; what a prefix-aware router hashes).
    "openai-text": Backend("openai-text", False, "ignore_eos", True),
    # A server that knows min_tokens but not ignore_eos.
    "min-tokens": Backend("min-tokens", True, "min_tokens", True),
    # `transformers serve`: text prompts only, no extra fields (422), generation settings as a JSON string;
    # it sends usage in its last chunk unasked.
    "transformers": Backend("transformers", False, "generation_config", False),
    # The chat endpoint (`--endpoint /v1/chat/completions`): the server's chat template wraps each prompt.
    "openai-chat": Backend("openai-chat", False, "ignore_eos", True, chat=True),
}


# Which replica answered, as `tokenmill router` says in each response (absent from a single server).
SERVED_BY_HEADER = "x-tokenmill-replica"


def request_body(req: BenchRequest, backend: Backend, model: str | None) -> dict:
    body: dict = {"max_tokens": req.output_len, "temperature": 0.0, "stream": True}
    if backend.chat:
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt_token_ids if backend.prompt_as_tokens else req.prompt
    if model:
        body["model"] = model
    if backend.fixed_length == "ignore_eos":
        body["ignore_eos"] = True
    elif backend.fixed_length == "min_tokens":
        body["min_tokens"] = req.output_len
    elif backend.fixed_length == "generation_config":
        body["generation_config"] = json.dumps({"max_new_tokens": req.output_len, "min_new_tokens": req.output_len,
                                                "do_sample": False})
    if backend.stream_usage:
        body["stream_options"] = {"include_usage": True}
    return body


def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Seconds from the start at which each of n requests arrives. rate=inf: all at 0. Inter-arrival gaps
    are gamma(shape=burstiness, mean=1/rate): burstiness 1 is Poisson, <1 burstier, >1 more even."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError("request rate and burstiness must be positive")
    if rate == float("inf"):
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return out


def _chunk_output(obj: dict) -> bool:
    """Whether an SSE chunk carries output (text, or tokens in logprobs); role-only and usage-only chunks
    do not."""
    for c in obj.get("choices") or []:
        if c.get("text") or (c.get("delta") or {}).get("content"):
            return True
        lp = c.get("logprobs")
        if isinstance(lp, dict) and (lp.get("tokens") or lp.get("content")):
            return True
    return False


async def _one(client: httpx.AsyncClient, path: str, body: dict, rec: RequestRecord, t0: float) -> None:
    clock = time.perf_counter
    rec.sent = clock() - t0
    usage = None
    n_chunks = 0
    try:
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                rec.error = f"HTTP {r.status_code}: {text[:300]}"
                return
            rec.served_by = r.headers.get(SERVED_BY_HEADER, "")
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = clock() - t0
                obj = json.loads(data)
                if "error" in obj:
                    rec.error = f"stream error: {str(obj['error'])[:300]}"
                    break
                if _chunk_output(obj):
                    rec.chunks.append(now)
                    n_chunks += 1
                if obj.get("usage"):
                    usage = obj["usage"]
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as e:
        rec.error = f"{type(e).__name__}: {e}"
    finally:
        rec.end = clock() - t0
    if usage and usage.get("completion_tokens") is not None:
        rec.output_tokens = int(usage["completion_tokens"])
        rec.prompt_tokens = usage.get("prompt_tokens")
        rec.tokens_source = "usage"
    else:  # no usage from this server: assume one token per chunk (as llama.cpp and vLLM stream)
        rec.output_tokens = n_chunks
        rec.tokens_source = "chunks"


async def run(base_url: str, requests: list[BenchRequest], *, backend: Backend, model: str | None = None,
              request_rate: float = float("inf"), burstiness: float = 1.0, max_concurrency: int | None = None,
              seed: int = 0, api_key: str | None = None, timeout_s: float = 3600.0,
              path: str | None = None, progress: Callable[[], None] | None = None) -> list[RequestRecord]:
    """Send `requests` on their arrival schedule; return one record per request, in request order. path:
    the endpoint (default: the backend's own)."""
    path = path or backend.path
    arrivals = arrival_times(len(requests), request_rate, burstiness, seed)
    records = [RequestRecord(i, r.prompt_len, r.output_len, scheduled=a)
               for i, (r, a) in enumerate(zip(requests, arrivals, strict=True))]
    bodies = [request_body(r, backend, model) for r in requests]
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    conns = max_concurrency or len(requests)
    limits = httpx.Limits(max_connections=conns + 4, max_keepalive_connections=conns + 4)
    timeout = httpx.Timeout(timeout_s, connect=30.0)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout, limits=limits) as client:
        t0 = time.perf_counter()

        async def launch(i: int) -> None:
            delay = records[i].scheduled - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            if sem is None:
                await _one(client, path, bodies[i], records[i], t0)
            else:
                async with sem:
                    await _one(client, path, bodies[i], records[i], t0)
            if progress:
                progress()

        with collector_paused():  # this process's collections would land inside the latencies it measures
            await asyncio.gather(*(launch(i) for i in range(len(requests))))
    return records


async def wait_ready(base_url: str, timeout_s: float = 600.0, api_key: str | None = None,
                     alive: Callable[[], bool] | None = None) -> None:
    """Poll until the server has loaded its model: GET /health answers 200 (tokenmill, llama-server, vLLM
    answer 503 while loading) or does not exist (404), and GET /v1/models answers 200."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=5.0) as client:
        while True:
            if alive is not None and not alive():
                raise RuntimeError(f"the server for {base_url} exited before it was ready")
            try:
                health = (await client.get("/health")).status_code
                if health in (200, 404) and (await client.get("/v1/models")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{base_url} not ready after {timeout_s:.0f} s")
            await asyncio.sleep(0.5)


async def run_load(url: str, concurrency: int, requests: int, max_tokens: int, prompt_words: int = 32,
                   api_key: str | None = None) -> dict[str, float]:
    """Closed loop in one call: `requests` distinct prompts of `prompt_words` synthetic token ids, at most
    `concurrency` in flight, `max_tokens` each (ignore_eos). Returns the headline figures as a flat dict
    (the shape benchmarks/ray_overhead.py tabulates). Token-id prompts: needs a server that takes them."""
    from tokenmill.bench.metrics import compute

    # Distinct prompts, so a prefix cache does not turn the run into a cache benchmark.
    reqs = [BenchRequest([1000 + (i * 7919 + k * 31) % 20000 for k in range(prompt_words)], "", max_tokens)
            for i in range(requests)]
    recs = await run(url, reqs, backend=BACKENDS["openai"], max_concurrency=concurrency, api_key=api_key)
    m = compute(recs)
    return {
        "concurrency": concurrency, "requests": requests, "max_tokens": max_tokens,
        "completed": m["completed"], "wall_s": round(m["duration_s"], 3),
        "req_per_s": round(m["request_throughput"], 3), "output_tok_per_s": round(m["output_throughput"], 2),
        "ttft_p50_ms": round(m["ttft_s"]["median"] * 1e3, 1), "ttft_p99_ms": round(m["ttft_s"]["p99"] * 1e3, 1),
        "itl_p50_ms": round(m["itl_s"]["median"] * 1e3, 2), "itl_p99_ms": round(m["itl_s"]["p99"] * 1e3, 2),
        "e2e_mean_ms": round(m["e2e_s"]["mean"] * 1e3, 1),
    }
