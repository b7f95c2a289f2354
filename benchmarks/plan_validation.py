"""Validate `tokenmill plan` against the real server: the same arrival traces through the simulator and through
`tokenmill serve` on the default model; simulated against measured p50/p99 TTFT and TPOT and throughput, with
the real run's own run-to-run noise beside each error.

    python benchmarks/plan_validation.py                      # profile, then every scenario (~25 minutes)
    python benchmarks/plan_validation.py --profile profile.json --duration 60 --repeats 2

    python benchmarks/plan_validation.py --tag zen4 --only "fair flood,shared prefix x2"   # some traces

Scenarios: steady Poisson at 0.3, 0.6, 0.9 and 1.2x the capacity the simulator predicts, a burst on top of a
steady load, a compressed daily curve (these three kinds on one `tokenmill serve`); a tenant flood under the
fair policy (three light tenants at 0.1x capacity each beside one sending 0.9x: `serve --scheduling-policy
fair`, a fresh tenant name per run so no run inherits another's fair-share counters; rows for the light
tenants and for the flooder); and a shared-prefix workload behind `tokenmill router --routing prefix-aware`
over 2 replicas (four system prefixes of 512 tokens before 64 tokens of each request's own, at 0.6x the two
replicas' simulated capacity). The 2 replicas are `serve --mock --mock-profile` processes stepping in the
profiled time, not real engines: two cores cannot hold two real engines beside the router and the load
generator, so that trace checks the routing, prefix caching and scheduling on a virtual clock against the
real router and servers, not the step-time model. Each of its runs gets a fresh router and replicas (empty
prefix caches). Capacity is the simulator's completed requests/s under a flood of the scenario's request
shape. The engine gets the cores; the load generator is asyncio/httpx in this process (no torch math), and
the simulator runs only between real runs, never at the same moment.
The simulated side is the planner's prediction: each step drawn from the profile's spread of measured against
fitted step time (`tokenmill plan --step-noise profile`, the default; averaged over 5 seeds), each request's
TTFT and e2e with a way outside the engine drawn from the profiled requests' (HTTP in, the first token back
out: `--path-latency profile`), and beside it the same simulation with every step at its fitted time and the
median path ("fitted"), with each step's stretch drawn on its own rather than in the profiled steps' runs
("independent"), and without the path ("no path"). The mock replicas step in exactly the fitted time,
so the router rows have no spread to draw; their path is the profiled server's, once (the router's own hop
is not in it).
Writes benchmarks/results/plan_validation_<tag>.json and .png (tag: --tag, else the CPU's vendor).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from tokenmill.bench.launch import ServerProcess, free_port
from tokenmill.config import EngineConfig
from tokenmill.engine.step_time import StepTimeModel
from tokenmill.kernels.cpu import cpu_name
from tokenmill.models.loader import open_model
from tokenmill.planning import workload
from tokenmill.planning.simulator import simulate

RESULTS = Path(__file__).resolve().parent / "results"
ENGINE_FLAGS = {"max_num_seqs": 32, "max_num_batched_tokens": 512}
SIZES = workload.Sizes(prompt_tokens=96, output_tokens=48, spread=0.5)
METRICS = [("ttft_s", "p50"), ("ttft_s", "p99"), ("tpot_s", "p50"), ("tpot_s", "p99")]


def flags() -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in ENGINE_FLAGS.items()]


def profile(path: Path, budget: float) -> None:
    subprocess.run([sys.executable, "-m", "tokenmill.entrypoints.cli", "profile", "--out", str(path),
                    "--budget", str(budget), *flags()], check=True)


LIGHT_TENANTS = ("light-a", "light-b", "light-c")
PREFIX_SIZES = workload.Sizes(prompt_tokens=64, output_tokens=48, spread=0.5)  # each request's own part
PREFIX_TOKENS, PREFIX_GROUPS = 512, 4


@dataclasses.dataclass(frozen=True)
class Case:
    """A trace, where it runs ("server": the plain server; "fair": a server under the fair policy; "router": the
    router over 2 mock replicas, prefix-aware) and the tenant groups it reports (name, tenant prefix)."""

    arrivals: list[workload.Arrival]
    kind: str = "server"
    groups: tuple[tuple[str, str], ...] = (("", ""),)


def fair_flood(capacity: float, duration: float) -> list[workload.Arrival]:
    lights = [a for k, t in enumerate(LIGHT_TENANTS)
              for a in workload.poisson(0.1 * capacity, duration, SIZES, seed=41 + k, tenant=t)]
    flood = workload.poisson(0.9 * capacity, duration, SIZES, seed=45, tenant="flood")
    return sorted(lights + flood, key=lambda a: a.t)


def shared_prefix(rate: float, duration: float, seed: int = 51) -> list[workload.Arrival]:
    """Poisson arrivals, each with one of PREFIX_GROUPS system prefixes (chosen at random) before its own part."""
    import random

    rng = random.Random(seed + 1)
    return [dataclasses.replace(a, prompt_tokens=PREFIX_TOKENS + a.prompt_tokens, prefix_tokens=PREFIX_TOKENS,
                                prefix_group=rng.randrange(PREFIX_GROUPS))
            for a in workload.poisson(rate, duration, PREFIX_SIZES, seed=seed)]


def scenarios(capacity: float, duration: float) -> dict[str, list[workload.Arrival]]:
    out = {f"steady {x:.1f}x": workload.poisson(x * capacity, duration, SIZES, seed=int(x * 10))
           for x in (0.3, 0.6, 0.9, 1.2)}
    base = workload.poisson(0.5 * capacity, duration, SIZES, seed=21)
    out["burst"] = workload.burst(base, duration / 3, int(capacity * duration / 6), SIZES, seed=22,
                                  span=duration / 12)
    # A day compressed into `duration`: night, morning ramp, midday peak at 1.1x, evening shoulder.
    shape = [(0.0, 0.15), (0.2, 0.4), (0.35, 0.8), (0.5, 1.1), (0.65, 0.8), (0.8, 0.5), (0.9, 0.2)]
    out["daily curve"] = workload.poisson([(f * duration, r * capacity) for f, r in shape], duration, SIZES, seed=23)
    return out


def simulated(arrivals, config, arch, model, num_blocks, tenant: str = "", **kw) -> dict:
    """The simulator's summary of the requests whose tenant starts with `tenant` (all by default)."""
    res = simulate(arrivals, config=config, arch=arch, model=model, num_blocks=num_blocks, **kw)
    return sim_group(res, tenant)


