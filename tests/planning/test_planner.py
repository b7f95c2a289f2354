"""The planner: the step-time fit recovers a known model and keeps its steps' spread, the simulation's arithmetic
is exact where it can be worked out by hand, a single-server queue waits as Pollaczek-Khinchine says (with and
without the spread, which is seeded), it runs far faster than real time, traces load, and the replica search is
right."""

from __future__ import annotations

import json
import math
import random
import statistics

import pytest

from tokenmill.config import EngineConfig
from tokenmill.engine.step_time import KNOTS, StepNoise, StepShape, StepTimeModel, fit
from tokenmill.errors import ConfigError
from tokenmill.models.loader import open_model
from tokenmill.planning import workload
from tokenmill.planning.simulator import Slo, find_replicas, simulate
from tokenmill.server.mock_engine import StepModel


@pytest.fixture(scope="module")
def arch():
    return open_model("default").arch


def _config(**kw) -> EngineConfig:
    return EngineConfig.from_kwargs(model="default", max_num_seqs=32, max_num_batched_tokens=512, **kw)


def test_the_fit_recovers_a_known_step_time_model():
    truth = StepTimeModel([0.004 + 0.0003 * k for k in KNOTS], 2e-7, 5e-9, 1e-4)
    rng = random.Random(0)
    samples = []
    for _ in range(300):
        rows = rng.choice([1, 2, 3, 4, 8, 16, 24, 32, 64, 100, 128, 256, 512])
        seqs = min(rows, rng.randint(1, 32))
        shape = StepShape(rows, seqs, rng.randint(0, 20000), rng.randint(0, 200000))
        samples.append((shape, truth.seconds(shape) * rng.uniform(0.99, 1.01)))
    got = fit(samples)
    assert got.source["median_abs_rel_error"] < 0.01
    for shape in (StepShape(1, 1, 300, 0), StepShape(64, 64, 40000, 0), StepShape(512, 1, 0, 150000)):
        assert got.seconds(shape) == pytest.approx(truth.seconds(shape), rel=0.03)


def test_one_request_takes_exactly_its_modelled_steps(arch):
    model = StepModel(base_s=0.010, prefill_per_token_s=0.001, decode_per_seq_s=0.002)
    a = workload.Arrival(t=5.0, prompt_tokens=100, output_tokens=10)
    rec = simulate([a], config=_config(), arch=arch, model=model).records[0]
    # One prefill step (100 tokens fit the 512-token budget) samples the first token; 9 decode steps follow.
    assert rec.ttft == pytest.approx(0.010 + 0.100)
    assert rec.tpot == pytest.approx(0.012)
    assert rec.end_t == pytest.approx(5.0 + 0.110 + 9 * 0.012)
    assert rec.tokens == 10


def test_a_queue_forms_when_arrivals_outpace_steps(arch):
    model = StepModel(base_s=0.050, prefill_per_token_s=0.0, decode_per_seq_s=0.0)
    # Requests arriving together share steps (continuous batching): all ten get their first token in step 1.
    together = [workload.Arrival(0.0, 16, 4) for _ in range(10)]
    res = simulate(together, config=_config(), arch=arch, model=model)
    assert [r.ttft for r in res.records] == pytest.approx([0.05] * 10)
    # max_num_seqs=2: the rest wait for slots, in arrival order.
    res = simulate(together, config=_config().__class__.from_kwargs(model="default", max_num_seqs=2,
                                                                    max_num_batched_tokens=512),
                   arch=arch, model=model)
    firsts = sorted(r.ttft for r in res.records)
    assert firsts[0] == pytest.approx(0.05) and firsts[-1] == pytest.approx(0.05 * (1 + 4 * 4))


def test_the_simulation_runs_far_faster_than_real_time(arch):
    model = StepModel(base_s=0.012, prefill_per_token_s=0.00005, decode_per_seq_s=0.0004)
    arrivals = workload.poisson(2.0, 600.0, workload.Sizes(128, 64, 0.5), seed=3)
    res = simulate(arrivals, config=_config(), arch=arch, model=model)
    s = res.summary()
    assert s["completed"] == len(arrivals) and s["rejected_429"] == 0
    assert s["simulated_s"] / s["wall_s"] >= 100, s


