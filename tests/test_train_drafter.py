"""Drafter training: deterministic under a seed, and a stopped run resumes exactly where it left off."""

import pytest
from conftest import TEST_MODEL
from safetensors.torch import load_file

from dspark.engine.drafters import load_drafter
from dspark.engine.model import load_model
from dspark.engine.training.train_drafter import generate_data, train_drafter


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    import torch

    path = tmp_path_factory.mktemp("data") / "data.pt"
    torch.save(generate_data(str(TEST_MODEL), n=12, max_new=32, seed=0), path)
    return str(path)


@pytest.mark.parametrize("method,draft_vocab", [("dspark", 0), ("eagle3", 0), ("dspark", 300), ("eagle3", 300)])
def test_deterministic_and_resumable(method, draft_vocab, data_cache, tmp_path):
    """Same seed, same weights; training moves them; a stopped run resumes at its step with its data position,
    optimizer and schedule, so it ends where the uninterrupted run did (a fresh run would too, so the resumed
    run's own first step and batches are asserted, not only its result)."""
    import json

    import torch

    kw = dict(method=method, steps=4, batch=2, anchors=4, data_cache=data_cache, seed=3, log_every=1,
              draft_vocab_size=draft_vocab)
    assert train_drafter(str(TEST_MODEL), str(tmp_path / "a"), **kw)["first_step_this_run"] == 0
    train_drafter(str(TEST_MODEL), str(tmp_path / "b"), **kw)
    assert train_drafter(str(TEST_MODEL), str(tmp_path / "c"), stop_after=2, **kw) is None
    ckpt = torch.load(tmp_path / "c" / "train_state.pt")
    assert ckpt["step"] == 2 and [e["step"] for e in ckpt["log"]] == [0, 1]
    resumed = train_drafter(str(TEST_MODEL), str(tmp_path / "c"), **kw)
    assert resumed["first_step_this_run"] == 2, "did not resume from the checkpoint"
    assert not (tmp_path / "c" / "train_state.pt").exists()
    logs = [json.loads((tmp_path / x / "training_log.json").read_text()) for x in "ac"]
    assert [(e["step"], e["rows"]) for e in logs[1]] == [(e["step"], e["rows"]) for e in logs[0]], "data position"
    a, b, c = (load_file(str(tmp_path / x / "model.safetensors")) for x in "abc")
    for k in a:
        assert a[k].equal(b[k]), f"not deterministic: {k}"
        assert a[k].equal(c[k]), f"resume diverged: {k}"
    # the two steps after the checkpoint moved every trained weight (saved in bf16: compare at that precision)
    at_ckpt = {k: v.to(a[k].dtype) for k, v in ckpt["drafter"].items() if k in a}
    moved = [k for k in at_ckpt if a[k].is_floating_point() and not a[k].equal(at_ckpt[k])]
    trained = [k for k in at_ckpt if a[k].is_floating_point() and "conf_temperature" not in k]
    assert len(moved) >= 0.9 * len(trained), f"weights did not move: {sorted(set(trained) - set(moved))}"
    d = load_drafter(tmp_path / "a", load_model(TEST_MODEL))
    assert d.cfg.method == method and d.cfg.training["steps"] == 4
    assert d.cfg.training["draft_vocab_size"] == draft_vocab


@pytest.mark.parametrize("method", ["dspark", "eagle3"])
def test_reduced_vocabulary_loss(method, data_cache, monkeypatch):
    """The draft-vocabulary loss over all V tokens is the full-vocabulary loss (the precomputed logsumexp and
    argmax stand in exactly for the V-wide softmax), and over a subset it is the loss of a drafter whose other
    logits are -inf: the same CE on labels inside it, the L1 plus the target's mass outside it."""
    import torch

    import dspark.engine.training.train_drafter as td
    from dspark.engine.drafters import DrafterConfig, build_drafter
    from dspark.engine.drafters.vocab import DraftVocab, token_ranking
    from dspark.engine.training.train_drafter import drafter_loss, eagle3_loss, make_batch, sample_anchors

    torch.manual_seed(0)
    target = load_model(TEST_MODEL)
    data = torch.load(data_cache)[:3]
    layers = [0, 1]
    feats = td.target_features(target, data, layers, 0)
    stats = td.target_stats(target, feats, amp=False)
    ids, gm, taps, final, lse, amax = make_batch(data, 0, [(*f, *s) for f, s in zip(feats, stats)])
    taps, final = taps.float(), final.float()
    v = target.config.vocab_size
    cfg = DrafterConfig(method=method, target_layer_ids=layers, block_size=3, num_layers=1,
                        markov_rank=8 if method == "dspark" else 0, confidence_head=method == "dspark")
    drafter = build_drafter(cfg, target)
    with torch.no_grad():  # a trained-looking Markov head (it starts at zero)
        for name, p in drafter.named_parameters():
            if "markov_out" in name:
                p.normal_(std=0.05)
    anc, valid = sample_anchors(gm, 4, torch.Generator().manual_seed(0))

    def loss(vocab):
        if method == "eagle3":
            return eagle3_loss(drafter, target, ids, gm, taps, final, max_slots=10**6, vocab=vocab, lse=lse,
                               amax=amax)
        return drafter_loss(drafter, target, ids, gm, anc, valid, method, taps, final, vocab, lse, amax)

    ref, ref_m = loss(None)
    got, got_m = loss(DraftVocab(torch.arange(v), v))
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5), (got, ref)
    for k in ref_m:
        assert abs(got_m[k] - ref_m[k]) < 1e-4, k
    # the 40 most frequent tokens less the batch's most frequent one, so that some labels surely fall outside
    common = int(ids[gm.bool()].flatten().mode().values) if gm.any() else -1
    top = DraftVocab.top(token_ranking(data), 41, v, []).ids
    sub = DraftVocab(top[top != common][:40], v)
    got, got_m = loss(sub)
    if method == "eagle3":  # its soft CE over the subset leaves out the mass outside it: no full-vocab twin
        assert torch.isfinite(got) and 0 <= got_m["acc"] <= 1
        return
    # the reference: the full-vocabulary loss of a drafter whose logits outside the subset are -inf
    inside = torch.zeros(v, dtype=torch.bool)
    inside[sub.ids] = True
    full_logits = td.draft_logits

    def subset_only(h, t, vocab):
        return full_logits(h, t, vocab).masked_fill(~inside, -torch.inf)

    monkeypatch.setattr(td, "draft_logits", subset_only)
    _, ref_m = loss(None)
    for k in ("l1", "acc", "bce"):
        assert abs(got_m[k] - ref_m[k]) < 1e-4, (k, got_m[k], ref_m[k])
    assert got_m["ce"] < ref_m["ce"] == float("inf"), "labels outside the subset drop out of the CE"


