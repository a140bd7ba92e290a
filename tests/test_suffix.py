"""Suffix decoding: the match and its frequency-scored continuation, the bounded global store, the point-mass q, and
the engine's greedy output unchanged with `suffix` and `dspark+suffix` (the sampled distribution is checked exactly
in test_lossless.py)."""

import numpy as np
import pytest
import torch
from conftest import cheap_drafting

from dspark.engine.drafters.suffix import SEP, SuffixCache, SuffixProposer, continuation, longest_match
from dspark.engine.llm_engine import LLMEngine
from dspark.engine.sampling import SamplingParams
from dspark.engine.settings import Settings

GREEDY = SamplingParams(temperature=0)


def test_longest_match_finds_every_occurrence_of_the_longest_suffix():
    t = np.array([1, 2, 3, 9, 2, 3, 7, 7, 1, 2, 3])
    m, ends = longest_match(t, t, len(t) - 1, 8)
    assert m == 3 and ends.tolist() == [2]  # [1, 2, 3] once before; [2, 3] twice, but the longest match wins
    m, ends = longest_match(t, t, len(t) - 1, 2)  # capped at 2 tokens
    assert m == 2 and ends.tolist() == [2, 5]
    assert longest_match(np.array([5, 6, 7]), np.array([5, 6, 7]), 2, 4)[0] == 0  # 7 never occurred before
    # in another array (the global store): the context's tokens against it, no separator crossed
    store = np.array([4, 5, SEP, 4, 5, 6])
    m, ends = longest_match(store, np.array([9, 4, 5]), len(store), 8)
    assert m == 2 and ends.tolist() == [1, 4]


def test_continuation_takes_the_most_frequent_next_token_with_its_share():
    t = np.array([1, 2, 8, 1, 2, 8, 1, 2, 5, 1, 2])
    m, ends = longest_match(t, t, len(t) - 1, 2)
    assert m == 2 and ends.tolist() == [1, 4, 7]
    toks, probs = continuation(t, ends, 4, 0.1)
    # 8 after two of the three occurrences; then 1, 2 after both of those; then 8 after one and 5 after the other
    assert toks[:3] == [8, 1, 2] and probs[:3] == pytest.approx([2 / 3, 2 / 3, 2 / 3])
    assert probs[3] == pytest.approx(1 / 3) and toks[3] == 5  # the tie: the most recent occurrence's token
    assert continuation(t, ends, 4, 0.5)[0] == [8, 1, 2]  # stops where the share falls below min_prob
    # a separator ends an occurrence's continuation: it no longer counts for the token after it
    store = np.array([3, 4, SEP, 3, 4, 6])
    assert continuation(store, np.array([0, 3]), 3, 0.1) == ([4, 6], [1.0, 0.5])


def test_draft_length_scales_with_the_match_and_scores_pick_the_source():
    prop = SuffixProposer(vocab_size=100, spec_factor=1.0)
    hist = [7, 1, 2, 3, 4, 5, 6, 9, 9, 3]  # a 1-token match ([3]): one token proposed
    assert prop.speculate(hist, 5) == ([4], [1.0])
    hist = [7, 1, 2, 3, 4, 5, 6, 9, 1, 2, 3]  # a 3-token match: three
    assert prop.speculate(hist, 5) == ([4, 5, 6], [1.0, 1.0, 1.0])
    assert SuffixProposer(100, spec_factor=2.0).speculate(hist, 5)[0] == [4, 5, 6, 9, 1]
    # the global store: a finished output with a longer match there wins over the request's own tokens
    prop.finish("a", [1, 2, 3, 40, 41, 42, 43])
    assert prop.speculate([9, 1, 2, 3], 3) == ([40, 41, 42], [1.0, 1.0, 1.0])
    hist = [1, 2, 3, 50, 60, 8, 8, 1, 2, 3]  # both: the request's own match is as good and found first
    assert prop.speculate(hist, 3) == ([50, 60, 8], [1.0, 1.0, 1.0])


