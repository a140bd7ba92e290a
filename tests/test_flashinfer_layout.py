"""FlashInfer's page-table inputs, built by our code, checked on the CPU.

The CUDA kernels themselves run in tests/gpu/. Here a plain-torch emulation of FlashInfer's documented semantics
(CSR pages, last-page length, causal attention bottom-right aligned to each request's keys) consumes the layout
our backend builds, and must reproduce dense attention on ragged batches over scattered pages."""

import pytest
import torch
from test_attention import dense, make_case

from dspark.kernels import make_backend
from dspark.kernels.flashinfer_backend import paged_kv_layout, token_rows


def emulate(layout, q, cache, block_size, scale):
    """What BatchPrefill/BatchDecodeWithPagedKVCacheWrapper compute from these inputs (NHD pages, causal)."""
    k_cache, v_cache = cache
    out = []
    for r in range(len(layout.qo_indptr) - 1):
        pages = layout.kv_indices[layout.kv_indptr[r] : layout.kv_indptr[r + 1]].long()
        n = (len(pages) - 1) * block_size + int(layout.kv_last_page_len[r])
        k = k_cache[pages].reshape(-1, *k_cache.shape[2:])[:n]
        v = v_cache[pages].reshape(-1, *v_cache.shape[2:])[:n]
        out.append(dense(q[layout.qo_indptr[r] : layout.qo_indptr[r + 1]], k, v, scale))
    return torch.cat(out)


@pytest.mark.parametrize("seed", range(8))
def test_layout_reproduces_attention_on_ragged_batches(seed):
    g = torch.Generator().manual_seed(100 + seed)
    b = int(torch.randint(1, 7, (1,), generator=g))
    q_lens = torch.randint(1, 9, (b,), generator=g)
    q_lens[0] = 1  # always at least one plain decode next to the chunks / drafts
    kv_lens = (q_lens + torch.randint(0, 30, (b,), generator=g)).tolist()
    q_lens = q_lens.tolist()
    meta, q, k, v, (kc, vc), ref = make_case(q_lens, kv_lens, seed)
    kc.view(-1, *kc.shape[2:])[meta.slot_mapping] = k  # the backend's cache write
    vc.view(-1, *vc.shape[2:])[meta.slot_mapping] = v
    dec = [r for r in range(b) if q_lens[r] == 1]
    pre = [r for r in range(b) if q_lens[r] > 1]
    out = torch.empty_like(ref)
    for group in (dec, pre):
        if group:
            rows = token_rows(q_lens, group)
            lay = paged_kv_layout(meta, group)
            assert lay.kv_indices.dtype == torch.int32 and int(lay.qo_indptr[-1]) == len(rows)
            assert all(1 <= int(x) <= meta.block_size for x in lay.kv_last_page_len)
            out[rows] = emulate(lay, q[rows], (kc, vc), meta.block_size, q.shape[-1] ** -0.5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_layout_after_rollback_is_a_length_change():
    """Dropping rejected draft tokens shortens kv_len; the layout then names fewer pages / a shorter last page."""
    meta, *_ = make_case([1], [9], 0)
    full = paged_kv_layout(meta, [0])
    meta.kv_lens = [4]  # rolled back to 4 tokens
    short = paged_kv_layout(meta, [0])
    assert short.kv_indices.tolist() == full.kv_indices.tolist()[:1] and short.kv_last_page_len.tolist() == [4]


def test_flashinfer_backend_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: covered by tests/gpu")
    with pytest.raises(ValueError, match="needs CUDA"):
        make_backend("flashinfer", num_qo_heads=4, num_kv_heads=2, head_dim=64)
