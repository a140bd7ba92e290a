"""LLMEngine on the embedded model: continuous batching, chunked prefill, preemption, stops, seeds."""

import pytest
import torch

from dspark.engine.llm_engine import LLMEngine
from dspark.engine.sampling import SamplingParams
from dspark.engine.settings import Settings
from dspark.server.outputs import RequestState

PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n\n", "class Stack:\n    def push(self, item):",
           "The answer is", "for i in range(10):\n   ", "x", "# Parse the command line\nimport argparse\n",
           "def read_config(path):\n    \"\"\"Read a configuration file.\"\"\"\n"]


def make_engine(model_dir, **kw) -> LLMEngine:
    return LLMEngine(Settings(model=str(model_dir), **kw))


@pytest.fixture(scope="module")
def engine(model_dir):
    return make_engine(model_dir, max_num_batched_tokens=64, block_size=8, num_kv_blocks=256)


@pytest.fixture(scope="module")
def solo(engine):
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    return [engine.generate([engine.tokenizer.encode(p)], greedy)[0].output_ids for p in PROMPTS]


def test_batched_greedy_equals_solo(engine, solo):
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    free0 = engine.block_manager.num_free
    seqs = engine.generate([engine.tokenizer.encode(p) for p in PROMPTS], greedy)
    assert [s.output_ids for s in seqs] == solo
    assert engine.block_manager.num_free == free0
    engine.block_manager.check()


def test_requests_joining_mid_flight_keep_their_outputs(engine, solo):
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    seqs = [engine.add_request("late-0", engine.tokenizer.encode(PROMPTS[0]), greedy)]
    for i in range(1, len(PROMPTS)):  # one new request joins every step
        engine.step()
        seqs.append(engine.add_request(f"late-{i}", engine.tokenizer.encode(PROMPTS[i]), greedy))
    while engine.has_unfinished():
        engine.step()
    assert [s.output_ids for s in seqs] == solo


def test_preemption_under_a_tiny_kv_pool(model_dir, solo):
    eng = make_engine(model_dir, max_num_batched_tokens=64, block_size=4, num_kv_blocks=24)
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    seqs = eng.generate([eng.tokenizer.encode(p) for p in PROMPTS], greedy)
    assert eng.scheduler.num_preemptions > 0
    assert [s.output_ids for s in seqs] == solo
    assert eng.block_manager.num_free == 24
    eng.block_manager.check()


def front_end_text(engine, ids: list[int], params: SamplingParams) -> tuple[RequestState, str]:
    """A request run as the server runs it: the core's token-id outputs through the front end's RequestState
    (text, stop strings); a stop string ends it there and the front end aborts it in the core."""
    state, text = RequestState(engine.tokenizer, "fe", ids, params), ""
    engine.add_request("fe", ids, params)
    while not state.finished:
        for out in engine.step():
            if out.request_id == "fe":
                text += state.process(out).text
    engine.abort_request("fe")
    return state, text


