"""The simulator against the real server it models: `tokenmill serve --mock` is the real HTTP frontend,
admission, engine loop process boundary, scheduler and block pool with a step time of known arithmetic. The
same arrivals through both must give the same latencies, up to the server's own overheads (HTTP, IPC,
detokenizing), which a 40 ms step dwarfs."""

from __future__ import annotations

import pytest
from server_helpers import start_server

from tokenmill.config import EngineConfig
from tokenmill.models.loader import open_model
from tokenmill.planning import workload
from tokenmill.planning.simulator import simulate
from tokenmill.server.mock_engine import StepModel

pytestmark = pytest.mark.slow
STEP = StepModel(base_s=0.040, prefill_per_token_s=0.0002, decode_per_seq_s=0.002)


def test_the_simulation_predicts_the_mock_servers_latencies():
    server = start_server("--mock", "--no-inproc", "--mock-base-ms", "40", "--mock-prefill-ms-per-token", "0.2",
                          "--mock-decode-ms-per-seq", "2", "--max-num-seqs", "16", "--max-num-batched-tokens", "512")
    try:
        arch = open_model("default").arch
        # ~60% busy: queues form at times, requests share steps, and some wait for a slot (max_num_seqs 16).
        arrivals = workload.poisson(1.6, 15.0, workload.Sizes(192, 24, 0.5), seed=11)
        real = workload.measured(workload.replay(server.url, arrivals, arch.vocab_size))
    finally:
        server.stop()
    config = EngineConfig.from_kwargs(model="default", max_num_seqs=16, max_num_batched_tokens=512)
    sim = simulate(arrivals, config=config, arch=arch, model=STEP).summary()
    assert real["completed"] == sim["completed"] == len(arrivals)
    for metric in ("ttft_s", "tpot_s", "e2e_s"):
        for p in ("p50", "p90"):
            assert sim[metric][p] == pytest.approx(real[metric][p], rel=0.2, abs=0.015), (metric, p, sim, real)
