"""Maps requests to KV blocks: prefix-cache lookups, slot allocation, freeing. Pure bookkeeping."""

from __future__ import annotations

import itertools

from tokenmill.engine.block_pool import Block, BlockPool, hash_block
from tokenmill.engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_blocks: dict[str, list[Block]] = {}
        self._num_hashed: dict[str, int] = {}  # how many of a request's blocks are registered in the cache
        self.prefix_cache_queries = 0  # tokens looked up
        self.prefix_cache_hits = 0  # tokens found

    @property
    def usage(self) -> float:
        return self.pool.usage

    def _hash_key(self, req: Request) -> object:
        # With caching off, only n>1 siblings (same salt) share; with it on, everyone with the same prefix does.
        return None if self.enable_caching else req.cache_salt

    def _uses_cache(self, req: Request) -> bool:
        if req.params.prompt_logprobs is not None:
            return False  # cached tokens have no logits; prompt logprobs need every position computed
        return self.enable_caching or req.cache_salt is not None

    def _extend_hashes(self, req: Request, num_tokens: int) -> None:
        """Make sure req.block_hashes covers every full block of its first num_tokens tokens."""
        bs = self.block_size
        hashes = req.block_hashes
        key = self._hash_key(req)
        for i in range(len(hashes), num_tokens // bs):
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, req.tokens_slice(i * bs, (i + 1) * bs), key))

    def _cached_prefix(self, req: Request) -> list[Block]:
        """Longest cached prefix of req's tokens, in whole blocks, leaving at least one token to compute."""
        if not self._uses_cache(req):
            return []
        max_blocks = (req.num_tokens - 1) // self.block_size
        self._extend_hashes(req, max_blocks * self.block_size)
        hits: list[Block] = []
        for h in req.block_hashes[:max_blocks]:
            b = self.pool.get_cached(h)
            if b is None:
                break
            hits.append(b)
        return hits

    def allocate_admission(self, req: Request, budget: int) -> tuple[int, int] | None:
        """Admit req (nothing computed yet): reuse the longest cached prefix of its tokens whose blocks fit
        beside its first chunk (at most `budget` tokens), and reserve the chunk's slots. Returns (tokens
        found cached, tokens the chunk computes), or None, changing nothing, if even with no prefix reused
        the chunk does not fit. A hit revives its blocks from the free list at once, so a long one can need
        more free blocks than the chunk alone: a shorter one is taken then, not none (the scheduler seats a
        request counting its chunk's blocks only, and a seated request left out would hold the budget it
        was seated with for nothing, step after step)."""
        bs = self.block_size
        hits = self._cached_prefix(req)
        revived = list(itertools.accumulate((b.ref_count == 0 for b in hits), initial=0))  # [k]: of the first k
        for k in range(len(hits), -1, -1):  # as allocate_slots counts, for a request holding no blocks yet
            n = min(req.num_tokens - k * bs, budget)
            if cdiv(k * bs + n, bs) - k + revived[k] <= self.pool.num_free_blocks:
                break
        else:
            return None
        if not self.allocate_slots(req, n, hits[:k]):
            return None
        self.prefix_cache_queries += req.num_tokens
        self.prefix_cache_hits += k * bs
        return k * bs, n

    def can_fit(self, num_tokens: int) -> bool:
        return cdiv(num_tokens, self.block_size) <= self.pool.num_blocks

    def allocate_slots(self, req: Request, num_new_tokens: int, computed_blocks: list[Block] | None = None) -> bool:
        """Reserve KV slots for num_new_tokens more tokens of req. False (and no change) if they do not fit."""
        computed_blocks = computed_blocks or []
        blocks = self.req_blocks.get(req.request_id, [])
        num_computed = req.num_computed_tokens + len(computed_blocks) * self.block_size
        total = num_computed + num_new_tokens
        need_new = cdiv(total, self.block_size) - len(blocks) - len(computed_blocks)
        revived = sum(1 for b in computed_blocks if b.ref_count == 0)  # these leave the free list too
        if need_new + revived > self.pool.num_free_blocks:
            return False
        self.pool.touch(computed_blocks)
        blocks = self.req_blocks.setdefault(req.request_id, blocks)
        blocks.extend(computed_blocks)
        if need_new > 0:
            blocks.extend(self.pool.allocate(need_new))
        if self._uses_cache(req):
            # Register blocks that will be full once this step runs: the KV is written before any
            # later step can read it, and within a step every layer writes before it attends.
            # Speculative tokens may be rejected: only blocks of real tokens are registered.
            real = min(total, req.num_tokens)
            self._extend_hashes(req, real)
            start = self._num_hashed.get(req.request_id, 0)
            end = real // self.block_size
            for i in range(start, end):
                self.pool.cache_block(blocks[i], req.block_hashes[i])
            self._num_hashed[req.request_id] = max(start, end)
        return True

    def forget_uncomputed(self, req: Request) -> None:
        """The step that was to compute req's next tokens was abandoned: the blocks registered for them (in
        allocate_slots, ahead of the computation) hold no valid KV and must not be found by a prefix lookup."""
        keep = req.num_computed_tokens // self.block_size
        registered = self._num_hashed.get(req.request_id, 0)
        if registered > keep:
            for b in self.req_blocks[req.request_id][keep:registered]:
                self.pool.uncache(b)
            self._num_hashed[req.request_id] = keep

    def block_ids(self, req: Request) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(req.request_id, ())]

    def trim(self, req: Request, num_tokens: int) -> None:
        """Free req's blocks past those holding its first num_tokens tokens (rejected speculative
        slots). Such blocks were never registered in the prefix cache: they held unverified tokens."""
        blocks = self.req_blocks.get(req.request_id)
        keep = cdiv(num_tokens, self.block_size)
        if blocks and len(blocks) > keep:
            tail = blocks[keep:]
            del blocks[keep:]
            self.pool.free(reversed(tail))

    def free(self, req: Request) -> None:
        blocks = self.req_blocks.pop(req.request_id, None)
        self._num_hashed.pop(req.request_id, None)
        if blocks:
            self.pool.free(reversed(blocks))

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()
