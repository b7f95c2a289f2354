"""Routing policies as pure functions, the prefix index, and hashing equal to the engine's prefix cache."""

from __future__ import annotations

import random
from collections import Counter, deque

import pytest

from tokenmill.cluster.policy import (
    PolicyParams,
    PrefixIndex,
    ReplicaView,
    RequestFeatures,
    block_hashes,
    kv_cost,
    route,
)
from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.request import Request
from tokenmill.sampling_params import SamplingParams


def views(*loads: int, **kw) -> list[ReplicaView]:
    return [ReplicaView(f"r{i}", outstanding_tokens=x, **kw) for i, x in enumerate(loads)]


def feat(seq: int = 0, rand: int = 0, prompt: int = 100, max_tokens: int = 16, hashes=()) -> RequestFeatures:
    return RequestFeatures(prompt, max_tokens, tuple(hashes), seq, rand)


def test_round_robin_cycles_through_replicas():
    vs = views(0, 0, 0)
    assert [route("round-robin", feat(seq=s), vs).replica for s in range(6)] == ["r0", "r1", "r2"] * 2
    assert route("round-robin", feat(), vs).reason == "round_robin"


def test_least_load_uses_outstanding_tokens_not_request_counts():
    # r0 has fewer requests but far more tokens of work outstanding.
    vs = [ReplicaView("r0", outstanding_tokens=5000, in_flight=1), ReplicaView("r1", outstanding_tokens=100, in_flight=4)]
    assert route("least-load", feat(), vs).replica == "r1"


def test_least_load_idle_replicas_take_turns():
    vs = views(0, 0)
    assert {route("least-load", feat(seq=s), vs).replica for s in range(4)} == {"r0", "r1"}


def test_power_of_two_choices_never_picks_the_most_loaded_and_usually_the_least():
    vs = views(10, 500, 9000)
    picks = Counter(route("least-load", feat(rand=r), vs).replica for r in range(3000))
    assert picks["r2"] == 0  # it loses every pair it is drawn in
    assert picks["r0"] > picks["r1"] > 0  # r0 wins whenever drawn (2/3 of pairs), r1 only against r2
    # Both choices are distinct replicas, and every pair gets drawn.
    assert picks["r0"] == pytest.approx(2000, rel=0.1)


def test_prefix_aware_prefers_the_longest_match():
    vs = [ReplicaView("r0", outstanding_tokens=0, matched_tokens=0),
          ReplicaView("r1", outstanding_tokens=300, matched_tokens=512),
          ReplicaView("r2", outstanding_tokens=0, matched_tokens=256)]
    d = route("prefix-aware", feat(prompt=600), vs)
    assert (d.replica, d.reason) == ("r1", "prefix_hit")


def test_prefix_aware_falls_back_to_least_load_past_the_imbalance_bound():
    params = PolicyParams(imbalance_tokens=500, imbalance_ratio=2.0)  # bound: 2 x 400 + 500 = 1300
    vs = [ReplicaView("r0", outstanding_tokens=1301, matched_tokens=512), ReplicaView("r1", outstanding_tokens=400)]
    d = route("prefix-aware", feat(prompt=600), vs, params)
    assert (d.replica, d.reason) == ("r1", "prefix_imbalance")
    # Within the bound, the match still wins.
    vs = [ReplicaView("r0", outstanding_tokens=1300, matched_tokens=512), ReplicaView("r1", outstanding_tokens=400)]
    assert route("prefix-aware", feat(prompt=600), vs, params).replica == "r0"


def test_prefix_aware_without_any_match_is_least_load():
    d = route("prefix-aware", feat(prompt=600), views(300, 20, 700))
    assert d.reason == "prefix_miss" and d.replica != "r2"


def test_kv_aware_weighs_uncached_prefill_against_load():
    # r0 holds 900 of the 1000 prompt tokens; r1 holds nothing but is idle.
    vs = [ReplicaView("r0", outstanding_tokens=500, matched_tokens=900), ReplicaView("r1", outstanding_tokens=0)]
    f = feat(prompt=1000)
    assert kv_cost(f, vs[0], PolicyParams()) == pytest.approx(100 + 500)
    assert route("kv-aware", f, vs).replica == "r0"
    # The same match is worth nothing when the replica reports it keeps none of what it was sent.
    vs[0] = ReplicaView("r0", outstanding_tokens=500, matched_tokens=900, cache_retention=0.0)
    assert route("kv-aware", f, vs).replica == "r1"
    # A nearly full KV cache costs extra.
    vs = [ReplicaView("r0", kv_usage=0.95), ReplicaView("r1", kv_usage=0.1)]
    assert route("kv-aware", f, vs).replica == "r1"


def test_route_rejects_nonsense():
    with pytest.raises(ValueError, match="no replica"):
        route("round-robin", feat(), [])
    with pytest.raises(ValueError, match="unknown routing policy"):
        route("fastest", feat(), views(0))


