"""Speculative tokens in the token-budget scheduler, with the fake runner: proposals are extra tokens to
compute, rejected ones roll back num_computed_tokens and free their KV blocks, stop conditions are
checked per accepted token, and the output equals plain decoding whatever the scheduling."""

from __future__ import annotations

from fake_runner import FakeRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from test_scheduler import prompts, run_all

from tokenmill.engine.core import EngineCore
from tokenmill.engine.kv_cache_manager import cdiv
from tokenmill.sampling_params import SamplingParams


def make_engine(k=4, num_blocks=64, budget=32, max_seqs=8, caching=True, oracle=True, max_batch=1 << 30,
                block_size=4):
    runner = FakeRunner(num_blocks, block_size, 256, spec_oracle=oracle)
    eng = EngineCore(runner, 50, [0], max_num_batched_tokens=budget, max_num_seqs=max_seqs,
                     enable_prefix_caching=caching, num_speculative_tokens=k, speculative_max_batch=max_batch)
    return eng, runner


def reference(ps, params):
    eng, _ = make_engine(k=0, num_blocks=400)
    for i, p in enumerate(ps):
        eng.add_request(p, params, request_id=str(i))
    return run_all(eng)


def test_speculative_output_equals_plain_with_preemption_and_no_leaks():
    ps = prompts(12, seed=5)
    params = SamplingParams(max_tokens=25, temperature=0.0, ignore_eos=True)
    ref = reference(ps, params)
    eng, runner = make_engine(num_blocks=20, budget=24)  # 80 tokens of KV: preemptions happen
    for i, p in enumerate(ps):
        eng.add_request(p, params, request_id=str(i))
    assert run_all(eng) == ref
    s = eng.stats()
    assert s.num_preemptions > 0
    assert s.spec_num_drafts > 0 and 0 < s.spec_num_accepted_tokens < s.spec_num_draft_tokens
    assert sum(s.spec_accepted_per_pos) == s.spec_num_accepted_tokens
    assert all(a >= b for a, b in zip(s.spec_accepted_per_pos, s.spec_accepted_per_pos[1:], strict=False))
    assert s.generation_tokens == sum(len(v) for v in ref.values())
    assert s.num_steps < reference_steps(ps, params)  # accepted proposals save steps
    assert eng.kv.pool.num_free_blocks == eng.kv.pool.num_blocks and not eng.kv.req_blocks
    for step in runner.steps:
        assert sum(len(x.token_ids) for x in step) <= 24


def reference_steps(ps, params):
    eng, runner = make_engine(k=0, num_blocks=20, budget=24)
    for i, p in enumerate(ps):
        eng.add_request(p, params, request_id=str(i))
    run_all(eng)
    return len(runner.steps)


def test_stop_tokens_and_max_tokens_checked_per_accepted_token():
    ps = prompts(16, seed=11)
    for params in (SamplingParams(max_tokens=7, temperature=0.0),  # eos (token 0) stops some early
                   SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True, stop_token_ids=[3, 17])):
        ref = reference(ps, params)
        eng, _ = make_engine(k=5)
        for i, p in enumerate(ps):
            eng.add_request(p, params, request_id=str(i))
        out = run_all(eng)
        assert out == ref
        assert all(len(v) <= params.max_tokens for v in out.values())
        assert eng.stats().spec_num_accepted_tokens > 0


def test_rejected_tokens_roll_back_computed_count_and_free_blocks():
    eng, runner = make_engine(k=6, block_size=2)
    eng.add_request([5, 9, 11], SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True), request_id="a")
    saw_rejection = False
    for _ in range(40):
        if not eng.has_unfinished():
            break
        eng.step()
        req = eng.scheduler.requests.get("a")
        if req is None:
            break
        last = runner.steps[-1][0]
        # After every step: everything but the newest token computed, and no block past it held.
        assert req.num_computed_tokens == req.num_tokens - 1
        assert len(eng.kv.req_blocks["a"][0]) == cdiv(req.num_tokens, 2)
        if last.num_spec:
            accepted = eng.stats().spec_num_accepted_tokens
            saw_rejection |= accepted < eng.stats().spec_num_draft_tokens
    assert saw_rejection


def test_speculation_off_above_max_batch():
    eng, runner = make_engine(max_batch=2)
    for i, p in enumerate(prompts(3, seed=2)):
        eng.add_request(p, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), request_id=str(i))
    eng.step()  # admits and prefills all three: 3 running > 2
    assert not runner.proposed and all(not r.spec_token_ids for r in eng.scheduler.running)
    eng.abort_request("0")
    eng.step()  # two left: proposals resume
    assert runner.proposed and all(r.spec_token_ids for r in eng.scheduler.running)


