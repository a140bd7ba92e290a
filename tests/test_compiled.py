"""`--torch-compile`: batch-1 decode steps as one Inductor graph (dspark/engine/compiled.py), with the eager step's
bits, so greedy speculation (eager verification) keeps plain decoding's text. The eager reference runs the
fixed-order norms that a compiled engine runs in every step (model.sum_of_squares)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TEST_MODEL as TEST_MODEL_DIR

from dspark.engine.compiled import can_compile
from dspark.engine.llm_engine import LLMEngine
from dspark.engine.sampling import SamplingParams
from dspark.engine.settings import Settings
from dspark.kernels import cpu_quant

TEST_MODEL = str(TEST_MODEL_DIR)
needs_compiler = pytest.mark.skipif(not can_compile(), reason="Inductor needs a C++ compiler")
TEXTS = ["1, 2, 3, 4, 5, 6, 7, 8,", "def f(x):\n    return x\n\ndef f(", "the cat sat on the mat. the cat"]


def counting(engine: LLMEngine) -> list[int]:
    """Counts the steps the compiled graph ran (it must run, or the comparison proves nothing), and of them those
    of several rows."""
    calls, run = [0, 0], engine.runner.compiled.run

    def counted(ids, *a):
        calls[0] += 1
        calls[1] += len(ids) > 1
        return run(ids, *a)

    engine.runner.compiled.run = counted
    return calls


@needs_compiler
@pytest.mark.parametrize(("quantization", "dtype"), [
    ("int4", "bfloat16"), ("int8", "float32"),
    pytest.param("w4a8", "float32", marks=pytest.mark.skipif(cpu_quant.unavailable() is not None,
                                                              reason="w4a8's kernels do not build here"))])
def test_compiled_decode_gives_the_eager_steps_bits(quantization, dtype):
    base = Settings(model=TEST_MODEL, dtype=dtype, quantization=quantization, deterministic="on",
                    speculative="none", num_kv_blocks=256)
    eager = LLMEngine(base.model_copy(update={"torch_compile": "off"}))
    eager.model.fixed_order_norms_()  # the arithmetic a compiled engine's eager steps (prefill, the rest) run
    compiled = LLMEngine(base.model_copy(update={"torch_compile": "on"}))
    assert eager.runner.compiled is None and compiled.runner.compiled is not None
    calls = counting(compiled)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=0)
    for text in TEXTS:  # one request at a time: every decode step is the graph's (lengths cross pages)
        prompt = eager.tokenizer.encode(text)
        want, got = eager.generate([prompt], params)[0], compiled.generate([prompt], params)[0]
        assert got.output_ids == want.output_ids
        assert [lp[1] for lp in got.logprobs] == [lp[1] for lp in want.logprobs]  # the same bits, not only argmax
    assert calls[0] >= len(TEXTS) * 38
    # a batch (rows together: bf16) and its requests alone
    prompts = [eager.tokenizer.encode(t) for t in TEXTS]
    want = [s.output_ids for s in eager.generate(prompts, params)]
    assert [s.output_ids for s in compiled.generate(prompts, params)] == want
    assert [s.output_ids for s in compiled.generate(prompts[:1], params)] == want[:1]


@needs_compiler
@pytest.mark.parametrize(("quantization", "dtype"), [
    ("int4", "bfloat16"),
    pytest.param("w4a8", "float32", marks=pytest.mark.skipif(cpu_quant.unavailable() is not None,
                                                              reason="w4a8's kernels do not build here"))])
def test_greedy_speculation_on_compiled_decoding_keeps_plain_decodings_text(quantization, dtype):
    """Plain decoding runs the graph; speculation verifies drafts (k+1 rows) with the rows graph (bf16, or float32
    rows by cpu_attention.cpp's op) and decodes undrafted steps with the lone row's: the same text and logprobs."""
    base = Settings(model=TEST_MODEL, dtype=dtype, quantization=quantization, deterministic="on",
                    torch_compile="full", draft_policy="fixed", num_kv_blocks=256)
    plain = LLMEngine(base.model_copy(update={"speculative": "none"}))
    spec = LLMEngine(base.model_copy(update={"speculative": "ngram", "ngram_min": 1}))
    calls = counting(spec)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=0)
    for text in [*TEXTS, "a b c a b c a b"]:
        prompt = plain.tokenizer.encode(text)
        want, got = plain.generate([prompt], params)[0], spec.generate([prompt], params)[0]
        assert got.output_ids == want.output_ids
        assert [lp[1] for lp in got.logprobs] == [lp[1] for lp in want.logprobs]
    assert spec.stats["accepted_tokens"] > 0 and calls[0] > 0 and calls[1] > 0  # drafts verified by the graph


def test_torch_compile_setting():
    int4 = Settings(model=TEST_MODEL, quantization="int4")
    assert int4.compile_on == can_compile()  # auto: quantized CPU steps, where Inductor can build
    assert not Settings(model=TEST_MODEL, quantization="none", dtype="float32").compile_on
    assert not Settings(model=TEST_MODEL, quantization="int4", torch_compile="off").compile_on
    with pytest.raises(ValueError, match="--torch-compile on: it compiles quantized projections"):
        Settings(model=TEST_MODEL, quantization="none", torch_compile="on").compile_on  # noqa: B018
    with pytest.raises(ValueError, match="--torch-compile on: it compiles for the CPU"):
        Settings(model=TEST_MODEL, device="cuda", torch_compile="on").compile_on  # noqa: B018
    with pytest.raises(ValueError, match="torch_compile must be"):
        Settings(model=TEST_MODEL, torch_compile="yes")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dim", [576, 64, 100, 7])
def test_a_fixed_order_rms_norm_gives_eagers_bits_inside_a_compiled_graph(dtype, dim):
    """Inductor's own RMSNorm sums the squares in another order than aten's when it fuses the norm with the
    residual add before it; the fixed-order norm (model.sum_of_squares) is elementwise adds only, so a residual +
    norm gives eager's bits compiled. It is still RMSNorm: within float rounding of F.rms_norm."""
    from dspark.engine.model import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(dim, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim))
    norm.fixed_order = True

    def f(x, y):
        return norm(x + y)

    compiled = torch.compile(f, options={"emulate_precision_casts": True}) if can_compile() else f
    for rows in (1, 2, 5):
        x, y = (torch.randn(rows, dim) * 4).to(dtype), torch.randn(rows, dim).to(dtype)
        assert torch.equal(compiled(x, y), f(x, y))
        h = (x + y).float()
        want = norm.weight.float() * F.rms_norm(h, (dim,), None, 1e-5)
        torch.testing.assert_close(f(x, y).float(), want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                                   atol=1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_a_failed_compile_falls_back_to_eager_under_auto_and_fails_under_on(monkeypatch, caplog):
    from dspark.engine import compiled

    def broken(self):
        raise RuntimeError("no compiler after all")

    monkeypatch.setattr(compiled, "can_compile", lambda: True)
    monkeypatch.setattr(compiled.CompiledDecode, "warm_up", broken)
    base = Settings(model=TEST_MODEL, quantization="int8", speculative="none", num_kv_blocks=64)
    engine = LLMEngine(base)  # auto
    assert engine.runner.compiled is None
    assert not engine.model.model.norm.fixed_order  # eager after all: aten's norm
    assert "decoding eagerly: RuntimeError: no compiler after all" in caplog.text
    prompt = engine.tokenizer.encode("1, 2, 3,")
    assert len(engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=4))[0].output_ids) == 4
    with pytest.raises(RuntimeError, match="no compiler after all"):
        LLMEngine(base.model_copy(update={"torch_compile": "on"}))
