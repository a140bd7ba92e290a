"""LLMEngine: one `step()` = schedule -> one batched forward -> sample -> stop checks -> outputs, in token ids.

The engine core's state and step. It knows no text: the front end detokenizes, finds stop strings (and aborts
the request when it does) and speaks the protocol; EOS, stop token ids, max_tokens and deadlines end requests here.
"""

from __future__ import annotations

import logging
import time
from collections import deque

import torch

from dspark.engine.drafters import load_drafter
from dspark.engine.drafters.ngram import NgramProposer
from dspark.engine.drafters.suffix import SuffixProposer
from dspark.engine.drafters.vocab import DraftVocab
from dspark.engine.grammar import GrammarCompiler
from dspark.engine.messages import EngineCoreOutput
from dspark.engine.model import load_model
from dspark.engine.model_config import ModelConfig
from dspark.engine.runner import ModelRunner, kv_bytes_per_token
from dspark.engine.sampling import SamplingParams, make_generator
from dspark.engine.settings import Settings
from dspark.engine.tokenizer import Tokenizer
from dspark.engine.verify import Verify, verify_step
from dspark.kernels import make_backend
from dspark.scheduler.block_manager import BlockManager
from dspark.scheduler.cost_model import StepCostModel
from dspark.scheduler.draft_policy import DraftPolicy
from dspark.scheduler.scheduler import Scheduler
from dspark.scheduler.sequence import SeqStatus, Sequence

log = logging.getLogger("dspark.engine")

