"""Tensor parallelism over torch.distributed (`--tensor-parallel-size N`): one model sharded over N ranks.

The layout is Megatron's, as nano-vllm and vLLM write it:

- q|k|v and gate|up are column-parallel: each rank holds whole KV groups (a KV head and the query heads that read
  it) and a slice of the MLP's width; with fewer KV heads than ranks a KV head is replicated and its query heads
  split. o and down are row-parallel: each rank's partial sum is all-reduced once (a bias is added on rank 0 only).
- The embedding is vocabulary-parallel (each rank looks up its rows, the others' are masked to zero, one
  all-reduce), and so is the LM head: each rank scores its rows of the vocabulary and rank 0 gathers the logits,
  where verification and sampling run.
- The residual stream, and so every tap the drafter reads, is whole on every rank after each all-reduce; the
  drafter runs on rank 0 only (with the whole embedding and LM head, which it reads: see `TargetHeads`).

Rank 0 is the engine's own process (the engine core); ranks 1..N-1 are worker processes it starts itself
(`python -m dspark.engine.parallel`), with the environment a launcher would set: RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT (and LOCAL_RANK, the CUDA device). Each worker loads only its shard, holds its heads' KV cache, and
loops: receive a step's inputs from rank 0, run the same forward, take part in the collectives.

Rank 0 sends a step as two broadcasts: a header (what follows and its sizes), then one int64 tensor with the
step's token ids, each request's sequence id, start and token count, the rows to score, and the block tables'
deltas: every change rank 0's block manager made since the last step (`JournaledBlockManager`), which each
worker replays on its copy of the tables (`TableMirror`). The worker then builds positions, cache slots and the
attention metadata with rank 0's own code (`ModelRunner.build_metadata`). Only rank 0 schedules, so the block
tables, and with them prefix caching, are the same on every rank.

Failure: the collectives of a step run in a group with a timeout (STEP_TIMEOUT_S); a worker waiting for the
next step waits without one (an idle server is not a failure). Rank 0 watches its workers' processes: one that
exits ends the engine process with an error naming it; a worker whose parent is gone exits.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dspark.engine.model_config import ModelConfig
from dspark.scheduler.block_manager import BlockManager

log = logging.getLogger("dspark.engine")

STEP_TIMEOUT_S = 300.0  # the longest any collective inside a step may wait for the other ranks
IDLE_TIMEOUT_S = 365 * 86400.0  # a worker waits for the next step as long as the server idles
CMD_STEP, CMD_STOP = 1, 2
JOURNAL_WRITE, JOURNAL_DROP = 1, 2
HEADER = 8


# -- the split ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TPShard:
    """What rank `rank` of `world` holds: query heads, KV heads, MLP columns and vocabulary rows, each [lo, hi)."""

    rank: int
    world: int
    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]
    inter: tuple[int, int]
    vocab: tuple[int, int]  # rows of the real vocabulary this rank holds
    vocab_per_rank: int  # rows every rank holds (the last rank's past the vocabulary are zeros)


def _even(n: int, world: int, rank: int) -> tuple[int, int]:
    return rank * n // world, (rank + 1) * n // world


def plan_shard(cfg: ModelConfig, rank: int, world: int) -> TPShard:
    h, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    group = h // hkv  # query heads per KV head
    if hkv >= world:  # whole KV groups per rank (as even as the groups allow: 3 groups on 2 ranks are 1 + 2)
        kv = _even(hkv, world, rank)
        if kv[0] == kv[1]:
            raise ValueError(f"tensor parallel size {world} leaves rank {rank} no KV head ({hkv} KV heads)")
        q = (kv[0] * group, kv[1] * group)
    else:  # a KV head replicated on world / hkv ranks, which split its query heads
        rep = world // hkv
        if world % hkv or group % rep:
            raise ValueError(f"tensor parallel size {world} does not divide the model's {hkv} KV heads with "
                             f"{group} query heads each; choose a size that divides them or a multiple of {hkv} "
                             f"that divides {h}")
        k = rank // rep
        per = group // rep
        kv, q = (k, k + 1), (k * group + rank % rep * per, k * group + (rank % rep + 1) * per)
    per_rank = -(-cfg.vocab_size // world)
    vocab = (min(rank * per_rank, cfg.vocab_size), min((rank + 1) * per_rank, cfg.vocab_size))
    return TPShard(rank, world, q, kv, _even(cfg.intermediate_size, world, rank), vocab, per_rank)


def most_kv_heads(cfg: ModelConfig, world: int) -> int:
    """The KV heads of the rank holding the most (its KV cache is the largest for the same blocks)."""
    return max(s.kv_heads[1] - s.kv_heads[0] for s in (plan_shard(cfg, r, world) for r in range(world)))


def local_config(cfg: ModelConfig, shard: TPShard) -> ModelConfig:
    """The shape of one rank's model: its heads, its MLP width, its vocabulary rows."""
    return replace(cfg, num_attention_heads=shard.q_heads[1] - shard.q_heads[0],
                   num_key_value_heads=shard.kv_heads[1] - shard.kv_heads[0],
                   intermediate_size=shard.inter[1] - shard.inter[0], vocab_size=shard.vocab_per_rank)


