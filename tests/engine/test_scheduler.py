"""The engine core with a fake runner: scheduling rules, leaks, preemption, prefix hits."""

from __future__ import annotations

import pytest
from fake_runner import FakeRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.engine.core import EngineCore
from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.policy import make_policy
from tokenmill.engine.request import Request
from tokenmill.errors import InvalidRequestError
from tokenmill.sampling_params import SamplingParams


def make_engine(num_blocks=64, block_size=4, budget=16, max_seqs=8, caching=True, max_model_len=256):
    runner = FakeRunner(num_blocks, block_size, max_model_len)
    eng = EngineCore(runner, 50, [0], max_num_batched_tokens=budget, max_num_seqs=max_seqs,
                     enable_prefix_caching=caching)
    return eng, runner


def run_all(eng: EngineCore, max_steps: int = 10_000) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}
    for _ in range(max_steps):
        if not eng.has_unfinished():
            break
        for u in eng.step():
            out.setdefault(u.request_id, []).extend(u.new_token_ids)
            if u.finish_reason:
                reasons[u.request_id] = u.finish_reason
    assert not eng.has_unfinished(), "engine did not finish"
    return out


def prompts(n, seed=0):
    import random

    rng = random.Random(seed)
    return [[rng.randrange(1, 50) for _ in range(rng.randrange(1, 40))] for _ in range(n)]


def greedy(max_tokens=10):
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def test_token_budget_and_chunked_prefill():
    eng, runner = make_engine(budget=16)
    eng.add_request(list(range(1, 40)), greedy(3))
    eng.add_request([5, 6, 7], greedy(3))
    run_all(eng)
    for step in runner.steps:
        assert sum(len(s.token_ids) for s in step) <= 16
    first = runner.steps[0]
    assert len(first) == 1 and len(first[0].token_ids) == 16 and not first[0].sample  # a prefill chunk
    # The short request joined a step that also held the long prompt's chunk: mixed batches.
    assert any(len(step) == 2 for step in runner.steps)


def test_decodes_go_when_a_prefill_chunk_ranks_above_them():
    # A small budget and a long prompt ranked first: its chunk leaves a token for each decode behind it,
    # so running requests' output does not stall for a prompt (it did: the chunk took the budget whole).
    runner = FakeRunner(64, 4, 256)
    eng = EngineCore(runner, 50, [0], max_num_batched_tokens=16, max_num_seqs=8, policy=make_policy("priority"))
    eng.add_request([1, 2, 3], greedy(20), request_id="c", priority=1)
    eng.add_request([4, 5, 6], greedy(20), request_id="d", priority=1)
    eng.step()
    eng.add_request(list(range(1, 49)), greedy(2), request_id="long", priority=0)
    for _ in range(3):
        eng.step()
        assert {s.request_id: len(s.token_ids) for s in runner.steps[-1]} == {"long": 14, "c": 1, "d": 1}
    eng.step()
    assert {s.request_id: len(s.token_ids) for s in runner.steps[-1]} == {"long": 6, "c": 1, "d": 1}


def test_batched_equals_one_by_one_and_no_leaks():
    ps = prompts(12)
    alone = {}
    for i, p in enumerate(ps):
        eng, _ = make_engine()
        eng.add_request(p, greedy(), request_id=str(i))
        alone.update(run_all(eng))
    eng, runner = make_engine(budget=24)
    for i, p in enumerate(ps):
        eng.add_request(p, greedy(), request_id=str(i))
    assert run_all(eng) == alone
    assert eng.kv.pool.num_free_blocks == eng.kv.pool.num_blocks
    assert sorted(runner.released) == sorted(alone)


def test_preemption_recomputes_and_keeps_tokens():
    ps = prompts(10, seed=3)
    ref_eng, _ = make_engine(num_blocks=200)
    for i, p in enumerate(ps):
        ref_eng.add_request(p, greedy(20), request_id=str(i))
    ref = run_all(ref_eng)
    eng, _ = make_engine(num_blocks=16, budget=32)  # 64 tokens of KV for ten ~40-token requests
    for i, p in enumerate(ps):
        eng.add_request(p, greedy(20), request_id=str(i))
    assert run_all(eng) == ref
    assert eng.stats().num_preemptions > 3
    assert eng.kv.pool.num_free_blocks == eng.kv.pool.num_blocks


def test_prefix_hit_equals_cold_and_is_counted():
    shared = list(range(1, 30))
    eng, runner = make_engine()
    eng.add_request(shared + [7], greedy(5), request_id="a")
    first = run_all(eng)
    eng.add_request(shared + [7], greedy(5), request_id="b")
    second = run_all(eng)
    assert first["a"] == second["b"]
    assert eng.stats().prefix_cache_hits == 28  # 7 full blocks of 4
    assert runner.steps[-5][0].start_pos == 28  # only the tail was computed


def test_a_prefix_hit_too_long_to_revive_is_shortened_not_refused():
    """A hit's blocks leave the free list at once. Here all three and the first chunk's block need four of
    the three free blocks: two are reused instead, and the request is admitted now, as with no hit at all
    (the scheduler seats a request counting its chunk's blocks only; refused, it held the budget it was
    seated with, step after step: a livelock test_scheduling_policy's property test found)."""
    kv = KVCacheManager(num_blocks=5, block_size=4)
    a = Request("a", list(range(1, 17)), greedy(4), 64)
    assert kv.allocate_admission(a, 16) == (0, 16)
    a.num_computed_tokens = 16
    kv.free(a)  # its blocks stay cached in the free list
    assert kv.allocate_admission(Request("b", [50] * 5, greedy(4), 64), 16) == (0, 5)
    again = Request("a2", list(range(1, 17)), greedy(4), 64)
    assert kv.pool.num_free_blocks == 3 and len(kv._cached_prefix(again)[0]) == 3
    assert kv.allocate_admission(again, 4) == (8, 4)
    assert kv.prefix_cache_hits == 8 and kv.pool.num_free_blocks == 0


