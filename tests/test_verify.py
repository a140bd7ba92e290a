"""Acceptance rules: greedy matching, and rejection sampling that preserves the target distribution.

The sampled test compares the empirical distribution of the first two committed tokens with the exact target
distribution by total variation; a deliberately broken rule (accepting every draft token) must fail it.
"""

import itertools

import pytest
import torch
from reference import accept_greedy, accept_sampled

from dspark.engine.sampling import (
    SamplingParams,
    filter_logits,
    index_at,
    index_at_rows,
    make_generator,
    uniforms,
)
from dspark.engine.verify import Verify, verify_step


def test_greedy_prefix_and_bonus():
    assert accept_greedy([5, 6, 7], [5, 6, 7, 8]) == [5, 6, 7, 8]
    assert accept_greedy([5, 9, 7], [5, 6, 7, 8]) == [5, 6]
    assert accept_greedy([9], [1, 2]) == [1]
    assert accept_greedy([], [3]) == [3]


V = 4
P1 = torch.tensor([0.5, 0.3, 0.15, 0.05])  # target, position 1
P2 = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25], [0.1, 0.1, 0.1, 0.7]])
Q1 = torch.tensor([0.1, 0.2, 0.3, 0.4])  # a poor drafter
Q2 = torch.tensor([0.4, 0.3, 0.2, 0.1])


def exact_pairs() -> torch.Tensor:
    return (P1[:, None] * P2).flatten()  # P(x1, x2) under the target


def empirical(rule, n=40000, seed=0) -> torch.Tensor:
    g, rng = torch.Generator().manual_seed(seed), make_generator(seed)
    counts = torch.zeros(V * V)
    for _ in range(n):
        x1 = int(torch.multinomial(Q1, 1, generator=g))
        x2 = int(torch.multinomial(Q2, 1, generator=g))
        q = torch.stack([Q1, Q2])
        p = torch.stack([P1, P2[x1], P2[x2]])
        out = rule([x1, x2], q, p, rng)
        if len(out) == 1:  # first token was rejected: the second comes from the target given the first
            out = out + [int(torch.multinomial(P2[out[0]], 1, generator=g))]
        counts[out[0] * V + out[1]] += 1
    return counts / n


def accept_everything(draft, q, p, gen):  # the broken rule: biased towards the drafter
    return list(draft)


# TV between the empirical and true distribution of 16 outcomes with n = 40000: mean about 0.009; a bound of
# 0.03 is exceeded with probability far below 1e-6 (DKW-style bound), so this test has no practical false alarms.
TV_BOUND = 0.03


def test_rejection_sampling_is_lossless():
    tv = 0.5 * (empirical(accept_sampled) - exact_pairs()).abs().sum()
    assert tv < TV_BOUND, tv


def test_broken_rule_is_caught():
    tv = 0.5 * (empirical(accept_everything) - exact_pairs()).abs().sum()
    assert tv > TV_BOUND, tv


def test_greedy_drafter_one_hot_q():
    g = make_generator(1)
    counts = torch.zeros(V)
    for _ in range(20000):
        out = accept_sampled([0], torch.eye(V)[[0]], torch.stack([P1, P1]), g)
        counts[out[0]] += 1
    assert (counts / 20000 - P1).abs().max() < 0.015


def test_all_draft_positions_reachable():
    g = make_generator(2)
    lengths = set()
    for _ in itertools.repeat(None, 300):
        lengths.add(len(accept_sampled([3, 1], torch.stack([Q1, Q2]), torch.stack([P1, P2[3], P2[1]]), g)))
    assert lengths == {1, 2, 3}


def test_seeded_acceptance_ignores_the_global_rng():
    """The request's generator alone decides acceptance, correction and bonus draws."""
    q, p = torch.stack([Q1, Q2]), torch.stack([P1, P2[3], P2[1]])
    runs = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        g = make_generator(9)
        runs.append([tuple(accept_sampled([3, 1], q, p, g)) for _ in range(200)])
    assert runs[0] == runs[1]


def test_a_token_the_target_rules_out_is_never_accepted():
    g = make_generator(4)
    p = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.25] * 4])
    q = torch.tensor([[0.97, 0.01, 0.01, 0.01]])
    for _ in range(2000):
        assert accept_sampled([0], q, p, g)[0] in (1, 2)


