"""Decode and verification steps on the CPU as Inductor graphs (`--torch-compile`).

An eager batch-1 step of a small model dispatches about 2,000 small ops (norms, RoPE, views, dtype casts, the
paged gather), and on a 2-core CPU that dispatch costs as much as the matmuls (docs/benchmarks.md,
int4-step-profile). torch.compile of the whole step (30 layers, paged attention, final norm: one graph, one call)
fuses the small ops into a few C++ kernels and calls the quantized matmuls and SDPA directly (section
compiled-decode). Compiling each layer apart, around eager attention, did not pay (section quantization).

Same bits as the eager step: Inductor runs with `emulate_precision_casts` (every cast to bf16 rounds where eager
rounds), RMSNorm sums its squares in a fixed order of elementwise adds in every step of a compiled engine
(model.sum_of_squares: Inductor's own reduction order differed in the last bit from aten's), and attention reads
whole pages masked past the length, as the torch backend does in `--deterministic`.
So a compiled decode step, an eager verification step and an eager batched step score a token alike, and greedy
speculation keeps plain decoding's text (tests/test_compiled.py checks the logits bit for bit).

Two graphs are compiled at start-up: one token of one request, and any number of rows (decode rows of a batch,
drafts to verify), both dynamic in the number of KV pages (a length never compiles again); the engine calls them
for the steps they fit (`fits`), and runs prefill chunks eagerly.
"""

from __future__ import annotations

import logging
import shutil
import time
import types

import torch
import torch.nn.functional as F

from dspark.engine.model import CausalLM
from dspark.kernels.base import AttentionMetadata, write_paged_kv

log = logging.getLogger("dspark.engine")

MIN_PAGES = 2  # a dynamic size of 1 would be specialized (compiled again): short requests get a masked scratch page


def can_compile() -> bool:
    """Inductor's CPU code needs a C++ compiler on the host."""
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


STEP_INPUTS = ("ids", "positions", "slots", "pages", "seen")


def step_guards(entries) -> list[bool]:
    """Which of dynamo's guards a call checks: those on the step's own tensors (their shapes pick the lone-row
    graph or the rows graph) and the shape environment's (the dynamic sizes' ranges). The ~3,500 others watch
    the model's attributes, weights and the KV cache list, which the engine never changes while its graphs
    live (and each engine compiles its own: own_code); checking them took ~2 ms of a ~20 ms step (AVX2 host,
    docs/benchmarks.md, w4a8-kernels)."""
    return [e.guard_type == "SHAPE_ENV" or e.name in STEP_INPUTS for e in entries]


def own_code(method):
    """The method on a copy of its code object: dynamo keeps compiled graphs per code object, so each engine's
    graphs stay its own even though step_guards no longer checks which model a call comes with."""
    f = method.__func__
    copy = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    return types.MethodType(copy, method.__self__)


