"""Serving metrics computed from raw per-request timestamps (pure Python + numpy; no torch, no I/O).

Definitions (those of vLLM's `bench serve` and MLPerf's server scenario):
- TTFT: first output chunk received - request sent.
- TPOT: (e2e - TTFT) / (output tokens - 1), per request with more than one output token.
- ITL: time between consecutive output chunks of a request (a chunk may carry several tokens).
- e2e: last byte received - request sent.
- throughput: completed requests (and their input / output tokens) per second of benchmark wall time,
  from the first request sent to the last one finished.
- goodput: completed requests per second that met every SLO given (ttft, tpot, e2e; seconds).

A request counts only if it finished without error and returned exactly the output tokens asked for. One
that returned fewer (a server that stopped at EOS, or cut the request) is flagged `short`, more is flagged
`long`; neither enters latency or throughput figures, and the run reports how many there were.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tokenmill.errors import ConfigError

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    index: int
    prompt_len: int
    output_len: int  # asked for
    scheduled: float = 0.0  # arrival time drawn for it, seconds from the benchmark start
    sent: float = 0.0  # when it was sent (after waiting for a concurrency slot)
    chunks: list[float] = field(default_factory=list)  # arrival of each chunk that carried output
    end: float = 0.0
    output_tokens: int | None = None  # as the server reported it (usage), else counted chunks
    tokens_source: str = ""  # "usage" or "chunks"
    prompt_tokens: int | None = None  # as the server reported it
    error: str = ""
    served_by: str = ""  # the replica that answered, where a router says so (loadgen.SERVED_BY_HEADER)

    @property
    def status(self) -> str:
        if self.error:
            return "error"
        if self.output_tokens is None or not self.chunks:
            return "error"
        if self.output_tokens < self.output_len:
            return "short"
        if self.output_tokens > self.output_len:
            return "long"
        return "ok"

    @property
    def ttft(self) -> float:
        return self.chunks[0] - self.sent

    @property
    def e2e(self) -> float:
        return self.end - self.sent

    @property
    def tpot(self) -> float | None:
        n = self.output_tokens or 0
        return (self.e2e - self.ttft) / (n - 1) if n > 1 else None

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunks, self.chunks[1:], strict=False)]


def parse_slo(text: str | None) -> dict[str, float]:
    """'ttft=2s,tpot=100ms' -> {'ttft': 2.0, 'tpot': 0.1}, in seconds; keys ttft, tpot, e2e. A bare number is
    seconds (a bare number over 60 is refused: 'ttft=300' is almost always meant as milliseconds)."""
    if not text:
        return {}
    slo = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip().lower(), value.strip().lower()
        if not sep or key not in ("ttft", "tpot", "e2e"):
            raise ConfigError(f"bad SLO {part!r}: expected ttft=2s, tpot=100ms or e2e=30s")
        scale, number = (1e-3, value[:-2]) if value.endswith("ms") else (1.0, value.removesuffix("s"))
        try:
            v = float(number) * scale
        except ValueError:
            raise ConfigError(f"bad SLO {part!r}: {value!r} is not a duration (2s, 100ms)") from None
        if not v > 0:
            raise ConfigError(f"bad SLO {part!r}: the limit must be positive")
        if scale == 1.0 and not value.endswith("s") and v > 60:
            raise ConfigError(f"bad SLO {part!r}: {v:g} seconds? write {value}ms for milliseconds or {value}s for "
                              "seconds (vLLM's --goodput ttft:300 means milliseconds)")
        slo[key] = v
    return slo


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """vLLM's --goodput ttft:300 tpot:50 (milliseconds) -> limits in seconds."""
    slo = {}
    for item in items or []:
        key, sep, value = item.partition(":")
        key = key.strip().lower()
        try:
            ms = float(value)
        except ValueError:
            ms = -1.0
        if not sep or key not in ("ttft", "tpot", "e2el", "e2e") or not ms > 0:
            raise ConfigError(f"bad --goodput {item!r}: expected ttft:MS, tpot:MS or e2el:MS")
        slo["e2e" if key == "e2el" else key] = ms / 1e3
    return slo


def summarize(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "median": float("nan"), "p90": float("nan"), "p99": float("nan"),
                "n": 0}
    a = np.asarray(values, dtype=float)
    pct = np.percentile(a, PERCENTILES)  # linear interpolation between order statistics
    return {"mean": float(a.mean()), "median": float(pct[0]), "p90": float(pct[1]), "p99": float(pct[2]),
            "n": len(values)}


def meets_slo(r: RequestRecord, slo: dict[str, float]) -> bool:
    if "ttft" in slo and r.ttft > slo["ttft"]:
        return False
    if "tpot" in slo and (r.tpot or 0.0) > slo["tpot"]:
        return False
    return not ("e2e" in slo and r.e2e > slo["e2e"])


def compute(records: list[RequestRecord], slo: dict[str, float] | None = None,
            duration: float | None = None) -> dict:
    """All figures of a run. `duration` defaults to first send -> last end over every request."""
    slo = slo or {}
    done = [r for r in records if r.status == "ok"]
    if duration is None:
        ends = [r.end for r in records if r.end]
        duration = (max(ends) - min(r.sent for r in records)) if ends else 0.0
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: float("nan"))
    n_in = sum(r.prompt_len for r in done)
    n_out = sum(r.output_tokens or 0 for r in done)
    good = [r for r in done if meets_slo(r, slo)]
    statuses = [r.status for r in records]
    out = {
        "num_requests": len(records),
        "completed": len(done),
        "short": statuses.count("short"),
        "long": statuses.count("long"),
        "errors": statuses.count("error"),
        "duration_s": duration,
        "request_throughput": per_s(len(done)),
        "input_throughput": per_s(n_in),
        "output_throughput": per_s(n_out),
        "total_token_throughput": per_s(n_in + n_out),
        "total_input_tokens": n_in,
        "total_output_tokens": n_out,
        "ttft_s": summarize([r.ttft for r in done]),
        "tpot_s": summarize([t for r in done if (t := r.tpot) is not None]),
        "itl_s": summarize([x for r in done for x in r.itls]),
        "e2e_s": summarize([r.e2e for r in done]),
        "queue_s": summarize([r.sent - r.scheduled for r in done]),
        "slo": slo,
    }
    if slo:
        out["good_requests"] = len(good)
        out["goodput"] = per_s(len(good))
    return out
