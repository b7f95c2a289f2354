"""Split the light tenants' TTFT in a trace from ./sitecustomize.py into its parts, alone and beside the
flood (a tenant named `heavy`, as in benchmarks/fair_flood.py and the fair e2e test):

  hand-off   HTTP arrival to the frontend's send to the engine
  intake     that send to the engine's add_request (the engine takes requests only between steps and
             between the layers of a step's first half)
  wait       intake to the start of the step that gave the first token (earlier steps, abandoned ones)
  own step   that step's duration
  ttft       arrival to that step's end

and the contended mean TTFT in each flood's first 2 s against the rest.

    .venv/bin/python benchmarks/request_trace/analyze.py /tmp/tr [/tmp/tr2 ...]
"""

from __future__ import annotations

import bisect
import glob
import itertools
import json
import statistics
import sys
from dataclasses import dataclass


def load(prefix: str) -> list[dict]:
    recs = []
    for fn in glob.glob(prefix + ".*"):
        with open(fn) as f:
            recs += [json.loads(line) for line in f if line.strip()]
    return recs


def q(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(len(v) * p))]


@dataclass
class Trace:
    adds: dict[str, dict]  # request id -> its `add` record (engine intake)
    sent: dict[str, float]  # request id -> when the frontend handed it to the engine
    steps: list[dict]  # `step` records, in start order
    first: dict[str, dict]  # request id -> the step that gave its first token
    heavy: list[float]  # intake times of the flood's requests
    flood_starts: list[float]  # intake time of each flood's first request

    def contended(self, t: float) -> bool:
        """Was a flood on at time t (a request of it taken in within the last second)?"""
        i = bisect.bisect(self.heavy, t)
        return i > 0 and t - self.heavy[i - 1] < 1.0

    def flood_start(self, t: float) -> float:
        return self.flood_starts[bisect.bisect(self.flood_starts, t) - 1]


def read_trace(prefix: str) -> Trace:
    recs = load(prefix)
    adds = {r["rid"]: r for r in recs if r["ev"] == "add"}
    steps = sorted((r for r in recs if r["ev"] == "step"), key=lambda r: r["t0"])
    first: dict[str, dict] = {}
    for s in steps:
        for rid in s["first"]:
            first.setdefault(rid, s)
    heavy = sorted(a["t"] for a in adds.values() if a["tenant"] == "user:heavy")
    if not heavy:
        sys.exit(f"{prefix}: no request of tenant 'heavy' in the trace")
    return Trace(adds, {rid: r["t"] for r in recs if r["ev"] == "submit" for rid in r["rids"]}, steps, first, heavy,
                 [heavy[0]] + [b for a, b in itertools.pairwise(heavy) if b - a > 2.0])


def analyze(prefix: str) -> None:
    tr = read_trace(prefix)
    adds, sent, first = tr.adds, tr.sent, tr.first
    rows: dict[bool, list[dict]] = {False: [], True: []}
    for rid, a in adds.items():
        if "light" not in (a["tenant"] or "") or rid not in first or rid not in sent:
            continue
        s = first[rid]
        rows[tr.contended(a["t"])].append({
            "hand-off": sent[rid] - a["arr"], "intake": a["t"] - sent[rid], "wait": s["t0"] - a["t"],
            "own step": s["t1"] - s["t0"], "ttft": s["t1"] - a["arr"], "into flood": a["t"] - tr.flood_start(a["t"])})
    print(prefix)
    for cond, label in ((False, "alone"), (True, "beside the flood")):
        r = rows[cond]
        print(f"  {label}: {len(r)} light requests (seconds)")
        for k in ("hand-off", "intake", "wait", "own step", "ttft"):
            v = [x[k] for x in r]
            print(f"    {k:9s} mean {statistics.mean(v):.3f}  p50 {q(v, .5):.3f}  p90 {q(v, .9):.3f}  "
                  f"p99 {q(v, .99):.3f}  max {max(v):.3f}")
    early = [x["ttft"] for x in rows[True] if x["into flood"] < 2.0]
    later = [x["ttft"] for x in rows[True] if x["into flood"] >= 2.0]
    if early and later:
        print(f"  beside the flood, mean ttft: first 2 s {statistics.mean(early):.3f} (n {len(early)}), "
              f"later {statistics.mean(later):.3f} (n {len(later)})")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for prefix in sys.argv[1:]:
        analyze(prefix)
