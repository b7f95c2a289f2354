"""The overload scenario under each scheduling policy, side by side.

    python benchmarks/overload.py --out bench_results/overload      # ~5-8 minutes on an idle 2-core machine
    python benchmarks/overload.py --policies fair --calibration-from bench_results/overload/overload.json \
        --out bench_results/overload_fair_again                     # the same workload again, no calibration

1. Calibrate: start `tokenmill serve` (fcfs), measure capacity with a closed loop at --max-num-seqs
   concurrency, and the end-to-end time of one request at full load (E).
2. One seeded open-loop workload at --load x capacity: 20 % high priority (priority 0, TTFT target 1.5 E),
   80 % low (priority 1, target --low-target-factor x E); one tenant (the `user` field) sends half of all
   requests, five others share the rest. The same workload, with the same targets (--slo-classes), runs
   against a fresh server for each policy; admission control and timeouts are on in every run.
3. Report per policy: goodput (requests per second that completed within their class's TTFT target),
   p50/p99 TTFT per class, rejections (429) and timeouts per class, Jain index of tenants' service against
   their max-min fair share, and the light tenants' p99 TTFT.

Writes overload.json, overload.md and overload.png under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import shlex
import sys
from pathlib import Path

from tqdm import tqdm

from tokenmill.bench.launch import ServerProcess, free_port
from tokenmill.bench.overload import (
    Arrival,
    Outcome,
    completion_body,
    engine_step_counters,
    fairness,
    measure_capacity,
    percentile,
    poisson_times,
    run_open_loop,
)

logger = logging.getLogger("overload")
POLICIES = ["fcfs", "priority", "deadline", "fair"]
CLASSES = {"high": 0, "low": 1}


def serve_process(args: argparse.Namespace, name: str, *extra: str) -> ServerProcess:
    """A fresh `tokenmill serve`, started on entering a with block (the harness's launcher: waits for
    /health, stops the process group)."""
    cmd = [sys.executable, "-m", "tokenmill.entrypoints.cli", "--log-level", "WARNING", "serve",
           "--port", "{port}", "--model", args.model, "--dtype", args.dtype,
           "--kv-cache-memory", args.kv_cache_memory, "--max-num-seqs", str(args.max_num_seqs),
           "--max-queued-requests", "4096", "--no-log-requests", *extra]
    if args.max_num_batched_tokens:
        cmd += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if not args.interruptible_steps:
        cmd.append("--no-interruptible-steps")
    log = Path(args.out) / "logs" / f"{name}.log"
    return ServerProcess(shlex.join(cmd), free_port(), log, ready_timeout_s=300)


def build_workload(args: argparse.Namespace, rate: float, high_target: float, low_target: float) -> list[Arrival]:
    rng = random.Random(args.seed)
    times = poisson_times(rate, args.num_requests, rng)
    timeout = 4 * low_target
    out = []
    for i, t in enumerate(times):
        cls = "high" if rng.random() < 0.2 else "low"
        tenant = "heavy" if rng.random() < 0.5 else f"light-{rng.randrange(5)}"
        body = completion_body(i, max_tokens=args.output_len, words=args.prompt_words, priority=CLASSES[cls],
                               user=tenant, timeout=timeout)
        out.append(Arrival(t, cls, tenant, body))
    return out


def summarize(outcomes: list[Outcome], targets: dict[str, float], span: float) -> dict:
    res: dict = {"classes": {}}
    good = 0
    for cls, target in targets.items():
        mine = [o for o in outcomes if o.cls == cls]
        ok = [o.ttft for o in mine if o.status == "ok" and o.ttft is not None]
        met = sum(1 for x in ok if x <= target)
        good += met
        res["classes"][cls] = {
            "requests": len(mine), "completed": len(ok), "met_target": met, "target_s": target,
            "rejected": sum(o.status == "rejected" for o in mine), "timeouts": sum(o.status == "timeout" for o in mine),
            "errors": sum(o.status == "error" for o in mine),
            "ttft_p50_s": percentile(ok, 50), "ttft_p99_s": percentile(ok, 99)}
    wall = max(o.done for o in outcomes if o.done is not None) - min(o.sent for o in outcomes)
    res["goodput_req_s"] = good / wall
    res["wall_s"] = wall
    start = min(o.sent for o in outcomes)
    service: dict[str, float] = {}
    demand: dict[str, float] = {}
    for o in outcomes:
        demand[o.tenant] = demand.get(o.tenant, 0.0) + o.expected_tokens
        service[o.tenant] = service.get(o.tenant, 0.0) + sum(1 for t in o.token_times if t <= start + span)
    res["jain_fairness"] = fairness(service, demand)
    light = [o.ttft for o in outcomes if o.tenant != "heavy" and o.status == "ok" and o.ttft is not None]
    res["light_tenants_ttft_p99_s"] = percentile(light, 99)
    return res


def markdown(report: dict) -> str:
    c = report["calibration"]
    budget = report.get("max_num_batched_tokens")
    steps = "" if report.get("interruptible_steps", True) else ", steps not interruptible"
    lines = [f"Overload at {report['load']}x measured capacity ({c['req_per_s']:.2f} req/s at {report['max_num_seqs']} "
             f"running{f', step budget {budget} tokens' if budget else ''}{steps}), {report['num_requests']} requests, "
             f"output {report['output_len']} tokens; TTFT targets: "
             f"high {report['targets']['high']:.2f} s, low {report['targets']['low']:.2f} s.", "",
             "| policy | goodput (req/s) | high p50 / p99 TTFT (s) | low p50 / p99 TTFT (s) | high rejected | "
             "low rejected | timeouts | light tenants p99 TTFT (s) | Jain | steps abandoned / run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p, r in report["policies"].items():
        h, lo = r["classes"]["high"], r["classes"]["low"]
        abandoned = f"{r['engine_steps_interrupted']} / {r['engine_steps']}" if "engine_steps" in r else "n/a"
        lines.append(f"| {p} | {r['goodput_req_s']:.2f} | {h['ttft_p50_s']:.2f} / {h['ttft_p99_s']:.2f} | "
                     f"{lo['ttft_p50_s']:.2f} / {lo['ttft_p99_s']:.2f} | {h['rejected']} | {lo['rejected']} | "
                     f"{h['timeouts'] + lo['timeouts']} | {r['light_tenants_ttft_p99_s']:.2f} | "
                     f"{r['jain_fairness']:.3f} | {abandoned} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pols = list(report["policies"])
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    x = range(len(pols))
    for k, cls in enumerate(("high", "low")):
        vals = [report["policies"][p]["classes"][cls]["ttft_p99_s"] for p in pols]
        axes[0].bar([i + 0.4 * k for i in x], vals, width=0.4, label=f"{cls} p99")
        axes[0].axhline(report["targets"][cls], ls="--", lw=1, color=f"C{k}")
    axes[0].set_xticks([i + 0.2 for i in x], pols)
    axes[0].set_ylabel("TTFT p99 (s)")
    axes[0].set_yscale("log")
    axes[0].legend()
    axes[0].set_title("p99 TTFT per class (dashed: target)")
    axes[1].bar(x, [report["policies"][p]["goodput_req_s"] for p in pols], color="C2")
    axes[1].set_xticks(list(x), pols)
    axes[1].set_ylabel("requests/s within target")
    axes[1].set_title("goodput")
    for k, cls in enumerate(("high", "low")):
        axes[2].bar([i + 0.4 * k for i in x], [report["policies"][p]["classes"][cls]["rejected"] for p in pols],
                    width=0.4, label=f"{cls} rejected")
    axes[2].set_xticks([i + 0.2 for i in x], pols)
    axes[2].set_title("429 rejections per class")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_results/overload")
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--kv-cache-memory", default="512MiB")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="step budget of every server (default: the server's own default)")
    p.add_argument("--num-requests", type=int, default=400)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--prompt-words", type=int, default=24)
    p.add_argument("--load", type=float, default=2.0, help="offered load as a multiple of measured capacity")
    p.add_argument("--low-target-factor", type=float, default=8.0)
    p.add_argument("--policies", nargs="+", default=POLICIES, choices=POLICIES)
    p.add_argument("--interruptible-steps", action=argparse.BooleanOptionalAction, default=True,
                   help="the servers' --interruptible-steps (abandon a step for an arrival that outranks it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calibration-from", type=Path, default=None, metavar="OVERLOAD_JSON",
                   help="reuse the capacity and targets of an earlier report instead of calibrating, so two "
                        "code versions (or budgets) face the identical workload")
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.calibration_from:
        try:
            cal = json.loads(args.calibration_from.read_text())["calibration"]
        except (OSError, ValueError, KeyError) as e:
            p.error(f"--calibration-from {args.calibration_from}: not a readable overload report ({e!r})")
        logger.info("calibration from %s", args.calibration_from)
    else:
        logger.info("calibrating capacity")
        with serve_process(args, "calibration") as server:
            conc = args.max_num_seqs
            asyncio.run(measure_capacity(server.base_url, conc, conc, args.output_len, args.prompt_words))  # warm-up
            cal = asyncio.run(measure_capacity(server.base_url, conc, 4 * conc, args.output_len, args.prompt_words))
    e = cal["e2e_p50_s"]
    targets = {"high": 1.5 * e, "low": args.low_target_factor * e}
    rate = args.load * cal["req_per_s"]
    arrivals = build_workload(args, rate, targets["high"], targets["low"])
    span = arrivals[-1].at
    slo = f"0:ttft={targets['high']:.3f},1:ttft={targets['low']:.3f}"
    logger.info("capacity %.2f req/s, E %.2fs; offering %.2f req/s for %.0fs; --slo-classes %s",
                cal["req_per_s"], e, rate, span, slo)
    report = {"calibration": cal, "load": args.load, "num_requests": args.num_requests,
              "output_len": args.output_len, "max_num_seqs": args.max_num_seqs,
              "max_num_batched_tokens": args.max_num_batched_tokens,
              "interruptible_steps": args.interruptible_steps, "targets": targets,
              "slo_classes": slo, "span_s": span, "policies": {}}
    for policy in tqdm(args.policies, desc="policies"):
        with serve_process(args, policy, "--scheduling-policy", policy, "--slo-classes", slo) as server:
            outcomes = asyncio.run(run_open_loop(server.base_url, arrivals))
            steps = engine_step_counters(server.base_url)
        report["policies"][policy] = summarize(outcomes, targets, span) | steps
        logger.info("%s: %s", policy, json.dumps(report["policies"][policy]))
    (out / "overload.json").write_text(json.dumps(report, indent=2))
    (out / "overload.md").write_text(markdown(report))
    plot(report, out / "overload.png")
    logger.info("wrote %s/overload.{json,md,png}", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