def test_admission_caps_reject_429_and_everything_else_completes(arch):
    model = StepModel(base_s=0.5, prefill_per_token_s=0.0, decode_per_seq_s=0.0)
    from tokenmill.planning.simulator import Limits

    flood = [workload.Arrival(0.001 * i, 32, 8) for i in range(50)]
    res = simulate(flood, config=_config(), arch=arch, model=model, limits=Limits(max_queued_requests=10))
    s = res.summary()
    assert s["rejected_429"] > 0 and s["completed"] + s["rejected_429"] == 50


def test_find_replicas_returns_the_fewest_that_meet_the_slo(arch):
    model = StepModel(base_s=0.02, prefill_per_token_s=0.0002, decode_per_seq_s=0.001)
    arrivals = workload.poisson(6.0, 120.0, workload.Sizes(256, 64), seed=5)
    slo = Slo(ttft_s=1.0, tpot_s=0.1)

    def run(k: int):
        return simulate(arrivals, config=_config(), arch=arch, model=model, replicas=k, routing="least-load")

    best, runs = find_replicas(run, slo, max_replicas=16)
    assert best > 1
    assert run(best).summary(slo)["meets_slo"] and not run(best - 1).summary(slo)["meets_slo"]
    assert len(runs) <= 2 * math.ceil(math.log2(16)) + 1


def test_traces_load_in_both_shapes(tmp_path):
    per_request = tmp_path / "requests.csv"
    arrivals = workload.poisson(3.0, 20.0, workload.Sizes(100, 50, 0.2), seed=1)
    workload.save_trace(arrivals, per_request)
    again = workload.load_trace(per_request, workload.Sizes())
    assert [(a.prompt_tokens, a.output_tokens) for a in again] == [(a.prompt_tokens, a.output_tokens)
                                                                    for a in arrivals]
    assert [a.t for a in again] == pytest.approx([a.t for a in arrivals], abs=1e-5)
    curve = tmp_path / "curve.csv"
    curve.write_text("t,rate\n0,1\n100,5\n200,0\n")
    got = workload.load_trace(curve, workload.Sizes(64, 32), seed=2)
    first, second = [a for a in got if a.t < 100], [a for a in got if 100 <= a.t < 200]
    assert 50 < len(first) < 160 and 380 < len(second) < 620 and all(a.t < 200 for a in got)
    bad = tmp_path / "bad.csv"
    bad.write_text("when,how_many\n1,2\n")
    with pytest.raises(ConfigError, match="needs columns"):
        workload.load_trace(bad, workload.Sizes())


def test_the_profile_round_trips(tmp_path):
    m = StepTimeModel([0.01] * len(KNOTS), 1e-7, 1e-9, 1e-4, {"cpu": "x"})
    m.save(tmp_path / "p.json")
    assert StepTimeModel.load(tmp_path / "p.json") == m
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(ConfigError, match="cannot read the step-time profile"):
        StepTimeModel.load(tmp_path / "broken.json")