# -- the batched step equals the per-request rules ----------------------------------------------------------------
def reference_round(draft, q, logits, params, u):
    """One request by the per-request rules, from the same uniforms verify_step draws (len(draft) + 1 float64s):
    greedy matching, or ratio tests u_j * q(x_j) < p(x_j) then the residual (or bonus) at u_last."""
    if params.greedy:
        return accept_greedy(draft, logits.argmax(-1).tolist())
    n = logits.shape[0]
    p = filter_logits(logits, torch.full((n,), params.temperature), torch.full((n,), max(params.top_k, 0)),
                      torch.full((n,), params.top_p))
    for j, x in enumerate(draft):
        if not float(u[j]) * float(q[j, x]) < float(p[j, x]):
            residual = (p[j] - q[j]).clamp_min(0)
            return [*draft[:j], index_at(residual if residual.sum() > 0 else p[j], float(u[-1]))]
    return [*draft, index_at(p[len(draft)], float(u[-1]))]


def random_step(seed: int, vocab: int = 40):
    g = torch.Generator().manual_seed(seed)
    reqs, logits = [], []
    for r in range(int(torch.randint(1, 9, (1,), generator=g))):
        k = int(torch.randint(0, 5, (1,), generator=g))
        greedy = bool(torch.rand(1, generator=g) < 0.4)
        params = SamplingParams(temperature=0 if greedy else float(torch.rand(1, generator=g)) * 1.5 + 0.2,
                                top_k=int(torch.randint(0, 6, (1,), generator=g)),
                                top_p=float(torch.rand(1, generator=g)) * 0.5 + 0.5, seed=seed * 100 + r,
                                logprobs=[None, 0, 3][r % 3])
        rows = torch.randn(k + 1, vocab, generator=g) * 2
        draft, q = [], None
        if k:  # drafts from a distribution near the target's, so that some are accepted
            q = torch.softmax(rows[:k] + torch.randn(k, vocab, generator=g), -1)
            draft = [int(torch.multinomial(q[j], 1, generator=g)) for j in range(k)]
            if greedy:  # a greedy drafter that is right about half the time
                draft = [int(rows[j].argmax()) if torch.rand(1, generator=g) < 0.6 else d for j, d in enumerate(draft)]
                q = None
        reqs.append(Verify(draft, params, make_generator(params.seed), q))
        logits.append(rows)
    return reqs, torch.cat(logits)


def test_verify_step_equals_the_per_request_rules():
    accepted_past_first = 0
    for seed in range(60):
        reqs, logits = random_step(seed)
        res = verify_step(logits, reqs)
        start = 0
        for r, toks, lps in zip(reqs, res.tokens, res.logprobs):
            rows = logits[start : start + len(r.draft) + 1]
            u = uniforms([make_generator(r.params.seed)], [len(r.draft) + 1])
            assert toks == reference_round(r.draft, r.q, rows, r.params, u), (seed, r)
            accepted_past_first += len(toks) >= 3
            if r.params.logprobs is None:
                assert lps is None
            else:
                logp = torch.log_softmax(rows[: len(toks)], -1)
                for j, (t, (lp, alts)) in enumerate(zip(toks, lps)):
                    assert lp == pytest.approx(float(logp[j, t]), abs=1e-5)
                    top = logp[j].topk(r.params.logprobs)
                    assert [a for a, _ in alts] == top.indices.tolist()
                    assert [v for _, v in alts] == pytest.approx(top.values.tolist(), abs=1e-5)
            start += len(r.draft) + 1
        # two int64 per request; per committed token of a request with logprobs, its float32 logprob and the top
        # kmax (float32 value, int64 id) of the step's largest request
        want = [(r.params.logprobs, len(t)) for r, t in zip(reqs, res.tokens) if r.params.logprobs is not None]
        kmax = max((k for k, _ in want), default=0)
        assert res.bytes_to_host == 16 * len(reqs) + sum(n for _, n in want) * (4 + 12 * kmax)
    assert accepted_past_first > 20  # multi-token acceptance is exercised


def test_verify_step_copies_two_ids_per_request_to_the_host():
    reqs, logits = random_step(3)
    for r in reqs:
        r.params.logprobs = None
    assert verify_step(logits, reqs).bytes_to_host == 2 * 8 * len(reqs)


def test_index_at_rows_matches_index_at_row_by_row():
    """Several rows at once, at the CDF's edges: u = 0, a slice boundary, and u * total on the total."""
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.25, 0.5, 0.0], [0.5, 0.0, 0.5, 0.0, 0.0, 0.0],
                          [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    for u in (0.0, 0.25, 0.5, 0.7, 1.0):
        got = index_at_rows(probs, torch.full((3,), u, dtype=torch.float64)).tolist()
        assert got == [index_at(row, u) for row in probs], u
    assert index_at_rows(probs, torch.ones(3, dtype=torch.float64)).tolist() == [4, 2, 5]  # last with mass
