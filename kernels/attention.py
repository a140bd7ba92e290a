"""Attention over a paged KV cache: the backend interface and the plain-torch reference.

The KV cache of one layer is a pair (k_cache, v_cache), each [num_blocks, block_size, num_kv_heads, head_dim]
(FlashInfer's NHD paged layout), so a CUDA backend can take the same tensors and the block manager's tables.
A step is a ragged batch: request r brings q_lens[r] new tokens (a prefill chunk, one decode token, or a
draft to verify) and attends causally to kv_lens[r] keys, the new ones included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    q_lens: list[int]  # new tokens per request, in the flat token order
    kv_lens: list[int]  # keys per request after this step's writes
    block_tables: torch.Tensor  # [B, max_blocks] int64, physical block ids (padding: 0)
    slot_mapping: torch.Tensor  # [T] int64, flat cache slot each new token's K/V goes to
    block_size: int


class AttentionBackend(Protocol):
    def plan(self, meta: AttentionMetadata) -> None:
        """Build per-step index structures once; reused by every layer."""

    def forward(self, layer_idx: int, q, k, v, kv_cache: tuple[torch.Tensor, torch.Tensor], scale: float):
        """Write k/v [T, Hkv, D] into the cache, then attend q [T, H, D]; return [T, H, D]."""


class TorchPagedAttention:
    """Reference backend: gather each request's pages into a padded block and call SDPA once per layer."""

    def plan(self, meta: AttentionMetadata) -> None:
        dev = meta.slot_mapping.device
        b = len(meta.q_lens)
        q_lens = torch.tensor(meta.q_lens, device=dev)
        kv_lens = torch.tensor(meta.kv_lens, device=dev)
        self.max_q, max_kv = int(q_lens.max()), int(kv_lens.max())
        self.slot_mapping = meta.slot_mapping
        j = torch.arange(max_kv, device=dev)
        page_of = (j // meta.block_size).clamp(max=meta.block_tables.shape[1] - 1)
        pages = meta.block_tables.gather(1, page_of.expand(b, -1))
        self.gather_slots = pages * meta.block_size + j % meta.block_size  # [B, max_kv]
        i = torch.arange(self.max_q, device=dev)
        qpos = (kv_lens - q_lens)[:, None] + i[None, :]  # absolute position of each padded query row
        mask = (j[None, None, :] <= qpos[:, :, None]) & (j[None, None, :] < kv_lens[:, None, None])
        pad_rows = i[None, :] >= q_lens[:, None]
        mask[:, :, 0] |= pad_rows  # padded query rows see key 0 only, so softmax stays finite
        self.mask = mask.unsqueeze(1)  # [B, 1, max_q, max_kv]
        self.batch = b
        if self.max_q > 1:
            starts = torch.cumsum(q_lens, 0) - q_lens
            owner = torch.repeat_interleave(torch.arange(b, device=dev), q_lens)
            offset = torch.arange(int(q_lens.sum()), device=dev) - starts[owner]
            self.pad_index = owner * self.max_q + offset  # flat token -> row in the padded [B*max_q] layout

    def forward(self, layer_idx, q, k, v, kv_cache, scale):
        k_cache, v_cache = kv_cache
        n_kv, d = k_cache.shape[-2:]
        k_flat, v_flat = k_cache.view(-1, n_kv, d), v_cache.view(-1, n_kv, d)
        k_flat.index_copy_(0, self.slot_mapping, k.to(k_flat.dtype))
        v_flat.index_copy_(0, self.slot_mapping, v.to(v_flat.dtype))
        keys = k_flat[self.gather_slots].transpose(1, 2).to(q.dtype)  # [B, Hkv, max_kv, D]
        values = v_flat[self.gather_slots].transpose(1, 2).to(q.dtype)
        h = q.shape[1]
        if self.max_q == 1:
            qp = q.view(self.batch, 1, h, d)
        else:
            qp = q.new_zeros(self.batch * self.max_q, h, d).index_copy_(0, self.pad_index, q)
            qp = qp.view(self.batch, self.max_q, h, d)
        out = F.scaled_dot_product_attention(
            qp.transpose(1, 2), keys, values, attn_mask=self.mask, scale=scale, enable_gqa=h != n_kv
        ).transpose(1, 2)
        out = out.reshape(self.batch * self.max_q, h, d)
        return out if self.max_q == 1 else out[self.pad_index]


def make_backend(name: str, num_qo_heads: int = 0, num_kv_heads: int = 0, head_dim: int = 0, device: str = "cuda",
                 dtype: torch.dtype = torch.bfloat16) -> AttentionBackend:
    if name == "torch":
        return TorchPagedAttention()
    if name == "flashinfer":
        from kernels.flashinfer_backend import FlashInferAttention  # CUDA only, imported only when asked for

        return FlashInferAttention(num_qo_heads, num_kv_heads, head_dim, device, dtype)
    raise ValueError(f"unknown attention backend {name!r} (choose torch or flashinfer)")
