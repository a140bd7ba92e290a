"""Lossless acceptance of a drafted block (Leviathan et al. 2023; Chen et al. 2023).

Given drafted tokens x_1..x_k, the drafter's distributions q_1..q_k and the target's p_1..p_{k+1} (all after
the same temperature / top-k / top-p processing), return the tokens to commit: the accepted prefix plus one
token from the target (a correction at the first rejection, else the bonus). The committed tokens are
distributed exactly as if sampled from the target one at a time.
"""

from __future__ import annotations

import torch

from engine.sampling import draw


def accept_greedy(draft: list[int], target_argmax: list[int]) -> list[int]:
    """Longest prefix where the draft equals the target's argmax, then the target's own next token."""
    n = 0
    while n < len(draft) and draft[n] == target_argmax[n]:
        n += 1
    return [*draft[:n], target_argmax[n]]


def accept_sampled(draft: list[int], q: torch.Tensor, p: torch.Tensor, gen: torch.Generator) -> list[int]:
    """Rejection sampling. q: [k, V] drafter probs (one-hot for a greedy drafter), p: [k+1, V] target probs."""
    k = len(draft)
    if k:
        idx = torch.tensor(draft)
        rows = torch.arange(k)
        px, qx = p[rows, idx], q[rows, idx]
        u = torch.rand(k, generator=gen)
        # accept with prob P(u < p/q) = min(1, p/q) for u in [0, 1); q(x) > 0 since x was drawn from q, and a
        # token the target rules out (p(x) = 0) is never accepted, even at u = 0
        ok = (u * qx < px).tolist()
        for i in range(k):
            if not ok[i]:
                residual = (p[i] - q[i]).clamp_min(0)  # draw() normalises
                # p == q makes the residual empty; then rejection had probability 0 and cannot be here,
                # except through rounding: fall back to p.
                return [*draft[:i], draw(residual if residual.sum() > 0 else p[i], gen)]
    return [*draft, draw(p[k], gen)]