def test_the_autoscaler_decision_runs_in_the_simulation(arch):
    """A quiet minute, a peak of several replicas' worth, a quiet tail: the simulated autoscaler (the router's
    own decide()) grows the replica set during the peak, after up_delay plus the cold start, and shrinks it in
    the tail, one replica at a time (during the peak too, when it overshot); every request completes."""
    from tokenmill.cluster.autoscale_policy import AutoscaleConfig

    model = StepModel(base_s=0.02, prefill_per_token_s=0.0002, decode_per_seq_s=0.001)
    curve = [(0.0, 0.5), (30.0, 15.0), (90.0, 0.3), (210.0, 0.0)]
    arrivals = workload.poisson(curve, 210.0, workload.Sizes(256, 64), seed=8)
    cfg = AutoscaleConfig(min=1, max=4, target=1.0, queue=4, up_delay=2, down_delay=20)
    res = simulate(arrivals, config=_config(), arch=arch, model=model, replicas=1, routing="least-load",
                   autoscale=cfg, cold_start_s=5.0)
    s = res.summary()
    assert s["completed"] == len(arrivals)
    ups = [e for e in res.scale_events if e["to"] > e["from"]]
    downs = [e for e in res.scale_events if e["to"] < e["from"]]
    assert ups and 30 < ups[0]["t"] < 45 and max(e["to"] for e in ups) >= 3, res.scale_events
    assert downs and downs[-1]["to"] == 1 and downs[-1]["t"] > 90, res.scale_events  # back to one in the tail
    assert all(e["from"] - e["to"] == 1 for e in downs) and min(e["t"] for e in downs) > ups[0]["t"]
    fixed = simulate(arrivals, config=_config(), arch=arch, model=model, replicas=4, routing="least-load")
    assert s["replica_hours"] < fixed.summary()["replica_hours"]  # it paid for fewer replica-hours than 4 fixed