def test_full_prefix_hit_still_computes_last_token():
    eng, runner = make_engine()
    p = list(range(1, 17))  # exactly 4 blocks
    eng.add_request(p, greedy(2), request_id="a")
    run_all(eng)
    eng.add_request(p, greedy(2), request_id="b")
    run_all(eng)
    b_first = next(s for step in runner.steps for s in step if s.request_id == "b")
    assert b_first.start_pos == 12 and len(b_first.token_ids) == 4


def test_no_sharing_when_caching_off_except_siblings():
    eng, _ = make_engine(caching=False)
    p = list(range(1, 30))
    eng.add_request(p, greedy(3), request_id="a")
    run_all(eng)
    eng.add_request(p, greedy(3), request_id="b")
    run_all(eng)
    assert eng.stats().prefix_cache_hits == 0
    eng.add_request(p, greedy(3), request_id="c0", cache_salt="c")
    eng.add_request(p, greedy(3), request_id="c1", cache_salt="c")
    out = run_all(eng)
    assert out["c0"] == out["c1"]
    assert eng.stats().prefix_cache_hits == 28


def test_priority_orders_admission_and_picks_victims():
    eng, runner = make_engine(budget=8, max_seqs=1)
    eng.add_request([1, 2, 3], greedy(2), request_id="low", priority=5)
    eng.add_request([1, 2, 3], greedy(2), request_id="high", priority=-1)
    run_all(eng)
    assert runner.steps[0][0].request_id == "high"


def test_abort_frees_blocks_anytime():
    eng, runner = make_engine()
    eng.add_request(list(range(1, 30)), greedy(50), request_id="x")
    eng.add_request(list(range(1, 10)), greedy(50), request_id="y")
    eng.step()
    assert eng.abort_request("x")
    assert eng.abort_request("y")
    assert not eng.abort_request("y")
    ups = eng.step()
    assert {u.request_id for u in ups} == {"x", "y"} and all(u.finish_reason == "abort" for u in ups)
    assert eng.kv.pool.num_free_blocks == eng.kv.pool.num_blocks
    assert not eng.has_unfinished()


def test_stop_conditions():
    eng, _ = make_engine()
    eng.add_request([1, 2], SamplingParams(max_tokens=3, temperature=0), request_id="len")
    out = run_all(eng)
    assert len(out["len"]) == 3


@pytest.mark.parametrize("bad", [[], [99], [-1]])
def test_bad_prompts_rejected(bad):
    eng, _ = make_engine()
    with pytest.raises(InvalidRequestError):
        eng.add_request(bad, greedy())


def test_prompt_longer_than_context_rejected():
    eng, _ = make_engine(max_model_len=32)
    with pytest.raises(InvalidRequestError, match="context"):
        eng.add_request([1] * 32, greedy())


def test_request_larger_than_kv_cache_rejected():
    eng, _ = make_engine(num_blocks=4)
    with pytest.raises(InvalidRequestError, match="KV cache"):
        eng.add_request([1] * 10, greedy(20))


@settings(max_examples=60, deadline=None)
@given(
    num_blocks=st.integers(12, 40),
    budget=st.integers(1, 24),
    max_seqs=st.integers(1, 6),
    caching=st.booleans(),
    ops=st.lists(st.tuples(st.sampled_from(["add", "step", "step", "step", "abort"]), st.integers(0, 10**6)),
                 max_size=80),
)
def test_property_no_leaks_budget_respected_everything_ends(num_blocks, budget, max_seqs, caching, ops):
    eng, runner = make_engine(num_blocks=num_blocks, budget=budget, max_seqs=max_seqs, caching=caching)
    live: set[str] = set()
    ended: set[str] = set()
    added = 0

    def consume(updates):
        for u in updates:
            assert u.request_id not in ended
            if u.finish_reason:
                ended.add(u.request_id)
                live.discard(u.request_id)

    for op, k in ops:
        if op == "add":
            rid = f"r{added}"
            added += 1
            prompt = [1 + (k >> i) % 7 for i in range(1 + k % 30)]  # small alphabet: prefix hits happen
            eng.add_request(prompt, SamplingParams(max_tokens=1 + k % 12, temperature=0, ignore_eos=True),
                            request_id=rid)
            live.add(rid)
        elif op == "abort" and live:
            rid = sorted(live)[k % len(live)]
            assert eng.abort_request(rid)
            live.discard(rid)  # its 'abort' update arrives with the next step
        else:
            consume(eng.step())
        steps = runner.steps[-1:] if runner.steps else []
        for step in steps:
            assert sum(len(s.token_ids) for s in step) <= budget
            assert len(step) <= max_seqs
        assert all(b.ref_count >= 0 for b in eng.kv.pool.blocks)
    for _ in range(5000):
        if not eng.has_unfinished():
            break
        consume(eng.step())
    assert not live and len(ended) == added
    assert eng.kv.pool.num_free_blocks == eng.kv.pool.num_blocks
    assert all(b.ref_count == 0 for b in eng.kv.pool.blocks)
    assert not eng.kv.req_blocks
