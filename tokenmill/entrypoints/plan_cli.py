"""`tokenmill profile` (measure this machine's step time and fit the planner's model) and `tokenmill plan`
(simulate a demand curve on the real scheduler and routing logic with that model: latency, goodput, 429s,
utilisation, cost, and the fewest replicas that hold an SLO)."""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Callable

from tokenmill.config import EngineConfig
from tokenmill.errors import ConfigError

logger = logging.getLogger(__name__)


def add_profile_parser(subparsers, add_engine_args: Callable[[argparse.ArgumentParser], None],
                       engine_config: Callable[[argparse.Namespace], EngineConfig]) -> None:
    p = subparsers.add_parser(
        "profile", help="measure this machine's engine step time and fit the planner's step-time model",
        description="Serves the model as `serve` would (same engine flags), drives it over HTTP with decode "
                    "batches, prompt chunks, long contexts and mixed steps, times every engine step, and fits step "
                    "time as a function of what a step holds. Writes the model as JSON (for `tokenmill plan`) and a plot of fitted "
                    "against measured step times. Run it on a quiet machine: another busy process on the cores "
                    "stretches steps.",
        epilog="example: tokenmill profile --out profile.json")
    p.add_argument("--out", default="profile.json", help="where to write the model (default: profile.json)")
    p.add_argument("--plot", default=None, help="PNG of fitted against measured (default: OUT with .png)")
    p.add_argument("--budget", type=float, default=240.0, help="seconds of measuring at most (default: 240)")
    add_engine_args(p)

    def run(args: argparse.Namespace) -> int:
        from tqdm import tqdm

        from tokenmill.planning.profiler import DRIFT_WORKLOAD, plot_fit, profile

        bar = tqdm(desc="profiling", unit="workload")
        model, samples = profile(engine_config(args), args.budget,
                                 progress=lambda label: (bar.set_postfix_str(label), bar.update()))
        bar.close()
        model.save(args.out)
        png = args.plot or (args.out.rsplit(".", 1)[0] + ".png")
        plot_fit(model, samples, png)
        src = model.source
        print(f"{src['samples']} steps measured on {src['cpu']}: fitted within {src['median_abs_rel_error']:.1%} "
              f"(median), {src['p90_abs_rel_error']:.1%} (p90); model in {args.out}, plot in {png}")
        for low, ratios in model.noise:
            print(f"  steps fitted at {low * 1e3:.1f} ms and up: measured / fitted p50 {ratios[len(ratios) // 2]:.2f}, "
                  f"p90 {ratios[int(0.9 * (len(ratios) - 1))]:.2f}, max {ratios[-1]:.2f} ({len(ratios)} steps)")
        if "speed_drift" in src:
            print(f"  the machine's speed while profiling: the same {DRIFT_WORKLOAD} burst took {src['speed_drift']:+.0%} "
                  f"per step after the steady load against before it")
        from tokenmill.planning.simulator import path_bins

        for group in path_bins(model.path):
            low, high, ways = int(group[0][2]), int(group[-1][2]), sorted(p[0] + p[1] for p in group)
            print(f"  requests sent with {low}-{high} in flight: way outside the engine (HTTP in, first token out) "
                  f"p50 {ways[len(ways) // 2] * 1e3:.1f} ms, p90 {ways[int(0.9 * (len(ways) - 1))] * 1e3:.1f} ms "
                  f"({len(ways)} requests)")
        return 0

    p.set_defaults(func=run)


def _slo(text: str | None):
    from tokenmill.bench.metrics import parse_slo
    from tokenmill.planning.simulator import Slo

    limits = parse_slo(text)
    if "e2e" in limits:
        raise ConfigError("the planner holds ttft and tpot targets; e2e is not one of them")
    return Slo(**{f"{k}_s": v for k, v in limits.items()})


