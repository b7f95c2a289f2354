"""The slowest light requests beside the flood in a trace from ./sitecustomize.py, each with every engine step
from its arrival to its first token: when the step ran, whether it was abandoned, its tokens by tenant
(P: prefill chunks, d: decodes), this request's chunk in it, and the fair counters it was planned with.

    .venv/bin/python benchmarks/request_trace/slowest.py /tmp/tr [N]     # N slowest (default 8)
"""

from __future__ import annotations

import sys

from analyze import read_trace


def describe_step(s: dict, rid: str, arrival: float) -> str:
    by_tenant: dict[str, int] = {}
    for _, n, tenant in s["sched"]:
        key = (tenant or "?").removeprefix("user:") + ("P" if n > 1 else "d")
        by_tenant[key] = by_tenant.get(key, 0) + n
    mine = [n for r, n, _ in s["sched"] if r == rid]
    return (f"  step {s['t0'] - arrival:+.3f}..{s['t1'] - arrival:+.3f} s ({(s['t1'] - s['t0']) * 1000:.0f} ms)"
            f"{' abandoned' if s['intr'] else ''}, {sum(n for _, n, _ in s['sched'])} tokens {by_tenant}, "
            f"this request {mine}, counters {s.get('counters', {})}")


def main(prefix: str, num: int) -> None:
    tr = read_trace(prefix)
    slow = sorted(((tr.first[rid]["t1"] - a["arr"], rid) for rid, a in tr.adds.items()
                   if "light" in (a["tenant"] or "") and rid in tr.first and tr.contended(a["t"])), reverse=True)
    for ttft, rid in slow[:num]:
        a = tr.adds[rid]
        arrival = a["arr"]
        print(f"{rid} ({a['tenant']}): TTFT {ttft:.3f} s, taken in {a['t'] - arrival:+.3f} s, "
              f"{arrival - tr.flood_start(a['t']):.2f} s into the flood")
        for s in tr.steps:
            if s["t1"] >= arrival - 0.01 and s["t0"] <= tr.first[rid]["t1"]:
                print(describe_step(s, rid, arrival))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 8)
