"""KV groups: sliding-window groups hold only their window's blocks, share one pool with the full-attention
group, and take prefix hits only where their window's blocks are still cached."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from fake_runner import FakeRunner

from tokenmill.engine.core import EngineCore
from tokenmill.engine.kv_cache_manager import KVCacheManager, cdiv
from tokenmill.engine.policy import make_policy
from tokenmill.engine.request import Request
from tokenmill.errors import InvalidRequestError
from tokenmill.sampling_params import SamplingParams

BS = 4
W = 8
WINDOWS = (None, W, W)  # as Gemma 3, scaled down: a full-attention group and two sliding-window groups


def greedy(max_tokens=10):
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def first_live(num_computed: int) -> int:
    """The first block the window of a query at num_computed reads."""
    return max(0, (num_computed - W + 1) // BS)


def assert_consistent(kv: KVCacheManager) -> None:
    """Every block's references are the tables holding it; the free list is exactly the unreferenced blocks;
    the null block stands only for freed window blocks, and is never free, held or cached."""
    pool, null = kv.pool, kv.null_block
    held = Counter(b for tables in kv.req_blocks.values() for t in tables for b in t if b is not null)
    for b in pool.blocks:
        if b is not null:
            assert b.ref_count == held[b], b
    free = list(pool.free_queue)
    assert len(free) == pool.num_free_blocks == sum(1 for b in pool.blocks if b is not null and b.ref_count == 0)
    if null is not None:
        assert null.ref_count == 0 and null.block_hash is None and null not in free
        for rid, tables in kv.req_blocks.items():
            for g, t in enumerate(tables):
                nulls = kv._num_null[rid][g]
                assert all(b is null for b in t[:nulls]) and null not in t[nulls:]
                assert kv.windows[g] is not None or nulls == 0


def assert_all_free(kv: KVCacheManager) -> None:
    assert not kv.req_blocks
    assert kv.pool.num_free_blocks == kv.pool.num_usable_blocks
    assert_consistent(kv)


def compute_prompt(kv: KVCacheManager, req: Request, chunk: int = 8) -> list[list[int]]:
    """Admit req and compute its prompt chunk by chunk, as the scheduler would with a budget of `chunk`.
    Returns, per group, the block that held each position (windowed groups free theirs on the way)."""
    got = kv.allocate_admission(req, chunk)
    assert got is not None
    req.num_computed_tokens = sum(got)
    held = kv.block_ids(req)
    while req.num_computed_tokens < req.num_tokens:
        n = min(chunk, req.num_tokens - req.num_computed_tokens)
        assert kv.allocate_slots(req, n)
        req.num_computed_tokens += n
        for g, t in enumerate(kv.block_ids(req)):
            held[g] = [old or new for old, new in zip(held[g] + [0] * len(t), t, strict=False)]
    return held


def test_windowed_groups_hold_only_the_blocks_their_window_needs():
    kv = KVCacheManager(64, BS, windows=WINDOWS)
    req = Request("a", list(range(1, 41)), greedy(20), 128)
    assert kv.allocate_admission(req, 8) == (0, 8)
    n = 8
    while True:
        c, total = req.num_computed_tokens, req.num_computed_tokens + n
        full, *windowed = kv.block_ids(req)
        assert len(full) == cdiv(total, BS) and 0 not in full  # the full group holds every block
        for t in windowed:  # a windowed group: the null block before the window, its own blocks from it on
            f = first_live(c)
            assert len(t) == len(full) and t[:f] == [0] * f and 0 not in t[f:]
            if n == 1:  # a decode: positions c-7 .. c span two or three blocks
                assert len(t) - f in (2, 3)
        live = len(full) + sum(len(t) - t.count(0) for t in windowed)
        assert kv.pool.num_free_blocks == 63 - live  # block 0 is the null block: 63 usable
        assert_consistent(kv)
        req.num_computed_tokens = total
        if req.num_computed_tokens == 60:
            break
        if total >= req.num_tokens:
            req.output_token_ids.append(1)  # the step sampled a token
        n = min(8, req.num_tokens - req.num_computed_tokens)
        assert kv.allocate_slots(req, n)
    # 60 tokens: all 15 blocks in the full group, 2 in each windowed group (the window of position 59: 52 .. 59).
    assert [len(t) - t.count(0) for t in kv.block_ids(req)] == [15, 2, 2]
    assert kv.held_tokens(req) == 19 * BS // 3 and kv.free_tokens() == (63 - 19) * BS // 3
    kv.free(req)
    assert_all_free(kv)


def test_freed_window_blocks_return_to_the_pool_and_are_reused():
    """Two windowed groups in 8 usable blocks run requests of 100 tokens: 25 blocks each without windows."""
    runner = FakeRunner(num_blocks=9, block_size=BS, max_model_len=256, windows=(W, W))
    eng = EngineCore(runner, 50, [0], max_num_batched_tokens=4, max_num_seqs=1)
    rng = random.Random(0)
    for i in range(2):
        eng.add_request([rng.randrange(1, 50) for _ in range(60)], greedy(40), request_id=str(i))
    used = set()
    while eng.has_unfinished():
        eng.step()
        for s in runner.steps[-1]:
            used.update(b for t in s.block_ids for b in t)
            assert max(len(t) - t.count(0) for t in s.block_ids) <= 4  # 7 window positions + a chunk of 4
    assert used == set(range(9))  # 0 as the null block only (FakeRunner checks nothing is written there)
    assert sum(len(s.token_ids) for step in runner.steps for s in step) == 2 * 99
    assert_all_free(eng.kv)
    # A budget of 8 tokens a chunk could need 5 blocks a group at once: 10 of 8. Refused, not stuck.
    eng8 = EngineCore(FakeRunner(9, BS, 256, windows=(W, W)), 50, [0], max_num_batched_tokens=8, max_num_seqs=1)
    with pytest.raises(InvalidRequestError):
        eng8.add_request([1] * 60, greedy(40))


def test_can_fit_counts_each_windowed_groups_peak_and_the_null_block():
    kv = KVCacheManager(64, BS, windows=WINDOWS)  # 63 usable
    # full: 25; windowed: the 7 positions before a 16-token chunk and the chunk span at most 7 blocks.
    assert kv.can_fit(100, 16)
    assert not kv.can_fit(200, 16)  # 50 + 7 + 7 = 64
    assert kv.can_fit(8, 16) and kv.can_fit(60, 1)
    assert not kv.can_fit(100)  # no chunk bound: the whole request at once, no saving
    assert KVCacheManager(64, BS).can_fit(256) and not KVCacheManager(64, BS).can_fit(257)


def test_prefix_hit_takes_the_longest_prefix_whose_window_blocks_are_cached():
    kv = KVCacheManager(64, BS, windows=WINDOWS)
    prompt = list(range(1, 41))  # 10 blocks
    a = Request("a", list(prompt), greedy(), 128)
    a_ids = compute_prompt(kv, a)
    assert kv.block_ids(a)[1][:6] == [0] * 6  # freed as the window moved on: cached but free
    assert all(0 not in t for t in a_ids)
    kv.free(a)

    def evict(group: int, pos: int, ids: list[list[int]] = a_ids) -> None:
        assert kv.pool.blocks[ids[group][pos]].block_hash is not None
        kv.pool.uncache(kv.pool.blocks[ids[group][pos]])

    def admit(rid: str) -> tuple[Request, int]:
        r = Request(rid, prompt + [7, 7, 7], greedy(), 128)
        got = kv.allocate_admission(r, 16)
        assert got is not None
        return r, got[0]

    evict(2, 3)  # long before every window that matters: the whole prefix is still usable
    b, hit = admit("b")
    assert hit == 40
    ids = kv.block_ids(b)
    assert ids[0][:10] == a_ids[0][:10]
    for g in (1, 2):  # the window of position 40 (33 .. 40) reads blocks 8 and 9 only
        assert ids[g][:10] == [0] * 8 + a_ids[g][8:10]
    kv.free(b)

    evict(1, 9)  # a block the window of position 40 reads: the hit is shortened to 9 blocks (window 29..)
    c, hit = admit("c")
    assert hit == 36
    ids = kv.block_ids(c)
    assert ids[0][:9] == a_ids[0][:9] and ids[1][:9] == [0] * 7 + a_ids[1][7:9]
    assert ids[1][9] not in a_ids[1]  # computed afresh, and cached in A's block's place
    kv.free(c)

    evict(1, 9, ids)
    evict(1, 7)  # now k = 9 (needs 7, 8) and k = 8 (needs 6, 7) miss too; k = 7 needs 5 and 6
    d, hit = admit("d")
    assert hit == 28
    assert kv.block_ids(d)[1][:7] == [0] * 5 + a_ids[1][5:7]
    kv.free(d)
    assert kv.prefix_cache_hits == 40 + 36 + 28
    assert_all_free(kv)


def test_a_hit_whose_blocks_in_all_groups_do_not_fit_is_shortened():
    kv = KVCacheManager(11, BS, windows=(None, W))  # 10 usable
    a = Request("a", list(range(1, 17)), greedy(), 64)
    compute_prompt(kv, a, chunk=16)  # 4 blocks a group, none freed: one chunk
    kv.free(a)
    assert kv.allocate_admission(Request("b", [50] * 4, greedy(), 64), 4) == (0, 4)  # the 2 unused blocks
    assert kv.pool.num_free_blocks == 8  # all a's, cached
    again = Request("a2", list(range(1, 17)) + [9] * 5, greedy(), 64)
    # k = 4 would revive 4 + 2 blocks beside 2 + 2 new; k = 3, 3 + 2 beside 2 + 2; k = 2 fits: 2 + 2 beside 2 + 2.
    assert kv.allocate_admission(again, 8) == (8, 8)
    assert kv.pool.num_free_blocks == 0
    assert_consistent(kv)


def test_a_shortened_hit_computes_the_same_tokens_as_a_cold_run():
    runner = FakeRunner(64, BS, 256, windows=WINDOWS)
    eng = EngineCore(runner, 50, [0], max_num_batched_tokens=8, max_num_seqs=4)
    prompt = [random.Random(1).randrange(1, 50) for _ in range(41)]
    outs = {}

    def run(rid):
        eng.add_request(prompt, greedy(6), request_id=rid)
        toks = []
        while eng.has_unfinished():
            for u in eng.step():
                toks += u.new_token_ids
        outs[rid] = toks

    run("a")
    run("b")
    assert eng.kv.prefix_cache_hits == 40
    last_a = [s for step in runner.steps for s in step if s.request_id == "a"][-1].block_ids
    eng.kv.pool.uncache(eng.kv.pool.blocks[last_a[2][9]])  # group 2's block of positions 36..39
    steps = len(runner.steps)
    run("c")
    assert runner.steps[steps][0].start_pos == 36  # the shortened hit; FakeRunner checked every window read
    assert outs["a"] == outs["b"] == outs["c"]
    assert_all_free(eng.kv)


@pytest.mark.parametrize("seed", range(4))
def test_groups_change_no_token_and_leave_the_pool_consistent(seed):
    """Preemption (a small pool), speculative proposals (trim), shared prefixes and chunked prefill with
    windowed groups: the same tokens as one full-attention group, every window read checked by FakeRunner,
    the pool consistent after every step and all free at the end."""
    rng = random.Random(seed)
    base = [rng.randrange(1, 50) for _ in range(40)]
    reqs = [(base[:rng.randrange(0, 40)] + [rng.randrange(1, 50) for _ in range(rng.randrange(1, 24))],
             rng.randrange(1, 24)) for _ in range(10)]

    def run(windows, num_blocks):
        runner = FakeRunner(num_blocks, BS, 256, spec_oracle=True, windows=windows)
        eng = EngineCore(runner, 50, [0], max_num_batched_tokens=16, max_num_seqs=6, num_speculative_tokens=3,
                         policy=make_policy("priority"))
        out: dict[str, list[int]] = {}
        for i, (p, m) in enumerate(reqs):
            eng.add_request(p, greedy(m), request_id=str(i), priority=i % 3)
            for u in eng.step():
                out.setdefault(u.request_id, []).extend(u.new_token_ids)
            assert_consistent(eng.kv)
        while eng.has_unfinished():
            for u in eng.step():
                out.setdefault(u.request_id, []).extend(u.new_token_ids)
            assert_consistent(eng.kv)
        assert_all_free(eng.kv)
        return out, eng.stats()

    ref, _ = run((None,), 200)
    got, stats = run(WINDOWS, 40)
    assert got == ref
    assert stats.num_preemptions > 0 and stats.spec_num_draft_tokens > stats.spec_num_accepted_tokens


def test_an_abandoned_step_takes_its_registrations_out_of_every_group():
    kv = KVCacheManager(64, BS, windows=WINDOWS)
    req = Request("a", list(range(1, 33)), greedy(), 128)
    assert kv.allocate_admission(req, 16) == (0, 16)
    req.num_computed_tokens = 16
    assert kv.allocate_slots(req, 8)  # registers blocks 4 and 5, frees the windows' blocks 0 and 1
    tables = kv.req_blocks["a"]
    assert all(t[i].block_hash is not None for t in tables for i in (4, 5))
    freed = [kv.pool.blocks[i] for i in kv.block_ids(req)[1][:2]]
    assert freed == [kv.pool.null_block] * 2
    kv.forget_uncomputed(req)  # the step never ran
    assert all(t[i].block_hash is None for t in tables for i in (4, 5))
    assert all(t[i].block_hash is not None for t in tables for i in (2, 3))  # computed KV: still cached
    assert_consistent(kv)
    kv.free(req)
    assert_all_free(kv)
    with pytest.raises(RuntimeError):
        kv.pool.free([kv.null_block])  # never freed


def test_trim_frees_rejected_proposals_in_every_group():
    kv = KVCacheManager(64, BS, windows=WINDOWS)
    req = Request("a", list(range(1, 18)), greedy(), 128)
    compute_prompt(kv, req)
    req.output_token_ids.append(3)
    req.spec_token_ids = [1, 2, 3, 4, 5, 6]
    assert kv.allocate_slots(req, 7)  # 18 + 6 = 24 tokens: 6 blocks
    assert [len(t) for t in kv.block_ids(req)] == [6, 6, 6]
    req.spec_token_ids = []
    req.num_computed_tokens = 18  # every proposal rejected
    req.output_token_ids.append(9)
    kv.trim(req, req.num_tokens)  # 19 tokens: 5 blocks
    assert [len(t) for t in kv.block_ids(req)] == [5, 5, 5]
    assert_consistent(kv)
    kv.free(req)
    assert_all_free(kv)


def test_one_full_attention_group_allocates_exactly_as_before_groups():
    """The default manager: no null block, the same block ids, hits and refusals as before KV groups (a
    sequence recorded from the manager before them)."""
    kv = KVCacheManager(12, BS)
    assert kv.null_block is None and kv.pool.num_usable_blocks == 12
    seen: list = []
    a = Request("a", list(range(1, 19)), greedy(8), 64)
    seen.append(kv.allocate_admission(a, 8))
    a.num_computed_tokens = 8
    assert kv.allocate_slots(a, 8)
    a.num_computed_tokens = 16
    assert kv.allocate_slots(a, 2)
    a.num_computed_tokens = 18
    a.output_token_ids.append(7)
    a.spec_token_ids = [1, 2, 3, 4, 5]
    assert kv.allocate_slots(a, 6)
    seen.append(kv.block_ids(a))
    a.spec_token_ids = []
    a.output_token_ids.append(1)
    a.num_computed_tokens = 19
    kv.trim(a, a.num_tokens)
    seen.append(kv.block_ids(a))
    b = Request("b", list(range(1, 15)) + [40, 41], greedy(8), 64)
    seen += [kv.allocate_admission(b, 16), kv.block_ids(b)]
    kv.free(a)
    c = Request("c", [9] * 30, greedy(8), 64)
    seen += [kv.allocate_admission(c, 30), kv.block_ids(c)]
    d = Request("d", list(range(1, 19)) + [5], greedy(8), 64)
    seen += [kv.allocate_admission(d, 4), kv.block_ids(d)]
    for r in (b, c, d):
        kv.free(r)
    e = Request("e", list(range(1, 19)) + [5], greedy(8), 64)
    seen += [kv.allocate_admission(e, 4), kv.block_ids(e), kv.pool.num_free_blocks]
    assert seen == [(0, 8), [[0, 1, 2, 3, 4, 5]], [[0, 1, 2, 3, 4]], (12, 4), [[0, 1, 2, 6]], (0, 30),
                    [[7, 8, 9, 10, 11, 5, 4, 3]], None, [[]], (12, 4), [[0, 1, 2, 6]], 8]
    assert_consistent(kv)


def test_max_request_tokens_is_can_fits_bound():
    """The error message's capacity: the most tokens can_fit admits, per layout."""
    one = KVCacheManager(10, 4)
    assert one.max_request_tokens(8) == 40 and one.can_fit(40, 8) and not one.can_fit(41, 8)
    mixed = KVCacheManager(31, 4, windows=(None, 8, 8))  # 30 usable beside the null block
    n = mixed.max_request_tokens(8)
    assert mixed.can_fit(n, 8) and not mixed.can_fit(n + 1, 8)
    assert 30 * 4 // 3 < n < 30 * 4  # more than three full groups would hold, less than one alone
