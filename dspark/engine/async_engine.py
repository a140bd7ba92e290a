"""AsyncEngine: runs LLMEngine steps on its own thread; the event loop only awaits per-request queues.

Adds and aborts cross into the engine thread through a thread-safe inbox and are applied between steps,
so the engine's state is touched by one thread only. Outputs come back with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator

from dspark.engine import metrics
from dspark.engine.llm_engine import LLMEngine
from dspark.engine.sampling import SamplingParams
from dspark.engine.sequence import RequestOutput

log = logging.getLogger("dspark.engine")


class EngineDeadError(RuntimeError):
    pass


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._seen: dict[str, int] = {}
        self._slo_recent: deque[bool] = deque(maxlen=1000)
        # Admission slots granted by the server but not yet handed to the engine (event-loop side only); they
        # lapse after a few seconds in case the request never starts.
        self._reserved: deque[float] = deque()
        # Adds handed to the engine thread and adds it has taken: each written by one thread only.
        self._adds_sent = 0
        self._adds_taken = 0
        metrics.KV_TOTAL.set(engine.block_manager.num_blocks)
        metrics.KV_FREE.set(engine.block_manager.num_free)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dspark-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._inbox.put(("wake", None))
        if self._thread:
            self._thread.join(timeout=10)

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams
                       ) -> AsyncIterator[RequestOutput]:
        """Yield this request's deltas; aborting (client gone, task cancelled) frees its KV at the next step."""
        if not self.alive:
            raise EngineDeadError("engine is not running")
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), q)
        self._inbox.put(("add", (request_id, prompt_ids, params)))
        self._adds_sent += 1
        if self._reserved:
            self._reserved.popleft()
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def try_reserve(self, n: int) -> int | None:
        """Claim n places in the bounded waiting queue for a request about to start; None when it is full,
        else the number of requests ahead. Call from the event loop (check and claim are then atomic)."""
        now = time.monotonic()
        while self._reserved and now - self._reserved[0] > 5.0:
            self._reserved.popleft()
        ahead = self._not_yet_waiting()
        if self.engine.scheduler.queue_full(ahead + n):
            return None
        self._reserved.extend([now] * n)
        return ahead + len(self.engine.scheduler.waiting)

    def _not_yet_waiting(self) -> int:
        """Requests admitted by the server but not in the scheduler's queue yet (aborts in the inbox not counted)."""
        return self._adds_sent - self._adds_taken + len(self._reserved)

    def queue_depth(self) -> int:
        return len(self.engine.scheduler.waiting) + self._not_yet_waiting()

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    # -- engine thread ----------------------------------------------------------------------------------------
    def _deliver(self, request_id: str, item) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, q = target
            loop.call_soon_threadsafe(q.put_nowait, item)

    def _drain_inbox(self, block: bool) -> None:
        try:
            kind, arg = self._inbox.get(block=block, timeout=0.5 if block else None)
        except queue.Empty:
            return
        while True:
            if kind == "add":
                self._adds_taken += 1
                rid, prompt_ids, params = arg
                try:
                    self.engine.add_request(rid, prompt_ids, params)
                    metrics.PROMPT_TOKENS.inc(len(prompt_ids))
                    log.debug("request added", extra={"request_id": rid, "prompt_tokens": len(prompt_ids),
                                                      "max_tokens": params.max_tokens})
                except ValueError as e:
                    self._deliver(rid, e)
            elif kind == "abort":
                if arg in self.engine.seqs:  # still generating: it ends here, and is counted as aborted
                    log.info("request aborted", extra={"request_id": arg})
                    metrics.FINISHED.labels("abort").inc()
                self.engine.abort_request(arg)
            try:
                kind, arg = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _run(self) -> None:
        eng = self.engine
        while not self._stop.is_set():
            self._drain_inbox(block=not eng.has_unfinished())
            self._gauges()
            if not eng.has_unfinished():
                continue
            t0 = time.perf_counter()
            preempted_before = eng.scheduler.num_preemptions
            try:
                outputs = eng.step()
            except Exception as e:  # a failed step fails its requests, never hangs them
                log.exception("engine step failed", extra={"request_ids": list(eng.seqs)})
                for rid in list(eng.seqs):
                    eng.abort_request(rid)
                    self._deliver(rid, RuntimeError(f"engine step failed: {e}"))
                continue
            self._record(t0, outputs, eng.scheduler.num_preemptions - preempted_before)
            for out in outputs:
                self._deliver(out.request_id, out)
                if out.finished:
                    log.info("request finished", extra={
                        "request_id": out.request_id, "finish_reason": out.finish_reason,
                        "prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens})

    def _record(self, t0: float, outputs: list[RequestOutput], preempted: int) -> None:
        eng = self.engine
        metrics.STEP_TIME.observe(time.perf_counter() - t0)
        metrics.STEP_TOKENS.observe(eng.last_step_tokens)
        metrics.STEP_BYTES_TO_HOST.observe(eng.last_step_bytes_to_host)
        metrics.GENERATION_TOKENS.inc(sum(len(o.token_ids) for o in outputs))
        metrics.PREEMPTIONS.inc(preempted)
        bm = eng.block_manager
        for key, value, counter in (("prefix_queries", bm.queries, metrics.PREFIX_QUERIES),
                                    ("prefix_hits", bm.hits, metrics.PREFIX_HITS)):
            counter.inc(value - self._seen.get(key, 0))
            self._seen[key] = value
        method = eng.settings.speculative_method
        for key, counter in (("draft_rounds", metrics.SPEC_ROUNDS), ("verified_tokens", metrics.SPEC_DRAFT_TOKENS),
                             ("accepted_tokens", metrics.SPEC_ACCEPTED_TOKENS)):
            delta = eng.stats[key] - self._seen.get(key, 0)
            if delta:
                counter.labels(method).inc(delta)
            self._seen[key] = eng.stats[key]
        sched_s = eng.stats["scheduler_seconds"] - self._seen.get("scheduler_seconds", 0.0)
        self._seen["scheduler_seconds"] = eng.stats["scheduler_seconds"]
        metrics.SCHEDULER_TIME.observe(sched_s)
        rounds, eng.round_log = eng.round_log, deque(maxlen=100000)
        for verified, accepted, _ in rounds:
            metrics.DRAFT_LEN.labels(method).observe(verified)
            metrics.ACCEPT_LEN.labels(method).observe(accepted + 1)
        done, eng.scheduler.finished_rates = eng.scheduler.finished_rates, deque(maxlen=10000)
        for rate, target in done:
            metrics.REQUEST_TPS.observe(rate)
            if target:
                met = rate >= target
                metrics.SLO_REQUESTS.labels(str(met).lower()).inc()
                self._slo_recent.append(met)
        if self._slo_recent:
            metrics.SLO_ATTAINMENT.set(sum(self._slo_recent) / len(self._slo_recent))
        if eng.stats["steps"] % 50 == 1:
            for b, s in eng.cost.verify.items():
                metrics.SPS.labels(str(b)).set(1.0 / s if s > 0 else 0.0)
        if eng.scheduler.policy is not None:
            for band, (drafting, plain, _) in eng.scheduler.policy.guard_state().items():
                for label, rate in (("true", drafting), ("false", plain)):
                    if rate is not None:
                        metrics.GUARD_RATE.labels(band, label).set(rate)
        for o in outputs:
            if o.finished:
                metrics.FINISHED.labels(o.finish_reason).inc()
        self._gauges()

    def _gauges(self) -> None:
        eng = self.engine
        metrics.RUNNING.set(len(eng.scheduler.running))
        metrics.WAITING.set(len(eng.scheduler.waiting))
        metrics.KV_USAGE.set(eng.block_manager.usage)
        metrics.KV_FREE.set(eng.block_manager.num_free)
        metrics.PREFIX_BLOCKS.set(eng.block_manager.num_cached)
