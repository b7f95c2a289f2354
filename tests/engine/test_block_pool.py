from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.engine.block_pool import BlockPool, FreeBlockQueue, hash_block


def test_free_queue_order_and_remove():
    pool = BlockPool(5)
    q: FreeBlockQueue = pool.free_queue
    assert [b.block_id for b in q] == [0, 1, 2, 3, 4]
    q.remove(pool.blocks[2])
    assert [b.block_id for b in q] == [0, 1, 3, 4]
    assert q.popleft().block_id == 0
    q.append(pool.blocks[2])
    assert [b.block_id for b in q] == [1, 3, 4, 2]
    assert q.num_free == 4


def test_cached_block_revived_then_evicted_lru():
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    pool.cache_block(a, 111)
    pool.free([b, a])  # tail first: b is evicted before a
    assert pool.get_cached(111) is a
    pool.touch([a])  # a prefix hit revives it
    assert a.ref_count == 1 and pool.num_free_blocks == 2
    pool.free([a])
    got = pool.allocate(3)  # needs every block: the cached one is evicted last
    assert got[-1] is a
    assert pool.get_cached(111) is None


def test_hash_chain_depends_on_parent_and_extra():
    h1 = hash_block(None, [1, 2, 3])
    assert hash_block(h1, [4]) != hash_block(hash_block(None, [9, 2, 3]), [4])
    assert hash_block(None, [1, 2, 3], "salt") != h1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "free", "touch"]), st.integers(0, 7)), max_size=60))
def test_pool_ref_counts_never_negative_and_free_count_consistent(ops):
    pool = BlockPool(8)
    held: list = []
    for op, k in ops:
        if op == "alloc" and k <= pool.num_free_blocks:
            blocks = pool.allocate(k)
            for b in blocks:
                pool.cache_block(b, hash((b.block_id, k)))
            held.extend(blocks)
        elif op == "free" and held:
            b = held.pop(k % len(held))
            pool.free([b])
        elif op == "touch" and pool.cached:
            b = list(pool.cached.values())[k % len(pool.cached)]
            pool.touch([b])
            held.append(b)
        assert all(b.ref_count >= 0 for b in pool.blocks)
        assert pool.num_free_blocks == sum(1 for b in pool.blocks if b.ref_count == 0)
        assert len(list(pool.free_queue)) == pool.num_free_blocks
        for h, b in pool.cached.items():
            assert b.block_hash == h