NOISE_SEEDS = 5  # simulations per trace with the profile's step spread; their percentiles are averaged


def simulations(arrivals, config, arch, model, step_noise: bool, **kw) -> tuple[list, dict[str, list]]:
    """(the prediction: runs with the profile's step spread, in runs as its steps came, and its requests' paths
    outside the engine, one per seed; beside it, the same without each part: "fitted", every step at its
    fitted time and each request the median path; "independent", each step's stretch drawn on its own;
    "no_path", the engine's own TTFT and e2e). Without a spread to draw from (an old profile, or
    mock replicas that step in exactly the fitted time) one run each."""
    seeds = range(NOISE_SEEDS) if step_noise and model.noise else range(1)

    def runs(seeds_: range, **extra) -> list:
        return [simulate(arrivals, config=config, arch=arch, model=model, seed=s, **kw, **extra) for s in seeds_]

    return runs(seeds, step_noise=step_noise), {
        "fitted": runs(range(1), step_noise=False),
        "independent": runs(seeds, step_noise=step_noise, noise_runs=False),
        "no_path": runs(seeds, step_noise=step_noise, path_latency=False)}


def mean_group(runs: list, tenant: str) -> dict:
    """sim_group over several seeded runs: each metric's percentile and the throughput's terms averaged."""
    groups = [sim_group(r, tenant) for r in runs]
    out = dict(groups[0])
    for metric in {m for m, _ in METRICS}:
        out[metric] = {k: statistics.fmean(g[metric][k] for g in groups) for k in groups[0][metric]}
    for key in ("output_tokens", "makespan_s"):
        out[key] = statistics.fmean(g[key] for g in groups)
    return out


def sim_group(res, tenant: str) -> dict:
    from tokenmill.planning.simulator import SimResult

    records = [r for r in res.records if r.arrival.tenant.startswith(tenant)]
    out = SimResult(records, res.replicas, res.span_s, res.busy_s, res.prefill_s).summary()
    done = [r for r in records if r.end_t is not None]
    out["makespan_s"] = max((r.end_t + r.out_s for r in done), default=math.nan) if tenant else res.span_s
    out["output_tokens"] = sum(r.tokens for r in done)
    return out


