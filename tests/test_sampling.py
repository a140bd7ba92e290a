import torch

from engine.sampling import SamplingParams, filter_logits, make_generator, sample


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
