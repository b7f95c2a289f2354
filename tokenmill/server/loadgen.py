"""A small closed-loop load generator for one server: `python -m tokenmill.server.loadgen --url URL`.

C concurrent clients each send streaming completions back to back (ignore_eos, fixed length) until R
requests are done; prints throughput and TTFT / inter-token latency percentiles as one JSON line. Used to
compare the split and --inproc engine placements; the full benchmark harness lives in tokenmill.bench.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import time

import httpx

logger = logging.getLogger(__name__)


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


async def run_load(url: str, concurrency: int, requests: int, max_tokens: int, prompt_words: int = 32,
                   api_key: str | None = None, stream: bool = True) -> dict[str, float]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    ttfts: list[float] = []
    itls: list[float] = []
    e2es: list[float] = []
    out_tokens = 0
    next_id = 0

    async def one(client: httpx.AsyncClient, i: int) -> None:
        nonlocal out_tokens
        # Distinct prompts, so the prefix cache does not turn the test into a cache benchmark.
        prompt = f"Request {i}: " + " ".join(f"word{(i * 7 + k) % 997}" for k in range(prompt_words))
        body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0,
                "stream": stream, "logprobs": 0 if stream else None}
        t0 = time.perf_counter()
        if not stream:
            r = await client.post("/v1/completions", json=body)
            r.raise_for_status()
            out_tokens += r.json()["usage"]["completion_tokens"]
            e2es.append(time.perf_counter() - t0)
            return
        last = None
        async with client.stream("POST", "/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choice = json.loads(line[6:])["choices"][0]
                n = len(choice["logprobs"]["tokens"]) if choice.get("logprobs") else 0
                if not n:
                    continue
                now = time.perf_counter()
                if last is None:
                    ttfts.append(now - t0)
                else:
                    itls.append((now - last) / n)
                last = now
                out_tokens += n
        e2es.append(time.perf_counter() - t0)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal next_id
        while next_id < requests:
            i = next_id
            next_id += 1
            await one(client, i)

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {
        "concurrency": concurrency, "requests": requests, "max_tokens": max_tokens, "wall_s": round(wall, 3),
        "req_per_s": round(requests / wall, 3), "output_tok_per_s": round(out_tokens / wall, 2),
        "ttft_p50_ms": round(_pct(ttfts, 50) * 1e3, 1), "ttft_p99_ms": round(_pct(ttfts, 99) * 1e3, 1),
        "itl_p50_ms": round(_pct(itls, 50) * 1e3, 2), "itl_p99_ms": round(_pct(itls, 99) * 1e3, 2),
        "e2e_mean_ms": round(statistics.fmean(e2es) * 1e3, 1) if e2es else float("nan"),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-words", type=int, default=32)
    p.add_argument("--api-key")
    p.add_argument("--no-stream", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO")
    result = asyncio.run(run_load(args.url, args.concurrency, args.requests, args.max_tokens, args.prompt_words,
                                  args.api_key, not args.no_stream))
    logger.info("%s", json.dumps(result))


if __name__ == "__main__":
    main()