class DecodeAttention:
    """Paged attention where every row is a decode row of its own, written to be traced: the step's slots, each
    row's pages ([T, P], its request's, padded with the scratch block) and what it sees are tensors, so one graph
    serves every length. `seen`: an additive mask ([T, 1, 1, P * block_size], -inf past the row's position; whole
    pages, masked: TorchPagedAttention's `--deterministic` layout, hence its bits), or with `row_op` the number of
    keys each row sees ([T]), for cpu_attention.cpp's op as TorchPagedAttention's row_op calls it."""

    def __init__(self, slots: torch.Tensor, pages: torch.Tensor, seen: torch.Tensor, row_op: bool):
        self.slots, self.pages, self.seen, self.row_op = slots, pages, seen, row_op

    def plan(self, meta: AttentionMetadata) -> None:  # the step's tensors came with the constructor
        pass

    def forward(self, layer_idx, q, k, v, kv_cache, scale):
        write_paged_kv(kv_cache, self.slots, k, v)
        k_cache, v_cache = kv_cache
        if self.row_op:
            return torch.ops.dspark_cpu.paged_attention(q, k_cache, v_cache, self.pages, self.seen, scale)
        n_kv, d = k_cache.shape[-2:]
        b, h = q.shape[0], q.shape[1]
        flat = self.pages.reshape(-1)
        keys = k_cache.index_select(0, flat).view(b, -1, n_kv, d).transpose(1, 2).to(q.dtype)
        values = v_cache.index_select(0, flat).view(b, -1, n_kv, d).transpose(1, 2).to(q.dtype)
        # GQA as rows of the KV head, as the torch backend's decode path does
        out = F.scaled_dot_product_attention(q.view(b, n_kv, h // n_kv, d), keys, values, attn_mask=self.seen,
                                             scale=scale)
        return out.reshape(b, h, d)


class CompiledDecode:
    """The target's forward for decode-shaped steps (every request brings one token, or drafts to verify: at most
    `max_q` rows) as compiled graphs: one for a lone decode row, one dynamic in the number of rows. `run`
    returns what CausalLM.forward does.

    Every row attends as a decode row of its own (its request's pages, masked past its position), the layout of
    the torch backend's `--deterministic` verification, so a draft row gets the bits its decode step would.
    `max_rows` 1 keeps only the lone decode row: float32 SDPA is not batch-invariant on the CPU (the torch
    backend gives each row its own SDPA call there), so only a lone row can be compiled with eager's bits, unless
    the rows are attended by cpu_attention.cpp's op (`row_op`, as the torch backend then does)."""

    def __init__(self, model: CausalLM, kv_caches: list, block_size: int, scratch_block: int,
                 hidden_layers: tuple[int, ...], max_model_len: int, max_q: int = 1, max_rows: int = 1,
                 row_op: bool = False):
        self.model, self.kv_caches, self.block_size = model, kv_caches, block_size
        self.scratch_block, self.hidden_layers = scratch_block, hidden_layers
        self.max_q, self.max_rows, self.row_op = max_q, max_rows, row_op
        self.max_pages = max(MIN_PAGES, -(-max_model_len // block_size))
        self.dtype = kv_caches[0][0].dtype
        model.model.rotary_emb.reserve(max_model_len, kv_caches[0][0].device)  # no position read back in the graph
        # eager's roundings (every cast to bf16 rounds where eager rounds): the same bits as the eager step
        self.fn = torch.compile(own_code(self._forward), dynamic=False, fullgraph=True,
                                options={"emulate_precision_casts": True, "guard_filter_fn": step_guards})

    def _forward(self, ids, positions, slots, pages, seen, kv_caches):
        return self.model(ids, positions, DecodeAttention(slots, pages, seen, self.row_op), kv_caches,
                          hidden_layers=self.hidden_layers)

    def fits(self, meta: AttentionMetadata, hidden_layers: tuple[int, ...]) -> bool:
        return (hidden_layers == self.hidden_layers and max(meta.q_lens) <= self.max_q
                and sum(meta.q_lens) <= self.max_rows)

    def run(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata):
        """Each row's pages (its request's, padded with the scratch block) and mask (-inf past its position), or
        with the row op its number of keys."""
        bs, dev = self.block_size, ids.device
        n_pages = max(MIN_PAGES, -(-max(meta.kv_lens) // bs))
        table = meta.block_tables[:, :n_pages]
        if table.shape[1] < n_pages:
            pad = torch.full((len(table), n_pages - table.shape[1]), self.scratch_block, dtype=table.dtype,
                             device=dev)
            table = torch.cat([table, pad], 1)
        if len(ids) == 1:
            pages = table
        else:
            owner = torch.repeat_interleave(torch.arange(len(meta.q_lens), device=dev),
                                            torch.tensor(meta.q_lens, device=dev))
            pages = table[owner]
        if self.row_op:
            return self._call(ids, positions, meta.slot_mapping, pages.long(), positions + 1)
        past = torch.arange(n_pages * bs, device=dev)[None, :] > positions[:, None]
        mask = torch.zeros(len(ids), 1, 1, n_pages * bs, dtype=self.dtype, device=dev).masked_fill_(
            past[:, None, None, :], float("-inf"))
        return self._call(ids, positions, meta.slot_mapping, pages.long(), mask)

    def _call(self, ids, positions, slots, pages, seen):
        if len(ids) > 1:  # rows: one graph for any count from 2 (a count of 1 is the lone decode row's graph)
            for t in (ids, positions, slots, pages, seen):
                torch._dynamo.mark_dynamic(t, 0, min=2, max=max(2, self.max_rows))
        torch._dynamo.mark_dynamic(pages, 1, min=MIN_PAGES, max=self.max_pages)
        if not self.row_op:
            torch._dynamo.mark_dynamic(seen, 3, min=MIN_PAGES * self.block_size,
                                       max=self.max_pages * self.block_size)
        return self.fn(ids, positions, slots, pages, seen, self.kv_caches)

    @torch.inference_mode()
    def warm_up(self) -> float:
        """Compile now (the first calls), on steps that write and read only the scratch block; returns seconds."""
        dev = self.kv_caches[0][0].device
        t0 = time.perf_counter()
        for rows in (1, 2) if self.max_rows > 1 else (1,):
            pages = torch.full((rows, MIN_PAGES), self.scratch_block, dtype=torch.long, device=dev)
            mask = torch.zeros(rows, 1, 1, MIN_PAGES * self.block_size, dtype=self.dtype, device=dev)
            mask[..., rows:] = float("-inf")
            seen = torch.arange(1, rows + 1, device=dev) if self.row_op else mask
            slots = self.scratch_block * self.block_size + torch.arange(rows, device=dev)
            self._call(torch.zeros(rows, dtype=torch.long, device=dev), torch.arange(rows, device=dev), slots,
                       pages, seen)
        seconds = time.perf_counter() - t0
        log.info("compiled the decode step (%s) in %.1f s (Inductor, CPU)",
                 f"1 row, and 2-{self.max_rows} rows" if self.max_rows > 1 else "1 row", seconds)
        return seconds
