"""The reduced draft vocabulary (FR-Spec): the whole vocabulary as a subset drafts exactly as without one, a subset
drafts only its tokens with q zero elsewhere, the ranking and its loading, and greedy output unchanged."""

import pytest
import torch

from dspark.engine.drafters.vocab import DraftVocab, save_ranking, token_ranking
from dspark.engine.llm_engine import LLMEngine
from dspark.engine.sampling import SamplingParams, make_generator
from dspark.engine.settings import Settings


def test_ranking_counts_answers_only(tmp_path):
    data = [{"ids": [9, 9, 9, 1, 2, 2, 3], "prompt_len": 3}, {"ids": [5, 3, 2], "prompt_len": 1}]
    ranking = token_ranking(data)
    assert ranking.tolist() == [2, 3, 1]  # 2 thrice, 3 twice, 1 once; the prompts' 9 and 5 are not counted
    save_ranking(tmp_path, ranking)
    v = DraftVocab.load(tmp_path, 2, 100, always=[7])
    assert v.ids.tolist() == [2, 3, 7]  # the top 2 plus end of sequence, sorted
    assert DraftVocab.load(tmp_path, 0, 100, [7]) is None  # 0: the whole vocabulary
    assert DraftVocab.load(tmp_path, 100, 100, [7]) is None
    assert DraftVocab.load(tmp_path / "none", 2, 100, [7]) is None  # no ranking beside the drafter


@pytest.fixture(scope="module")
def eng():
    return LLMEngine(Settings(speculative="dspark", draft_policy="fixed"))


def propose(eng, temperature: float):
    ctx = eng._scratch_context(40)
    r = 4
    return eng.drafter.propose(eng.model.model.embed_tokens, eng.model.lm_head, [5, 17, 200, 31], [ctx] * r,
                               [7] * r, [SamplingParams(temperature=temperature)] * r,
                               [make_generator(i) for i in range(r)], 0.0)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_whole_vocabulary_as_subset_drafts_the_same(eng, temperature):
    plain = propose(eng, temperature)
    eng.drafter.vocab = DraftVocab(torch.arange(eng.model_config.vocab_size), eng.model_config.vocab_size)
    try:
        sub = propose(eng, temperature)
    finally:
        eng.drafter.vocab = None
    for a, b in zip(plain, sub):
        assert a.tokens == b.tokens
        if temperature:
            torch.testing.assert_close(a.q, b.q)


def test_subset_drafts_only_its_tokens(eng):
    v = eng.model_config.vocab_size
    ids = torch.randperm(v, generator=torch.Generator().manual_seed(0))[: v // 8]
    eng.drafter.vocab = DraftVocab(ids, v)
    try:
        drafts = propose(eng, 0.0) + propose(eng, 1.0)
    finally:
        eng.drafter.vocab = None
    allowed = set(ids.tolist())
    assert all(t in allowed for d in drafts for t in d.tokens)
    outside = torch.ones(v, dtype=torch.bool)
    outside[ids] = False
    for d in drafts[4:]:
        assert float(d.q[:, outside].abs().max()) == 0.0
        torch.testing.assert_close(d.q.sum(-1), torch.ones(len(d.tokens)), atol=1e-5, rtol=0)


def test_greedy_output_unchanged(eng):
    plain = LLMEngine(Settings(speculative="none"))
    prompts = [eng.tokenizer.encode(p) for p in ["def main():\n    ", "The answer is", "x = ["]]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    want = [s.output_ids for s in plain.generate(prompts, params)]
    v = eng.model_config.vocab_size
    eng.drafter.vocab = DraftVocab(torch.arange(0, v, 3), v)
    try:
        got = [s.output_ids for s in eng.generate(prompts, params)]
    finally:
        eng.drafter.vocab = None
    assert got == want


def test_grammar_with_a_subset(eng):
    """Structured output drafting from a subset: the grammar's mask is read at the subset's tokens; output equals
    decoding without speculation, and drafts inside the grammar are accepted."""
    plain = LLMEngine(Settings(speculative="none"))
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "b": {"enum": ["yes", "no"]}},
              "required": ["a", "b"], "additionalProperties": False}
    prompts = [eng.tokenizer.encode(p) for p in ["Return JSON: ", "data = "]]

    def params(e):
        g = e.grammars.grammar({"type": "json_schema", "json_schema": {"schema": schema}})
        return [SamplingParams(temperature=0, max_tokens=40, grammar=g) for _ in prompts]

    want = [s.output_ids for s in plain.generate(prompts, params(plain))]
    v = eng.model_config.vocab_size
    text = {t for p in ['{"a": 12, "b": "yes"}', '{"a":7,"b":"no"}'] for t in eng.tokenizer.encode(p)}
    eng.drafter.vocab = DraftVocab(torch.tensor(sorted(text | set(range(0, v, 2)))), v)
    accepted = eng.stats["accepted_tokens"]
    try:
        got = [s.output_ids for s in eng.generate(prompts, params(eng))]
    finally:
        eng.drafter.vocab = None
    assert got == want
    assert eng.stats["accepted_tokens"] > accepted
