"""What a front tier costs: the same engine replica served directly, behind `tokenmill router`, and behind
Ray Serve (`tokenmill ray-serve`), under the same closed-loop streaming load.

    python benchmarks/ray_overhead.py --out bench_results/ray_overhead      # writes .json and .md

Each setup runs one replica with --num-threads T (the rest of the machine is left to the front tier and the
load generator). Run on an otherwise idle machine; on 2 cores the front tiers compete with the engine for
CPU, which is part of what this measures. Takes roughly 3-6 minutes with the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import sys
import tempfile
from pathlib import Path

import httpx

from tokenmill.bench.launch import ServerProcess, free_port
from tokenmill.bench.loadgen import run_load

logger = logging.getLogger("ray_overhead")
REPO = Path(__file__).resolve().parents[1]


def start(name: str, cli: list[str], log_dir: Path) -> ServerProcess:
    """`tokenmill CLI... --port P` in its own process group, ready once /health and /v1/models answer."""
    command = shlex.join([sys.executable, "-m", "tokenmill.entrypoints.cli", "--log-level", "WARNING", *cli,
                          "--port", "{port}"])
    logger.info("%s: %s", name, command)
    # This checkout's tokenmill, in the server and in every process it starts (Ray workers included).
    pythonpath = os.pathsep.join(x for x in (str(REPO), os.environ.get("PYTHONPATH")) if x)
    return ServerProcess(command, free_port(), log_dir / f"{name}.log", ready_timeout_s=600,
                         env={"PYTHONUNBUFFERED": "1", "PYTHONPATH": pythonpath}).start()


def setups(threads: int, engine: list[str]) -> dict[str, list[str]]:
    eng = ["--num-threads", str(threads), *engine]
    return {
        "direct": ["serve", *eng],
        "router": ["router", "--spawn", "1", "--routing", "least-load", *eng],
        "ray": ["ray-serve", "--replicas", "1", "--replica-cpus", str(threads), "--num-cpus",
                str(max(2, threads + 1)), "--object-store-memory", "128MiB", *eng],
    }


async def warm(url: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:  # first requests build kernels, fill caches
        for _ in range(3):
            (await c.post("/v1/completions", json={"prompt": "warm up", "max_tokens": 8})).raise_for_status()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_results/ray_overhead")
    p.add_argument("--setups", default="direct,router,ray")
    p.add_argument("--threads", type=int, default=1, help="engine threads of the one replica")
    p.add_argument("--concurrency", default="1,8", help="comma-separated client counts")
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--engine-args", default="--kv-cache-memory 512MiB", help="extra flags for the replica, written with '=' (e.g. --engine-args='--mock' for a quick run "
                        "without a model) (default: %(default)s)")
    args = p.parse_args()
    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    table = setups(args.threads, args.engine_args.split())
    results = []
    log_dir = Path(tempfile.mkdtemp(prefix="tokenmill-ray-overhead-"))
    logger.info("logs in %s", log_dir)
    for name in args.setups.split(","):
        server = start(name, table[name], log_dir)
        try:
            asyncio.run(warm(server.base_url))
            for c in map(int, args.concurrency.split(",")):
                r = asyncio.run(run_load(server.base_url, c, args.requests, args.max_tokens))
                if r["completed"] != args.requests:  # figures over part of the load would mislead
                    raise RuntimeError(f"{name}: only {r['completed']} of {args.requests} requests completed; "
                                       f"see {server.log_path}")
                r["setup"] = name
                results.append(r)
                logger.info("%s", json.dumps(r))
        finally:
            server.stop(grace_s=90)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"threads": args.threads, "requests": args.requests, "max_tokens": args.max_tokens,
            "engine_args": args.engine_args, "cpus": os.cpu_count()}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    lines = ["| setup | clients | req/s | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['setup']} | {r['concurrency']} | {r['req_per_s']} | {r['output_tok_per_s']} | "
                     f"{r['ttft_p50_ms']} | {r['ttft_p99_ms']} | {r['itl_p50_ms']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
