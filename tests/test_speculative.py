"""Speculative decoding with the shipped drafters: output identical to the target's, sampling lossless."""

import random

import pytest
import torch
from conftest import TEST_MODEL, cheap_drafting

from dspark.engine.llm_engine import LLMEngine
from dspark.engine.sampling import SamplingParams, make_generator
from dspark.engine.settings import Settings
from dspark.engine.training.corpus import math_problem

METHODS = ("dspark", "dflash", "eagle3")


def test_drafters_are_shipped_within_the_size_budget():
    for m in METHODS:
        assert (TEST_MODEL / "drafters" / m / "model.safetensors").exists(), m
    total = sum(f.stat().st_size for f in TEST_MODEL.rglob("*") if f.is_file())
    assert total <= 30 * 2**20, f"model + tokenizer + drafters = {total / 2**20:.1f} MiB > 30 MiB"


def test_drafter_for_another_target_is_refused(tmp_path):
    import json
    import shutil

    shutil.copytree(TEST_MODEL / "drafters" / "dspark", tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    cfg["target_fingerprint"] = "0" * 16
    (tmp_path / "d" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="trained for target"):
        LLMEngine(Settings(speculative="dspark", drafter=str(tmp_path / "d")))


def prompts(tok, n=60):
    rng = random.Random(0)
    code = ["def parse(", "import os\n\n\ndef main():\n", "class Node:\n    def __init__(self", "for line in f:\n",
            "    if not isinstance(value, str):\n", "def read(path):\n    \"\"\"Read a file.\"\"\"\n"]
    out = []
    for i in range(n):
        if i % 3 == 0:
            out.append(tok.encode(code[i % len(code)] + " " * (i % 3)))
        elif i % 3 == 1:
            out.append(tok.encode_chat([{"role": "user", "content": math_problem(rng)[0]}]))
        else:
            topic = rng.choice(["lists", "the with statement", "classes", "exceptions", "imports"])
            out.append(tok.encode_chat([{"role": "user", "content": f"Explain {topic} in Python."}]))
    return out


@pytest.fixture(scope="module")
def base():
    return LLMEngine(Settings(max_num_seqs=128, block_size=8))


@pytest.fixture(scope="module")
def reference(base):
    ps = prompts(base.tokenizer)
    seqs = base.generate(ps, SamplingParams(temperature=0, max_tokens=24))
    return ps, [s.output_ids for s in seqs]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("draft_len", [1, 3, 7])
def test_greedy_identical_to_target(method, draft_len, reference):
    ps, ref = reference
    eng = LLMEngine(Settings(max_num_seqs=128, block_size=8, speculative=method, draft_len=draft_len,
                             draft_policy="fixed"))
    seqs = eng.generate(ps, SamplingParams(temperature=0, max_tokens=24))
    assert [s.output_ids for s in seqs] == ref
    assert eng.stats["accepted_tokens"] > 0.2 * eng.stats["draft_rounds"]  # the drafter does real work
    assert eng.block_manager.num_free == eng.block_manager.num_blocks and not eng.draft_ctx
    eng.block_manager.check()


@pytest.mark.parametrize("method", METHODS)
def test_mixed_batch_speculating_plain_greedy_sampled(method, reference):
    """Greedy requests with and without speculation share a batch with sampled ones; greedy stays exact."""
    ps, ref = reference
    eng = LLMEngine(Settings(max_num_seqs=128, block_size=4, num_kv_blocks=600, speculative=method,
                             confidence_threshold=0.3, draft_policy="fixed"))
    params = []
    for i in range(len(ps)):
        if i % 4 == 3:
            params.append(SamplingParams(temperature=1.0, top_p=0.9, seed=i, max_tokens=24))
        else:
            k = 0 if i % 4 == 1 else None
            params.append(SamplingParams(temperature=0, max_tokens=24, num_speculative_tokens=k))
    seqs = eng.generate(ps, params)
    for i, s in enumerate(seqs):
        if i % 4 != 3:
            assert s.output_ids == ref[i], i
    assert eng.stats["accepted_tokens"] > 0.2 * eng.stats["draft_rounds"] > 0  # drafts were verified and kept
    assert eng.block_manager.num_free == 600
    eng.block_manager.check()


@pytest.mark.parametrize("method", ["dspark", "eagle3"])
def test_adaptive_policy_greedy_identical(method, reference):
    """The scheduler's per-request lengths (varying with confidence and load) keep greedy output exact."""
    ps, ref = reference
    eng = LLMEngine(Settings(max_num_seqs=128, block_size=8, speculative=method))
    cheap_drafting(eng)
    seqs = eng.generate(ps, SamplingParams(temperature=0, max_tokens=24))
    assert [s.output_ids for s in seqs] == ref
    assert 0 < eng.stats["verified_tokens"] < eng.stats["draft_tokens"]
    assert eng.block_manager.num_free == eng.block_manager.num_blocks
    eng.block_manager.check()


def test_factored_markov_head_goes_through_the_targets_embedding_and_lm_head(base, tmp_path):
    """bias(prev) = W_lm B A E[prev]: only A and B are stored (no vocabulary-sized tensor), the save/load round
    trip keeps it, and a greedy draft is argmax(base + bias) over the whole vocabulary."""
    from dspark.engine.drafters import DrafterConfig, build_drafter, load_drafter, save_drafter, target_fingerprint
    from dspark.engine.drafters.vocab import DraftVocab

    model = base.model
    cfg = DrafterConfig(method="dspark", target_layer_ids=[0, 1], num_layers=1, intermediate_size=64,
                        markov_rank=8, markov_factored=True, confidence_head=True,
                        target_fingerprint=target_fingerprint(model))
    drafter = build_drafter(cfg, model)
    torch.nn.init.normal_(drafter.markov_b.weight, std=0.05)
    vocab, d = model.config.vocab_size, model.config.hidden_size
    assert all(vocab not in p.shape for p in drafter.state_dict().values())
    assert drafter.layers[0].mlp.gate_proj.weight.shape == (64, d)
    prev = torch.randint(0, vocab, (50,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        emb, lm = model.model.embed_tokens.weight, model.lm_head.weight
        want = (emb[prev] @ drafter.markov_a.weight.T @ drafter.markov_b.weight.T) @ lm.T
        torch.testing.assert_close(drafter.markov_bias(prev), want, atol=1e-4, rtol=1e-4)
    # training builds only the rows it needs (the codes of prev, the out table over the drafted tokens): the same
    # bias and confidence as the inference tables, and the gradient reaches A and B
    sub = DraftVocab(torch.randperm(vocab, generator=torch.Generator().manual_seed(3))[:40], vocab)
    torch.testing.assert_close(drafter.markov_bias(prev), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(drafter.markov_bias(prev, sub), want[:, sub.ids], atol=1e-4, rtol=1e-4)
    h = torch.randn(50, d, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        conf = drafter.confidence_logit(h, prev)
    trained = drafter.confidence_logit(h, prev)
    torch.testing.assert_close(trained, conf, atol=1e-4, rtol=1e-4)
    (drafter.markov_bias(prev, sub).square().sum() + trained.sum()).backward()
    assert drafter.markov_a.weight.grad.abs().sum() > 0 and drafter.markov_b.weight.grad.abs().sum() > 0
    with torch.inference_mode():
        save_drafter(drafter, tmp_path / "d")
        again = load_drafter(tmp_path / "d", model)
        torch.testing.assert_close(again.markov_bias(prev), drafter.markov_bias(prev).bfloat16().float(),
                                   atol=2e-2, rtol=2e-2)  # saved in bf16
        taps = torch.randn(12, 2 * d, generator=torch.Generator().manual_seed(2))
        ctx = again.extend_context(None, taps, 0, [0] * 12)
        anchor = int(prev[0])
        [got] = again.propose(model.model.embed_tokens, model.lm_head, [anchor], [ctx], [1],
                              [SamplingParams(temperature=0)], [make_generator(0)])
        emb = again.mask_embedding.expand(1, cfg.block_size, -1).clone()
        emb[:, 0] = model.model.embed_tokens.weight[anchor]
        pos = torch.arange(12, 12 + cfg.block_size)[None]
        mask = torch.ones(1, 1, cfg.block_size, 12 + cfg.block_size, dtype=torch.bool)
        h = again.block_hidden(emb, pos, [(k[None], v[None]) for k, v in ctx[0]], mask)[0, 0]
        assert got.tokens == [int((model.lm_head(h).float() + again.markov_bias(prev[:1])[0].float()).argmax())]


@pytest.mark.parametrize("method", ["dspark", "dflash", "eagle3"])
def test_batched_propose_equals_each_request_alone(base, method):
    """One drafting round for a batch (contexts of different lengths, greedy and sampled requests with their own
    temperature / top-k / top-p and seeds, different draft lengths, a confidence cut) drafts exactly what each
    request drafts alone: padding, per-row filters and per-request uniforms do not leak across rows."""
    from dspark.engine.drafters import load_drafter

    model = base.model
    drafter = load_drafter(TEST_MODEL / "drafters" / method, model)
    width = len(drafter.cfg.target_layer_ids) * model.config.hidden_size
    g = torch.Generator().manual_seed(3)
    lens, ks = [5, 17, 9, 30, 12, 3], [7, 3, 5, 7, 1, 6]
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=1),
              SamplingParams(temperature=0.7, top_k=5, seed=2), SamplingParams(temperature=0),
              SamplingParams(temperature=1.3, top_p=0.8, seed=4), SamplingParams(temperature=0.5, top_k=3, seed=5)]
    ctx = [drafter.extend_context(None, torch.randn(n, width, generator=g), 0,
                                  torch.randint(0, 500, (n,), generator=g).tolist()) for n in lens]
    anchors = torch.randint(0, 500, (len(lens),), generator=g).tolist()
    threshold = 0.3 if drafter.cfg.confidence_head else 0.0

    def run(rows):
        return drafter.propose(model.model.embed_tokens, model.lm_head, [anchors[r] for r in rows],
                               [ctx[r] for r in rows], [ks[r] for r in rows], [params[r] for r in rows],
                               [make_generator(params[r].seed) for r in rows], threshold)

    batch = run(range(len(lens)))
    for r, got in enumerate(batch):
        [alone] = run([r])
        assert got.tokens == alone.tokens and len(got.tokens) <= ks[r]
        assert got.confidence == pytest.approx(alone.confidence, abs=1e-5)
        if params[r].greedy or not got.tokens:
            assert got.q is None
        else:
            assert got.q.shape == (len(got.tokens), model.config.vocab_size)
            torch.testing.assert_close(got.q, alone.q, atol=1e-5, rtol=1e-4)
            assert all(got.q[j, t] > 0 for j, t in enumerate(got.tokens))  # drawn from q
    assert sum(len(d.tokens) for d in batch) > len(batch)  # it drafted