def test_drafts_are_point_masses_with_conditional_confidences_and_a_score_bar():
    prop = SuffixProposer(vocab_size=10)
    hist = [1, 2, 8, 1, 2, 8, 1, 2, 5, 1, 2]
    greedy, sampled, off = prop.propose([hist] * 3, [3, 3, 0], [GREEDY, SamplingParams(temperature=1.0), GREEDY])
    assert greedy.tokens == sampled.tokens == [8, 1] and greedy.q is None and off.tokens == []
    assert greedy.source == "suffix"
    # cumulative shares 2/3, 2/3 (a 2-token match drafts 2): confidences are each given the ones before
    assert greedy.confidence == pytest.approx([2 / 3, 1.0])
    assert torch.equal(sampled.q, torch.nn.functional.one_hot(torch.tensor([8, 1]), 10).float())
    # score 4/3 expected tokens: below a bar of 2 no draft (and no q built), above 1 it stands
    low, high = prop.propose([hist] * 2, [3, 3], [SamplingParams(temperature=1.0)] * 2, min_score=[2.0, 1.0])
    assert low.tokens == [] and low.q is None and high.tokens == [8, 1]
    with pytest.raises(ValueError):
        SuffixProposer(10, min_token_prob=1.5)


def test_the_global_store_is_bounded_in_requests_and_tokens_and_evicts_the_least_recently_used():
    rng = np.random.default_rng(0)
    cache = SuffixCache(max_requests=8, max_tokens=500)
    for i in range(200):
        cache.add(i, rng.integers(0, 50, rng.integers(1, 120)).tolist())
        assert len(cache) <= 8 and cache.num_tokens <= 500
        assert len(cache.tokens) == cache.num_tokens + len(cache)  # each output + its separator, nothing else
        assert cache.num_tokens == sum(map(len, cache.outputs.values()))
    assert len(cache) >= 500 // 120  # full: evicted only what the bounds needed
    big = SuffixCache(max_requests=4, max_tokens=10)
    big.add("long", list(range(30)))
    assert big.outputs["long"].tolist() == list(range(20, 30))  # an output past the bound: its tail
    lru = SuffixCache(max_requests=3)
    for key, out in (("a", [1, 2, 3]), ("b", [4, 5, 6]), ("c", [7, 8, 9])):
        lru.add(key, out)
    tokens = lru.tokens
    lru.touch(np.flatnonzero(tokens == 2))  # "a" was used: "b" is now the least recently used
    lru.add("d", [10])
    assert list(lru.outputs) == ["c", "a", "d"]
    # the proposer keeps its store within the bound through many finished requests
    prop = SuffixProposer(vocab_size=64, max_cached_requests=5, max_cached_tokens=300)
    for i in range(100):
        prop.finish(i, rng.integers(0, 64, 90).tolist())
        prop.propose([rng.integers(0, 64, 20).tolist()], [4], [GREEDY])
        assert len(prop.cache) <= 5 and prop.cache.num_tokens <= 300


PROMPTS = ["1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2,", "x = 1\ny = 2\nx = 1\ny = 2\n",
           "def add(a, b):\n    return a + b\n\n# the same function again\ndef add(a, b):\n",
           "Explain lists in Python.", "The quick brown fox jumps over the lazy dog. The quick brown",
           "a b c d e f g a b c d e f g a b c", "Write a poem about the sea.", "for i in range(10):\n    print(i)\n"
           "for i in range(10):\n", "Hello! How are you today?", "[1, 1, 2, 3, 5, 8, 13, 21, 34,"]


@pytest.fixture(scope="module")
def reference():
    eng = LLMEngine(Settings(max_num_seqs=16, block_size=8, dtype="float32"))
    ps = [eng.tokenizer.encode(p) for p in PROMPTS]
    return ps, [s.output_ids for s in eng.generate(ps, SamplingParams(temperature=0, max_tokens=32,
                                                                        ignore_eos=True))]