def real_group(arrivals, outs, tenant: str) -> dict:
    """A replay's measurement of the requests whose tenant starts with `tenant`, summarised as the simulator's."""
    pairs = [(a, o) for a, o in zip(arrivals, outs, strict=True) if a.tenant.startswith(tenant)]
    real = workload.measured([o for _, o in pairs])
    # Output tokens over the time from the first arrival to the last completion.
    real["makespan_s"] = max((a.t + o.done - o.sent for a, o in pairs if o.status == "ok"), default=math.nan)
    real["output_tokens"] = sum(o.tokens for _, o in pairs if o.status == "ok")
    return real


def throughput(summary: dict) -> float:
    """Output tokens per second from the first arrival to the last completion (under overload, what the
    server sustains; below it, the offered load)."""
    return summary["output_tokens"] / max(summary["makespan_s"], 1e-9)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", help="an existing profile (default: profile now)")
    ap.add_argument("--profile-budget", type=float, default=240)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per scenario")
    ap.add_argument("--repeats", type=int, default=2, help="real runs per scenario (noise)")
    ap.add_argument("--only", "--traces", dest="only", help="comma-separated scenario names (default: all)")
    ap.add_argument("--tag", help="names the profile and results files (default: the CPU's vendor)")
    ap.add_argument("--resimulate", metavar="RESULTS_JSON",
                    help="no real runs: take the measured side of each chosen trace from this earlier results file "
                         "(made with the same profile, duration and traces) and simulate again (the simulator "
                         "changed; the real runs do not depend on it)")
    ap.add_argument("--replica-check", action="store_true",
                    help="also check the replica question on the real router over mock replicas that take the "
                         "profiled step time: the planner's fewest replicas N meets the SLO there, N-1 does not")
    ap.add_argument("--slo", default="ttft=1s,tpot=250ms", help="SLO of the replica check (p99)")
    args = ap.parse_args()
    RESULTS.mkdir(exist_ok=True)
    tag = args.tag or ("amd" if "AMD" in cpu_name() else "intel" if "Intel" in cpu_name() else "cpu")
    prof = Path(args.profile) if args.profile else RESULTS / f"plan_profile_{tag}.json"
    if not args.profile:
        profile(prof, args.profile_budget)
    model = StepTimeModel.load(prof)
    config = EngineConfig.from_kwargs(model="default", **ENGINE_FLAGS)
    arch = open_model("default").arch
    num_blocks = model.source.get("num_blocks")
    earlier = None
    if args.resimulate:
        earlier = json.loads(Path(args.resimulate).read_text())
        if earlier["duration_s"] != args.duration or earlier["profile"] != model.source:
            ap.error("--resimulate needs a results file of the same duration and profile")
    pair = dict(replicas=2, routing="prefix-aware", num_blocks=None)  # as the mock replicas size their pools
    if earlier is not None and "pair_capacity_rps" in earlier:  # the traces that were replayed, exactly
        capacity, pair_capacity = earlier["capacity_rps"], earlier["pair_capacity_rps"]
    else:
        flood = workload.poisson(50.0, 60.0, SIZES, seed=99)
        capacity = simulated(flood, config, arch, model, num_blocks)["requests_per_s"]
        pair_capacity = simulated(shared_prefix(40.0, 60.0, seed=98), config, arch, model, **pair)["requests_per_s"]
    print(f"simulated capacity: {capacity:.2f} requests/s of ~{SIZES.prompt_tokens} in / {SIZES.output_tokens} out")
    print(f"simulated capacity of 2 replicas on the shared-prefix shape: {pair_capacity:.2f} requests/s")
    cases = {k: Case(v) for k, v in scenarios(capacity, args.duration).items()}
    cases["fair flood"] = Case(fair_flood(capacity, args.duration), "fair",
                               (("fair flood: light tenants", "light-"), ("fair flood: flooder", "flood")))
    cases["shared prefix x2"] = Case(shared_prefix(0.6 * pair_capacity, args.duration), "router")
    if args.only:
        wanted = [x.strip() for x in args.only.split(",")]
        unknown = [w for w in wanted if w not in cases]
        if unknown:
            ap.error(f"unknown scenario(s) {unknown}; choose from {list(cases)}")
        cases = {k: v for k, v in cases.items() if k in wanted}
    rows = []
    runs = 0
    for kind in ("server", "fair", "router"):
        mine = {k: c for k, c in cases.items() if c.kind == kind}
        if not mine:
            continue
        if earlier is not None:
            for name, case in mine.items():
                runs_, beside = simulations(case.arrivals, _target(kind, prof).config(config), arch, model,
                                            kind != "router", **(pair if kind == "router" else {"num_blocks": num_blocks}))
                for g, prefix in case.groups:
                    old = next(r for r in earlier["rows"] if r["scenario"] == (g or name))
                    assert old["requests"] == sum(a.tenant.startswith(prefix) for a in case.arrivals), g or name
                    row = _row(g or name, case, old["real"], mean_group(runs_, prefix),
                               {k: mean_group(v, prefix) for k, v in beside.items()})
                    rows.append(row)
                    print(_row_text(row), flush=True)
            continue
        with _target(kind, prof) as target:
            for name, case in tqdm(mine.items(), desc=f"scenarios ({kind})"):
                reals: dict[str, list[dict]] = {g: [] for g, _ in case.groups}
                for _ in range(args.repeats):  # each run its own prompts: no prefix-cache hits on an earlier run's
                    runs += 1
                    arrivals = case.arrivals
                    if kind == "fair":  # fresh tenants: no fair-share counters carried over from an earlier run
                        arrivals = [dataclasses.replace(a, tenant=f"{a.tenant}-{runs}") for a in arrivals]
                    with target.run() as url:
                        outs = workload.replay(url, arrivals, arch.vocab_size, run=runs)
                    for g, prefix in case.groups:
                        reals[g].append(real_group(arrivals, outs, prefix))
                # mock replicas (the router rows) step in exactly the fitted time: no spread to simulate there
                runs_, beside = simulations(case.arrivals, target.config(config), arch, model, kind != "router",
                                            **(pair if kind == "router" else {"num_blocks": num_blocks}))
                for g, prefix in case.groups:
                    row = _row(g or name, case, reals[g], mean_group(runs_, prefix),
                               {k: mean_group(v, prefix) for k, v in beside.items()})
                    rows.append(row)
                    print(_row_text(row), flush=True)
    replica_check = _replica_check(prof, model, config, arch, capacity, args) if args.replica_check else None
    out = {"cpu": cpu_name(), "profile": model.source, "replica_check": replica_check, "engine": ENGINE_FLAGS, "sizes": dataclasses.asdict(SIZES),
           "capacity_rps": capacity, "pair_capacity_rps": pair_capacity, "duration_s": args.duration, "repeats": args.repeats, "rows": rows,
           "command": "python benchmarks/plan_validation.py " + " ".join(sys.argv[1:]),
           "real_runs_from": earlier["command"] if earlier else None}
    path = RESULTS / f"plan_validation_{tag}.json"
    path.write_text(json.dumps(out, indent=1))
    _plot(rows, path.with_suffix(".png"), cpu_name())
    print(f"written {path} and {path.with_suffix('.png')}")
    return 0


