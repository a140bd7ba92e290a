import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dspark.scheduler.block_manager import BlockManager


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


# -- prefix caching ---------------------------------------------------------------------------------------------
def computed(bm: BlockManager, sid: int, tokens: list[int], start: int = 0) -> int:
    """Allocate and 'compute' tokens[start:], then key the full blocks (what the engine does after a step)."""
    bm.allocate(sid, len(tokens))
    bm.commit(sid, tokens, len(tokens))
    return len(tokens)


def test_prefix_blocks_are_shared_then_cached_then_evicted_least_recent_first():
    bm = BlockManager(num_blocks=8, block_size=4, prefix_caching=True)
    a = list(range(14))
    computed(bm, 1, a)  # 4 blocks, 3 of them full
    first3 = bm.table(1)[:3]
    assert bm.match_prefix(2, a[:12] + [99, 98]) == 12 and bm.table(2) == first3  # shared, not copied
    assert [bm._ref[b] for b in first3] == [2, 2, 2]
    bm.check()
    bm.free(1)
    assert bm.num_cached == 0 and bm.num_free == 8 - 3  # still held by 2; 1's partial block went back to free
    bm.free(2)
    assert bm.num_cached == 3 and bm.num_free == 8
    # a strict prefix that ends on a block boundary: its last block is left to compute (the step needs a token)
    assert bm.match_prefix(3, a[:12]) == 8 and bm.table(3) == first3[:2]
    # diverging mid-block: only the blocks before the divergence
    assert bm.match_prefix(4, a[:6] + [77] * 8) == 4 and bm.table(4) == first3[:1]
    assert bm.match_prefix(5, [5] + a[1:14]) == 0 and bm.table(5) == []
    bm.check()
    bm.free(3)
    bm.free(4)
    assert bm.num_cached == 3 and bm.num_free == 8
    # released order: block 2 (by 2), then 1 and 0 (by 3 and 4): free blocks go first, then block 2 is evicted
    bm.allocate(6, 4 * 6)
    assert first3[2] in bm.table(6) and first3[0] not in bm.table(6) and bm.num_cached == 2
    assert bm.match_prefix(7, a) == 8  # the evicted third block no longer matches
    assert bm.queries == bm.hits == 0  # lookups count when the scheduler admits the request
    bm.count_lookup(14, 8)
    assert (bm.queries, bm.hits) == (14, 8)
    assert bm.next_key(8, a) == bm._chain(None, (0, 1, 2, 3)) and bm.next_key(8, a[:4]) is None
    # after a mapped prefix: the block that follows it (chained to the last mapped key), none past the last token
    assert bm.next_key(7, a) == bm._chain(bm._seq_keys[7][-1], tuple(a[8:12])) and bm.next_key(7, a[:12]) is None
    bm.check()


def test_a_hash_collision_is_a_miss_and_namespaces_do_not_share():
    bm = BlockManager(num_blocks=8, block_size=2, prefix_caching=True, namespace="model-a")
    computed(bm, 1, [1, 2, 3, 4, 5])
    bm._chain = lambda parent, tokens: 0  # every key equal: matching must compare the tokens themselves
    assert bm.match_prefix(2, [9, 9, 3, 4, 5]) == 0
    other = BlockManager(num_blocks=8, block_size=2, prefix_caching=True, namespace="model-b")
    assert other._chain(None, (1, 2)) != BlockManager(1, 2, True, "model-a")._chain(None, (1, 2))
    off = BlockManager(num_blocks=8, block_size=2)
    computed(off, 1, [1, 2, 3, 4, 5])
    assert off.match_prefix(2, [1, 2, 3, 4, 5]) == 0 and off.num_cached == 0  # prefix caching off


def test_rollback_never_rewrites_a_shared_block_and_uncaches_its_own():
    bm = BlockManager(num_blocks=8, block_size=2, prefix_caching=True)
    computed(bm, 1, [1, 2, 3, 4, 5])
    assert bm.match_prefix(2, [1, 2, 3, 4, 6]) == 4
    with pytest.raises(AssertionError, match="shared"):
        bm.rollback(2, 1)
    bm.free(2)
    bm.rollback(1, 3)  # into its own second block, held only by 1: that block is no longer a cache entry
    assert bm.match_prefix(3, [1, 2, 3, 4, 7]) == 2
    bm.check()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 4), st.integers(0, 40), st.integers(0, 2)),
                min_size=1, max_size=60))