@pytest.mark.parametrize("n_kv", [3, 9])
def test_eagle3_slot_attention_equals_the_masked_attention(n_kv):
    """The training unroll's attention for chosen slots (causal over step 0, each slot's own slot of later steps)
    equals plain attention under the explicit mask over all steps' keys at those slots: values and gradients,
    with and without GQA."""
    import torch

    from dspark.engine.drafters.config import DrafterConfig
    from dspark.engine.drafters.eagle3 import Eagle3Drafter
    from dspark.engine.model_config import ModelConfig

    tcfg = ModelConfig("LlamaForCausalLM", 100, 72, 96, 4, 9, n_kv, 8)
    drafter = Eagle3Drafter(DrafterConfig(method="eagle3", target_layer_ids=[0, 1], block_size=4), tcfg)
    g = torch.Generator().manual_seed(0)
    b, s, steps = 3, 11, 4
    q = torch.randn(b, s, 9, 8, generator=g, dtype=torch.float64, requires_grad=True)
    kv = [torch.randn(b, s, n_kv, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2 * steps)]
    ks, vs = kv[:steps], kv[steps:]
    t = torch.arange(s)
    mask = torch.cat([t[None, :] <= t[:, None]] + [torch.eye(s, dtype=torch.bool)] * (steps - 1), 1)[None, None]
    chosen = torch.tensor([0, 4, 10, 2 * s + 3, 2 * s + 7])  # row-major; row 1 has none
    rows, cols = chosen // s, chosen % s
    want = drafter.attend(q, torch.cat(ks, 1), torch.cat(vs, 1), mask)[rows, cols]
    got = drafter.attend_slots(q[rows, cols], ks[0], vs[0], rows, cols, [k[rows, cols] for k in ks[1:]],
                               [v[rows, cols] for v in vs[1:]])
    torch.testing.assert_close(got, want)
    w = torch.randn(want.shape, generator=g, dtype=torch.float64)
    for a, e in zip(torch.autograd.grad((got * w).sum(), [q, *kv]), torch.autograd.grad((want * w).sum(), [q, *kv])):
        torch.testing.assert_close(a, e)
    assert drafter.attend_slots(q[rows, cols], ks[0], vs[0], rows, cols, [], []).shape == (5, 72)


def test_eagle3_loss_equals_the_dense_unroll(data_cache):
    """Unrolling only the supervised slots' chains gives the loss and gradients of unrolling every slot, as the
    training-time test is defined: every slot at every step through the layer, attention under the full mask."""
    import torch

    import dspark.engine.training.train_drafter as td
    from dspark.engine.drafters import DrafterConfig, build_drafter

    torch.manual_seed(0)
    target = load_model(TEST_MODEL)
    data = torch.load(data_cache)[:3]
    feats = td.target_features(target, data, [0, 1], 0)
    ids, gm, taps, final = td.make_batch(data, 0, feats)
    taps, final = taps.float(), final.float()
    cfg = DrafterConfig(method="eagle3", target_layer_ids=[0, 1], block_size=3, num_layers=1)
    drafter = build_drafter(cfg, target)

    def dense():  # every slot of every step; the same supervised slots (same generator draws)
        b, s = ids.shape
        t = torch.arange(s)
        hidden, keys, vals, total, gen = drafter.fc(taps), [], [], 0.0, torch.Generator().manual_seed(5)
        for i in range(3):
            emb = target.model.embed_tokens(ids[:, (t + 1 + i).clamp(max=s - 1)])
            q, k, v = drafter.project(hidden, emb, (t + i).expand(b, s))
            keys.append(k)
            vals.append(v)
            mask = torch.cat([t[None, :] <= t[:, None]] + [torch.eye(s, dtype=torch.bool)] * i, 1)[None, None]
            hidden = drafter.finish(hidden, drafter.attend(q, torch.cat(keys, 1), torch.cat(vals, 1), mask))
            ok = (t + 2 + i < s)[None, :] & gm[:, (t + 2 + i).clamp(max=s - 1)]
            r, c = ok.nonzero(as_tuple=True)
            pick = torch.randperm(len(r), generator=gen)[:20]
            r, c = r[pick], c[pick]
            p_t, _ = td.target_probs(target, final[r, c + 1 + i], None, None)
            logits = td.draft_logits(drafter.norm(hidden[r, c]), target, None)
            total = total + 0.8**i * -(p_t * torch.log_softmax(logits, -1)).sum(-1).mean()
        return total

    params = [p for p in drafter.parameters() if p.requires_grad]
    want = dense()
    got, _ = td.eagle3_loss(drafter, target, ids, gm, taps, final, max_slots=20, gen=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, want)
    for a, e in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)


