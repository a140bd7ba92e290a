"""CUDA path: FlashInfer attention against the torch reference, and the engine on the GPU against the CPU.

Skipped with the reason stated when CUDA or flashinfer-python is absent (CI is CPU-only). Run on a GPU host with
`pip install '.[cuda]'` and `python -m pytest tests/gpu -v`.
"""

import pytest
import torch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
try:
    import flashinfer  # noqa: F401

    HAVE_FI = True
except ImportError:
    HAVE_FI = False
# Only a GPU host without FlashInfer skips for the package; a CPU host (CI) skips for the GPU alone.
needs_fi = pytest.mark.skipif(torch.cuda.is_available() and not HAVE_FI,
                              reason="needs flashinfer-python (pip install '.[cuda]')")


@cuda
@needs_fi
@pytest.mark.parametrize("head_dim", [64, 128])  # FlashInfer's kernels exist for these (not for 8)
@pytest.mark.parametrize("seed", range(3))
def test_flashinfer_equals_torch_reference(seed, head_dim):
    """Prefill chunks, plain decodes and drafts to verify in one ragged batch."""
    from test_attention import make_case

    from dspark.kernels.flashinfer_backend import FlashInferAttention
    from dspark.kernels.torch_backend import TorchPagedAttention

    g = torch.Generator().manual_seed(seed)
    b = int(torch.randint(2, 9, (1,), generator=g))
    q_lens = torch.randint(1, 9, (b,), generator=g)
    q_lens[0] = 1
    kv_lens = (q_lens + torch.randint(0, 40, (b,), generator=g)).tolist()
    meta, q, k, v, (kc, vc), _ = make_case(q_lens.tolist(), kv_lens, seed, head_dim)
    ref_be = TorchPagedAttention()
    ref_be.plan(meta)
    ref = ref_be.forward(0, q, k, v, (kc.clone(), vc.clone()), q.shape[-1] ** -0.5)
    dev, dt = "cuda", torch.bfloat16
    meta.block_tables, meta.slot_mapping = meta.block_tables.to(dev), meta.slot_mapping.to(dev)
    fi = FlashInferAttention(q.shape[1], k.shape[1], q.shape[-1], dev, dt)
    fi.plan(meta)
    out = fi.forward(0, q.to(dev, dt), k.to(dev, dt), v.to(dev, dt), (kc.to(dev, dt), vc.to(dev, dt)),
                     q.shape[-1] ** -0.5)
    torch.testing.assert_close(out.float().cpu(), ref, atol=2e-2, rtol=2e-2)


PROMPTS = ["def parse(", "import os\n\n\ndef main():\n", "class Node:\n    def __init__(self"]


def greedy(device, backend, dtype, spec):
    from dspark.engine.llm_engine import LLMEngine
    from dspark.engine.sampling import SamplingParams
    from dspark.engine.settings import Settings

    eng = LLMEngine(Settings(device=device, attention_backend=backend, dtype=dtype, speculative=spec,
                             draft_policy="fixed"))
    ids = [eng.tokenizer.encode(p) for p in PROMPTS]
    return [s.output_ids for s in eng.generate(ids, SamplingParams(temperature=0, max_tokens=32))]


@cuda
def test_greedy_engine_on_gpu_equals_cpu():
    """float32 on both: the same tokens, with and without speculation."""
    ref = greedy("cpu", "torch", "float32", "none")
    assert greedy("cuda", "torch", "float32", "none") == ref
    assert greedy("cuda", "torch", "float32", "dspark") == ref