def test_proposals_never_run_past_max_tokens():
    eng, runner = make_engine(k=8)
    eng.add_request([1, 2, 3], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), request_id="a")
    run_all(eng)
    for batch in runner.proposed:
        for _, num_tokens, max_proposals in batch:
            # The step after the proposals must still fit in the request's 3 + 4 tokens.
            assert num_tokens + max_proposals <= 3 + 4 - 1


def test_prefix_cache_never_holds_speculative_tokens():
    shared = list(range(1, 22))
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    eng, _ = make_engine(k=4)
    eng.add_request(shared, params, request_id="a")
    first = run_all(eng)["a"]
    # A second request whose prompt is the first one's prompt + output: it hits cached blocks that were
    # written during speculative steps; the fake runner checks every KV slot it reads.
    eng.add_request(shared + first, params, request_id="b")
    eng.add_request(shared + first[:5], params, request_id="c")
    out = run_all(eng)
    ref = reference([shared + first, shared + first[:5]], params)
    assert out == {"b": ref["0"], "c": ref["1"]}
    assert eng.stats().prefix_cache_hits > 0


@settings(max_examples=40, deadline=None)
@given(
    num_blocks=st.integers(14, 40),
    budget=st.integers(1, 24),
    k=st.integers(1, 6),
    max_seqs=st.integers(1, 6),
    ops=st.lists(st.tuples(st.sampled_from(["add", "step", "step", "step", "abort"]), st.integers(0, 10**6)),
                 max_size=60),
)
def test_property_speculation_no_leaks_budget_and_plain_output(num_blocks, budget, k, max_seqs, ops):
    eng, runner = make_engine(k=k, num_blocks=num_blocks, budget=budget, max_seqs=max_seqs)
    added: dict[str, tuple[list[int], SamplingParams]] = {}
    aborted: set[str] = set()
    got: dict[str, list[int]] = {}

    def consume(updates):
        for u in updates:
            got.setdefault(u.request_id, []).extend(u.new_token_ids)

    for op, x in ops:
        if op == "add":
            rid = f"r{len(added)}"
            prompt = [1 + (x >> i) % 7 for i in range(1 + x % 30)]
            params = SamplingParams(max_tokens=1 + x % 12, temperature=0, ignore_eos=bool(x & 1))
            eng.add_request(prompt, params, request_id=rid)
            added[rid] = (prompt, params)
        elif op == "abort" and set(added) - aborted:
            rid = sorted(set(added) - aborted)[x % len(set(added) - aborted)]
            if eng.abort_request(rid):
                aborted.add(rid)
        else:
            consume(eng.step())
        if runner.steps:
            assert sum(len(s.token_ids) for s in runner.steps[-1]) <= budget
    for _ in range(5000):
        if not eng.has_unfinished():
            break
        consume(eng.step())
    assert not eng.has_unfinished()
    assert eng.kv.pool.num_free_blocks == eng.kv.pool.num_blocks and not eng.kv.req_blocks
    for rid, (prompt, params) in added.items():
        if rid not in aborted:
            assert got.get(rid) == reference([prompt], params)["0"]


def test_rejected_proposals_are_never_served_from_the_prefix_cache():
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    eng, runner = make_engine(k=4, block_size=2)
    prompt = [4, 8, 15, 16, 23]
    eng.add_request(prompt, params, request_id="a")
    true = prompt + run_all(eng)["a"]
    # Prompts that continue a's context with proposals the verification rejected: their KV slots held
    # those proposals once and were overwritten since; a cache hit on them would read wrong KV.
    probes = []
    for step in runner.steps:
        for s in step:
            if not s.num_spec:
                continue
            start = s.start_pos + len(s.token_ids) - s.num_spec
            spec = s.token_ids[len(s.token_ids) - s.num_spec:]
            bad = next((i for i, t in enumerate(spec) if true[start + i] != t), None)
            if bad is not None and len(spec) - bad >= 2:
                probes.append(true[:start] + spec + [7])
    assert probes
    for i, p in enumerate(probes[:6]):
        eng.add_request(p, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True), request_id=f"p{i}")
    out = run_all(eng)
    ref = reference(probes[:6], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    assert out == {f"p{i}": ref[str(i)] for i in range(len(probes[:6]))}


def test_proposals_that_do_not_fit_are_dropped_before_anyone_is_preempted():
    ps = [[9, 8, 7, 6], [1, 2, 3, 4]]
    params = [SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)]
    # Four blocks of 4: plain decoding never needs more at once; the long request's proposals early on
    # would, and it is scheduled after the short one.
    eng, _ = make_engine(k=4, num_blocks=4, caching=False)
    for i, (p, sp) in enumerate(zip(ps, params, strict=True)):
        eng.add_request(p, sp, request_id=str(i))
    out = run_all(eng)
    assert out == {"0": reference([ps[0]], params[0])["0"], "1": reference([ps[1]], params[1])["0"]}
    assert eng.stats().num_preemptions == 0
    assert eng.stats().spec_num_draft_tokens > 0
