"""KV-cache events in vLLM's published wire format, so routers that index vLLM replicas' caches (llm-d's precise
prefix-cache scorer, NVIDIA Dynamo's KV router) index ours unchanged.

Off by default. `--kv-events-config` takes vLLM's JSON (`KVEventsConfig`). The engine core process, which owns
the block manager, publishes after each step one `KVEventBatch` of what the step changed: `BlockStored` when a
full block of computed tokens gets a key (becomes matchable by later requests), `BlockRemoved` when a key is
dropped (its block evicted, or rewritten after a rollback), and one `AllBlocksCleared` when the publisher starts
(the cache is empty: an indexer that knew an earlier run of this replica drops what it had).

Wire format (vLLM's `vllm/distributed/kv_events.py`): msgspec msgpack, structs `array_like` (fields in order),
events tagged with their class name as the first element. A batch is `[ts, [event, ...], data_parallel_rank]`;
`BlockStored` is `["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
lora_name]`, `BlockRemoved` is `["BlockRemoved", block_hashes, medium]`, `AllBlocksCleared` is
`["AllBlocksCleared"]`. Each batch goes out on a ZMQ PUB socket as three frames: topic, an 8-byte big-endian
sequence number (0, 1, ...), payload. With `replay_endpoint`, a ROUTER socket answers a request frame holding an
8-byte big-endian start sequence with every buffered batch from there, as (seq, payload) frames, then (-1, b"").

Block hashes: a block's key in the block manager is already a prefix hash (its tokens chained with its parent's
key, dspark/scheduler/block_manager.py); the published hash is that key as an unsigned 64-bit integer (key mod
2**64), and the parent hash is the parent block's key the same way. Keys are the engine's own (Python's hash,
salted per process): they name blocks within one replica's run, which is how llm-d and Dynamo use them (they
compute their own cross-replica keys from `token_ids`). `medium` is "GPU", vLLM's name for the engine's primary
KV pool, whatever device holds it here.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque

import msgspec
import zmq

log = logging.getLogger("dspark.engine")

HASH_MASK = (1 << 64) - 1
MEDIUM = "GPU"
END_SEQ = (-1).to_bytes(8, "big", signed=True)


class KVEventsConfig(msgspec.Struct, forbid_unknown_fields=True):
    """vLLM's KVEventsConfig fields, same names and meaning (vLLM's JSON for it works here unchanged)."""

    enable_kv_cache_events: bool = False
    publisher: str = "zmq"  # zmq | null
    endpoint: str = "tcp://*:5557"  # PUB socket: binds with a wildcard host (or ipc:// / inproc://), else connects
    replay_endpoint: str | None = None  # ROUTER socket (binds) for subscribers to ask for missed batches
    buffer_steps: int = 10_000  # batches kept for replay
    hwm: int = 100_000  # PUB send high-water mark: past it ZMQ drops messages rather than block the step
    max_queue_size: int = 100_000  # batches waiting for the publisher thread; past it batches are dropped
    topic: str = ""

    @property
    def enabled(self) -> bool:
        return self.enable_kv_cache_events and self.publisher != "null"


def parse_config(text: str) -> KVEventsConfig:
    """The --kv-events-config JSON, checked: a clear message for malformed JSON, unknown fields or values."""
    try:
        cfg = msgspec.json.decode(text, type=KVEventsConfig)
    except msgspec.DecodeError as e:
        raise ValueError(f"kv_events_config is not vLLM's KVEventsConfig JSON ({e}): {text!r}") from None
    if cfg.publisher not in ("zmq", "null"):
        raise ValueError(f"kv_events_config publisher must be zmq or null, not {cfg.publisher!r}")
    for name in ("endpoint", "replay_endpoint"):
        addr = getattr(cfg, name)
        if addr is not None and not addr.startswith(("tcp://", "ipc://", "inproc://")):
            raise ValueError(f"kv_events_config {name} must be a ZMQ address (tcp://, ipc://, inproc://), not {addr!r}")
    for name in ("buffer_steps", "hwm", "max_queue_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"kv_events_config {name} must be at least 1, not {getattr(cfg, name)}")
    return cfg


# -- the wire format ----------------------------------------------------------------------------------------------
class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    """An event is tagged with its class name (the array's first element)."""


class BlockStored(KVCacheEvent):
    block_hashes: list[int]  # a chain: each block's parent is the one before it, the first's is parent_block_hash
    parent_block_hash: int | None
    token_ids: list[int]  # len(block_hashes) * block_size tokens
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int]
    medium: str | None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None


