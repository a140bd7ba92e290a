"""`--deterministic` (issue 39, started): attention attends each draft row as a decode row, float projections run
one row per call, quantized ones compute each row alone already; the aim is a token's logits with the same bits
whatever step it runs in, so that greedy speculation gives plain decoding's text in bfloat16 too."""

from __future__ import annotations

import pytest
import torch

from dspark.engine.llm_engine import LLMEngine
from dspark.engine.sampling import SamplingParams
from dspark.engine.settings import Settings
from dspark.kernels.base import AttentionMetadata
from dspark.kernels.torch_backend import TorchPagedAttention

TEST_MODEL = "models/tiny-qwen3-5m"


def test_a_verified_row_attends_as_its_decode_step_would():
    """bf16 only: torch 2.13's float32 SDPA on the CPU gives a row other bits with another batch size (measured:
    rows of a batch of 6 differ from the same rows in a batch of 2 by 3e-8), so float32 has no such guarantee."""
    dtype = torch.bfloat16
    torch.manual_seed(0)
    n_kv, h, d, bs = 2, 6, 64, 16
    shape = (16, bs, n_kv, d)
    cache = (torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype))
    tables = torch.tensor([[3, 7, 1, 9, 0, 0, 0, 0], [2, 5, 11, 4, 6, 0, 0, 0]])
    kv = [40, 71]  # request 0 verifies 5 rows at positions 35..39, request 1 decodes one at position 70
    q_lens = [5, 1]
    q = torch.randn(sum(q_lens), h, d, dtype=dtype)

    def slots(table, positions):
        return torch.tensor([int(table[p // bs]) * bs + p % bs for p in positions])

    def attend(backend, q, q_lens, kv_lens, rows):
        pos = [p for r, (ql, kl) in zip(rows, zip(q_lens, kv_lens)) for p in range(kl - ql, kl)]
        meta = AttentionMetadata(q_lens, kv_lens, tables[rows], torch.cat(
            [slots(tables[r], range(kl - ql, kl)) for r, ql, kl in zip(rows, q_lens, kv_lens)]), bs)
        backend.plan(meta)
        k, v = cache[0].view(-1, n_kv, d)[meta.slot_mapping], cache[1].view(-1, n_kv, d)[meta.slot_mapping]
        assert len(pos) == len(q)
        return backend.forward(0, q, k, v, cache, d**-0.5)

    together = attend(TorchPagedAttention(row_invariant=True), q, q_lens, kv, [0, 1])
    # the same rows as decode steps: each verified row alone with the keys up to it, beside the other request
    for i in range(5):
        alone = attend(TorchPagedAttention(), torch.stack([q[i], q[5]]), [1, 1], [kv[0] - 4 + i, kv[1]], [0, 1])
        assert torch.equal(together[i], alone[0]), i
        assert torch.equal(together[5], alone[1])


@pytest.mark.xfail(strict=True, reason="not reached yet: with --deterministic the chosen tokens' logprobs from "
                   "verification still leave plainly decoded ones after ~15 tokens on the tiny model (by ~5e-4), "
                   "though attention, RMSNorm and the per-row projections each measure row-invariant alone")
@pytest.mark.parametrize("quantization", ["none", "int4"])
def test_greedy_speculation_in_bf16_gives_the_text_of_plain_decoding(quantization):
    base = Settings(model=TEST_MODEL, dtype="bfloat16", quantization=quantization, deterministic=True,
                    draft_policy="fixed", num_kv_blocks=256)
    plain = LLMEngine(base.model_copy(update={"speculative": "none"}))
    spec = LLMEngine(base.model_copy(update={"speculative": "ngram", "ngram_min": 1}))
    tok = plain.tokenizer
    texts = ["1, 2, 3, 4, 5, 6, 7, 8,", "def f(x):\n    return x\n\ndef f(", "the cat sat on the mat. the cat",
             "Hello, world! Hello, world! Hello,", "a b c a b c a b", "import os\nimport sys\nimport"]
    prompts = [tok.encode(t) for t in texts]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=0)
    plain_seqs, spec_seqs = plain.generate(prompts, params), spec.generate(prompts, params)
    want = [s.output_ids for s in plain_seqs]
    assert spec.stats["accepted_tokens"] > 0
    assert [s.output_ids for s in spec_seqs] == want
    # not only the same argmax: the same bits, the chosen tokens' logprobs from verification equal decoding's
    assert [[lp[1] for lp in s.logprobs] for s in spec_seqs] == [[lp[1] for lp in s.logprobs] for s in plain_seqs]
    # and a request's text does not depend on the batch it shares: alone == among the others
    assert [s.output_ids for s in plain.generate(prompts[:1], params)] == want[:1]


def test_deterministic_needs_the_torch_backend():
    from dspark.kernels import make_backend

    with pytest.raises(ValueError, match="torch attention backend only"):
        make_backend("flashinfer", 4, 2, 64, "cuda", torch.bfloat16, row_invariant=True)
