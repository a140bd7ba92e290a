"""KV-cache events (--kv-events-config) read by a subscriber whose decoding structs are written here from vLLM's
published format (vllm/distributed/kv_events.py: msgspec, array_like, tagged with the class name; field order as
there, including the fields vLLM added later with defaults), not imported from dspark: what llm-d's or Dynamo's
subscriber would decode, we must have sent."""

import json
import random
import subprocess
import sys
import time
from typing import Any

import httpx
import msgspec
import pytest
import zmq
from conftest import REPO, ServerProcess

from dspark.engine.core import EngineCore
from dspark.engine.llm_engine import LLMEngine
from dspark.engine.sampling import SamplingParams
from dspark.engine.settings import Settings
from dspark.loadtest.sweep import free_port


# -- the subscriber's structs, from vLLM's definitions ------------------------------------------------------------
class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored(KVCacheEvent):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int | bytes]
    medium: str | None
    group_idx: int | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


DECODER = msgspec.msgpack.Decoder(KVEventBatch)
MASK = (1 << 64) - 1


class Index:
    """A router's view of one replica: the block hashes it holds, from the events in sequence order."""

    def __init__(self):
        self.blocks: set[int] = set()
        self.seqs: list[int] = []
        self.stored: list[BlockStored] = []
        self.removed: list[int] = []
        self.cleared = 0

    def apply(self, seq: int, payload: bytes) -> None:
        assert not self.seqs or seq == self.seqs[-1] + 1, f"sequence gap: {self.seqs[-1]} then {seq}"
        self.seqs.append(seq)
        batch = DECODER.decode(payload)
        assert batch.ts > 1.7e9 and batch.data_parallel_rank == 0
        for ev in batch.events:
            if isinstance(ev, BlockStored):
                assert len(ev.token_ids) == len(ev.block_hashes) * ev.block_size and ev.medium == "GPU"
                assert not self.blocks & set(ev.block_hashes), "a block stored twice without a removal"
                self.blocks |= set(ev.block_hashes)
                self.stored.append(ev)
            elif isinstance(ev, BlockRemoved):
                assert set(ev.block_hashes) <= self.blocks, "a block removed that was never stored"
                self.blocks -= set(ev.block_hashes)
                self.removed += ev.block_hashes
            else:
                self.blocks.clear()
                self.cleared += 1


def drain(sub: zmq.Socket, index: Index, topic: bytes, wait_s: float = 0.5) -> None:
    while sub.poll(int(wait_s * 1000)):
        t, seq, payload = sub.recv_multipart()
        assert t == topic
        index.apply(int.from_bytes(seq, "big"), payload)


def replay(ctx: zmq.Context, addr: str, start: int) -> list[tuple[int, bytes]]:
    """vLLM's replay protocol: ask with the start sequence, take (seq, payload) frames until seq -1."""
    req = ctx.socket(zmq.DEALER)
    req.connect(addr)
    req.send_multipart((b"", start.to_bytes(8, "big")))
    out = []
    while True:
        assert req.poll(5000), "replay socket did not answer"
        _, seq, payload = req.recv_multipart()
        if int.from_bytes(seq, "big", signed=True) == -1:
            req.close()
            return out
        out.append((int.from_bytes(seq, "big"), payload))


