"""The attention backend contract: what a step tells a backend (the metadata), and what a backend does.

The KV cache of one layer is a pair (k_cache, v_cache), each [num_blocks, block_size, num_kv_heads, head_dim]
(FlashInfer's NHD paged layout), so every backend takes the same tensors and the block manager's tables.
A step is a ragged batch: request r brings q_lens[r] new tokens (a prefill chunk, one decode token, or a
draft to verify) and attends causally to kv_lens[r] keys, the new ones included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class AttentionMetadata:
    q_lens: list[int]  # new tokens per request, in the flat token order
    kv_lens: list[int]  # keys per request after this step's writes
    block_tables: torch.Tensor  # [B, max_blocks] int64, physical block ids (padding: 0)
    slot_mapping: torch.Tensor  # [T] int64, flat cache slot each new token's K/V goes to
    block_size: int


def write_paged_kv(kv_cache: tuple[torch.Tensor, torch.Tensor], slots: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor) -> None:
    """Write k/v [T, Hkv, D] at the flat cache `slots` of one layer's paged cache (cast to the cache's dtype)."""
    k_cache, v_cache = kv_cache
    n_kv, d = k_cache.shape[-2:]
    k_cache.view(-1, n_kv, d).index_copy_(0, slots, k if k.dtype == k_cache.dtype else k.to(k_cache.dtype))
    v_cache.view(-1, n_kv, d).index_copy_(0, slots, v if v.dtype == v_cache.dtype else v.to(v_cache.dtype))


class AttentionBackend(Protocol):
    def plan(self, meta: AttentionMetadata) -> None:
        """Build per-step index structures once; reused by every layer."""

    def forward(self, layer_idx: int, q, k, v, kv_cache: tuple[torch.Tensor, torch.Tensor], scale: float):
        """Write k/v [T, Hkv, D] into the cache, then attend q [T, H, D]; return [T, H, D]."""