def shard_spec(name: str, cfg: ModelConfig, shard: TPShard) -> tuple[int, int, int] | None:
    """(dim, lo, hi) of a checkpoint tensor this rank keeps, or None: replicated (norms, RoPE, ...).
    A row-parallel bias (`down_proj.bias`) is (0, 0, 0) on ranks past 0: it is added once, by rank 0."""
    d, leaf = cfg.head_dim, name.rsplit(".", 2)
    proj, kind = (leaf[-2], leaf[-1]) if len(leaf) == 3 else ("", "")
    if proj == "q_proj":
        return 0, shard.q_heads[0] * d, shard.q_heads[1] * d
    if proj in ("k_proj", "v_proj"):
        return 0, shard.kv_heads[0] * d, shard.kv_heads[1] * d
    if proj in ("gate_proj", "up_proj"):
        return 0, *shard.inter
    if proj == "o_proj":
        return (1, shard.q_heads[0] * d, shard.q_heads[1] * d) if kind == "weight" else (0, 0, 0)
    if proj == "down_proj":
        if kind == "weight":
            return 1, *shard.inter
        return None if shard.rank == 0 else (0, 0, 0)
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return 0, *shard.vocab
    return None


def finish_shard(name: str, t: torch.Tensor, cfg: ModelConfig, shard: TPShard, full: tuple[int, ...]) -> torch.Tensor:
    """A sliced tensor as the rank's module holds it: vocabulary rows padded to vocab_per_rank with zeros, and a
    row-parallel bias of a rank past 0 all zeros."""
    spec = shard_spec(name, cfg, shard)
    if spec is None:
        return t
    if spec == (0, 0, 0):
        return torch.zeros(full, dtype=t.dtype, device=t.device)
    if name in ("model.embed_tokens.weight", "lm_head.weight") and t.shape[0] < shard.vocab_per_rank:
        t = torch.cat([t, t.new_zeros(shard.vocab_per_rank - t.shape[0], *t.shape[1:])])
    return t


# -- the layers --------------------------------------------------------------------------------------------------
class VocabParallelEmbedding(nn.Module):
    """This rank's rows of the embedding: ids outside them look up zeros, and one all-reduce sums the ranks'."""

    def __init__(self, weight: nn.Parameter, lo: int, group):
        super().__init__()
        self.weight, self.lo, self.group = weight, lo, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.lo
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        dist.all_reduce(out, group=self.group)
        return out


class RowParallel:
    """A row-parallel projection (o, down): this rank's partial sum, then one all-reduce."""

    def __init__(self, inner, group):
        self.inner, self.group = inner, group

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        dist.all_reduce(out, group=self.group)
        return out


class GatheredHead:
    """The vocabulary-parallel LM head: each rank scores its rows, rank 0 gathers the whole logits (the other
    ranks get their own slice back, which nobody reads)."""

    def __init__(self, inner, group, rank: int, world: int, vocab_size: int):
        self.inner, self.group, self.rank, self.world, self.vocab_size = inner, group, rank, world, vocab_size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        local = self.inner(x).contiguous()
        if local.shape[0] == 0:  # every rank knows the step scores no row: no collective
            return local.new_zeros(*local.shape[:-1], self.vocab_size)
        if self.rank != 0:
            dist.gather(local, None, dst=0, group=self.group)
            return local
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.gather(local, parts, dst=0, group=self.group)
        return torch.cat(parts, -1)[..., : self.vocab_size]