def test_prefix_caching_keeps_every_mapped_block_right_and_leaks_nothing(ops):
    """Random admissions (prompts from a few shared prefixes), decoding with speculative over-allocation and
    rollback, preemption and frees on a tiny pool. A model of the KV contents (each slot's K/V is a function of
    the tokens up to it: the slot records that prefix when computed) checks that every block a request maps holds
    exactly its prompt's K/V, and
    the invariants hold after every operation (refcounts, no block both free and held, shared => read-only)."""
    bs = 4
    bm = BlockManager(num_blocks=12, block_size=bs, prefix_caching=True)
    contents: dict[int, list] = {}  # block -> the prefix each slot's K/V was computed from, as last written
    # the last one repeats the first's second block after another first block: keys must chain
    prefixes = [[1] * 9, [1] * 5 + [2] * 6, [3, 4] * 5, [], [7] * 4 + [1] * 4 + [2] * 3]
    seqs: dict[int, tuple[list[int], int]] = {}  # sid -> (tokens, num_computed)

    def compute(sid, tokens, start, end):
        for p in range(start, end):
            contents.setdefault(bm.table(sid)[p // bs], [None] * bs)[p % bs] = tuple(tokens[: p + 1])

    for sid, kind, n, extra in ops:
        if sid not in seqs:  # admit: prefix + tail, match, compute the rest if it fits
            tokens = prefixes[kind] + [100 + sid] * (n % 9 + 1)
            hit = bm.match_prefix(sid, tokens)
            for p in range(hit):
                assert contents[bm.table(sid)[p // bs]][p % bs] == tuple(tokens[: p + 1])  # this prompt's K/V
            if not bm.can_allocate(sid, len(tokens)):
                bm.free(sid)
                continue
            bm.allocate(sid, len(tokens))
            compute(sid, tokens, hit, len(tokens))
            bm.commit(sid, tokens, len(tokens))
            seqs[sid] = (tokens, len(tokens))
        elif kind == 0 or not bm.can_allocate(sid, seqs[sid][1] + 1 + extra):  # preempt / finish
            bm.free(sid)
            del seqs[sid]
        else:  # one decode step verifying `extra` drafts, of which n % (extra + 1) are accepted
            tokens, done = seqs[sid]
            bm.allocate(sid, done + 1 + extra)
            new = tokens + [200 + n + j for j in range(extra + 1)]
            compute(sid, new, done, done + 1 + extra)
            valid = done + 1 + n % (extra + 1)
            bm.rollback(sid, valid)
            bm.commit(sid, new, valid)
            seqs[sid] = (new[:valid], valid)
        bm.check()
    for sid in list(seqs):
        bm.free(sid)
    bm.check()
    assert bm.num_free == bm.num_blocks


def test_blocks_filled_by_generated_tokens_are_cached_and_a_resent_answer_maps_them():
    """As the engine runs a request: the prompt's chunk, then one decode step per token, each step computing the
    last committed token and committing with the token it samples pending. Blocks full of generated tokens get
    keys like prompt blocks (vLLM caches full output blocks too), so the next turn (prompt + answer + new user
    turn) maps the whole previous turn but the answer's last token, whose K/V never ran."""
    bs = 4
    bm = BlockManager(num_blocks=8, block_size=bs, prefix_caching=True)
    prompt, answer = [1, 2, 3, 4, 5, 6], [50 + i for i in range(9)]
    tokens, done = list(prompt), 0
    for sampled in answer:  # step: compute tokens[done:], sample one (pending until the engine appends it)
        bm.allocate(1, len(tokens))
        done = len(tokens)
        bm.commit(1, tokens, done, [sampled])
        tokens.append(sampled)
    assert done == len(prompt) + len(answer) - 1 == 14  # 3 full blocks keyed: 1 of prompt, 1 mixed, 1 generated
    assert len(bm._seq_keys[1]) == 3
    bm.free(1)
    assert bm.num_cached == 3
    turn2 = prompt + answer + [90, 91, 92]
    assert bm.match_prefix(2, turn2) == 12  # blocks 2 and 3 hold generated tokens
    bm.count_lookup(len(turn2), 12)
    bm.free(2)
    # an answer the client re-tokenizes differently from the 6th generated token on: the blocks before it match
    assert bm.match_prefix(3, prompt + answer[:5] + [77, 78, 79, 80]) == 8
    bm.free(3)
    assert bm.evictions == 0
    bm.allocate(4, 8 * bs)  # the whole pool: the 3 cached blocks are evicted, least recently released first
    assert bm.evictions == 3 and bm.num_cached == 0
    bm.check()
