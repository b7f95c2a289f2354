"""How long one engine step takes, as a function of what the step holds: the model the planner simulates with
in place of the forward pass, fitted to measured steps by `tokenmill profile`. Pure Python and numpy; no torch.

A step runs every token it holds through the linear layers (cost grows with the row count M, steeply where
the weights' reuse starts to pay and then linearly), attends from each token over its context (decode: one
row per sequence over its whole context; prefill: a chunk of rows over a growing prefix), and pays a cost per
sequence (sampling, bookkeeping). So

    seconds = L(M) + a * decode_context + b * prefill_pairs + c * sequences

with L piecewise linear in M between knots (hat functions), all coefficients fitted non-negative by least
squares on relative error (steps range from milliseconds to seconds; each should count alike).

That is each step's expected time. A served step also stalls now and then (the frontend, the client, another
process on the cores): the profile keeps what its steps measured against the fit, as ratios grouped by the
fitted time (a stall of a few milliseconds stretches a short step more than a long one), and in the order
the steps ran (slow steps come in runs), and `StepNoise` replays them, so a simulation's tail latencies see
the stalls its mean cannot show. The profile also keeps each request's way outside the engine (`path`): HTTP
in, and the first token's way back out.
"""

from __future__ import annotations

import bisect
import json
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

KNOTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclass(frozen=True, slots=True)
class StepShape:
    """What one step holds, as far as its time is concerned."""

    rows: int  # tokens through the linear layers (prefill chunk tokens + decode tokens, speculation included)
    sequences: int
    decode_context: int  # sum over decoding sequences of the context each attends over
    prefill_pairs: int  # sum over prefill chunks of chunk length x (prefix + chunk length / 2): attention work
    prefill_tokens: int = 0
    decode_seqs: int = 0

    @classmethod
    def of(cls, seqs: Iterable[Any]) -> StepShape:
        """From a step's SeqInputs (tokenmill.runner.batch): anything with token_ids, start_pos and
        prompt_token_ids."""
        rows = n = ctx = pairs = prefill = decodes = 0
        for s in seqs:
            k = len(s.token_ids)
            rows += k
            n += 1
            if s.start_pos < len(s.prompt_token_ids):
                prefill += k
                pairs += k * (s.start_pos + (k + 1) // 2)
            else:
                decodes += 1
                ctx += s.start_pos + k
        return cls(rows, n, ctx, pairs, prefill, decodes)


def _hats(m: float) -> list[float]:
    """Weights of row count m on each knot's hat function (linear interpolation between knots; beyond the
    last knot, the last segment's slope continues)."""
    w = [0.0] * len(KNOTS)
    if m <= KNOTS[0]:
        w[0] = 1.0
        return w
    for i in range(1, len(KNOTS)):
        if m <= KNOTS[i] or i == len(KNOTS) - 1:
            lo, hi = KNOTS[i - 1], KNOTS[i]
            t = (m - lo) / (hi - lo)
            w[i - 1], w[i] = 1.0 - t, t
            return w
    return w


def features(shape: StepShape) -> list[float]:
    return [*_hats(shape.rows), shape.decode_context, shape.prefill_pairs, shape.sequences]


@dataclass
class StepTimeModel:
    """Fitted coefficients (seconds) and where they came from."""

    linear_s: list[float]  # L at each knot of KNOTS
    per_decode_context_s: float
    per_prefill_pair_s: float
    per_sequence_s: float
    source: dict[str, Any] = field(default_factory=dict)  # machine, model, flags, fit error, sample count
    # measured / fitted time of the profiled steps, in bins by fitted time: [[bin's lowest fitted s, ratios]]
    noise: list[list[Any]] = field(default_factory=list)
    # Each profiled step's place within its bin's ratios (0 = the fastest, 1 = the slowest), in the order the
    # steps ran: slow steps come in runs (a stall lasts, a shape the fit misjudges repeats), which this keeps.
    noise_trace: list[float] = field(default_factory=list)
    # The way of each profiled request outside the engine, [in s, out s, requests in flight when sent]: client
    # send to the frontend taking it (HTTP), and the engine's first token to the client having it (IPC, the
    # frontend, streaming). Not a step's time, but what a client's TTFT holds beside the steps; the simulator
    # adds it per request, drawn among requests sent with about as many in flight.
    path: list[list[float]] = field(default_factory=list)

    def seconds(self, shape: StepShape) -> float:
        coef = [*self.linear_s, self.per_decode_context_s, self.per_prefill_pair_s, self.per_sequence_s]
        return sum(c * x for c, x in zip(coef, features(shape), strict=True))

    def step_seconds(self, seqs: Sequence[Any]) -> float:
        """The Runner-facing form (MockRunner): a step's SeqInputs -> seconds."""
        return self.seconds(StepShape.of(seqs))

    def describe(self) -> str:
        src = self.source
        return (f"profiled on {src.get('cpu', '?')} ({src.get('model', '?')}): {self.linear_s[0] * 1e3:.1f} ms at "
                f"1 row, {self.linear_s[KNOTS.index(64)] * 1e3:.1f} ms at 64 rows, plus attention")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"knots": list(KNOTS), **asdict(self)}, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> StepTimeModel:
        from tokenmill.errors import ConfigError

        try:
            data = json.loads(Path(path).read_text())
            if data.pop("knots") != list(KNOTS):
                raise ValueError("it was fitted on other row-count knots; profile again")
            model = cls(**data)
            lows = [low for low, _ in model.noise]
            if lows != sorted(lows) or any(not ratios or min(ratios) <= 0 for _, ratios in model.noise):
                raise ValueError("its step spread must be bins in ascending order, each of positive ratios")
            if any(not 0 <= u <= 1 for u in model.noise_trace):
                raise ValueError("its step trace must hold ranks between 0 and 1")
            if any(len(p) != 3 or min(p[:2]) < 0 or p[2] < 1 for p in model.path):
                raise ValueError("its request paths must be [in s, out s, requests in flight] with neither time "
                                 "negative and at least one in flight")
            return model
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"cannot read the step-time profile {path}: {e}") from None


