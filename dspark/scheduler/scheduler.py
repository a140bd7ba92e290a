"""Which requests run this step, and how many tokens each brings.

Continuous batching with chunked prefill: running requests decode first, most behind their tokens/s SLO first
(then earliest arrival), then prompt chunks fill the remaining token budget. When the KV cache cannot grow, the
running request furthest ahead of its SLO (then the latest arrival) is preempted: its blocks are freed and it
goes back to the queue to be recomputed later (its generated tokens are kept, so nothing it streamed changes).
Draft tokens come last, from what is left: the draft policy decides who drafts and how much is verified.
The waiting queue is bounded: past `max_waiting` the server turns requests away (429) instead of queueing.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from dspark.scheduler.block_manager import BlockManager
from dspark.scheduler.draft_policy import DraftPolicy
from dspark.scheduler.sequence import SeqStatus, Sequence


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
                 draft_len: int = 0, max_model_len: int | None = None, policy: DraftPolicy | None = None,
                 has_confidence: bool = False, slo_tokens_per_s: float = 0.0, max_waiting: int = 0):
        self.bm = block_manager
        self.draft_len = draft_len  # 0 = no speculation
        self.policy = policy
        self.has_confidence = has_confidence  # drafts carry calibrated per-position survival scores
        self.slo_tokens_per_s = slo_tokens_per_s  # server default target (0 = none)
        self.max_waiting = max_waiting  # 0 = unbounded
        # (delivered tokens/s, target) per finished request, drained by the metrics exporter (bounded if not)
        self.finished_rates: deque[tuple[float, float]] = deque(maxlen=10000)
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

    def queue_full(self, extra: int = 1) -> bool:
        """Would `extra` more waiting requests exceed the bound?"""
        return bool(self.max_waiting) and len(self.waiting) + extra > self.max_waiting

    def slo_target(self, seq: Sequence) -> float:
        t = seq.params.slo_tokens_per_s
        return self.slo_tokens_per_s if t is None else t

    @staticmethod
    def delivered_rate(seq: Sequence, now: float) -> float:
        """Decode tokens/s after the first token, the speed a reader of the stream sees."""
        return (seq.num_output - 1) / max(now - seq.first_token_time, 1e-6)

    def slack(self, seq: Sequence, now: float) -> float:
        """Delivered tokens/s over the SLO target: < 1 behind, > 1 ahead (1 when there is no target yet)."""
        target = self.slo_target(seq)
        if not target or seq.first_token_time is None or seq.num_output < 4:
            return 1.0
        return self.delivered_rate(seq, now) / target

    def finish(self, seq: Sequence, reason: str) -> None:
        if reason != "abort" and seq.first_token_time is not None and seq.num_output >= 2:
            self.finished_rates.append((self.delivered_rate(seq, time.monotonic()), self.slo_target(seq)))
        if self.policy is not None:
            self.policy.forget(seq.seq_id)
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
        now = time.monotonic()
        slack = {s.seq_id: self.slack(s, now) for s in self.running}
        self.running.sort(key=lambda s: (slack[s.seq_id], s.arrival))
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
        if len(self.waiting) > 1:  # behind their SLO first (a preempted request), then arrival order
            self.waiting = deque(sorted(self.waiting, key=lambda s: (min(self.slack(s, now), 1.0), s.arrival)))
        computing: set[int] = set()  # keys of the first uncached block of each prompt admitted this step
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not plan.preempted:
            seq = self.waiting[0]
            hit = self.bm.match_prefix(seq.seq_id, seq.token_ids)  # longest cached prefix: skipped
            key = self.bm.next_key(seq.seq_id, seq.token_ids)
            n = min(seq.num_tokens - hit, budget)
            # A block another prompt computes this step: wait, and next step map it instead of computing it twice
            # (requests that only map cached blocks, e.g. a shared system prompt, all go in this step).
            if (key is not None and key in computing) or not self.bm.can_allocate(
                    seq.seq_id, hit + n, reserve=self.admit_reserve if self.running else 0):
                self.bm.free(seq.seq_id)  # give the mapped blocks back while it waits
                break
            self.bm.count_lookup(seq.num_tokens, hit)
            computing.add(key)
            self.waiting.popleft()
            seq.status, seq.num_computed = SeqStatus.RUNNING, hit
            self.running.append(seq)
            self.bm.allocate(seq.seq_id, hit + n)
            plan.items.append(ScheduledSeq(seq, n))
            budget -= n
        # Drafts last, from what is left: every request first gets its own token, and drafts never preempt.
        # A request with no context yet for the drafter (a 1-token prompt's first step) cannot draft.
        cands = [(it, self.num_draft(it.seq)) for it in plan.items
                 if it.num_new_tokens == 1 and it.seq.num_tokens - it.seq.num_computed == 1 and it.seq.num_computed]
        cands = [(it, k) for it, k in cands if k > 0]
        if not cands or budget <= 0 or self.policy is None:
            return plan
        drafting = self.policy.gate(
            [(it.seq.seq_id, it.seq.params.greedy, k, self.slo_weight(it.seq, now)) for it, k in cands],
            plan.num_tokens, sum(it.samples for it in plan.items))
        for item, k in cands:
            seq = item.seq
            k = min(k, budget)
            if seq.seq_id in drafting and k > 0 and self.bm.can_allocate(seq.seq_id, seq.num_computed + 1 + k):
                self.bm.allocate(seq.seq_id, seq.num_computed + 1 + k)
                item.num_new_tokens, item.num_draft = 1 + k, k
                budget -= k
        return plan

    def slo_weight(self, seq: Sequence, now: float) -> float:
        """Draft-budget weight: up to 4x for a request behind its SLO, down to 1/4 for one far ahead."""
        return min(4.0, max(0.25, 1.0 / max(self.slack(seq, now), 1e-6)))

    def choose_draft_lengths(self, plan: StepPlan, drafts: dict) -> None:
        """After drafting: how many of each request's draft tokens to verify (the policy's Theta rule).

        Shrinks the plan's items and returns the KV blocks of the tokens not verified."""
        items = [it for it in plan.items if it.num_draft]
        if not items:
            return
        now = time.monotonic()
        spec = []
        for it in items:
            d = drafts[it.seq.seq_id]
            n = len(d.tokens)
            conf = d.confidence if self.has_confidence else None
            probe = 1 if it.seq.seq_id in self.policy.probing else 0
            spec.append((n, self.policy.survival(it.seq.params.greedy, conf, n), self.slo_weight(it.seq, now), probe))
        base = plan.num_tokens - sum(it.num_draft for it in items)
        lengths = self.policy.lengths(spec, base, sum(it.samples for it in plan.items),
                                      [it.seq.params.greedy for it in items])
        for it, n in zip(items, lengths):
            it.num_draft, it.num_new_tokens = n, 1 + n
            self.bm.rollback(it.seq.seq_id, it.seq.num_computed + 1 + n)
