"""AsyncLLM: the API process's engine. It owns text and metrics and talks token ids to the engine core.

Tokenizer and grammar compiler (once per request), detokenization and stop strings (dspark/server/outputs.py),
admission to the bounded waiting queue, and the Prometheus metrics, from the counters each core step sends. The
core runs on a thread here or in a process of its own (dspark/engine/core_client.py); `generate` is the same.
If the core dies, every request in flight ends with EngineDeadError at once, /health turns 503, and `on_fatal`
tells the server to exit non-zero so that a supervisor restarts it.

With several API servers on one core (--api-server-count) each AsyncLLM is one of the core's clients
(`client.index`): it sees only its own requests, bounds its own waiting queue, and only client 0 exports the
core-wide gauges and the step counters (the core sends those to it alone); /metrics sums the API servers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

from dspark.engine import metrics
from dspark.engine.grammar import GrammarCompiler
from dspark.engine.messages import Abort, EngineCoreOutputs, EngineCoreRequest, Gauges, StepStats
from dspark.engine.sampling import SamplingParams
from dspark.engine.tokenizer import Tokenizer
from dspark.server.outputs import RequestOutput, RequestState

log = logging.getLogger("dspark.engine")


class EngineDeadError(RuntimeError):
    """The engine core is gone: nothing in flight can finish."""


class AsyncLLM:
    def __init__(self, client, tokenizer: Tokenizer, max_waiting: int = 0):
        self.client = client
        self.tokenizer = tokenizer
        self.grammars = GrammarCompiler(tokenizer)  # the front end's: it compiles and checks each grammar once
        info = client.info
        self.max_model_len, self.vocab_size = info.max_model_len, info.vocab_size
        self.max_waiting = max_waiting
        self._requests: dict[str, tuple[RequestState, asyncio.Queue]] = {}
        self._gauges = Gauges(0, 0, 0.0, info.num_kv_blocks, 0)
        self._slo_recent: deque[bool] = deque(maxlen=1000)
        # Admission slots granted by the server but not yet sent to the core; they lapse after a few seconds in
        # case the request never starts.
        self._reserved: deque[float] = deque()
        self._dead: str | None = None
        self._started = False
        self._closed = False
        self.on_fatal: Callable[[str], None] | None = None
        self.index = getattr(client, "index", 0)  # this API server's number at the core (0 with one API server)
        self._gie = (metrics.GIE_RUNNING.labels(info.model_name), metrics.GIE_WAITING.labels(info.model_name),
                     metrics.GIE_KV_USAGE.labels(info.model_name))
        if self.index == 0:
            metrics.KV_TOTAL.set(info.num_kv_blocks)
            metrics.KV_FREE.set(info.num_kv_blocks)
            metrics.GIE_CACHE_INFO.labels(str(info.block_size), str(info.num_kv_blocks),
                                          str(info.prefix_caching)).set(1)

    @classmethod
    def from_settings(cls, settings) -> AsyncLLM:
        """The core as the settings say: `process` (its own process, over ZMQ) or `thread` (in this process)."""
        from dspark.engine.core_client import ProcessCore, ThreadCore

        if settings.engine_core == "process":
            client = ProcessCore(settings)
        else:
            from dspark.engine.llm_engine import LLMEngine

            client = ThreadCore(LLMEngine(settings))
        return cls(client, Tokenizer(settings.model), settings.max_waiting)

    # -- lifecycle ------------------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._started and self._dead is None and self.client.alive

    @property
    def dead_reason(self) -> str | None:
        return self._dead

    def start(self) -> None:
        """From the event loop (the app's start-up)."""
        self.client.start(self._on_outputs, self._on_dead)
        self._started = True

    async def shutdown(self) -> None:
        """Stop the core off the event loop: the streams uvicorn has just cancelled at the end of a drain end (and
        their connections close) meanwhile, rather than after the core has stopped."""
        self._closed = True  # streams cut after this must not send their aborts to a closed core
        await asyncio.to_thread(self.client.shutdown)

    def _on_dead(self, reason: str) -> None:
        if self._dead is not None:
            return
        self._dead = reason
        log.error("engine core died: %s; failing %d requests in flight", reason, len(self._requests))
        for _, q in self._requests.values():
            q.put_nowait(EngineDeadError(reason))
        if self.on_fatal is not None:
            self.on_fatal(reason)

    # -- requests -------------------------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams
                       ) -> AsyncIterator[RequestOutput]:
        """Yield this request's deltas; aborting (client gone, task cancelled) frees its KV at the core's next step."""
        if not self.alive:
            raise EngineDeadError(self._dead or "engine is not running")
        q: asyncio.Queue = asyncio.Queue()
        self._requests[request_id] = (RequestState(self.tokenizer, request_id, prompt_ids, params), q)
        self.client.send(EngineCoreRequest(request_id, list(prompt_ids), params, self.index))
        metrics.PROMPT_TOKENS.inc(len(prompt_ids))
        log.debug("request added", extra={"request_id": request_id, "prompt_tokens": len(prompt_ids),
                                          "max_tokens": params.max_tokens})
        if self._reserved:
            self._reserved.popleft()
        finished = False
        held = None  # an error that came behind deltas merged into one: raised after they are yielded
        try:
            while True:
                item = held or await q.get()
                held = None
                if isinstance(item, BaseException):
                    finished = True  # the core has let go of it already (refused, failed, or gone)
                    raise item
                # A consumer that fell behind (several steps' deltas queued) takes them as one delta, as vLLM's
                # output collector does: a stream's work per chunk (JSON, SSE, the client's parse) is paid once.
                while not item.finished and not q.empty():
                    later = q.get_nowait()
                    if isinstance(later, BaseException):
                        held = later
                        break
                    item.merge(later)
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._requests.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        log.info("request aborted", extra={"request_id": request_id})
        metrics.FINISHED.labels("abort").inc()
        if self._dead is None and not self._closed:
            self.client.send(Abort([request_id]))

    def _on_outputs(self, batch: EngineCoreOutputs) -> None:
        """One core step's outputs, on the event loop: text, stop strings, deliveries, metrics."""
        stopped = []
        generated = 0
        for out in batch.outputs:
            entry = self._requests.get(out.request_id)
            if entry is None:  # aborted here, or ended by a stop string, while the core was stepping
                continue
            state, q = entry
            if out.error is not None:
                q.put_nowait(ValueError(out.error) if out.finish_reason == "refused" else RuntimeError(out.error))
                continue
            ro = state.process(out)
            generated += len(ro.token_ids)
            q.put_nowait(ro)
            if ro.finished:
                self._requests.pop(out.request_id, None)
                metrics.FINISHED.labels(ro.finish_reason).inc()
                log.info("request finished", extra={"request_id": out.request_id, "finish_reason": ro.finish_reason,
                                                    "prompt_tokens": ro.prompt_tokens,
                                                    "completion_tokens": ro.completion_tokens})
                if not out.finished:  # a stop string: the core is still generating it
                    stopped.append(out.request_id)
        if stopped:
            self.client.send(Abort(stopped))
        metrics.GENERATION_TOKENS.inc(generated)
        if batch.stats is not None:
            self._record(batch.stats)
        self._set_gauges(batch.gauges)

    # -- admission ------------------------------------------------------------------------------------------
    def _waiting(self) -> int:
        """Requests sent to the core and not running there yet (the core's last count, plus what it has not seen)."""
        return max(self._gauges.waiting, len(self._requests) - self._gauges.running)

    def try_reserve(self, n: int) -> int | None:
        """Claim n places in the bounded waiting queue for a request about to start; None when it is full,
        else the number of requests ahead. Call from the event loop (check and claim are then atomic)."""
        now = time.monotonic()
        while self._reserved and now - self._reserved[0] > 5.0:
            self._reserved.popleft()
        ahead = self._waiting() + len(self._reserved)
        if self.max_waiting and ahead + n > self.max_waiting:
            return None
        self._reserved.extend([now] * n)
        return ahead

    def queue_depth(self) -> int:
        return self._waiting() + len(self._reserved)

    # -- metrics --------------------------------------------------------------------------------------------
    def _set_gauges(self, g: Gauges) -> None:
        self._gauges = g
        metrics.RUNNING.set(g.running)  # this API server's requests (summed over API servers in /metrics)
        metrics.WAITING.set(g.waiting)
        running, waiting, kv_usage = self._gie
        running.set(g.running)
        waiting.set(g.waiting)
        if self.index:  # the core's own gauges: client 0 exports them
            return
        metrics.KV_USAGE.set(g.kv_usage)
        kv_usage.set(g.kv_usage)
        metrics.KV_FREE.set(g.kv_free)
        metrics.PREFIX_BLOCKS.set(g.prefix_blocks)

    def _record(self, st: StepStats) -> None:
        metrics.STEP_TIME.observe(st.step_s)
        metrics.STEP_TOKENS.observe(st.step_tokens)
        metrics.STEP_BYTES_TO_HOST.observe(st.bytes_to_host)
        metrics.PREEMPTIONS.inc(st.preempted)
        metrics.PREFIX_QUERIES.inc(st.prefix_queries)
        metrics.PREFIX_HITS.inc(st.prefix_hits)
        metrics.PREFIX_EVICTIONS.inc(st.prefix_evictions)
        metrics.SCHEDULER_TIME.observe(st.scheduler_s)
        # every round under the proposer that drafted it (a hybrid's rounds split between its two), summed over
        # the step first: one increment per series
        per: dict[str, list[int]] = {}
        at: dict[tuple[str, int], list[int]] = {}
        for verified, accepted, proposer in st.rounds:
            tally = per.setdefault(proposer, [0, 0, 0])
            tally[0], tally[1], tally[2] = tally[0] + 1, tally[1] + verified, tally[2] + accepted
            metrics.DRAFT_LEN.labels(proposer).observe(verified)
            metrics.ACCEPT_LEN.labels(proposer).observe(accepted + 1)
            for j in range(verified):
                pos = at.setdefault((proposer, j), [0, 0])
                pos[0], pos[1] = pos[0] + 1, pos[1] + (j < accepted)
        for proposer, (rounds, verified, accepted) in per.items():
            metrics.SPEC_ROUNDS.labels(proposer).inc(rounds)
            metrics.SPEC_DRAFT_TOKENS.labels(proposer).inc(verified)
            metrics.SPEC_ACCEPTED_TOKENS.labels(proposer).inc(accepted)
        for (proposer, j), (drafted, accepted) in at.items():
            metrics.SPEC_POSITION_DRAFTED.labels(proposer, str(j)).inc(drafted)
            metrics.SPEC_POSITION_ACCEPTED.labels(proposer, str(j)).inc(accepted)
        for rate, target in st.finished_rates:
            metrics.REQUEST_TPS.observe(rate)
            if target:
                met = rate >= target
                metrics.SLO_REQUESTS.labels(str(met).lower()).inc()
                self._slo_recent.append(met)
        if self._slo_recent:
            metrics.SLO_ATTAINMENT.set(sum(self._slo_recent) / len(self._slo_recent))
        for b, sps in st.sps.items():
            metrics.SPS.labels(str(b)).set(sps)
        for band, label, rate in st.guard:
            metrics.GUARD_RATE.labels(band, label).set(rate)