def to_events(log_: list[tuple], block_size: int) -> list[BlockStored | BlockRemoved | AllBlocksCleared]:
    """The block manager's change log as wire events: ("stored", key, parent, tokens) runs that form a chain
    become one BlockStored, ("removed", key) runs one BlockRemoved."""
    events: list = []
    last_key = None
    for entry in log_:
        prev = events[-1] if events else None
        if entry[0] == "stored":
            _, key, parent, tokens = entry
            h, p = key & HASH_MASK, None if parent is None else parent & HASH_MASK
            if isinstance(prev, BlockStored) and parent is not None and parent == last_key:
                prev.block_hashes.append(h)
                prev.token_ids.extend(tokens)
            else:
                events.append(BlockStored([h], p, list(tokens), block_size, None, MEDIUM, None))
            last_key = key
        else:
            last_key = None
            if isinstance(prev, BlockRemoved):
                prev.block_hashes.append(entry[1] & HASH_MASK)
            else:
                events.append(BlockRemoved([entry[1] & HASH_MASK], MEDIUM))
    return events


class ZmqEventPublisher:
    """PUB socket plus optional replay ROUTER, served by a thread of their own: `publish` only puts the batch on a
    queue (never blocks the engine step; a full queue drops the batch with a warning), the thread numbers, encodes,
    sends and buffers it for replay."""

    def __init__(self, cfg: KVEventsConfig, data_parallel_rank: int = 0):
        self.cfg, self.rank = cfg, data_parallel_rank
        self._queue: queue.Queue[KVEventBatch | None] = queue.Queue(maxsize=cfg.max_queue_size)
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=cfg.buffer_steps)
        self._ctx = zmq.Context.instance()
        # Sockets are made (and bound: a taken port fails start-up) here, then used only by the thread.
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, cfg.hwm)
        self._pub.setsockopt(zmq.LINGER, 1000)
        host = cfg.endpoint.split("://", 1)[1]
        if host.startswith(("*", "[::]")) or not cfg.endpoint.startswith("tcp://"):
            self._pub.bind(cfg.endpoint)
        else:  # a named host: the subscriber (e.g. llm-d's endpoint picker) binds, we connect
            self._pub.connect(cfg.endpoint)
        self._replay = None
        if cfg.replay_endpoint:
            self._replay = self._ctx.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.bind(cfg.replay_endpoint)
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="dspark-kv-events", daemon=True)
        self._thread.start()
        log.info("KV events: publishing on %s (topic %r, replay %s)", cfg.endpoint, cfg.topic, cfg.replay_endpoint)

    def publish(self, events: list) -> None:
        if not events:
            return
        try:
            self._queue.put_nowait(KVEventBatch(time.time(), events, self.rank))
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("KV events: publisher queue full, %d batches dropped", self.dropped)

    def _run(self) -> None:
        enc, topic, seq = msgspec.msgpack.Encoder(), self.cfg.topic.encode(), 0
        while True:
            if self._replay is not None:
                while self._replay.poll(0):
                    self._serve_replay()
            try:
                batch = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            if batch is None:
                break
            payload = enc.encode(batch)
            self._pub.send_multipart((topic, seq.to_bytes(8, "big"), payload))
            self._buffer.append((seq, payload))
            seq += 1

    def _serve_replay(self) -> None:
        frames = self._replay.recv_multipart()
        if len(frames) != 3 or len(frames[2]) != 8:
            log.warning("KV events: malformed replay request (%d frames)", len(frames))
            return
        client, _, start = frames
        first = int.from_bytes(start, "big")
        for seq, payload in list(self._buffer):
            if seq >= first:
                self._replay.send_multipart((client, b"", seq.to_bytes(8, "big"), payload))
        self._replay.send_multipart((client, b"", END_SEQ, b""))

    def close(self) -> None:
        """Send what is queued (the thread drains the queue before the stop mark), then close the sockets."""
        self._queue.put(None)
        self._thread.join(timeout=5)
        self._pub.close()
        if self._replay is not None:
            self._replay.close()


def make_publisher(config_json: str | None) -> ZmqEventPublisher | None:
    """The publisher --kv-events-config asks for; None when events are off (then nothing is recorded)."""
    if not config_json:
        return None
    cfg = parse_config(config_json)
    return ZmqEventPublisher(cfg) if cfg.enabled else None
