"""Routing benchmark: round-robin vs prefix-aware (and any other policy) over the same real replicas.

Starts N real `tokenmill serve` replicas (one torch thread each, a KV cache of a fixed number of blocks,
small enough that one replica cannot hold every group's prefix), then for each policy in turn starts a
`tokenmill router --replicas ...` in front of them and drives the shared-prefix workload through it: G
groups, each with a long shared system prompt, requests drawn from the groups at random, each with its own
short question. Each policy gets fresh system prompts (a different seed, same shape), so no phase profits
from a cache the previous one warmed. Measured per policy: prefix-cache hit rate (from the replicas'
own tokenmill:prefix_cache_* counters, over the phase), TTFT p50/p99 and end-to-end latency at the
client, requests per replica, the router's decisions by reason.

    python benchmarks/routing.py                       # defaults: 3 replicas, 6 groups, 96 requests/policy
    python benchmarks/routing.py --policies round-robin,prefix-aware,kv-aware --out bench_results/routing

Writes OUT.json and OUT.md. Run it on an otherwise idle machine: the replicas share its cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from tqdm import tqdm

from tokenmill.bench import loadgen
from tokenmill.bench.datasets import BenchRequest
from tokenmill.bench.launch import free_port
from tokenmill.bench.metrics import compute

REPO = Path(__file__).resolve().parents[1]
logger = logging.getLogger("routing-bench")

_WORDS = ("the of and to in is that for it as with was on be by at this from have or an are not but which "
          "system model request server cache token prefix replica router policy latency memory block batch queue "
          "river stone cloud ember maple quartz violet harbor meadow lantern copper falcon orchard summit glacier "
          "canyon willow thunder compass anchor beacon cedar delta ember forest garden island jungle kettle "
          "lagoon marble nectar ocean pepper quiver raven saddle timber umbra valley walnut yonder zephyr "
          "always because between careful during either follow gather honest include justify measure notice "
          "observe prepare question remember support through under verify whether yield answer explain").split()


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def shared_prefix_workload(groups: int, requests: int, system_words: int, question_words: int,
                           seed: int) -> list[tuple[int, str]]:
    """(group, prompt) pairs: `groups` long system prompts, each request one of them + its own question."""
    rng = random.Random(seed)
    systems = [f"System prompt {seed}-{g}. You are assistant number {g}. " + words(rng, system_words)
               for g in range(groups)]
    out = []
    for i in range(requests):
        g = rng.randrange(groups)
        out.append((g, f"{systems[g]}\n\nQuestion {i}: {words(rng, question_words)}?\nAnswer:"))
    return out


# -- processes ------------------------------------------------------------------------------------------------


class Proc:
    def __init__(self, name: str, args: list[str], log_dir: Path):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "tokenmill.entrypoints.cli", "--log-level", "WARNING",
                                      *args], stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_ready(self, url: str, timeout: float, check=lambda r: r.status_code == 200) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if check(httpx.get(f"{url}/health", timeout=2)):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready in {timeout:.0f}s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def prometheus(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            name = re.sub(r'model_name="[^"]*",?', "", name).replace("{}", "")
            out[name] = float(value)
    return out


def cache_counters(urls: list[str]) -> tuple[float, float]:
    hits = queries = 0.0
    for u in urls:
        m = prometheus(u)
        hits += m.get("tokenmill:prefix_cache_hits_total", 0.0)
        queries += m.get("tokenmill:prefix_cache_queries_total", 0.0)
    return hits, queries


def bench_requests(tok, work: list[tuple[int, str]], max_tokens: int) -> list[BenchRequest]:
    """The workload as the load generator's requests: sent as text (what the router hashes), each with its
    token count as the replicas' frontend will count it."""
    return [BenchRequest(tok.encode(prompt), prompt, max_tokens, group=g) for g, prompt in work]