def add_plan_parser(subparsers, add_engine_args: Callable[[argparse.ArgumentParser], None],
                    engine_config: Callable[[argparse.Namespace], EngineConfig]) -> None:
    from tokenmill.cluster.policy import POLICIES

    p = subparsers.add_parser(
        "plan", help="predict latency, throughput and the replicas a demand curve needs (no model is run)",
        description="A discrete-event simulation of the real engine scheduler, scheduling policy, KV block pool, "
                    "admission caps and router policy on a virtual clock, with the step time `tokenmill "
                    "profile` measured. Demand: --rate (Poisson, optionally with a --burst) or --trace CSV "
                    "(per request: t,prompt_tokens,output_tokens[,tenant,priority,prefix_group,prefix_tokens]; "
                    "or a demand curve: t,rate).",
        epilog="example: tokenmill plan --profile profile.json --rate 3 --duration 600 --slo ttft=2s,tpot=150ms "
               "--find-replicas --price-per-replica-hour 0.10")
    add = p.add_argument
    add("--profile", required=True, help="the step-time model from `tokenmill profile`")
    add("--trace", help="CSV demand (see above)")
    add("--rate", type=float, help="Poisson arrivals per second")
    add("--duration", type=float, default=600.0, help="seconds of demand with --rate (default: 600)")
    add("--burst", help="extra arrivals AT,COUNT[,SPAN] (seconds, requests, seconds), e.g. 120,200,5")
    add("--prompt-tokens", type=int, default=128, help="mean prompt length (default: 128)")
    add("--output-tokens", type=int, default=128, help="mean output length (default: 128)")
    add("--spread", type=float, default=0.0, help="lengths uniform within mean x (1 +- SPREAD) (default: 0)")
    add("--demand-seed", type=int, default=0, help="seed of the generated arrivals (default: 0)")
    add("--slo", help="p99 targets, e.g. ttft=2s,tpot=150ms")
    add("--replicas", type=int, default=1, help="replicas to simulate (default: 1)")
    add("--find-replicas", action="store_true", help="find the fewest replicas that meet --slo with no 429")
    add("--max-replicas", type=int, default=64)
    add("--routing", default="round-robin", choices=list(POLICIES), help="router policy (default: round-robin)")
    add("--autoscale", help="simulate the router's autoscaler from --replicas (same spec as `tokenmill router "
                            "--autoscale`, e.g. min=1,max=6,target=2,up_delay=5,down_delay=60)")
    add("--autoscale-interval", type=float, default=1.0, help="seconds between autoscaler decisions (default: 1)")
    add("--cold-start", type=float, default=15.0,
        help="seconds from the autoscaler asking for a replica to its taking requests (default: 15)")
    add("--max-queued-requests", type=int, default=256, help="the server's admission cap (as `serve`)")
    add("--max-queued-tokens", type=int, default=262144, help="the server's admission cap (as `serve`)")
    add("--max-queue-delay", type=float, default=None,
        help="seconds: 429 when the predicted wait for a first token exceeds it (as `serve`; default: off)")
    add("--step-noise", choices=["profile", "independent", "off"], default="profile",
        help="profile: each simulated step stretched or shortened as the profiled steps of about its length "
             "measured against the fit, in runs as they came (seeded by --seed-noise), so the tails see the "
             "stalls; independent: the same stretches, each step its own draw; off: every step takes its fitted "
             "time (default: profile; a profile without the spread is always fitted time)")
    add("--seed-noise", type=int, default=0, help="seed of the step-time and request-path draws (default: 0)")
    add("--path-latency", choices=["profile", "off"], default="profile",
        help="profile: each request's TTFT and e2e include its way outside the engine (HTTP in, the first token "
             "back out to the client), as the profiled requests sent with about as many in flight measured it "
             "(drawn per request, or their median with --step-noise off); off: the engine's own (default: profile)")
    add("--price-per-replica-hour", type=float, help="cost of one replica for an hour, for cost per token")
    add("--json", dest="json_out", help="write the prediction as JSON here")
    add("--plot", help="PNG of demand, queue and TTFT over time")
    add_engine_args(p)
    p.set_defaults(func=lambda args: run_plan(args, engine_config(args)))


