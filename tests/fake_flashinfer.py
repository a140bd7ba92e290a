"""A CPU stand-in for flashinfer's two paged-KV wrappers, for testing the glue around them in CI (no GPU there).

It keeps what flashinfer 0.6.x documents and checks, so a call the real library would refuse fails here too:
constructor and plan keyword names (unknown ones raise TypeError), CUDA-graph mode (the fixed buffers must be
given; the batch size is their length; plan() copies into them and may never exceed the first plan's rows or
the indices buffer), run() asking for exactly the planned rows (checked since 0.6.15). run() computes from what
plan() left in the buffers, as the kernels do: causal attention aligned bottom-right to each request's keys, GQA.
"""

from __future__ import annotations

import torch

PLAN_OPTIONS = {"q_data_type", "kv_data_type", "o_data_type", "sm_scale", "pos_encoding_mode", "window_left",
                "logits_soft_cap", "rope_scale", "rope_theta", "non_blocking"}


class _Paged:
    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str, use_cuda_graph: bool,
                 bufs: dict[str, torch.Tensor | None]):
        if kv_layout != "NHD":
            raise ValueError("only NHD here")
        self.graph, self.bufs, self.max_rows = use_cuda_graph, bufs, None
        if use_cuda_graph:
            missing = [k for k, v in bufs.items() if not torch.is_tensor(v)]
            if missing:
                raise ValueError(f"{missing} should be torch.Tensor in CUDA graph mode")
            self.batch = len(bufs["kv_indptr"]) - 1
            if len(bufs["last_page_len"]) != self.batch or bufs.get("qo_indptr", bufs["kv_indptr"]).shape[0] \
                    != self.batch + 1:
                raise ValueError("buffer lengths disagree with the batch size")

    def _plan(self, qo_indptr, kv_indptr, kv_indices, last_page_len, num_qo_heads, num_kv_heads, head_dim,
              page_size, causal, options: dict) -> None:
        unknown = set(options) - PLAN_OPTIONS
        if unknown:
            raise TypeError(f"plan() got unexpected keyword arguments {sorted(unknown)}")
        for t in (qo_indptr, kv_indptr, last_page_len, kv_indices):
            if t.dtype != torch.int32:
                raise ValueError("indptr, indices and last_page_len are int32")
        rows, batch = int(qo_indptr[-1]), len(kv_indptr) - 1
        if self.graph:
            self.max_rows = self.max_rows or rows
            if batch != self.batch or rows > self.max_rows or len(kv_indices) > len(self.bufs["kv_indices"]):
                raise ValueError(f"CUDA graph mode: batch {batch} (fixed {self.batch}), rows {rows} (at most "
                                 f"{self.max_rows}), indices {len(kv_indices)} (buffer {len(self.bufs['kv_indices'])})")
            for name, src in (("qo_indptr", qo_indptr), ("kv_indptr", kv_indptr), ("last_page_len", last_page_len)):
                if name in self.bufs:
                    self.bufs[name].copy_(src)
            self.bufs["kv_indices"][: len(kv_indices)].copy_(kv_indices)
            b = self.bufs
            self.qo, self.kv_ptr, self.kv_idx, self.last = b.get("qo_indptr", qo_indptr), b["kv_indptr"], \
                b["kv_indices"], b["last_page_len"]
        else:
            self.qo, self.kv_ptr, self.kv_idx, self.last = qo_indptr, kv_indptr, kv_indices, last_page_len
        self.rows, self.causal, self.page = rows, causal, page_size
        self.scale = options.get("sm_scale") or head_dim**-0.5

    def run(self, q: torch.Tensor, paged_kv_cache) -> torch.Tensor:
        if q.shape[0] != self.rows:
            raise ValueError(f"q has {q.shape[0]} rows, the plan {self.rows}")
        k_cache, v_cache = paged_kv_cache
        out = torch.zeros_like(q)
        h, hkv = q.shape[1], k_cache.shape[2]
        for r in range(len(self.kv_ptr) - 1):
            a, b = int(self.qo[r]), int(self.qo[r + 1])
            pages = self.kv_idx[int(self.kv_ptr[r]) : int(self.kv_ptr[r + 1])].long()
            n = (len(pages) - 1) * self.page + int(self.last[r])
            k = k_cache[pages].reshape(-1, hkv, k_cache.shape[-1])[:n].repeat_interleave(h // hkv, 1)
            v = v_cache[pages].reshape(-1, hkv, v_cache.shape[-1])[:n].repeat_interleave(h // hkv, 1)
            s = torch.einsum("qhd,khd->hqk", q[a:b].float(), k.float()) * self.scale
            if self.causal:
                i = torch.arange(b - a)[:, None] + (n - (b - a))
                s = s.masked_fill(torch.arange(n)[None, :] > i, float("-inf"))
            out[a:b] = torch.einsum("hqk,khd->qhd", s.softmax(-1), v.float()).to(q.dtype)
        return out


class BatchDecodeWithPagedKVCacheWrapper(_Paged):
    def __init__(self, float_workspace_buffer, kv_layout="NHD", use_cuda_graph=False, use_tensor_cores=False,
                 paged_kv_indptr_buffer=None, paged_kv_indices_buffer=None, paged_kv_last_page_len_buffer=None,
                 backend="auto", jit_args=None):
        super().__init__(float_workspace_buffer, kv_layout, use_cuda_graph,
                         {"kv_indptr": paged_kv_indptr_buffer, "kv_indices": paged_kv_indices_buffer,
                          "last_page_len": paged_kv_last_page_len_buffer})

    def plan(self, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size, **options):
        ones = torch.arange(len(indptr), dtype=torch.int32)  # one query row per request
        self._plan(ones, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size, False,
                   options)


class BatchPrefillWithPagedKVCacheWrapper(_Paged):
    def __init__(self, float_workspace_buffer, kv_layout="NHD", use_cuda_graph=False, qo_indptr_buf=None,
                 paged_kv_indptr_buf=None, paged_kv_indices_buf=None, paged_kv_last_page_len_buf=None,
                 custom_mask_buf=None, mask_indptr_buf=None, backend="auto", jit_args=None, jit_kwargs=None):
        super().__init__(float_workspace_buffer, kv_layout, use_cuda_graph,
                         {"qo_indptr": qo_indptr_buf, "kv_indptr": paged_kv_indptr_buf,
                          "kv_indices": paged_kv_indices_buf, "last_page_len": paged_kv_last_page_len_buf})

    def plan(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads, num_kv_heads,
             head_dim_qk, page_size, head_dim_vo=None, custom_mask=None, packed_custom_mask=None, causal=False,
             **options):
        self._plan(qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads,
                   num_kv_heads, head_dim_qk, page_size, causal, options)
