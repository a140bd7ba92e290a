"""Prompt-lookup (n-gram) drafting: the lookup itself, its point-mass q, and the engine's greedy output unchanged
with it (its sampled distribution is checked exactly in test_lossless.py)."""

import numpy as np
import pytest
import torch
from conftest import cheap_drafting

from dspark.engine.drafters.ngram import NgramProposer, lookup
from dspark.engine.llm_engine import LLMEngine
from dspark.engine.sampling import SamplingParams
from dspark.engine.settings import Settings


def test_lookup_takes_the_longest_suffix_and_its_latest_occurrence():
    t = np.array([1, 2, 3, 9, 2, 3, 7, 7, 1, 2, 3])
    # suffix [1, 2, 3] occurred at 0 (followed by 9, 2, ...); [2, 3] also at 4, but the longest match wins
    assert lookup(t, 3, 1, 3) == [9, 2, 3]
    assert lookup(t, 3, 1, 2) == [7, 7, 1]  # [2, 3]: its latest earlier occurrence is at 4
    assert lookup(t, 10, 1, 2) == [7, 7, 1, 2, 3]  # as many as follow
    assert lookup(np.array([5, 6, 7, 8]), 3, 1, 3) == []  # nothing repeats
    assert lookup(np.array([4, 5, 4]), 2, 1, 2) == [5, 4]
    assert lookup(np.array([4, 5, 4]), 2, 2, 2) == []  # a 1-token match is below min_n
    assert lookup(np.array([4]), 2, 1, 2) == []


def test_sampled_drafts_are_point_masses_and_greedy_ones_have_no_q():
    prop = NgramProposer(vocab_size=10, min_n=1, max_n=2)
    hist = [1, 2, 3, 1, 2]
    greedy, sampled, off = prop.propose([hist] * 3, [2, 2, 0], [SamplingParams(temperature=0),
                                                                  SamplingParams(temperature=1.0), SamplingParams()])
    assert greedy.tokens == sampled.tokens == [3, 1] and greedy.q is None and off.tokens == []
    assert greedy.source == "lookup" and greedy.confidence == [0.5, 0.5]  # the prior, before any round
    assert torch.equal(sampled.q, torch.nn.functional.one_hot(torch.tensor([3, 1]), 10).float())
    short = prop.propose([[3, 3]] * 2, [2, 2], [SamplingParams(temperature=1.0)] * 2, min_len=2)[0]
    assert short.tokens == [] and short.q is None  # one token found, two wanted: no draft, no q built
    assert prop.propose([[3, 3]], [2], [SamplingParams(temperature=1.0)])[0].tokens == [3]
    with pytest.raises(ValueError):
        NgramProposer(10, min_n=3, max_n=2)


def test_lookup_confidence_follows_its_verified_rounds():
    """Its drafts' confidence is the rate at which a looked-up token survived, given the ones before it."""
    prop = NgramProposer(vocab_size=10, min_n=1, max_n=2)
    for _ in range(300):
        prop.observe(4, 4)  # every token kept
    assert prop.survival > 0.95
    for _ in range(600):
        prop.observe(4, 0)  # the first token rejected each time (the decayed counts forget the kept ones)
    assert prop.survival < 0.05
    for _ in range(600):
        prop.observe(4, 1)  # one kept, the next rejected: a token survives half the time
    assert abs(prop.survival - 0.5) < 0.02
    assert prop.propose([[1, 2, 1]], [1], [SamplingParams(temperature=0)])[0].confidence == [prop.survival]


PROMPTS = ["1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2,", "x = 1\ny = 2\nx = 1\ny = 2\n",
           "def add(a, b):\n    return a + b\n\n# the same function again\ndef add(a, b):\n",
           "Explain lists in Python."]


@pytest.fixture(scope="module")
def reference():
    eng = LLMEngine(Settings(max_num_seqs=16, block_size=8))
    ps = [eng.tokenizer.encode(p) for p in PROMPTS]
    return ps, [s.output_ids for s in eng.generate(ps, SamplingParams(temperature=0, max_tokens=32,
                                                                        ignore_eos=True))]


@pytest.mark.parametrize("method", ["ngram", "dspark+ngram"])
@pytest.mark.parametrize("policy", ["fixed", "adaptive"])
def test_greedy_output_is_the_targets(reference, method, policy):
    ps, ref = reference
    eng = LLMEngine(Settings(max_num_seqs=16, block_size=8, speculative=method, draft_len=5, draft_policy=policy,
                             ngram_min=1))
    if policy == "adaptive":
        cheap_drafting(eng)
    model_rounds = []
    if method == "dspark+ngram":  # count the model drafter's proposals
        real = eng.drafter.propose
        eng.drafter.propose = lambda *a, **k: model_rounds.append(len(a[2])) or real(*a, **k)
    seqs = eng.generate(ps, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    assert [s.output_ids for s in seqs] == ref
    assert eng.stats["accepted_tokens"] > 0  # drafts were verified and kept
    if method == "dspark+ngram":  # both proposers drafted
        assert eng.stats["lookup_rounds"] > 0 and sum(model_rounds) > 0
    assert eng.block_manager.num_free == eng.block_manager.num_blocks
    eng.block_manager.check()