def run_plan(args: argparse.Namespace, config: EngineConfig) -> int:
    from tokenmill.cluster.autoscale_policy import AutoscaleConfig
    from tokenmill.engine.step_time import StepTimeModel
    from tokenmill.models.loader import open_model
    from tokenmill.planning import report, workload
    from tokenmill.planning.simulator import Limits, find_replicas, simulate

    model = StepTimeModel.load(args.profile)
    sizes = workload.Sizes(args.prompt_tokens, args.output_tokens, args.spread)
    if (args.trace is None) == (args.rate is None):
        raise ConfigError("give exactly one of --trace CSV or --rate R")
    if args.trace:
        arrivals = workload.load_trace(args.trace, sizes, args.demand_seed)
    else:
        arrivals = workload.poisson(args.rate, args.duration, sizes, args.demand_seed)
    if args.burst:
        try:
            at, count, *span = (float(x) for x in args.burst.split(","))
        except ValueError:
            raise ConfigError(f"--burst takes AT,COUNT[,SPAN], got {args.burst!r}") from None
        arrivals = workload.burst(arrivals, at, int(count), sizes, args.demand_seed + 1, span[0] if span else 1.0)
    if not arrivals:
        raise ConfigError("the demand has no arrivals")
    if args.max_queue_delay is not None and not 0 < args.max_queue_delay < math.inf:
        raise ConfigError(f"--max-queue-delay must be a positive number of seconds, got {args.max_queue_delay}")
    slo = _slo(args.slo)
    arch = open_model(config.model).arch
    logging.getLogger("tokenmill.engine").setLevel(logging.WARNING)  # simulated preemptions are not news
    limits = Limits(args.max_queued_requests, args.max_queued_tokens, args.max_queue_delay)
    num_blocks = model.source.get("num_blocks") if config.kv_cache_memory is None else None

    autoscale = AutoscaleConfig.parse(args.autoscale) if args.autoscale else None
    if autoscale and args.find_replicas:
        raise ConfigError("--find-replicas searches fixed replica counts; with --autoscale the autoscaler sets them")

    def run(k: int):
        res = simulate(arrivals, config=config, arch=arch, model=model, replicas=k, limits=limits,
                       routing=args.routing, num_blocks=num_blocks, autoscale=autoscale,
                       autoscale_interval=args.autoscale_interval, cold_start_s=args.cold_start,
                       step_noise=args.step_noise != "off", noise_runs=args.step_noise == "profile",
                       path_latency=args.path_latency == "profile",
                       seed=args.seed_noise)
        logger.info("%d replica(s): p99 TTFT %.3fs, %d rejected", k, res.summary(slo)["ttft_s"]["p99"],
                    res.summary(slo)["rejected_429"])
        return res

    if args.find_replicas:
        if slo.ttft_s == float("inf") and slo.tpot_s == float("inf"):
            raise ConfigError("--find-replicas needs --slo")
        best, runs = find_replicas(run, slo, args.max_replicas)
        if best < 0:
            print(f"no replica count up to {args.max_replicas} meets the SLO")
            result = runs[-1]
        else:
            result = next(r for r in runs if r.replicas == best)
            print(f"fewest replicas that meet the SLO: {best}")
    else:
        result = run(args.replicas)
    summary = result.summary(slo)
    cost = result.cost(args.price_per_replica_hour) if args.price_per_replica_hour else None
    print(report.table(summary, cost))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"summary": summary, "cost": cost, "slo": vars(slo), "profile": model.source,
                       "step_noise": args.step_noise if model.noise else "off (the profile kept no spread)",
                       "path_latency": args.path_latency if model.path else "off (the profile kept no paths)",
                       "scale_events": result.scale_events}, f, indent=1)
    if args.plot:
        report.plot(result, args.plot, f"{len(arrivals)} requests, {result.replicas} replica(s)")
    return 0 if summary["meets_slo"] or not args.slo else 1


