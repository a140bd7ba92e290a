"""Property tests: random mixes of requests thrown at the engine directly (hypothesis).

Lengths, sampling parameters, stop strings, per-request draft caps and cancellations vary; the KV pool is small,
so preemption and recompute happen. Invariants: every request finishes or is cancelled; the KV pool and the
drafter's state return to empty with no block owned twice; greedy requests that ran to their length (no stop,
not cancelled) equal their solo runs on a plain engine.
"""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dspark.engine.llm_engine import LLMEngine
from dspark.engine.sampling import SamplingParams
from dspark.engine.settings import Settings
from dspark.scheduler.sequence import SeqStatus

VOCAB = 8192


@pytest.fixture(scope="module")
def engines():
    spec = LLMEngine(Settings(speculative="dspark", draft_policy="fixed", draft_len=3, num_kv_blocks=40,
                              block_size=4, max_num_seqs=6, max_num_batched_tokens=64))
    plain = LLMEngine(Settings(speculative="none"))
    return spec, plain


request = st.fixed_dictionaries({
    "prompt": st.lists(st.integers(10, VOCAB - 1), min_size=1, max_size=40),
    "max_tokens": st.integers(1, 24),
    "temperature": st.sampled_from([0.0, 0.0, 0.7, 1.0]),
    "top_k": st.sampled_from([0, 5]),
    "top_p": st.sampled_from([1.0, 0.9]),
    "stop": st.sampled_from([[], ["\n"], ["def", ")"]]),
    "k": st.sampled_from([None, 0, 1]),
    "cancel_after": st.one_of(st.none(), st.integers(0, 6)),
})


def drain(eng: LLMEngine, reqs: list[dict], seqs: list, step: int = 0) -> None:
    """Step until every request is done, aborting each at its `cancel_after` step (counted from `step`)."""
    while eng.has_unfinished():
        for r, s in zip(reqs, seqs):
            if r["cancel_after"] == step and not s.finished:
                eng.abort_request(s.request_id)
        eng.step()
        step += 1
        assert step < 2000, "engine made no progress"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reqs=st.lists(request, min_size=1, max_size=10))
def test_random_request_mixes_keep_the_invariants(engines, reqs):
    eng, plain = engines
    seqs = []
    for i, r in enumerate(reqs):
        p = SamplingParams(temperature=r["temperature"], top_k=r["top_k"], top_p=r["top_p"], stop=r["stop"],
                           max_tokens=r["max_tokens"], num_speculative_tokens=r["k"], seed=i, ignore_eos=True)
        seqs.append(eng.add_request(f"prop-{id(reqs)}-{i}", r["prompt"], p))
    drain(eng, reqs, seqs)
    for r, s in zip(reqs, seqs):
        assert s.status is SeqStatus.FINISHED and s.finish_reason in ("stop", "length", "abort")
        assert s.num_output <= r["max_tokens"]
        if s.finish_reason == "length":
            assert s.num_output == r["max_tokens"]
    bm = eng.block_manager
    assert bm.num_free == bm.num_blocks and not eng.draft_ctx and not eng.seqs
    bm.check()
    for r, s in zip(reqs, seqs):
        if r["temperature"] == 0 and s.finish_reason == "length" and not r["stop"]:
            solo = plain.generate([r["prompt"]], SamplingParams(temperature=0, max_tokens=r["max_tokens"],
                                                                ignore_eos=True))[0]
            assert s.output_ids == solo.output_ids
