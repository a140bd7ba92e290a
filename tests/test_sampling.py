from collections import Counter

import pytest
import torch
from reference import sample

from dspark.engine.sampling import (
    SamplingParams,
    draw,
    filter_logits,
    index_at,
    make_generator,
    penalize,
    uniforms,
)


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    p = filter_logits(logits, torch.tensor([1.0]), torch.tensor([2]), torch.tensor([1.0]))
    torch.testing.assert_close(p, torch.tensor([[5 / 7, 2 / 7, 0, 0, 0]]))
    p = filter_logits(logits, torch.tensor([1.0]), torch.tensor([0]), torch.tensor([0.8]))  # 0.5+0.2 < 0.8
    torch.testing.assert_close(p, torch.tensor([[0.5, 0.2, 0.15, 0, 0]]) / 0.85)
    p = filter_logits(logits, torch.tensor([1.0]), torch.tensor([0]), torch.tensor([0.5]))
    torch.testing.assert_close(p, torch.tensor([[1.0, 0, 0, 0, 0]]))


def test_greedy_seeded_and_logprobs():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    ps = [SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=1.0, seed=7),
          SamplingParams(temperature=0.7, top_k=5, seed=7)]
    a = sample(logits, ps, [make_generator(p.seed) for p in ps])
    b = sample(logits, ps, [make_generator(p.seed) for p in ps])
    assert a.token_ids == b.token_ids
    assert a.token_ids[0] == int(logits[0].argmax())
    assert a.token_ids[2] in logits[2].topk(5).indices.tolist()
    lp, top = a.logprobs[0]
    assert abs(lp - float(torch.log_softmax(logits[0], -1).max())) < 1e-6 and len(top) == 3
    assert a.logprobs[1] is None


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().expand(4000, 3).clone()
    params = [SamplingParams(temperature=1.0)] * 4000
    g = make_generator(0)
    toks = torch.tensor(sample(logits, params, [g] * 4000).token_ids)
    freq = torch.bincount(toks, minlength=3).float() / 4000
    assert (freq - probs).abs().max() < 0.03


def reference_filter(logits: torch.Tensor, t: float, k: int, p: float, min_p: float = 0.0) -> torch.Tensor:
    """Temperature; min-p (drop tokens below min_p x the largest probability, renormalise); then keep rank r while
    r < k (k > 0) and the tokens ranked above hold < p of the mass."""
    probs = torch.softmax(logits.double() / t, -1)
    probs = torch.where(probs < min_p * probs.max(), 0.0, probs)
    probs = probs / probs.sum()
    order = probs.argsort(descending=True)
    out = torch.zeros_like(probs)
    mass = 0.0
    for rank, i in enumerate(order.tolist()):
        if (k > 0 and rank >= k) or mass >= p:
            break
        out[i] = probs[i]
        mass += float(probs[i])
    return out / out.sum()


SETTINGS = [(t, k, p) for t in (0.3, 0.7, 1.0, 1.5) for k, p in ((0, 1.0), (2, 1.0), (0, 0.8), (3, 0.9), (-1, 0.5))]


