"""LLMEngine: one `step()` = schedule -> one batched forward -> sample -> stop checks -> outputs."""

from __future__ import annotations

import logging
import time

import torch

from engine.block_manager import BlockManager
from engine.model import load_model
from engine.model_config import ModelConfig
from engine.runner import ModelRunner, kv_bytes_per_token
from engine.sampling import SamplingParams, make_generator, sample
from engine.sequence import RequestOutput, SeqStatus, Sequence
from engine.settings import Settings
from engine.tokenizer import IncrementalDetokenizer, Tokenizer
from kernels.attention import make_backend
from scheduler.scheduler import Scheduler

log = logging.getLogger("dspark.engine")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LLMEngine:
    def __init__(self, settings: Settings):
        self.settings = settings
        if settings.threads:
            torch.set_num_threads(settings.threads)
        if settings.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device cuda requested but CUDA is not available")
        dtype = DTYPES[settings.dtype]
        self.model_config = ModelConfig.from_dir(settings.model)
        self.tokenizer = Tokenizer(settings.model)
        self.model = load_model(settings.model, dtype=dtype, device=settings.device)
        per_token = kv_bytes_per_token(self.model, dtype)
        bs = settings.block_size
        num_blocks = settings.num_kv_blocks or max(1, settings.kv_cache_memory_mb * 2**20 // (per_token * bs))
        model_len = self.model_config.max_position_embeddings
        self.max_model_len = min(settings.max_model_len or model_len, num_blocks * bs)
        self.block_manager = BlockManager(num_blocks, bs)
        self.scheduler = Scheduler(self.block_manager, settings.max_num_seqs, settings.max_num_batched_tokens)
        self.runner = ModelRunner(self.model, make_backend(settings.attention_backend), num_blocks, bs,
                                  settings.device, dtype)
        self.eos_ids = set(self.tokenizer.eos_ids) | set(self.model_config.eos_token_id)
        self.seqs: dict[str, Sequence] = {}
        self.last_step_tokens = 0
        log.info("engine ready: %s, %d KV blocks x %d tokens, max_model_len %d",
                 settings.model, num_blocks, bs, self.max_model_len)

    # -- requests -------------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        params.validate()
        if not prompt_ids:
            raise ValueError("prompt is empty")
        if request_id in self.seqs:
            raise ValueError(f"duplicate request id {request_id}")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                             f"context length {self.max_model_len}")
        vocab = self.model_config.vocab_size
        if any(t < 0 or t >= vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        seq = Sequence(request_id, list(prompt_ids), params, make_generator(params.seed),
                       IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens))
        self.seqs[request_id] = seq
        self.scheduler.add(seq)
        return seq

    def abort_request(self, request_id: str) -> None:
        seq = self.seqs.pop(request_id, None)
        if seq is not None and not seq.finished:
            self.scheduler.finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- one step ---------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        if not plan.items:
            return []
        chunks, seq_ids, logits_index, sampled = [], [], [], []
        offset = 0
        for item in plan.items:
            s, n = item.seq, item.num_new_tokens
            chunks.append((s.token_ids[s.num_computed : s.num_computed + n], s.num_computed))
            seq_ids.append(s.seq_id)
            offset += n
            if item.samples:
                logits_index.append(offset - 1)
                sampled.append(s)
        logits = self.runner.forward(chunks, self.block_manager, seq_ids, logits_index) if sampled else None
        for item in plan.items:
            item.seq.num_computed += item.num_new_tokens
        self.last_step_tokens = offset
        outputs = []
        if sampled:
            res = sample(logits, [s.params for s in sampled], [s.generator for s in sampled])
            now = time.monotonic()
            for s, tok, lp in zip(sampled, res.token_ids, res.logprobs):
                self._append(s, tok, lp, now)
                outputs.append(s.take_output(self._holdback(s)))
                if s.finished:
                    self.seqs.pop(s.request_id, None)
        return outputs

    def _holdback(self, seq: Sequence) -> int:
        return max((len(x) for x in seq.params.stop), default=1) - 1

    def _append(self, seq: Sequence, tok: int, lp, now: float) -> None:
        p = seq.params
        seq.token_ids.append(tok)
        if lp is not None:
            seq.logprobs.append((tok, lp[0], lp[1]))
        seq.first_token_time = seq.first_token_time or now
        if tok in p.stop_token_ids or (not p.ignore_eos and tok in self.eos_ids):
            return self.scheduler.finish(seq, "stop")
        before = len(seq.text)
        seq.text += seq.detok.add(tok)
        if p.stop and len(seq.text) > before:
            longest = max(len(x) for x in p.stop)
            start = max(0, before - longest + 1)
            hits = [i for i in (seq.text.find(x, start) for x in p.stop) if i >= 0]
            if hits:
                seq.text = seq.text[: min(hits)]
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
