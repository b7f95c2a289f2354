"""Served engine steps against a profile's fit: how much longer (or shorter) steps run under open-loop load than
`tokenmill profile` fitted them.

    python benchmarks/served_steps.py --profile benchmarks/results/plan_profile_zen5.json --rate 6 10

For each --rate: a fresh `tokenmill serve` (plan_validation.py's engine flags) with `--record-steps`, a short
warm-up, then --duration seconds of Poisson arrivals of plan_validation.py's request shape, replayed over HTTP
(this process: asyncio, no torch math). Prints the engine's busy share, each recorded step's measured / fitted
time (p10 / p50 / p90, and the sums' ratio), overall and by rows and prefill, the replay's TTFT and TPOT, and
how far a step's place in the profile's spread carries over to the steps after it (autocorrelation of the
ranks at lags 1, 10 and 100).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
from pathlib import Path

from tokenmill.bench.launch import ServerProcess, free_port
from tokenmill.engine.step_time import StepTimeModel, noise_ranks, read_recorded
from tokenmill.models.loader import open_model
from tokenmill.planning import workload

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plan_validation import SIZES, flags  # noqa: E402


def quantiles(xs: list[float]) -> str:
    s = sorted(xs)
    return f"p10 {s[len(s) // 10]:.2f} p50 {s[len(s) // 2]:.2f} p90 {s[9 * len(s) // 10]:.2f}"


def one_rate(model: StepTimeModel, rate: float, duration: float, vocab: int) -> None:
    arrivals = workload.poisson(rate, duration, SIZES, seed=77)
    tmp = Path(tempfile.mkdtemp(prefix="served-steps-"))
    record = tmp / "steps.jsonl"
    cmd = (f"{sys.executable} -m tokenmill.entrypoints.cli serve --port {{port}} --no-inproc {' '.join(flags())} "
           f"--record-steps {record}")
    with ServerProcess(cmd, free_port(), tmp / "server.log") as server:
        workload.replay(server.base_url, workload.poisson(2.0, 5.0, SIZES, seed=1), vocab, run=999)  # warm-up
        warm = len(read_recorded(record))
        outs = workload.replay(server.base_url, arrivals, vocab, run=1)
    steps = read_recorded(record)[warm:]
    if not steps:
        print(f"rate {rate}: no steps recorded")
        return
    real = workload.measured(outs)
    span = max(a.t + o.done - o.sent for a, o in zip(arrivals, outs, strict=True) if o.status == "ok")
    busy = sum(t for _, t in steps)
    ratios = [t / model.seconds(s) for s, t in steps]
    print(f"rate {rate}/s: {len(arrivals)} requests over {span:.1f} s, {len(steps)} steps, engine busy "
          f"{busy / span:.0%}; measured / fitted {quantiles(ratios)}, sums {busy / sum(model.seconds(s) for s, _ in steps):.2f}; "
          f"TTFT p50 {real['ttft_s']['p50']:.3f} s, TPOT p50 {real['tpot_s']['p50'] * 1e3:.1f} ms")
    groups = collections.defaultdict(list)
    for (s, _), r in zip(steps, ratios, strict=True):
        rows = "1-8" if s.rows <= 8 else "9-32" if s.rows <= 32 else "33-128" if s.rows <= 128 else "129+"
        groups[(rows, "with prefill" if s.prefill_tokens else "decode only")].append(r)
    for (rows, kind), rs in sorted(groups.items()):
        print(f"  {rows:>6} rows, {kind:<12} {len(rs):5d} steps: {quantiles(rs)}, mean {statistics.fmean(rs):.2f}")
    # Do slow steps come in runs? Each step's rank within the profile's spread for its length, correlated
    # with the rank some steps later (independent draws would give 0 at every lag).
    ranks = noise_ranks(model, steps)
    if len(ranks) > 200:
        print("  rank autocorrelation at lag " + ", ".join(f"{k}: {autocorrelation(ranks, k):.2f}"
                                                          for k in (1, 10, 100)) + f" ({len(ranks)} steps)")


def autocorrelation(xs: list[float], lag: int) -> float:
    mean = statistics.fmean(xs)
    d = [x - mean for x in xs]
    return sum(a * b for a, b in zip(d, d[lag:], strict=False)) / sum(a * a for a in d)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", required=True, help="a `tokenmill profile` model")
    ap.add_argument("--rate", type=float, nargs="+", default=[6.0, 10.0], help="requests per second")
    ap.add_argument("--duration", type=float, default=40.0, help="seconds of arrivals per rate")
    args = ap.parse_args()
    model = StepTimeModel.load(args.profile)
    vocab = open_model("default").arch.vocab_size
    for rate in args.rate:
        one_rate(model, rate, args.duration, vocab)
    return 0


if __name__ == "__main__":
    sys.exit(main())