def fit(samples: Sequence[tuple[StepShape, float]], source: dict[str, Any] | None = None) -> StepTimeModel:
    """Non-negative least squares on relative error, then once more without the worst tenth of the steps
    when they are far off (a step stretched by another process on the cores is noise, not the model)."""
    if len(samples) < 8:
        raise ValueError(f"too few steps to fit ({len(samples)})")
    model = _fit_once(samples)
    errors = [abs(model.seconds(s) - t) / t for s, t in samples]
    cut = sorted(errors)[int(0.9 * (len(errors) - 1))]
    kept = [x for x, e in zip(samples, errors, strict=True) if e <= max(cut, 4 * _median(errors))]
    if len(kept) < len(samples):
        model = _fit_once(kept)
    errors = [abs(model.seconds(s) - t) / t for s, t in samples]
    model.noise = _noise_bins(model, samples)
    model.noise_trace = noise_ranks(model, samples[-MAX_TRACE_STEPS:])  # the latest: the steady load comes last
    model.source = {**(source or {}), "samples": len(samples), "outliers_dropped": len(samples) - len(kept),
                    "median_abs_rel_error": _median(errors),
                    "p90_abs_rel_error": sorted(errors)[int(0.9 * (len(errors) - 1))]}
    return model


def _fit_once(samples: Sequence[tuple[StepShape, float]]) -> StepTimeModel:
    """Knots no sample comes near take their neighbours' values by interpolation (past the last measured
    knot, the last measured segment's slope continues), so L stays a sensible curve between samples."""
    import numpy as np
    from scipy.optimize import nnls

    x = np.array([features(s) for s, _ in samples], dtype=np.float64)
    y = np.array([t for _, t in samples], dtype=np.float64)
    nk = len(KNOTS)
    used = x[:, :nk].sum(axis=0) > 0
    cols = [i for i in range(x.shape[1]) if i >= nk or used[i]]
    scale = x[:, cols].max(axis=0)
    scale[scale == 0] = 1.0
    solved, _ = nnls(x[:, cols] / scale / y[:, None], np.ones_like(y))
    coef = np.zeros(x.shape[1])
    coef[cols] = solved / scale
    knots = np.array(KNOTS, dtype=np.float64)
    at = np.flatnonzero(used)
    linear = np.interp(knots, knots[at], coef[:nk][at])
    if len(at) >= 2 and at[-1] + 1 < nk:
        a, b = at[-2], at[-1]
        slope = max(0.0, (coef[b] - coef[a]) / (knots[b] - knots[a]))
        linear[b + 1:] = coef[b] + slope * (knots[b + 1:] - knots[b])
    return StepTimeModel([float(v) for v in linear], float(coef[nk]), float(coef[nk + 1]), float(coef[nk + 2]))


NOISE_BIN_STEPS = 40  # at least this many steps to a bin of the noise model, at most NOISE_BINS bins
NOISE_BINS = 4