def test_filter_logits_applies_each_rows_temperature_top_k_and_top_p():
    """Rows with different settings in one batch, against the plain definition: a filter that ignores the
    temperature, applies one row's setting to another, or cuts top-p one token early or late fails."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(len(SETTINGS), 40, generator=g) * 2
    temps = torch.tensor([t for t, _, _ in SETTINGS])
    ks = torch.tensor([max(k, 0) for _, k, _ in SETTINGS])
    ps = torch.tensor([p for _, _, p in SETTINGS])
    got = filter_logits(logits, temps, ks, ps)
    for row, (t, k, p) in enumerate(SETTINGS):
        torch.testing.assert_close(got[row].double(), reference_filter(logits[row], t, k, p), atol=1e-6, rtol=1e-5,
                                   msg=f"T={t} top_k={k} top_p={p}")
    # all rows with a top-k takes the partial-sort path: same result
    only_k = filter_logits(logits, temps, torch.full_like(ks, 5), ps)
    for row, (t, _, p) in enumerate(SETTINGS):
        torch.testing.assert_close(only_k[row].double(), reference_filter(logits[row], t, 5, p), atol=1e-6, rtol=1e-5)


def test_top_p_looks_for_the_nucleus_among_the_likeliest_tokens_first(monkeypatch):
    """Top-p without top-k over a partial sort of TOP_P_WIDTH tokens (8 of 40 here) gives the definition's result:
    rows whose nucleus fits, rows with no filter beside them (all tokens kept), and a row whose nucleus does not
    fit, which alone is sorted whole."""
    from dspark.engine import sampling

    monkeypatch.setattr(sampling, "TOP_P_WIDTH", 8)
    g = torch.Generator().manual_seed(1)
    peaked = torch.randn(4, 40, generator=g) * 0.3
    peaked[:, :3] += torch.tensor([6.0, 5.0, 4.5])  # nearly all the mass in 3 tokens
    flat = torch.randn(1, 40, generator=g) * 0.3  # its 0.9-nucleus needs far more than 8 tokens
    settings = [(1.0, 0, 0.9), (0.7, 0, 0.5), (1.0, 0, 1.0), (1.3, 6, 0.95)]
    for logits, rows in ((peaked, settings), (torch.cat([peaked, flat]), settings + [(1.0, 0, 0.9)])):
        got = filter_logits(logits, torch.tensor([t for t, _, _ in rows]), torch.tensor([k for _, k, _ in rows]),
                            torch.tensor([p for _, _, p in rows]))
        for row, (t, k, p) in enumerate(rows):
            torch.testing.assert_close(got[row].double(), reference_filter(logits[row], t, k, p), atol=1e-6,
                                       rtol=1e-5, msg=f"T={t} top_k={k} top_p={p}")
    assert (got[2] > 0).all()  # the unfiltered row kept every token


def test_sample_draws_from_the_tempered_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    for t, k in ((0.5, 0), (1.5, 3)):
        n = 6000
        params = [SamplingParams(temperature=t, top_k=k)] * n
        toks = torch.tensor(sample(logits.expand(n, 5).clone(), params, [make_generator(1)] * n).token_ids)
        freq = torch.bincount(toks, minlength=5).double() / n
        assert (freq - reference_filter(logits, t, k, 1.0)).abs().max() < 0.025, (t, k, freq)


def test_draw_never_returns_a_token_without_mass():
    g = make_generator(3)
    probs = torch.tensor([0.0, 0.25, 0.0, 0.75, 0.0])
    seen = {draw(probs, g) for _ in range(2000)}
    assert seen == {1, 3}
    assert draw(torch.tensor([0.0, 0.0, 2.0]), g) == 2  # unnormalised is fine


@pytest.mark.parametrize("field,bad,edge", [("temperature", -0.1, 0.0), ("temperature", 2.01, 2.0),
                                            ("top_p", 0.0, 1.0), ("top_p", 1.01, 1e-3),
                                            ("top_k", -2, -1), ("max_tokens", 0, 1), ("logprobs", -1, 0),
                                            ("logprobs", 6, 5), ("top_logprobs", 21, 20),
                                            ("slo_tokens_per_s", -1.0, 0.0),
                                            ("deadline_s", 0.0, 1e-3), ("presence_penalty", 2.01, -2.0),
                                            ("frequency_penalty", -2.01, 2.0), ("repetition_penalty", 0.0, 10.0),
                                            ("min_p", 1.01, 1.0), ("logit_bias", {"5": 100.5}, {"5": -100.0}),
                                            ("num_speculative_tokens", -1, 0)])
def test_the_boundary_names_the_bad_parameter_and_accepts_the_edge(field, bad, edge):
    """One place validates a request: the API's pydantic models (the engine core trusts what it is given)."""
    from pydantic import ValidationError

    from dspark.server.protocol import ChatCompletionRequest, CompletionRequest

    model = ChatCompletionRequest if field == "top_logprobs" else CompletionRequest
    base = {"model": "m", "messages": [{"role": "user", "content": "x"}]} if model is ChatCompletionRequest else \
        {"model": "m", "prompt": "x"}
    with pytest.raises(ValidationError) as e:
        model(**base, **{field: bad})
    assert e.value.errors()[0]["loc"][0] == field
    model(**base, **{field: edge})


