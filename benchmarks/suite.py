"""The standard side-by-side suite (`make bench`): tokenmill and each peer on the same GGUF, one server at a
time, alternating A B A B with repeats; each system's two runs give its own A/A noise.

    python benchmarks/suite.py                   # quick profile (default of `make bench`)
    python benchmarks/suite.py --profile full    # the long one
    python benchmarks/suite.py --systems tokenmill,llama.cpp --out-dir benchmarks/results/suite

Scenarios, all through each system's OpenAI-compatible server with `tokenmill bench serve`'s load generator:
- offline: every request at once (rate inf), random 128-token prompts, 128 output tokens: output tok/s;
- poisson: Poisson arrivals at several rates: goodput under p99 TTFT <= 2 s / TPOT <= 100 ms, and the
  highest rate meeting that SLO;
- shared-prefix: G groups sharing long system prompts, 4 in flight: TTFT with tokenmill's prefix caching on
  vs off (a second tokenmill server started with --no-enable-prefix-caching), peers at their defaults;
- concurrency: closed loop at 1..32 requests in flight: output tok/s and TPOT.

Writes one JSON per run under --out-dir, plots, and suite.md: ratios tokenmill / peer with the noise band.
Run it on an otherwise idle machine; it starts and stops every server itself.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tokenmill.bench import datasets  # noqa: E402
from tokenmill.bench.launch import ServerProcess  # noqa: E402
from tokenmill.bench.serve import load_tokenizer, run_point, save, sweep_object  # noqa: E402

logger = logging.getLogger("suite")
SLO = {"ttft": 2.0, "tpot": 0.1}
PEERS = ROOT / "benchmarks" / "peers"
# Measured elsewhere (../shared/PEERS.md): vLLM's CPU backend, bfloat16, 128 in / 128 out, same kind of machine.
VLLM_REFERENCE = {"offline": 888.0, "concurrency-32": 511.0, "concurrency-16": 328.0, "concurrency-4": 100.0}


@dataclass
class System:
    name: str
    launch: str
    backend: str
    build: str | None = None
    repeats: int | None = None  # None: the profile's


@dataclass
class Profile:
    repeats: int
    offline_prompts: int
    out_len: int
    rates: list[float]
    rate_seconds: float
    min_prompts: int
    prefix: dict
    concurrencies: list[int]
    per_concurrency: int
    llama_quants: list[str]
    slow_peer_repeats: int  # transformers is several times slower: fewer repeats keep the suite short
    offline_out: int = 128  # 128 in / 128 out: the workload of vLLM's reference figures
    extra: dict = field(default_factory=dict)


PROFILES = {
    # ~20 min on 2 idle cores once the peers are built (estimate from PEERS.md's speeds; not timed).
    "quick": Profile(repeats=2, offline_prompts=32, out_len=64, rates=[1.0, 2.0, 4.0], rate_seconds=15,
                     min_prompts=8, prefix={"groups": 4, "prefix_len": 512, "suffix_len": 32, "num": 16},
                     concurrencies=[1, 4, 16, 32], per_concurrency=2, llama_quants=["Q8_0"], slow_peer_repeats=1),
    # Seconds: checks that every system starts, answers and lands in the report; its figures mean nothing.
    "smoke": Profile(repeats=2, offline_prompts=4, out_len=8, rates=[2.0], rate_seconds=2, min_prompts=4,
                     prefix={"groups": 2, "prefix_len": 128, "suffix_len": 16, "num": 4}, concurrencies=[1, 4],
                     per_concurrency=1, llama_quants=["Q8_0"], slow_peer_repeats=1, offline_out=8),
    # ~3 h (estimate): three llama.cpp weight formats, 200-prompt offline runs, 60 s per Poisson rate.
    "full": Profile(repeats=2, offline_prompts=200, out_len=128, rates=[0.5, 1.0, 1.5, 2.0, 3.0, 4.0],
                    rate_seconds=60, min_prompts=16,
                    prefix={"groups": 8, "prefix_len": 1024, "suffix_len": 32, "num": 64},
                    concurrencies=[1, 2, 4, 8, 16, 32], per_concurrency=4, llama_quants=["Q4_1", "Q8_0", "Q4_0"],
                    slow_peer_repeats=2),
}


def systems_for(profile: Profile, names: list[str]) -> list[System]:
    out = []
    for n in names:
        if n == "tokenmill":
            out.append(System("tokenmill", f"{PEERS}/tokenmill.sh serve {{port}}", "openai"))
        elif n == "llama.cpp":
            for q in profile.llama_quants:
                # Q4_1 is the GGUF as shipped; the others are llama.cpp's faster requantized copies.
                gguf = "" if q == "Q4_1" else q
                out.append(System(f"llama.cpp-{q}", f"{PEERS}/llama_cpp.sh serve {{port}} {gguf}".rstrip(),
                                  "llama.cpp", build=f"{PEERS}/llama_cpp.sh build"))
        elif n == "transformers":
            out.append(System("transformers", f"{PEERS}/transformers.sh serve {{port}}", "transformers",
                              build=f"{PEERS}/transformers.sh build", repeats=profile.slow_peer_repeats))
        else:
            raise SystemExit(f"unknown system {n!r}: choose from tokenmill, llama.cpp, transformers")
    return out


def scenarios(profile: Profile) -> list[dict]:
    """Each: name, dataset args, load args. Prompt counts follow the profile."""
    o = profile.out_len
    rnd = {"dataset": "random", "input_len": (128, 128), "output_len": (o, o)}
    n = profile.offline_out
    out = [{"name": "offline", **rnd, "output_len": (n, n), "num": profile.offline_prompts,
            "rate": math.inf, "conc": None}]
    for r in profile.rates:
        out.append({"name": f"poisson-{r:g}", **rnd, "num": max(profile.min_prompts, round(r * profile.rate_seconds)),
                    "rate": r, "conc": None, "group": "poisson"})
    p = profile.prefix
    out.append({"name": "shared-prefix", "dataset": "shared-prefix", "output_len": (32, 32), "num": p["num"],
                "groups": p["groups"], "prefix_len": p["prefix_len"], "suffix_len": p["suffix_len"],
                "rate": math.inf, "conc": 4})
    for c in profile.concurrencies:
        out.append({"name": f"concurrency-{c}", **rnd, "num": max(4, profile.per_concurrency * c), "rate": math.inf,
                    "conc": c, "group": "concurrency"})
    return out


def build_datasets(scens: list[dict]) -> dict[str, list[datasets.BenchRequest]]:
    tok = load_tokenizer("default")
    vocab = (100, tok.vocab_size - 100)
    out = {}
    for s in scens:
        out[s["name"]] = datasets.build(s["dataset"], tok, s["num"], seed=0, input_len=s.get("input_len"),
                                        output_len=s["output_len"], vocab=vocab, groups=s.get("groups", 4),
                                        prefix_len=s.get("prefix_len", 1024), suffix_len=s.get("suffix_len", 32))
    return out


def run_system(system: System, scens: list[dict], data: dict, rep: int, args, results: dict,
               only: set[str] | None = None) -> None:
    log = Path(args.out_dir) / "logs" / f"{system.name}.log"
    with ServerProcess(system.launch, args.port, log, cpus=args.server_cpus) as srv:
        for s in scens:
            if only is not None and s["name"] not in only:
                continue
            res = run_point(srv.base_url, data[s["name"]], backend=system.backend, model=None, request_rate=s["rate"],
                            burstiness=1.0, max_concurrency=s["conc"], seed=0, slo=SLO, warmup=2,
                            label=system.name, extra={"scenario": s["name"], "repeat": rep, "launch": system.launch,
                                                      "dataset": s["dataset"]})
            m = res["metrics"]
            logger.info("%s rep %d %s: %.1f out tok/s, TTFT p50 %.3f s, TPOT p50 %.1f ms, completed %d/%d",
                        system.name, rep, s["name"], m["output_throughput"], m["ttft_s"]["median"],
                        1e3 * m["tpot_s"]["median"], m["completed"], m["num_requests"])
            save(Path(args.out_dir) / f"{system.name}.rep{rep}.{s['name']}.json", res)
            results.setdefault(system.name, {}).setdefault(s["name"], []).append(res)


# ------------------------------------------------------------------------------------------------ report

def _fig(results, system, scen, key, sub=None) -> list[float]:
    vals = []
    for r in results.get(system, {}).get(scen, []):
        v = r["metrics"][key]
        vals.append(v[sub] if sub else v)
    return vals


def _aa(vals: list[float]) -> float | None:
    """A/A noise of one system: the largest relative deviation of a run from the runs' mean."""
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    if len(vals) < 2:
        return None
    m = statistics.fmean(vals)
    return max(abs(v - m) for v in vals) / m if m else None