def teacher_forced_logits(backend: str, sequences: list[list[int]]) -> list[torch.Tensor]:
    """Logits at every position of each sequence, run as the engine runs it: a prefill chunk of half the sequence,
    then one decode step per token (the same inputs for both backends, whatever either would have generated)."""
    from dspark.engine.llm_engine import LLMEngine
    from dspark.engine.settings import Settings

    eng = LLMEngine(Settings(device="cuda", attention_backend=backend, dtype="bfloat16", speculative="none"))
    out = []
    for sid, ids in enumerate(sequences):
        eng.block_manager.allocate(sid, len(ids))
        half = len(ids) // 2
        rows = [eng.runner.forward([(ids[:half], 0)], eng.block_manager, [sid], list(range(half)))[0]]
        for t in range(half, len(ids)):
            rows.append(eng.runner.forward([([ids[t]], t)], eng.block_manager, [sid], [0])[0])
        out.append(torch.cat(rows).float().cpu())
        eng.block_manager.free(sid)
    return out


@cuda
@needs_fi
def test_flashinfer_engine_equals_torch_backend_in_bf16():
    """FlashInfer runs bf16 only. Greedy sequences of a tiny bf16 model diverge at near-ties, so the backends are
    compared on the same inputs (teacher forcing): logits within bf16 rounding, argmax equal where not a near-tie.
    Speculation on FlashInfer stays exact against FlashInfer itself."""
    from dspark.engine.llm_engine import LLMEngine
    from dspark.engine.settings import Settings

    tok = LLMEngine(Settings(speculative="none")).tokenizer
    seqs = [ids + out for ids, out in zip([tok.encode(p) for p in PROMPTS], greedy("cpu", "torch", "float32", "none"))]
    for ref, fi in zip(teacher_forced_logits("torch", seqs), teacher_forced_logits("flashinfer", seqs)):
        scale = ref.abs().max()
        assert (fi - ref).abs().max() <= 0.03 * scale, float((fi - ref).abs().max() / scale)
        top2 = ref.topk(2, -1).values
        clear = (top2[:, 0] - top2[:, 1]) > 0.05 * scale  # not a near-tie
        assert bool((fi.argmax(-1) == ref.argmax(-1))[clear].all())
    fi = greedy("cuda", "flashinfer", "bfloat16", "none")
    assert greedy("cuda", "flashinfer", "bfloat16", "dspark") == fi


@cuda
@pytest.mark.parametrize("case", ["dspark-adaptive", "eagle3-fixed", "dspark-fixed-graphs"])
def test_sampled_distribution_on_gpu(case, monkeypatch):
    """tests/test_lossless.py's check, the engine (batched verification included) on the GPU; the last case in
    bf16 on FlashInfer with CUDA graphs (its reference, the dense bf16 forward, differs from FlashInfer's only by
    rounding)."""
    import test_lossless as tl

    from dspark.engine.settings import Settings

    extra = {}
    if case.endswith("graphs"):
        if not HAVE_FI:
            pytest.skip("needs flashinfer-python (pip install '.[cuda]')")
        # 64 in flight (the largest bucket), so every decode and verification step replays a graph
        extra = dict(dtype="bfloat16", attention_backend="flashinfer", cuda_graphs="on", max_num_seqs=64)
    monkeypatch.setattr(tl, "Settings", lambda **kw: Settings(device="cuda", **{**kw, **extra}))
    c = {"dspark-adaptive": tl.Case("dspark", "adaptive", 1.0, top_k=3),
         "eagle3-fixed": tl.Case("eagle3", "fixed", 0.7, top_k=3),
         "dspark-fixed-graphs": tl.Case("dspark", "fixed", 1.0, top_k=3)}[case]
    counts, joint, eng = tl.run_case(c)
    tl.assert_multi_token_rounds(eng, c.policy)
    if extra:
        assert eng.runner.graphs.replays > 0.5 * eng.stats["steps"]
    assert tl.tv(counts, joint, tl.N) < tl.tv_bound(joint, tl.N)