def test_greedy_means_temperature_zero():
    assert SamplingParams(temperature=0).greedy and SamplingParams(temperature=1e-6).greedy
    assert not SamplingParams(temperature=0.01).greedy


def test_index_at_the_cdf_edges():
    probs = torch.tensor([0.0, 0.25, 0.0, 0.25, 0.5, 0.0])
    assert index_at(probs, 0.0) == 1  # u = 0 lands on the first token with mass, not on a leading zero
    assert index_at(probs, 0.2499) == 1 and index_at(probs, 0.25) == 3  # the CDF's right-closed slices
    assert index_at(probs, 1.0) == 4  # u * total on the total (rounding): the last token with mass
    # float64 throughout: a token of mass 1e-9 keeps its slice (a float32 u would round past it)
    assert index_at(torch.tensor([0.3, 1e-9, 0.7 - 1e-9], dtype=torch.float64), 0.3000000005) == 1


def test_draw_is_one_float64_uniform_from_the_requests_generator():
    probs = torch.full((1000,), 1e-3)
    g, twin = make_generator(8), make_generator(8)
    for _ in range(50):
        assert draw(probs, g) == index_at(probs, float(uniforms([twin], [1])[0]))
    assert g.offset == twin.offset == 50


def test_uniforms_are_uniform_counter_based_and_batch_free():
    """A request's numbers depend on its seed and how many it has used, never on who else drew in the call."""
    a, b, c = make_generator(1), make_generator(2**64 - 5), make_generator(7)
    u = uniforms([a, b, c], [3, 0, 200_000])
    assert u.dtype == torch.float64 and [a.offset, b.offset, c.offset] == [3, 0, 200_000]
    assert u[:3].tolist() == uniforms([make_generator(1)], [3]).tolist()
    solo = make_generator(7)
    assert uniforms([solo], [5]).tolist() == u[3:8].tolist()
    assert uniforms([solo], [2]).tolist() == u[8:10].tolist()  # the counter goes on where it stopped
    assert 0 <= float(u.min()) and float(u.max()) < 1
    # 20 equal bins of 200k draws: chi-square with 19 degrees of freedom is < 50 with probability 1 - 1e-4
    counts = torch.histc(u[3:].float(), bins=20, min=0, max=1)
    assert float(((counts - 10_000) ** 2 / 10_000).sum()) < 50
    # consecutive draws uncorrelated, and different seeds give different streams
    x = u[3:]
    assert abs(float(torch.corrcoef(torch.stack([x[:-1], x[1:]]))[0, 1])) < 0.01
    assert uniforms([make_generator(8)], [3]).tolist() != uniforms([make_generator(7)], [3]).tolist()


def test_seeded_sampling_ignores_the_global_rng():
    """A request's seed alone fixes its tokens: other requests and torch's global RNG must not move them."""
    logits = torch.randn(64, 30, generator=torch.Generator().manual_seed(5))
    params = [SamplingParams(temperature=1.0, top_p=0.95, seed=s) for s in range(64)]
    runs = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        runs.append(sample(logits, params, [make_generator(p.seed) for p in params]).token_ids)
    assert runs[0] == runs[1]
    other = sample(logits, params, [make_generator(p.seed + 1000) for p in params]).token_ids
    assert other != runs[0]
    unseeded = {make_generator(None).initial_seed() for _ in range(64)}
    assert len(unseeded) == 64  # unseeded requests get their own streams (62-bit random seeds)


def test_top_k_one_alone_is_the_argmax():
    logits = torch.randn(8, 30, generator=torch.Generator().manual_seed(6))
    probs = filter_logits(logits, torch.full((8,), 1.3), torch.ones(8, dtype=torch.long), torch.ones(8))
    assert probs.argmax(-1).tolist() == logits.argmax(-1).tolist() and bool((probs.max(-1).values == 1).all())


