"""Our engine loads checkpoints written by transformers' save_pretrained and matches its logits (fp32).

Tiny random Qwen3 / Llama models are built from configs here (no hub); decode runs step by step through the
paged KV cache and the torch paged-attention backend, so the serving path is checked, not only the dense one.
"""

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from dspark.engine.model import load_model  # noqa: E402
from dspark.engine.runner import ModelRunner  # noqa: E402
from dspark.kernels.torch_backend import TorchPagedAttention  # noqa: E402
from dspark.scheduler.block_manager import BlockManager  # noqa: E402

COMMON = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)

CASES = {
    "qwen3-tied": lambda: transformers.Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=True),
    "llama-untied": lambda: transformers.LlamaConfig(**COMMON, tie_word_embeddings=False, rope_theta=500000.0),
    "llama3-rope-scaling": lambda: transformers.LlamaConfig(
        **COMMON, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    torch.manual_seed(0)
    cfg = CASES[request.param]()
    cls = transformers.Qwen3ForCausalLM if cfg.model_type == "qwen3" else transformers.LlamaForCausalLM
    hf = cls(cfg).eval()
    with torch.no_grad():  # random init gives near-uniform logits; widen them so comparisons mean something
        for p in hf.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path, max_shard_size="100KB")  # sharded: exercises the index file
    return hf, path


def test_sharded_checkpoint_written(checkpoint):
    _, path = checkpoint
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("*.safetensors"))) > 1


def test_prefill_logits_match(checkpoint):
    hf, path = checkpoint
    ours = load_model(path)
    ids = torch.randint(0, 211, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        h, _ = ours(ids)
        got = ours.logits(h)
    assert ref.abs().max() > 1.0
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)


def test_paged_decode_matches_hf_step_by_step(checkpoint):
    """Prefill in ragged chunks of two requests, then decode token by token through the paged cache."""
    hf, path = checkpoint
    ours = load_model(path)
    bm = BlockManager(num_blocks=40, block_size=4)
    runner = ModelRunner(ours, TorchPagedAttention(), 40, 4)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 211, (n,), generator=g).tolist() for n in (11, 6)]
    seqs = [list(p) for p in prompts]
    computed = [0, 0]
    # step 1: first chunk of request 0 only; step 2: rest of 0 + all of 1 (chunked prefill mixed in one batch)
    plan = [[(0, 5)], [(0, 6), (1, 6)]]
    for step in plan:
        chunks, sids, idx, off = [], [], [], 0
        for r, n in step:
            bm.allocate(r, computed[r] + n)
            chunks.append((seqs[r][computed[r]: computed[r] + n], computed[r]))
            sids.append(r)
            off += n
            idx.append(off - 1)
        runner.forward(chunks, bm, sids, idx)
        for r, n in step:
            computed[r] += n
    for _ in range(12):  # greedy decode, both requests in one batch
        chunks = []
        for r in (0, 1):
            with torch.no_grad():
                ref = hf(torch.tensor([seqs[r]])).logits[0, -1]
            seqs[r].append(int(ref.argmax()))
            bm.allocate(r, computed[r] + 1)
            chunks.append(([seqs[r][-1]], computed[r]))
        logits, _ = runner.forward(chunks, bm, [0, 1], [0, 1])
        for r in (0, 1):
            computed[r] += 1
            with torch.no_grad():
                ref = hf(torch.tensor([seqs[r]])).logits[0, -1]
            torch.testing.assert_close(logits[r], ref, atol=2e-4, rtol=1e-4)
    bm.check()


def test_tokenizer_and_chat_template_match_transformers(tmp_path):
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models, pre_tokenizers, trainers

    from dspark.engine.tokenizer import CHATML_TEMPLATE, IM_END, IM_START, Tokenizer, format_chatml

    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["def add(a, b):\n    return a + b\n"] * 50 + ["héllo wörld ✓"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", IM_START, IM_END],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"),
                                                eos_token=IM_END, pad_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(tmp_path)
    ours = Tokenizer(tmp_path)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo ✓ def add"}]
    text = fast.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(msgs) == text == format_chatml(msgs, add_generation_prompt=True)
    assert ours.encode_chat(msgs) == fast(text, add_special_tokens=False)["input_ids"]
    assert ours.eos_ids == [tok.token_to_id(IM_END)]


def test_fused_serving_layout_keeps_hf_names_and_logits(checkpoint):
    """fuse_() (done by ModelRunner) keeps state_dict() under HF names with the same values, and the same logits;
    bf16 weights get oneDNN-packed projections that give at::linear's numbers."""
    hf, path = checkpoint
    ours = load_model(path)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    ids = torch.randint(0, 211, (2, 19), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = ours.logits(ours(ids)[0])
    assert ours.fuse_(pack_fp32=False) is ours.fuse_()  # idempotent
    after = ours.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    attn = ours.model.layers[0].self_attn
    assert attn.q_proj.weight.data_ptr() == attn.qkv.weight.data_ptr()  # a view of the fused weight, not a copy
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(ours(ids)[0]), ref, atol=1e-5, rtol=1e-5)
        packed = load_model(path).fuse_(pack_fp32=True)  # oneDNN-packed fp32 (4..256 rows on Intel): 38 rows here
        torch.testing.assert_close(packed.logits(packed(ids)[0]), ref, atol=1e-4, rtol=1e-4)
    half = load_model(path, dtype=torch.bfloat16)
    x = torch.randn(3, 64).bfloat16()
    with torch.no_grad():
        plain = F.linear(x, half.model.layers[0].mlp.gate_proj.weight)
        half.fuse_()
        gate = half.model.layers[0].mlp.gate_up(x)[:, :96]
    torch.testing.assert_close(gate, plain, atol=0, rtol=0)


def test_fp32_projections_take_the_packed_path_at_every_row_count_where_mkl_runs_off_intel(monkeypatch):
    """Where at::linear's fp32 GEMM is MKL on a non-Intel CPU, fp32 projections are oneDNN-packed by default and
    every call takes that path; on Intel they stay at::linear's unless asked (then 4..256 rows). Where the rule
    applies (checked on such a machine), a row's output does not depend on how many rows share the call, so a
    verification step scores each token as a one-token decode step would."""
    from dspark.engine import model as M

    lin = torch.nn.Linear(64, 96, bias=False)
    if not M._dnn_packable(lin.weight):
        pytest.skip("this torch build has no oneDNN packed linear")
    here = M.mkl_off_intel()
    monkeypatch.setattr(M, "mkl_off_intel", lambda: True)
    on = M.ServingLinear([lin])
    assert on.packed is not None and on.rows == M.ALL_ROWS
    monkeypatch.setattr(M, "mkl_off_intel", lambda: False)
    assert M.ServingLinear([lin]).packed is None
    assert M.ServingLinear([lin], pack_fp32=True).rows == M.FP32_PACKED_ROWS
    x = torch.randn(9, 64)
    with torch.no_grad():
        torch.testing.assert_close(on(x), F.linear(x, lin.weight), atol=1e-5, rtol=1e-5)
        if here:
            assert all(torch.equal(on(x[:r])[0], on(x[:1])[0]) for r in (2, 4, 9))