def _ratio_cell(tm: list[float], peer: list[float], higher_better: bool) -> tuple[str, str]:
    tm_ok = [v for v in tm if math.isfinite(v)]
    peer_ok = [v for v in peer if math.isfinite(v)]
    if not tm_ok or not peer_ok or not statistics.fmean(peer_ok) or not statistics.fmean(tm_ok):
        return "—", "—"
    a, b = statistics.fmean(tm_ok), statistics.fmean(peer_ok)
    ratio = a / b if higher_better else b / a
    na, nb = _aa(tm_ok), _aa(peer_ok)
    band = (na or 0) + (nb or 0)
    note = "" if nb is not None else " (peer ran once)"
    within = " — within noise" if abs(ratio - 1) <= band else ""
    return f"{ratio:.2f}×", f"±{100 * band:.0f} %{note}{within}"


def _fmt(vals: list[float], scale: float = 1.0, digits: int = 1) -> str:
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    if not vals:
        return "—"
    return " / ".join(f"{scale * v:.{digits}f}" for v in vals)


def report(results: dict, systems: list[System], profile_name: str, profile: Profile, args, started: str,
           wall_s: float) -> str:
    names = [s.name for s in systems]
    peers = [n for n in names if n != "tokenmill"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    L = [f"# Side-by-side suite ({profile_name} profile)", "",
         f"Measured {started} on {platform.node()}: {cpu}, {os.cpu_count()} cores; servers pinned to CPUs "
         f"{args.server_cpus or 'all'}; commit {commit}; suite wall time {wall_s / 60:.1f} min.",
         f"Command: `python benchmarks/suite.py --profile {profile_name} --systems {','.join(args.systems)}`. "
         "Same GGUF (SmolLM2-135M-Instruct Q4_1) for every system; llama.cpp also on its requantized copies. "
         "One server at a time; order per repeat: " + ", ".join(names) + ". Each figure lists every run "
         "(run 1 / run 2 / …); ratios are of the runs' means; the noise band is the sum of both systems' "
         "A/A spread (largest deviation of a run from its system's mean).", "",
         "Launch commands: " + "; ".join(f"{s.name}: `{s.launch}`" for s in systems), ""]

    def table(title, scen, key, sub, unit, higher_better, scale=1.0, digits=1, vllm=None):
        L.extend([f"### {title}", "", f"| system | {unit} (each run) | tokenmill ÷ system | noise band |",
                  "|---|---|---|---|"])
        tm = _fig(results, "tokenmill", scen, key, sub)
        aa = _aa(tm)
        L.append(f"| tokenmill | {_fmt(tm, scale, digits)} | 1.00× | "
                 f"{'A/A —, one run' if aa is None else f'A/A ±{100 * aa:.0f} %'} |")
        for p in peers:
            pv = _fig(results, p, scen, key, sub)
            r, band = _ratio_cell(tm, pv, higher_better)
            L.append(f"| {p} | {_fmt(pv, scale, digits)} | {r} | {band} |")
        if vllm is not None and tm:
            L.append(f"| vLLM CPU (measured elsewhere, bf16, PEERS.md) | {vllm:.0f} | "
                     f"{statistics.fmean(tm) / vllm:.2f}× | — |")
        L.append("")

    scens = scenarios(profile)
    off = next(s for s in scens if s["name"] == "offline")
    table(f"Offline: {off['num']} requests at once, 128 in / {profile.offline_out} out", "offline",
          "output_throughput", None, "output tok/s", True,
          vllm=VLLM_REFERENCE["offline"] if off["num"] >= 200 and profile.offline_out == 128 else None)
    if off["num"] < 200:
        L.append(f"(vLLM's {VLLM_REFERENCE['offline']:.0f} tok/s was 200 prompts; this run has {off['num']}.)\n")

    L.extend([f"### Poisson arrivals, 128 in / {profile.out_len} out, SLO p99 TTFT ≤ {SLO['ttft']} s and "
              f"p99 TPOT ≤ {1e3 * SLO['tpot']:.0f} ms", ""])
    for s in (x for x in scens if x.get("group") == "poisson"):
        table(f"rate {s['rate']:g} req/s ({s['num']} requests): goodput", s["name"], "goodput", None,
              "goodput req/s", True, digits=3)
        table(f"rate {s['rate']:g} req/s: p99 TTFT", s["name"], "ttft_s", "p99", "p99 TTFT s", False, digits=3)
        table(f"rate {s['rate']:g} req/s: p99 TPOT", s["name"], "tpot_s", "p99", "p99 TPOT ms", False, 1e3)
    L.extend(["#### Highest rate meeting the SLO (MLPerf server scenario)", "",
              "| system | highest rate per run (req/s) | tokenmill ÷ system |", "|---|---|---|"])
    best = {}
    for n in names:
        per_run = []
        for rep in range(max(len(results.get(n, {}).get(s["name"], [])) for s in scens)):
            pts = [results[n][s["name"]][rep] for s in scens if s.get("group") == "poisson"
                   and len(results.get(n, {}).get(s["name"], [])) > rep]
            per_run.append(sweep_object(n, "request_rate", SLO, pts)["max_rate_meeting_slo"])
        best[n] = per_run
    for n in names:
        vals = [v for v in best[n] if v is not None]
        tm = [v for v in best["tokenmill"] if v is not None] if "tokenmill" in best else []
        ratio = (f"{statistics.fmean(tm) / statistics.fmean(vals):.2f}×" if vals and tm and n != "tokenmill"
                 else ("1.00×" if n == "tokenmill" else "—"))
        L.append(f"| {n} | {' / '.join('none' if v is None else f'{v:g}' for v in best[n])} | {ratio} |")
    L.append("")

    sp = next(s for s in scens if s["name"] == "shared-prefix")
    L.extend([f"### Shared prefix: {sp['groups']} groups × {sp['prefix_len']}-token system prompt + "
              f"{sp['suffix_len']}-token question, {sp['num']} requests, 4 in flight", "",
              "| system | TTFT mean s (each run) | TTFT p50 s | prefix cache off ÷ on |", "|---|---|---|---|"])
    on = _fig(results, "tokenmill", "shared-prefix", "ttft_s", "mean")
    off_ = _fig(results, "tokenmill-noprefix", "shared-prefix", "ttft_s", "mean")
    r, band = _ratio_cell(off_, on, True) if on and off_ else ("—", "—")
    L.append(f"| tokenmill, prefix caching on | {_fmt(on, digits=3)} | "
             f"{_fmt(_fig(results, 'tokenmill', 'shared-prefix', 'ttft_s', 'median'), digits=3)} | {r} ({band}) |")
    L.append(f"| tokenmill, prefix caching off | {_fmt(off_, digits=3)} | "
             f"{_fmt(_fig(results, 'tokenmill-noprefix', 'shared-prefix', 'ttft_s', 'median'), digits=3)} | |")
    for p in peers:
        L.append(f"| {p} (its defaults) | {_fmt(_fig(results, p, 'shared-prefix', 'ttft_s', 'mean'), digits=3)} | "
                 f"{_fmt(_fig(results, p, 'shared-prefix', 'ttft_s', 'median'), digits=3)} | |")
    L.append("")

    L.extend([f"### Concurrency (closed loop, 128 in / {profile.out_len} out)", ""])
    for s in (x for x in scens if x.get("group") == "concurrency"):
        table(f"{s['conc']} in flight ({s['num']} requests): output tok/s", s["name"], "output_throughput", None,
              "output tok/s", True, vllm=VLLM_REFERENCE.get(s["name"]) if profile.out_len == 128 else None)
        table(f"{s['conc']} in flight: median TPOT", s["name"], "tpot_s", "median", "median TPOT ms", False, 1e3)
    flagged = [(n, sc, r["metrics"]["short"] + r["metrics"]["long"] + r["metrics"]["errors"])
               for n, d in results.items() for sc, rs in d.items() for r in rs]
    bad = [f for f in flagged if f[2]]
    L.extend(["### Requests flagged (short / long output, errors): not counted above", "",
              "none" if not bad else "\n".join(f"- {n} {sc}: {k}" for n, sc, k in bad), "",
              "Plots: " + ", ".join(f"`{p}`" for p in sorted(Path(args.out_dir, "plots").glob("*.png"))), ""])
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default=os.environ.get("BENCH_PROFILE", "quick"))
    ap.add_argument("--systems", type=lambda s: s.split(","), default=["tokenmill", "llama.cpp", "transformers"])
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results" / "suite"))
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--server-cpus", default="0-1", help="taskset CPU list every server is pinned to")
    ap.add_argument("--repeats", type=int, default=None, help="override the profile's repeats")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    profile = PROFILES[args.profile]
    if args.repeats:
        profile.repeats = args.repeats
    systems = systems_for(profile, args.systems)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    for s in systems:  # builds are not timed and happen before any measurement
        if s.build:
            logger.info("building %s: %s", s.name, s.build)
            subprocess.run(["bash", "-c", s.build], check=True, cwd=ROOT)
    for q in profile.llama_quants if "llama.cpp" in args.systems else []:
        if q != "Q4_1":
            subprocess.run([f"{PEERS}/llama_cpp.sh", "quantize", q], check=True, cwd=ROOT)
    scens = scenarios(profile)
    data = build_datasets(scens)
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    t0 = time.monotonic()
    results: dict = {}
    noprefix = System("tokenmill-noprefix", f"{PEERS}/tokenmill.sh serve {{port}} --no-enable-prefix-caching", "openai")
    for rep in range(profile.repeats):
        for s in systems:
            if rep < (s.repeats or profile.repeats):
                run_system(s, scens, data, rep, args, results)
            if s.name == "tokenmill":
                run_system(noprefix, scens, data, rep, args, results, only={"shared-prefix"})
    wall = time.monotonic() - t0
    # Sweep-shaped files per system and run, for the plots.
    from tokenmill.bench.plot import plot

    plot_inputs = []
    for name, d in results.items():
        for rep in range(profile.repeats):
            for axis, group in (("request_rate", "poisson"), ("max_concurrency", "concurrency")):
                pts = [d[s["name"]][rep] for s in scens if s.get("group") == group and len(d.get(s["name"], [])) > rep]
                if pts:
                    path = Path(args.out_dir) / f"{name}.rep{rep}.{group}-sweep.json"
                    save(path, sweep_object(f"{name} run {rep + 1}", axis, SLO, pts))
                    plot_inputs.append(path)
        mid = f"poisson-{profile.rates[len(profile.rates) // 2]:g}"  # latency CDFs at the middle rate
        if (path := Path(args.out_dir) / f"{name}.rep0.{mid}.json").exists():
            plot_inputs.append(path)
    plot(plot_inputs, Path(args.out_dir) / "plots")
    md = report(results, systems, args.profile, profile, args, started, wall)
    out = Path(args.out_dir) / "suite.md"
    out.write_text(md)
    (Path(args.out_dir) / "suite_summary.json").write_text(json.dumps(
        {n: {sc: [r["metrics"] for r in rs] for sc, rs in d.items()} for n, d in results.items()}, indent=1))
    print(md)
    logger.info("wrote %s (suite took %.1f min)", out, wall / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