def parallelize_(model, shard: TPShard, group, vocab_size: int):
    """Wire a rank's sharded model (load_model(..., shard=)) into the group: fused serving layout, all-reduces
    after o and down and in the embedding, the gathered LM head. TP=1 never comes here."""
    model.fuse_()
    for layer in model.model.layers:
        layer.self_attn.o = RowParallel(layer.self_attn.o, group)
        layer.mlp.down = RowParallel(layer.mlp.down, group)
    emb = model.model.embed_tokens
    model.model.embed_tokens = VocabParallelEmbedding(emb.weight, shard.vocab[0], group)
    model._lm_head = GatheredHead(model._lm_head, group, shard.rank, shard.world, vocab_size)
    model.tp_shard = shard
    return model


class TargetHeads(nn.Module):
    """The whole embedding and LM head, on rank 0 for the drafter (which reads them: its anchor embeddings, its
    logits and the Markov head); the target's own are sharded. With tied embeddings they are one tensor."""

    def __init__(self, cfg: ModelConfig, embed: torch.Tensor, lm_head: torch.Tensor | None):
        super().__init__()
        self.config = cfg
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding.from_pretrained(embed, freeze=True)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device="meta")
        self.lm_head.weight = self.model.embed_tokens.weight if lm_head is None else nn.Parameter(
            lm_head, requires_grad=False)


# -- the process group -------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_threads(settings) -> int:
    """torch threads per rank: --threads, else the host's cores shared among the ranks (not all of them each)."""
    return settings.threads or max(1, (os.cpu_count() or 1) // settings.tensor_parallel_size)


def comm_backend(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def rank_device(device: str, local_rank: int) -> str:
    return f"cuda:{local_rank}" if device.startswith("cuda") else device


def init_group(device: str, rank: int, world: int, addr: str, port: int):
    """Join the process group at addr:port (MASTER_ADDR / MASTER_PORT); returns the step group, whose collectives
    time out after STEP_TIMEOUT_S. The default group (no practical timeout) carries only the header a worker waits
    on between steps."""
    backend = comm_backend(device)
    dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=IDLE_TIMEOUT_S))
    return dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=STEP_TIMEOUT_S), backend=backend)


class JournaledBlockManager(BlockManager):
    """Rank 0's block manager under tensor parallelism: every change to a block table is also written to a journal,
    which the next step sends to the workers (the persistent state's deltas: their copies of the tables change as
    rank 0's did, and a step sends no table)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.journal: list[int] = []

    def _write(self, seq_id: int, start: int, blocks: list[int]) -> None:
        super()._write(seq_id, start, blocks)
        self.journal += [JOURNAL_WRITE, seq_id, start, len(blocks), *blocks]

    def _drop_slot(self, seq_id: int) -> None:
        if seq_id in self._slot:
            self.journal += [JOURNAL_DROP, seq_id]
        super()._drop_slot(seq_id)

    def drain(self) -> list[int]:
        out, self.journal = self.journal, []
        return out


class TableMirror:
    """A worker's copy of rank 0's block tables, kept by replaying its journal; answers `block_tables` as the block
    manager does (rows 0-padded to the longest), so the worker builds a step's metadata with the same code."""

    def __init__(self):
        self.tables: dict[int, list[int]] = {}

    def apply(self, journal: list[int]) -> None:
        i = 0
        while i < len(journal):
            if journal[i] == JOURNAL_WRITE:
                seq_id, start, n = journal[i + 1 : i + 4]
                table = self.tables.setdefault(seq_id, [])
                del table[start:]
                table += journal[i + 4 : i + 4 + n]
                i += 4 + n
            else:
                self.tables.pop(journal[i + 1], None)
                i += 2

    def block_tables(self, seq_ids: list[int]) -> np.ndarray:
        rows = [self.tables.get(s, []) for s in seq_ids]
        out = np.zeros((len(rows), max(map(len, rows))), dtype=np.int64)
        for r, t in enumerate(rows):
            out[r, : len(t)] = t
        return out


