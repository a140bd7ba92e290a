"""Weight-only quantization (dspark/engine/quantization.py): GGUF Q4_0 / Q4_1 codes taken as stored, int8 / int4
from float weights, the kernels against a plain matmul of the weights they stand for, rows computed alone, and
greedy speculation on a quantized target equal to decoding without it."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from test_gguf import TEXTS, llama_like, logits, reference, write_gguf

from dspark.engine.gguf_model import open_gguf
from dspark.engine.llm_engine import LLMEngine
from dspark.engine.model import load_model
from dspark.engine.quantization import (
    Int4Codes,
    Int4Linear,
    Int8Linear,
    Quantizer,
    int4_codes,
)
from dspark.engine.sampling import SamplingParams
from dspark.engine.settings import Settings
from dspark.engine.tokenizer import Tokenizer

TEST_MODEL = "models/tiny-qwen3-5m"
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def dequantize_int4(codes: Int4Codes, group_size: int) -> torch.Tensor:
    """Reference: the float32 weight the int4 kernel computes with (scales and zeros rounded to bfloat16, as
    it stores them)."""
    q, scale, zero = codes
    n, k = q.shape
    s, z = scale.to(torch.bfloat16).float(), zero.to(torch.bfloat16).float()
    return ((q.float().view(n, k // group_size, group_size) - 8) * s[..., None] + z[..., None]).view(n, k)


@pytest.fixture(scope="module")
def tiny():
    return load_model(TEST_MODEL)


def test_int4_kernel_computes_with_the_weights_its_codes_stand_for():
    torch.manual_seed(0)
    w = torch.randn(96, 128) * 0.05
    for group in (32, 64, 128):
        codes = int4_codes(w, group)
        assert int(codes[0].min()) == 0 and int(codes[0].max()) == 15
        deq = dequantize_int4(codes, group)
        assert (deq - w).abs().max() <= (w.max() - w.min()) / 15  # within one step of every group's grid
        x = torch.randn(3, 128)
        want = x.bfloat16().float() @ deq.t()
        got = Int4Linear(codes, group)(x)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0.02, atol=0.02)


def test_int8_kernel_computes_with_its_per_channel_weights():
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    lin = Int8Linear(w, bias=torch.ones(48))
    deq = lin.qweight.float() * lin.scales.float()[:, None]
    assert (deq - w).abs().max() <= w.abs().max() / 127
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(lin(x), x.bfloat16().float() @ deq.t() + 1, rtol=0.02, atol=0.05)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_row_gets_the_same_bits_alone_and_among_others(scheme):
    """What makes verification of k+1 rows score each token as one-row decoding does (issue 39's property)."""
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    lin = Int8Linear(w) if scheme == "int8" else Int4Linear(int4_codes(w, 32), 32)
    x = torch.randn(7, 128).bfloat16()
    rows = torch.cat([lin(x[i : i + 1]) for i in range(7)])
    assert torch.equal(lin(x), rows)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_lm_head_scores_a_row_alike_in_any_step(scheme):
    """Verification scores k+1 rows per request in one call, decoding one: the head must give a row the same
    logits either way (one kernel at every row count), or greedy speculation would change the text."""
    model = load_model(TEST_MODEL, quantization=scheme)
    torch.manual_seed(0)
    h = torch.randn(9, model.config.hidden_size)
    together = model.logits(h)
    assert all(torch.equal(together[i], model.logits(h[i : i + 1])[0]) for i in range(9))


@pytest.mark.parametrize("arch,qtype", [("qwen3", Q.Q4_0), ("qwen3", Q.Q4_1), ("llama", Q.Q4_1)])
def test_gguf_q4_codes_are_taken_as_stored(tmp_path, tiny, arch, qtype):
    src = tiny if arch == "qwen3" else llama_like(tiny)
    expected = write_gguf(tmp_path / "m.gguf", src, arch, qtype)
    ckpt = open_gguf(tmp_path / "m.gguf")
    for name, want in expected.items():
        codes = ckpt.int4_codes(name)
        if name.endswith(".weight") and name.rsplit(".", 2)[-2] in PROJ:
            q, scale, zero = codes
            n, k = q.shape
            back = ((q.float().view(n, k // 32, 32) - 8) * scale[..., None] + zero[..., None]).view(n, k)
            torch.testing.assert_close(back, want, rtol=1e-6, atol=1e-6)  # exact codes; float32 rounding only
        elif want.ndim == 1:
            assert codes is None
    model = load_model(tmp_path / "m.gguf", quantization="int4")
    layers = src.config.num_hidden_layers
    untied_head = not src.config.tie_word_embeddings  # its own Q4 tensor in the file, taken as stored too
    assert model.quantizer.from_file == 7 * layers + untied_head and not model.quantizer.skipped
    # the head stays 4-bit only where the file stores it so; a tied head (the 8-bit embedding here) goes int8
    assert isinstance(model._lm_head, Int4Linear if untied_head else Int8Linear)
    # the decoder's float projections were never materialized: the int4 codes are the only copy
    assert all(p.is_meta for n, p in model.named_parameters() if n.rsplit(".", 2)[-2] in PROJ)
    ref = reference(src, {n: dequantize_int4(ckpt.int4_codes(n), 32) if ckpt.int4_codes(n) is not None else w
                          for n, w in expected.items()})
    ids = Tokenizer(TEST_MODEL).encode(TEXTS[0])
    with torch.no_grad():  # the decoder on the stored codes computes what their dequantized weights do
        got, want = model(torch.tensor([ids]))[0], ref(torch.tensor([ids]))[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0.05 * float(want.abs().max()))
    # and the head (quantized from the float embedding when tied) keeps the reference's choices
    assert (logits(model, ids).argmax(-1) == logits(ref, ids).argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_hf_checkpoint_quantized_from_float_stays_close(tiny, scheme):
    model = load_model(TEST_MODEL, quantization=scheme)
    assert model.quantizer.from_file == 0
    ids = Tokenizer(TEST_MODEL).encode(TEXTS[0] + TEXTS[1])
    got, want = logits(model, ids), logits(tiny, ids)
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean()
    assert agree >= (0.9 if scheme == "int8" else 0.75), agree
    assert not torch.equal(got, want)  # it did run on the quantized weights


def test_a_shape_the_kernel_refuses_stays_in_float():
    lin = torch.nn.Linear(64, 100, bias=False)
    q = Quantizer("int4")
    assert q([lin], ["odd.weight"]) is None and q.skipped == ["odd.weight"]
    assert isinstance(Quantizer("int8")([lin], ["odd.weight"]), Int8Linear)


def test_settings_refuse_unknown_schemes_and_groups():
    with pytest.raises(ValueError, match="quantization must be"):
        Settings(model=TEST_MODEL, quantization="fp4")
    with pytest.raises(ValueError, match="group_size must be 32, 64 or 128"):
        Settings(model=TEST_MODEL, quantization_group_size=48)
    assert Settings(model=TEST_MODEL, quantization="auto", device="cuda").quantization_scheme == "none"


def test_auto_takes_a_q4_ggufs_own_codes_only_in_float32_on_a_cpu(tmp_path, tiny):
    write_gguf(tmp_path / "m.Q4_1.gguf", tiny, "qwen3", Q.Q4_1)
    write_gguf(tmp_path / "m.Q8_0.gguf", tiny, "qwen3", Q.Q8_0)
    auto = {"quantization": "auto", "dtype": "float32"}
    assert Settings(model=str(tmp_path / "m.Q4_1.gguf"), **auto).quantization_scheme == "int4"
    assert Settings(model=str(tmp_path / "m.Q8_0.gguf"), **auto).quantization_scheme == "none"
    assert Settings(model=TEST_MODEL, **auto).quantization_scheme == "none"  # float weights: nothing stored
    assert Settings(model=str(tmp_path / "m.Q4_1.gguf"), quantization="auto",
                    dtype="bfloat16").quantization_scheme == "none"


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_greedy_speculation_on_a_quantized_target_changes_no_token(scheme):
    base = Settings(model=TEST_MODEL, quantization=scheme, draft_policy="fixed", num_kv_blocks=256)
    plain = LLMEngine(base.model_copy(update={"speculative": "none"}))
    spec = LLMEngine(base.model_copy(update={"speculative": "ngram", "ngram_min": 1}))
    assert "int" in spec.weights_summary
    tok = plain.tokenizer
    prompts = [tok.encode(t) for t in ("1, 2, 3, 4, 5, 6, 7, 8,", "def f(x):\n    return x\n\ndef f(", *TEXTS)]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    want = [s.output_ids for s in plain.generate(prompts, params)]
    got = [s.output_ids for s in spec.generate(prompts, params)]
    assert spec.stats["accepted_tokens"] > 0  # lookup drafts were verified, and some accepted
    assert got == want