def _row(name: str, case: Case, reals: list[dict], sim: dict, beside: dict[str, dict] | None = None) -> dict:
    """Simulated against measured per metric: `sim` is the planner's prediction, `beside` the same simulation
    with a part of it left out (simulations()), each with its own error."""
    beside = beside or {}
    row = {"scenario": name, "kind": case.kind, "requests": reals[0]["requests"], "real": reals, "sim": sim,
           **{f"sim_{k}": v for k, v in beside.items()}}

    def cell(got: float, others: dict[str, float], vals: list[float]) -> dict:
        mean = statistics.fmean(vals)
        out = {"sim": got, "real": mean, "error": got / mean - 1 if mean else math.nan,
               "noise": (max(vals) - min(vals)) / mean if mean and len(vals) > 1 else None}
        for k, v in others.items():
            out[f"sim_{k}"] = v
            out[f"error_{k}"] = v / mean - 1 if mean else math.nan
        return out

    for metric, p in METRICS:
        row[f"{metric}.{p}"] = cell(sim[metric][p], {k: b[metric][p] for k, b in beside.items()},
                                    [r[metric][p] for r in reals])
    row["throughput"] = cell(throughput(sim), {k: throughput(b) for k, b in beside.items()},
                             [throughput(r) for r in reals])
    return row


