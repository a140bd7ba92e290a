"""int8-activation matmuls for the CPU (`--quantization w4a8`): llama.cpp's kernel class, in cpu_quant.cpp.

torch's weight-only kernels multiply in float: on an AVX2 host `_weight_int4pack_mm_for_cpu` unpacks every int4
code to float and runs ~9G weights/s on 2 cores, about 3x slower than an integer dot (docs/benchmarks.md,
w4a8-kernels), and no library for this torch fits (torchao 0.18 ships no CPU int4 layout; fbgemm's dynamic int8
linear measured no faster than the int4 op). ggml's answer is to quantize each activation row in blocks of 32 to
int8 and dot in integers (Q4_1 x Q8_1 for int4 weights, Q8_0 x Q8_0 for int8 ones): `w4a8_mm` and `w8a8_mm` do
the same with AVX2 vpmaddubsw, on weights repacked into tiles of 8 output columns.

The ops are built from cpu_quant.cpp by torch's own extension builder on first use (about a minute, then cached
under torch's extensions directory), so they need AVX2, a C++ compiler and ninja, as Inductor needs a compiler.
The same build carries cpu_attention.cpp's row-invariant paged attention (used by dspark/kernels/torch_backend.py).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import shutil
import time
from pathlib import Path

import torch

log = logging.getLogger("dspark.engine")

SOURCES = [Path(__file__).with_name(f) for f in ("cpu_quant.cpp", "cpu_attention.cpp")]
BLOCK = 32  # inputs per scale, weights and activations alike
TILE = 8  # output columns per tile


def unavailable() -> str | None:
    """Why the ops cannot be built on this host, or None."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"they need AVX2 (torch reports {torch.backends.cpu.get_cpu_capability()})"
    if not any(shutil.which(c) for c in ("g++", "c++")):
        return "they are built with a C++ compiler (g++), and none is on the host"
    try:
        import ninja  # noqa: F401  (torch's extension builder runs it)
    except ImportError:
        return "they are built with ninja (pip install ninja)"
    return None


@functools.cache
def load() -> None:
    """Build (once per host and source) and load the ops into torch.ops.dspark_cpu; raises why not."""
    why = unavailable()
    if why:
        raise RuntimeError(f"the w4a8 kernels cannot run here: {why}")
    from torch.utils.cpp_extension import load_inline

    t0 = time.perf_counter()
    # the torch version and the sources' hash in the name: the builder's cache notices neither another torch's
    # headers nor, across processes, that two checkouts' sources differ (each would rebuild over the other's)
    sources = [f.read_text() for f in SOURCES]
    digest = hashlib.sha256("".join(sources).encode()).hexdigest()[:12]
    name = f"dspark_cpu_{''.join(c if c.isalnum() else '_' for c in torch.__version__)}_{digest}"
    load_inline(name, sources, is_python_module=False,
                extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"])
    seconds = time.perf_counter() - t0
    if seconds > 2:
        log.info("built the w4a8 kernels in %.0f s (cached for the next start)", seconds)

    # shapes for torch.compile: the ops are opaque calls in the compiled step
    @torch.library.register_fake("dspark_cpu::w4a8_mm")
    def _(x, w, d, m):
        return x.new_empty(x.shape[0], w.shape[0] * TILE)

    @torch.library.register_fake("dspark_cpu::paged_attention")
    def _(q, k_cache, v_cache, pages, lens, scale):
        return q.new_empty(q.shape, dtype=torch.float32)

    @torch.library.register_fake("dspark_cpu::w8a8_mm")
    def _(x, w, d):
        return x.new_empty(x.shape[0], w.shape[0] * TILE)


def _tiles(a: torch.Tensor) -> torch.Tensor:
    """[N, K/32] per column and block -> [N/8, K/32, 8], the kernels' order."""
    n, nb = a.shape
    return a.float().view(n // TILE, TILE, nb).transpose(1, 2).contiguous()


def pack_int4(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Codes q [N, K] in 0..15 with w = q * d + m per block of 32 inputs (d, m [N, K/32]) -> the kernel's tiles:
    128 bytes a block, vector p (0..3) byte 4c + j holding column c's inputs 4p + j (low nibble) and 16 + 4p + j
    (high nibble)."""
    n, k = q.shape
    v = q.to(torch.uint8).view(n // TILE, TILE, k // BLOCK, 2, 4, 4)  # tile, column, block, half, p, j
    v = v[:, :, :, 0] | (v[:, :, :, 1] << 4)
    return v.permute(0, 2, 3, 1, 4).reshape(n // TILE, k // BLOCK, 128).contiguous(), _tiles(d), _tiles(m)


def pack_int8(q: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Codes q [N, K] int8 with w = q * d per block of 32 inputs (d [N, K/32]) -> the kernel's tiles: 256 bytes
    a block, vector p (0..7) byte 4c + j holding column c's input 4p + j."""
    n, k = q.shape
    v = q.to(torch.int8).view(n // TILE, TILE, k // BLOCK, 8, 4)  # tile, column, block, p, j
    return v.permute(0, 2, 3, 1, 4).reshape(n // TILE, k // BLOCK, 256).contiguous(), _tiles(d)


def fits(n: int, k: int) -> bool:
    return n % TILE == 0 and k % BLOCK == 0
