"""`tokenmill profile`: measure this machine's engine step time over the shapes serving produces, and fit the
planner's step-time model to it.

The real engine runs (same model, dtype, quantization, threads and scheduler limits as `serve` would use);
only its runner is wrapped, to time each forward pass and note what it held. Workloads sweep the row count
(decode batches of 1..max_num_seqs sequences, prefill chunks), the context decoding sequences attend over,
and mixed steps, within a time budget.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tokenmill.engine.step_time import StepShape, StepTimeModel, fit
from tokenmill.kernels.cpu import cpu_name

logger = logging.getLogger(__name__)


@dataclass
class TimedRunner:
    """Wraps the engine's runner to note what each forward pass held; `timed_step` times the whole engine
    step around it (scheduling and output bookkeeping belong to a step's cost as much as the forward pass)."""

    inner: Any
    samples: list[tuple[StepShape, float]] = field(default_factory=list)
    _shape: StepShape | None = None

    def execute(self, seqs, interrupt=None):
        self._shape = StepShape.of(seqs)
        return self.inner.execute(seqs, interrupt)

    def timed_step(self, step: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args, **kwargs):
            self._shape = None
            t0 = time.perf_counter()
            out = step(*args, **kwargs)
            if self._shape is not None:
                self.samples.append((self._shape, time.perf_counter() - t0))
            return out

        return run

    def __getattr__(self, name: str) -> Any:  # release, propose, num_blocks, ...
        return getattr(self.inner, name)


def _workloads(max_seqs: int, max_len: int) -> list[tuple[str, int, int, int]]:
    """(label, sequences, prompt tokens, output tokens), cheapest first, so a short budget still spans rows."""
    batches = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b <= max_seqs]
    out = [(f"decode x{b}", b, 16, 24) for b in batches]
    out += [(f"prefill {p}", 1, p, 2) for p in (64, 256, 1024) if p + 4 <= max_len]
    out += [(f"mixed x{b}", b, 128, 32) for b in (8, 32) if b <= max_seqs]
    out += [(f"long decode x{b}", b, 512, 16) for b in (1, 4, 16) if b <= max_seqs and 600 <= max_len]
    return out


def profile(llm, budget_s: float = 240.0, progress: Callable[[str], None] | None = None,
            ) -> tuple[StepTimeModel, list[tuple[StepShape, float]]]:
    """Run the workloads on `llm` (an entrypoints.llm.LLM) and fit. Warm-up steps are dropped."""
    from tokenmill.sampling_params import SamplingParams

    engine = llm.engine
    timed = TimedRunner(engine.runner)
    engine.runner = timed
    engine.step = timed.timed_step(engine.step)  # an instance attribute, shadowing the method until restored
    cfg = llm.config
    max_seqs = cfg.max_num_seqs or 256
    max_len = engine.runner.max_model_len if hasattr(engine.runner, "max_model_len") else 2048
    deadline = time.monotonic() + budget_s
    done: list[str] = []
    vocab = max(100, llm.tokenizer.vocab_size - 200)
    try:
        llm.generate([[11 + i for i in range(8)]], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
        timed.samples.clear()
        for k, (label, n, prompt_len, out_len) in enumerate(_workloads(max_seqs, max_len)):
            if time.monotonic() > deadline:
                logger.warning("profile budget spent: skipped %s and later workloads", label)
                break
            if progress:
                progress(label)
            # Distinct prompts (no prefix-cache hits: the planner's cold case); ignore_eos keeps lengths exact.
            prompts = [[(k * 7919 + i * 104729 + j * 31) % vocab + 100 for j in range(prompt_len)] for i in range(n)]
            llm.generate(prompts, SamplingParams(max_tokens=out_len, ignore_eos=True, temperature=0.0),
                         use_tqdm=False)
            done.append(label)
    finally:
        engine.runner = timed.inner
        del engine.step
    source = {"cpu": cpu_name(), "machine": platform.machine(), "model": cfg.model, "dtype": cfg.dtype,
              "quantization": cfg.quantization, "num_threads": cfg.num_threads,
              "max_num_seqs": cfg.max_num_seqs, "max_num_batched_tokens": cfg.max_num_batched_tokens,
              "num_blocks": timed.inner.num_blocks, "block_size": timed.inner.block_size,
              "max_model_len": timed.inner.max_model_len, "budget_s": budget_s, "workloads": done}
    return fit(timed.samples, source), timed.samples


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
