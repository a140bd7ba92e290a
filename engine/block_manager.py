"""Owner of the paged KV cache's blocks: which physical blocks each sequence holds.

A sequence's KV length lives on the sequence (`num_computed`); the block manager only guarantees capacity.
Growing, rolling back and freeing are all changes of a block list, so speculation's rollback is cheap.
"""

from __future__ import annotations

from collections import deque


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._tables: dict[int, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

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

    def allocate(self, seq_id: int, num_tokens: int) -> list[int]:
        """Grow `seq_id`'s table to hold `num_tokens` tokens; returns the table."""
        need = self.extra_blocks(seq_id, num_tokens)
        if need > self.num_free:
            raise MemoryError(f"KV cache: need {need} blocks, {self.num_free} free")
        table = self._tables.setdefault(seq_id, [])
        table.extend(self._free.popleft() for _ in range(need))
        return table

    def rollback(self, seq_id: int, num_tokens: int) -> None:
        """Shrink `seq_id` to `num_tokens` tokens (drop rejected draft tokens): frees blocks past the end."""
        table = self._tables.get(seq_id, [])
        keep = self.blocks_for(num_tokens)
        while len(table) > keep:
            self._free.append(table.pop())

    def free(self, seq_id: int) -> None:
        self._free.extend(reversed(self._tables.pop(seq_id, [])))

    def table(self, seq_id: int) -> list[int]:
        return self._tables.get(seq_id, [])

    def check(self) -> None:
        """Invariant: every block is either free or owned by exactly one sequence."""
        owned = [b for t in self._tables.values() for b in t]
        all_blocks = owned + list(self._free)
        assert len(all_blocks) == self.num_blocks == len(set(all_blocks)), "KV block leak or double use"
