"""CUDA-graph steps (dspark/engine/cuda_graphs.py), everything but the capture, on the CPU: buckets, padding requests on
the
scratch block, the fixed input buffers, and the engine's tokens through padded steps equal to the eager path's.

The padded steps run eagerly (capture=False) with the torch reference under the graph backends' contract
(kernels.torch_backend.TorchGraphAttention: rows past the planned ones come out NaN, so padding that reached a real
row would show). Capture and replay themselves are tested on a GPU host (tests/gpu/test_cuda.py)."""

import random
import sys

import pytest
import torch
from test_speculative import prompts

from dspark.engine.cuda_graphs import Bucket, batch_sizes, pick_bucket, plan_buckets
from dspark.engine.llm_engine import LLMEngine
from dspark.engine.sampling import SamplingParams
from dspark.engine.settings import Settings
from dspark.kernels.torch_backend import TorchGraphAttention


def test_buckets_cover_every_step_up_to_the_limits():
    assert batch_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64] and batch_sizes(5) == [1, 2, 4, 5]
    buckets = plan_buckets(64, 8, 512)
    assert [k for k in buckets if k.decode] == [Bucket(b, b) for b in batch_sizes(64)]
    assert [k.tokens for k in buckets if k.batch == 1] == [1, 2, 4, 8]
    assert max(k.tokens for k in buckets) == 512 and Bucket(64, 512) in buckets
    rng = random.Random(0)
    for _ in range(2000):
        b = rng.randint(1, 64)
        q_lens = [1] * b if rng.random() < 0.3 else [rng.randint(1, 8) for _ in range(b)]
        k = pick_bucket(buckets, q_lens, 8)
        assert k is not None, q_lens  # 64 requests x 8 rows is the largest step, and fits 512
        t = sum(q_lens)
        assert k.batch >= b and k.tokens >= t + k.batch - b and k.decode == (t == b)
        # the smallest: no bucket of the same kind with fewer requests, or as many and fewer rows, holds it
        assert not any(j < k and j.decode == k.decode and j.batch >= b and j.tokens >= t + j.batch - b
                       for j in buckets)
    assert pick_bucket(buckets, [1] * 65, 8) is None and pick_bucket(buckets, [9], 8) is None
    assert pick_bucket(plan_buckets(8, 1, 512), [2], 1) is None  # no drafting: decode buckets only
    assert all(k.tokens >= k.batch for k in plan_buckets(64, 8, 40))  # a row cap below the batch: no such bucket
    assert max(k.tokens for k in plan_buckets(64, 8, 40)) == 40


def emulated(eng: LLMEngine, max_batch: int = 16, max_q: int | None = None, fake_fi: bool = False) -> LLMEngine:
    """Serve eng's decode and verification steps through padded bucket steps, eagerly: with the torch stand-in, or
    (fake_fi) with the FlashInfer graph backend itself over tests/fake_flashinfer.py."""
    max_q = max_q or 1 + eng.scheduler.draft_len
    make = None if fake_fi else (lambda k, slots: TorchGraphAttention(slots, k.batch))
    eng.runner.enable_graphs(max_q, max_batch, 64, eng.max_model_len, eng.tap_layers, capture=False,
                             make_attention=make)
    return eng


@pytest.fixture
def fake_flashinfer(monkeypatch):
    import fake_flashinfer

    monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer)


@pytest.fixture(scope="module")
def work():
    tok = LLMEngine(Settings()).tokenizer
    ps = prompts(tok, 24)
    ps += [ps[0] + tok.encode(" and more"), ps[0] + tok.encode(" or less")]  # cached-prefix hits
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=i, max_tokens=20) if i % 4 == 3 else
              SamplingParams(temperature=0, max_tokens=20) for i in range(len(ps))]
    return ps, params


@pytest.mark.parametrize("spec,policy", [("none", "fixed"), ("dspark", "fixed"), ("eagle3", "fixed"),
                                         ("dspark", "adaptive")])
