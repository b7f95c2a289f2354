"""A light tenant beside a flood, repeated on one server: the fair e2e test's scenario
(tests/server/test_server_fair_load.py) with both conditions' TTFT percentiles and the server's step
counters printed, to compare server settings without a fresh server and calibration per round.

    python benchmarks/fair_flood.py --rounds 4                                   # the test's setting
    python benchmarks/fair_flood.py --rounds 4 -- --no-interruptible-steps       # anything after -- goes
    python benchmarks/fair_flood.py --rounds 4 -- --max-num-batched-tokens 72    # to `tokenmill serve`

Three light tenants each send an eighth of the calibrated capacity; each round runs them alone, then
again beside a fourth tenant sending 10x each one's rate. Prints each round, then the light tenants'
TTFT over all rounds per condition (mean, p50, p90, p99, max) and the contended/alone ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import statistics
import sys
import tempfile

from tokenmill.bench.launch import ServerProcess, free_port
from tokenmill.bench.overload import (
    engine_step_counters,
    flood_arrivals,
    light_arrivals,
    measure_capacity,
    percentile,
    run_open_loop,
)

MAX_SEQS = 8
OUT = 8
PER_LIGHT = 12


def abandoned(before: dict[str, int], after: dict[str, int]) -> str:
    return (f"{after['engine_steps_interrupted'] - before['engine_steps_interrupted']} of "
            f"{after['engine_steps'] - before['engine_steps']} steps abandoned")


def describe(ttfts: list[float]) -> str:
    return (f"mean {statistics.mean(ttfts):.3f} p50 {percentile(ttfts, 50):.3f} p90 {percentile(ttfts, 90):.3f} "
            f"p99 {percentile(ttfts, 99):.3f} max {max(ttfts):.3f}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    server_args = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--budget", type=int, default=128, help="--max-num-batched-tokens (the test's 128)")
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    cmd = [sys.executable, "-m", "tokenmill.entrypoints.cli", "--log-level", "WARNING", "serve", "--port", "{port}",
           "--scheduling-policy", "fair", "--max-num-seqs", str(MAX_SEQS), "--max-num-batched-tokens",
           str(args.budget), "--dtype", "bfloat16", "--no-log-requests", *server_args]
    log = tempfile.NamedTemporaryFile(prefix="fair-flood-", suffix=".log", delete=False).name  # noqa: SIM115
    with ServerProcess(shlex.join(cmd), free_port(), log, ready_timeout_s=300) as server:
        url = server.base_url
        cap = asyncio.run(measure_capacity(url, MAX_SEQS, 3 * MAX_SEQS, OUT))["req_per_s"]
        rate = cap / 8
        span = PER_LIGHT / rate
        alone: list[float] = []
        contended: list[float] = []
        for k in range(args.rounds):
            s0 = engine_step_counters(url)
            got = asyncio.run(run_open_loop(url, light_arrivals(rate, PER_LIGHT, 10 + k, 100_000 * k, OUT)))
            s1 = engine_step_counters(url)
            both = asyncio.run(run_open_loop(url, light_arrivals(rate, PER_LIGHT, 10 + k, 100_000 * k + 10_000, OUT)
                                             + flood_arrivals(rate, 12 * PER_LIGHT, span, 99 + k, 100_000 * k + 50_000, OUT)))
            s2 = engine_step_counters(url)
            a = [o.ttft for o in got if o.ttft is not None]
            c = [o.ttft for o in both if o.cls == "light" and o.ttft is not None]
            alone += a
            contended += c
            print(f"round {k}: alone p99 {percentile(a, 99):.3f} s ({abandoned(s0, s1)}) | contended p99 "
                  f"{percentile(c, 99):.3f} s ({abandoned(s1, s2)})", flush=True)
    print(f"capacity {cap:.2f} req/s, budget {args.budget}, server args {server_args}")
    print("alone     ", describe(alone))
    print("contended ", describe(contended))
    print(f"contended/alone: p99 {percentile(contended, 99) / percentile(alone, 99):.2f}, "
          f"mean {statistics.mean(contended) / statistics.mean(alone):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
