"""The autoscaler's predicted signal: how many replicas the recent demand needs, by simulating it (the same
simulator as `tokenmill plan`, the profiled step time) on 1, 2, ... replicas until one holds the TTFT target."""

from __future__ import annotations

from collections.abc import Callable

from tokenmill.cluster.autoscale_policy import AutoscaleConfig
from tokenmill.config import EngineConfig
from tokenmill.engine.step_time import StepTimeModel
from tokenmill.planning.simulator import Slo, find_replicas, simulate
from tokenmill.planning.workload import Arrival
from tokenmill.server.mock_engine import StepSeconds


def replicas_needed(profile: str | StepSeconds, config: EngineConfig, routing: str, autoscale: AutoscaleConfig,
                    num_blocks: int | None = None) -> Callable[[list[tuple[float, int, int]], float], int]:
    """A predictor for tokenmill.cluster.autoscaler: (arrivals in a window as (t, prompt tokens, max tokens),
    window seconds) -> the fewest replicas whose simulated p99 TTFT of that demand stays within the autoscale
    target (capped at its max; at least its min)."""
    from tokenmill.models.loader import open_model

    model = StepTimeModel.load(profile) if isinstance(profile, str) else profile
    if num_blocks is None and isinstance(model, StepTimeModel):
        num_blocks = model.source.get("num_blocks")
    arch = open_model(config.model).arch
    slo = Slo(ttft_s=autoscale.target)

    def predict(demand: list[tuple[float, int, int]], window_s: float) -> int:
        if not demand:
            return max(autoscale.min, 0)
        arrivals = [Arrival(t, max(1, p), max(1, o)) for t, p, o in sorted(demand)]
        best, _ = find_replicas(lambda k: simulate(arrivals, config=config, arch=arch, model=model, replicas=k,
                                                   routing=routing, num_blocks=num_blocks), slo, autoscale.max)
        return min(autoscale.max, max(autoscale.min, best if best > 0 else autoscale.max))

    return predict
