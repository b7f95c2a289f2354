"""`tokenmill profile`: measure this machine's engine step time over the shapes serving produces, and fit the
planner's step-time model to it.

A real server runs (`tokenmill serve`, engine in its own process, the same engine flags), recording each
engine step's shape and duration (`--record-steps`); this process drives it over HTTP as clients would, so
the steps are timed with the frontend, the IPC and a client beside the engine on the cores, as in serving.
Workloads sweep the row count (decode batches of 1..max_num_seqs sequences, prompt chunks), the context
decoding sequences attend over, and mixed steps, within a time budget. Then steady open-loop load (Poisson
arrivals at shares of the capacity a fit of those steps predicts): there the frontend takes a request and
streams tokens while the engine steps, which costs served steps time that a burst of requests sent at once
does not show (on a fast CPU the requests per second, and with them that work, grow), and the fit takes
those steps in too. One burst runs before the steady load and again after it: how far the machine's speed moved
meanwhile (`speed_drift` in the profile; a warning past 15 %).
"""

from __future__ import annotations

import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tokenmill.bench.launch import ServerProcess, free_port
from tokenmill.cluster.supervisor import engine_flags
from tokenmill.config import EngineConfig
from tokenmill.engine.step_time import StepShape, StepTimeModel, fit, read_recorded, read_requests
from tokenmill.kernels.cpu import cpu_name
from tokenmill.planning.workload import Arrival, Sizes, poisson, replay

logger = logging.getLogger(__name__)
WARMUP_STEPS = 8
STEADY_SIZES = Sizes(prompt_tokens=128, output_tokens=64, spread=0.5)  # the steady workloads' requests
STEADY_LOADS = (0.4, 0.8, 1.1)  # shares of the capacity the shape workloads' fit predicts: below it and past it
STEADY_S = 15.0  # seconds of arrivals each
DRIFT_WORKLOAD = "decode x8"  # run before and after the steady load: how far the machine's speed moved meanwhile
DRIFT_WARN = 0.15
DRIFT_RUNS = 10_000  # the drift bursts' prompt seeds: none of the other workloads' prompts


def _workloads(max_seqs: int, max_len: int) -> list[tuple[str, int, int, int]]:
    """(label, sequences, prompt tokens, output tokens), cheapest first, so a short budget still spans rows."""
    batches = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b <= max_seqs]
    out = [(f"decode x{b}", b, 16, 24) for b in batches]
    out += [(f"prefill {p}", 1, p, 2) for p in (64, 256, 1024) if p + 4 <= max_len]
    out += [(f"mixed x{b}", b, 128, 32) for b in (8, 32) if b <= max_seqs]
    out += [(f"long decode x{b}", b, 512, 16) for b in (1, 4, 16) if b <= max_seqs and 600 <= max_len]
    return out


def profile(config: EngineConfig, budget_s: float = 240.0, progress: Callable[[str], None] | None = None,
            ) -> tuple[StepTimeModel, list[tuple[StepShape, float]]]:
    """Serve `config`, drive the workloads, fit what the engine recorded."""
    from tokenmill.models.loader import open_model

    arch = open_model(config.model).arch
    max_len = config.max_model_len or arch.max_position_embeddings
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    with tempfile.TemporaryDirectory(prefix="tokenmill-profile-") as tmp:
        record = Path(tmp) / "steps.jsonl"
        cmd = " ".join([sys.executable, "-m", "tokenmill.entrypoints.cli", "serve", "--port", "{port}",
                        "--no-inproc", *engine_flags(config), "--record-steps", str(record)])
        done: list[str] = []
        steady: list = []  # the steady workloads' outcomes: their requests' way outside the engine
        steps_of: dict[str, list[float]] = {}  # a burst workload's recorded step times
        deadline = time.monotonic() + budget_s
        with ServerProcess(cmd, free_port(), Path(tmp) / "server.log") as server:

            def run(label: str, arrivals: list[Arrival], k: int) -> list:
                if progress:
                    progress(label)
                before = len(read_recorded(record)) if record.exists() else 0  # the engine may not have begun it
                outs = replay(server.base_url, arrivals, arch.vocab_size, run=k)
                if any(o.status != "ok" for o in outs):
                    bad = next(o for o in outs if o.status != "ok")
                    raise RuntimeError(f"profile workload {label} failed: {bad.http_status} {bad.message}")
                steps_of[label] = [t for _, t in read_recorded(record)[before:]]
                return outs

            workloads = _workloads(config.max_num_seqs, max_len)
            for k, (label, n, prompt_len, out_len) in enumerate(workloads):
                if time.monotonic() > deadline:
                    logger.warning("profile budget spent: skipped %s and later workloads", label)
                    break
                # All n at once, distinct prompts (the planner's cold case), exact lengths (ignore_eos).
                run(label, [Arrival(0.0, prompt_len, out_len)] * n, k)
                done.append(label)
            num_blocks = _num_blocks(Path(tmp) / "server.log")
            # The machine's speed can move while it is profiled (a VM's neighbours): one burst now and again after
            # the steady load, both after the whole sweep.
            drift = next((w for w in workloads if w[0] == DRIFT_WORKLOAD), None)
            if drift is not None:
                label, n, prompt_len, out_len = drift
                run(f"{label} before the steady load", [Arrival(0.0, prompt_len, out_len)] * n, DRIFT_RUNS)
                done.append(f"{label} before the steady load")
            for share in STEADY_LOADS:
                if time.monotonic() + STEADY_S > deadline:
                    logger.warning("profile budget spent: no steady load at %.1fx", share)
                    break
                label = f"steady {share:.1f}x"
                rate = share * _capacity(fit(read_recorded(record)[WARMUP_STEPS:]), config, arch, num_blocks)
                steady += run(label, poisson(rate, STEADY_S, STEADY_SIZES, seed=len(done)), len(done))
                done.append(f"{label} ({rate:.1f} requests/s)")
            if drift is not None:
                label, n, prompt_len, out_len = drift
                run(f"{label} after it", [Arrival(0.0, prompt_len, out_len)] * n, DRIFT_RUNS + 1)
                done.append(f"{label} after it")
        samples = read_recorded(record)[WARMUP_STEPS:]
        paths = request_paths(steady, read_requests(record))
        logger.info("%d of the steady load's %d requests matched to the engine's record", len(paths), len(steady))
    source = {"cpu": cpu_name(), "model": config.model, "dtype": config.dtype, "quantization": config.quantization,
              "num_threads": config.num_threads, "max_num_seqs": config.max_num_seqs,
              "max_num_batched_tokens": config.max_num_batched_tokens, "num_blocks": num_blocks,
              "block_size": config.block_size, "max_model_len": max_len, "budget_s": budget_s,
              "measured": "a real server's engine steps, driven over HTTP", "workloads": done}
    before, after = f"{DRIFT_WORKLOAD} before the steady load", f"{DRIFT_WORKLOAD} after it"
    if before in steps_of and after in steps_of:
        first, last = steps_of[before], steps_of[after]
        source["speed_drift"] = statistics.median(last) / statistics.median(first) - 1
        if abs(source["speed_drift"]) > DRIFT_WARN:
            logger.warning("the engine's steps took %+.0f%% longer after the profile's steady load than before it "
                           "(the same %s burst): this machine's speed moved while it was profiled, and a plan "
                           "from it carries that uncertainty; profile again on a quiet machine",
                           100 * source["speed_drift"], DRIFT_WORKLOAD)
    model = fit(samples, source)
    model.path = paths
    return model, samples


