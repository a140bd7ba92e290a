"""CUDA graphs of the target forward for decode and verification steps (issue 15).

A step on a GPU at small batch is bound by the host: a 36-layer model launches ~2,000 kernels, ~6 us each. A graph
replays them all in one launch. A graph holds fixed shapes and addresses, so each one serves a bucket, a padded
shape (requests B_g, rows T_g), and reads its inputs from fixed buffers that a step fills before the replay:

- token ids, positions and K/V slots: the first T rows are the step's, the rest padding;
- the attention backend's index structures (FlashInfer wrappers in CUDA-graph mode): one backend per bucket,
  planned outside the graph each step, with B_g requests. Requests past the step's B are padding requests of one
  token each, whose only key is their own, on the scratch block (one block past the block manager's, which no
  request is ever given). Rows past the planned ones belong to no request: attention writes zeros there, and every
  other layer works row by row, so what they hold never reaches a real row.

Pure decode steps (every request brings one token) have buckets (B_g, B_g) and FlashInfer's decode kernel; steps
where some request brings more (drafts to verify, short prompt chunks) have buckets (B_g, T_g), T_g a power of two
up to B_g x (1 + draft length) and `max_tokens`, and the prefill kernel, whose row limit is fixed at capture.
Anything larger, and steps whose drafter taps differ, run eagerly. The drafter, the LM head and the verification
run outside the graph.

Everything here but the capture itself runs on the CPU too (`capture=False`: the same padded step, eagerly), so
the padding, the buffers and the scratch block are tested in CI against the eager path (tests/test_cuda_graphs.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dspark.engine.model import CausalLM
from dspark.kernels.base import AttentionMetadata

log = logging.getLogger("dspark.graphs")


@dataclass(frozen=True, order=True)
class Bucket:
    batch: int  # requests, padding requests included
    tokens: int  # rows, padding included

    @property
    def decode(self) -> bool:
        return self.tokens == self.batch


def batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 16 (as nano-vllm), up to max_batch (which is always one)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return sizes + [max_batch]


def plan_buckets(max_batch: int, max_q: int, max_tokens: int) -> list[Bucket]:
    """Every bucket to capture: decode (B, B) for each batch size, and, where requests bring up to max_q tokens,
    (B, T) for T a power of two above B up to the first covering B x max_q, capped by max_tokens."""
    out = []
    for b in batch_sizes(max_batch):
        if b <= max_tokens:
            out.append(Bucket(b, b))
        t = 1
        while max_q > 1 and t < b * max_q and t < max_tokens:
            t *= 2
            if min(t, max_tokens) > b:
                out.append(Bucket(b, min(t, max_tokens)))
    return sorted(set(out))


def pick_bucket(buckets: list[Bucket], q_lens: list[int], max_q: int) -> Bucket | None:
    """The smallest bucket holding the step: B_g >= B, and T_g >= T + (B_g - B) (each padding request one row).
    None for a step with a request bringing more than max_q tokens (a prompt chunk: run eagerly)."""
    b, t = len(q_lens), sum(q_lens)
    if max(q_lens) > max_q:
        return None
    decode = t == b
    for k in buckets:  # sorted by (batch, tokens)
        if k.batch >= b and k.decode == decode and k.tokens >= t + (k.batch - b):
            return k
    return None


GraphAttentionFactory = Callable[[Bucket, torch.Tensor], object]  # (bucket, its slot buffer) -> backend


class StepGraphs:
    """The buckets' graphs (or, with capture=False, the same padded steps run eagerly) over shared input buffers."""

    def __init__(self, model: CausalLM, kv_caches: list, make_attention: GraphAttentionFactory, block_size: int,
                 scratch_block: int, max_q: int, max_batch: int, max_tokens: int, hidden_layers: tuple[int, ...],
                 device: torch.device, capture: bool = True):
        self.model, self.kv_caches, self.hidden_layers = model, kv_caches, hidden_layers
        self.block_size, self.scratch = block_size, scratch_block
        self.buckets, self.max_q = plan_buckets(max_batch, max_q, max_tokens), max_q
        rows = max(k.tokens for k in self.buckets)
        self.ids = torch.zeros(rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.slots = torch.full((rows,), scratch_block * block_size, dtype=torch.long, device=device)
        self.attention = {k: make_attention(k, self.slots[: k.tokens]) for k in self.buckets}
        self.graphs: dict[Bucket, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[Bucket, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        self.capture = capture
        self.replays = 0  # steps served by a bucket (graphs or, without capture, the padded eager path)

    def pick(self, q_lens: list[int], hidden_layers: tuple[int, ...]) -> Bucket | None:
        if hidden_layers != self.hidden_layers:
            return None
        return pick_bucket(self.buckets, q_lens, self.max_q)

    # -- one step -------------------------------------------------------------------------------------------
    def padded_metadata(self, bucket: Bucket, meta: AttentionMetadata) -> AttentionMetadata:
        """The step's metadata with the bucket's padding requests (one token, one key, on the scratch block)."""
        pad = bucket.batch - len(meta.q_lens)
        tables = meta.block_tables
        if pad:
            tables = torch.cat([tables, torch.full((pad, tables.shape[1]), self.scratch, dtype=tables.dtype,
                                                   device=tables.device)])
        return AttentionMetadata(meta.q_lens + [1] * pad, meta.kv_lens + [1] * pad, tables,
                                 self.slots[: bucket.tokens], meta.block_size)

    def run(self, bucket: Bucket, ids: torch.Tensor, positions: torch.Tensor,
            meta: AttentionMetadata) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Fill the buffers, plan the bucket's attention, replay: hidden states and taps of the step's rows."""
        n, end = ids.numel(), bucket.tokens
        self.ids[:n].copy_(ids)
        self.ids[n:end].zero_()
        self.positions[:n].copy_(positions)
        self.positions[n:end].zero_()  # padding requests' one token sits at position 0 of the scratch block
        self.slots[:n].copy_(meta.slot_mapping)
        self.slots[n:end].fill_(self.scratch * self.block_size)
        self.attention[bucket].plan(self.padded_metadata(bucket, meta))
        graph = self.graphs.get(bucket)
        if graph is not None:
            with torch.cuda.device(self.ids.device):  # the engine's thread may have another current device
                graph.replay()
            hidden, taps = self.outputs[bucket]
        else:
            hidden, taps = self._forward(bucket)
        self.replays += 1
        return hidden[:n], [t[:n] for t in taps]

    def _forward(self, bucket: Bucket) -> tuple[torch.Tensor, list[torch.Tensor]]:
        end = bucket.tokens
        return self.model(self.ids[:end], self.positions[:end], self.attention[bucket], self.kv_caches,
                          hidden_layers=self.hidden_layers)

    # -- start-up ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def capture_all(self) -> dict:
        """Capture every bucket's graph, largest first, into one memory pool (a smaller graph's buffers fit in
        what the larger ones left). Each bucket is first planned at its full row count (FlashInfer's prefill
        wrapper fixes its row limit at the first plan) and run once eagerly (JIT, cuBLAS handles), then captured.
        Returns what it took: graphs, seconds, bytes of device memory. Without capture, only the first plans."""
        if not self.capture:
            for bucket in self.buckets:
                self._fill_dummy(bucket)
            return {"graphs": 0, "seconds": 0.0, "bytes": 0}
        with torch.cuda.device(self.ids.device):  # capture on the model's device, whatever the current one
            t0 = time.perf_counter()
            torch.cuda.synchronize()
            before = torch.cuda.memory_reserved()
            pool = None
            for bucket in sorted(self.buckets, key=lambda k: (k.tokens, k.batch), reverse=True):
                self._fill_dummy(bucket)
                self._forward(bucket)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[bucket] = self._forward(bucket)
                pool = graph.pool() if pool is None else pool
                self.graphs[bucket] = graph
            torch.cuda.synchronize()
            took = {"graphs": len(self.graphs), "seconds": time.perf_counter() - t0,
                    "bytes": torch.cuda.memory_reserved() - before}
        log.info("captured %d CUDA graphs (%d decode, largest %d requests / %d rows) in %.1f s, %.0f MiB",
                 took["graphs"], sum(k.decode for k in self.graphs), max(k.batch for k in self.graphs),
                 max(k.tokens for k in self.graphs), took["seconds"], took["bytes"] / 2**20)
        return took

    def _fill_dummy(self, bucket: Bucket) -> None:
        """A step of exactly the bucket's shape, all on the scratch block: its rows split evenly over its requests,
        each request's keys its own rows (the scratch block repeated as its pages)."""
        b, t, bs = bucket.batch, bucket.tokens, self.block_size
        q_lens = [t // b + (r < t % b) for r in range(b)]
        pages = -(-max(q_lens) // bs)
        positions = torch.cat([torch.arange(q) for q in q_lens]).to(self.ids.device)
        self.ids[:t].zero_()
        self.positions[:t].copy_(positions)
        self.slots[:t].copy_(self.scratch * bs + positions % bs)
        tables = torch.full((b, pages), self.scratch, dtype=torch.long, device=self.ids.device)
        self.attention[bucket].plan(AttentionMetadata(q_lens, q_lens, tables, self.slots[:t], bs))
