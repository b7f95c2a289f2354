"""Maps requests to KV blocks: prefix-cache lookups, slot allocation, freeing. Pure bookkeeping.

KV groups. The runner splits the model's layers into groups of equal size (`windows`, one entry per group:
None for full attention, W for a sliding window of W tokens, where a query at position p reads positions
p-W+1 .. p). All groups share one BlockPool: a block id allocated to group g holds, in each of the
runner's per-slot KV tensors, the KV of g's layer in that slot, so a request has one block table per
group. A windowed group gives back every block that lies wholly before the window of the request's next
query (a block freed so stays cached, like any other, until evicted); its entry in the table becomes the
null block, block 0, which the pool reserves as soon as any group has a window. The default, one
full-attention group, keeps every block usable and allocates, caches and frees exactly as before groups.

Prefix caching is per group (group g > 0 caches under (g, hash); group 0 under the hash itself, as the
router's prefix index assumes). A cached prefix of k blocks is usable when every full-attention group has
all k cached and every windowed group has the blocks that overlap the window of position k * block_size,
the first one computed.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Sequence

from tokenmill.engine.block_pool import Block, BlockPool, hash_block
from tokenmill.engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True,
                 windows: Sequence[int | None] = (None,)):
        windows = tuple(windows)
        if not windows:
            raise ValueError("a model has at least one KV group")
        if any(w is not None and w < 1 for w in windows):
            raise ValueError(f"a sliding window is at least one token, got {windows}")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.windows = windows
        self.num_groups = len(windows)
        self.pool = BlockPool(num_blocks, enable_caching, reserve_null_block=any(w is not None for w in windows))
        self.null_block = self.pool.null_block  # None when no group has a window
        self.req_blocks: dict[str, list[list[Block]]] = {}  # request -> its block table in each group
        self._num_hashed: dict[str, int] = {}  # how many of a request's blocks are registered in the cache
        self._num_null: dict[str, list[int]] = {}  # per group: leading table entries that are the null block
        self.prefix_cache_queries = 0  # tokens looked up
        self.prefix_cache_hits = 0  # tokens found

    @property
    def usage(self) -> float:
        return self.pool.usage

    def free_tokens(self) -> int:
        """About how many more tokens fit: the free blocks shared out over the groups (each token takes a
        slot in every group, bar the window's end for windowed groups, which this ignores)."""
        return self.pool.num_free_blocks * self.block_size // self.num_groups

    def held_tokens(self, req: Request) -> int:
        """What freeing req would give back, in free_tokens()'s units."""
        tables = self.req_blocks.get(req.request_id)
        if not tables:
            return 0
        held = sum(len(t) for t in tables) - sum(self._num_null[req.request_id])
        return held * self.block_size // self.num_groups

    def _hash_key(self, req: Request) -> object:
        # With caching off, only n>1 siblings (same salt) share; with it on, everyone with the same prefix does.
        return None if self.enable_caching else req.cache_salt

    @staticmethod
    def _cache_key(group: int, block_hash: int) -> Hashable:
        return block_hash if group == 0 else (group, block_hash)

    def _uses_cache(self, req: Request) -> bool:
        if req.params.prompt_logprobs is not None:
            return False  # cached tokens have no logits; prompt logprobs need every position computed
        return self.enable_caching or req.cache_salt is not None

    def _first_live(self, window: int, num_computed: int) -> int:
        """The first block a windowed group still needs: the one holding the earliest position the next query
        (at num_computed or later) reads. Blocks before it lie wholly outside every later window."""
        return max(0, (num_computed - window + 1) // self.block_size)

    def _extend_hashes(self, req: Request, num_tokens: int) -> None:
        """Make sure req.block_hashes covers every full block of its first num_tokens tokens."""
        bs = self.block_size
        hashes = req.block_hashes
        key = self._hash_key(req)
        for i in range(len(hashes), num_tokens // bs):
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, req.tokens_slice(i * bs, (i + 1) * bs), key))

    def _cached_prefix(self, req: Request) -> list[list[Block | None]]:
        """Per group, the cached block at each of req's first K block positions, leaving at least one token
        to compute: K is the longest prefix every full-attention group has cached whole; a windowed group's
        list has None where its block is not cached (it may not need that block)."""
        if not self._uses_cache(req):
            return [[] for _ in self.windows]
        max_blocks = (req.num_tokens - 1) // self.block_size
        self._extend_hashes(req, max_blocks * self.block_size)
        hashes = req.block_hashes[:max_blocks]
        hits: list[list[Block | None]] = [[] for _ in self.windows]
        for g, w in enumerate(self.windows):
            if w is None:
                for h in hashes:
                    b = self.pool.get_cached(self._cache_key(g, h))
                    if b is None:
                        break
                    hits[g].append(b)
                hashes = hashes[:len(hits[g])]  # no later group can use more than this one found
        for g, w in enumerate(self.windows):
            if w is None:
                del hits[g][len(hashes):]
            else:
                hits[g] = [self.pool.get_cached(self._cache_key(g, h)) for h in hashes]
        return hits

    def allocate_admission(self, req: Request, budget: int) -> tuple[int, int] | None:
        """Admit req (nothing computed yet): reuse the longest cached prefix of its tokens whose blocks fit
        beside its first chunk (at most `budget` tokens), and reserve the chunk's slots. Returns (tokens
        found cached, tokens the chunk computes), or None, changing nothing, if even with no prefix reused
        the chunk does not fit. A hit revives its blocks from the free list at once, so a long one can need
        more free blocks than the chunk alone: a shorter one is taken then, not none (the scheduler seats a
        request counting its chunk's blocks only, and a seated request left out would hold the budget it
        was seated with for nothing, step after step). A prefix is usable only where every windowed group
        has the blocks of its window cached too; all groups' blocks count."""
        bs = self.block_size
        hits = self._cached_prefix(req)
        # [g][k]: of group g's first k hits, how many come off the free list / are missing
        revived = [list(itertools.accumulate((b is not None and b.ref_count == 0 for b in h), initial=0)) for h in hits]
        missing = [list(itertools.accumulate((b is None for b in h), initial=0)) for h in hits]
        for k in range(len(hits[0]), -1, -1):  # as allocate_slots counts, for a request holding no blocks yet
            firsts = [0 if w is None else min(self._first_live(w, k * bs), k) for w in self.windows]
            if any(missing[g][k] - missing[g][f] for g, f in enumerate(firsts)):
                continue  # a windowed group lost a block this prefix's next query reads
            n = min(req.num_tokens - k * bs, budget)
            need = (cdiv(k * bs + n, bs) - k) * self.num_groups
            need += sum(revived[g][k] - revived[g][f] for g, f in enumerate(firsts))
            if need <= self.pool.num_free_blocks:
                break
        else:
            return None
        computed = [[self.null_block] * f + hits[g][f:k] for g, f in enumerate(firsts)]  # no None left: checked
        if not self.allocate_slots(req, n, computed):
            return None
        self.prefix_cache_queries += req.num_tokens
        self.prefix_cache_hits += k * bs
        return k * bs, n

    def can_fit(self, num_tokens: int, max_chunk_tokens: int | None = None) -> bool:
        """Could a request of num_tokens tokens ever fit, alone in the pool? A full-attention group needs a
        block per block_size tokens. A windowed group holds, at its peak, the blocks spanned by the window
        before a chunk plus the chunk itself (W - 1 + chunk positions, at any alignment); the scheduler's
        chunks are at most max_chunk_tokens (its token budget), speculative tokens included. Without that
        bound a whole request is assumed to come in one chunk: no saving, but never a request that can't run."""
        full = cdiv(num_tokens, self.block_size)
        chunk = num_tokens if max_chunk_tokens is None else max_chunk_tokens
        need = 0
        for w in self.windows:
            need += full if w is None else min(full, cdiv(w + chunk - 2, self.block_size) + 1)
        return need <= self.pool.num_usable_blocks

    def max_request_tokens(self, max_chunk_tokens: int | None = None) -> int:
        """The most tokens one request can hold alone in the pool (can_fit's bound), for error messages. With no
        full-attention group a windowed request never outgrows its window: the pool's token count is given."""
        if all(w is not None for w in self.windows):
            return self.pool.num_usable_blocks * self.block_size
        lo, hi = 0, self.pool.num_usable_blocks * self.block_size  # a full group needs a block per block_size
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.can_fit(mid, max_chunk_tokens) else (lo, mid - 1)
        return lo

    def allocate_slots(self, req: Request, num_new_tokens: int,
                       computed_blocks: list[list[Block]] | None = None) -> bool:
        """Reserve KV slots for num_new_tokens more tokens of req in every group. A windowed group first
        gives back its blocks that the next query's window has passed. False (and no change) if the blocks
        all groups need after that do not fit. computed_blocks: per group, a prefix hit (the null block where
        a windowed group does not need it), for a request holding no blocks yet."""
        bs = self.block_size
        rid = req.request_id
        null = self.null_block
        computed = computed_blocks or [[] for _ in self.windows]
        tables = self.req_blocks.get(rid) or [[] for _ in self.windows]
        nulls = self._num_null.get(rid) or [0] * self.num_groups
        # The next query is at num_computed or later: speculative tokens may be rejected, so they never
        # move a window on.
        num_computed = req.num_computed_tokens + len(computed[0]) * bs
        total = num_computed + num_new_tokens
        want = cdiv(total, bs)
        # Per group, (position, blocks) the window has passed: held blocks between the nulls and the first live one.
        dead = [(nulls[g], tables[g][nulls[g]:self._first_live(w, num_computed)] if w is not None else [])
                for g, w in enumerate(self.windows)]
        need = 0
        for g, t in enumerate(tables):
            need += max(0, want - len(t) - len(computed[g]))
            need += sum(1 for b in computed[g] if b is not null and b.ref_count == 0)  # these leave the free list too
            need -= sum(1 for b in dead[g][1] if b.ref_count == 1)  # these go back to it first
        if need > self.pool.num_free_blocks:
            return False
        tables = self.req_blocks.setdefault(rid, tables)
        nulls = self._num_null.setdefault(rid, nulls)
        for g, c in enumerate(computed):
            if c:
                real = [b for b in c if b is not null]
                self.pool.touch(real)
                tables[g].extend(c)
                nulls[g] += len(c) - len(real)
        uses_cache = self._uses_cache(req)
        if uses_cache:
            # Blocks of computed tokens (accepted proposals' among them) before a window drops any of them.
            self._register(req, tables, min(num_computed, req.num_tokens))
        if any(blocks for _, blocks in dead):
            for g, (start, blocks) in enumerate(dead):
                tables[g][start:start + len(blocks)] = [null] * len(blocks)
                nulls[g] = start + len(blocks)
            self._free_tail_first(dead)
        for t in tables:
            if want > len(t):
                t.extend(self.pool.allocate(want - len(t)))
        if uses_cache:
            # Register blocks that will be full once this step runs: the KV is written before any
            # later step can read it, and within a step every layer writes before it attends.
            # Speculative tokens may be rejected: only blocks of real tokens are registered.
            self._register(req, tables, min(total, req.num_tokens))
        return True

    def _register(self, req: Request, tables: list[list[Block]], num_tokens: int) -> None:
        """Register every group's blocks that hold only req's first num_tokens tokens, not registered yet."""
        self._extend_hashes(req, num_tokens)
        start = self._num_hashed.get(req.request_id, 0)
        end = num_tokens // self.block_size
        for i in range(start, end):
            h = req.block_hashes[i]
            for g, t in enumerate(tables):
                if t[i] is not self.null_block:
                    self.pool.cache_block(t[i], self._cache_key(g, h))
        self._num_hashed[req.request_id] = max(start, end)

    def _free_tail_first(self, runs: list[tuple[int, list[Block]]]) -> None:
        """Free blocks, given per group as (position of the first, blocks), last positions first across all
        groups: eviction takes the least recently freed, so every group's shared prefix stays cached longest."""
        null = self.null_block
        if len(runs) == 1:
            self.pool.free(b for b in reversed(runs[0][1]) if b is not null)
            return
        order = sorted(((start + i, g, b) for g, (start, blocks) in enumerate(runs)
                        for i, b in enumerate(blocks) if b is not null), key=lambda e: (-e[0], e[1]))
        self.pool.free(b for _, _, b in order)

    def forget_uncomputed(self, req: Request) -> None:
        """The step that was to compute req's next tokens was abandoned: the blocks registered for them (in
        allocate_slots, ahead of the computation) hold no valid KV and must not be found by a prefix lookup."""
        keep = req.num_computed_tokens // self.block_size
        registered = self._num_hashed.get(req.request_id, 0)
        if registered > keep:
            for t in self.req_blocks[req.request_id]:
                for b in t[keep:registered]:
                    if b is not self.null_block:  # never: windows are moved by computed tokens only
                        self.pool.uncache(b)
            self._num_hashed[req.request_id] = keep

    def block_ids(self, req: Request) -> list[list[int]]:
        """One block table per group, covering req's allocated positions; 0 (the null block) where a
        windowed group has freed the block."""
        tables = self.req_blocks.get(req.request_id)
        if tables is None:
            return [[] for _ in self.windows]
        return [[b.block_id for b in t] for t in tables]

    def trim(self, req: Request, num_tokens: int) -> None:
        """Free req's blocks past those holding its first num_tokens tokens (rejected speculative
        slots). Such blocks were never registered in the prefix cache: they held unverified tokens."""
        tables = self.req_blocks.get(req.request_id)
        if not tables:
            return
        keep = cdiv(num_tokens, self.block_size)
        tails = [(keep, t[keep:]) for t in tables]
        if any(blocks for _, blocks in tails):
            for t in tables:
                del t[keep:]
            nulls = self._num_null[req.request_id]
            nulls[:] = [min(n, keep) for n in nulls]
            self._free_tail_first(tails)

    def free(self, req: Request) -> None:
        tables = self.req_blocks.pop(req.request_id, None)
        self._num_hashed.pop(req.request_id, None)
        nulls = self._num_null.pop(req.request_id, None)
        if tables:
            assert nulls is not None
            self._free_tail_first([(n, t[n:]) for n, t in zip(nulls, tables, strict=True)])

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()
