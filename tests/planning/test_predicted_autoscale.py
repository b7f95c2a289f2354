"""The autoscaler's predicted signal: the planner's replica count for the recent demand becomes a pressure, so
the decision grows the replica set as the arrival rate rises, with no queue or slow TTFT observed yet."""

from __future__ import annotations

import pytest

from tokenmill.cluster.autoscale_policy import AutoscaleConfig, Observation, decide, pressure
from tokenmill.cluster.config import RouterConfig
from tokenmill.config import EngineConfig
from tokenmill.errors import ConfigError
from tokenmill.planning import workload
from tokenmill.planning.predictor import replicas_needed
from tokenmill.server.mock_engine import StepModel

CFG = AutoscaleConfig(min=1, max=8, target=1.0, up_delay=2.0)
STEP = StepModel(base_s=0.02, prefill_per_token_s=0.0002, decode_per_seq_s=0.001)


def test_a_predicted_need_is_pressure_before_any_queue_forms():
    calm = [Observation(t=float(t), replicas=1, needed=3) for t in range(5)]
    assert pressure(calm[-1], CFG) == 3.0
    d = decide(calm, current=1, last_change=-100.0, cfg=CFG)
    assert d.replicas == 3, d
    assert decide([Observation(t=float(t), replicas=3, needed=3) for t in range(5)], 3, -100.0, CFG).replicas == 3


def test_the_predictor_asks_for_more_replicas_as_the_rate_rises():
    config = EngineConfig.from_kwargs(model="default", max_num_seqs=16, max_num_batched_tokens=512)
    predict = replicas_needed(STEP, config, "least-load", CFG)
    needed = []
    for rate in (0.5, 10.0, 25.0):
        demand = workload.poisson(rate, 30.0, workload.Sizes(256, 64), seed=4)
        needed.append(predict([(a.t, a.prompt_tokens, a.output_tokens) for a in demand], 30.0))
    assert needed[0] == 1 and needed[0] < needed[1] < needed[2] <= CFG.max, needed
    assert predict([], 30.0) == CFG.min


def test_predicted_needs_a_profile():
    with pytest.raises(ConfigError, match="autoscale-profile"):
        RouterConfig(spawn=1, autoscale="min=1,max=2", autoscale_signal="predicted")
