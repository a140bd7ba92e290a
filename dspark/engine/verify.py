"""Lossless acceptance of a drafted block (Leviathan et al. 2023; Chen et al. 2023).

Given drafted tokens x_1..x_k, the drafter's distributions q_1..q_k and the target's p_1..p_{k+1} (all after
the same temperature / top-k / top-p processing), return the tokens to commit: the accepted prefix plus one
token from the target (a correction at the first rejection, else the bonus). The committed tokens are
distributed exactly as if sampled from the target one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dspark.engine.grammar import unpack
from dspark.engine.sampling import (
    TOP_P_WIDTH,
    Rng,
    SamplingParams,
    filter_logits,
    filter_top_k,
    index_at_rows,
    penalize,
    uniforms,
)


# -- the whole step at once, where the logits are -----------------------------------------------------------------
@dataclass
class Verify:
    """One request's rows in a step's logits: len(draft) + 1 consecutive rows, row j scoring draft token j (the
    last row gives the bonus token). A request that did not draft has one row: its next token is sampled.
    q: the drafter's [len(draft), V] distributions for a sampled request that drafted, else None.
    prompt / output: its tokens so far, for penalties (only read when params.penalized).
    mask: the tokens its grammar allows on each of its rows, packed [len(draft) + 1, words] int32
    (engine.grammar's layout), or None."""

    draft: list[int]
    params: SamplingParams
    generator: Rng
    q: torch.Tensor | None = None
    prompt: list[int] = ()
    output: list[int] = ()
    mask: np.ndarray | None = None


@dataclass
class StepResult:
    tokens: list[list[int]]  # committed tokens per request: accepted drafts, then the correction or bonus
    logprobs: list[list | None]  # per request, per committed token: (chosen logprob, [(id, logprob)]) or None
    bytes_to_host: int  # what the step copied from the logits' device


def ratio_test(px: torch.Tensor, qx: torch.Tensor, u: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """Accept draft token x with probability min(1, p(x)/q(x)): u < p/q for u in [0, 1) (position: 0-based)."""
    return u * qx < px


def correction(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Where the token after a rejection comes from: the residual (p - q)+ (unnormalised; q is 0 on bonus rows)."""
    return (p - q).clamp_min(0)


def _rounds(ok: torch.Tensor, n: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Accepted draft tokens per request, its final row and its bonus row, from `ok` over the requests'
    consecutive rows (len(draft) + 1 each): the length of each request's leading run of accepted rows."""
    dev = ok.device
    n_t = torch.tensor(n, device=dev)
    starts = (n_t + 1).cumsum(0) - (n_t + 1)
    width = max(n) + 1
    grid = (starts[:, None] + torch.arange(width, device=dev)).clamp(max=ok.shape[0] - 1)
    accepted = (ok[grid] & (torch.arange(width, device=dev)[None, :] < n_t[:, None])).long().cumprod(1).sum(1)
    return accepted, starts + accepted, starts + n_t


def verify_step(logits: torch.Tensor, reqs: list[Verify], chunk_rows: int | None = None) -> StepResult:
    """Greedy matching and rejection sampling for every request of a step over its logits [M, V] (on whatever
    device they are), then one small copy to the host: accepted counts and final tokens (and the logprobs asked
    for). The uniforms come from each request's own counter-based stream, all of the step's in one call (a fixed
    number per round: len(draft) + 1), so a seeded request draws the same tokens whatever else is in the batch.

    Sampled requests are processed in chunks of whole requests with at least `chunk_rows` logits rows (default:
    all at once on a GPU; 16 on a CPU, where passes over [rows, vocabulary] arrays that stay in cache beat one
    pass over arrays that do not, and each chunk's own overhead counts too: on a 2-core EPYC, top-p 0.95 over a
    49k vocabulary, chunks of 2 / 4 / 8 / 64 requests took 903 / 850 / 913 / 1190 ms at 64 requests x 4 rows
    and 426 / 440 / 507 / 540 ms at 16 x 8; 512 requests of top-k 4 went 34 -> 25 s from 2 to 8 a chunk)."""
    dev, m = logits.device, logits.shape[0]
    n = [len(r.draft) for r in reqs]
    starts = [0]
    for k in n[:-1]:
        starts.append(starts[-1] + k + 1)
    assert starts[-1] + n[-1] + 1 == m, "logits rows do not match the requests' drafts"
    chunk_rows = chunk_rows or (m if dev.type == "cuda" else 16)
    raw = logits  # requested logprobs are the model's own (before penalties and sampling filters), as vLLM's
    penalized = [i for i, r in enumerate(reqs) if r.params.penalized]
    masked = [i for i, r in enumerate(reqs) if r.mask is not None]
    if penalized or masked:  # penalties, then the grammar's mask: the distribution sampling and verification use
        logits = logits.clone()
        for i in penalized:
            rows = slice(starts[i], starts[i] + n[i] + 1)
            logits[rows] = penalize(raw[rows], reqs[i].params, reqs[i].prompt, reqs[i].output, reqs[i].draft)
        if masked:  # every grammar row of the step in one batched bitmask, unpacked where the logits are
            rows = torch.tensor([starts[i] + j for i in masked for j in range(n[i] + 1)], device=dev)
            bits = torch.from_numpy(np.concatenate([reqs[i].mask for i in masked])).to(dev, non_blocking=True)
            logits[rows] = logits[rows].masked_fill(~unpack(bits, logits.shape[-1]), float("-inf"))
    accepted = torch.zeros(len(reqs), dtype=torch.long, device=dev)
    tokens = torch.zeros(len(reqs), dtype=torch.long, device=dev)

    def rows_of(ids):
        return [starts[i] + j for i in ids for j in range(n[i] + 1)]

    def take(rows: list[int]) -> torch.Tensor:  # a view where the rows are consecutive (no copy)
        if rows == list(range(rows[0], rows[-1] + 1)):
            return logits[rows[0] : rows[-1] + 1]
        return logits.index_select(0, torch.tensor(rows, device=dev))

    def scored(ids):  # the token each row scores (-1 on bonus rows) and its draft position
        return (torch.tensor([t for i in ids for t in (*reqs[i].draft, -1)], device=dev),
                torch.tensor([j for i in ids for j in range(n[i] + 1)], device=dev))

    greedy = [i for i, r in enumerate(reqs) if r.params.greedy]
    if greedy:
        am = take(rows_of(greedy)).argmax(-1)
        x, _ = scored(greedy)
        acc, final, _ = _rounds(x == am, [n[i] for i in greedy])
        idx = torch.tensor(greedy, device=dev)
        accepted[idx], tokens[idx] = acc, am[final]
    # Sampled requests, in chunks of whole requests: those whose filter keeps at most TOP_P_WIDTH tokens (a top-k)
    # are verified over their kept tokens only; the others over the whole vocabulary. Each request draws its own
    # uniforms, so neither the grouping nor the order changes what it samples.
    sampled = [i for i, r in enumerate(reqs) if not r.params.greedy]
    narrow = [i for i in sampled if _narrow(reqs[i].params)]
    wide = [i for i in sampled if not _narrow(reqs[i].params)]
    u_all = uniforms([reqs[i].generator for i in sampled], [n[i] + 1 for i in sampled], dev) if sampled else None
    u_at, at = {}, 0  # request -> its first uniform's index in u_all
    for i in sampled:
        u_at[i], at = at, at + n[i] + 1
    for group, sample in ((narrow, _sample_kept), (wide, _sample_full)):
        chunks: list[list[int]] = []
        filled = chunk_rows  # rows in the last chunk: full, so the first request opens one
        for i in group:
            if filled >= chunk_rows:
                chunks.append([])
                filled = 0
            chunks[-1].append(i)
            filled += n[i] + 1
        for ids in chunks:
            x, pos = scored(ids)
            u = u_all[torch.tensor([u_at[i] + j for i in ids for j in range(n[i] + 1)], device=dev)]
            acc, tok = sample(take(rows_of(ids)), [reqs[i] for i in ids], x, pos, u)
            idx = torch.tensor(ids, device=dev)
            accepted[idx], tokens[idx] = acc, tok
    packed = torch.stack([accepted, tokens]).cpu()
    copied = packed.numel() * packed.element_size()
    acc, fin = packed.tolist()
    out = [[*r.draft[:a], t] for r, a, t in zip(reqs, acc, fin)]
    lps: list = [None] * len(reqs)
    want = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
    if want:
        w_rows = torch.tensor([starts[i] + j for i in want for j in range(acc[i] + 1)], device=dev)
        chosen = torch.tensor([t for i in want for t in out[i]], device=dev)
        logp = torch.log_softmax(raw[w_rows], -1)
        kmax = max(reqs[i].params.logprobs for i in want)
        top = logp.topk(kmax, -1) if kmax else None
        host = [logp.gather(1, chosen[:, None])[:, 0].cpu()] + ([top.values.cpu(), top.indices.cpu()] if top else [])
        copied += sum(t.numel() * t.element_size() for t in host)
        chosen_lp = host[0].tolist()
        top_v, top_i = (host[1].tolist(), host[2].tolist()) if top else (None, None)
        row = 0
        for i in want:
            k = reqs[i].params.logprobs
            lps[i] = []
            for _ in out[i]:
                alts = list(zip(top_i[row][:k], top_v[row][:k])) if k else []
                lps[i].append((chosen_lp[row], alts))
                row += 1
    return StepResult(out, lps, copied)


def _narrow(params: SamplingParams) -> bool:
    """Its filtered distribution lives on at most TOP_P_WIDTH tokens known before any sort: a top-k (min-p, which
    cuts relative to the whole row's maximum before top-k, is left to the full path)."""
    return 0 < params.top_k <= TOP_P_WIDTH and not params.min_p


def _filters(reqs: list[Verify], dev) -> tuple[torch.Tensor, ...]:
    """Per-row temperature, top-k, top-p and min-p of the requests' consecutive rows."""
    sp = [r.params for r in reqs for _ in range(len(r.draft) + 1)]
    return (torch.tensor([s.temperature for s in sp], device=dev), torch.tensor([max(s.top_k, 0) for s in sp],
            device=dev), torch.tensor([s.top_p for s in sp], device=dev), torch.tensor([s.min_p for s in sp],
            device=dev))


def _sample_full(logits: torch.Tensor, reqs: list[Verify], x: torch.Tensor, pos: torch.Tensor,
                 u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ratio tests, then the residual (or bonus) draw, over the whole vocabulary: (accepted, final token) per
    request. x: the token each row scores (-1 on bonus rows), u: each row's uniform."""
    dev, vocab = logits.device, logits.shape[-1]
    p = filter_logits(logits, *_filters(reqs, dev))
    zero = torch.zeros(1, vocab, device=dev)  # q of a bonus row: nothing drafted there
    q = torch.cat([t for r in reqs for t in ((r.q.to(dev, torch.float32), zero) if r.draft else (zero,))])
    xs = x.clamp_min(0)[:, None]
    ok = ratio_test(p.gather(1, xs)[:, 0], q.gather(1, xs)[:, 0], u, pos) & (x >= 0)
    acc, final, bonus = _rounds(ok, [len(r.draft) for r in reqs])
    dist = correction(p[final], q[final])
    dist = torch.where(dist.sum(-1, keepdim=True) > 0, dist, p[final])  # p == q: rejection only by rounding
    # the round's last uniform (its bonus row's): the one that rejected x_j is not uniform any more
    return acc, index_at_rows(dist, u[bonus])


def _sample_kept(logits: torch.Tensor, reqs: list[Verify], x: torch.Tensor, pos: torch.Tensor,
                 u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """_sample_full over each row's top-k tokens only: the target's p is zero elsewhere, so are the residual
    (p - q)+ and the bonus distribution, and the ratio test reads p and q at the draft token alone. One top-k
    pass over the vocabulary (and a logsumexp where a top-p cut needs the row's whole mass); the rest works on
    [rows, k]. The kept tokens come in vocabulary order, so the inverse-CDF draw picks the token the full path
    picks from the same uniform."""
    dev = logits.device
    temps, ks, top_ps, _ = _filters(reqs, dev)
    p, idx = filter_top_k(logits, temps, ks, top_ps)
    px = (p * (idx == x[:, None])).sum(-1)  # 0 on bonus rows (x = -1)
    # q at the draft token and over each row's kept tokens: one gather per drafting request; 0 on bonus rows
    qk = torch.zeros_like(p)
    qx = torch.zeros_like(px)
    start = 0
    for r in reqs:
        k = len(r.draft)
        if k:
            got = r.q.to(dev, torch.float32).gather(1, torch.cat([idx[start : start + k], x[start : start + k, None]],
                                                                  1))
            qk[start : start + k], qx[start : start + k] = got[:, :-1], got[:, -1]
        start += k + 1
    ok = ratio_test(px, qx, u, pos) & (x >= 0)
    acc, final, bonus = _rounds(ok, [len(r.draft) for r in reqs])
    dist = correction(p[final], qk[final])
    dist = torch.where(dist.sum(-1, keepdim=True) > 0, dist, p[final])
    return acc, idx[final].gather(1, index_at_rows(dist, u[bonus])[:, None])[:, 0]
