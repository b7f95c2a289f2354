"""`tokenmill serve --cascade SMALL,LARGE` options (no torch): the two models, the difficulty signal and the
escalation rule."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.cluster.cascade_policy import SIGNALS
from tokenmill.errors import ConfigError


def _opt(default, help: str, **extra):  # noqa: A002 - 'help' mirrors argparse
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class CascadeConfig:
    cascade: str | None = _opt(
        None, "Serve a difficulty cascade instead of one model: SMALL,LARGE (two models, e.g. 'default,gemma3', each "
              "served by a spawned `tokenmill serve` replica with the other engine flags; or two replica URLs). The "
              "small model answers; a request escalates to the large one when the difficulty signal is above the "
              "threshold. Answers say which model answered (`model`, a `cascade` field, x-tokenmill-cascade header).")
    cascade_signal: str = _opt(
        "logprob", "Difficulty signal: logprob (minus the mean logprob of the small model's first tokens), entropy "
                   "(their mean next-token entropy, from top logprobs), or router (the learned prompt router of "
                   "--cascade-fit, decided before generating).", choices=list(SIGNALS))
    escalate_rate: float | None = _opt(
        None, "Target share of requests escalated to the large model, in [0, 1]: the threshold at that quantile of "
              "the signal on the held-out prompts of --cascade-fit (0 and 1 need no fit).")
    escalate_threshold: float | None = _opt(
        None, "Escalate when the signal is above this value (instead of --escalate-rate).")
    cascade_fit: str | None = _opt(None, "The fitted cascade JSON from `tokenmill cascade fit` (router weights, "
                                         "held-out scores for calibration).")
    cascade_first_tokens: int = _opt(4, "Answer tokens the confidence signals judge (a fit's own value wins).")

    def __post_init__(self) -> None:
        if self.cascade is None:
            for name in ("escalate_rate", "escalate_threshold", "cascade_fit"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"--{name.replace('_', '-')} needs --cascade SMALL,LARGE")
            return
        if len(self.models) != 2:
            raise ConfigError(f"--cascade takes two comma-separated models or replica URLs, SMALL,LARGE; got "
                              f"{self.cascade!r}")
        if sum(m.startswith(("http://", "https://")) for m in self.models) == 1:
            raise ConfigError("--cascade: give two models or two replica URLs, not one of each")
        if self.cascade_signal not in SIGNALS:
            raise ConfigError(f"unknown --cascade-signal {self.cascade_signal!r}; choose one of {', '.join(SIGNALS)}")
        if (self.escalate_rate is None) == (self.escalate_threshold is None):
            raise ConfigError("give exactly one of --escalate-rate R or --escalate-threshold T with --cascade")
        if self.escalate_rate is not None:
            if not 0.0 <= self.escalate_rate <= 1.0:
                raise ConfigError(f"--escalate-rate must lie in [0, 1], got {self.escalate_rate}")
            if 0.0 < self.escalate_rate < 1.0 and not self.cascade_fit:
                raise ConfigError("--escalate-rate strictly between 0 and 1 is calibrated on held-out prompts: "
                                  "give --cascade-fit FILE from `tokenmill cascade fit`")
        if self.cascade_signal == "router" and not self.cascade_fit:
            raise ConfigError("--cascade-signal router needs --cascade-fit FILE (the router's weights)")
        if self.cascade_first_tokens < 1:
            raise ConfigError("--cascade-first-tokens must be >= 1")

    @property
    def models(self) -> list[str]:
        return [m.strip() for m in (self.cascade or "").split(",") if m.strip()]

    @property
    def urls(self) -> bool:
        return self.models[0].startswith(("http://", "https://"))
