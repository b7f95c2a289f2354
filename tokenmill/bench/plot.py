"""`tokenmill bench plot`: PNG plots from result JSONs, several runs overlaid.

- latency_cdf.png: TTFT, TPOT, ITL and e2e CDFs of every `bench serve` result given;
- goodput_vs_rate.png: goodput, output tok/s and p99 TTFT / TPOT against request rate (rate sweeps),
  with the SLO limits drawn;
- throughput_vs_concurrency.png: output tok/s and median TPOT against max concurrency (concurrency sweeps,
  or serve results that set --max-concurrency, grouped by label).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

from tokenmill.bench.metrics import RequestRecord
from tokenmill.errors import ConfigError

logger = logging.getLogger(__name__)


def _label(obj: dict, path: Path) -> str:
    label = obj.get("label") or path.stem
    scenario = (obj.get("settings") or {}).get("scenario")
    return f"{label} {scenario}" if scenario and obj.get("kind") == "serve" else label


def _records(result: dict) -> list[RequestRecord]:
    return [RequestRecord(**r) for r in result["requests"]]


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(paths: list[str | Path], out_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    serves, rate_sweeps, conc = [], [], defaultdict(list)
    for p in map(Path, paths):
        try:
            obj = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read benchmark result {p}: {e}") from None
        items = obj if isinstance(obj, list) else [obj]
        for o in items:
            if o.get("kind") == "sweep":
                if o["axis"] == "request_rate":
                    rate_sweeps.append((_label(o, p), o))
                else:
                    for pt in o["points"]:
                        conc[_label(o, p)].append(pt)
            elif o.get("kind") == "serve":
                serves.append((_label(o, p), o))
                if o["settings"].get("max_concurrency") and o["settings"]["request_rate"] == float("inf"):
                    conc[_label(o, p)].append(o)
    written = []

    if serves:
        fig, axes = plt.subplots(2, 2, figsize=(11, 8))
        for (title, key), ax in zip([("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL (per chunk)", "itl"),
                                     ("end-to-end latency", "e2e")], axes.flat, strict=True):
            for label, res in serves:
                recs = [r for r in _records(res) if r.status == "ok"]
                if key == "itl":
                    xs = [x for r in recs for x in r.itls]
                elif key == "tpot":
                    xs = [t for r in recs if (t := r.tpot) is not None]
                else:
                    xs = [getattr(r, key) for r in recs]
                if not xs:
                    continue
                xs = np.sort(np.asarray(xs) * 1e3)
                ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post", label=f"{label} ({len(recs)} req)")
            ax.set_title(title)
            ax.set_xlabel("ms")
            ax.set_ylabel("fraction of requests" if key != "itl" else "fraction of chunks")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        written.append(_save(fig, out_dir / "latency_cdf.png"))

    if rate_sweeps:
        fig, axes = plt.subplots(1, 4, figsize=(19, 4.5))
        for label, sw in rate_sweeps:
            xs = [c["x"] for c in sw["curve"]]
            axes[0].plot(xs, [c["goodput"] or 0 for c in sw["curve"]], "o-", label=label)
            axes[1].plot(xs, [c["output_throughput"] for c in sw["curve"]], "o-", label=label)
            axes[2].plot(xs, [c["p99_ttft_s"] for c in sw["curve"]], "o-", label=label)
            axes[3].plot(xs, [1e3 * c["p99_tpot_s"] for c in sw["curve"]], "o-", label=label)
        slo = rate_sweeps[0][1].get("slo") or {}
        if "ttft" in slo:
            axes[2].axhline(slo["ttft"], color="k", lw=0.8, ls=":", label=f"limit {slo['ttft']} s")
        if "tpot" in slo:
            axes[3].axhline(1e3 * slo["tpot"], color="k", lw=0.8, ls=":", label=f"limit {1e3 * slo['tpot']:.0f} ms")
        titles = ["goodput (req/s meeting SLO)", "output tok/s", "p99 TTFT (s)", "p99 TPOT (ms)"]
        for ax, t in zip(axes, titles, strict=True):
            ax.set_xlabel("request rate (req/s)")
            ax.set_title(t)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        written.append(_save(fig, out_dir / "goodput_vs_rate.png"))

    if conc:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        for label, pts in conc.items():
            pts = sorted(pts, key=lambda r: r["settings"]["max_concurrency"])
            xs = [r["settings"]["max_concurrency"] for r in pts]
            axes[0].plot(xs, [r["metrics"]["output_throughput"] for r in pts], "o-", label=label)
            axes[1].plot(xs, [1e3 * r["metrics"]["tpot_s"]["median"] for r in pts], "o-", label=label)
        for ax, t in zip(axes, ["output tok/s", "median TPOT (ms)"], strict=True):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("max concurrency")
            ax.set_title(t)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        written.append(_save(fig, out_dir / "throughput_vs_concurrency.png"))
    if not written:
        logger.warning("nothing to plot: no serve or sweep results among %s", [str(p) for p in paths])
    return written