@pytest.mark.parametrize("method", ["suffix", "dspark+suffix"])
@pytest.mark.parametrize("policy", ["fixed", "adaptive"])
def test_greedy_output_is_the_targets(reference, method, policy):
    ps, ref = reference
    eng = LLMEngine(Settings(max_num_seqs=16, block_size=8, speculative=method, draft_len=5, draft_policy=policy,
                             dtype="float32", suffix_min_score=1.0))
    if policy == "adaptive":
        cheap_drafting(eng)
    model_rounds = []
    if method == "dspark+suffix":  # count the model drafter's proposals
        real = eng.drafter.propose
        eng.drafter.propose = lambda *a, **k: model_rounds.append(len(a[2])) or real(*a, **k)
    # twice: the second pass also drafts from the first pass's outputs in the global store
    for _ in range(2):
        seqs = eng.generate(ps, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
        assert [s.output_ids for s in seqs] == ref
    assert eng.stats["accepted_tokens"] > 0  # drafts were verified and kept
    assert len(eng.suffix.cache) == 2 * len(ps)  # every finished output joined the store
    sources = {p for *_, p in eng.round_log}
    if method == "dspark+suffix":  # both proposers drafted, and their rounds are told apart
        assert eng.stats["suffix_rounds"] > 0 and sum(model_rounds) > 0 and sources == {"suffix", "dspark"}
    else:
        assert sources == {"suffix"}
    assert eng.block_manager.num_free == eng.block_manager.num_blocks
    eng.block_manager.check()


def test_the_hybrids_default_bar_is_a_full_block():
    """--suffix-min-score unset: suffix's draft only where it expects all k tokens accepted (Arctic's rule)."""
    eng = LLMEngine(Settings(speculative="dspark+suffix", draft_len=4, draft_policy="fixed"))
    eng.generate([eng.tokenizer.encode(PROMPTS[0])], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    rounds = [(v, conf) for v, _, conf, p in eng.round_log if p == "suffix"]
    assert rounds and all(v == len(conf) and sum(np.cumprod(conf)) >= v - 1e-9 for v, conf in rounds)


def test_the_front_end_counts_rounds_per_proposer_and_per_position():
    """StepStats' rounds carry their proposer: the speculative counters are labelled by it, and the per-position
    counters count position j as verified in every round that drafted past it, accepted where all up to j were."""
    from types import SimpleNamespace

    from prometheus_client import REGISTRY

    from dspark.engine.messages import StepStats
    from dspark.server.async_llm import AsyncLLM

    def value(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    names = [("dspark_spec_rounds_total", {}), ("dspark_spec_draft_tokens_total", {}),
             ("dspark_spec_accepted_tokens_total", {})]
    pos = [(f"dspark_spec_{kind}_tokens_per_pos_total", {"position": str(j)}) for kind in ("draft", "accepted")
           for j in range(3)]
    before = {(n, d): value(n, drafter=d, **extra) for n, extra in names + pos for d in ("suffix", "dspark")}
    st = StepStats(rounds=[(3, 1, "suffix"), (2, 2, "suffix"), (1, 0, "dspark")])
    AsyncLLM._record(SimpleNamespace(_slo_recent=[]), st)

    def delta(n, d, **extra):
        return value(n, drafter=d, **extra) - before[n, d]

    assert [delta(n, "suffix") for n, _ in names] == [2, 5, 3]
    assert [delta(n, "dspark") for n, _ in names] == [1, 1, 0]
    assert [delta(n, "suffix", **e) for n, e in pos] == [2, 2, 1, 2, 1, 0]  # drafted at 0,1,2; accepted at 0,1,2
    assert [delta(n, "dspark", **e) for n, e in pos] == [1, 0, 0, 0, 0, 0]