def _simulate(policy: str, prompts: list[list[int]], n_replicas: int = 3, in_flight: int = 6,
              params: PolicyParams | None = None, block_size: int = 16,
              index_blocks: int = 10_000) -> tuple[list[str], list[int]]:
    """Route prompts one by one as the router does (index lookups, outstanding tokens that drain as older
    requests finish: at most `in_flight` in the system). Returns the replica of each request and the prompt
    tokens each decision expected cached."""
    names = [f"r{i}" for i in range(n_replicas)]
    index = {n: PrefixIndex(index_blocks) for n in names}
    outstanding = dict.fromkeys(names, 0)
    live: deque[tuple[str, int]] = deque()
    rng = random.Random(0)
    chosen, matched_tokens = [], []
    for seq, ids in enumerate(prompts):
        if len(live) >= in_flight:
            name, cost = live.popleft()
            outstanding[name] -= cost
        hashes = block_hashes(ids, block_size)
        f = RequestFeatures(len(ids), 32, hashes, seq, rng.getrandbits(32))
        matched = {n: index[n].match(hashes) * block_size for n in names}
        vs = [ReplicaView(n, outstanding[n], matched_tokens=matched[n]) for n in names]
        d = route(policy, f, vs, params)
        index[d.replica].insert(hashes)
        cost = len(ids) - matched[d.replica] + 32
        outstanding[d.replica] += cost
        live.append((d.replica, cost))
        chosen.append(d.replica)
        matched_tokens.append(matched[d.replica])
    return chosen, matched_tokens


def _grouped_prompts(groups: int, per_group: int, prefix_len: int = 480,
                     seed: int = 0) -> tuple[list[int], list[list[int]]]:
    """Requests from `groups` long shared prefixes in random order, each with its own 40-token suffix."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(1000, 40000) for _ in range(prefix_len)] for _ in range(groups)]
    group_of = [rng.randrange(groups) for _ in range(groups * per_group)]
    return group_of, [prefixes[g] + [rng.randrange(1000, 40000) for _ in range(40)] for g in group_of]


def test_hot_prefix_never_piles_everything_on_one_replica():
    # Every request shares one long prefix: pure longest-match would send all of them to one replica.
    _, prompts = _grouped_prompts(groups=1, per_group=300)
    chosen, _ = _simulate("prefix-aware", prompts, in_flight=12)
    share = Counter(chosen)
    assert len(share) == 3, share
    assert max(share.values()) < 0.6 * len(prompts), share
    assert min(share.values()) > 0.1 * len(prompts), share
    # kv-aware balances through its load term as well.
    share = Counter(_simulate("kv-aware", prompts, in_flight=12)[0])
    assert len(share) == 3 and max(share.values()) < 0.6 * len(prompts), share


def test_prefix_aware_keeps_groups_together_and_beats_round_robin_on_expected_hits():
    # Six 480-token prefixes (30 blocks each); each replica remembers ~2.5 groups' blocks, as a small KV cache.
    group_of, prompts = _grouped_prompts(groups=6, per_group=30)
    chosen, hits = _simulate("prefix-aware", prompts, in_flight=3, index_blocks=90)
    by_group: dict[int, Counter] = {}
    for g, name in zip(group_of, chosen, strict=True):
        by_group.setdefault(g, Counter())[name] += 1
    for g, c in by_group.items():
        assert c.most_common(1)[0][1] >= 0.8 * sum(c.values()), (g, c)
    _, rr_hits = _simulate("round-robin", prompts, in_flight=3, index_blocks=90)
    assert sum(hits) > 1.5 * sum(rr_hits)


def test_block_hashes_equal_the_engine_prefix_cache_hashes():
    rng = random.Random(1)
    ids = [rng.randrange(50_000) for _ in range(16 * 5 + 7)]
    kv = KVCacheManager(num_blocks=64, block_size=16, enable_caching=True)
    req = Request("a", ids, SamplingParams(max_tokens=4), max_total_tokens=1000)
    kv._extend_hashes(req, len(ids))
    assert list(block_hashes(ids, 16)) == req.block_hashes
    assert len(req.block_hashes) == 5  # full blocks only


def test_prefix_index_matches_leading_blocks_and_stays_bounded():
    idx = PrefixIndex(capacity=8)
    a = block_hashes(list(range(16 * 6)), 16)
    idx.insert(a)
    assert idx.match(a) == 6
    assert idx.match(a[:3]) == 3
    b = block_hashes(list(range(16 * 2)) + [7] * 64, 16)  # shares the first two blocks with a
    assert idx.match(b) == 2
    idx.insert(b)
    assert len(idx) == 8  # 6 + 2 new, at the bound
    c = block_hashes([9] * 16 * 4, 16)
    idx.insert(c)
    assert len(idx) == 8
    assert idx.match(c) == 4
    # Tails go first: the shared root of a and b, used most recently, survives.
    assert idx.match(b) >= 2
    idx.clear()
    assert idx.match(a) == 0