def test_stop_string_and_stop_token(engine, solo):
    tok = engine.tokenizer
    ids = tok.encode(PROMPTS[0])
    _, full = front_end_text(engine, ids, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    assert full == tok.decode(solo[0][:24])
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), f"degenerate output {full!r}"
    state, text = front_end_text(engine, ids, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                             stop=[stop]))
    assert state.finish_reason == "stop" and text == full[: full.index(stop)] and state.num_output < 24
    assert not engine.seqs and engine.block_manager.num_free == engine.block_manager.num_blocks
    s = engine.generate([ids], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                              stop_token_ids=[solo[0][3]]))[0]
    assert s.finish_reason == "stop" and s.output_ids == solo[0][: solo[0].index(solo[0][3]) + 1]
    s = engine.generate([ids], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert s.finish_reason == "length" and s.num_output == 5


def test_seeded_sampling_is_reproducible_in_any_batch(engine):
    tok = engine.tokenizer
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = engine.generate([tok.encode(PROMPTS[1])], p)[0].output_ids
    other = SamplingParams(temperature=0.8, max_tokens=16, ignore_eos=True)
    mixed = engine.generate([tok.encode(x) for x in PROMPTS[:3]], [other, p, other])[1].output_ids
    assert alone == mixed
    assert engine.generate([tok.encode(PROMPTS[1])], SamplingParams(temperature=1.0, seed=99, max_tokens=16,
                                                                   ignore_eos=True))[0].output_ids != alone


def test_abort_frees_blocks_and_bad_requests_are_refused(engine):
    free0 = engine.block_manager.num_free
    engine.add_request("to-abort", engine.tokenizer.encode(PROMPTS[2]), SamplingParams(max_tokens=50))
    engine.step()
    engine.step()
    assert engine.block_manager.num_free < free0
    engine.abort_request("to-abort")
    assert engine.block_manager.num_free == free0 and not engine.has_unfinished()
    with pytest.raises(ValueError, match="context length"):
        engine.add_request("big", [1] * 10, SamplingParams(max_tokens=10**6))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("empty", [], SamplingParams())


def test_top_k_1_equals_greedy(engine, solo):
    p = SamplingParams(temperature=0.9, top_k=1, max_tokens=24, ignore_eos=True)
    assert engine.generate([engine.tokenizer.encode(PROMPTS[3])], p)[0].output_ids == solo[3]


def test_logits_are_not_degenerate(engine):
    """Guard for the tests above: the model must produce varied tokens, or equality checks are vacuous."""
    with torch.inference_mode():
        h, _ = engine.model(torch.tensor([engine.tokenizer.encode(PROMPTS[0] + " " + PROMPTS[2])]))
        top = engine.model.logits(h)[0].argmax(-1)
    assert len(set(top.tolist())) > 3


def test_long_prompt_spanning_several_chunk_only_steps(model_dir):
    """A prompt longer than the token budget runs steps that sample nothing; they must not fail."""
    eng = make_engine(model_dir, max_num_batched_tokens=32, block_size=8, num_kv_blocks=128)
    ids = eng.tokenizer.encode("def f(x):\n    return x\n" * 20)
    assert len(ids) > 3 * 32
    s = eng.generate([ids], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    ref = make_engine(model_dir, block_size=8, num_kv_blocks=128).generate(
        [ids], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    assert s.output_ids == ref.output_ids


def test_incomplete_character_is_flushed_at_the_end(engine):
    from dspark.engine.tokenizer import IncrementalDetokenizer

    tok = engine.tokenizer
    ids = tok.encode("a ✓")
    det = IncrementalDetokenizer(tok, [])
    pieces = [det.add(t) for t in ids]
    assert "".join(pieces) + det.flush() == "a ✓"
    det = IncrementalDetokenizer(tok, [])
    assert len(tok.decode(ids[-1:])) == 1 and "✓" not in tok.decode(ids[:-1])  # the last byte completes it
    out = "".join(det.add(t) for t in ids[:-1])  # stop inside the character
    assert out == "a " and "\ufffd" not in out  # the incomplete character is held back
    assert det.flush() != ""  # ... and not lost at the end


TEXTS = ["Hello, streaming world! ✓ naïve 日本語 🎉🎉 x\n\tdef f(a, b):\n        return a  -> b",
         " leading space, 'quotes', and ümlauts…"]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("broken", [False, True])
def test_incremental_text_equals_the_whole_decode(engine, text, broken):
    """Token by token, after a prompt (whose last tokens prime the decoder), the deltas add up to the text the
    whole sequence decodes to, leading spaces included; no delta carries a replacement character."""
    from dspark.engine.tokenizer import IncrementalDetokenizer

    tok = engine.tokenizer
    prompt, ids = tok.encode("Say it:"), tok.encode(text)
    det = IncrementalDetokenizer(tok, prompt)
    if broken:  # the streaming decoder fails at the third token: window decoding takes over from there
        stream, calls = det.stream, []

        class Flaky:
            def step(self, tk, t):
                calls.append(t)
                if len(calls) == 3:
                    raise RuntimeError("invalid prefix")
                return stream.step(tk, t)

        det.stream = Flaky()
    pieces = [det.add(t) for t in ids]
    assert not any("\ufffd" in p for p in pieces)
    want = tok.decode(prompt + ids)[len(tok.decode(prompt)) :]
    assert "".join(pieces) + det.flush() == want
    assert (det.stream is None) == broken
