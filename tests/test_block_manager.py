import random

import pytest

from engine.block_manager import BlockManager


def test_allocate_grow_rollback_free():
    bm = BlockManager(num_blocks=10, block_size=4)
    assert bm.allocate(1, 5) and len(bm.table(1)) == 2 and bm.num_free == 8
    bm.allocate(1, 8)  # still two blocks
    assert len(bm.table(1)) == 2
    bm.allocate(1, 13)
    assert len(bm.table(1)) == 4 and bm.num_free == 6
    bm.rollback(1, 9)  # roll back the last 4 tokens: 9 tokens need 3 blocks
    assert len(bm.table(1)) == 3 and bm.num_free == 7
    bm.rollback(1, 0)
    assert bm.table(1) == [] and bm.num_free == 10
    bm.allocate(2, 40)
    with pytest.raises(MemoryError):
        bm.allocate(3, 1)
    assert not bm.can_allocate(3, 1)
    bm.free(2)
    assert bm.num_free == 10
    bm.check()


def test_random_operations_never_leak():
    rng = random.Random(0)
    bm = BlockManager(num_blocks=64, block_size=8)
    lengths: dict[int, int] = {}
    for _ in range(5000):
        sid = rng.randrange(8)
        op = rng.random()
        cur = lengths.get(sid, 0)
        if op < 0.5:
            n = cur + rng.randint(1, 20)
            if bm.can_allocate(sid, n):
                bm.allocate(sid, n)
                lengths[sid] = n
        elif op < 0.85 and cur:
            lengths[sid] = cur - rng.randint(0, cur)
            bm.rollback(sid, lengths[sid])
        else:
            bm.free(sid)
            lengths.pop(sid, None)
        for s, n in lengths.items():
            assert len(bm.table(s)) == bm.blocks_for(n)
        bm.check()
    for s in list(lengths):
        bm.free(s)
    assert bm.num_free == 64


def test_capacity_checks_at_the_boundary():
    bm = BlockManager(num_blocks=5, block_size=4)
    bm.allocate(1, 8)  # 2 blocks; 3 free
    assert bm.can_allocate(1, 8, reserve=3)  # holds them already: needs none, 3 in reserve fits exactly
    assert bm.can_allocate(2, 12) and not bm.can_allocate(2, 13)  # 3 blocks fit, 4 do not
    assert bm.can_allocate(2, 8, reserve=1) and not bm.can_allocate(2, 8, reserve=2)
    assert bm.can_allocate(1, 20) and not bm.can_allocate(1, 21)  # grows by the difference only
    with pytest.raises(MemoryError, match="need 4 blocks, 3 free"):
        bm.allocate(2, 13)


def test_rollback_frees_the_tail_and_unknown_sequences_are_empty():
    bm = BlockManager(num_blocks=6, block_size=2)
    table = list(bm.allocate(1, 11))  # 6 blocks
    bm.rollback(1, 5)  # 3 blocks stay: the first three, in order
    assert bm.table(1) == table[:3] and sorted(bm._free) == sorted(table[3:])
    bm.check()
    assert bm.table(99) == [] and bm.rollback(99, 0) is None  # never allocated: nothing to do
    bm._free.append(table[0])  # a block both owned and free
    with pytest.raises(AssertionError, match="^KV block leak or double use$"):
        bm.check()
