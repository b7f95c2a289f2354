"""The difficulty cascade's quality/cost curve (issue 20) on held-out checkable tasks.

    .venv/bin/python -m tokenmill.entrypoints.cli cascade fit --tasks 288 --seed 0 --out /tmp/cascade/fit.json
    .venv/bin/python benchmarks/cascade.py --fit /tmp/cascade/fit.json --tasks 288 --seed 1

Both models answer every evaluation task offline (greedy, as `tokenmill cascade fit` labels them: the same
decision functions as the server's), so each routing policy is scored without rerunning anything:
  small-only, large-only; the oracle (escalates exactly the tasks the small model gets wrong and the large one
  right, decided before generating); random routing (escalates a share p of tasks before generating: the straight
  line between small-only and large-only, so at any cost it is the matched-cost baseline); and each signal swept
  over thresholds: logprob / entropy (the small model always answers first, the large one after it when escalated)
  and the learned prompt router (the embedding model runs, then one of the two models).
Cost is counted compute, 2 x N_active x tokens (prompt + answer) per model as the server's ledger counts weights
(tokenmill.models.flops; the embedding model's own weights for the router), as a share of large-only. Quality is
exact-match accuracy; PGR (RouteLLM's "performance gap recovered") = (Q - Q_small) / (Q_large - Q_small).
Also: the escalation share realised on these held-out tasks against --escalate-rate targets calibrated on the
fit's held-out scores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill.cluster.cascade_policy import CascadeFit, escalation_share  # noqa: E402
from tokenmill.entrypoints.cascade_cli import collect  # noqa: E402
from tokenmill.eval.cascade_tasks import generate  # noqa: E402

RATES = (0.1, 0.2, 0.3, 0.5, 0.7)


def embedding_active_params(model: str = "default") -> int:
    from tokenmill.models.sentence_model import BertConfig, resolve_embedding_model

    c = BertConfig.from_dir(resolve_embedding_model(model))
    d = c.hidden_size
    return c.num_layers * (4 * d * d + 2 * d * c.intermediate_size)


def curve(esc: np.ndarray, small_ok, large_ok, c_small, c_large, c_embed, first: bool) -> tuple[float, float]:
    """(quality, cost) of escalating the tasks in `esc`: after the small answer (first=True) or instead of it."""
    q = np.where(esc, large_ok, small_ok).mean()
    cost = (c_small + esc * c_large) if first else (c_embed + np.where(esc, c_large, c_small))
    return float(q), float(cost.mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fit", required=True, help="the fitted cascade (tokenmill cascade fit)")
    ap.add_argument("--tasks", type=int, default=288)
    ap.add_argument("--seed", type=int, default=1, help="evaluation tasks' seed (the fit's must differ)")
    ap.add_argument("--out", default="benchmarks/results/cascade_zen4.json")
    ap.add_argument("--plot", default="benchmarks/results/cascade_zen4.png")
    args = ap.parse_args()
    fit = CascadeFit.load(args.fit)
    tasks = generate(args.tasks, seed=args.seed)
    recs, n_active = collect(tasks, fit.small, fit.large, fit.first_tokens, fit.top_logprobs, fit.embedding_model,
                             fit.embed_chars, {"kv_cache_memory": "256MiB"})
    from tokenmill.cluster.cascade_policy import embed_text
    from tokenmill.models.sentence_model import load_embedding_tokenizer, resolve_embedding_model

    etok = load_embedding_tokenizer(resolve_embedding_model(fit.embedding_model))
    n_emb = embedding_active_params(fit.embedding_model)
    small_ok = np.array([r.small_ok for r in recs], float)
    large_ok = np.array([r.large_ok for r in recs], float)
    c_small = np.array([2.0 * n_active["small"] * r.small_tokens for r in recs])
    c_large = np.array([2.0 * n_active["large"] * r.large_tokens for r in recs])
    c_embed = np.array([2.0 * n_emb * min(256, len(etok.encode(embed_text(r.task.prompt, fit.embed_chars)).ids))
                        for r in recs])
    scores = {"logprob": np.array([r.logprob for r in recs]), "entropy": np.array([r.entropy for r in recs]),
              "router": fit.router.scores(np.array([r.embedding for r in recs]))}
    qs, ql = small_ok.mean(), large_ok.mean()
    cl = c_large.mean()

    def point(q: float, c: float) -> dict:
        return {"quality": q, "quality_share_of_large": q / ql if ql else None,
                "pgr": (q - qs) / (ql - qs) if ql != qs else None, "cost_flops": c, "cost_share_of_large": c / cl}

    oracle_esc = (small_ok == 0) & (large_ok == 1)
    result = {
        "cpu": "AMD EPYC Zen 4, 2 cores (shared)", "small": fit.small, "large": fit.large, "tasks": len(recs),
        "seed": args.seed, "active_params": {**n_active, "embedding": n_emb},
        "small_only": point(qs, float(c_small.mean())), "large_only": point(ql, cl),
        "oracle": {**point(*curve(oracle_esc, small_ok, large_ok, c_small, c_large, c_embed * 0, False)),
                   "escalated": float(oracle_esc.mean())},
        "both_wrong": float(((small_ok == 0) & (large_ok == 0)).mean()),
        "small_right_large_wrong": float(((small_ok == 1) & (large_ok == 0)).mean()),
        "disagree": float(np.mean([r.disagree for r in recs])),
        "by_family": {}, "curves": {}, "goal": {}, "rates": {}}
    for fam in sorted({r.task.family for r in recs}):
        m = np.array([r.task.family == fam for r in recs])
        result["by_family"][fam] = {"small": float(small_ok[m].mean()), "large": float(large_ok[m].mean()),
                                    "n": int(m.sum())}
    for sig, s in scores.items():
        first = sig != "router"
        pts = []
        for t in [-np.inf, *np.unique(s)]:
            esc = s > t
            q, c = curve(esc, small_ok, large_ok, c_small, c_large, c_embed, first)
            p_rand = float(esc.mean())  # random routing escalating the same share, before generating
            pts.append({"threshold": float(t), "escalated": p_rand, **point(q, c),
                        "random_same_share": point(*curve(np.full(len(s), False), small_ok, large_ok, c_small,
                                                          c_large, c_embed * 0, False))
                        if p_rand == 0 else point((1 - p_rand) * qs + p_rand * ql,
                                                  (1 - p_rand) * c_small.mean() + p_rand * cl)})
        pts.append({"threshold": float("inf"), "escalated": 0.0,
                    **point(*curve(np.zeros(len(s), bool), small_ok, large_ok, c_small, c_large, c_embed, first))})
        result["curves"][sig] = pts
        ok = [p for p in pts if ql and p["quality"] >= 0.95 * ql]
        best = min(ok, key=lambda p: p["cost_share_of_large"]) if ok else None
        # Random routing at the same cost as that point: the share p with (1-p) C_s + p C_l = cost.
        rand = None
        if best is not None:
            p = np.clip((best["cost_flops"] - c_small.mean()) / (cl - c_small.mean()), 0, 1)
            rand = point(float((1 - p) * qs + p * ql), float(best["cost_flops"]))
        result["goal"][sig] = {"cheapest_at_95pct_of_large": best, "random_at_that_cost": rand,
                               "met": bool(best and best["cost_share_of_large"] <= 0.40)}
        result["rates"][sig] = {f"{r:.2f}": escalation_share(s, fit.threshold(sig, r)) for r in RATES}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    plot(result, args.plot)
    summary = {k: result[k] for k in ("small_only", "large_only", "oracle", "by_family", "goal", "rates",
                                      "active_params", "disagree", "both_wrong", "small_right_large_wrong")}
    print(json.dumps(summary, indent=1))
    return 0


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for sig, pts in result["curves"].items():
        pts = sorted(pts, key=lambda p: p["cost_share_of_large"])
        ax.plot([p["cost_share_of_large"] for p in pts], [p["quality"] for p in pts], marker=".", ms=3,
                label=f"cascade: {sig}")
    s, g, o = result["small_only"], result["large_only"], result["oracle"]
    ax.plot([s["cost_share_of_large"], 1.0], [s["quality"], g["quality"]], "k--", label="random routing")
    ax.scatter([s["cost_share_of_large"]], [s["quality"]], c="tab:blue", marker="s", s=60, label="small only",
               zorder=5)
    ax.scatter([1.0], [g["quality"]], c="tab:red", marker="s", s=60, label="large only", zorder=5)
    ax.scatter([o["cost_share_of_large"]], [o["quality"]], c="gold", marker="*", s=160, label="oracle", zorder=5)
    ax.axhline(0.95 * g["quality"], color="grey", lw=0.8, ls=":", label="95% of large")
    ax.axvline(0.40, color="grey", lw=0.8, ls="-.", label="40% of large's compute")
    ax.set_xlabel("compute per query, share of large-only (2 x N_active x tokens)")
    ax.set_ylabel("exact-match accuracy")
    ax.set_title(f"Cascade {result['small']} -> {result['large']}, {result['tasks']} held-out tasks")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
