"""Owner of the paged KV cache's blocks: which physical blocks each sequence holds, and which full blocks are
cached for reuse by later requests (automatic prefix caching).

A sequence's KV length lives on the sequence (`num_computed`); the block manager only guarantees capacity.
Growing, rolling back and freeing are all changes of a block list, so speculation's rollback is cheap.

Prefix caching: a block whose tokens are all computed gets a key, the hash of its tokens chained with its
parent block's key (so a key names the whole prefix up to the block's end) and the cache's namespace (the
model). A new request maps the longest run of cached blocks matching its prompt and prefills only the rest.
Blocks are reference-counted; a mapped block is shared read-only (writes only ever go to positions at or after
a sequence's `num_computed`, which is past every block it shares). A block nobody holds any more keeps its
contents and key until the pool needs room: free blocks are reused first, then cached ones, least recently
released first (`evictions` counts those).

Keys are given to full blocks whatever filled them: the engine commits after every step, prefill chunks and
decode steps alike, so a block of generated tokens is cached once its last token's K/V is computed (the step
after the token was sampled; a finished request's very last token never runs), as vLLM caches full output blocks.
A chat client that resends the answer it got finds the previous turn's prompt and answer cached.

KV-cache events (--kv-events-config): with `events` a list (None, the default, records nothing), every key given
and every key dropped is appended to it, ("stored", key, parent key, tokens) and ("removed", key), so that the
keys stored minus the keys removed are always exactly `keys()`; the engine core drains it after each step and
publishes it (dspark/engine/kv_events.py).
"""

from __future__ import annotations

from collections import OrderedDict, deque

