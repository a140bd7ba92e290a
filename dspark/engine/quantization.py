"""Weight-only quantization for serving: int8 per output channel, int4 in groups of `group_size` along the input.

The matmuls are PyTorch's own CPU kernels (`aten._weight_int8pack_mm`, `aten._weight_int4pack_mm_for_cpu`): they
are vectorized (AVX2 / AVX512) for bfloat16 activations, so a float32 model's activations go in as bfloat16 and
come back in float32. torchao was measured and not used: 0.18.0 (the release on PyPI with torch 2.13) ships only
CUDA extensions, dropped the CPU int4 layout, and its int8 weight-only tensor subclass took 348 us per call for a
3072 x 576 projection at one row, where the aten op it wraps took 54 us (docs/benchmarks.md, quantization).

Both kernels compute each row alone (the same bits whatever the number of rows), and read 1/2 (int8) or ~1/3.6
(int4, with its bf16 scale and zero per group) of a bf16 weight's bytes: decode at batch 1 is memory-bound on a
CPU, so that is where they pay; their cost grows with the rows, so at large batches bf16 on oneDNN is faster.

A GGUF's Q4_0 / Q4_1 tensors map onto int4 groups of 32 exactly (w = (q - 8) * scale + zero, zero = m + 8d for
Q4_1's q * d + m): `--quantization int4` takes their 4-bit codes as they are, and only the scales are rounded to
bfloat16. Everything else (an HF checkpoint, other GGUF types) is quantized from its float weights: asymmetric
min/max per group for int4, symmetric absmax per channel for int8.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from dspark.kernels import cpu_quant

SCHEMES = ("none", "int8", "int4", "w4a8")
QUANTIZED = SCHEMES[1:]
# int4 codes, scales and zeros of one weight [N, K]: (codes [N, K] in 0..15, scale [N, K/g], zero [N, K/g])
Int4Codes = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class QuantLinear:
    """One serving projection on quantized weights; called like ServingLinear (x [..., in] -> [..., out])."""

    act_dtype = torch.bfloat16  # what the kernel takes in (the aten kernels are vectorized for bf16 only)

    def __init__(self, out_features: int, bias: torch.Tensor | None):
        self.out_features = out_features
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self._mm(x.reshape(-1, x.shape[-1]).to(self.act_dtype))
        y = y.to(x.dtype).view(*lead, self.out_features)
        return y if self.bias is None else y + self.bias

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Int8Linear(QuantLinear):
    """Symmetric int8 per output channel: w = q * scale."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__(weight.shape[0], bias)
        w = weight.float()
        scale = w.abs().amax(1).clamp(min=1e-12) / 127
        self.qweight = (w / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        self.scales = scale.to(torch.bfloat16)

    def _mm(self, x):
        return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scales)


class Int4Linear(QuantLinear):
    """Asymmetric int4 in groups along the input: w = (q - 8) * scale + zero, q in 0..15."""

    def __init__(self, codes: Int4Codes, group_size: int, bias: torch.Tensor | None = None):
        q, scale, zero = codes
        super().__init__(q.shape[0], bias)
        self.group_size = group_size
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        # [K/g, N, 2]: the kernel's layout of the scales and zeros
        self.scales_zeros = torch.stack([scale.t(), zero.t()], -1).to(torch.bfloat16).contiguous()

    def _mm(self, x):
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales_zeros)


class W4A8Linear(QuantLinear):
    """int4 weights in groups of 32 (w = (q - 8) * scale + zero, as Int4Linear) times int8 activations quantized
    per block of 32 as the row comes in: llama.cpp's Q4_1 x Q8_1 (dspark/kernels/cpu_quant.py)."""

    act_dtype = torch.float32

    def __init__(self, codes: Int4Codes, bias: torch.Tensor | None = None):
        cpu_quant.load()
        q, scale, zero = codes
        super().__init__(q.shape[0], bias)
        self.w, self.d, self.m = cpu_quant.pack_int4(q, scale, zero - 8 * scale)

    def _mm(self, x):
        return torch.ops.dspark_cpu.w4a8_mm(x.contiguous(), self.w, self.d, self.m)


