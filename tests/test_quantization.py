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
    W4A8Linear,
    W8A8Linear,
    int4_codes,
)
from dspark.engine.sampling import SamplingParams
from dspark.engine.settings import Settings
from dspark.engine.tokenizer import Tokenizer
from dspark.kernels import cpu_quant

TEST_MODEL = "models/tiny-qwen3-5m"
needs_w4a8 = pytest.mark.skipif(cpu_quant.unavailable() is not None,
                                reason=f"w4a8's kernels: {cpu_quant.unavailable()}")
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


def quantize_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: activations as w4a8's kernels quantize them, per block of 32 (codes, scale [.., K/32])."""
    xb = x.view(*x.shape[:-1], -1, 32)
    d = xb.abs().amax(-1) / 127
    return torch.round(xb * torch.where(d == 0, 0, 1 / d)[..., None]).view(x.shape), d


@needs_w4a8
def test_w4a8_kernel_is_the_dot_of_int8_activations_and_the_int4_weights():
    """The kernel against plain float64 arithmetic on the same codes: activations in int8 blocks of 32 times the
    weights the int4 codes stand for (q * d + m), i.e. llama.cpp's Q4_1 x Q8_1; and against the float matmul,
    within what the activations' rounding costs."""
    torch.manual_seed(0)
    w = torch.randn(48, 128) * 0.05
    codes = int4_codes(w, 32)
    q, scale, zero = codes
    lin = W4A8Linear(codes, bias=torch.ones(48))
    x = torch.randn(6, 128)
    xq, xd = quantize_blocks(x)
    deq = ((q.double().view(48, 4, 32) - 8) * scale.double()[..., None] + zero.double()[..., None]).view(48, 128)
    exact = (xq.double().view(6, 4, 32) * xd.double()[..., None]).view(6, 128) @ deq.t() + 1
    got = lin(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, x @ deq.float().t() + 1, rtol=0.02, atol=0.03)


@needs_w4a8
def test_w8a8_kernel_keeps_a_q8_0_weights_codes():
    """w4a8's head: int8 codes per block of 32 taken back exactly from weights that are such codes times a
    scale (a GGUF's dequantized Q8_0), and the dot of the int8 activations with them."""
    torch.manual_seed(0)
    q = torch.randint(-127, 128, (40, 96)).float()
    q[:, ::32] = 127  # every block reaches the scale's full range, as Q8_0's own quantizer leaves it
    d = torch.rand(40, 3) * 0.01 + 1e-3
    w = (q.view(40, 3, 32) * d[..., None]).view(40, 96)
    lin = W8A8Linear(w)
    x = torch.randn(3, 96)
    xq, xd = quantize_blocks(x)
    exact = (xq.double().view(3, 3, 32) * xd.double()[..., None]).view(3, 96) @ w.double().t()
    torch.testing.assert_close(lin(x).double(), exact, rtol=1e-5, atol=1e-5)


def test_int8_kernel_computes_with_its_per_channel_weights():
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    lin = Int8Linear(w, bias=torch.ones(48))
    deq = lin.qweight.float() * lin.scales.float()[:, None]
    assert (deq - w).abs().max() <= w.abs().max() / 127
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(lin(x), x.bfloat16().float() @ deq.t() + 1, rtol=0.02, atol=0.05)


W4A8 = pytest.param("w4a8", marks=needs_w4a8)


def make_linear(scheme: str, w: torch.Tensor):
    return {"int8": lambda: Int8Linear(w), "int4": lambda: Int4Linear(int4_codes(w, 32), 32),
            "w4a8": lambda: W4A8Linear(int4_codes(w, 32)), "w8a8": lambda: W8A8Linear(w)}[scheme]()


@pytest.mark.parametrize("scheme", ["int8", "int4", W4A8, pytest.param("w8a8", marks=needs_w4a8)])
def test_a_row_gets_the_same_bits_alone_and_among_others(scheme):
    """What makes verification of k+1 rows score each token as one-row decoding does (issue 39's property);
    w4a8's kernels split columns over threads, never a row's sum: the bits do not depend on the thread count."""
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    lin = make_linear(scheme, w)
    x = torch.randn(7, 128).bfloat16()
    rows = torch.cat([lin(x[i : i + 1]) for i in range(7)])
    assert torch.equal(lin(x), rows)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(lin(x), rows)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("scheme", ["int8", "int4", W4A8])
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


@needs_w4a8
def test_w4a8_serves_a_q4_1_ggufs_codes_as_stored(tmp_path, tiny):
    """w4a8 reads the file's Q4_1 codes as int4 does (never materializing the float projections) and its head
    goes int8 in blocks of 32; the model stays close to the dequantized weights' own (the activations'
    int8 rounding is the difference)."""
    expected = write_gguf(tmp_path / "m.gguf", tiny, "qwen3", Q.Q4_1)
    ckpt = open_gguf(tmp_path / "m.gguf")
    model = load_model(tmp_path / "m.gguf", quantization="w4a8")
    assert model.quantizer.from_file == 7 * tiny.config.num_hidden_layers and not model.quantizer.skipped
    assert isinstance(model._lm_head, W8A8Linear)
    assert all(p.is_meta for n, p in model.named_parameters() if n.rsplit(".", 2)[-2] in PROJ)
    ref = reference(tiny, {n: dequantize_int4(ckpt.int4_codes(n), 32) if ckpt.int4_codes(n) is not None else w
                           for n, w in expected.items()})
    ids = Tokenizer(TEST_MODEL).encode(TEXTS[0])
    with torch.no_grad():
        got, want = model(torch.tensor([ids]))[0], ref(torch.tensor([ids]))[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0.05 * float(want.abs().max()))
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
    # the int8-activation kernels where they build (AVX2, a compiler), else torch's weight-only int4
    want = "int4" if cpu_quant.unavailable() else "w4a8"
    assert Settings(model=str(tmp_path / "m.Q4_1.gguf"), **auto).quantization_scheme == want
    assert Settings(model=str(tmp_path / "m.Q8_0.gguf"), **auto).quantization_scheme == "none"
    assert Settings(model=TEST_MODEL, **auto).quantization_scheme == "none"  # float weights: nothing stored
    assert Settings(model=str(tmp_path / "m.Q4_1.gguf"), quantization="auto",
                    dtype="bfloat16").quantization_scheme == "none"


@pytest.mark.parametrize("scheme", ["int8", "int4", W4A8])
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
