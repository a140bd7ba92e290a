"""Acceptance rules: greedy matching, and rejection sampling that preserves the target distribution.

The sampled test compares the empirical distribution of the first two committed tokens with the exact target
distribution by total variation; a deliberately broken rule (accepting every draft token) must fail it.
"""

import itertools

import torch

from engine.verify import accept_greedy, accept_sampled


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
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(V * V)
    for _ in range(n):
        x1 = int(torch.multinomial(Q1, 1, generator=g))
        x2 = int(torch.multinomial(Q2, 1, generator=g))
        q = torch.stack([Q1, Q2])
        p = torch.stack([P1, P2[x1], P2[x2]])
        out = rule([x1, x2], q, p, g)
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
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros(V)
    for _ in range(20000):
        out = accept_sampled([0], torch.eye(V)[[0]], torch.stack([P1, P1]), g)
        counts[out[0]] += 1
    assert (counts / 20000 - P1).abs().max() < 0.015


def test_all_draft_positions_reachable():
    g = torch.Generator().manual_seed(2)
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
        g = torch.Generator().manual_seed(9)
        runs.append([tuple(accept_sampled([3, 1], q, p, g)) for _ in range(200)])
    assert runs[0] == runs[1]


def test_a_token_the_target_rules_out_is_never_accepted():
    g = torch.Generator().manual_seed(4)
    p = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.25] * 4])
    q = torch.tensor([[0.97, 0.01, 0.01, 0.01]])
    for _ in range(2000):
        assert accept_sampled([0], q, p, g)[0] in (1, 2)