@pytest.mark.parametrize("kv_blocks", [None, 40])  # 40 blocks of 4 tokens: requests get preempted
def test_padded_bucket_steps_give_the_eager_tokens(spec, policy, kv_blocks, work):
    """Greedy and seeded sampled requests, drafting or not, under preemption and prefix hits: the same tokens
    whether decode/verify steps run padded into buckets or eagerly. Draft lengths vary by request (cut where the
    confidence falls below 0.3, or chosen by the adaptive policy). The adaptive policy's lengths follow measured
    step times, which differ between two runs, and a sampled request's draws follow its lengths: there only the
    greedy requests are compared."""
    ps, params = work

    def run(graphs: bool):
        eng = LLMEngine(Settings(max_num_seqs=8, block_size=4, num_kv_blocks=kv_blocks, speculative=spec,
                                 draft_policy=policy, confidence_threshold=0.3, max_num_batched_tokens=64))
        if graphs:
            emulated(eng, max_batch=8)
        seqs = eng.generate(ps, params)
        eng.block_manager.check()
        return eng, [s.output_ids for s in seqs]

    _, ref = run(False)
    eng, out = run(True)
    check_against_eager(eng, out, ref, spec, policy, kv_blocks, params)


def check_against_eager(eng, out, ref, spec, policy, kv_blocks, params):
    if policy == "adaptive":
        out, ref = ([o for o, p in zip(x, params) if p.greedy] for x in (out, ref))
    assert out == ref
    assert 0.5 * eng.stats["steps"] < eng.runner.graphs.replays < eng.stats["steps"]  # and prompt chunks eagerly
    if spec != "none":
        assert eng.stats["accepted_tokens"] > 0
    if kv_blocks:
        assert eng.scheduler.num_preemptions > 0
    assert eng.block_manager.hits > 0  # prompts shared cached blocks


@pytest.mark.parametrize("spec", ["none", "dspark"])
def test_flashinfer_graph_backend_glue_on_a_stand_in(spec, work, fake_flashinfer):
    """kernels.flashinfer_backend.FlashInferGraphAttention itself (wrapper construction, plans, the rows it asks
    for) over a CPU stand-in that keeps FlashInfer's documented graph-mode rules: the engine's tokens equal the
    eager path's."""
    ps, params = work

    def run(graphs: bool):
        eng = LLMEngine(Settings(max_num_seqs=8, block_size=4, num_kv_blocks=40, speculative=spec,
                                 draft_policy="fixed", confidence_threshold=0.3, max_num_batched_tokens=64))
        if graphs:
            emulated(eng, max_batch=8, fake_fi=True)
        return eng, [s.output_ids for s in eng.generate(ps, params)]

    _, ref = run(False)
    eng, out = run(True)
    assert type(next(iter(eng.runner.graphs.attention.values()))).__name__ == "FlashInferGraphAttention"
    check_against_eager(eng, out, ref, spec, "fixed", 40, params)


def test_the_cost_profile_times_steps_shaped_like_verification_with_graphs():
    """With graphs, the start-up profile's step of n batch tokens is n / (1 + draft_len) requests with logits at
    every row, replayed from a bucket (a single n-token prompt chunk would run eagerly and time the wrong thing);
    past the largest bucket, one prompt chunk as without graphs. It needs the blocks of one n-token sequence."""
    eng = emulated(LLMEngine(Settings(speculative="dspark", draft_len=3, num_kv_blocks=8, block_size=16)),
                   max_batch=8)
    calls, forward = [], eng.runner.forward
    eng.runner.forward = lambda chunks, bm, sids, rows, taps: calls.append(([len(c) for c, _ in chunks], rows)) \
        or forward(chunks, bm, sids, rows, taps)
    for n, replays in ((1, 1), (4, 2), (10, 3), (64, 3)):  # 64 tokens: 16 requests, past the largest bucket
        eng._profile_step(n)
        assert eng.runner.graphs.replays == replays
        assert eng.block_manager.num_free == 8
    assert calls == [([1], [0]), ([4], [3]), ([4, 4, 2], list(range(10))), ([64], [63])]
    eng.block_manager.check()