def test_subscriber_rebuilds_the_block_managers_keys_exactly(model_dir, tmp_path):
    """Requests sharing prefixes in a KV pool small enough to evict: after every step, the live subscriber's
    stored-minus-removed set equals the block manager's keys; a late subscriber rebuilds it by replay."""
    pub, rep = f"ipc://{tmp_path}/kv", f"ipc://{tmp_path}/kv-replay"
    cfg = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": pub, "replay_endpoint": rep,
           "topic": "kv-events"}
    engine = LLMEngine(Settings(model=str(model_dir), speculative="none", num_kv_blocks=40,
                                kv_events_config=json.dumps(cfg)))
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv-events")
    core = EngineCore(engine)
    try:
        sub.connect(pub)
        time.sleep(0.5)  # the subscription reaches the publisher (ZMQ's slow joiner)
        live = Index()
        drain(sub, live, b"kv-events", 0.2)
        bm, rng = engine.block_manager, random.Random(0)
        stems = [[rng.randrange(3, 250) for _ in range(48)] for _ in range(4)]
        prompts = []
        for i in range(24):  # shared stems (hits), then distinct tails; 40 blocks of 16 force evictions
            prompts.append(stems[i % 4][: 16 * (1 + i % 3)] + [rng.randrange(3, 250) for _ in range(20 + i)])
        outputs, rid = [], 0
        for wave in range(6):
            for p in prompts[wave * 4: wave * 4 + 4]:
                engine.add_request(f"r{rid}", p, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
                rid += 1
            while engine.has_unfinished():
                core.step(outputs)
                drain(sub, live, b"kv-events", 0.05)
                bm.check()
                assert live.blocks == {k & MASK for k in bm.keys()}
        drain(sub, live, b"kv-events")
        assert live.blocks == {k & MASK for k in bm.keys()} and live.blocks
        assert live.removed, "no eviction happened: the pool was meant to be too small"
        assert any(len(ev.block_hashes) > 1 for ev in live.stored), "a prompt's blocks were not batched"
        # A stored chain's tokens are the prompt's: the first full blocks of the first prompt, in order.
        first = next(ev for ev in live.stored if ev.parent_block_hash is None)
        assert first.token_ids == prompts[0][: len(first.token_ids)]
        # Children name their parent by the parent's published hash.
        hashes = {h for ev in live.stored for h in ev.block_hashes}
        assert all(ev.parent_block_hash in hashes for ev in live.stored if ev.parent_block_hash is not None)

        late = Index()
        for seq, payload in replay(ctx, rep, 0):
            late.apply(seq, payload)
        assert late.seqs[0] == 0 and late.cleared == 1  # the start-up AllBlocksCleared is replayable
        assert late.blocks == live.blocks
        tail = replay(ctx, rep, live.seqs[-1])  # from a given sequence number on
        assert [s for s, _ in tail] == [live.seqs[-1]]
    finally:
        sub.close()
        core.close()


def test_off_by_default_records_nothing(model_dir):
    engine = LLMEngine(Settings(model=str(model_dir), speculative="none"))
    core = EngineCore(engine)
    assert core.kv_events is None and engine.block_manager.events is None
    engine.add_request("a", list(range(3, 60)), SamplingParams(max_tokens=2))
    while engine.has_unfinished():
        core.step([])
    assert engine.block_manager.take_events() == [] and engine.block_manager.keys()


@pytest.mark.parametrize("bad, message", [
    ('{"enable_kv_cache_events": true,', "not vLLM's KVEventsConfig JSON"),
    ('{"enable_kv_cache_events": true, "endpoit": "tcp://*:5557"}', "endpoit"),
    ('{"enable_kv_cache_events": true, "publisher": "kafka"}', "publisher must be zmq or null"),
    ('{"enable_kv_cache_events": true, "endpoint": "localhost:5557"}', "must be a ZMQ address"),
])
def test_malformed_config_fails_at_start_up_with_a_clear_error(bad, message):
    proc = subprocess.run([sys.executable, "-m", "dspark", "serve", "--kv-events-config", bad], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]


def test_a_real_zmq_subscriber_sees_the_prompts_blocks_stored_then_removed(model_dir):
    """A served replica, a SUB socket over TCP as a router would connect: the prompt's tokens arrive in
    BlockStored events, and once other prompts fill the pool, BlockRemoved for its blocks."""
    port = free_port()
    cfg = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{port}", "topic": "kv@r1"}
    server = ServerProcess(model_dir, "--speculative", "none", "--num-kv-blocks", "24",
                           "--kv-events-config", json.dumps(cfg))
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    try:
        sub.setsockopt(zmq.SUBSCRIBE, b"kv@r1")
        sub.connect(f"tcp://127.0.0.1:{port}")
        time.sleep(0.5)
        rng = random.Random(1)
        prompt = [rng.randrange(3, 250) for _ in range(70)]
        body = {"model": server.name, "prompt": prompt, "max_tokens": 4, "temperature": 0}
        assert httpx.post(server.url + "/v1/completions", json=body, timeout=60).status_code == 200
        index = Index()
        deadline = time.time() + 10
        while not index.stored and time.time() < deadline:
            drain(sub, index, b"kv@r1", 0.5)
        chain = index.stored
        tokens = [t for ev in chain for t in ev.token_ids]
        assert tokens[: 64] == prompt[:64], "the stored blocks' token ids are not the prompt's"
        mine = {h for ev in chain for h in ev.block_hashes}
        for _ in range(4):  # other prompts, 24 blocks of 16 in all: the first prompt's blocks are evicted
            other = [rng.randrange(3, 250) for _ in range(120)]
            body = {"model": server.name, "prompt": other, "max_tokens": 4, "temperature": 0}
            assert httpx.post(server.url + "/v1/completions", json=body, timeout=60).status_code == 200
        drain(sub, index, b"kv@r1", 1.0)
        assert mine & set(index.removed), "no BlockRemoved for the evicted prompt's blocks"
        assert not mine & index.blocks
    finally:
        sub.close()
        server.stop()