def pack_step(chunks, seq_ids: list[int], ids: torch.Tensor, journal: list[int], logits_index: list[int],
              device) -> tuple[torch.Tensor, torch.Tensor]:
    """A step as two int64 tensors: the header (sizes) and the payload: token ids, each request's sequence id,
    KV length before its tokens and number of tokens, the block-table journal since the last step, the rows to
    score. Positions, cache slots and block tables are rebuilt from these on the worker."""
    b = len(chunks)
    header = torch.tensor([CMD_STEP, len(ids), b, len(journal), len(logits_index), 0, 0, 0], dtype=torch.long)
    meta = torch.tensor([*seq_ids, *(start for _, start in chunks), *(len(t) for t, _ in chunks), *journal,
                         *logits_index], dtype=torch.long)
    return header.to(device), torch.cat([ids.cpu(), meta]).to(device)


def unpack_step(header: list[int], payload: torch.Tensor, mirror: TableMirror):
    """(chunks, seq_ids, logits rows) of a step, the mirror's tables brought up to date."""
    _, t, b, j, n = header[:5]
    flat = payload.tolist()
    ids, rest = flat[:t], flat[t:]
    seq_ids, starts, q_lens = rest[:b], rest[b : 2 * b], rest[2 * b : 3 * b]
    mirror.apply(rest[3 * b : 3 * b + j])
    chunks, off = [], 0
    for start, q in zip(starts, q_lens):
        chunks.append((ids[off : off + q], start))
        off += q
    return chunks, seq_ids, rest[3 * b + j : 3 * b + j + n]


class TPDriver:
    """Rank 0's side: starts the workers, joins the group, sends each step's inputs, watches the workers."""

    def __init__(self, settings, on_dead=None):
        self.world = settings.tensor_parallel_size
        torch.set_num_threads(rank_threads(settings))
        self.device = torch.device(rank_device(settings.device, 0))
        self.procs: list[subprocess.Popen] = []
        self.closing = False
        self.on_dead = on_dead or _exit_engine
        # a launcher that started the workers itself says so with WORLD_SIZE and MASTER_ADDR / MASTER_PORT (and
        # RANK=0 here); otherwise the workers start here, on a free port of this host
        launched = os.environ.get("WORLD_SIZE") == str(self.world) and os.environ.get("RANK") == "0" \
            and "MASTER_PORT" in os.environ
        if launched:
            self.addr, self.port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"])
        else:
            self.addr, self.port = "127.0.0.1", _free_port()
            env = {**os.environ, "MASTER_ADDR": self.addr, "MASTER_PORT": str(self.port),
                   "WORLD_SIZE": str(self.world)}
            cfg = json.dumps(settings.model_dump())
            for rank in range(1, self.world):
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "dspark.engine.parallel", "--settings-json", cfg],
                    env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}))
        # watching from the start: a worker that fails before it joins ends the engine too (no wait at the door)
        self.watcher = threading.Thread(target=self._watch, name="dspark-tp-watch", daemon=True)
        self.watcher.start()
        try:
            self.group = init_group(settings.device, 0, self.world, self.addr, self.port)
        except Exception:
            self.closing = True
            self._kill()
            raise
        log.info("tensor parallel: %d ranks over %s (%s:%d), worker pids %s", self.world,
                 comm_backend(settings.device), self.addr, self.port, [p.pid for p in self.procs])

    def dead_worker(self) -> str | None:
        """Why the engine cannot go on, when a worker has exited (the first one found); None while all run."""
        for rank, p in enumerate(self.procs, 1):
            if p.poll() is not None:
                return (f"tensor-parallel worker rank {rank} (pid {p.pid}) exited with code {p.returncode}; the "
                        "model's shards are incomplete, so the engine stops")
        return None

    def _watch(self) -> None:
        while not self.closing:
            if (dead := self.dead_worker()) is not None and not self.closing:
                self.on_dead(dead)
                return
            time.sleep(0.2)

    def step_failed(self, e: BaseException) -> None:
        """A step failed on rank 0 after its inputs went out: the other ranks are inside (or past) collectives this
        rank will not match, so the engine cannot go on. Names a dead worker where there is one."""
        time.sleep(0.1)  # a worker killed mid-step: let its exit be seen
        self.on_dead(self.dead_worker() or f"a tensor-parallel step failed on rank 0 ({e!r}); the ranks are out of "
                     "step, so the engine stops")

    def check(self) -> None:
        if (dead := self.dead_worker()) is not None:
            raise RuntimeError(dead)

    def configure(self, **kw) -> None:
        """What every worker needs from rank 0 before its first step (e.g. the number of KV blocks)."""
        dist.broadcast_object_list([kw], src=0)

    def send_step(self, chunks, seq_ids: list[int], ids: torch.Tensor, bm: JournaledBlockManager,
                  logits_index: list[int]) -> None:
        self.check()
        header, payload = pack_step(chunks, seq_ids, ids, bm.drain(), logits_index, self.device)
        dist.broadcast(header, src=0)
        dist.broadcast(payload, src=0, group=self.group)

    def close(self, timeout_s: float = 10.0) -> None:
        if self.closing:
            return
        self.closing = True
        try:
            if all(p.poll() is None for p in self.procs):
                stop = torch.zeros(HEADER, dtype=torch.long, device=self.device)
                stop[0] = CMD_STOP
                dist.broadcast(stop, src=0)
        except Exception:  # a worker already gone: the rest are killed below
            pass
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self._kill()
        if dist.is_initialized():
            dist.destroy_process_group()

    def abort(self) -> None:
        """The engine failed to start: kill the workers wherever they are, leave the group."""
        self.closing = True
        self._kill()
        if dist.is_initialized():
            dist.destroy_process_group()

    def _kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _exit_engine(msg: str) -> None:
    log.error(msg)
    print(f"dspark: {msg}", file=sys.stderr, flush=True)
    os._exit(1)