def test_the_step_recorder_notes_shape_and_duration(arch, tmp_path):
    """serve --record-steps: each engine step's shape and its time (here the mock's modelled sleep), read back
    as the profiler reads them."""
    from tokenmill.engine.step_time import StepRecorder, read_recorded, read_requests
    from tokenmill.sampling_params import SamplingParams
    from tokenmill.server.mock_engine import mock_core

    engine = mock_core(_config(), arch, StepModel(base_s=0.004, prefill_per_token_s=0.0, decode_per_seq_s=0.0))
    StepRecorder(tmp_path / "steps.jsonl").install(engine)
    for k in range(3):
        engine.add_request([200 + k] * 40, SamplingParams(max_tokens=5, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    samples = read_recorded(tmp_path / "steps.jsonl")
    assert samples[0][0].prefill_tokens == 120 and samples[0][0].sequences == 3
    assert [s.decode_seqs for s, _ in samples[1:]] == [3, 3, 3, 3]
    assert all(0.004 <= t < 0.1 for _, t in samples)
    # and each finished request: when it arrived, and its first token at the end of the first (prefill) step
    requests = read_requests(tmp_path / "steps.jsonl")
    assert len(requests) == 3
    assert all(0.004 <= first - arrival < 0.1 for arrival, first in requests.values())


def test_predictive_admission_turns_away_what_would_wait_too_long(arch):
    """--max-queue-delay in the simulation: the frontend's own prediction (work ahead over the measured drain
    rate) turns arrivals away under overload, so the admitted ones' first tokens stay near the limit, where
    without it the queue, and every TTFT, keeps growing."""
    from tokenmill.planning.simulator import Limits

    model = StepModel(base_s=0.02, prefill_per_token_s=0.0004, decode_per_seq_s=0.001)
    arrivals = workload.poisson(12.0, 60.0, workload.Sizes(256, 32), seed=9)  # well past this model's capacity
    plain = simulate(arrivals, config=_config(), arch=arch, model=model)
    limited = simulate(arrivals, config=_config(), arch=arch, model=model, limits=Limits(max_queue_delay=1.0))
    p, q = plain.summary(), limited.summary()
    assert q["rejected_429"] > p["rejected_429"] + len(arrivals) // 4  # the plain run's 429s: the queue caps

    assert q["completed"] + q["rejected_429"] == len(arrivals)
    admitted = sorted(r.ttft for r in limited.records if r.ttft is not None)
    assert admitted[int(0.9 * len(admitted))] <= 1.5, admitted[-5:]  # p90 near the 1 s limit
    assert max(r.ttft for r in plain.records if r.ttft is not None) > 10 * 1.0


@pytest.mark.parametrize("interruptible", [True, False])
def test_an_arrival_that_outranks_the_step_in_flight_abandons_it_as_the_engine_does(arch, interruptible):
    """The step in flight polls for arrivals at the runner's check points (every 1/16 of the step, in its first
    half): a priority-0 arrival during a priority-1 prompt's chunk has the step abandoned and redone with it
    first (--interruptible-steps); without, it waits for the step's end."""
    model = StepModel(base_s=0.010, prefill_per_token_s=0.001, decode_per_seq_s=0.0)
    low = workload.Arrival(0.0, 1000, 2, priority=1)  # chunks of 512 tokens: 0.522 s a step
    high = workload.Arrival(0.1, 32, 2, priority=0)
    cfg = _config(scheduling_policy="priority", interruptible_steps=interruptible)
    res = simulate([low, high], config=cfg, arch=arch, model=model)
    step = 0.010 + 0.512
    if interruptible:  # seen at the 5th check point (4/16 of the step gone), then 32 + 480 prompt tokens
        assert res.records[1].first_t == pytest.approx(4 * step / 16 + step)
        # The abandoned quarter step is busy time too: then 32 + 480, 1 decode + 511, the last 9, one decode.
        assert res.busy_s[0] == pytest.approx(4 * step / 16 + step + 0.521 + 0.019 + 0.010)
    else:  # the chunk in flight ends, then 32 + 480 prompt tokens
        assert res.records[1].first_t == pytest.approx(2 * step)


def _one_step_requests(rate: float, n: int, seed: int) -> list[workload.Arrival]:
    """Poisson arrivals of requests that each take exactly one step: a prompt and one output token."""
    return workload.poisson(rate, n / rate, workload.Sizes(16, 1), seed=seed)


def _single_server_config() -> EngineConfig:
    return EngineConfig.from_kwargs(model="default", max_num_seqs=1, max_num_batched_tokens=512)


@pytest.mark.parametrize("ratios", [None, [0.5, 1.5], [0.25, 0.25, 0.25, 2.25]], ids=["M/D/1", "M/G/1", "skewed"])
def test_one_step_requests_queue_as_the_closed_form_says(arch, ratios):
    """One sequence at a time, one step a request: a single-server queue with service time S, so the mean wait
    before the first token is Pollaczek-Khinchine's lambda E[S^2] / (2 (1 - rho)) (M/D/1 when every step takes
    its fitted time, M/G/1 when the profile's spread stretches them)."""
    step, rate = 0.1, 7.0  # rho = 0.7
    model = StepTimeModel([step] * len(KNOTS), 0.0, 0.0, 0.0, noise=[[0.0, ratios]] if ratios else [])
    arrivals = _one_step_requests(rate, 8000, seed=11)
    res = simulate(arrivals, config=_single_server_config(), arch=arch, model=model, seed=4)
    services = [step * r for r in ratios] if ratios else [step]
    mean_s = sum(services) / len(services)
    mean_s2 = sum(s * s for s in services) / len(services)
    lam = len(arrivals) / arrivals[-1].t  # the rate these arrivals realise (1 % off 7/s moves the wait 4 %)
    expected_wait = lam * mean_s2 / (2 * (1 - lam * mean_s))
    waits = [r.ttft for r in res.records]
    assert all(w is not None for w in waits) and len(waits) == len(arrivals)
    got_wait = sum(waits) / len(waits) - mean_s
    assert got_wait == pytest.approx(expected_wait, rel=0.1)


def test_the_step_noise_is_seeded_and_off_on_request(arch):
    model = StepTimeModel([0.05] * len(KNOTS), 0.0, 0.0, 0.0, noise=[[0.0, [0.6, 1.0, 1.8]]])
    arrivals = _one_step_requests(12.0, 400, seed=3)

    def ttfts(**kw):
        return [r.ttft for r in simulate(arrivals, config=_single_server_config(), arch=arch, model=model,
                                         **kw).records]

    assert ttfts(seed=1) == ttfts(seed=1)
    assert ttfts(seed=1) != ttfts(seed=2)
    flat = ttfts(step_noise=False)
    assert flat == ttfts(step_noise=False, seed=9)
    assert min(flat) == pytest.approx(0.05)  # a request that finds the server idle: exactly one fitted step
    assert min(ttfts(seed=1)) == pytest.approx(0.03)  # the shortest draw, 0.6 x 0.05, on some idle arrival


def test_the_fit_keeps_the_steps_spread_by_fitted_time():
    truth = StepTimeModel([0.002 * k ** 0.5 + 0.004 for k in KNOTS], 0.0, 0.0, 0.0)
    rng = random.Random(1)
    samples = []
    for _ in range(320):
        shape = StepShape(rng.choice([1, 4, 16, 64, 256]), 1, 0, 0)
        t = truth.seconds(shape)
        samples.append((shape, t + (0.004 if rng.random() < 0.1 else 0.0)))  # a 4 ms stall one step in ten
    got = fit(samples)
    assert len(got.noise) == 4
    lows = [low for low, _ in got.noise]
    assert lows == sorted(lows) and lows[0] == 0.0
    assert sum(len(r) for _, r in got.noise) == len(samples)
    # the same stall stretches a short step more than a long one
    assert max(got.noise[0][1]) > max(got.noise[-1][1]) > 1.0
    # and each step's rank in its bin, in the order they ran: the stalled steps rank at the top
    assert len(got.noise_trace) == len(samples)
    stalled = [u for (shape, t), u in zip(samples, got.noise_trace, strict=True) if t > truth.seconds(shape)]
    assert min(stalled) > 0.8 and statistics.median(got.noise_trace) < 0.6


def test_the_step_noise_replays_the_profiled_steps_runs():
    """Slow steps came in runs in the profile (the trace's ranks: 100 fast, 100 slow, ...); the replay keeps
    runs, where independent draws alternate at random. The share of slow steps is the same either way."""
    trace = ([0.1] * 100 + [0.9] * 100) * 10
    model = StepTimeModel([0.01] * len(KNOTS), 0.0, 0.0, 0.0, noise=[[0.0, [1.0] * 50 + [2.0] * 50]],
                          noise_trace=trace)

    def draws(runs: bool) -> list[float]:
        noise = StepNoise(model, seed=4, runs=runs)
        return [noise.draw(0.01) for _ in range(4000)]

    def switches(xs: list[float]) -> int:
        return sum(a != b for a, b in zip(xs, xs[1:], strict=False))

    replayed, independent = draws(True), draws(False)
    assert set(replayed) == set(independent) == {1.0, 2.0}
    assert 0.4 < replayed.count(2.0) / 4000 < 0.6 and 0.4 < independent.count(2.0) / 4000 < 0.6
    assert switches(replayed) < 200 < 1500 < switches(independent)


def test_a_profile_keeps_its_spread_and_old_profiles_load(tmp_path):
    m = StepTimeModel([0.01] * len(KNOTS), 1e-7, 1e-9, 1e-4, {"cpu": "x"}, [[0.0, [0.9, 1.0, 1.4]]])
    m.save(tmp_path / "p.json")
    assert StepTimeModel.load(tmp_path / "p.json") == m
    old = json.loads((tmp_path / "p.json").read_text())
    del old["noise"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert StepTimeModel.load(tmp_path / "old.json").noise == []
    (tmp_path / "bad.json").write_text(json.dumps({**old, "noise": [[0.0, []]]}))
    with pytest.raises(ConfigError, match="step spread"):
        StepTimeModel.load(tmp_path / "bad.json")
    m.noise_trace = [0.1, 0.95, 0.5]
    m.path = [[0.002, 0.001, 1], [0.003, 0.004, 5]]
    m.save(tmp_path / "p.json")
    assert StepTimeModel.load(tmp_path / "p.json") == m
    assert StepTimeModel.load(tmp_path / "old.json").path == []
    (tmp_path / "bad.json").write_text(json.dumps({**old, "noise_trace": [1.5]}))
    with pytest.raises(ConfigError, match="step trace"):
        StepTimeModel.load(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text(json.dumps({**old, "path": [[0.002, -0.001, 1]]}))
    with pytest.raises(ConfigError, match="request paths"):
        StepTimeModel.load(tmp_path / "bad.json")


def test_the_requests_path_adds_to_ttft_and_e2e_only(arch):
    """A profile's request paths: the client sends at the trace's time, the server takes it `in` later, the
    client has each token `out` after the engine made it. TPOT is the engine's; TTFT and e2e grow by in + out
    (the median without the step spread; drawn per request, seeded, with it)."""
    model = StepTimeModel([0.02] * len(KNOTS), 0.0, 0.0, 0.0, noise=[[0.0, [1.0]]],
                          path=[[0.001, 0.002, 1], [0.003, 0.004, 1], [0.009, 0.010, 2]])
    arrivals = workload.poisson(2.0, 30.0, workload.Sizes(64, 8), seed=5)

    def run(**kw):
        return simulate(arrivals, config=_config(), arch=arch, model=model, **kw)

    bare = run(path_latency=False)
    median = run(step_noise=False)
    assert [r.arrival for r in median.records] == arrivals
    assert [r.in_s for r in median.records] == [0.003] * len(arrivals)
    b, m = bare.summary(), median.summary()
    assert m["tpot_s"] == b["tpot_s"]
    assert m["ttft_s"]["p50"] == pytest.approx(b["ttft_s"]["p50"] + 0.007)
    assert m["e2e_s"]["p99"] == pytest.approx(b["e2e_s"]["p99"] + 0.007)
    drawn = run(seed=3)
    assert {r.out_s for r in drawn.records} == {0.002, 0.004, 0.010}
    assert [r.ttft for r in drawn.records] == [r.ttft for r in run(seed=3).records]
    assert [r.ttft for r in drawn.records] != [r.ttft for r in run(seed=4).records]


def test_a_requests_path_is_drawn_for_the_requests_in_flight(arch):
    """The way out grows with the streams being served at once: a request sent alone draws from the profiled
    requests sent alone, one sent into a crowd from those sent into one."""
    alone = [[0.001, 0.001, 1]] * 40
    crowd = [[0.004, 0.030, 20]] * 40
    model = StepTimeModel([0.02] * len(KNOTS), 0.0, 0.0, 0.0, noise=[[0.0, [1.0]]], path=alone + crowd)
    quiet = [workload.Arrival(t * 2.0, 64, 8) for t in range(10)]  # each done long before the next
    busy = [workload.Arrival(t * 0.001, 64, 8) for t in range(30)]  # all in flight together
    q = simulate(quiet, config=_config(), arch=arch, model=model, seed=1)
    b = simulate(busy, config=_config(), arch=arch, model=model, seed=1)
    assert {r.out_s for r in q.records} == {0.001}
    assert {r.out_s for r in b.records[25:]} == {0.030}  # the 20th request on finds 20 and more in flight


def test_the_profiler_tells_a_requests_path_from_the_engines_part():
    """request_paths: the client's send and first-token times against the engine's record of the request
    (frontend arrival, first token), matched by the server's id; what failed or has no engine record is left."""
    from tokenmill.bench.overload import Outcome
    from tokenmill.planning.profiler import request_paths

    outs = [Outcome("c", "t", "ok", sent=10.0, ttft=0.050, response_id="cmpl-a"),
            Outcome("c", "t", "ok", sent=11.0, ttft=0.070, response_id="cmpl-b"),
            Outcome("c", "t", "error", sent=12.0, ttft=0.010, response_id="cmpl-c"),
            Outcome("c", "t", "ok", sent=13.0, ttft=0.020, response_id="cmpl-d")]
    for o, done in zip(outs, (11.5, 11.6, 12.1, 13.5), strict=True):
        o.done = done
    engine = {"cmpl-a-0-0": (10.002, 10.047), "cmpl-b-0-0": (11.004, 11.061), "cmpl-c-0-0": (12.001, 12.005)}
    # b was sent while a was still streaming: two in flight
    assert request_paths(outs, engine) == [[0.002, 0.003, 1], [0.004, 0.009, 2]]
