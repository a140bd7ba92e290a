"""GGUF loading on tiny files written here with gguf's own writer: names, shapes, llama's q/k permutation,
every quant type the library dequantizes, the tokenizer and chat template from metadata, clear errors."""

import json
import string

import httpx
import numpy as np
import pytest
import torch
from conftest import TEST_MODEL
from gguf import GGML_QUANT_SIZES, MODEL_ARCH, GGMLQuantizationType, GGUFWriter, get_tensor_name_map, quants

from dspark.engine.gguf_model import BYTE, CONTROL, model_name, unpermute_qk
from dspark.engine.llm_engine import LLMEngine
from dspark.engine.model import CausalLM, load_model
from dspark.engine.model_config import ModelConfig
from dspark.engine.sampling import SamplingParams
from dspark.engine.settings import Settings
from dspark.engine.tokenizer import Tokenizer
from dspark.loadtest.sweep import Server

Q = GGMLQuantizationType
ARCHS = {"llama": MODEL_ARCH.LLAMA, "qwen3": MODEL_ARCH.QWEN3, "qwen2": MODEL_ARCH.QWEN2}
TEXTS = ["def main(argv):\n    return 0\n", "Hello, world! 12345 apples", "  spaces\tand\nnewlines  ", "naïve café ✓"]


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's conversion of HF q/k rows for its interleaved RoPE (what unpermute_qk undoes)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def random_q4k(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Valid Q4_K bytes (no Python quantizer exists for K-quants): random nibbles and scales, small f16 d/dmin."""
    blocks = rng.integers(0, 256, size=(rows, cols // 256, 144), dtype=np.uint8)
    blocks[..., 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    blocks[..., 2:4] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    return blocks.reshape(rows, -1)


def spm_vocab() -> tuple[list[str], list[int], list[float]]:
    """A SentencePiece vocabulary as llama.cpp writes one ("llama" tokenizer model): <unk>, <s>, </s>, the 256 byte
    fallback tokens, then pieces with "▁" for a space, scored by rank (the converter merges by score)."""
    pieces = ["▁", *string.ascii_letters, *string.digits, *string.punctuation,
              "▁t", "he", "▁the", "▁a", "in", "▁in", "er", "re", "on", "▁(", "):", "de", "▁de", "▁def"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    types = [2, CONTROL, CONTROL, *[BYTE] * 256, *[1] * len(pieces)]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return tokens, types, scores


def write_gguf(path, model: CausalLM, arch: str, qtype=Q.F32, tokenizer_dir=TEST_MODEL, pre="gpt2",
               raw: dict | None = None, spm: tuple | None = None) -> dict[str, torch.Tensor]:
    """Write `model` as llama.cpp would; return the HF-named weights a correct loader must reproduce. `spm`:
    a SentencePiece vocabulary (spm_vocab()) instead of the tokenizer directory's byte-level BPE."""
    cfg = model.config
    w = GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    if spm:  # no add_bos flag: llama.cpp's default for SentencePiece is to add BOS
        tokens, types, scores = spm
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_scores(scores)
        w.add_unk_token_id(0)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
    else:
        tj = json.loads((tokenizer_dir / "tokenizer.json").read_text())
        vocab = sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])
        special = {t["id"] for t in tj["added_tokens"] if t["special"]}
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list([t for t, _ in vocab])
        w.add_token_types([3 if i in special else 1 for _, i in vocab])
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
        w.add_bos_token_id(0)
        w.add_eos_token_id(2)
        w.add_add_bos_token(False)
    w.add_chat_template(json.loads((tokenizer_dir / "tokenizer_config.json").read_text())["chat_template"])
    names = get_tensor_name_map(ARCHS[arch], cfg.num_hidden_layers)
    expected = {}
    rng = np.random.default_rng(0)
    for hf, t in model.state_dict().items():
        if cfg.tie_word_embeddings and hf == "lm_head.weight":
            continue
        gname = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        data = t.float()
        if arch == "llama" and gname.endswith((".attn_q.weight", ".attn_k.weight")):
            data = permute_qk(data, cfg.num_attention_heads if ".attn_q." in gname else cfg.num_key_value_heads)
        arr = data.numpy()
        kind = (raw or {}).get(gname, qtype if arr.ndim == 2 else Q.F32)
        if kind == Q.F32:
            w.add_tensor(gname, arr)
            back = arr
        elif kind == Q.F16:
            w.add_tensor(gname, arr.astype(np.float16))
            back = arr.astype(np.float16).astype(np.float32)
        elif kind == Q.Q4_K:
            blocks = random_q4k(*arr.shape, rng)
            w.add_tensor(gname, blocks, raw_dtype=kind)
            back = quants.dequantize(blocks, kind).reshape(arr.shape)
        elif kind == Q.Q8_1:  # no dequantizer in gguf: the loader must refuse it by name
            block, size = GGML_QUANT_SIZES[kind]
            w.add_tensor(gname, np.zeros((arr.shape[0], arr.shape[1] // block * size), np.uint8), raw_dtype=kind)
            back = arr
        else:
            packed = quants.quantize(arr, kind)
            w.add_tensor(gname, packed, raw_dtype=kind)
            back = quants.dequantize(packed, kind).reshape(arr.shape)
        back = torch.from_numpy(np.array(back, dtype=np.float32))
        if arch == "llama" and gname.endswith((".attn_q.weight", ".attn_k.weight")):
            back = unpermute_qk(back, cfg.num_attention_heads if ".attn_q." in gname else cfg.num_key_value_heads)
        expected[hf] = back
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.fixture(scope="module")
def tiny():
    return load_model(TEST_MODEL)


def llama_like(tiny: CausalLM, **config) -> CausalLM:
    """A random Llama (no q/k norm, untied head) the tiny model's size, to exercise the q/k permutation."""
    d = dict(tiny.config.hf_config, architectures=["LlamaForCausalLM"], tie_word_embeddings=False, **config)
    torch.manual_seed(0)
    m = CausalLM(ModelConfig.from_dict(d))
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return m.eval()


def logits(model: CausalLM, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model.logits(model(torch.tensor([ids]))[0])[0]


def reference(model: CausalLM, weights: dict[str, torch.Tensor]) -> CausalLM:
    ref = CausalLM(model.config)  # ties lm_head to the embeddings itself when the config says so
    state = {**model.state_dict(), **weights}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    ref.load_state_dict(state, strict=False)
    return ref.eval()


@pytest.mark.parametrize("arch,qtype", [("qwen3", q) for q in (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1,
                                                                  Q.Q5_0, Q.Q4_K)]
                         + [("llama", Q.F32), ("llama", Q.Q4_1)])
def test_gguf_weights_equal_the_dequantized_original(tmp_path, tiny, arch, qtype):
    src = tiny if arch == "qwen3" else llama_like(tiny)
    expected = write_gguf(tmp_path / "m.Q.gguf", src, arch, qtype)
    loaded = load_model(tmp_path / "m.Q.gguf")
    assert loaded.config.architecture == src.config.architecture
    assert loaded.config.tie_word_embeddings == src.config.tie_word_embeddings
    state = loaded.state_dict()
    for name, want in expected.items():
        assert torch.equal(state[name], want), name
    ids = Tokenizer(TEST_MODEL).encode(TEXTS[0])
    torch.testing.assert_close(logits(loaded, ids), logits(reference(src, expected), ids), rtol=0, atol=1e-4)
    if qtype == Q.F32:  # lossless file: the very model that was written
        torch.testing.assert_close(logits(loaded, ids), logits(src, ids), rtol=0, atol=1e-4)


def test_gguf_tokenizer_and_chat_template_match_the_hf_directory(tmp_path, tiny):
    write_gguf(tmp_path / "m.gguf", tiny, "qwen3")
    ours, hf = Tokenizer(tmp_path / "m.gguf"), Tokenizer(TEST_MODEL)
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>"]:
        assert ours.encode(text) == hf.encode(text), text
        assert ours.decode(ours.encode(text)) == hf.decode(hf.encode(text))
    msgs = [{"role": "user", "content": "What is 2 + 2?"}]
    assert ours.encode_chat(msgs) == hf.encode_chat(msgs)
    assert ours.eos_ids == [2] and ours.eos_token == "<|im_end|>" and ours.special_ids == hf.special_ids


def test_smollm_pre_tokenizer_splits_digits(tmp_path, tiny):
    """llama.cpp's "smollm" pre-type splits numbers into single digits before the GPT-2 regex."""
    write_gguf(tmp_path / "m.gguf", tiny, "qwen3", pre="smollm")
    tok = Tokenizer(tmp_path / "m.gguf")
    assert [tok.decode([i]) for i in tok.encode("x 2024")][-4:] == ["2", "0", "2", "4"]


def test_engine_serves_a_gguf_directory(tmp_path, tiny):
    """A directory holding one .gguf is a model; greedy output equals the HF directory's."""
    write_gguf(tmp_path / "tiny-qwen3-5m.F32.gguf", tiny, "qwen3")
    eng = LLMEngine(Settings(model=str(tmp_path), speculative="none"))
    ref = LLMEngine(Settings(model=str(TEST_MODEL), speculative="none"))
    prompts = [ref.tokenizer.encode(t) for t in TEXTS]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    assert [s.token_ids for s in eng.generate(prompts, params)] == [s.token_ids for s in ref.generate(prompts, params)]
    assert Settings(model=str(tmp_path)).model_name == "tiny-qwen3-5m"
    assert model_name(tmp_path / "SmolLM2-135M-Instruct.Q4_K_M.gguf") == "SmolLM2-135M-Instruct"


def test_unsupported_architecture_is_named_at_start_up(tmp_path, tiny):
    write_gguf(tmp_path / "m.gguf", tiny, "qwen3")
    data = (tmp_path / "m.gguf").read_bytes().replace(b"qwen3", b"phi42")  # arch value and key prefixes
    (tmp_path / "phi.gguf").write_bytes(data)
    with pytest.raises(ValueError, match="architecture 'phi42' is not supported"):
        LLMEngine(Settings(model=str(tmp_path / "phi.gguf"), speculative="none"))


def test_tensor_type_without_dequantizer_is_named(tmp_path, tiny):
    write_gguf(tmp_path / "m.gguf", tiny, "qwen3", raw={"blk.1.ffn_up.weight": Q.Q8_1})
    with pytest.raises(ValueError, match="blk.1.ffn_up.weight has type Q8_1"):
        load_model(tmp_path / "m.gguf")


def test_unknown_pre_tokenizer_is_refused(tmp_path, tiny):
    write_gguf(tmp_path / "m.gguf", tiny, "qwen3", pre="no-such-pre")
    with pytest.raises(ValueError, match="pre-tokenizer 'no-such-pre' is not supported"):
        Tokenizer(tmp_path / "m.gguf")


def test_sentencepiece_gguf_is_served_end_to_end(tmp_path, tiny):
    """A SentencePiece ("llama") vocabulary goes through transformers' GGUF converter: pieces and byte fallback
    round-trip, BOS is added as llama.cpp does, and `dspark serve` answers with the in-process engine's text."""
    tokens, types, scores = spm_vocab()
    path = tmp_path / "spm-llama.F32.gguf"
    write_gguf(path, llama_like(tiny, vocab_size=len(tokens)), "llama", spm=(tokens, types, scores))
    tok = Tokenizer(path)
    for text in ("def the(x): in", "naïve café ✓", TEXTS[0].strip()):
        ids = tok.encode(text)
        assert ids[0] == 1 and tok.decode(ids) == text, text
    pieces = [tokens[i] for i in tok.encode("def the(x): in")[1:]]
    assert pieces == ["▁def", "▁the", "(", "x", "):", "▁in"]
    assert tok.encode("✓")[1:] == [tokens.index("▁"), *(3 + b for b in "✓".encode())]  # the UTF-8 bytes
    assert tok.eos_ids == [2]

    eng = LLMEngine(Settings(model=str(path), speculative="none"))
    prompt, no_bytes = tok.encode("def the"), {3 + b: -100 for b in range(256)}  # whole characters only
    want = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=8, logit_bias=no_bytes))[0].output_ids
    server = Server(["--model", str(path), "--speculative", "none"])
    try:
        r = httpx.post(server.url + "/v1/completions", timeout=60,
                       json={"model": "spm-llama", "prompt": "def the", "max_tokens": 8, "temperature": 0,
                             "logit_bias": {str(i): v for i, v in no_bytes.items()}})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == tok.decode(prompt + want)[len("def the"):] != ""
        assert r.json()["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(want),
                                     "total_tokens": len(prompt) + len(want)}
        r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                       json={"model": "spm-llama", "messages": [{"role": "user", "content": "in the"}],
                             "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200 and isinstance(r.json()["choices"][0]["message"]["content"], str), r.text
    finally:
        server.stop()