def drive(url: str, requests: list[BenchRequest], concurrency: int) -> list:
    """Closed loop: at most `concurrency` streaming completions in flight; any failed request ends the run."""
    with tqdm(total=len(requests), desc="requests", unit="req", leave=False) as bar:
        records = asyncio.run(loadgen.run(url, requests, backend=loadgen.BACKENDS["openai-text"],
                                          max_concurrency=concurrency, timeout_s=900, progress=bar.update))
    bad = [r for r in records if r.status != "ok"]
    if bad:
        raise RuntimeError(f"{len(bad)} of {len(records)} requests failed; first: request {bad[0].index} "
                           f"{bad[0].status} {bad[0].error}")
    return records


def run_policy(policy: str, replica_urls: list[str], args: argparse.Namespace, log_dir: Path, seed: int,
               tok) -> dict:
    port = free_port()
    router = Proc(f"router-{policy}", ["router", "--port", str(port), "--replicas", ",".join(replica_urls),
                                       "--routing", policy, "--model", args.model, "--block-size",
                                       str(args.block_size)], log_dir)
    url = f"http://127.0.0.1:{port}"
    try:
        router.wait_ready(url, 120, lambda r: r.status_code == 200 and r.json()["healthy_replicas"] == len(replica_urls))
        # The router hashes prompts for prefix-aware routing once its tokenizer has loaded: wait for that.
        deadline = time.monotonic() + 120
        while not httpx.get(f"{url}/router/replicas", timeout=10).json()["tokenizer_loaded"]:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the router's tokenizer did not load; see {router.log_path}")
            time.sleep(0.5)
        work = shared_prefix_workload(args.groups, args.requests, args.system_words, args.question_words, seed)
        requests = bench_requests(tok, work, args.max_tokens)
        hits0, queries0 = cache_counters(replica_urls)
        t0 = time.perf_counter()
        records = drive(url, requests, args.concurrency)
        wall = time.perf_counter() - t0
        hits1, queries1 = cache_counters(replica_urls)
        rm = prometheus(url)
    finally:
        router.stop()
    per_replica: dict[str, int] = {}
    for r in records:
        name = r.served_by or "?"
        per_replica[name] = per_replica.get(name, 0) + 1
    decisions = {k.split('reason="')[1].rstrip('"}'): v for k, v in rm.items()
                 if k.startswith("tokenmill:router_routing_decisions_total") and v}
    m = compute(records)
    ttft, e2e = m["ttft_s"], m["e2e_s"]
    return {
        "policy": policy, "requests": len(records), "wall_s": round(wall, 2),
        "req_per_s": round(len(records) / wall, 3),
        "prefix_cache_hit_rate": round((hits1 - hits0) / max(1.0, queries1 - queries0), 4),
        "prefix_cache_hit_tokens": hits1 - hits0, "prefix_cache_query_tokens": queries1 - queries0,
        "ttft_p50_s": round(ttft["median"], 4), "ttft_p90_s": round(ttft["p90"], 4),
        "ttft_p99_s": round(ttft["p99"], 4), "e2e_p50_s": round(e2e["median"], 4),
        "e2e_p99_s": round(e2e["p99"], 4), "requests_per_replica": dict(sorted(per_replica.items())),
        "router_decisions": decisions,
    }


def kv_bytes_for_blocks(model: str, dtype: str, block_size: int, blocks: int) -> int:
    from tokenmill.models.loader import open_model

    return blocks * open_model(model).arch.kv_block_bytes(block_size, "auto", 4 if dtype == "float32" else 2)


def load_tokenizer(model: str):
    from tokenmill.models.loader import open_model
    from tokenmill.tokenizer.tokenizer import Tokenizer

    return Tokenizer.from_source(open_model(model))


