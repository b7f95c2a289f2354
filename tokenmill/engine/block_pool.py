"""The KV block pool: every block preallocated, an O(1) free list, and the prefix-cache hash map.

A free block that still carries a hash stays in the map: it can be revived by a prefix hit until an
allocation evicts it (lazy LRU: the free list's head is the least recently freed block).

With a sliding-window KV group (kv_cache_manager.py), block 0 is the null block: it stands in the block
tables for blocks a group no longer needs, and is never on the free list, allocated, freed or cached.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "block_hash", "prev_free", "next_free")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.block_hash: Hashable | None = None  # its key in the prefix cache
        self.prev_free: Block | None = None
        self.next_free: Block | None = None

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref={self.ref_count}, hash={self.block_hash})"


class FreeBlockQueue:
    """Intrusive doubly linked list of free blocks: append, pop-front and remove-anywhere are O(1)."""

    def __init__(self, blocks: Sequence[Block]):
        self._head = Block(-1)  # sentinels keep the link code branch-free
        self._tail = Block(-2)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free = 0
        for b in blocks:
            self.append(b)

    def append(self, block: Block) -> None:
        last = self._tail.prev_free
        assert last is not None
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self.num_free += 1

    def remove(self, block: Block) -> None:
        prev, nxt = block.prev_free, block.next_free
        if prev is None or nxt is None:
            raise RuntimeError(f"{block} is not in the free list")
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self.num_free -= 1

    def popleft(self) -> Block:
        first = self._head.next_free
        if first is None or first is self._tail:
            raise RuntimeError("no free block")
        self.remove(first)
        return first

    def __iter__(self):
        b = self._head.next_free
        while b is not None and b is not self._tail:
            yield b
            b = b.next_free


def hash_block(parent_hash: int | None, tokens: Sequence[int], extra: object = None) -> int:
    """Chained block hash: identical prefixes give identical chains, any difference breaks the chain."""
    return hash((parent_hash, tuple(tokens), extra))


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True, reserve_null_block: bool = False):
        if num_blocks < 1 + reserve_null_block:
            raise ValueError("the KV cache needs at least one usable block")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Kept off the free list with ref_count 0, so freeing or touching it fails loudly.
        self.null_block: Block | None = self.blocks[0] if reserve_null_block else None
        self.num_usable_blocks = num_blocks - reserve_null_block
        self.free_queue = FreeBlockQueue(self.blocks[1:] if reserve_null_block else self.blocks)
        self.cached: dict[Hashable, Block] = {}  # block hash (cache key) -> block holding those tokens' KV

    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free

    @property
    def usage(self) -> float:
        """Share of usable blocks held by live requests (free-but-cached blocks count as free)."""
        return 1.0 - self.free_queue.num_free / self.num_usable_blocks

    def get_cached(self, block_hash: Hashable) -> Block | None:
        return self.cached.get(block_hash)

    def allocate(self, n: int) -> list[Block]:
        if n > self.free_queue.num_free:
            raise RuntimeError(f"asked for {n} blocks, {self.free_queue.num_free} free")
        out = []
        for _ in range(n):
            b = self.free_queue.popleft()
            self.uncache(b)
            b.ref_count = 1
            out.append(b)
        return out

    def touch(self, blocks: Iterable[Block]) -> None:
        """Take a reference on blocks found in the prefix cache (reviving free ones)."""
        for b in blocks:
            if b.ref_count == 0:
                self.free_queue.remove(b)
            b.ref_count += 1

    def free(self, blocks: Iterable[Block]) -> None:
        """Drop one reference per block. Callers pass a request's blocks tail first, so the
        tail (least likely to be shared) is evicted before the shared prefix."""
        for b in blocks:
            if b.ref_count <= 0:
                raise RuntimeError(f"double free of {b}")
            b.ref_count -= 1
            if b.ref_count == 0:
                self.free_queue.append(b)

    def cache_block(self, block: Block, block_hash: Hashable) -> None:
        if block is self.null_block:
            raise RuntimeError("the null block holds no tokens' KV: it is never cached")
        if block.block_hash is not None:
            return
        if block_hash in self.cached:
            return  # an identical block is already cached; this one stays private
        block.block_hash = block_hash
        self.cached[block_hash] = block

    def uncache(self, block: Block) -> None:
        """Take the block out of the prefix cache (reused for other tokens, or its KV never computed)."""
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
            block.block_hash = None

    def reset_prefix_cache(self) -> None:
        for b in self.blocks:
            if b.ref_count == 0:
                self.uncache(b)
