"""Batch-1 decode steps on the CPU as one Inductor graph (`--compile`).

An eager batch-1 step of a small model dispatches about 2,000 small ops (norms, RoPE, views, dtype casts, the
paged gather), and on a 2-core CPU that dispatch costs as much as the matmuls (docs/benchmarks.md,
int4-step-profile). torch.compile of the whole step (30 layers, paged attention, final norm: one graph, one call)
fuses the small ops into a few C++ kernels and calls the quantized matmuls and SDPA directly.

Same bits as the eager step: Inductor runs with `emulate_precision_casts` (every cast to bf16 rounds where eager
rounds), RMSNorm calls eager's kernel (model.eager_rms_norm: Inductor's own reduction order differed in the last
bit), and attention reads whole pages masked past the length, as the torch backend does in `--deterministic`.
So a compiled decode step, an eager verification step and an eager batched step score a token alike, and greedy
speculation keeps plain decoding's text (tests/test_compiled.py checks the logits bit for bit).

The graph is compiled once, at start-up, for one token of one request, dynamic in the number of KV pages (a
request's length never compiles it again); the engine calls it only for steps it fits (`fits`).
"""

from __future__ import annotations

import logging
import shutil
import time

import torch
import torch.nn.functional as F

from dspark.engine.model import CausalLM
from dspark.kernels.base import AttentionMetadata

log = logging.getLogger("dspark.engine")

MIN_PAGES = 2  # a dynamic size of 1 would be specialized (compiled again): short requests get a masked scratch page


def can_compile() -> bool:
    """Inductor's CPU code needs a C++ compiler on the host."""
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


class DecodeAttention:
    """Paged attention for steps where each request brings one token, written to be traced: the step's slots,
    pages ([B, P], padded with the scratch block) and additive mask ([B, 1, 1, P * block_size], -inf past each
    length) are tensors, so one graph serves every length. Whole pages, masked: TorchPagedAttention's
    `--deterministic` layout, hence its bits."""

    def __init__(self, slots: torch.Tensor, pages: torch.Tensor, mask: torch.Tensor):
        self.slots, self.pages, self.mask = slots, pages, mask

    def plan(self, meta: AttentionMetadata) -> None:  # the step's tensors came with the constructor
        pass

    def forward(self, layer_idx, q, k, v, kv_cache, scale):
        k_cache, v_cache = kv_cache
        n_kv, d = k_cache.shape[-2:]
        k_cache.view(-1, n_kv, d).index_copy_(0, self.slots, k.to(k_cache.dtype))
        v_cache.view(-1, n_kv, d).index_copy_(0, self.slots, v.to(v_cache.dtype))
        b, h = q.shape[0], q.shape[1]
        flat = self.pages.reshape(-1)
        keys = k_cache.index_select(0, flat).view(b, -1, n_kv, d).transpose(1, 2).to(q.dtype)
        values = v_cache.index_select(0, flat).view(b, -1, n_kv, d).transpose(1, 2).to(q.dtype)
        # GQA as rows of the KV head, as the torch backend's decode path does
        out = F.scaled_dot_product_attention(q.view(b, n_kv, h // n_kv, d), keys, values, attn_mask=self.mask,
                                             scale=scale)
        return out.reshape(b, h, d)


class CompiledDecode:
    """The target's batch-1 decode forward as one compiled graph; `run` returns what CausalLM.forward does."""

    def __init__(self, model: CausalLM, kv_caches: list, block_size: int, scratch_block: int,
                 hidden_layers: tuple[int, ...], max_model_len: int):
        self.model, self.kv_caches, self.block_size = model, kv_caches, block_size
        self.scratch_block, self.hidden_layers = scratch_block, hidden_layers
        self.dtype = kv_caches[0][0].dtype
        model.model.rotary_emb.reserve(max_model_len, kv_caches[0][0].device)  # no position read back in the graph
        # eager's roundings (every cast to bf16 rounds where eager rounds): the same bits as the eager step
        self.fn = torch.compile(self._forward, dynamic=False, fullgraph=True,
                                options={"emulate_precision_casts": True})
        self.compile_seconds = 0.0

    def _forward(self, ids, positions, slots, pages, mask, kv_caches):
        return self.model(ids, positions, DecodeAttention(slots, pages, mask), kv_caches,
                          hidden_layers=self.hidden_layers)

    def fits(self, meta: AttentionMetadata, hidden_layers: tuple[int, ...]) -> bool:
        return meta.q_lens == [1] and hidden_layers == self.hidden_layers

    def run(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata):
        kv_len, bs = meta.kv_lens[0], self.block_size
        n_pages = max(MIN_PAGES, -(-kv_len // bs))
        have = min(n_pages, meta.block_tables.shape[1])
        pages = torch.full((1, n_pages), self.scratch_block, dtype=torch.long, device=ids.device)
        pages[0, :have] = meta.block_tables[0, :have]
        mask = torch.zeros(1, 1, 1, n_pages * bs, dtype=self.dtype, device=ids.device)
        mask[..., kv_len:] = float("-inf")
        return self._call(ids, positions, meta.slot_mapping, pages, mask)

    def _call(self, ids, positions, slots, pages, mask):
        torch._dynamo.mark_dynamic(pages, 1)
        torch._dynamo.mark_dynamic(mask, 3)
        return self.fn(ids, positions, slots, pages, mask, self.kv_caches)

    @torch.inference_mode()
    def warm_up(self) -> float:
        """Compile now (the first call), on a step that writes and reads only the scratch block; returns seconds."""
        dev = self.kv_caches[0][0].device
        t0 = time.perf_counter()
        pages = torch.full((1, MIN_PAGES), self.scratch_block, dtype=torch.long, device=dev)
        mask = torch.zeros(1, 1, 1, MIN_PAGES * self.block_size, dtype=self.dtype, device=dev)
        mask[..., 1:] = float("-inf")
        slot = torch.tensor([self.scratch_block * self.block_size], device=dev)
        zero = torch.zeros(1, dtype=torch.long, device=dev)
        self._call(zero, zero, slot, pages, mask)
        self.compile_seconds = time.perf_counter() - t0
        log.info("compiled the batch-1 decode step in %.1f s (Inductor, CPU)", self.compile_seconds)
        return self.compile_seconds
