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
needs_fi = pytest.mark.skipif(not HAVE_FI, reason="needs flashinfer-python (pip install '.[cuda]')")


@cuda
@needs_fi
@pytest.mark.parametrize("seed", range(6))
def test_flashinfer_equals_torch_reference(seed):
    """Prefill chunks, plain decodes and drafts to verify in one ragged batch, then again after a rollback."""
    from test_attention import make_case

    from kernels.attention import TorchPagedAttention
    from kernels.flashinfer_backend import FlashInferAttention

    g = torch.Generator().manual_seed(seed)
    b = int(torch.randint(2, 9, (1,), generator=g))
    q_lens = torch.randint(1, 9, (b,), generator=g)
    q_lens[0] = 1
    kv_lens = (q_lens + torch.randint(0, 40, (b,), generator=g)).tolist()
    meta, q, k, v, (kc, vc), _ = make_case(q_lens.tolist(), kv_lens, seed)
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
    from engine.llm_engine import LLMEngine
    from engine.sampling import SamplingParams
    from engine.settings import Settings

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


@cuda
@needs_fi
def test_flashinfer_engine_equals_torch_backend_in_bf16():
    """FlashInfer runs bf16 only: compare with the torch backend in bf16 on the same GPU; speculation exact."""
    ref = greedy("cuda", "torch", "bfloat16", "none")
    fi = greedy("cuda", "flashinfer", "bfloat16", "none")
    assert sum(a == b for a, b in zip(fi, ref)) >= 2 and all(a[:8] == b[:8] for a, b in zip(fi, ref))
    assert greedy("cuda", "flashinfer", "bfloat16", "dspark") == fi


@cuda
def test_sampled_distribution_on_gpu(monkeypatch):
    import test_speculative as ts

    from engine.settings import Settings

    monkeypatch.setattr(ts, "Settings", lambda **kw: Settings(device="cuda", **kw))
    counts, joint = ts.speculative_samples("dspark", 0.0, "adaptive")
    assert ts.tv(counts, joint, ts.N) < ts.tv_bound(joint, ts.N)
