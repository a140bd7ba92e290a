"""Attention kernels: the contract (base.py), one module per backend (torch_backend.py, flashinfer_backend.py),
and `make_backend`, the one place that picks one by name. Besides them, cpu_quant: the int8-activation matmuls of
`--quantization w4a8` (used by dspark/engine/quantization.py), built together with cpu_attention.cpp's row-invariant
paged attention (the torch backend's float32 `--deterministic` rows, `cpu_rows_op`)."""

from __future__ import annotations

import functools
import logging

import torch

from dspark.kernels.base import AttentionBackend, AttentionMetadata

__all__ = ["AttentionBackend", "AttentionMetadata", "cpu_rows_op", "make_backend"]

log = logging.getLogger("dspark.engine")


@functools.cache
def cpu_rows_op() -> bool:
    """Whether cpu_attention.cpp's row-invariant op runs here (built with the w4a8 kernels); without it a float32
    `--deterministic` step gives each short row an SDPA call of its own."""
    from dspark.kernels import cpu_quant

    if cpu_quant.unavailable():
        return False
    try:
        cpu_quant.load()
    except Exception as e:  # a build failure: serve with per-row SDPA calls rather than not at all
        log.warning("the CPU attention kernel did not build, attending row by row: %s: %s", type(e).__name__, e)
        return False
    return True


def make_backend(name: str, num_qo_heads: int = 0, num_kv_heads: int = 0, head_dim: int = 0, device: str = "cuda",
                 dtype: torch.dtype = torch.bfloat16, row_invariant: bool = False) -> AttentionBackend:
    if name == "torch":
        from dspark.kernels.torch_backend import TorchPagedAttention

        row_op = row_invariant and dtype == torch.float32 and device == "cpu" and cpu_rows_op()
        return TorchPagedAttention(row_invariant, one_call_each=dtype != torch.bfloat16, row_op=row_op)
    if row_invariant:
        raise ValueError("--deterministic runs on the torch attention backend only (FlashInfer's fixed-split "
                         "attention is not wired yet): pass --attention-backend torch")
    if name == "flashinfer":
        from dspark.kernels.flashinfer_backend import FlashInferAttention  # CUDA only, imported only when asked for

        return FlashInferAttention(num_qo_heads, num_kv_heads, head_dim, device, dtype)
    raise ValueError(f"unknown attention backend {name!r} (choose torch or flashinfer)")