def graph_engine(spec: str, capture: bool):
    """bf16 FlashInfer engine on the GPU, decode/verify steps through CUDA-graph buckets: captured, or (capture
    False) the same buckets and FlashInfer graph-mode wrappers run eagerly. A small KV pool forces preemption."""
    from dspark.engine.llm_engine import LLMEngine
    from dspark.engine.settings import Settings

    eng = LLMEngine(Settings(device="cuda", attention_backend="flashinfer", dtype="bfloat16", speculative=spec,
                             draft_policy="fixed", confidence_threshold=0.3, max_num_seqs=8, num_kv_blocks=12,
                             cuda_graphs="on" if capture else "off"))
    if not capture:
        eng.runner.enable_graphs(1 + eng.scheduler.draft_len, 8, 512, eng.max_model_len, eng.tap_layers,
                                 capture=False)
    return eng


@cuda
@needs_fi
@pytest.mark.parametrize("spec", ["none", "dspark", "eagle3"])
def test_cuda_graph_replay_equals_the_same_steps_run_eagerly(spec):
    """Replayed graphs against the same padded steps run eagerly (same kernels, same shapes): the same tokens, bit
    for bit, greedy and seeded sampled, through KV growth, preemption and rolled-back drafts. A stale buffer
    (ids, positions, slots, block tables, lengths) in a replay would show here."""
    from test_speculative import prompts

    from dspark.engine.sampling import SamplingParams

    outs = []
    for capture in (True, False):
        eng = graph_engine(spec, capture)
        ps = prompts(eng.tokenizer, 16)
        params = [SamplingParams(temperature=0.8, seed=i, max_tokens=32) if i % 3 == 2 else
                  SamplingParams(temperature=0, max_tokens=32) for i in range(len(ps))]
        outs.append([s.output_ids for s in eng.generate(ps, params)])
        assert eng.runner.graphs.replays > 0
        assert bool(eng.runner.graphs.graphs) == capture
        if capture:
            assert eng.scheduler.num_preemptions > 0
            if spec != "none":
                assert eng.stats["accepted_tokens"] > 0
        eng.block_manager.check()
    assert outs[0] == outs[1]


@cuda
@needs_fi
def test_cuda_graph_step_close_to_the_eager_step():
    """One verification step (rows of 3, 1 and 2: a padding request and a row past the plan) replayed from a graph
    against the eager FlashInfer step: logits within bf16 rounding, and the padding wrote only the scratch block."""
    from dspark.engine.llm_engine import LLMEngine
    from dspark.engine.settings import Settings

    eng = LLMEngine(Settings(device="cuda", attention_backend="flashinfer", dtype="bfloat16", speculative="none",
                             num_kv_blocks=64))
    runner, bm, tok = eng.runner, eng.block_manager, eng.tokenizer
    ctx = [tok.encode("def parse(x):\n    return"), tok.encode("Hello"), tok.encode("import os")]
    for sid, ids in enumerate(ctx):
        bm.allocate(sid, len(ids) + 3)
        runner.forward([(ids, 0)], bm, [sid], [len(ids) - 1])
    step = [([5, 6, 7], len(ctx[0])), ([9], len(ctx[1])), ([11, 12], len(ctx[2]))]
    before = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
    eager = runner.forward(step, bm, [0, 1, 2], list(range(6)))[0].float()
    after = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
    for (k, v), (k0, v0) in zip(runner.kv_caches, before):
        k.copy_(k0), v.copy_(v0)
    took = runner.enable_graphs(4, 4, 64, eng.max_model_len)
    assert took["graphs"] == len(runner.graphs.buckets) > 0
    graphed = runner.forward(step, bm, [0, 1, 2], list(range(6)))[0].float()
    assert runner.graphs.replays == 1
    scale = eager.abs().max()
    assert (graphed - eager).abs().max() <= 0.03 * scale
    s = runner.scratch_block
    for (k, v), (ke, ve) in zip(runner.kv_caches, after):
        torch.testing.assert_close(k[:s], ke[:s], atol=0.03, rtol=0.03)
        torch.testing.assert_close(v[:s], ve[:s], atol=0.03, rtol=0.03)
