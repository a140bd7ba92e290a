"""Which requests run this step, and how many tokens each brings.

Continuous batching with chunked prefill: running requests decode first (earliest arrival first), then prompt
chunks fill the remaining token budget. When the KV cache cannot grow, the latest-arrived running request is
preempted: its blocks are freed and it goes back to the front of the queue to be recomputed later (its
generated tokens are kept, so nothing it already streamed changes).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.sequence import SeqStatus, Sequence


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # query tokens this step: a prefill chunk, or 1 decode token + num_draft draft tokens
    num_draft: int = 0  # draft tokens to propose and verify this step (decode steps only)

    @property
    def samples(self) -> bool:
        """The chunk reaches the sequence's end, so this step yields its next token."""
        return self.num_draft > 0 or self.seq.num_computed + self.num_new_tokens == self.seq.num_tokens


@dataclass
class StepPlan:
    items: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(i.num_new_tokens for i in self.items)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 draft_len: int = 0, max_model_len: int | None = None):
        self.bm = block_manager
        self.draft_len = draft_len  # 0 = no speculation
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # Keep a few blocks back when admitting, so running requests can decode without thrashing.
        self.admit_reserve = max(1, block_manager.num_blocks // 100)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = SeqStatus.FINISHED, reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free(seq.seq_id)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free(seq.seq_id)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        self.num_preemptions += 1
        # Back to the queue in arrival order, ahead of requests that came later.
        pos = next((i for i, w in enumerate(self.waiting) if w.arrival > seq.arrival), len(self.waiting))
        self.waiting.insert(pos, seq)

    def num_draft(self, seq: Sequence) -> int:
        """Draft tokens for a decode step: the request's own setting or the server's, within its limits."""
        k = seq.params.num_speculative_tokens
        k = self.draft_len if k is None else min(k, self.draft_len)
        k = min(k, seq.params.max_tokens - seq.num_output - 1)
        if self.max_model_len:
            k = min(k, self.max_model_len - seq.num_tokens - 1)
        return max(k, 0)

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.max_num_batched_tokens
        self.running.sort(key=lambda s: s.arrival)
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            while not self.bm.can_allocate(seq.seq_id, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                plan.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                break  # seq preempted itself: everything after it was preempted too
            self.bm.allocate(seq.seq_id, seq.num_computed + n)
            plan.items.append(ScheduledSeq(seq, n))
            budget -= n
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not plan.preempted:
            seq = self.waiting[0]
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self.bm.can_allocate(seq.seq_id, n, reserve=self.admit_reserve if self.running else 0):
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            self.bm.allocate(seq.seq_id, n)
            plan.items.append(ScheduledSeq(seq, n))
            budget -= n
        # Drafts last, from what is left: every request first gets its own token, and drafts never preempt.
        for item in plan.items:
            seq = item.seq
            if budget <= 0 or item.num_new_tokens != 1 or seq.num_tokens - seq.num_computed != 1:
                continue
            if seq.num_computed == 0:  # no context yet for the drafter (a 1-token prompt's first step)
                continue
            k = min(self.num_draft(seq), budget)
            if k > 0 and self.bm.can_allocate(seq.seq_id, seq.num_computed + 1 + k):
                self.bm.allocate(seq.seq_id, seq.num_computed + 1 + k)
                item.num_new_tokens, item.num_draft = 1 + k, k
                budget -= k
        return plan
