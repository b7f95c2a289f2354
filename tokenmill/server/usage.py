"""Who used how much since the server started: requests, tokens (prompt, of them cached, output) and compute
(FLOPs, tokenmill.models.flops) per tenant and in total. `GET /v1/usage` serves it; `tokenmill ledger` reads
it to say when inference compute passes the model's training compute."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from tokenmill.models.flops import FlopModel


@dataclass
class Tally:
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    flops: float = 0.0

    def add(self, prompt: int, cached: int, output: int, flops: float) -> None:
        self.requests += 1
        self.prompt_tokens += prompt
        self.cached_tokens += cached
        self.output_tokens += output
        self.flops += flops


class UsageLedger:
    """label(tenant) bounds the tenants kept (the metrics' LabelLimiter: later ones share "other")."""

    def __init__(self, flops: FlopModel | None, label: Callable[[str], str] = lambda t: t):
        self.flops = flops
        self.label = label
        self.started = time.time()
        self.total = Tally()
        self.tenants: dict[str, Tally] = {}

    def record(self, tenant: str, prompt_tokens: int, cached_tokens: int, output_tokens: int) -> float:
        """One finished sequence; returns the FLOPs it cost (0 when the model's shape is unknown)."""
        f = self.flops.request(prompt_tokens, output_tokens, cached_tokens) if self.flops else 0.0
        self.total.add(prompt_tokens, cached_tokens, output_tokens, f)
        self.tenants.setdefault(self.label(tenant), Tally()).add(prompt_tokens, cached_tokens, output_tokens, f)
        return f

    def snapshot(self) -> dict[str, Any]:
        now = time.time()
        model = None if self.flops is None else {"active_params": self.flops.active_params,
                                                 "attention_flops_per_position": self.flops.attention_per_position}
        return {"object": "usage", "since": self.started, "now": now, "uptime_s": now - self.started,
                "model": model, "total": asdict(self.total),
                "tenants": {k: asdict(v) for k, v in sorted(self.tenants.items())}}