import numpy as np


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False, namespace: str = ""):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.namespace = namespace  # part of every key: caches of different models never match
        self._free: deque[int] = deque(range(num_blocks))  # nobody holds them, nothing cached in them
        self._cached: OrderedDict[int, None] = OrderedDict()  # nobody holds them, contents kept; LRU first
        self._tables: dict[int, list[int]] = {}
        # The same tables as one slot-indexed array (entries past a table's length are 0), kept in step with
        # every change: a step's block tables are one row gather (`block_tables`), never a Python pad.
        self._slot: dict[int, int] = {}
        self._free_slots: list[int] = []
        self._array = np.zeros((8, 16), dtype=np.int64)
        self._ref = [0] * num_blocks
        # block -> (key, parent key, its tokens), for blocks whose contents are cached; and key -> block
        self._entry: dict[int, tuple[int, int | None, tuple[int, ...]]] = {}
        self._by_key: dict[int, int] = {}
        self._seq_keys: dict[int, list[int]] = {}  # seq_id -> keys of its leading blocks of computed tokens
        self.events: list[tuple] | None = None  # the change log of keys, when KV events are on
        self.queries = 0  # tokens of admitted requests looked up, and how many of them were found cached
        self.hits = 0
        self.evictions = 0  # cached blocks whose contents were dropped to make room (LRU)

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out: free ones and cached ones nobody holds."""
        return len(self._free) + len(self._cached)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def extra_blocks(self, seq_id: int, num_tokens: int) -> int:
        """Blocks that must be taken from the free list for `seq_id` to hold `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(self._tables.get(seq_id, ())))

    def can_allocate(self, seq_id: int, num_tokens: int, reserve: int = 0) -> bool:
        return self.extra_blocks(seq_id, num_tokens) + reserve <= self.num_free

    def _take(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:  # evict the least recently released cached block
            block, _ = self._cached.popitem(last=False)
            self._forget(block)
            self.evictions += 1
        self._ref[block] = 1
        return block

    def _forget(self, block: int) -> None:
        entry = self._entry.pop(block, None)
        if entry is not None and self._by_key.get(entry[0]) == block:
            del self._by_key[entry[0]]
            if self.events is not None:
                self.events.append(("removed", entry[0]))

    def _release(self, block: int) -> None:
        self._ref[block] -= 1
        if self._ref[block] == 0:
            if block in self._entry:
                self._cached[block] = None
            else:
                self._free.append(block)

    def allocate(self, seq_id: int, num_tokens: int) -> list[int]:
        """Grow `seq_id`'s table to hold `num_tokens` tokens; returns the table."""
        need = self.extra_blocks(seq_id, num_tokens)
        if need > self.num_free:
            raise MemoryError(f"KV cache: need {need} blocks, {self.num_free} free")
        table = self._tables.setdefault(seq_id, [])
        if need:
            start = len(table)
            table.extend(self._take() for _ in range(need))
            self._write(seq_id, start, table[start:])
        return table

    def rollback(self, seq_id: int, num_tokens: int) -> None:
        """Shrink `seq_id` to `num_tokens` tokens (drop rejected draft tokens): releases blocks past the end.
        Rolling back into a cached block (the engine never does: it rolls back to `num_computed` or beyond)
        uncaches it, since its contents are about to be rewritten; a shared block cannot be rewritten."""
        table = self._tables.get(seq_id, [])
        keep = self.blocks_for(num_tokens)
        if len(table) > keep:
            while len(table) > keep:
                self._release(table.pop())
            self._write(seq_id, keep, [])
        keys = self._seq_keys.get(seq_id, [])
        for block in table[num_tokens // self.block_size : len(keys)]:
            assert self._ref[block] == 1, "rollback into a KV block shared with another sequence"
            self._forget(block)
        del keys[num_tokens // self.block_size :]

    def free(self, seq_id: int) -> None:
        for block in reversed(self._tables.pop(seq_id, [])):
            self._release(block)
        self._drop_slot(seq_id)
        self._seq_keys.pop(seq_id, None)

    def table(self, seq_id: int) -> list[int]:
        return self._tables.get(seq_id, [])

    def block_tables(self, seq_ids: list[int]) -> np.ndarray:
        """The sequences' tables [len(seq_ids), longest], 0-padded, from the slot array (one gather)."""
        width = max(len(self._tables.get(s, ())) for s in seq_ids)
        return self._array[[self._slot_of(s) for s in seq_ids], :width]

    def _slot_of(self, seq_id: int) -> int:
        slot = self._slot.get(seq_id)
        if slot is None:
            if not self._free_slots:
                old = len(self._array)
                self._array = np.concatenate([self._array, np.zeros_like(self._array)])
                self._free_slots = list(range(2 * old - 1, old - 1, -1))
            slot = self._slot[seq_id] = self._free_slots.pop()
        return slot

    def _write(self, seq_id: int, start: int, blocks: list[int]) -> None:
        """Mirror table[start:] = blocks into the slot array (and zero what the table dropped past them)."""
        slot, end = self._slot_of(seq_id), start + len(blocks)
        if end > self._array.shape[1]:
            self._array = np.pad(self._array, ((0, 0), (0, max(end, 2 * self._array.shape[1]) -
                                                        self._array.shape[1])))
        row = self._array[slot]
        row[start:end] = blocks
        row[end:] = 0

    def _drop_slot(self, seq_id: int) -> None:
        slot = self._slot.pop(seq_id, None)
        if slot is not None:
            self._array[slot] = 0
            self._free_slots.append(slot)

    # -- prefix caching -----------------------------------------------------------------------------------------
    def _chain(self, parent: int | None, tokens: tuple[int, ...]) -> int:
        return hash((self.namespace, parent, tokens))

    def match_prefix(self, seq_id: int, token_ids: list[int]) -> int:
        """Map the longest cached run of full blocks that starts `token_ids` into `seq_id`'s (empty) table and
        return how many tokens it covers; the last token is always left to compute, so the step that computes
        the rest has logits to sample from."""
        assert not self._tables.get(seq_id), "match_prefix is for a sequence that holds no blocks"
        if not self.prefix_caching:
            return 0
        bs = self.block_size
        table, keys = [], []
        for start in range(0, len(token_ids) - bs, bs):  # full blocks, and at least one token after them
            tokens, parent = tuple(token_ids[start : start + bs]), keys[-1] if keys else None
            key = self._chain(parent, tokens)
            block = self._by_key.get(key)
            if block is None or self._entry[block] != (key, parent, tokens):  # a miss, or a hash collision
                break
            table.append(block)
            keys.append(key)
        for block in table:
            if self._ref[block] == 0:
                del self._cached[block]
            self._ref[block] += 1
        self._tables[seq_id] = table
        self._seq_keys[seq_id] = keys
        if table:
            self._write(seq_id, 0, table)
        return len(table) * bs

    def count_lookup(self, num_tokens: int, hit: int) -> None:
        """An admitted request looked up `num_tokens` and found `hit` of them cached (a lookup the scheduler
        had to undo, for want of room, is not counted)."""
        if self.prefix_caching:
            self.queries += num_tokens
            self.hits += hit

    def next_key(self, seq_id: int, token_ids: list[int]) -> int | None:
        """The key of the first block `seq_id` computes after the prefix it mapped (None when that block is not
        full before its last token): requests admitted together that would compute the same block share it only
        once one of them has computed it; those that only map cached blocks share them at once."""
        bs, keys = self.block_size, self._seq_keys.get(seq_id, [])
        start = len(keys) * bs
        if not self.prefix_caching or len(token_ids) <= start + bs:
            return None
        return self._chain(keys[-1] if keys else None, tuple(token_ids[start : start + bs]))

    def commit(self, seq_id: int, token_ids: list[int], num_computed: int,
               pending: list[int] | tuple[int, ...] = ()) -> None:
        """Give keys to `seq_id`'s blocks that are now full of computed tokens, so later requests can map them.
        The tokens are `token_ids` followed by `pending` (accepted this step, not appended yet)."""
        if not self.prefix_caching:
            return
        table, bs = self._tables.get(seq_id, []), self.block_size
        keys = self._seq_keys.setdefault(seq_id, [])
        for i in range(len(keys), min(num_computed // bs, len(table))):
            if (i + 1) * bs > len(token_ids):
                token_ids, pending = [*token_ids, *pending], ()
            block, tokens, parent = table[i], tuple(token_ids[i * bs : (i + 1) * bs]), keys[-1] if keys else None
            key = self._chain(parent, tokens)
            keys.append(key)
            if key not in self._by_key:  # (the same tokens computed twice: the first block stays the cached one)
                self._entry[block], self._by_key[key] = (key, parent, tokens), block
                if self.events is not None:
                    self.events.append(("stored", key, parent, tokens))

    def keys(self) -> set[int]:
        """The keys a later request can match: of held blocks with computed contents and of cached ones."""
        return set(self._by_key)

    def take_events(self) -> list[tuple]:
        """The key changes since the last call (empty when events are off)."""
        if not self.events:
            return []
        out, self.events = self.events, []
        return out

    def check(self) -> None:
        """Invariants: every block is free, cached-and-unheld, or held, exactly one of them; its reference count
        is the number of tables holding it; a block held by two tables has cached contents (it is read-only)."""
        held: dict[int, int] = {}
        for t in self._tables.values():
            for b in t:
                held[b] = held.get(b, 0) + 1
        all_blocks = list(held) + list(self._free) + list(self._cached)
        assert len(all_blocks) == self.num_blocks == len(set(all_blocks)), "KV block leak or double use"
        assert all(self._ref[b] == held.get(b, 0) for b in range(self.num_blocks)), "KV block refcount wrong"
        assert all(b in self._entry for b, n in held.items() if n > 1), "KV block shared but writable"
        assert all(b in self._entry for b in self._cached) and not any(b in self._entry for b in self._free)
        assert all(self._entry[b][0] == k for k, b in self._by_key.items()), "KV block key index stale"
        for sid, slot in self._slot.items():  # the slot array mirrors the tables, zeros past each one's end
            t = self._tables.get(sid, [])
            assert self._array[slot, : len(t)].tolist() == t and not self._array[slot, len(t) :].any(), \
                "block table array out of step"
        assert all(sid in self._slot for sid, t in self._tables.items() if t), "a block table without a slot"