MAX_PATHS = 2000  # requests' paths kept in a profile (evenly spaced over them, by requests in flight)


def request_paths(outcomes: Sequence[Any], engine: dict[str, tuple[float, float]]) -> list[list[float]]:
    """[in, out, in flight] of each completed request: its seconds from the client sending it to the frontend
    taking it, and from the engine's first token to the client having it (the client's and the engine's
    clocks are one machine's monotonic clock), and the client's requests in flight when it was sent, itself
    included (the frontend and the client stream to that many at once). The frontend's own work before the
    engine sees a request (parsing, IPC; about a millisecond) falls on neither side."""
    by_prefix = {rid.rsplit("-", 2)[0]: times for rid, times in engine.items()}  # engine id: "{id}-{i}-{j}"
    spans = sorted((o.sent, o.done if o.done is not None else o.sent) for o in outcomes)
    paths = []
    for o in outcomes:
        times = by_prefix.get(o.response_id)
        if o.status != "ok" or o.ttft is None or times is None:
            continue
        arrival, first = times
        in_flight = sum(1 for sent, done in spans if sent <= o.sent and (done > o.sent or sent == o.sent))
        paths.append([round(max(0.0, arrival - o.sent), 6), round(max(0.0, o.sent + o.ttft - first), 6), in_flight])
    paths.sort(key=lambda p: (p[2], p[0] + p[1]))
    if len(paths) > MAX_PATHS:
        paths = [paths[i * len(paths) // MAX_PATHS] for i in range(MAX_PATHS)]
    return paths


def _capacity(model: StepTimeModel, config: EngineConfig, arch, num_blocks: int | None) -> float:
    """Requests per second of STEADY_SIZES that `model` completes under a flood (simulated, fitted step time;
    what the admission caps turn away does not count, and the replica stays busy to the end)."""
    from tokenmill.planning.simulator import simulate

    flood = poisson(200.0, 10.0, STEADY_SIZES, seed=1)
    res = simulate(flood, config=config, arch=arch, model=model, num_blocks=num_blocks, step_noise=False)
    return res.summary()["requests_per_s"]


def _num_blocks(log: Path) -> int | None:
    """The served engine's KV pool size, from the line the server logs when ready (the planner sizes its
    simulated pool the same)."""
    import re

    found = re.findall(r"KV cache \d+ tokens \((\d+) blocks\)", log.read_text(errors="replace"))
    return int(found[-1]) if found else None


def plot_fit(model: StepTimeModel, samples: list[tuple[StepShape, float]], path: str) -> None:
    """Fitted against measured step time, one point per step (log-log), coloured by what the step held."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    kinds = {"decode only": lambda s: s.prefill_tokens == 0, "prefill only": lambda s: s.decode_seqs == 0,
             "mixed": lambda s: s.prefill_tokens > 0 and s.decode_seqs > 0}
    for name, pick in kinds.items():
        pts = [(t * 1e3, model.seconds(s) * 1e3) for s, t in samples if pick(s)]
        if pts:
            ax.scatter(*zip(*pts, strict=True), s=8, alpha=0.6, label=f"{name} ({len(pts)})")
    lo = min(t for _, t in samples) * 1e3 * 0.8
    hi = max(t for _, t in samples) * 1e3 * 1.2
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="fitted = measured")
    ax.set(xscale="log", yscale="log", xlabel="measured step time (ms)", ylabel="fitted step time (ms)",
           title=f"step-time model: median error {model.source['median_abs_rel_error']:.1%}, "
                 f"p90 {model.source['p90_abs_rel_error']:.1%}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
