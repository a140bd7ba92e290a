"""The torch paged-attention backend equals dense causal attention on ragged batches with scattered pages; so does
its `row_op` mode, cpu_attention.cpp's op, whose rows are also the same bits alone, in any batch, on any thread
count."""

import pytest
import torch
import torch.nn.functional as F

from dspark.kernels import cpu_quant, cpu_rows_op
from dspark.kernels.base import AttentionMetadata
from dspark.kernels.torch_backend import TorchPagedAttention

needs_op = pytest.mark.skipif(cpu_quant.unavailable() is not None, reason="cpu_attention.cpp does not build here")


def dense(q, k, v, scale):
    # q [Lq, H, D], k/v [Lk, Hkv, D]; queries are the last Lq positions of Lk keys
    lq, lk = q.shape[0], k.shape[0]
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    mask = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
    return F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                          attn_mask=mask, scale=scale).transpose(0, 1)


def make_case(q_lens, kv_lens, seed=0, head_dim=8):
    """A ragged batch over scattered pages: (metadata, q, new k, new v, (k_cache, v_cache), dense reference)."""
    g = torch.Generator().manual_seed(seed)
    h, hkv, d, bs, nblocks = 4, 2, head_dim, 4, 64
    kc = torch.zeros(nblocks, bs, hkv, d)
    vc = torch.zeros(nblocks, bs, hkv, d)
    perm = torch.randperm(nblocks, generator=g).tolist()  # scattered physical pages
    tables, slots, full_k, full_v = [], [], [], []
    qs, ks, vs = [], [], []
    for ql, kl in zip(q_lens, kv_lens):
        nb = -(-kl // bs)
        table = [perm.pop() for _ in range(nb)]
        tables.append(table)
        k_all, v_all = torch.randn(kl, hkv, d, generator=g), torch.randn(kl, hkv, d, generator=g)
        full_k.append(k_all)
        full_v.append(v_all)
        # the old part is already in the cache; the new part is written by the backend
        for p in range(kl - ql):
            kc[table[p // bs], p % bs] = k_all[p]
            vc[table[p // bs], p % bs] = v_all[p]
        slots += [table[p // bs] * bs + p % bs for p in range(kl - ql, kl)]
        qs.append(torch.randn(ql, h, d, generator=g))
        ks.append(k_all[kl - ql:])
        vs.append(v_all[kl - ql:])
    width = max(map(len, tables))
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    meta = AttentionMetadata(list(q_lens), list(kv_lens), bt, torch.tensor(slots), bs)
    ref = torch.cat([dense(q, k, v, d**-0.5) for q, k, v in zip(qs, full_k, full_v)])
    return meta, torch.cat(qs), torch.cat(ks), torch.cat(vs), (kc, vc), ref


def run_case(q_lens, kv_lens, seed=0, row_op=False):
    meta, q, k, v, cache, ref = make_case(q_lens, kv_lens, seed)
    be = TorchPagedAttention(row_op, row_op, row_op)
    be.plan(meta)
    out = be.forward(0, q, k, v, cache, q.shape[-1] ** -0.5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_decode_batch():
    run_case([1, 1, 1], [5, 17, 1])


def test_mixed_prefill_decode_verify():
    run_case([7, 1, 4, 13], [7, 9, 22, 30], seed=1)


def test_random_ragged_batches():
    g = torch.Generator().manual_seed(3)
    for seed in range(10):
        b = int(torch.randint(1, 6, (1,), generator=g))
        q = torch.randint(1, 9, (b,), generator=g)
        extra = torch.randint(0, 20, (b,), generator=g)
        run_case(q.tolist(), (q + extra).tolist(), seed=seed)


def test_prefill_chunks_mixed_with_decode_and_verify_rows_attend_in_two_parts():
    """Long chunks interleaved with short rows: the short part is not padded to the chunk (checked: two parts)."""
    g = torch.Generator().manual_seed(7)
    for seed, q_lens in enumerate([[40, 1, 1, 5], [1, 33, 8, 17, 1], [17, 16]]):
        extra = torch.randint(0, 30, (len(q_lens),), generator=g).tolist()
        meta, q, k, v, cache, ref = make_case(q_lens, [a + b for a, b in zip(q_lens, extra)], seed)
        be = TorchPagedAttention()
        be.plan(meta)
        assert be.parts is not None and len(be.parts) == 2
        out = be.forward(0, q, k, v, cache, q.shape[-1] ** -0.5)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_single_request_decode_scattered_and_consecutive_pages():
    run_case([1], [23], seed=4)  # scattered pages: gathered
    meta, q, k, v, (kc, vc), ref = make_case([1], [23], seed=5)
    n = meta.block_tables.shape[1]  # move its pages to blocks 7, 8, ...: read in place, no gather
    kc2, vc2 = torch.zeros_like(kc), torch.zeros_like(vc)
    kc2[7 : 7 + n], vc2[7 : 7 + n] = kc[meta.block_tables[0]], vc[meta.block_tables[0]]
    slot = meta.slot_mapping[0]
    page = (meta.block_tables[0] == slot // meta.block_size).nonzero()[0, 0]
    meta.slot_mapping = torch.tensor([(7 + page) * meta.block_size + slot % meta.block_size])
    meta.block_tables = torch.arange(7, 7 + n)[None]
    be = TorchPagedAttention()
    be.plan(meta)
    assert be.first_page == 7
    out = be.forward(0, q, k, v, (kc2, vc2), q.shape[-1] ** -0.5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_decode_bf16_close_to_fp32():
    meta, q, k, v, (kc, vc), ref = make_case([1, 1], [9, 30], seed=6)
    be = TorchPagedAttention()
    be.plan(meta)
    out = be.forward(0, q.bfloat16(), k.bfloat16(), v.bfloat16(), (kc.bfloat16(), vc.bfloat16()), q.shape[-1] ** -0.5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


def paged(seed, cache_dtype, rows=6, n_kv=3, h=9, d=64, bs=16, blocks=40, pages=8):
    """Random q [rows, h, d], paged caches, each row's own scattered pages and a length crossing pages."""
    g = torch.Generator().manual_seed(seed)
    kc = torch.randn(blocks, bs, n_kv, d, generator=g).to(cache_dtype)
    vc = torch.randn(blocks, bs, n_kv, d, generator=g).to(cache_dtype)
    tables = torch.stack([torch.randperm(blocks, generator=g)[:pages] for _ in range(rows)])
    lens = torch.tensor([1, 7, 16, 17, 100, 128][:rows])
    return torch.randn(rows, h, d, generator=g) * 3, kc, vc, tables, lens


@needs_op
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_row_op_equals_float64_attention(cache_dtype):
    assert cpu_rows_op()
    q, kc, vc, tables, lens = paged(0, cache_dtype)
    out = torch.ops.dspark_cpu.paged_attention(q, kc, vc, tables, lens, 0.125)
    g = q.shape[1] // kc.shape[2]
    for t in range(len(q)):
        keys = kc[tables[t]].flatten(0, 1)[: lens[t]].double().repeat_interleave(g, 1)  # [L, H, D]
        values = vc[tables[t]].flatten(0, 1)[: lens[t]].double().repeat_interleave(g, 1)
        p = torch.softmax(torch.einsum("hd,lhd->hl", q[t].double(), keys) * 0.125, -1)
        torch.testing.assert_close(out[t].double(), torch.einsum("hl,lhd->hd", p, values), atol=1e-5, rtol=1e-5)


@needs_op
def test_row_op_gives_a_row_the_same_bits_alone_in_any_batch_and_on_any_thread_count():
    assert cpu_rows_op()
    q, kc, vc, tables, lens = paged(1, torch.float32)
    threads = torch.get_num_threads()
    try:
        every = torch.ops.dspark_cpu.paged_attention(q, kc, vc, tables, lens, 0.125)
        torch.set_num_threads(1)
        assert torch.equal(every, torch.ops.dspark_cpu.paged_attention(q, kc, vc, tables, lens, 0.125))
    finally:
        torch.set_num_threads(threads)
    for t in range(len(q)):
        alone = torch.ops.dspark_cpu.paged_attention(q[t : t + 1], kc, vc, tables[t : t + 1], lens[t : t + 1], 0.125)
        assert torch.equal(alone[0], every[t])
    reordered = torch.ops.dspark_cpu.paged_attention(q.flip(0), kc, vc, tables.flip(0), lens.flip(0), 0.125)
    assert torch.equal(reordered.flip(0), every)


@needs_op
def test_row_op_backend_equals_dense_on_decode_verify_and_mixed_steps():
    """Short rows by the op, longer chunks by SDPA (one call each), in one step."""
    assert cpu_rows_op()
    run_case([1, 1, 1], [5, 17, 1], row_op=True)
    run_case([7, 1, 4, 13], [7, 9, 22, 30], seed=1, row_op=True)
    for seed, q_lens in enumerate([[40, 1, 1, 5], [1, 33, 8, 17, 1], [17, 16]]):
        run_case(q_lens, [q + 3 * seed + 2 for q in q_lens], seed=seed, row_op=True)
