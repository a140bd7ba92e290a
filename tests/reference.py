"""Reference implementations the tests hold the engine to: one row or one request at a time, plainly written.

The engine samples and verifies a whole step at once where the logits are (dspark/engine/verify.py); these are
the definitions it must agree with (greedy matching, rejection sampling, plain per-row sampling).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dspark.engine.sampling import Rng, SamplingParams, draw, filter_logits, uniforms


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]  # (chosen lp, top-k [(id, lp)]) per row


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[Rng]) -> SampleResult:
    """One token per row of `logits` [N, V] (float32)."""
    n = logits.shape[0]
    tokens = logits.argmax(-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        sub = logits[rows]
        temps = torch.tensor([params[i].temperature for i in rows], dtype=sub.dtype)
        ks = torch.tensor([max(params[i].top_k, 0) for i in rows])
        ps = torch.tensor([params[i].top_p for i in rows], dtype=sub.dtype)
        probs = filter_logits(sub, temps, ks, ps)
        for j, i in enumerate(rows):
            tokens[i] = draw(probs[j], generators[i])
    token_list = tokens.tolist()
    lps: list = [None] * n
    want = [i for i, p in enumerate(params) if p.logprobs is not None]
    if want:
        logp = torch.log_softmax(logits[want], dim=-1)
        kmax = max(params[i].logprobs for i in want)
        top_v, top_i = logp.topk(max(kmax, 1), dim=-1) if kmax else (None, None)
        for j, i in enumerate(want):
            k = params[i].logprobs
            top = list(zip(top_i[j, :k].tolist(), top_v[j, :k].tolist())) if k else []
            lps[i] = (float(logp[j, token_list[i]]), top)
    return SampleResult(token_list, lps)


def accept_greedy(draft: list[int], target_argmax: list[int]) -> list[int]:
    """Longest prefix where the draft equals the target's argmax, then the target's own next token."""
    n = 0
    while n < len(draft) and draft[n] == target_argmax[n]:
        n += 1
    return [*draft[:n], target_argmax[n]]


def accept_sampled(draft: list[int], q: torch.Tensor, p: torch.Tensor, gen: Rng) -> list[int]:
    """Rejection sampling. q: [k, V] drafter probs (one-hot for a greedy drafter), p: [k+1, V] target probs."""
    k = len(draft)
    if k:
        idx = torch.tensor(draft)
        rows = torch.arange(k)
        px, qx = p[rows, idx], q[rows, idx]
        u = uniforms([gen], [k])
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