class W8A8Linear(QuantLinear):
    """int8 weights in blocks of 32 inputs (w = q * d: a GGUF's Q8_0 codes, recovered exactly from its float
    values) times int8 activations per block of 32: llama.cpp's Q8_0 x Q8_0, for w4a8's LM head."""

    act_dtype = torch.float32

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        cpu_quant.load()
        n, k = weight.shape
        w = weight.float().view(n, k // 32, 32)
        d = w.abs().amax(-1) / 127
        q = (w / d.clamp(min=1e-30)[..., None]).round_().clamp_(-127, 127).to(torch.int8).view(n, k)
        super().__init__(n, bias)
        self.w, self.d = cpu_quant.pack_int8(q, d)

    def _mm(self, x):
        return torch.ops.dspark_cpu.w8a8_mm(x.contiguous(), self.w, self.d)


def int4_codes(weight: torch.Tensor, group_size: int) -> Int4Codes:
    """Min/max int4 codes of a float weight [N, K], per group of `group_size` inputs (the group's smallest and
    largest values land exactly on codes 0 and 15)."""
    n, k = weight.shape
    w = weight.float().view(n, k // group_size, group_size)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = ((w - lo[..., None]) / scale[..., None]).round_().clamp_(0, 15).to(torch.uint8).view(n, k)
    return q, scale, lo + 8 * scale


def gguf_q4_codes(data: np.ndarray, type_name: str, shape: tuple[int, int]) -> Int4Codes | None:
    """The int4 codes of a GGUF Q4_0 / Q4_1 tensor, read from its blocks without dequantizing (None for any
    other type). A block covers 32 inputs of one row: fp16 d (and fp16 m for Q4_1), then 16 bytes whose low
    nibbles are inputs 0..15 and high nibbles 16..31; w = (q - 8) * d for Q4_0, q * d + m for Q4_1."""
    if type_name not in ("Q4_0", "Q4_1"):
        return None
    n, k = shape
    head = 2 if type_name == "Q4_0" else 4
    blocks = np.ascontiguousarray(data).reshape(n, k // 32, head + 16)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., head:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(n, k)
    scale = torch.from_numpy(d)
    if type_name == "Q4_0":
        zero = torch.zeros_like(scale)
    else:
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        zero = torch.from_numpy(m) + 8 * scale
    return torch.from_numpy(q), scale, zero


def takes_stored_codes(scheme: str, group_size: int) -> bool:
    """Whether `scheme` serves a checkpoint's own 4-bit codes (a GGUF's Q4_0 / Q4_1, groups of 32): int4 at group
    size 32, w4a8 always (its groups are 32 whatever the setting)."""
    return scheme == "w4a8" or (scheme == "int4" and group_size == 32)


def int4_fits(n: int, k: int, group_size: int) -> bool:
    """The CPU int4 kernel's shape rules: N a multiple of 16, K of the group size (and of 2)."""
    return n % 16 == 0 and k % group_size == 0 and k % 2 == 0


CodesSource = Callable[[str], Int4Codes | None]


class Quantizer:
    """Builds the serving projections of one model under a scheme (CausalLM.fuse_ asks it per projection).

    `codes(hf_name)` gives a weight's int4 codes as stored in the checkpoint (GGUF Q4_0 / Q4_1), when it has
    them; those weights may still be on the meta device (not loaded in float at all). A projection it cannot
    quantize (a shape the kernel refuses) is left to ServingLinear; `skipped` names them."""

    def __init__(self, scheme: str, group_size: int = 32, codes: CodesSource | None = None):
        if scheme not in SCHEMES:
            raise ValueError(f"quantization must be one of {', '.join(SCHEMES)}, not {scheme!r}")
        self.scheme, self.group_size, self.codes = scheme, group_size, codes
        self.from_file = 0  # projections whose int4 codes came from the checkpoint as stored
        self.skipped: list[str] = []

    def __call__(self, linears: list[nn.Linear], names: list[str], head: bool = False) -> QuantLinear | None:
        """The projection over `linears` (fused along the output) under this scheme, or None: keep it in float.
        Under int4 the LM head is int8 unless the checkpoint stores it in 4 bits, as llama.cpp's 4-bit files keep
        their output tensor at 6-8 bits: an int4 head cost 4.9% perplexity on the default model, int8 0.3%
        (docs/benchmarks.md, quantization)."""
        if self.scheme == "none":
            return None
        n = sum(lin.out_features for lin in linears)
        k = linears[0].in_features
        # w4a8: groups of 32 whatever `group_size`, and the head int8 in blocks of 32 as a Q8_0 file stores it
        w4a8 = self.scheme == "w4a8"
        group = 32 if w4a8 else self.group_size
        # the checkpoint's own 4-bit codes: read (unpacked from its blocks) only where int4 can use them
        use_stored = self.codes is not None and takes_stored_codes(self.scheme, group) and not (w4a8 and head)
        stored = [self.codes(name) if use_stored else None for name in names]
        int8 = self.scheme == "int8" or (head and (w4a8 or any(c is None for c in stored)))
        if not (cpu_quant.fits(n, k) if w4a8 else int8 or int4_fits(n, k, group)):
            self.skipped.append(names[0])
            return None
        bs = [lin.bias for lin in linears]
        bias = None if bs[0] is None else torch.cat([b.detach() for b in bs])
        if int8:
            weight = torch.cat([lin.weight.detach() for lin in linears])
            return W8A8Linear(weight, bias) if w4a8 else Int8Linear(weight, bias)
        parts = [c if c is not None else int4_codes(lin.weight.detach(), group) for c, lin in zip(stored, linears)]
        self.from_file += sum(c is not None for c in stored)
        codes = tuple(torch.cat(p) for p in zip(*parts))
        return W4A8Linear(codes, bias) if w4a8 else Int4Linear(codes, group, bias)
