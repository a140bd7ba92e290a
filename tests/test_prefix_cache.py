"""Automatic prefix caching through the engine: requests that share a system prompt or resend a conversation map
the cached K/V (and the drafter's cached inputs) of its full blocks and compute only the rest, with outputs
identical to the cache off: greedy with speculation, seeded sampling without.
"""

import pytest
from conftest import TEST_MODEL
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_engine_properties import drain

from dspark.engine.llm_engine import LLMEngine
from dspark.engine.sampling import SamplingParams
from dspark.engine.settings import Settings
from dspark.engine.tokenizer import Tokenizer
from dspark.scheduler.sequence import SeqStatus

# 9 full blocks of 4 and one token of code, which the tiny model and its drafters know
SYSTEM = Tokenizer(TEST_MODEL).encode("import os\nimport sys\n\n\ndef read_file(path):\n    \"\"\"Return the "
                                     "contents of a file.\"\"\"\n    with open(path) as f:\n        return "
                                     "f.read()\n\n\ndef main():\n    for name in sys.argv[1:]:\n")[:37]
SPEC = dict(speculative="dspark", draft_policy="fixed", draft_len=3, block_size=4, num_kv_blocks=64, max_num_seqs=6,
            max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def spec_engines():
    return LLMEngine(Settings(**SPEC)), LLMEngine(Settings(**SPEC, enable_prefix_caching=False))


def greedy(n=12):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def run(eng, prompts, params, together=False):
    """Outputs and the prefix-cache hits (tokens) each request's admission found."""
    if together:
        return [s.output_ids for s in eng.generate(prompts, params)], None
    outs, hits = [], []
    for p, sp in zip(prompts, params):
        before = eng.block_manager.hits
        outs.append(eng.generate([p], sp)[0].output_ids)
        hits.append(eng.block_manager.hits - before)
    return outs, hits


def test_shared_prefixes_strict_prefixes_and_mid_block_divergence_are_served_right(spec_engines):
    on, off = spec_engines
    prompts = [SYSTEM + [1, 2, 3], SYSTEM + [9, 8], SYSTEM[:20], SYSTEM[:18] + [5, 6, 7], SYSTEM[:16],
               SYSTEM + [1, 2, 3]]
    params = [greedy()] * len(prompts)
    accepted = on.stats["accepted_tokens"], off.stats["accepted_tokens"]
    got, hits = run(on, prompts, params)
    want, _ = run(off, prompts, params)
    assert got == want
    # the drafter drafted from the cached prefix's features what it drafts from recomputed ones: the same drafts
    # were accepted (a drafter context built wrong would still give the same tokens, speculation being lossless)
    on_acc, off_acc = on.stats["accepted_tokens"] - accepted[0], off.stats["accepted_tokens"] - accepted[1]
    assert on_acc == off_acc and on_acc > 20
    # first: nothing cached; then 9 full blocks; a strict prefix of 20 tokens maps 4 blocks (its last token is
    # computed); diverging in block 5 maps the 4 before it; 16 tokens map 3 (the 4th is its last block); the
    # repeat maps all 9 prompt blocks (the first request's generated tokens sit in blocks after those)
    assert hits == [0, 36, 16, 16, 12, 36]
    assert off.block_manager.hits == 0
    bm = on.block_manager
    assert bm.num_free == bm.num_blocks and bm.num_cached > 0 and not on.draft_ctx
    bm.check()


def test_a_multi_turn_chat_maps_the_previous_turns_prompt_and_answer(spec_engines):
    on, off = spec_engines
    first = SYSTEM[:30] + [11, 12]
    answer = on.generate([first], greedy(10))[0].output_ids
    second = first + answer + [13, 14, 15]  # the client resends the history and adds a turn
    before = on.block_manager.hits
    got = on.generate([second], greedy(10))[0].output_ids
    # the first request computed its prompt and 9 of its 10 answer tokens (the last one never ran): 41 tokens
    assert on.block_manager.hits - before == 40
    assert got == off.generate([second], greedy(10))[0].output_ids


def test_requests_admitted_together_share_once_one_has_computed_the_prefix(spec_engines):
    on, off = spec_engines
    shared = [600 + i for i in range(33)]  # a prefix nothing before has cached
    prompts = [shared + [i] for i in (1, 1, 2)]  # identical siblings (n > 1) and a neighbour
    before = on.block_manager.hits
    got, _ = run(on, prompts, [greedy()] * 3, together=True)
    assert on.block_manager.hits - before == 2 * 32  # the first computes 33 tokens' blocks; the others wait a step
    assert got == run(off, prompts, [greedy()] * 3, together=True)[0]
    assert got[0] == got[1]


def test_requests_that_only_map_a_cached_prefix_are_admitted_in_one_step(spec_engines):
    """n users with one system prompt: once it is cached, they all go in the same step (none waits behind another
    that maps the same blocks), while a sibling that would compute the same uncached block still waits a step."""
    on, _ = spec_engines
    shared = [700 + i for i in range(32)]  # 8 full blocks nothing before has cached
    first = on.add_request("sys-0", shared + [1], greedy(4))
    on.step()  # computes the shared blocks
    assert first.num_computed == 33
    # three that map the 8 blocks and compute one token each, then two that would compute the same new 9th block
    tails = [[2], [3], [4], [6, 7, 8, 9, 10], [6, 7, 8, 9, 11]]
    seqs = [on.add_request(f"sys-{i + 1}", shared + t, greedy(4)) for i, t in enumerate(tails)]
    before = on.block_manager.hits
    on.step()
    assert [s.status for s in seqs] == [SeqStatus.RUNNING] * 4 + [SeqStatus.WAITING]
    assert on.block_manager.hits - before == 4 * 32
    while on.has_unfinished():
        on.step()
    assert on.block_manager.num_free == on.block_manager.num_blocks


def test_seeded_sampling_is_identical_with_the_cache_on_and_off():
    kw = dict(block_size=4, num_kv_blocks=64, max_num_seqs=4)
    on, off = LLMEngine(Settings(**kw)), LLMEngine(Settings(**kw, enable_prefix_caching=False))
    prompts = [SYSTEM + [i] for i in range(5)]
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=i, max_tokens=10, ignore_eos=True) for i in range(5)]
    got, hits = run(on, prompts, params)
    assert got == run(off, prompts, params)[0] and hits == [0] + [36] * 4