# -- a worker ----------------------------------------------------------------------------------------------------
def _watch_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:  # the engine is gone: nothing is left to serve
            os._exit(1)
        time.sleep(1.0)


def run_worker(settings, rank: int, world: int, local_rank: int) -> None:
    from dspark.engine.model import load_model
    from dspark.engine.runner import ModelRunner
    from dspark.kernels import make_backend

    torch.set_num_threads(rank_threads(settings))
    device = rank_device(settings.device, local_rank)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    group = init_group(settings.device, rank, world, os.environ.get("MASTER_ADDR", "127.0.0.1"),
                       int(os.environ["MASTER_PORT"]))
    cfg = ModelConfig.from_dir(settings.model)
    shard = plan_shard(cfg, rank, world)
    model = load_model(settings.model, dtype=settings.torch_dtype, device=device, shard=shard)
    parallelize_(model, shard, group, cfg.vocab_size)
    conf = [None]
    dist.broadcast_object_list(conf, src=0)
    conf = conf[0]
    c = model.config
    backend = make_backend(settings.attention, c.num_attention_heads, c.num_key_value_heads, c.head_dim, device,
                           settings.torch_dtype)
    runner = ModelRunner(model, backend, conf["num_blocks"], conf["block_size"], device, settings.torch_dtype)
    header, mirror = torch.zeros(HEADER, dtype=torch.long, device=device), TableMirror()
    with torch.inference_mode():
        while True:
            dist.broadcast(header, src=0)
            h = header.tolist()
            if h[0] == CMD_STOP:
                break
            _, t, b, j, n = h[:5]
            payload = torch.empty(t + 3 * b + j + n, dtype=torch.long, device=device)
            dist.broadcast(payload, src=0, group=group)
            chunks, seq_ids, rows = unpack_step(h, payload, mirror)
            runner.forward(chunks, mirror, seq_ids, rows)  # rank 0's code: the same metadata, the same collectives
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    """A worker rank: `python -m dspark.engine.parallel --settings-json '{...}'` with RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT (and LOCAL_RANK on CUDA) in the environment."""
    import argparse

    from dspark.engine.settings import Settings
    from dspark.logs import setup_logging

    p = argparse.ArgumentParser(prog="python -m dspark.engine.parallel")
    p.add_argument("--settings-json", required=True, help="the engine's settings (Settings.model_dump() as JSON)")
    args = p.parse_args(argv)
    settings = Settings(**json.loads(args.settings_json))
    setup_logging(settings.log_level, settings.log_format)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    run_worker(settings, rank, world, int(os.environ.get("LOCAL_RANK", rank)))


if __name__ == "__main__":
    main()


__all__ = ["TPDriver", "TPShard", "TargetHeads", "local_config", "parallelize_", "plan_shard", "shard_spec"]
