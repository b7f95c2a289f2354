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
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tokenmill.bench.launch import free_port
from tokenmill.bench.loadgen import run_load

logger = logging.getLogger("ray_overhead")
REPO = Path(__file__).resolve().parents[1]


class Setup:
    def __init__(self, name: str, args: list[str], ready_path: str):
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False)  # noqa: SIM115
        cmd = [sys.executable, "-m", "tokenmill.entrypoints.cli", "--log-level", "WARNING", *args,
               "--port", str(self.port)]
        logger.info("%s: %s", name, " ".join(cmd))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                     start_new_session=True)  # its group holds everything it starts
        self.ready_path = ready_path

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{Path(self.log.name).read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready in {timeout}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        Path(self.log.name).unlink(missing_ok=True)


def setups(threads: int, engine: list[str]) -> dict[str, tuple[list[str], str]]:
    eng = ["--num-threads", str(threads), *engine]
    return {
        "direct": (["serve", *eng], "/health"),
        "router": (["router", "--spawn", "1", "--routing", "least-load", *eng], "/health"),
        "ray": (["ray-serve", "--replicas", "1", "--replica-cpus", str(threads), "--num-cpus",
                 str(max(2, threads + 1)), "--object-store-memory", "128MiB", *eng], "/health"),
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
    p.add_argument("--engine-args", default="--kv-cache-memory 512MiB", help="extra engine flags for the replica")
    args = p.parse_args()
    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    table = setups(args.threads, args.engine_args.split())
    results = []
    for name in args.setups.split(","):
        cli, ready = table[name]
        s = Setup(name, cli, ready)
        try:
            s.wait_ready()
            asyncio.run(warm(s.url))
            for c in map(int, args.concurrency.split(",")):
                r = asyncio.run(run_load(s.url, c, args.requests, args.max_tokens))
                r["setup"] = name
                results.append(r)
                logger.info("%s", json.dumps(r))
        finally:
            s.stop()
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