def test_the_cache_is_keyed_by_model_and_can_be_turned_off():
    assert LLMEngine(Settings(enable_prefix_caching=False)).block_manager.prefix_caching is False
    eng = LLMEngine(Settings())
    assert eng.block_manager.prefix_caching and eng.settings.model in eng.block_manager.namespace
    assert "float32" in eng.block_manager.namespace


@pytest.fixture(scope="module")
def tight():
    """A pool of 24 blocks of 4 for up to 5 requests of up to ~60 tokens: preemption and eviction happen."""
    return (LLMEngine(Settings(**{**SPEC, "num_kv_blocks": 24, "max_num_seqs": 5})),
            LLMEngine(Settings(speculative="none")))


request = st.fixed_dictionaries({
    "prefix": st.sampled_from([SYSTEM[:9], SYSTEM[:17], SYSTEM[3:20], []]),
    "tail": st.lists(st.integers(10, 900), min_size=1, max_size=8),
    "max_tokens": st.integers(1, 16),
    "temperature": st.sampled_from([0.0, 0.0, 1.0]),
    "k": st.sampled_from([None, None, 0]),
    "cancel_after": st.one_of(st.none(), st.none(), st.integers(0, 5)),
})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reqs=st.lists(request, min_size=1, max_size=8), waves=st.integers(1, 3))
def test_shared_prefix_mixes_with_speculation_preemption_and_aborts_stay_exact(tight, reqs, waves):
    """Requests from a few shared prefixes arrive in waves on a tiny pool, with speculation, sampling and aborts:
    every greedy request that ran to its length equals its solo run on a plain engine (cache off there), and the
    pool ends with every block free or cached, refcounts right, no drafter state left."""
    eng, plain = tight
    seqs, hits0 = [], eng.block_manager.hits
    per_wave = -(-len(reqs) // waves)
    step = 0
    for w in range(0, len(reqs), per_wave):
        for i, r in enumerate(reqs[w : w + per_wave], start=w):
            p = SamplingParams(temperature=r["temperature"], max_tokens=r["max_tokens"], seed=i, ignore_eos=True,
                               num_speculative_tokens=r["k"])
            seqs.append(eng.add_request(f"pc-{id(reqs)}-{i}", r["prefix"] + r["tail"], p))
        for _ in range(3):  # the wave runs a little before the next arrives
            eng.step()
            step += 1
    drain(eng, reqs, seqs, step)
    bm = eng.block_manager
    assert bm.num_free == bm.num_blocks and not eng.draft_ctx and not eng.seqs
    bm.check()
    for r, s in zip(reqs, seqs):
        assert s.status is SeqStatus.FINISHED
        if r["temperature"] == 0 and s.finish_reason == "length":
            solo = plain.generate([r["prefix"] + r["tail"]], greedy(r["max_tokens"]))[0]
            assert s.output_ids == solo.output_ids
    assert bm.hits >= hits0
