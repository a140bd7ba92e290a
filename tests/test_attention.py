"""The torch paged-attention backend equals dense causal attention on ragged batches with scattered pages."""

import torch
import torch.nn.functional as F

from dspark.kernels.base import AttentionMetadata
from dspark.kernels.torch_backend import TorchPagedAttention


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


def run_case(q_lens, kv_lens, seed=0):
    meta, q, k, v, cache, ref = make_case(q_lens, kv_lens, seed)
    be = TorchPagedAttention()
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
