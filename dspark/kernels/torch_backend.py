"""The plain-torch attention backend: the reference every other backend is checked against (eager, and under a
CUDA-graph bucket's fixed shapes).

The KV cache of one layer is a pair (k_cache, v_cache), each [num_blocks, block_size, num_kv_heads, head_dim]
(FlashInfer's NHD paged layout), so a CUDA backend can take the same tensors and the block manager's tables.
A step is a ragged batch: request r brings q_lens[r] new tokens (a prefill chunk, one decode token, or a
draft to verify) and attends causally to kv_lens[r] keys, the new ones included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dspark.kernels.base import AttentionMetadata, write_paged_kv


class TorchPagedAttention:
    """Reference backend: gather each request's pages into a padded block and attend with plain torch ops.

    Keys are gathered by whole pages (one index_select of blocks per layer, not one index per key; none at all
    when a lone request's pages are consecutive). A step where every request brings one token (pure decode, the
    common case) builds no causal mask, and a length mask only when lengths differ; anything else (prefill
    chunks, drafts to verify, mixed) runs SDPA under a causal + length mask. A step mixing prefill chunks with
    decode or verify rows attends in two parts, so the short rows are not padded to the longest chunk (one
    200-token chunk among 63 decoding requests would otherwise make 64 x 200 query rows).

    Decode and short rows (drafts to verify) put the query heads that share a KV head in as rows of that head, so
    K/V are never expanded for GQA; short rows then need the causal mask once per head of the group. On a 2-core
    CPU that made a batch of 8 verifying 8 tokens attend in 2/3 of the time of SDPA's enable_gqa."""

    SHORT_Q = 16  # query rows up to this many (decode, drafts to verify) go in the short part of a mixed step

    def __init__(self, row_invariant: bool = False, one_call_each: bool = False, row_op: bool = False):
        # `--deterministic` (issue 39): every step attends whole pages, masked, and short rows (drafts to verify)
        # are attended as decode rows, each a one-query request of its own length, so that a row gets the very
        # bits its decode step would give it.
        # `one_call_each` (float32 there): every decode or draft row, and every longer chunk, is its own SDPA call,
        # the very call its request makes when it runs alone. CPU SDPA in float32 is not batch-invariant: its
        # q.k^T and p.v products are MKL sgemm calls on per-thread scratch buffers, whose bits depend on those
        # buffers' alignment (sgemm's results change with a 4-byte shift of a pointer: measured), so a head gets
        # other bits on another thread, and how the (batch, head) items are spread over threads depends on the
        # batch (e.g. 3 KV heads, 2 threads: a lone request's head 2 runs on thread 1, in a batch of 2 on thread
        # 0). bf16 SDPA (oneDNN's brgemm) is batch-invariant as is.
        # `row_op` (float32 on a CPU where dspark/kernels/cpu_attention.cpp builds): one_call_each's short rows all
        # in one call of that op instead, whose rows are batch-invariant by construction.
        self.row_invariant, self.one_call_each = row_invariant, row_invariant and one_call_each
        self.row_op = self.one_call_each and row_op

    def plan(self, meta: AttentionMetadata) -> None:
        self.parts = self.units = None
        if self.one_call_each:
            self._plan_units(meta)
            return
        short = [q <= self.SHORT_Q for q in meta.q_lens]
        if max(meta.q_lens) > self.SHORT_Q and any(short):
            dev = meta.slot_mapping.device
            starts = [0]
            for q in meta.q_lens:
                starts.append(starts[-1] + q)
            self.slot_mapping, self.parts = meta.slot_mapping, []
            for want in (True, False):
                rows = [i for i, s in enumerate(short) if s == want]
                tok = torch.tensor([t for r in rows for t in range(starts[r], starts[r + 1])], device=dev)
                sub = TorchPagedAttention(self.row_invariant)
                sub._plan(AttentionMetadata([meta.q_lens[r] for r in rows], [meta.kv_lens[r] for r in rows],
                                            meta.block_tables[torch.tensor(rows, device=dev)], meta.slot_mapping[tok],
                                            meta.block_size))
                self.parts.append((sub, tok))
            return
        self._plan(meta)

    def _plan_units(self, meta: AttentionMetadata) -> None:
        """`one_call_each`: one lone-request plan per call, each over a range of the flat tokens: a token of a
        short row (decode, a draft to verify) as the decode step of its own position; a longer chunk whole."""
        self.slot_mapping, self.units, start = meta.slot_mapping, [], 0
        self.op_rows = None  # row_op: (token indices, or None for all; their pages [T, P]; keys seen [T])
        owner, lens, tok = [], [], []
        for r, (ql, kl) in enumerate(zip(meta.q_lens, meta.kv_lens)):
            table = meta.block_tables[r : r + 1]
            if self.row_op and ql <= self.SHORT_Q:
                owner += [r] * ql
                lens += range(kl - ql + 1, kl + 1)
                tok += range(start, start + ql)
                start += ql
                continue
            calls = [(1, kl - ql + i + 1) for i in range(ql)] if ql <= self.SHORT_Q else [(ql, kl)]
            for q_len, kv_len in calls:
                unit = TorchPagedAttention(row_invariant=True)
                unit._plan(AttentionMetadata([q_len], [kv_len], table, meta.slot_mapping[start : start + q_len],
                                             meta.block_size))
                self.units.append((unit, start, start + q_len))
                start += q_len
        if tok:
            dev = meta.slot_mapping.device
            n_pages = -(-max(lens) // meta.block_size)
            pages = meta.block_tables[:, :n_pages][torch.tensor(owner, device=dev)]
            index = None if len(tok) == start else torch.tensor(tok, device=dev)
            self.op_rows = (index, pages, torch.tensor(lens, device=dev))

    def _plan(self, meta: AttentionMetadata) -> None:
        dev = meta.slot_mapping.device
        b = len(meta.q_lens)
        self.batch = b
        self.slot_mapping = meta.slot_mapping
        self.max_q = max(meta.q_lens)
        max_kv = max(meta.kv_lens)
        n_pages = -(-max_kv // meta.block_size)
        if self.row_invariant:
            # whole pages, masked past each length: CPU SDPA's reduction over keys cut at an exact length (e.g.
            # 31) gives other bits than over the same keys padded and masked (measured), so every step attends
            # a multiple of the page size, and a row's keys are reduced alike in any step
            max_kv = n_pages * meta.block_size
        pages = meta.block_tables[:, :n_pages]
        self.n_pages, self.width, self.max_kv, self.first_page = n_pages, n_pages * meta.block_size, max_kv, None
        self.pages = pages.reshape(-1)  # [B * n_pages]: whole pages are gathered, then cut to max_kv keys
        if b == 1:  # one request whose pages are consecutive (usual for a fresh one): a view, no gather
            first = int(pages[0, 0])
            if n_pages == 1 or bool((pages[0] == torch.arange(first, first + n_pages, device=dev)).all()):
                self.first_page = first
        if self.max_q == 1:  # decode: one query per request
            self.mask = None  # additive: -inf past each request's length (none when all lengths are equal)
            if min(meta.kv_lens) != max_kv:
                kv_lens = torch.tensor(meta.kv_lens, device=dev)
                past = torch.arange(max_kv, device=dev)[None, :] >= kv_lens[:, None]
                self.mask = torch.zeros(b, 1, 1, max_kv, device=dev).masked_fill_(past[:, None, None, :], float("-inf"))
            return
        q_lens = torch.tensor(meta.q_lens, device=dev)
        kv_lens = torch.tensor(meta.kv_lens, device=dev)
        j = torch.arange(max_kv, device=dev)
        i = torch.arange(self.max_q, device=dev)
        qpos = (kv_lens - q_lens)[:, None] + i[None, :]  # absolute position of each padded query row
        mask = (j[None, None, :] <= qpos[:, :, None]) & (j[None, None, :] < kv_lens[:, None, None])
        pad_rows = i[None, :] >= q_lens[:, None]
        mask[:, :, 0] |= pad_rows  # padded query rows see key 0 only, so softmax stays finite
        self.mask = mask.unsqueeze(1)  # [B, 1, max_q, max_kv]
        self.row_mask = None  # short rows: the mask per (query head in its group, row), made by the first layer
        starts = torch.cumsum(q_lens, 0) - q_lens
        owner = torch.repeat_interleave(torch.arange(b, device=dev), q_lens)
        offset = torch.arange(int(q_lens.sum()), device=dev) - starts[owner]
        self.pad_index = owner * self.max_q + offset  # flat token -> row in the padded [B*max_q] layout
        if self.row_invariant and self.max_q <= self.SHORT_Q:
            # every token a decode request of its own: its request's keys, masked by its own row of the causal mask
            self.owner = owner
            seen = mask.view(b * self.max_q, max_kv)[self.pad_index]
            self.token_mask = torch.zeros(len(seen), 1, 1, max_kv, device=dev).masked_fill_(
                ~seen[:, None, None, :], float("-inf"))

    def forward(self, layer_idx, q, k, v, kv_cache, scale):
        write_paged_kv(kv_cache, self.slot_mapping, k, v)
        if self.units is not None:
            if self.op_rows is None:
                return torch.cat([unit._attend(q[a:b], kv_cache, scale) for unit, a, b in self.units])
            index, pages, lens = self.op_rows
            rows = torch.ops.dspark_cpu.paged_attention(q if index is None else q[index], *kv_cache, pages, lens,
                                                        scale)
            if index is None:
                return rows
            out = torch.empty_like(q)
            out[index] = rows
            for unit, a, b in self.units:
                out[a:b] = unit._attend(q[a:b], kv_cache, scale)
            return out
        if self.parts is None:
            return self._attend(q, kv_cache, scale)
        out = torch.empty_like(q)
        for sub, tok in self.parts:
            out[tok] = sub._attend(q[tok], kv_cache, scale)
        return out

    def _attend(self, q, kv_cache, scale):
        k_cache, v_cache = kv_cache
        n_kv, d = k_cache.shape[-2:]
        keys, values = self._gather(k_cache, v_cache, q.dtype)  # [B, Hkv, max_kv, D]
        b, h = self.batch, q.shape[1]
        if self.max_q == 1:  # one query per request, at its last position: no causal mask needed
            if self.mask is not None and self.mask.dtype != q.dtype:
                self.mask = self.mask.to(q.dtype)  # once per step, then every layer reuses it
            # The query heads sharing a KV head (GQA: head i reads KV head i // g) go in as g queries of that
            # head: no expansion of K/V, and about twice as fast as SDPA's enable_gqa here.
            out = F.scaled_dot_product_attention(q.view(b, n_kv, h // n_kv, d), keys, values, attn_mask=self.mask,
                                                 scale=scale)  # [B, Hkv, g, D]
            return out.reshape(b, h, d)
        if self.row_invariant and self.max_q <= self.SHORT_Q:  # as decode rows, one request per token
            if self.token_mask.dtype != q.dtype:
                self.token_mask = self.token_mask.to(q.dtype)
            # each token's copy of its request's keys, laid out as the decode path's are (a transposed view of
            # [tokens, keys, heads, dim]), so that SDPA sees the same strides as in a decode step
            keys = keys.transpose(1, 2)[self.owner].transpose(1, 2)
            values = values.transpose(1, 2)[self.owner].transpose(1, 2)
            out = F.scaled_dot_product_attention(q.view(len(q), n_kv, h // n_kv, d), keys, values,
                                                 attn_mask=self.token_mask, scale=scale)
            return out.reshape(len(q), h, d)
        qp = q.new_zeros(b * self.max_q, h, d).index_copy_(0, self.pad_index, q)
        if self.max_q <= self.SHORT_Q:  # drafts to verify, short chunks: the decode path's GQA-as-rows layout
            g, mq = h // n_kv, self.max_q
            if self.row_mask is None or self.row_mask.dtype != q.dtype:  # once per step: additive, (head, row)
                rows = self.mask.unsqueeze(2).expand(b, 1, g, mq, self.max_kv).reshape(b, 1, g * mq, self.max_kv)
                self.row_mask = torch.zeros(rows.shape, dtype=q.dtype, device=q.device).masked_fill_(
                    ~rows, float("-inf"))
            qr = qp.view(b, mq, n_kv, g, d).permute(0, 2, 3, 1, 4).reshape(b, n_kv, g * mq, d)
            out = F.scaled_dot_product_attention(qr, keys, values, attn_mask=self.row_mask, scale=scale)
            out = out.view(b, n_kv, g, mq, d).permute(0, 3, 1, 2, 4).reshape(b * mq, h, d)
            return out[self.pad_index]
        qp = qp.view(b, self.max_q, h, d)
        out = F.scaled_dot_product_attention(
            qp.transpose(1, 2), keys, values, attn_mask=self.mask, scale=scale, enable_gqa=h != n_kv
        ).transpose(1, 2)
        return out.reshape(b * self.max_q, h, d)[self.pad_index]

    def _gather(self, k_cache, v_cache, dtype):
        """Each request's keys and values, [B, Hkv, max_kv, D]: its pages, gathered whole (a view when they are
        consecutive) and cut to max_kv (keys past a request's own length are masked)."""
        if self.first_page is not None:
            end = self.first_page + self.n_pages
            keys, values = k_cache[self.first_page : end], v_cache[self.first_page : end]
        else:
            keys, values = k_cache.index_select(0, self.pages), v_cache.index_select(0, self.pages)
        n_kv, d = k_cache.shape[-2:]
        keys = keys.view(self.batch, self.width, n_kv, d)[:, : self.max_kv].transpose(1, 2)
        values = values.view(self.batch, self.width, n_kv, d)[:, : self.max_kv].transpose(1, 2)
        if keys.dtype != dtype:
            keys, values = keys.to(dtype), values.to(dtype)
        return keys, values


class TorchGraphAttention:
    """The torch reference under a CUDA-graph bucket's contract (dspark/engine/cuda_graphs.py), so the graph runner's
    padding runs on the CPU in CI: K/V of every row, padding included, go through the bucket's fixed slot buffer;
    only the planned rows are attended, and the rows past them come out NaN (FlashInfer writes zeros), so a padding
    row that reached a real one would show. Its plans keep FlashInfer's graph-mode rules: always `batch` requests,
    and never more rows than the first plan's."""

    def __init__(self, slots: torch.Tensor, batch: int):
        self.slots, self.batch, self.max_rows = slots, batch, None

    def plan(self, meta: AttentionMetadata) -> None:
        self.rows = sum(meta.q_lens)
        self.max_rows = self.max_rows or self.rows
        if len(meta.q_lens) != self.batch or self.rows > self.max_rows:
            raise ValueError(f"a graph bucket of {self.batch} requests, {self.max_rows} rows, planned with "
                             f"{len(meta.q_lens)} requests, {self.rows} rows")
        self.ref = TorchPagedAttention()
        self.ref.plan(AttentionMetadata(meta.q_lens, meta.kv_lens, meta.block_tables, self.slots[: self.rows],
                                        meta.block_size))

    def forward(self, layer_idx, q, k, v, kv_cache, scale):
        write_paged_kv(kv_cache, self.slots, k, v)
        out = torch.full_like(q, float("nan"))
        n = self.rows  # the reference writes those rows' K/V again, to the same slots
        out[:n] = self.ref.forward(layer_idx, q[:n], k[:n], v[:n], kv_cache, scale)
        return out
