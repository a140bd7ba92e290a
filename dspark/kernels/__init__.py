"""Attention kernels: the contract (base.py), one module per backend (torch_backend.py, flashinfer_backend.py),
and `make_backend`, the one place that picks one by name. Besides them, cpu_quant: the int8-activation matmuls of
`--quantization w4a8` (used by dspark/engine/quantization.py)."""

from __future__ import annotations

import torch

from dspark.kernels.base import AttentionBackend, AttentionMetadata

__all__ = ["AttentionBackend", "AttentionMetadata", "make_backend"]


def make_backend(name: str, num_qo_heads: int = 0, num_kv_heads: int = 0, head_dim: int = 0, device: str = "cuda",
                 dtype: torch.dtype = torch.bfloat16, row_invariant: bool = False) -> AttentionBackend:
    if name == "torch":
        from dspark.kernels.torch_backend import TorchPagedAttention

        return TorchPagedAttention(row_invariant, one_call_each=dtype != torch.bfloat16)
    if row_invariant:
        raise ValueError("--deterministic runs on the torch attention backend only (FlashInfer's fixed-split "
                         "attention is not wired yet): pass --attention-backend torch")
    if name == "flashinfer":
        from dspark.kernels.flashinfer_backend import FlashInferAttention  # CUDA only, imported only when asked for

        return FlashInferAttention(num_qo_heads, num_kv_heads, head_dim, device, dtype)
    raise ValueError(f"unknown attention backend {name!r} (choose torch or flashinfer)")
