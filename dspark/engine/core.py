"""The engine core: a busy loop that takes requests, schedules, executes and emits, in token ids only.

It runs on a thread of the API process (`thread`) or in a process of its own (`process`), reached over ZMQ with
msgspec-encoded messages (dspark/engine/messages.py), as vLLM's engine core is. Either way one loop owns the
engine's state: requests and aborts are applied between steps, and each step's outputs, the counters the front
end turns into metrics, and the gauges leave as one message.

With several API servers (--api-server-count N) the core serves N clients: each request names its client, each
client gets only its own requests' outputs and its own running / waiting counts, and the step's counters go to
client 0 alone (every step that has them), so that metrics summed over the API servers count each step once.

With --kv-events-config the core, which owns the block manager, also publishes each step's KV-cache events
(dspark/engine/kv_events.py) on a ZMQ socket of its own, for routers that index replicas' caches.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

from dspark.engine.kv_events import AllBlocksCleared, make_publisher, to_events
from dspark.engine.llm_engine import LLMEngine
from dspark.engine.messages import (
    Abort,
    CoreInput,
    CoreReady,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    Gauges,
    Shutdown,
    StepStats,
)

log = logging.getLogger("dspark.engine")


class EngineCore:
    """LLMEngine behind the token-id boundary: inputs in, one EngineCoreOutputs per step out."""

    def __init__(self, engine: LLMEngine, clients: int = 1):
        self.engine = engine
        self.clients = clients  # API servers reading this core's outputs
        self._seen: dict[str, float] = {}  # cumulative engine counters at the last report
        self._owner: dict[str, int] = {}  # request id -> its client, with several clients
        self._sent_counts: list[tuple[int, int]] = [(0, 0)] * clients  # (running, waiting) each client last got
        self.kv_events = make_publisher(engine.settings.kv_events_config)
        if self.kv_events is not None:
            engine.block_manager.events = []
            self.kv_events.publish([AllBlocksCleared()])  # the cache starts empty: forget an earlier run's blocks

    @property
    def ready(self) -> CoreReady:
        eng = self.engine
        bm = eng.block_manager
        return CoreReady(eng.max_model_len, eng.model_config.vocab_size, bm.num_blocks, eng.settings.model_name,
                         bm.block_size, bm.prefix_caching)

    def apply(self, msg: CoreInput, outputs: list[EngineCoreOutput]) -> bool:
        """Apply one input between steps; False on Shutdown."""
        eng = self.engine
        if isinstance(msg, EngineCoreRequest):
            if self.clients > 1:
                self._owner[msg.request_id] = msg.client
            try:
                eng.add_request(msg.request_id, msg.prompt_ids, msg.params)
            except ValueError as e:  # the front end validates; this is the core's own safety net
                outputs.append(EngineCoreOutput(msg.request_id, [], finish_reason="refused", error=str(e)))
        elif isinstance(msg, Abort):
            for rid in msg.request_ids:
                eng.abort_request(rid)
                self._owner.pop(rid, None)
        elif isinstance(msg, Shutdown):
            return False
        return True

    def step(self, outputs: list[EngineCoreOutput]) -> StepStats | None:
        """One engine step, if there is work; a failed step fails its requests (never hangs them)."""
        eng = self.engine
        if not eng.has_unfinished():
            return None
        t0 = time.perf_counter()
        preempted_before = eng.scheduler.num_preemptions
        try:
            outs = eng.step()
        except Exception as e:
            log.exception("engine step failed", extra={"request_ids": list(eng.seqs)})
            for rid in list(eng.seqs):
                eng.abort_request(rid)
                outputs.append(EngineCoreOutput(rid, [], finish_reason="error", error=f"engine step failed: {e}"))
            return None
        finally:
            self.publish_kv_events()
        outputs.extend(outs)
        return self._stats(time.perf_counter() - t0, eng.scheduler.num_preemptions - preempted_before)

    def publish_kv_events(self) -> None:
        """The step's key changes, as one batch (the publisher's thread encodes and sends it)."""
        if self.kv_events is not None:
            bm = self.engine.block_manager
            self.kv_events.publish(to_events(bm.take_events(), bm.block_size))

    def close(self) -> None:
        if self.kv_events is not None:
            self.kv_events.close()
            self.kv_events = None

    def gauges(self) -> Gauges:
        eng, bm = self.engine, self.engine.block_manager
        return Gauges(len(eng.scheduler.running), len(eng.scheduler.waiting), bm.usage, bm.num_free, bm.num_cached)

    def _delta(self, key: str, value: float) -> float:
        d = value - self._seen.get(key, 0)
        self._seen[key] = value
        return d

    def _stats(self, step_s: float, preempted: int) -> StepStats:
        eng, bm = self.engine, self.engine.block_manager
        st = StepStats(step_s=step_s, step_tokens=eng.last_step_tokens, bytes_to_host=eng.last_step_bytes_to_host,
                       preempted=preempted)
        st.prefix_queries = int(self._delta("prefix_queries", bm.queries))
        st.prefix_hits = int(self._delta("prefix_hits", bm.hits))
        st.prefix_evictions = int(self._delta("prefix_evictions", bm.evictions))
        st.scheduler_s = self._delta("scheduler_seconds", eng.stats["scheduler_seconds"])
        rounds, eng.round_log = eng.round_log, deque(maxlen=100000)
        st.rounds = [(verified, accepted, proposer) for verified, accepted, _, proposer in rounds]
        done, eng.scheduler.finished_rates = eng.scheduler.finished_rates, deque(maxlen=10000)
        st.finished_rates = list(done)
        if eng.stats["steps"] % 50 == 1:
            st.sps = {b: 1.0 / s if s > 0 else 0.0 for b, s in eng.cost.verify.items()}
        if eng.scheduler.policy is not None:
            st.guard = [(band, label, rate) for band, rates in eng.scheduler.policy.guard_state().items()
                        for label, rate in rates.items() if rate is not None]
        return st

    def route(self, outputs: list[EngineCoreOutput], stats: StepStats | None, busy: bool,
              send: Callable[[int, EngineCoreOutputs], None]) -> None:
        """Several clients: each gets its own requests' outputs and counts, when it has outputs or its counts
        moved; client 0 also gets the step's counters and whatever the one-client loop would send it."""
        owner = self._owner
        per: list[list[EngineCoreOutput]] = [[] for _ in range(self.clients)]
        for out in outputs:
            per[owner.get(out.request_id, 0)].append(out)
            if out.finished:
                owner.pop(out.request_id, None)
        counts = [[0, 0] for _ in range(self.clients)]
        sched = self.engine.scheduler
        for seq in sched.running:
            counts[owner.get(seq.request_id, 0)][0] += 1
        for seq in sched.waiting:
            counts[owner.get(seq.request_id, 0)][1] += 1
        bm = self.engine.block_manager
        for c, (running, waiting) in enumerate(counts):
            if per[c] or (c == 0 and busy) or (running, waiting) != self._sent_counts[c]:
                self._sent_counts[c] = (running, waiting)
                gauges = Gauges(running, waiting, bm.usage, bm.num_free, bm.num_cached)
                send(c, EngineCoreOutputs(per[c], gauges, stats if c == 0 else None))

    def run(self, receive: Callable[[bool], list[CoreInput]],
            send: Callable[[int, EngineCoreOutputs], None]) -> None:
        """The busy loop: take what arrived (waiting for it only when idle), step, emit; until Shutdown.
        `send(client, outputs)`: client is 0 unless the core serves several."""
        try:
            self._loop(receive, send)
        finally:
            self.close()

    def _loop(self, receive: Callable[[bool], list[CoreInput]],
              send: Callable[[int, EngineCoreOutputs], None]) -> None:
        while True:
            outputs: list[EngineCoreOutput] = []
            inputs = receive(not self.engine.has_unfinished())
            for msg in inputs:
                if not self.apply(msg, outputs):
                    return
            stats = self.step(outputs)
            busy = bool(inputs or outputs) or stats is not None  # an abort alone still moves the gauges
            if self.clients > 1:
                self.route(outputs, stats, busy, send)
            elif busy:
                send(0, EngineCoreOutputs(outputs, self.gauges(), stats))