def test_logprobs_report_the_chosen_token_and_the_top_alternatives():
    logits = torch.randn(2, 100, generator=torch.Generator().manual_seed(7))  # fewer rows than the vocabulary
    res = sample(logits, [SamplingParams(temperature=0, logprobs=2), SamplingParams(temperature=0, logprobs=0)],
                 [make_generator(0)] * 2)
    assert len(res.logprobs) == len(res.token_ids) == 2
    logp = torch.log_softmax(logits, -1)
    top = logp[0].topk(2)
    assert res.logprobs[0][1] == list(zip(top.indices.tolist(), top.values.tolist()))
    assert res.logprobs[1] == (pytest.approx(float(logp[1].max())), [])
    only_zero = sample(logits[:1], [SamplingParams(temperature=0, logprobs=0)], [make_generator(0)])
    assert only_zero.logprobs[0][1] == []


def reference_penalized(logits: torch.Tensor, sp: SamplingParams, prompt: list[int], generated: list[int]):
    """One row, token by token: logit_bias, then repetition (prompt and generated tokens), then frequency and
    presence (generated tokens)."""
    out = logits.double().clone()
    for t, b in sp.logit_bias.items():
        out[t] += b
    for t in set(prompt) | set(generated):
        out[t] = out[t] / sp.repetition_penalty if out[t] > 0 else out[t] * sp.repetition_penalty
    for t, c in Counter(generated).items():
        out[t] -= sp.frequency_penalty * c + sp.presence_penalty
    return out


@pytest.mark.parametrize("sp", [
    SamplingParams(frequency_penalty=0.7), SamplingParams(presence_penalty=-1.2),
    SamplingParams(repetition_penalty=1.4), SamplingParams(repetition_penalty=0.8, logit_bias={3: 5.0, 7: -100.0}),
    SamplingParams(frequency_penalty=1.0, presence_penalty=0.5, repetition_penalty=1.2, logit_bias={0: 2.0})])
def test_penalties_match_the_definition_row_by_row_with_the_draft_counted(sp):
    """Row j of a drafting request scores the token after output + draft[:j]: its penalties count those."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 30, generator=g) * 3
    prompt, output, draft = [1, 2, 2, 9], [4, 4, 5, 9, 3], [5, 6, 4]
    got = penalize(logits, sp, prompt, output, draft)
    for j in range(4):
        torch.testing.assert_close(got[j].double(), reference_penalized(logits[j], sp, prompt, output + draft[:j]))
    assert sp.penalized and not SamplingParams(min_p=0.2).penalized
    torch.testing.assert_close(penalize(logits[:1], sp, [], []),
                               reference_penalized(logits[0], sp, [], [])[None].float())  # nothing generated yet


def test_min_p_drops_tokens_below_its_share_of_the_top_one():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.12, 0.05, 0.03], [0.2, 0.2, 0.2, 0.2, 0.2]]))
    got = filter_logits(logits, torch.ones(2), torch.zeros(2, dtype=torch.long), torch.ones(2),
                        torch.tensor([0.2, 0.9]))  # row 0 keeps p >= 0.1; row 1 keeps all (equal)
    torch.testing.assert_close(got, torch.tensor([[0.5, 0.3, 0.12, 0, 0], [0.2] * 5]) / torch.tensor([[0.92], [1.0]]))
    for t, k, p, m in [(0.7, 0, 1.0, 0.1), (1.3, 3, 0.9, 0.05), (1.0, 0, 0.6, 0.3)]:
        row = torch.randn(40, generator=torch.Generator().manual_seed(2)) * 2
        got = filter_logits(row[None], torch.tensor([t]), torch.tensor([k]), torch.tensor([p]), torch.tensor([m]))
        torch.testing.assert_close(got[0].double(), reference_filter(row, t, k, p, m))


def test_a_request_can_opt_out_of_speculation():
    """`"speculative": false` in the body is `num_speculative_tokens: 0`: that request never drafts."""
    from dspark.server.app import _sampling_params
    from dspark.server.protocol import CompletionRequest

    def k(**body):
        return _sampling_params(CompletionRequest(model="m", prompt="x", **body), 16, None, 4).num_speculative_tokens

    assert k(speculative=False) == 0 and k(speculative=False, num_speculative_tokens=5) == 0
    assert k() is None and k(speculative=True) is None and k(speculative=True, num_speculative_tokens=3) == 3
