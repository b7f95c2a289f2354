"""Routing policies: "which replica" as a pure function of one request's features and the replicas' stats.

Nothing here does I/O or keeps state between calls: the router (or a Ray deployment, or a simulator) builds
`RequestFeatures` and one `ReplicaView` per routable replica, calls `route(policy, ...)`, and gets a
`Decision` naming the replica and why. Randomness (power-of-two choices) and round-robin position come in
through the features, so a call is reproducible from its arguments.

`PrefixIndex` is the one stateful helper: per replica, the block-hash chains of prompts the router sent
there (LRU-bounded), hashed exactly as the engine's prefix cache hashes them. The router asks it for
`matched_tokens` before building the views.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from tokenmill.engine.block_pool import hash_block

POLICIES = ("round-robin", "least-load", "prefix-aware", "kv-aware")


@dataclass(frozen=True, slots=True)
class RequestFeatures:
    prompt_tokens: int  # prompt length in tokens (0 when the router could not tokenize it)
    max_tokens: int  # output tokens asked for: the decode work the request brings
    block_hashes: tuple[int, ...] = ()  # chained hashes of the prompt's full blocks
    seq: int = 0  # the router's request counter (round-robin position, tie-breaks)
    rand: int = 0  # a random draw made by the caller (power-of-two choices)


@dataclass(frozen=True, slots=True)
class ReplicaView:
    name: str
    outstanding_tokens: int = 0  # router's own: prefill not yet done + output not yet streamed
    in_flight: int = 0  # router's own requests on this replica
    running: int = 0  # replica-reported (tokenmill:num_requests_running)
    waiting: int = 0  # replica-reported (tokenmill:num_requests_waiting)
    kv_usage: float = 0.0  # replica-reported (tokenmill:kv_cache_usage_perc)
    matched_tokens: int = 0  # prompt tokens the router's PrefixIndex says this replica has seen
    cache_retention: float = 1.0  # replica-reported prefix hits / hits the router expected there, in [0, 1]


@dataclass(frozen=True, slots=True)
class Decision:
    replica: str
    reason: str  # round_robin | least_load | prefix_hit | prefix_miss | prefix_imbalance | kv_cost


@dataclass(frozen=True, slots=True)
class PolicyParams:
    # prefix-aware: leave the longest match for the least-loaded replica once the match's outstanding tokens
    # exceed imbalance_ratio x the least-loaded one's + imbalance_tokens.
    imbalance_tokens: int = 512
    imbalance_ratio: float = 2.0
    # kv-aware: tokens of cost added per unit of KV usage (a nearly full cache means preemptions).
    kv_pressure_tokens: int = 2048


def load(v: ReplicaView) -> tuple[int, int]:
    """Outstanding tokens first; replica-reported queue length breaks ties (it sees other clients too)."""
    return v.outstanding_tokens, v.running + v.waiting


def round_robin(f: RequestFeatures, replicas: Sequence[ReplicaView]) -> Decision:
    return Decision(replicas[f.seq % len(replicas)].name, "round_robin")


def least_load(f: RequestFeatures, replicas: Sequence[ReplicaView]) -> Decision:
    """Power of two choices: two distinct replicas drawn from f.rand, the less loaded wins."""
    n = len(replicas)
    if n <= 2:
        low = min(load(v) for v in replicas)
        tied = [v for v in replicas if load(v) == low]
        return Decision(tied[f.seq % len(tied)].name, "least_load")  # idle replicas take turns
    i = f.rand % n
    j = (i + 1 + (f.rand // n) % (n - 1)) % n
    a, b = replicas[i], replicas[j]
    return Decision((a if load(a) <= load(b) else b).name, "least_load")


def prefix_aware(f: RequestFeatures, replicas: Sequence[ReplicaView], params: PolicyParams) -> Decision:
    """Longest cached-prefix match wins, unless it is loaded past the bound: then the least-loaded replica."""
    best = max(replicas, key=lambda v: (v.matched_tokens, _neg(load(v))))
    if best.matched_tokens == 0:
        return Decision(least_load(f, replicas).replica, "prefix_miss")
    least = min(replicas, key=load)
    if best.outstanding_tokens > params.imbalance_ratio * least.outstanding_tokens + params.imbalance_tokens:
        return Decision(least.name, "prefix_imbalance")
    return Decision(best.name, "prefix_hit")


def kv_cost(f: RequestFeatures, v: ReplicaView, params: PolicyParams) -> float:
    """Tokens of work this request would wait behind and add on replica v."""
    cached = min(f.prompt_tokens, v.matched_tokens) * max(0.0, min(1.0, v.cache_retention))
    uncached_prefill = f.prompt_tokens - cached
    return uncached_prefill + v.outstanding_tokens + v.kv_usage * params.kv_pressure_tokens


def kv_aware(f: RequestFeatures, replicas: Sequence[ReplicaView], params: PolicyParams) -> Decision:
    """Least (uncached prefill + decode load + KV pressure); ties rotate with f.seq so idle replicas share."""
    costs = [kv_cost(f, v, params) for v in replicas]
    low = min(costs)
    tied = [v for v, c in zip(replicas, costs, strict=True) if c <= low + 1e-9]
    return Decision(tied[f.seq % len(tied)].name, "kv_cost")


def route(policy: str, f: RequestFeatures, replicas: Sequence[ReplicaView],
          params: PolicyParams | None = None) -> Decision:
    """Pick one of `replicas` (non-empty: the caller passes only routable ones) for the request."""
    if not replicas:
        raise ValueError("no replica to route to")
    params = params or PolicyParams()
    if policy == "round-robin":
        return round_robin(f, replicas)
    if policy == "least-load":
        return least_load(f, replicas)
    if policy == "prefix-aware":
        return prefix_aware(f, replicas, params)
    if policy == "kv-aware":
        return kv_aware(f, replicas, params)
    raise ValueError(f"unknown routing policy {policy!r}; choose one of {', '.join(POLICIES)}")


def _neg(t: tuple[int, int]) -> tuple[int, int]:
    return -t[0], -t[1]


# -- prefix hashing, as the engine does it ------------------------------------------------------------------


def block_hashes(token_ids: Sequence[int], block_size: int) -> tuple[int, ...]:
    """Chained hashes of every full block, identical to KVCacheManager's (prefix caching on, no salt)."""
    out: list[int] = []
    parent = None
    for i in range(len(token_ids) // block_size):
        parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size], None)
        out.append(parent)
    return tuple(out)


class PrefixIndex:
    """The block hashes of prompts sent to one replica, least recently used first, at most `capacity`.

    Chained hashes make a prefix check a walk from the first block until the first miss. Eviction
    follows the engine's (least recently used first), so the index forgets roughly what the replica does.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._lru: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._lru)

    def match(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of `hashes` this replica has been sent."""
        n = 0
        for h in hashes:
            if h not in self._lru:
                break
            n += 1
        return n

    def insert(self, hashes: Sequence[int]) -> None:
        lru = self._lru
        # Tail first, so the chain's root is the most recently used: like the engine, which frees a request's
        # blocks tail first, eviction then takes a prompt's own tail before the prefix it shares.
        for h in reversed(hashes):
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
        while len(lru) > self.capacity:
            lru.popitem(last=False)

    def clear(self) -> None:
        self._lru.clear()