class LLMEngine:
    def __init__(self, settings: Settings):
        self.tp = None  # rank 0's side of tensor parallelism (dspark/engine/parallel.py), None at TP=1
        if settings.tensor_parallel_size > 1:
            settings.graphs_on  # noqa: B018 (a bad combination fails before any worker starts)
            from dspark.engine.parallel import TPDriver, plan_shard

            cfg, world = ModelConfig.from_dir(settings.model), settings.tensor_parallel_size
            for rank in range(world):  # a size the model's heads do not split into fails here, too
                plan_shard(cfg, rank, world)
            if settings.quantization_scheme != "none":
                raise ValueError(f"--quantization {settings.quantization_scheme} with --tensor-parallel-size {world}: "
                                 "quantized projections are not sharded yet; use --quantization none")
            if settings.row_invariant:
                raise ValueError("--deterministic with --tensor-parallel-size > 1 is not supported (untested): pass "
                                 "--deterministic off")
            self.tp = TPDriver(settings)  # workers start loading their shards now, beside this one
        try:
            self._init(settings)
        except BaseException:
            if self.tp is not None:
                self.tp.abort()
            raise

    def close(self) -> None:
        """Stop the tensor-parallel workers (nothing to do at TP=1)."""
        if self.tp is not None:
            self.tp.close()

    def _init(self, settings: Settings) -> None:
        self.settings = settings
        if settings.threads:
            torch.set_num_threads(settings.threads)
        if settings.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device cuda requested but CUDA is not available")
        dtype = settings.torch_dtype
        attention, graphs = settings.attention, settings.graphs_on  # a bad combination fails before the load
        self.model_config = ModelConfig.from_dir(settings.model)
        self.tokenizer = Tokenizer(settings.model)  # its vocabulary only: EOS ids, and llguidance's token view
        self.grammars = GrammarCompiler(self.tokenizer)
        shard = None
        if self.tp is not None:
            from dspark.engine.parallel import plan_shard

            shard = plan_shard(self.model_config, 0, settings.tensor_parallel_size)
        self.model = load_model(settings.model, dtype=dtype, device=settings.device,
                                quantization=settings.quantization_scheme,
                                group_size=settings.quantization_group_size, shard=shard)
        # what the drafter reads of the target (its embedding and LM head): the model itself, or under tensor
        # parallelism whole copies on rank 0 (the model's are sharded), loaded only when a model drafter runs
        self.draft_target = self.model
        if shard is not None:
            from dspark.engine.parallel import parallelize_

            parallelize_(self.model, shard, self.tp.group, self.model_config.vocab_size)
        self.drafter = None
        self.tap_layers: tuple[int, ...] = ()
        method, _, also = settings.speculative_method.partition("+")  # "dspark+ngram": the hybrid
        self.method = method
        # prompt lookup / suffix decoding: the drafter itself (ngram, suffix), or tried first for every drafting
        # request (a hybrid)
        self.lookup = NgramProposer(self.model_config.vocab_size, settings.device, settings.ngram_min,
                                    settings.ngram_max) if "ngram" in (method, also) else None
        self.suffix = SuffixProposer(
            self.model_config.vocab_size, settings.device, settings.suffix_max_depth, settings.suffix_spec_factor,
            settings.suffix_min_token_prob, max_cached_requests=settings.suffix_max_cached_requests,
            max_cached_tokens=settings.suffix_max_cached_tokens) if "suffix" in (method, also) else None
        if method == "ngram":  # model-free: no weights, no target features
            self.drafter = self.lookup
        elif method == "suffix":
            self.drafter = self.suffix
        elif settings.drafter_path is not None:
            if shard is not None:
                self.draft_target = self._target_heads(dtype)
            self.drafter = load_drafter(settings.drafter_path, self.draft_target, dtype, settings.device)
            if self.drafter.cfg.method != method:
                raise ValueError(f"{settings.drafter_path} is a {self.drafter.cfg.method} drafter, not {method}")
            self.tap_layers = tuple(self.drafter.cfg.target_layer_ids)
            self.drafter.vocab = DraftVocab.load(settings.drafter_path, settings.draft_vocab_size,
                                                 self.model_config.vocab_size,
                                                 [*self.tokenizer.eos_ids, *self.model_config.eos_token_id],
                                                 settings.device)
        tap_width = len(self.tap_layers) * self.model_config.hidden_size
        kv_per_token = kv_bytes_per_token(self.model, dtype)
        if shard is not None:  # every rank has the blocks rank 0 has: the budget holds on the rank with most KV heads
            from dspark.engine.parallel import most_kv_heads

            most = most_kv_heads(self.model_config, shard.world)
            kv_per_token = kv_per_token * most // self.model.config.num_key_value_heads
        per_token = kv_per_token + tap_width * dtype.itemsize
        bs = settings.block_size
        num_blocks = settings.num_kv_blocks or max(1, settings.kv_cache_memory_mb * 2**20 // (per_token * bs))
        model_len = self.model_config.max_position_embeddings
        self.max_model_len = min(settings.max_model_len or model_len, num_blocks * bs)
        manager = BlockManager
        if shard is not None:  # its table changes are journaled for the workers' copies
            from dspark.engine.parallel import JournaledBlockManager as manager
        self.block_manager = manager(num_blocks, bs, settings.enable_prefix_caching,
                                          namespace=f"{settings.model}|{dtype}")
        # seq_id -> [drafter context state or None, positions folded into it]. The target features it is built
        # from live in the runner's tap cache; they are folded in only when the request drafts, so steps where
        # it decodes plainly cost nothing.
        self.draft_ctx: dict[int, list] = {}
        self.stats = {"draft_rounds": 0, "draft_tokens": 0, "accepted_tokens": 0, "verified_tokens": 0,
                      "scheduler_seconds": 0.0, "steps": 0, "bytes_to_host": 0,
                      "lookup_rounds": 0, "suffix_rounds": 0}
        # (verified, accepted, confidences, proposer) per verified round; the server drains it into metrics every
        # step, eval-drafter reads it whole
        self.round_log: deque[tuple[int, int, list[float], str]] = deque(maxlen=100000)
        if self.drafter is None:
            draft_len = 0
        elif self.model_free:  # no block: lookup proposes as many as the continuation it finds
            draft_len = settings.draft_len
        else:
            draft_len = min(settings.draft_len, self.drafter.cfg.block_size)
        if settings.draft_policy not in ("adaptive", "fixed"):
            raise ValueError(f"draft_policy must be adaptive or fixed, not {settings.draft_policy!r}")
        self.cost = StepCostModel(settings.max_num_batched_tokens, settings.max_num_seqs)
        policy = None
        if self.drafter is not None:
            policy = DraftPolicy(self.cost, draft_len, settings.min_draft_len, settings.draft_policy == "adaptive")
        self.scheduler = Scheduler(self.block_manager, settings.max_num_seqs, settings.max_num_batched_tokens,
                                   draft_len, self.max_model_len, policy,
                                   has_confidence=self.drafter is not None and (
                                       self.drafter is self.suffix  # its tokens' probabilities
                                       or not self.model_free and self.drafter.cfg.confidence_head),
                                   slo_tokens_per_s=settings.slo_tokens_per_s, max_waiting=settings.max_waiting)
        c = self.model.config  # this rank's heads (all of them at TP=1)
        backend = make_backend(attention, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                               settings.device, dtype, row_invariant=settings.row_invariant)
        if settings.row_invariant:
            self.model.row_invariant_()
        if self.tp is not None:  # every rank's KV cache has as many blocks as rank 0's block manager hands out
            self.tp.configure(num_blocks=num_blocks, block_size=bs)
        self.runner = ModelRunner(self.model, backend, num_blocks, bs, settings.device, dtype, tap_width, self.tp)
        if graphs:  # before the cost profile, so that it times the steps as they will run
            self.runner.enable_graphs(1 + draft_len, min(settings.max_graph_batch, settings.max_num_seqs),
                                      settings.max_graph_tokens, self.max_model_len, self.tap_layers)
        if settings.compile_on:  # before the cost profile too
            try:
                # rows together only where the torch backend's rows are batch-invariant: bf16 SDPA, or float32 rows
                # by cpu_attention.cpp's op (row_op), under `full` only: that graph took 258 s more to compile on a
                # cold start of the default model (AVX2 host; docs/benchmarks.md, peers-decode-rate-avx2-rowop)
                together = dtype == torch.bfloat16 or (settings.torch_compile == "full"
                                                       and getattr(backend, "row_op", False))
                rows = settings.max_num_batched_tokens if together else 1
                self.runner.enable_compile(self.max_model_len, self.tap_layers, 1 + draft_len, rows)
            except Exception as e:  # auto: serve eagerly rather than not at all; on: the asker hears why
                if settings.torch_compile in ("on", "full"):
                    raise
                log.warning("torch.compile of the decode step failed, decoding eagerly: %s: %s", type(e).__name__, e)
        if policy is not None and policy.adaptive:
            ctx = self._scratch_context()  # built once, outside what is timed
            self.cost.profile(self._profile_step, min(512, settings.max_num_batched_tokens, self.max_model_len),
                              lambda r: self._profile_draft(r, ctx), min(64, settings.max_num_seqs))
        self.eos_ids = set(self.tokenizer.eos_ids) | set(self.model_config.eos_token_id)
        self.seqs: dict[str, Sequence] = {}
        self.last_step_tokens = 0
        self.last_step_bytes_to_host = 0  # what the last step copied from the logits' device (ids, counts, logprobs)
        log.info("engine ready: %s, %d KV blocks x %d tokens, max_model_len %d, speculative %s (draft_len %d), "
                 "%s on %s %s, weights %s, deterministic %s, CUDA graphs %s, compiled decode %s", settings.model,
                 num_blocks, bs, self.max_model_len, settings.speculative_method, draft_len, attention,
                 settings.device, dtype, self.weights_summary, "on" if settings.row_invariant else "off",
                 "on" if self.runner.graphs is not None else "off", "on" if self.runner.compiled else "off")

    def _target_heads(self, dtype: torch.dtype):
        """The whole embedding (and an untied LM head) for the drafter on rank 0 under tensor parallelism."""
        from dspark.engine.model import load_tensors
        from dspark.engine.parallel import TargetHeads

        c = self.model_config
        names = ["model.embed_tokens.weight", *([] if c.tie_word_embeddings else ["lm_head.weight"])]
        t = load_tensors(self.settings.model, names, dtype, self.settings.device)
        return TargetHeads(c, t[names[0]], None if c.tie_word_embeddings else t[names[1]])

    @property
    def weights_summary(self) -> str:
        """What the target's projections run on: the dtype, or the quantization and where its codes came from."""
        q = getattr(self.model, "quantizer", None)
        if q is None:
            return str(self.model.model.embed_tokens.weight.dtype).removeprefix("torch.")
        group = (f" (group {q.group_size})" if q.scheme == "int4" else
                 " (int4 groups of 32 x int8 activations, the head int8 blocks of 32)" if q.scheme == "w4a8" else "")
        stored = f", {q.from_file} projections' codes as stored in the GGUF" if q.from_file else ""
        kept = f", kept in float: {', '.join(q.skipped)}" if q.skipped else ""
        return f"{q.scheme}{group}{stored}{kept}"

    # -- requests -------------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        """Queue a request. Its parameters and token ids are trusted: the API boundary validated them (the
        pydantic models and `server/app.py`'s checks). Only what depends on the core's own state is checked here:
        an empty prompt, a request id already running, a request longer than this core's context."""
        if not prompt_ids:
            raise ValueError("prompt is empty")
        if request_id in self.seqs:
            raise ValueError(f"duplicate request id {request_id}")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                             f"context length {self.max_model_len}")
        seq = Sequence(request_id, list(prompt_ids), params, make_generator(params.seed))
        if params.grammar is not None:
            seq.constraint = self.grammars.constraint(params.grammar)
        self.seqs[request_id] = seq
        self.scheduler.add(seq)
        return seq

    def abort_request(self, request_id: str) -> None:
        seq = self.seqs.get(request_id)
        if seq is not None and not seq.finished:
            self._end(seq, "abort")
        self.seqs.pop(request_id, None)

    def _end(self, seq: Sequence, reason: str) -> None:
        """End a request outside the normal accept path: its KV blocks and drafter state go now."""
        self.scheduler.finish(seq, reason)
        self.draft_ctx.pop(seq.seq_id, None)
        self.seqs.pop(seq.request_id, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def _profile_step(self, n: int) -> None:
        """One target forward of n batch tokens through scratch sequences (start-up profile of SPS(B)), waited for
        on a GPU. With CUDA graphs, where a bucket holds it, shaped as the verification steps it stands for
        (requests of at most 1 + draft_len rows, all sharing one scratch sequence's blocks, logits at every row), so
        it times the graphs they replay; otherwise one prompt chunk."""
        graphs, sid = self.runner.graphs, -1
        sizes = [n]
        if graphs is not None:
            per = graphs.max_q
            split = [min(per, n - i) for i in range(0, n, per)]
            if self.runner.bucket(split, self.tap_layers) is not None:
                sizes = split
        rows = list(range(n)) if len(sizes) > 1 else [n - 1]
        try:
            self.block_manager.allocate(sid, max(sizes))
            self.runner.forward([([0] * q, 0) for q in sizes], self.block_manager, [sid] * len(sizes), rows,
                                self.tap_layers)
            if self.runner.device.type == "cuda":
                torch.cuda.synchronize(self.runner.device)
        finally:
            self.block_manager.free(sid)

    @property
    def model_free(self) -> bool:
        """The drafter proposes from token ids alone (n-gram lookup): no features, no context state."""
        return getattr(self.drafter, "model_free", False)

    def _scratch_context(self, context: int = 64):
        """Drafter context state for `context` zero features (for a model-free drafter, token ids that repeat),
        for the start-up profile."""
        if self.model_free:
            return [1, 2, 3, 4] * (context // 4)
        taps = torch.zeros(context, len(self.tap_layers) * self.model_config.hidden_size,
                           dtype=self.draft_target.lm_head.weight.dtype, device=self.settings.device)
        return self.drafter.extend_context(None, taps, 0, [0] * context)

    def _profile_draft(self, r: int, ctx) -> None:
        """One greedy drafting round for r requests over `ctx` (start-up profile of the drafter; the steps' own
        measurements, which replace it online, also count folding in each round's new features)."""
        if self.model_free:
            self.drafter.propose([ctx] * r, [self.scheduler.draft_len] * r, [SamplingParams(temperature=0)] * r)
            return
        self.drafter.propose(self.draft_target.model.embed_tokens, self.draft_target.lm_head, [0] * r, [ctx] * r,
                             [self.scheduler.draft_len] * r, [SamplingParams(temperature=0)] * r,
                             [make_generator(0)] * r, self.settings.confidence_threshold)

    # -- one step ---------------------------------------------------------------------------------------------
    def step(self) -> list[EngineCoreOutput]:
        """schedule -> draft -> one batched target forward (prefill chunks, decodes, drafts) -> accept -> emit."""
        expired = self._expire_deadlines()
        t0 = time.perf_counter()
        plan = self.scheduler.schedule()
        t_sched = time.perf_counter() - t0
        for s in plan.preempted:
            self.draft_ctx.pop(s.seq_id, None)
        if not plan.items:
            return expired
        drafting = [it for it in plan.items if it.num_draft]
        t1 = time.perf_counter()  # the drafter's cost includes folding in the features it has not seen yet
        drafts = self._propose(drafting)
        t2 = time.perf_counter()
        if drafting:
            self.cost.draft.observe(len(drafting), t2 - t1)
            self.scheduler.choose_draft_lengths(plan, drafts)
            for it in drafting:
                drafts[it.seq.seq_id] = drafts[it.seq.seq_id].truncate(it.num_draft)
                if not it.num_draft:  # drafted but not worth verifying: a round that committed just 1 token
                    self.scheduler.policy.observe(it.seq.seq_id, it.seq.params.greedy, 0, 0)
        t3 = time.perf_counter()
        t_sched += t3 - t2
        self.stats["scheduler_seconds"] += t_sched
        self.stats["steps"] += 1
        chunks, seq_ids, logits_index = [], [], []
        offset = 0
        for it in plan.items:
            s = it.seq
            if it.num_draft:
                toks = [s.token_ids[-1], *drafts[s.seq_id].tokens]  # anchor (last committed) + drafts
            else:
                toks = s.token_ids[s.num_computed : s.num_computed + it.num_new_tokens]
            chunks.append((toks, s.num_computed))
            seq_ids.append(s.seq_id)
            if it.num_draft:
                logits_index.extend(range(offset, offset + len(toks)))
            elif it.samples:
                logits_index.append(offset + len(toks) - 1)
            offset += len(toks)
        # the target forward's time refines the cost model online (drafting excluded). On a GPU the forward returns
        # before it has run (a graph replay at once): events on the stream time it, read once the verification's
        # copy to the host has waited for the step anyway.
        events = self.runner.device.type == "cuda"
        if events:
            stream = torch.cuda.current_stream(self.runner.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
        logits, _ = self.runner.forward(chunks, self.block_manager, seq_ids, logits_index, self.tap_layers)
        if events:
            end.record(stream)
        else:
            self.cost.verify.observe(offset, time.perf_counter() - t3)
        self.last_step_tokens = offset
        committed = self._verify(plan, drafts, logits)  # item index -> [(token, logprob entry)]
        if events:
            end.synchronize()
            self.cost.verify.observe(offset, start.elapsed_time(end) / 1e3)
        outputs = expired
        for i, it in enumerate(plan.items):
            s, n = it.seq, len(chunks[i][0])
            if it.num_draft:
                valid = len(committed[i])  # anchor + accepted drafts now have valid KV; the last token not yet
            else:
                valid = n
            s.num_computed += valid
            # full blocks of computed tokens become cache entries (before a finished request's blocks are freed)
            self.block_manager.commit(s.seq_id, s.token_ids, s.num_computed, [t for t, _ in committed.get(i, ())])
            for tok, lp in committed.get(i, []):
                self._append(s, tok, lp)
                if s.finished:
                    break
            if s.finished:
                self.draft_ctx.pop(s.seq_id, None)
                if self.suffix is not None:  # its output joins the global store
                    self.suffix.finish(s.seq_id, s.output_ids)
            else:
                self.block_manager.rollback(s.seq_id, s.num_computed)
            if i in committed:
                outputs.append(s.take_output())
                if s.finished:
                    self.seqs.pop(s.request_id, None)
        if self.scheduler.policy is not None:  # the realized-rate guard
            prompt_chunks = any(not it.num_draft and it.num_new_tokens > 1 for it in plan.items)
            self.scheduler.policy.observe_step(sum(map(len, committed.values())), time.perf_counter() - t0,
                                               decode_only=not prompt_chunks)
        return outputs

    def _expire_deadlines(self) -> list[EngineCoreOutput]:
        """Requests past their deadline end now, with what they have, finish_reason "deadline"."""
        now = time.monotonic()
        out = []
        for s in [s for s in self.seqs.values() if s.params.deadline_s and now - s.arrival > s.params.deadline_s]:
            self._end(s, "deadline")
            out.append(s.take_output())
        return out

    # -- speculation ------------------------------------------------------------------------------------------
    def proposer(self, source: str) -> str:
        """The name a draft's source goes by in metrics: the method that proposed it (dspark, ngram, suffix...)."""
        return {"lookup": "ngram", "suffix": "suffix"}.get(source, self.method)

    def _propose(self, items) -> dict:
        """Every drafting item's draft. A hybrid takes the model-free draft where it is good enough (prompt lookup,
        `dspark+ngram`: a continuation of at least min(k, 2) tokens; suffix decoding, `dspark+suffix`: a score of at
        least --suffix-min-score, by default k) and runs the model drafter for the others only."""
        if not items:
            return {}
        seqs = [it.seq for it in items]
        ks = [it.num_draft for it in items]
        if self.model_free:
            drafts = self.drafter.propose([s.token_ids for s in seqs], ks, [s.params for s in seqs])
        else:
            drafts = [None] * len(items)
            if self.lookup is not None:
                found = self.lookup.propose([s.token_ids for s in seqs], ks, [s.params for s in seqs], min_len=2)
                drafts = [d if d.tokens else None for d in found]
                self.stats["lookup_rounds"] += sum(d is not None for d in drafts)
            if self.suffix is not None:
                need = self.settings.suffix_min_score
                found = self.suffix.propose([s.token_ids for s in seqs], ks, [s.params for s in seqs],
                                            [float(k) for k in ks] if need is None else need)
                drafts = [d if d.tokens else None for d in found]
                self.stats["suffix_rounds"] += sum(d is not None for d in drafts)
            rest = [i for i, d in enumerate(drafts) if d is None]
            self._fold_features([seqs[i] for i in rest])
            if rest:
                model = self.drafter.propose(
                    self.draft_target.model.embed_tokens, self.draft_target.lm_head,
                    [seqs[i].token_ids[-1] for i in rest],
                    [self.draft_ctx[seqs[i].seq_id][0] for i in rest], [ks[i] for i in rest],
                    [seqs[i].params for i in rest], [seqs[i].generator for i in rest],
                    self.settings.confidence_threshold, [seqs[i].constraint for i in rest])
                for i, d in zip(rest, model):
                    drafts[i] = d
        self.stats["draft_tokens"] += sum(len(d.tokens) for d in drafts)
        return {s.seq_id: d for s, d in zip(seqs, drafts)}

    def _fold_features(self, seqs: list[Sequence]) -> None:
        """Fold the target features of the requests' computed tokens not yet in their drafter contexts into them,
        from the tap cache, in one pass for the step (done lazily: only drafting needs it)."""
        todo = []
        for seq in seqs:
            entry = self.draft_ctx.setdefault(seq.seq_id, [None, 0])
            if seq.num_computed > entry[1]:
                todo.append((seq, entry, entry[1], seq.num_computed))
        if not todo:
            return
        taps = self.runner.cached_taps([(self.block_manager.table(s.seq_id), a, b) for s, _, a, b in todo])
        states = self.drafter.extend_contexts([e[0] for _, e, _, _ in todo], taps, [a for _, _, a, _ in todo],
                                              [b - a for _, _, a, b in todo],
                                              [s.token_ids[a + 1 : b + 1] for s, _, a, b in todo])
        for (_, entry, _, end), state in zip(todo, states):
            entry[0], entry[1] = state, end

    def _verify(self, plan, drafts: dict, logits: torch.Tensor) -> dict[int, list]:
        """Every sampling item's tokens for this step, in one batched pass where the logits are (lossless:
        greedy matching or rejection sampling), then the host-side bookkeeping of the drafting rounds."""
        items = [(i, it) for i, it in enumerate(plan.items) if it.samples]
        if not items:
            return {}
        ds = [drafts[it.seq.seq_id] if it.num_draft else None for _, it in items]
        reqs = []
        for (_, it), d in zip(items, ds):
            s, draft = it.seq, d.tokens if d else []
            reqs.append(Verify(draft, s.params, s.generator, d.q if d else None,
                               *((s.prompt_ids, s.output_ids) if s.params.penalized else ((), ())),
                               s.constraint.masks(draft) if s.constraint is not None else None))
        res = verify_step(logits, reqs)
        self.stats["bytes_to_host"] += res.bytes_to_host
        self.last_step_bytes_to_host = res.bytes_to_host
        committed = {}
        for (i, it), d, toks, lps in zip(items, ds, res.tokens, res.logprobs):
            committed[i] = list(zip(toks, lps or [None] * len(toks)))
            if it.seq.constraint is not None:
                it.seq.constraint.commit(toks)
            if d is None:
                continue
            s = it.seq
            if d.source == "lookup":
                self.lookup.observe(len(d.tokens), len(toks) - 1)
            s.spec_rounds += 1
            for counts, n in ((s.spec_drafted, len(d.tokens)), (s.spec_accepted, len(toks) - 1)):
                counts.extend([0] * (n - len(counts)))
                for j in range(n):
                    counts[j] += 1
            self.stats["draft_rounds"] += 1  # rounds verified (a draft trimmed to nothing is not one)
            self.stats["accepted_tokens"] += len(toks) - 1
            self.stats["verified_tokens"] += len(d.tokens)
            self.round_log.append((len(d.tokens), len(toks) - 1, d.confidence, self.proposer(d.source)))
            if self.scheduler.policy is not None:
                conf = d.confidence if self.scheduler.has_confidence else None
                self.scheduler.policy.observe(s.seq_id, s.params.greedy, len(d.tokens), len(toks) - 1, conf)
        return committed

    def _append(self, seq: Sequence, tok: int, lp) -> None:
        p = seq.params
        seq.token_ids.append(tok)
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        if lp is not None:
            seq.logprobs.append((tok, lp[0], lp[1]))
        if tok in p.stop_token_ids or (not p.ignore_eos and tok in self.eos_ids):
            return self.scheduler.finish(seq, "stop")
        if seq.num_output >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            self.scheduler.finish(seq, "length")

    # -- offline helper (tests, benchmarks) --------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Sequence]:
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        seqs = [self.add_request(f"offline-{id(p)}-{i}", p, sp) for i, (p, sp) in
                enumerate(zip(prompts, params_list))]
        while any(s.status is not SeqStatus.FINISHED for s in seqs):
            self.step()
        return seqs