def test_a_longer_gen_limit_starts_from_the_shorter_runs_answers(tmp_path):
    """--gen-limit 2400 after --gen-limit 1280 (same draw) answers only the 1120 prompts not yet answered."""
    from dspark.engine.training.train_drafter import resume_from_shorter

    stem = "drafter-data-m.gguf-2400-192-0"
    for n, text in ((640, "a"), (1280, "b"), (3000, "c")):
        (tmp_path / f"{stem}-{n}.pt").write_text(text)
    (tmp_path / f"{stem}-x1.pt").write_text("not a limit")
    cache, partial = tmp_path / f"{stem}-2400.pt", tmp_path / f"{stem}-2400.partial"
    assert resume_from_shorter(cache, 2400, partial) == tmp_path / f"{stem}-1280.pt"
    assert partial.read_text() == "b"  # the longest shorter run
    partial.write_text("progress")
    assert resume_from_shorter(cache, 2400, partial) is None and partial.read_text() == "progress"
    other = tmp_path / "drafter-data-m.gguf-2400-192-1-2400.pt"  # another seed: another draw
    assert resume_from_shorter(other, 2400, other.with_suffix(".partial")) is None
    assert resume_from_shorter(tmp_path / "mine.pt", 2400, tmp_path / "mine.partial") is None  # --data-cache


def test_a_recipe_runs_its_phases_in_order_and_resumes_inside_any(data_cache, tmp_path):
    """`train-drafter --recipe`: phase 2 starts from phase 1's weights; a run stopped inside either phase and
    started again ends with the same weights as the uninterrupted one; another method cannot reuse its --out."""
    from dspark.engine.training.recipe import train_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("common: {num_layers: 1, taps: 3, batch: 2, anchors: 4, seed: 3}\n"
                      "phases:\n  - {steps: 3, draft_vocab_size: 0}\n"
                      "  - {steps: 3, draft_vocab_size: 300, lr: 5.0e-4}\n"
                      "methods:\n  dspark: {markov_rank: 8}\n  dflash: {}\n")
    kw = dict(data_cache=data_cache, log_every=1)
    whole = train_recipe(str(TEST_MODEL), recipe, "dspark", tmp_path / "a", **kw)
    assert whole["steps"] == 3 and whole["draft_vocab_size"] == 300 and whole["lr"] == 5e-4
    assert whole["continued_from"]["steps"] == 3 and whole["continued_from"]["draft_vocab_size"] == 0
    assert train_recipe(str(TEST_MODEL), recipe, "dspark", tmp_path / "b", stop_after=2, **kw) is None  # phase 1
    assert train_recipe(str(TEST_MODEL), recipe, "dspark", tmp_path / "b", stop_after=2, **kw) is None  # phase 2
    import json

    state = json.loads((tmp_path / "b" / "recipe_state.json").read_text())
    assert [p["steps"] for p in state["done"]] == [3]
    last = train_recipe(str(TEST_MODEL), recipe, "dspark", tmp_path / "b", **kw)
    assert last["first_step_this_run"] == 2, "phase 2 did not resume from its checkpoint"
    a, b = (load_file(str(tmp_path / x / "model.safetensors")) for x in "ab")
    assert all(a[k].equal(b[k]) for k in a), "a stopped recipe diverged from the uninterrupted one"
    again = train_recipe(str(TEST_MODEL), recipe, "dspark", tmp_path / "b", **kw)  # all done: nothing runs
    assert again["first_step_this_run"] == 2
    assert all(v.equal(b[k]) for k, v in load_file(str(tmp_path / "b" / "model.safetensors")).items())
    with pytest.raises(ValueError, match="another recipe or method"):
        train_recipe(str(TEST_MODEL), recipe, "dflash", tmp_path / "b", **kw)
    with pytest.raises(ValueError, match="no method 'eagle3'"):
        train_recipe(str(TEST_MODEL), recipe, "eagle3", tmp_path / "c", **kw)
