"""The mock engine (`tokenmill serve --mock`): the real EngineCore over MockRunner, without a model."""

from __future__ import annotations

from tokenmill.engine.core import EngineCore
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.mock_engine import MockRunner, StepModel

MODEL = StepModel(base_s=0.010, prefill_per_token_s=0.001, decode_per_seq_s=0.002)


def make_engine(slept: list[float], num_blocks: int = 256) -> EngineCore:
    runner = MockRunner(num_blocks, 16, 4096, vocab_size=49152, eos_token_ids=[2], model=MODEL, sleep=slept.append)
    return EngineCore(runner, 49152, [2], max_num_batched_tokens=512, max_num_seqs=16)


def run(engine: EngineCore) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for u in engine.step():
            out.setdefault(u.request_id, []).extend(u.new_token_ids)
    return out


def test_step_time_grows_with_prefill_tokens_and_batch_size():
    slept: list[float] = []
    engine = make_engine(slept)
    engine.add_request(list(range(3, 103)), SamplingParams(max_tokens=3, ignore_eos=True), request_id="a")
    run(engine)
    # One prefill step of 100 tokens, then two single-sequence decode steps (each sleep is the modelled time
    # minus the little the step itself took).
    assert len(slept) == 3
    assert 0.105 < slept[0] <= MODEL.step_time(100, 0)
    assert 0.0095 < slept[1] <= MODEL.step_time(0, 1)
    slept.clear()
    for i in range(8):
        engine.add_request([5000 + i], SamplingParams(max_tokens=4, ignore_eos=True), request_id=f"b{i}")
    run(engine)
    assert max(slept) > MODEL.step_time(0, 8) - 0.002  # 8 decoding sequences cost more than one


def test_tokens_are_deterministic_ordinary_and_logprobs_well_formed():
    slept: list[float] = []
    a, b = make_engine(slept), make_engine(slept)
    params = SamplingParams(max_tokens=20, logprobs=3)
    for e in (a, b):
        e.add_request([7, 8, 9, 10], params, request_id="x")
    lps = []
    ta = []
    while a.has_unfinished():
        for u in a.step():
            ta += u.new_token_ids
            lps += u.new_logprobs
    tb = run(b)["x"]
    assert ta == tb and len(ta) == 20
    assert all(1000 <= t < 49152 and t != 2 for t in ta)
    assert len(lps) == 20
    for tok, (lp, top_ids, top_lps) in zip(ta, lps, strict=True):
        assert top_ids[0] == tok and len(top_ids) == 3 and lp == top_lps[0]
        assert top_lps == sorted(top_lps, reverse=True)


def test_the_real_prefix_cache_sees_shared_prompts():
    slept: list[float] = []
    engine = make_engine(slept)
    shared = list(range(1000, 1000 + 160))  # ten full blocks
    engine.add_request(shared + [1, 2, 3], SamplingParams(max_tokens=2), request_id="first")
    run(engine)
    engine.add_request(shared + [4, 5, 6], SamplingParams(max_tokens=2), request_id="second")
    run(engine)
    s = engine.stats()
    assert s.prefix_cache_hits == 160