class _target:
    """Where a kind of scenario runs: one server for all its traces ("server", "fair"), or a fresh router over
    2 mock replicas for each run ("router": empty prefix caches and prefix index every time)."""

    def __init__(self, kind: str, prof: Path):
        self.kind, self.prof = kind, prof
        self.server: ServerProcess | None = None
        self.log = Path(tempfile.gettempdir()) / f"plan_validation_{kind}.log"

    def config(self, base: EngineConfig) -> EngineConfig:
        return dataclasses.replace(base, scheduling_policy="fair") if self.kind == "fair" else base

    def __enter__(self) -> _target:
        if self.kind != "router":
            policy = " --scheduling-policy fair" if self.kind == "fair" else ""
            cmd = (f"{sys.executable} -m tokenmill.entrypoints.cli serve --port {{port}} --no-inproc "
                   f"{' '.join(flags())}{policy}")
            self.server = ServerProcess(cmd, free_port(), self.log).start()
            arch = open_model("default").arch
            workload.replay(self.server.base_url, workload.poisson(2.0, 5.0, SIZES, seed=1), arch.vocab_size,
                            run=999)  # warm-up
        return self

    def __exit__(self, *exc) -> None:
        if self.server is not None:
            self.server.stop()

    @contextlib.contextmanager
    def run(self):
        if self.server is not None:
            yield self.server.base_url
            return
        cmd = (f"{sys.executable} -m tokenmill.entrypoints.cli router --port {{port}} --spawn 2 --mock "
               f"--routing prefix-aware --replica-args=--mock-profile={self.prof} {' '.join(flags())}")
        with ServerProcess(cmd, free_port(), self.log) as router:
            yield router.base_url


def _replica_check(prof: Path, model, config, arch, capacity: float, args) -> dict:
    """Demand of 2.5 single replicas; the planner's fewest replicas for the SLO, then the real router (least-load)
    over N and over N - 1 mock replicas, each stepping in the profiled time (two cores cannot hold N real ones)."""
    from tokenmill.bench.metrics import parse_slo
    from tokenmill.planning.simulator import Slo, find_replicas

    slo = Slo(**{f"{k}_s": v for k, v in parse_slo(args.slo).items()})
    arrivals = workload.poisson(2.5 * capacity, args.duration, SIZES, seed=31)

    def sim(k: int):
        return simulate(arrivals, config=config, arch=arch, model=model, replicas=k, routing="least-load",
                        num_blocks=model.source.get("num_blocks"))

    best, _ = find_replicas(sim, slo, 16)
    out = {"rate_rps": 2.5 * capacity, "slo": dataclasses.asdict(slo), "planned_replicas": best, "runs": {}}
    for k in (best, best - 1):
        if k < 1:
            continue
        port = free_port()
        cmd = (f"{sys.executable} -m tokenmill.entrypoints.cli router --port {{port}} --spawn {k} --mock "
               f"--routing least-load --replica-args=--mock-profile={prof} {' '.join(flags())}")
        with ServerProcess(cmd, port, Path(tempfile.gettempdir()) / "plan_validation_router.log") as router:
            real = workload.measured(workload.replay(router.base_url, arrivals, arch.vocab_size, run=100 + k))
        meets = (real["rejected_429"] == 0 and real["completed"] == len(arrivals)
                 and real["ttft_s"]["p99"] <= slo.ttft_s and real["tpot_s"]["p99"] <= slo.tpot_s)
        out["runs"][k] = {"measured": real, "simulated": sim(k).summary(slo), "meets_slo": meets}
        print(f"replica check: {k} replicas: p99 TTFT {real['ttft_s']['p99']:.2f}s, p99 TPOT "
              f"{real['tpot_s']['p99'] * 1e3:.0f}ms -> {'meets' if meets else 'misses'} the SLO", flush=True)
    return out


def _row_text(row: dict) -> str:
    def cell(key: str) -> str:
        c = row[key]
        noise = f" (noise {c['noise']:.0%})" if c.get("noise") is not None else ""
        beside = "".join(f" [{k[6:].replace('_', ' ')} {v:+.0%}]" for k, v in c.items() if k.startswith("error_"))
        return f"{key} {c['error']:+.0%}{beside}{noise}"

    return f"{row['scenario']:<14} " + "  ".join(cell(f"{m}.{p}") for m, p in METRICS) + "  " + cell("throughput")


def _plot(rows: list[dict], path: Path, cpu: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [f"{m}.{p}" for m, p in METRICS] + ["throughput"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(keys)
    for k, key in enumerate(keys):
        xs = [i + k * width for i in range(len(rows))]
        ax.bar(xs, [100 * r[key]["error"] for r in rows], width, label=key)
        noise = [100 * (r[key]["noise"] or 0) for r in rows]
        ax.errorbar(xs, [0] * len(rows), yerr=noise, fmt="none", ecolor="k", alpha=0.4, capsize=2)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], [r["scenario"] for r in rows])
    ax.set_ylabel("simulated / measured - 1 (%)")
    ax.set_title(f"tokenmill plan against the real server ({cpu}); whiskers: run-to-run noise of the real runs")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