def add_ledger_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "ledger", help="when a server's inference compute passes the model's training compute",
        description="Reads a running server's GET /v1/usage (FLOPs counted per finished request: 2 per active "
                    "weight per token plus attention, cached prompt tokens free) and reports the inference "
                    "compute per day at the observed traffic and the date cumulative inference compute passes "
                    "the training compute (given, counted by tokenmill distill, or 6 x active parameters x "
                    "training tokens).",
        epilog="example: tokenmill ledger --url http://127.0.0.1:8000 --training-tokens 2e12 --sample-seconds 60")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="the server (its /v1/usage)")
    src.add_argument("--usage", help="a saved /v1/usage JSON (rate: its lifetime average)")
    train = p.add_mutually_exclusive_group(required=True)
    train.add_argument("--training-flops", type=float, help="compute that trained the model, FLOPs")
    train.add_argument("--training-tokens", type=float, help="tokens it was trained on (6 x params x tokens)")
    train.add_argument("--training-compute", metavar="DIR_OR_JSON",
                       help="the compute a run counted: a `tokenmill distill` output directory or its "
                            "training_compute.json (its total: training plus the teacher's data)")
    p.add_argument("--sample-seconds", type=float, default=0.0,
                   help="with --url: measure the rate over this many seconds now, instead of the server's "
                        "lifetime average")
    p.add_argument("--api-key", help="the server's API key (or $TOKENMILL_API_KEY)")
    p.add_argument("--json", dest="json_out", help="write the report as JSON here")
    p.set_defaults(func=run_ledger)


def training_compute_flops(path: str) -> float:
    """The total of a training_compute.json (`tokenmill distill` writes one into its output directory)."""
    from pathlib import Path

    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "training_compute.json"
    try:
        total = float(json.loads(p.read_text())["total_flops"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"cannot read the training compute from {p}: {e}") from None
    if not total > 0:
        raise ConfigError(f"the training compute in {p} is not positive: {total}")
    return total


def run_ledger(args: argparse.Namespace) -> int:
    import os
    import time

    from tokenmill.planning.ledger import crossover, rate

    def snapshot() -> dict:
        import httpx

        key = args.api_key or os.environ.get("TOKENMILL_API_KEY", "").split(",")[0]
        try:
            r = httpx.get(args.url.rstrip("/") + "/v1/usage", timeout=30,
                          headers={"Authorization": f"Bearer {key}"} if key else {})
            r.raise_for_status()
            return r.json()
        except (httpx.HTTPError, ValueError) as e:
            raise ConfigError(f"cannot read {args.url}/v1/usage: {e}") from None

    if args.usage:
        try:
            with open(args.usage) as f:
                first = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read --usage {args.usage}: {e}") from None
        second = None
    else:
        first = snapshot()
        second = None
        if args.sample_seconds > 0:
            time.sleep(args.sample_seconds)
            second = snapshot()
    latest = second or first
    if args.training_flops is not None:
        training = args.training_flops
    elif args.training_compute is not None:
        training = training_compute_flops(args.training_compute)
    else:
        if not latest.get("model"):
            raise ConfigError("the server does not know its model's parameter count; give --training-flops")
        training = 6.0 * latest["model"]["active_params"] * args.training_tokens
    report = crossover(latest, rate(first, second), training)
    per_day = report["flops_per_day"]
    print(f"inference so far      {report['inference_flops_so_far']:.4g} FLOPs "
          f"({latest['total']['requests']} requests, {latest['uptime_s']:.0f} s of uptime)")
    print(f"observed rate         {report['flops_per_s']:.4g} FLOPs/s = {per_day:.4g} FLOPs/day "
          f"({'sampled now' if second else 'lifetime average'})")
    print(f"training compute      {training:.4g} FLOPs")
    if report["passed"]:
        print("crossover             passed already: inference has used more compute than training")
    elif report["date_utc"] is None:
        print("crossover             never at this rate")
    else:
        print(f"crossover             in {report['days_from_now']:.4g} days, on {report['date_utc']} UTC")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=1)
    return 0