def test_padding_never_touches_a_requests_blocks():
    """Padding rows and requests write only the scratch block: every other block's K/V after a padded step equals
    the eager step's, and so do the step's logits (within float32 rounding: the matmuls have more rows)."""
    eng = LLMEngine(Settings(block_size=4, num_kv_blocks=64, speculative="none"))
    tok = eng.tokenizer
    runner, bm = eng.runner, eng.block_manager
    ctx = [tok.encode("def parse(x):\n    return"), tok.encode("Hello"), tok.encode("import os")]
    for sid, ids in enumerate(ctx):
        bm.allocate(sid, len(ids) + 3)
        runner.forward([(ids, 0)], bm, [sid], [len(ids) - 1])
    # verify rows of 3 and 2 and a decode row: bucket (4, 8), with one padding request and one row past the plan
    step = [([5, 6, 7], len(ctx[0])), ([9], len(ctx[1])), ([11, 12], len(ctx[2]))]
    rows = list(range(6))
    before = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
    eager, _ = runner.forward(step, bm, [0, 1, 2], rows)
    after_eager = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
    for (k, v), (k0, v0) in zip(runner.kv_caches, before):
        k.copy_(k0), v.copy_(v0)
    emulated(eng, max_batch=4, max_q=4)
    assert runner.graphs.pick([3, 1, 2], runner.graphs.hidden_layers) == Bucket(4, 8)
    padded, _ = runner.forward(step, bm, [0, 1, 2], rows)
    torch.testing.assert_close(padded, eager, rtol=1e-5, atol=1e-5)
    s = runner.scratch_block
    for (k, v), (ke, ve) in zip(runner.kv_caches, after_eager):  # a stray write would be far off, not rounding
        torch.testing.assert_close(k[:s], ke[:s], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v[:s], ve[:s], rtol=1e-5, atol=1e-5)
    assert all(k[s].abs().sum() > 0 for k, _ in runner.kv_caches)  # the padding wrote there (it was zeros)
    assert runner.graphs.replays == 1


def test_graphs_are_on_only_where_they_can_run(monkeypatch):
    assert not Settings().graphs_on and Settings().attention == "torch"  # auto on the CPU: off, torch
    assert not Settings(device="cuda", attention_backend="torch").graphs_on  # torch's shapes change every step
    assert Settings(device="cuda", attention_backend="flashinfer", dtype="bfloat16").graphs_on
    assert not Settings(device="cuda", attention_backend="flashinfer", dtype="bfloat16", cuda_graphs="off").graphs_on
    with pytest.raises(ValueError, match="needs --device cuda and --attention-backend flashinfer"):
        LLMEngine(Settings(cuda_graphs="on"))
    with pytest.raises(ValueError, match="auto, on or off"):
        Settings(cuda_graphs="yes")
    # auto picks FlashInfer on CUDA in bf16/fp16 where it is installed and can get its kernels (a GPU host with
    # nvcc), and with it graphs; without a way to get kernels (a runtime-only CUDA image), torch
    import importlib.util

    import dspark.engine.settings as es

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "flashinfer" else real(n, *a))
    monkeypatch.setattr(es, "flashinfer_kernels_available", lambda: False)
    assert Settings(device="cuda", dtype="bfloat16").attention == "torch"
    monkeypatch.setattr(es, "flashinfer_kernels_available", lambda: True)
    assert Settings(device="cuda", dtype="bfloat16").attention == "flashinfer"
    assert Settings(device="cuda", dtype="bfloat16").graphs_on
    assert Settings(device="cuda", dtype="float32").attention == "torch"  # FlashInfer runs no float32
    assert Settings(device="cpu", dtype="bfloat16").attention == "torch"
    with pytest.raises(ValueError, match="auto, torch or flashinfer"):
        Settings(attention_backend="flash")
    with pytest.raises(ValueError, match="runs bfloat16 or float16, not float32"):
        LLMEngine(Settings(attention_backend="flashinfer", dtype="float32"))