def markdown(result: dict) -> str:
    c = result["config"]
    lines = [f"### Routing{' (MOCK replicas: no model)' if c['mock'] else ''}: {c['replicas']} replicas ({c['num_threads']} thread each, KV cache {c['kv_blocks']} "
             f"blocks of {c['block_size']} tokens = {c['kv_blocks'] * c['block_size']} tokens each), "
             f"{c['groups']} prefix groups, ~{c['mean_prompt_tokens']:.0f}-token prompts, {c['max_tokens']} output "
             f"tokens, {c['requests']} requests per policy at concurrency {c['concurrency']}",
             "", "| policy | prefix-cache hit rate | TTFT p50 | TTFT p99 | e2e p50 | req/s | requests per replica |",
             "|---|---|---|---|---|---|---|"]
    for r in result["results"]:
        per = " / ".join(str(v) for v in r["requests_per_replica"].values())
        lines.append(f"| {r['policy']} | {100 * r['prefix_cache_hit_rate']:.1f} % | {r['ttft_p50_s'] * 1e3:.0f} ms | "
                     f"{r['ttft_p99_s'] * 1e3:.0f} ms | {r['e2e_p50_s'] * 1e3:.0f} ms | {r['req_per_s']:.2f} | {per} |")
    for r in result["results"]:
        if r["router_decisions"]:
            lines.append(f"\n{r['policy']} decisions: " + ", ".join(f"{k} {int(v)}" for k, v in
                                                                     r["router_decisions"].items()))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", default="round-robin,prefix-aware", help="comma-separated, run in this order")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--num-threads", type=int, default=1, help="torch threads per replica")
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-blocks", type=int, default=200,
                   help="KV blocks per replica: enough for ~3 of the groups' prefixes, not all of them")
    p.add_argument("--groups", type=int, default=6)
    p.add_argument("--system-words", type=int, default=700, help="words per shared system prompt (~1 token each)")
    p.add_argument("--question-words", type=int, default=24)
    p.add_argument("--requests", type=int, default=96, help="requests per policy")
    p.add_argument("--concurrency", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mock", action="store_true", help="mock replicas (no model): a quick smoke run of the script")
    p.add_argument("--out", default="bench_results/routing", help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))  # this checkout's tokenmill, as the processes it starts use
    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("tokenmill").setLevel(logging.WARNING)

    policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    kv = kv_bytes_for_blocks(args.model, args.dtype, args.block_size, args.kv_blocks)
    tok = load_tokenizer(args.model)
    log_dir = Path(tempfile.mkdtemp(prefix="tokenmill-routing-bench-"))
    logger.info("logs in %s", log_dir)
    replicas: list[Proc] = []
    urls: list[str] = []
    t_start = time.perf_counter()
    try:
        for i in range(args.replicas):
            port = free_port()
            replicas.append(Proc(f"replica-{i}", [
                "serve", "--port", str(port), "--model", args.model, "--dtype", args.dtype, "--num-threads",
                str(args.num_threads), "--block-size", str(args.block_size), "--kv-cache-memory", str(kv),
                "--no-log-requests", *(["--mock"] if args.mock else [])], log_dir))
            urls.append(f"http://127.0.0.1:{port}")
        for rp, u in zip(replicas, urls, strict=True):
            rp.wait_ready(u, 600)
        logger.info("%d replicas ready in %.0fs", len(urls), time.perf_counter() - t_start)
        # Warm each replica (first-use costs such as the native kernel's load) outside the measurement.
        for u in urls:
            httpx.post(f"{u}/v1/completions", json={"prompt": "warm up", "max_tokens": 4}, timeout=600)
        results = []
        for k, policy in enumerate(policies):
            logger.info("policy %s", policy)
            results.append(run_policy(policy, urls, args, log_dir, seed=args.seed * 1000 + k + 1, tok=tok))
            logger.info("%s", json.dumps(results[-1]))
    finally:
        for rp in replicas:
            rp.stop()
    config = {**{k: v for k, v in vars(args).items() if k not in ("out",)},
              "mean_prompt_tokens": sum(r.prompt_len for r in bench_requests(tok, shared_prefix_workload(
                  args.groups, args.requests, args.system_words, args.question_words, args.seed * 1000 + 1),
                  args.max_tokens)) / args.requests,
              "kv_cache_bytes": kv, "total_s": round(time.perf_counter() - t_start, 1)}
    result = {"benchmark": "routing", "config": config, "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    logger.info("wrote %s.json and %s.md", out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
