"""Step cost model: seconds per engine step as a function of batch tokens, i.e. the SPS(B) curve.

This is the scheduler's "GPU occupancy" signal (the CPU's curve on a CPU). It is profiled once at start-up
and refreshed online from measured steps, per power-of-two bucket of B, with linear interpolation in between.
The same table type also holds the drafter's cost per round as a function of how many requests draft.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable


def buckets_up_to(limit: int) -> list[int]:
    """1, 2, 4, ... up to and including `limit`."""
    out = [1]
    while out[-1] < limit:
        out.append(min(out[-1] * 2, limit))
    return out


class CostTable:
    """seconds(x) for x >= 0 from samples at bucket points, refreshed online by an exponential moving average."""

    def __init__(self, points: list[int], alpha: float = 0.1):
        self.points = list(points)
        self.seconds: list[float | None] = [None] * len(points)
        self.alpha = alpha

    def _nearest(self, x: float) -> int:
        """Index of the bucket x is closest to on a log scale."""
        if x <= self.points[0]:
            return 0
        i = bisect.bisect_left(self.points, x)
        if i >= len(self.points):
            return len(self.points) - 1
        lo, hi = self.points[i - 1], self.points[i]
        return i if math.log(x / lo) > math.log(hi / x) else i - 1

    def observe(self, x: float, seconds: float) -> None:
        """Fold in one measurement; a spike (a GC pause, a first-call warm-up) counts as at most 4x the estimate.

        The other buckets move by a quarter as much, in proportion: the machine's speed drifts for every batch
        size alike, and a bucket that steps rarely visit (e.g. drafting lengths while plain decoding wins) must
        not keep a stale cost that keeps them from being tried."""
        i = self._nearest(x)
        old = self.seconds[i]
        if old is None:
            self.seconds[i] = seconds
            return
        self.seconds[i] = (1 - self.alpha) * old + self.alpha * min(seconds, 4 * old)
        if old <= 0:
            return
        drift = 1 + (self.seconds[i] / old - 1) / 4
        for j, v in enumerate(self.seconds):
            if j != i and v is not None:
                self.seconds[j] = v * drift

    def __call__(self, x: float) -> float:
        """Interpolated seconds at x; non-decreasing in x (measurement noise must not make more work look cheaper)."""
        known, top = [], 0.0
        for p, s in zip(self.points, self.seconds):
            if s is not None:
                top = max(top, s)
                known.append((p, top))
        if not known:
            return 0.0
        if x <= known[0][0]:
            return known[0][1]
        for (p0, s0), (p1, s1) in zip(known, known[1:]):
            if x <= p1:
                return s0 + (s1 - s0) * (x - p0) / (p1 - p0)
        (p0, s0), (p1, s1) = (known[-2], known[-1]) if len(known) > 1 else (known[-1], known[-1])
        slope = (s1 - s0) / (p1 - p0) if p1 != p0 else s1 / p1
        return s1 + slope * (x - p1)  # extrapolate linearly past the last bucket

    def items(self) -> list[tuple[int, float]]:
        return [(p, s) for p, s in zip(self.points, self.seconds) if s is not None]


class StepCostModel:
    """verify(B): target step seconds for B batch tokens; draft(R): drafter seconds for R drafting requests."""

    def __init__(self, max_batch_tokens: int, max_seqs: int):
        self.verify = CostTable(buckets_up_to(max_batch_tokens))
        self.draft = CostTable(buckets_up_to(max_seqs))

    def profile(self, run_verify: Callable[[int], None], max_tokens: int,
                run_draft: Callable[[int], None] | None = None, max_seqs: int = 64) -> None:
        """Start-up profile: one target forward of B tokens at every bucket up to `max_tokens`, and one drafting
        round for R requests at every bucket up to `max_seqs`; the median of three runs each."""
        _profile(self.verify, run_verify, max_tokens)
        if run_draft is not None:
            _profile(self.draft, run_draft, max_seqs)


def _profile(table: CostTable, fn: Callable[[int], None], limit: int, repeats: int = 3) -> None:
    fn(1)  # warm-up
    for i, x in enumerate(table.points):
        if x > limit:
            break
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
        table.seconds[i] = sorted(times)[len(times) // 2]