def _noise_bins(model: StepTimeModel, samples: Sequence[tuple[StepShape, float]]) -> list[list[Any]]:
    """Every step's measured / fitted time (outliers too: the stalls are what this keeps), in up to NOISE_BINS
    bins of equal count by fitted time."""
    pairs = sorted((model.seconds(s), t) for s, t in samples)
    pairs = [(f, t) for f, t in pairs if f > 0]
    bins = max(1, min(NOISE_BINS, len(pairs) // NOISE_BIN_STEPS))
    out = []
    for b in range(bins):
        part = pairs[b * len(pairs) // bins:(b + 1) * len(pairs) // bins]
        if part:
            out.append([0.0 if b == 0 else part[0][0], sorted(round(t / f, 4) for f, t in part)])
    return out


MAX_TRACE_STEPS = 5000


def noise_ranks(model: StepTimeModel, samples: Sequence[tuple[StepShape, float]]) -> list[float]:
    """Each step's rank among the ratios of its bin of `model.noise` (0 fastest, 1 slowest; the midpoint of
    its ties), in sample order."""
    lows = [lo for lo, _ in model.noise]
    out = []
    for shape, t in samples:
        f = model.seconds(shape)
        if f <= 0 or not lows:
            continue
        ratios = model.noise[max(0, bisect.bisect_right(lows, f) - 1)][1]
        r = round(t / f, 4)
        out.append(round((bisect.bisect_left(ratios, r) + bisect.bisect_right(ratios, r)) / 2 / len(ratios), 4))
    return out


TRACE_RUN_STEPS = 30  # mean length of a run of consecutive profiled steps that StepNoise replays (served steps:
# their ranks correlate 0.56-0.65 with the next step's, 0.4 ten steps on, 0-0.14 a hundred on)


class StepNoise:
    """A profile's step time, each step stretched or shortened by a ratio from what profiled steps of about the
    same fitted time measured against the fit (seeded). With the profile's trace (and `runs`), the ratios come
    in runs as the profiled steps' did: each step takes the rank that followed the previous step's in the
    trace, and every TRACE_RUN_STEPS steps or so the replay jumps to a random place (a block bootstrap); the
    rank picks the ratio within the bin of this step's own fitted time. Without the trace, or
    `runs` off, each step draws independently. Without noise bins, the fitted time."""

    def __init__(self, model: StepTimeModel, seed: int, runs: bool = True):
        self.model = model
        self.rng = random.Random(seed)
        self._lows = [lo for lo, _ in model.noise]
        self._trace = model.noise_trace if runs else []
        self._at: int | None = None

    def draw(self, fitted_s: float) -> float:
        if not self._lows:
            return 1.0
        ratios = self.model.noise[max(0, bisect.bisect_right(self._lows, fitted_s) - 1)][1]
        if not self._trace:
            return ratios[self.rng.randrange(len(ratios))]
        if self._at is None or self.rng.random() < 1 / TRACE_RUN_STEPS:
            self._at = self.rng.randrange(len(self._trace))
        else:
            self._at = (self._at + 1) % len(self._trace)
        return ratios[min(len(ratios) - 1, int(self._trace[self._at] * len(ratios)))]

    def step_seconds(self, seqs: Sequence[Any]) -> float:
        t = self.model.step_seconds(seqs)
        return t * self.draw(t)

    def describe(self) -> str:
        return self.model.describe() + (", with the profiled steps' spread" if self._lows else "")


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if s else math.nan


class StepRecorder:
    """Notes each engine step's shape and duration as a JSON line in a file: `serve --record-steps FILE`, which
    `tokenmill profile` reads to fit this model on the steps of a real server, frontend and all beside it on
    the cores. The duration is the whole step (scheduling, forward pass, bookkeeping) plus, when the engine
    went straight on from the previous step, the engine loop's work in between (sending that step's output,
    taking new requests): what a request waits per token.

    Each finished request gets a line too: when the frontend took it (its HTTP arrival) and when the engine
    produced its first token, so the profile can tell the client's TTFT apart into the engine's part and the
    way in and out (HTTP, the frontend, IPC, streaming), which the simulator adds per request (`path`)."""

    def __init__(self, path: str | Path):
        self.file = open(path, "a", buffering=1)  # noqa: SIM115 - open for the engine's life, line-buffered
        self._shape: StepShape | None = None
        self._prev_end: float | None = None  # when the previous step ended, if work was left after it

    def install(self, engine: Any) -> None:
        import time

        runner = engine.runner
        recorder = self

        class _Noting:
            def __getattr__(self, name: str) -> Any:
                return getattr(runner, name)

            def execute(self, seqs, interrupt=None):
                recorder._shape = StepShape.of(seqs)
                return runner.execute(seqs, interrupt)

        engine.runner = _Noting()
        step = engine.step

        def timed_step(*args: Any, **kwargs: Any):
            self._shape = None
            t0 = time.perf_counter()
            out = step(*args, **kwargs)
            end = time.perf_counter()
            start = self._prev_end if self._prev_end is not None else t0
            if self._shape is not None:
                self.file.write(json.dumps({**asdict(self._shape), "seconds": end - start}) + "\n")
            for u in out or ():
                if u.finish_reason and u.first_token_time is not None:
                    self.file.write(json.dumps({"request": u.request_id, "arrival": u.arrival_time,
                                                "first": u.first_token_time}) + "\n")
            self._prev_end = end if engine.has_unfinished() else None
            return out

        engine.step = timed_step


def read_recorded(path: str | Path) -> list[tuple[StepShape, float]]:
    """The recorded steps, in order."""
    samples = []
    for line in Path(path).read_text().splitlines():
        d = json.loads(line)
        if "seconds" not in d:
            continue
        seconds = d.pop("seconds")
        samples.append((StepShape(**d), seconds))
    return samples


def read_requests(path: str | Path) -> dict[str, tuple[float, float]]:
    """Engine request id -> (frontend arrival, engine first token), time.monotonic(), of finished requests."""
    out = {}
    for line in Path(path).read_text().splitlines():
        d = json.loads(line)
        if "request" in d:
            out[d["request"]] = (d["arrival"], d["first"])
    return out
