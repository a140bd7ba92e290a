"""ModelRunner: owns the weights and the KV tensors, turns a StepPlan into one batched forward."""

from __future__ import annotations

import torch

from dspark.engine.cuda_graphs import GraphAttentionFactory, StepGraphs
from dspark.engine.model import CausalLM
from dspark.kernels.base import AttentionBackend, AttentionMetadata
from dspark.scheduler.block_manager import BlockManager


def kv_bytes_per_token(model: CausalLM, dtype: torch.dtype) -> int:
    c = model.config
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * torch.empty((), dtype=dtype).element_size()


def hidden_layers(tap_layers: tuple[int, ...]) -> tuple[int, ...]:
    """The model's hidden-state indices of 0-based decoder layers (index 0 is the embeddings)."""
    return tuple(i + 1 for i in tap_layers)


class ModelRunner:
    def __init__(self, model: CausalLM, backend: AttentionBackend, num_blocks: int, block_size: int,
                 device: str = "cpu", kv_dtype: torch.dtype | None = None, tap_width: int = 0, tp=None):
        # rank 0 of tensor parallelism (dspark/engine/parallel.py's TPDriver): each forward sends its inputs to the
        # other ranks first; None at TP=1
        self.tp = tp
        self.model = model.fuse_()  # serving layout: fused q|k|v and gate|up; bf16 weights packed for oneDNN
        self.backend = backend
        self.device = torch.device(device)
        self.block_size = block_size
        c = model.config
        dtype = kv_dtype or next(model.parameters()).dtype
        # one block past the block manager's: the scratch block, which padding rows of CUDA-graph steps write to
        # and read from, and which no request is ever given
        self.scratch_block = num_blocks
        shape = (num_blocks + 1, block_size, c.num_key_value_heads, c.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(c.num_hidden_layers)
        ]
        # The drafter's inputs (target hidden states of the tapped layers), paged exactly like the K/V: every
        # forward writes each token's row at its cache slot, so a request that maps cached prefix blocks finds
        # the drafter's context there too, and the drafter reads a request's context from its block table.
        self.tap_cache = torch.zeros((num_blocks + 1) * block_size, tap_width, dtype=dtype, device=device) \
            if tap_width else None
        self.graphs: StepGraphs | None = None
        self.compiled = None  # dspark/engine/compiled.py's CompiledDecode, set by enable_compile

    def enable_graphs(self, max_q: int, max_batch: int, max_tokens: int, max_model_len: int,
                      tap_layers: tuple[int, ...] = (), capture: bool = True,
                      make_attention: GraphAttentionFactory | None = None) -> dict:
        """Serve decode and verification steps from CUDA graphs (dspark/engine/cuda_graphs.py), captured now; requests
        bringing up to max_q tokens, up to max_batch requests and max_tokens rows. `capture=False` runs the same
        padded steps eagerly (CPU tests); `make_attention` defaults to FlashInfer's CUDA-graph wrappers.
        Returns what the capture took (graphs, seconds, bytes)."""
        c = self.model.config
        self.model.model.rotary_emb.reserve(max_model_len, self.device)  # no position read back in a step
        if make_attention is None:
            from dspark.kernels.flashinfer_backend import WORKSPACE_BYTES, FlashInferGraphAttention

            workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)  # FlashInfer asks zeros
            max_pages = -(-max_model_len // self.block_size)
            dtype = self.kv_caches[0][0].dtype

            def make_attention(bucket, slots):
                return FlashInferGraphAttention(c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                                                bucket.batch, bucket.batch * max_pages, slots, bucket.decode,
                                                workspace, dtype)

        self.graphs = StepGraphs(self.model, self.kv_caches, make_attention, self.block_size, self.scratch_block,
                                 max_q, max_batch, max_tokens, hidden_layers(tap_layers), self.device,
                                 capture)
        return self.graphs.capture_all()

    def enable_compile(self, max_model_len: int, tap_layers: tuple[int, ...] = (), max_q: int = 1,
                       max_rows: int = 1) -> float:
        """Serve decode-shaped steps (requests of up to max_q rows, up to max_rows in all, with these drafter taps)
        from Inductor graphs (dspark/engine/compiled.py), compiled now; returns the seconds it took."""
        from dspark.engine.compiled import CompiledDecode

        self.model.fixed_order_norms_()  # the norms' bits alike in eager and compiled steps
        try:
            compiled = CompiledDecode(self.model, self.kv_caches, self.block_size, self.scratch_block,
                                      hidden_layers(tap_layers), max_model_len, max_q, max_rows,
                                      row_op=getattr(self.backend, "row_op", False))
            seconds = compiled.warm_up()  # steps use it only once it has compiled
        except Exception:
            self.model.fixed_order_norms_(False)  # eager after all: aten's norm, fewer ops
            raise
        self.compiled = compiled
        return seconds

    def bucket(self, q_lens: list[int], tap_layers: tuple[int, ...] = ()):
        """The CUDA-graph bucket a step of these query lengths (and drafter taps) replays, or None: run eagerly."""
        if self.graphs is None:
            return None
        return self.graphs.pick(q_lens, hidden_layers(tap_layers))

    def build_metadata(self, chunks: list[tuple[list[int], int]], bm: BlockManager,
                       seq_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """chunks: (token ids to run, KV length before them) per request -> flat ids, positions, metadata.

        The block tables are one row gather from the block manager's slot array (kept in step with every
        allocation, no per-step pad); per token only tensor arithmetic: positions and cache slots come from one
        repeat_interleave over the step, then one copy each to the device."""
        q_lens = [len(tokens) for tokens, _ in chunks]
        kv_lens = [start + q for (_, start), q in zip(chunks, q_lens)]
        bt = torch.from_numpy(bm.block_tables(seq_ids))  # one gather from the block manager's slot array
        q_t = torch.tensor(q_lens)
        req = torch.repeat_interleave(torch.arange(len(chunks)), q_t)  # each token's request
        first = torch.repeat_interleave(torch.tensor([start for _, start in chunks]) - (q_t.cumsum(0) - q_t), q_t)
        positions = first + torch.arange(len(req))
        bs = self.block_size
        slots = bt[req, positions // bs] * bs + positions % bs
        ids = torch.tensor([t for tokens, _ in chunks for t in tokens], dtype=torch.long)
        meta = AttentionMetadata(q_lens, kv_lens, bt.to(self.device), slots.to(self.device), bs)
        return ids.to(self.device), positions.to(self.device), meta

    @torch.inference_mode()
    def forward(self, chunks: list[tuple[list[int], int]], bm: BlockManager, seq_ids: list[int],
                logits_index: list[int], tap_layers: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the target on every request's new tokens.

        Returns float32 logits at the flat `logits_index` rows (on the model's device), and the outputs of
        `tap_layers` (0-based decoder layers) for every token, concatenated [T, len(tap_layers) * hidden], for the
        drafter (also written to the tap cache, when there is one)."""
        ids, positions, meta = self.build_metadata(chunks, bm, seq_ids)
        if self.tp is not None:
            try:
                self.tp.send_step(chunks, seq_ids, ids, bm, logits_index)
                return self._run(ids, positions, meta, logits_index, tap_layers)
            except Exception as e:  # the ranks are out of step now (a collective lost a peer, or this rank failed)
                self.tp.step_failed(e)
                raise
        return self._run(ids, positions, meta, logits_index, tap_layers)

    def _run(self, ids, positions, meta, logits_index, tap_layers):
        bucket = self.bucket(meta.q_lens, tap_layers)
        if bucket is not None:
            hidden, taps = self.graphs.run(bucket, ids, positions, meta)
        elif self.compiled is not None and self.compiled.fits(meta, hidden_layers(tap_layers)):
            hidden, taps = self.compiled.run(ids, positions, meta)
        else:
            self.backend.plan(meta)
            hidden, taps = self.model(ids, positions, self.backend, self.kv_caches,
                                      hidden_layers=hidden_layers(tap_layers))
        index = torch.tensor(logits_index, dtype=torch.long, device=self.device)
        logits = self.model.logits(hidden[index])  # stays on the device; empty when only mid-prompt chunks ran
        taps = torch.cat(taps, -1) if taps else None
        if taps is not None and self.tap_cache is not None:
            self.tap_cache.index_copy_(0, meta.slot_mapping, taps.to(self.tap_cache.dtype))
        return logits, taps

    def cached_taps(self, spans: list[tuple[list[int], int, int]]) -> torch.Tensor:
        """Tap-cache rows of positions start..end-1 of each (block table, start, end), one span after another,
        in one gather."""
        bs, slots = self.block_size, []
        for table, start, end in spans:
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
        return self.tap_cache[torch.tensor(slots, dtype=torch.long, device=self.device)]
