"""The lifetime ledger: inference compute observed on a server (its /v1/usage) against the compute that trained
the model, and the date on which the first passes the second at the observed traffic."""

from __future__ import annotations

import datetime as dt
import math
from typing import Any


def rate(first: dict[str, Any], second: dict[str, Any] | None = None) -> float:
    """Inference FLOPs per second: between two snapshots of /v1/usage (the traffic now), or over one
    snapshot's whole uptime (the lifetime average)."""
    if second is None:
        return first["total"]["flops"] / max(first["uptime_s"], 1e-9)
    if second["since"] != first["since"]:
        raise ValueError("the two usage snapshots come from different server runs (it restarted between them)")
    return (second["total"]["flops"] - first["total"]["flops"]) / max(second["now"] - first["now"], 1e-9)


def crossover(usage: dict[str, Any], flops_per_s: float, training_flops: float) -> dict[str, Any]:
    """When cumulative inference compute (what `usage` counted so far, then `flops_per_s`) reaches
    `training_flops`: seconds from the snapshot, and the calendar date (UTC)."""
    done = usage["total"]["flops"]
    left = training_flops - done
    if left <= 0:
        seconds = 0.0
    elif flops_per_s > 0:
        seconds = left / flops_per_s
    else:
        seconds = math.inf
    when = None
    if math.isfinite(seconds) and seconds < 1e11:  # datetime's range is years 1..9999
        when = dt.datetime.fromtimestamp(usage["now"] + seconds, dt.UTC).isoformat(timespec="seconds")
    return {"inference_flops_so_far": done, "training_flops": training_flops, "flops_per_s": flops_per_s,
            "flops_per_day": flops_per_s * 86400, "passed": left <= 0, "seconds_from_now": seconds,
            "days_from_now": seconds / 86400, "date_utc": when}
