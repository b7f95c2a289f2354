"""The difficulty cascade's decisions as pure functions (numpy, no torch): difficulty signals, the escalation
rule, the learned prompt router, and the threshold calibrated to an escalation rate.

Every signal is a difficulty score, higher = harder; a request escalates to the large model when its score is
above the threshold. Signals:
  logprob  -- minus the mean logprob of the small model's first K answer tokens (low confidence = hard);
  entropy  -- the mean entropy of the small model's next-token distribution over those tokens, from its top-N
              logprobs (the mass outside the top N counted as one more outcome);
  router   -- a logistic regression over the prompt's embedding (all-MiniLM-L6-v2): the predicted chance that the
              small model's answer differs from the large one's. Decided before any generation: an escalated
              request never runs on the small model.
`threshold_for_rate` puts the threshold at the quantile of held-out scores that escalates the share R of them;
the fitted file (`CascadeFit`, JSON) keeps those held-out scores per signal, so any --escalate-rate can be served.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tokenmill.errors import ConfigError

SIGNALS = ("logprob", "entropy", "router")
FIT_VERSION = 1


# -- signals from the small model's answer ---------------------------------------------------------------------
def neg_mean_logprob(token_logprobs: Sequence[float], first: int) -> float:
    """Minus the mean logprob of the first `first` tokens (0.0 for an empty answer: nothing to doubt)."""
    lp = list(token_logprobs)[:first]
    return -sum(lp) / len(lp) if lp else 0.0


def top_entropy(top_logprobs: Sequence[float]) -> float:
    """Entropy (nats) of a next-token distribution known by its top-N logprobs; the rest of the mass counts as one
    outcome, so the value is a lower bound of the true entropy that is exact when the top N hold all the mass."""
    p = [math.exp(x) for x in top_logprobs if x is not None and x > -1e30]
    rest = max(0.0, 1.0 - sum(p))
    return -sum(x * math.log(x) for x in [*p, rest] if x > 0)


def mean_entropy(per_token_top: Sequence[Sequence[float]], first: int) -> float:
    rows = list(per_token_top)[:first]
    return sum(top_entropy(r) for r in rows) / len(rows) if rows else 0.0


def confidence_score(signal: str, token_logprobs: Sequence[float], per_token_top: Sequence[Sequence[float]],
                     first: int) -> float:
    if signal == "logprob":
        return neg_mean_logprob(token_logprobs, first)
    if signal == "entropy":
        return mean_entropy(per_token_top, first)
    raise ValueError(f"{signal!r} is not a confidence signal")


# -- the decision and its calibration ----------------------------------------------------------------------------
def escalate(score: float, threshold: float) -> bool:
    """Whether a request with this difficulty score goes to the large model."""
    return score > threshold


def threshold_for_rate(scores: Sequence[float], rate: float) -> float:
    """The threshold that escalates the share `rate` of `scores` (held-out prompts): the largest round(rate * n)
    of them lie above it. Rate 0 escalates nothing (+inf), rate 1 everything (-inf). Ties at the threshold stay."""
    if not 0.0 <= rate <= 1.0:
        raise ConfigError(f"an escalation rate must lie in [0, 1], got {rate}")
    if rate == 0.0:
        return math.inf
    if rate == 1.0:
        return -math.inf
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if s.size == 0:
        raise ConfigError("no held-out scores to calibrate an escalation rate on")
    k = int(round(rate * s.size))  # escalated
    if k == 0:
        return float(s[-1])
    if k >= s.size:
        return -math.inf
    return float((s[s.size - k - 1] + s[s.size - k]) / 2)  # between the last kept and the first escalated


def escalation_share(scores: Sequence[float], threshold: float) -> float:
    s = np.asarray(scores, dtype=np.float64)
    return float(np.mean(s > threshold)) if s.size else 0.0


# -- the learned router ---------------------------------------------------------------------------------------------
@dataclass
class PromptRouter:
    """Logistic regression on standardized prompt embeddings: P(the small model's answer differs from the large's)."""

    weights: list[float]
    bias: float
    mean: list[float]
    scale: list[float]

    def scores(self, x: np.ndarray) -> np.ndarray:
        z = (np.atleast_2d(np.asarray(x, dtype=np.float64)) - np.asarray(self.mean)) / np.asarray(self.scale)
        return 1.0 / (1.0 + np.exp(-(z @ np.asarray(self.weights) + self.bias)))

    def score(self, x: Sequence[float]) -> float:
        return float(self.scores(np.asarray(x))[0])

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, l2: float = 1.0, steps: int = 500) -> PromptRouter:
        """Full-batch Newton-free gradient descent (Adam) on the L2-regularized log loss; balanced class weights,
        so a rare label still moves the boundary."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        mean, scale = x.mean(0), x.std(0) + 1e-6
        z = (x - mean) / scale
        n, d = z.shape
        pos = max(1.0, y.sum())
        neg = max(1.0, n - y.sum())
        sw = np.where(y > 0.5, n / (2 * pos), n / (2 * neg))
        w, b = np.zeros(d), 0.0
        m, v = np.zeros(d + 1), np.zeros(d + 1)
        lr, b1, b2 = 0.05, 0.9, 0.999
        for t in range(1, steps + 1):
            p = 1.0 / (1.0 + np.exp(-(z @ w + b)))
            g = sw * (p - y) / n
            grad = np.concatenate([z.T @ g + l2 * w / n, [g.sum()]])
            m = b1 * m + (1 - b1) * grad
            v = b2 * v + (1 - b2) * grad ** 2
            step = lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + 1e-8)
            w -= step[:d]
            b -= step[d]
        return cls(w.tolist(), float(b), mean.tolist(), scale.tolist())


@dataclass
class CascadeFit:
    """What `tokenmill cascade fit` writes: the router, the held-out scores of every signal, and how they were
    made (first tokens judged, top-N, the models), so the server scores requests the same way."""

    small: str
    large: str
    first_tokens: int = 4
    top_logprobs: int = 5
    embedding_model: str = "default"
    embed_chars: int = 512
    router: PromptRouter | None = None
    heldout: dict[str, list[float]] = field(default_factory=dict)  # signal -> held-out scores
    report: dict = field(default_factory=dict)
    version: int = FIT_VERSION

    def threshold(self, signal: str, rate: float) -> float:
        if rate in (0.0, 1.0):
            return threshold_for_rate([], rate)
        if not self.heldout.get(signal):
            raise ConfigError(f"the fitted cascade has no held-out scores for the {signal!r} signal")
        return threshold_for_rate(self.heldout[signal], rate)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> CascadeFit:
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read the fitted cascade {path}: {e}") from None
        if not isinstance(raw, dict) or raw.get("version") != FIT_VERSION:
            raise ConfigError(f"{path} is not a version-{FIT_VERSION} fitted cascade (from `tokenmill cascade fit`)")
        router = raw.pop("router", None)
        try:
            return cls(**raw, router=PromptRouter(**router) if router else None)
        except TypeError as e:
            raise ConfigError(f"{path}: malformed fitted cascade ({e})") from None


def embed_text(prompt_text: str, chars: int) -> str:
    """The part of a prompt the router embeds: its last `chars` characters (the question sits at the end, and the
    embedding model reads at most 256 tokens)."""
    return prompt_text[-chars:] if chars > 0 else prompt_text
