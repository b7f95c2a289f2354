"""What `tokenmill plan` shows: a text table of the prediction and a PNG of demand, queue and latency over
time."""

from __future__ import annotations

from typing import Any

from tokenmill.planning.simulator import SimResult


def table(summary: dict[str, Any], cost: dict[str, float] | None = None) -> str:
    def ms(d: dict[str, float]) -> str:
        return " / ".join(f"{d[k] * 1e3:.0f}" for k in ("p50", "p90", "p99"))

    util = ", ".join(f"{u:.0%}" for u in summary["utilisation"])
    lines = [
        f"replicas                 {summary['replicas']}",
        f"requests                 {summary['requests']} ({summary['completed']} completed, "
        f"{summary['rejected_429']} rejected 429)",
        f"TTFT p50/p90/p99 (ms)    {ms(summary['ttft_s'])}",
        f"TPOT p50/p90/p99 (ms)    {ms(summary['tpot_s'])}",
        f"e2e  p50/p90/p99 (ms)    {ms(summary['e2e_s'])}",
        f"throughput               {summary['output_tokens_per_s']:.1f} output tokens/s, "
        f"{summary['requests_per_s']:.2f} requests/s",
        f"goodput                  {summary['goodput_requests_per_s']:.2f} requests/s within the SLO",
        f"utilisation              {util}",
        f"replica-hours            {summary['replica_hours']:.3f} ({summary['scale_events']} scale events)",
        f"meets the SLO            {'yes' if summary['meets_slo'] else 'no'}",
        f"simulated                {summary['simulated_s']:.0f} s in {summary['wall_s']:.1f} s "
        f"({summary['simulated_s'] / max(summary['wall_s'], 1e-9):.0f}x real time)",
    ]
    if cost:
        lines.append(f"cost                     ${cost['per_million_input_tokens']:.4f} per million input tokens, "
                     f"${cost['per_million_output_tokens']:.4f} per million output tokens")
    return "\n".join(lines)


def plot(result: SimResult, path: str, title: str, bin_s: float | None = None) -> None:
    """Three panels over time: arrivals per second (demand), requests waiting and running, TTFT of each
    request by its arrival (rejections marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    span = max(result.span_s, 1e-9)
    bin_s = bin_s or max(1.0, span / 120)
    nbins = int(span / bin_s) + 1
    counts = [0] * nbins
    for r in result.records:
        counts[min(int(r.arrival.t / bin_s), nbins - 1)] += 1
    fig, (a1, a2, a3) = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    a1.step([k * bin_s for k in range(nbins)], [c / bin_s for c in counts], where="post")
    a1.set_ylabel("arrivals / s")
    a1.set_title(title)
    if result.timeline:
        t, waiting, running = zip(*result.timeline, strict=True)
        a2.plot(t, waiting, lw=0.8, label="waiting")
        a2.plot(t, running, lw=0.8, label="running")
        a2.legend(loc="upper left")
    a2.set_ylabel("requests")
    if result.scale_events:  # autoscaling: the replica count over time, on its own axis
        first = result.scale_events[0]["from"]
        ts = [0.0] + [e["t"] for e in result.scale_events] + [span]
        ns = [first] + [e["to"] for e in result.scale_events] + [result.scale_events[-1]["to"]]
        twin = a2.twinx()
        twin.step(ts, ns, where="post", color="k", lw=1.2, label="replicas (asked for)")
        twin.set_ylabel("replicas")
        twin.legend(loc="upper right")
    ok = [(r.arrival.t, r.ttft * 1e3) for r in result.records if r.ttft is not None]
    if ok:
        a3.scatter(*zip(*ok, strict=True), s=3, alpha=0.5, label="TTFT")
    rej = [r.arrival.t for r in result.records if r.rejected]
    if rej:
        top = max((v for _, v in ok), default=1.0)
        a3.scatter(rej, [top] * len(rej), s=6, marker="x", color="red", label="429")
    a3.set(ylabel="TTFT (ms)", xlabel="time (s)", yscale="log")
    a3.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
