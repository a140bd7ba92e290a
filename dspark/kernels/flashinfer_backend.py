"""FlashInfer attention over the shared paged KV cache (CUDA only; `pip install .[cuda]`).

Same cache tensors as the torch reference: per layer (k_cache, v_cache), each [num_blocks, block_size, Hkv, D]
(FlashInfer's NHD layout), pages named by the block manager's tables, so a rollback stays a length change.
Each step is split once, in `plan`: requests bringing one token (plain decode) go to
BatchDecodeWithPagedKVCacheWrapper; the rest (prefill chunks and drafts to verify, k_r + 1 query tokens each,
causal within the chain and bottom-right aligned to the request's keys) go to BatchPrefillWithPagedKVCacheWrapper.
Both wrappers are planned once per step and run by every layer. `flashinfer` is imported lazily: the CPU path
never needs it.

The index construction (`paged_kv_layout`) is plain torch and is tested on the CPU against the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dspark.kernels.base import AttentionMetadata, write_paged_kv

WORKSPACE_BYTES = 256 * 2**20


@dataclass
class PagedLayout:
    """FlashInfer's CSR description of a ragged batch over a paged cache (int32, on the metadata's device)."""

    qo_indptr: torch.Tensor  # [B+1] query rows of request r: qo_indptr[r]:qo_indptr[r+1]
    kv_indptr: torch.Tensor  # [B+1] pages of request r: kv_indices[kv_indptr[r]:kv_indptr[r+1]]
    kv_indices: torch.Tensor  # [sum pages] physical page ids, in order
    kv_last_page_len: torch.Tensor  # [B] tokens in each request's last page, 1..block_size


def paged_kv_layout(meta: AttentionMetadata, rows: list[int]) -> PagedLayout:
    """The CSR layout of the requests `rows` (indices into meta's batch), in that order.

    The indptr and last-page-length tensors are built on the host (plan() reads them there without a device
    sync); the page indices stay on the block table's device."""
    dev = meta.block_tables.device
    bs = meta.block_size
    q_lens = [meta.q_lens[r] for r in rows]
    kv_lens = [meta.kv_lens[r] for r in rows]
    pages = [(n + bs - 1) // bs for n in kv_lens]
    if any(n < 1 for n in kv_lens):
        raise ValueError("every request attends to at least one key (its own new token)")
    idx = torch.tensor(rows, dtype=torch.long, device=dev)
    width = max(pages)
    table = meta.block_tables[idx, :width]
    keep = torch.arange(width, device=dev)[None, :] < torch.tensor(pages, device=dev)[:, None]
    return PagedLayout(
        qo_indptr=_indptr(q_lens),
        kv_indptr=_indptr(pages),
        kv_indices=table[keep].to(torch.int32),
        kv_last_page_len=torch.tensor([n - (p - 1) * bs for n, p in zip(kv_lens, pages)], dtype=torch.int32),
    )


def plan_wrapper(wrapper, decode: bool, lay: PagedLayout, heads: tuple[int, int, int], dtype: torch.dtype,
                 scale: float, page_size: int) -> None:
    """Plan a decode wrapper, or a prefill wrapper (causal), over `lay`; heads = (query heads, KV heads, head dim)."""
    h, hkv, d = heads
    common = dict(num_qo_heads=h, num_kv_heads=hkv, page_size=page_size, q_data_type=dtype, kv_data_type=dtype,
                  sm_scale=scale)
    if decode:
        wrapper.plan(lay.kv_indptr, lay.kv_indices, lay.kv_last_page_len, head_dim=d, **common)
    else:
        wrapper.plan(lay.qo_indptr, lay.kv_indptr, lay.kv_indices, lay.kv_last_page_len, head_dim_qk=d,
                     causal=True, **common)


def write_kv(kv_cache, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, planned: float) -> None:
    """Check the layer's attention scale against the planned one, then write k/v at `slots` of the paged cache."""
    if abs(scale - planned) > 1e-6 * planned:
        raise ValueError(f"attention scale {scale} differs from the planned {planned}")
    write_paged_kv(kv_cache, slots, k, v)


def _indptr(lens: list[int]) -> torch.Tensor:
    out = torch.zeros(len(lens) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(lens, dtype=torch.int32).cumsum(0)
    return out


def token_rows(q_lens: list[int], requests: list[int]) -> list[int]:
    """Flat token indices belonging to `requests`, in request order (the runner lays requests out contiguously)."""
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    return [t for r in requests for t in range(starts[r], starts[r + 1])]


class FlashInferAttention:
    """The CUDA backend: decode wrapper for 1-token requests, prefill wrapper for chunks and verification."""

    def __init__(self, num_qo_heads: int, num_kv_heads: int, head_dim: int, device: str = "cuda",
                 dtype: torch.dtype = torch.bfloat16):
        if not torch.cuda.is_available():
            raise ValueError("the flashinfer attention backend needs CUDA; use --attention-backend torch on CPU")
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"the flashinfer attention backend runs bfloat16 or float16, not {dtype}: pass "
                             "--dtype bfloat16")
        try:
            import flashinfer
        except ImportError as e:
            raise ValueError("the flashinfer attention backend needs flashinfer-python: pip install '.[cuda]'") from e
        self.fi = flashinfer
        self.h, self.hkv, self.d, self.dtype = num_qo_heads, num_kv_heads, head_dim, dtype
        self.scale = head_dim**-0.5  # what every model we load uses (dspark/engine/model.py)
        ws = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=num_qo_heads
                                                                    != num_kv_heads)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")

    def plan(self, meta: AttentionMetadata) -> None:
        self.slot_mapping = meta.slot_mapping
        n_req = len(meta.q_lens)
        dec = [r for r in range(n_req) if meta.q_lens[r] == 1]
        pre = [r for r in range(n_req) if meta.q_lens[r] > 1]
        dev = meta.slot_mapping.device
        self.dec_rows = torch.tensor(token_rows(meta.q_lens, dec), dtype=torch.long, device=dev)
        self.pre_rows = torch.tensor(token_rows(meta.q_lens, pre), dtype=torch.long, device=dev)
        for wrapper, rows, decode in ((self.decode, dec, True), (self.prefill, pre, False)):
            if rows:
                plan_wrapper(wrapper, decode, paged_kv_layout(meta, rows), (self.h, self.hkv, self.d), self.dtype,
                             self.scale, meta.block_size)

    def forward(self, layer_idx, q, k, v, kv_cache, scale):
        write_kv(kv_cache, self.slot_mapping, k, v, scale, self.scale)
        q = q.to(self.dtype)
        out = torch.empty_like(q)
        if len(self.dec_rows):
            out[self.dec_rows] = self.decode.run(q[self.dec_rows], kv_cache)
        if len(self.pre_rows):
            out[self.pre_rows] = self.prefill.run(q[self.pre_rows], kv_cache)
        return out


class FlashInferGraphAttention:
    """FlashInfer for one CUDA-graph bucket (dspark/engine/cuda_graphs.py): a wrapper in CUDA-graph mode whose index
    structures live in fixed buffers sized for `batch` requests, planned outside the graph every step; K/V are
    written through the bucket's fixed slot buffer. Decode buckets use the decode kernel, the others the prefill
    kernel (causal, bottom-right aligned), whose row limit is the row count of its first plan."""

    def __init__(self, num_qo_heads: int, num_kv_heads: int, head_dim: int, batch: int, max_pages: int,
                 slots: torch.Tensor, decode: bool, workspace: torch.Tensor, dtype: torch.dtype = torch.bfloat16):
        import flashinfer

        dev = slots.device
        self.h, self.hkv, self.d, self.dtype, self.decode = num_qo_heads, num_kv_heads, head_dim, dtype, decode
        self.scale = head_dim**-0.5
        self.slots = slots
        indptr = torch.zeros(batch + 1, dtype=torch.int32, device=dev)
        indices = torch.zeros(max_pages, dtype=torch.int32, device=dev)
        last = torch.zeros(batch, dtype=torch.int32, device=dev)
        if decode:
            self.wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                workspace, "NHD", use_cuda_graph=True, use_tensor_cores=num_qo_heads != num_kv_heads,
                paged_kv_indptr_buffer=indptr, paged_kv_indices_buffer=indices, paged_kv_last_page_len_buffer=last)
        else:
            self.wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
                workspace, "NHD", use_cuda_graph=True, qo_indptr_buf=torch.zeros_like(indptr),
                paged_kv_indptr_buf=indptr, paged_kv_indices_buf=indices, paged_kv_last_page_len_buf=last)

    def plan(self, meta: AttentionMetadata) -> None:
        self.rows = sum(meta.q_lens)
        plan_wrapper(self.wrapper, self.decode, paged_kv_layout(meta, list(range(len(meta.q_lens)))),
                     (self.h, self.hkv, self.d), self.dtype, self.scale, meta.block_size)

    def forward(self, layer_idx, q, k, v, kv_cache, scale):
        write_kv(kv_cache, self.slots, k, v, scale, self.scale)
        q = q.to(self.dtype)
        if self.rows == q.shape[0]:  # always so when captured (each bucket is first planned at its full rows)
            return self.wrapper.run(q, kv_cache)
        # Run eagerly (capture off) with rows past the plan: run() asks for exactly the planned rows; the captured
        # kernels write zeros past them, and so does this.
        out = torch.zeros_like(q)
        out[: self.rows] = self.wrapper.run(q[: self.rows], kv_cache)
        return out
