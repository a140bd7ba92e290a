"""`dspark train-drafter`: train a dspark or dflash block drafter for a target model.

Data: prompts from the training corpus (code, chat, math), continued by the target itself through our engine
(temperature 0.7, as DeepSpec regenerates answers with the target); the token ids are cached on disk. Each
step runs the target densely over a batch (no grad) for the tapped hidden states and p_target, samples anchor
positions inside the generated part, and trains all their blocks in one drafter forward.

Loss (DSpark): 0.1 CE + 0.9 L1(p_draft, p_target) + 1.0 BCE(confidence, 1 - 0.5 L1), position i weighted
exp(-i/4), Markov head teacher-forced on the true previous token. DFlash: CE only, same weights.

Draft vocabulary (`--draft-vocab-size`, default 8192 as in serving): the drafter's logits and every loss term
cover only the target's most frequent answer tokens, as EAGLE-3 trains with its reduced vocabulary. The
target's full-vocabulary logsumexp and argmax per position are computed once and cached beside the features,
so the losses stay exact for a drafter that can only propose those tokens, and a step does no V-wide work.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm import tqdm

from dspark.engine.drafters import DrafterConfig, build_drafter, default_layer_ids, save_drafter, target_fingerprint
from dspark.engine.drafters.vocab import DraftVocab, save_ranking, token_ranking
from dspark.engine.llm_engine import LLMEngine
from dspark.engine.model import load_model
from dspark.engine.sampling import SamplingParams
from dspark.engine.settings import Settings
from dspark.engine.training.prompts import GROUPS, prompt_set

GROUP_SHARE = {"code": 0.4, "chat": 0.4, "math": 0.2}


def generate_data(model_dir: str, n: int, max_new: int, seed: int, device: str = "cpu", batch: int = 64,
                  max_prompt_tokens: int = 256, partial: Path | None = None, limit: int | None = None) -> list[dict]:
    """The target answers n real training prompts (`prompts.prompt_set`, 40% code, 40% chat, 20% math; only the
    first `limit` of that draw when given) with this engine, batched, sampling at temperature 0.7 / top-p 0.8 /
    top-k 20 as DeepSpec regenerates its data.

    Progress is saved to `partial` after every chunk, so a stopped run picks up where it was."""
    eng = LLMEngine(Settings(model=model_dir, max_num_seqs=batch, max_num_batched_tokens=4096, device=device))
    want = {g: round(n * f) for g, f in GROUP_SHARE.items()}
    want["chat"] += n - sum(want.values())
    sets = prompt_set("train", want, lambda t: len(eng.tokenizer.encode(t)), max_prompt_tokens, seed)
    items = [(g, m) for g in GROUPS for m in sets.get(g, [])]
    random.Random(seed).shuffle(items)
    items = items[:limit]
    data = torch.load(partial) if partial is not None and partial.exists() else []
    chunk, t0, new_tokens = batch * 4, time.time(), 0
    bar = tqdm(total=len(items), initial=len(data), desc="target generations", mininterval=5)
    for lo in range(len(data), len(items), chunk):
        part = items[lo : lo + chunk]
        prompts = [eng.tokenizer.encode_chat(m) for _, m in part]
        params = [SamplingParams(temperature=0.7, top_p=0.8, top_k=20, seed=seed * 100003 + lo + i, max_tokens=max_new)
                  for i in range(len(part))]
        seqs = eng.generate(prompts, params)
        data += [{"ids": s.token_ids, "prompt_len": s.num_prompt, "group": g} for s, (g, _) in zip(seqs, part)]
        new_tokens += sum(len(s.token_ids) - s.num_prompt for s in seqs)
        bar.update(len(part))
        bar.set_postfix(gen_tok_s=f"{new_tokens / (time.time() - t0):.0f}")
        if partial is not None:
            torch.save(data, partial)
    bar.close()
    print(f"batch generation: {new_tokens} new tokens in {time.time() - t0:.0f}s = "
          f"{new_tokens / max(1e-9, time.time() - t0):.0f} tok/s (max {batch} sequences per step)")
    return data


def resume_from_shorter(cache: Path, gen_limit: int, partial: Path) -> Path | None:
    """A `--gen-limit N` run whose draw a shorter run (a smaller limit, same prompts and seed) answered already
    starts from those answers: they are the first ones of this run's list (same order, same per-request seeds),
    so they become its progress file. Returns the cache reused, if any."""
    ext = cache.suffix
    suffix = f"-{gen_limit}{ext}"
    if partial.exists() or not cache.name.endswith(suffix):
        return None
    base = cache.name[: -len(suffix)]
    shorter = {}  # limit -> its cache
    for c in cache.parent.glob(f"{base}-*{ext}"):
        n = c.name[len(base) + 1 : -len(ext)]
        if n.isdigit() and int(n) < gen_limit:
            shorter[int(n)] = c
    if not shorter:
        return None
    src = shorter[max(shorter)]
    shutil.copyfile(src, partial)
    return src


def make_batch(items: list[dict], pad: int, feats: list[tuple[torch.Tensor, ...]] | None = None):
    """Right-padded ids [B, S] and generated-token mask; with `feats`, also each per-token column of them,
    padded alike: the target's taps [B, S, m*d] and final hidden states [B, S, d], and where present its
    logsumexp and argmax [B, S] (zeros past each sequence: right padding never reaches earlier positions)."""
    n = max(len(x["ids"]) for x in items)
    ids = torch.full((len(items), n), pad, dtype=torch.long)
    gen_mask = torch.zeros(len(items), n, dtype=torch.bool)
    for i, x in enumerate(items):
        ids[i, : len(x["ids"])] = torch.tensor(x["ids"])
        gen_mask[i, x["prompt_len"] : len(x["ids"])] = True
    if feats is None:
        return ids, gen_mask
    cols = []
    for c in range(len(feats[0])):
        col = torch.zeros(len(items), n, *feats[0][c].shape[1:], dtype=feats[0][c].dtype)
        for i, f in enumerate(feats):
            col[i, : len(f[c])] = f[c]
        cols.append(col)
    return ids, gen_mask, *cols


@torch.inference_mode()
def target_features(target, data: list[dict], layer_ids: list[int], pad: int, batch: int = 8
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(taps [n, m*d], final hidden [n, d]) per sequence, bfloat16, from one dense pass of the frozen target:
    training then never runs the target again (it was most of a step's cost)."""
    out: list = [None] * len(data)
    order = sorted(range(len(data)), key=lambda i: len(data[i]["ids"]))
    dev = next(target.parameters()).device
    for lo in tqdm(range(0, len(order), batch), desc="target features", mininterval=5):
        idx = order[lo : lo + batch]
        ids, _ = make_batch([data[i] for i in idx], pad)
        final, taps = target(ids.to(dev), hidden_layers=tuple(i + 1 for i in layer_ids))
        taps = torch.cat(taps, -1)
        for j, i in enumerate(idx):
            n = len(data[i]["ids"])
            out[i] = (taps[j, :n].to("cpu", torch.bfloat16).clone(), final[j, :n].to("cpu", torch.bfloat16).clone())
    return out


@torch.inference_mode()
def target_stats(target, feats: list[tuple[torch.Tensor, torch.Tensor]], amp: bool) -> list[tuple]:
    """(logsumexp [n] float32, argmax [n] int32) of the target's logits at every stored position: all that a
    reduced-vocabulary loss needs of the full vocabulary (p_target on the subset is exp(logit - logsumexp), the
    rest is the mass the drafter cannot propose), computed once instead of a V-wide softmax every step."""
    w = target.lm_head.weight
    out = []
    for _, final in tqdm(feats, desc="target logsumexp", mininterval=5):
        with torch.autocast(w.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = F.linear(final.to(w.device, w.dtype), w).float()
        out.append((torch.logsumexp(logits, -1).cpu(), logits.argmax(-1).int().cpu()))
    return out


def target_probs(target, h: torch.Tensor, vocab: DraftVocab | None, lse: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's distribution at final hidden states h [..., d]: over V (vocab None), or its exact
    probabilities on the draft vocabulary's K tokens (normalized by the full logsumexp) and the mass outside."""
    if vocab is None:
        p = F.softmax(target.logits(h.to(target.lm_head.weight.dtype)), -1)
        return p, p.new_zeros(p.shape[:-1])
    w = vocab.rows(target.lm_head.weight.detach())
    p = torch.exp(F.linear(h.to(w.dtype), w).float() - lse.float()[..., None])
    return p, (1 - p.sum(-1)).clamp_min(0)


def draft_logits(h: torch.Tensor, target, vocab: DraftVocab | None) -> torch.Tensor:
    """The drafter's logits through the target's frozen LM head: over V, or over the draft vocabulary only."""
    head = target.lm_head  # frozen: the subset's rows are sliced once (DraftVocab.rows)
    return (head(h) if vocab is None else vocab.logits(h, head)).float()


def sample_anchors(gen_mask: torch.Tensor, num: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor a needs tokens a and a+1 generated (a+1 is the first drafted token). Returns [B, A] and validity."""
    b, s = gen_mask.shape
    ok = gen_mask[:, :-1] & gen_mask[:, 1:]
    anchors = torch.zeros(b, num, dtype=torch.long)
    valid = torch.zeros(b, num, dtype=torch.bool)
    for i in range(b):
        cand = ok[i].nonzero().flatten()
        if len(cand) == 0:
            continue
        pick = cand[torch.randperm(len(cand), generator=gen)[:num]].sort().values
        anchors[i, : len(pick)] = pick
        valid[i, : len(pick)] = True
    return anchors, valid


def drafter_loss(drafter, target, ids, gen_mask, anchors, valid, method: str, taps, final,
                 vocab: DraftVocab | None = None, lse=None, amax=None, hits: list | None = None):
    """One forward over all anchored blocks; returns (loss, metrics). taps/final: the target's, precomputed.

    With `vocab` the drafter's logits cover only the draft vocabulary, as it drafts at inference, and the losses
    are exactly those of a drafter whose other logits are -inf (lse, amax: the target's full logsumexp and
    argmax per position, from target_stats): a label outside the subset drops out of the CE, and the L1 counts
    the target's mass outside it. Every V-wide tensor of a step becomes K-wide.

    `hits`, when given, receives [B, A, gamma]: whether each supervised slot's argmax is the target's."""
    cfg = drafter.cfg
    gamma, (b, s), a_n = cfg.block_size, ids.shape, anchors.shape[1]
    dev = ids.device
    feats = drafter.fuse(taps.to(drafter.fc.weight.dtype))
    ctx_kv = drafter.context_kv(feats, torch.arange(s, device=dev).expand(b, s))
    offs = torch.arange(gamma, device=dev)
    pos = anchors[:, :, None] + offs  # [B, A, gamma]: position of each block slot; predicts token pos+1
    emb = drafter.mask_embedding.expand(b, a_n, gamma, -1).clone()
    emb[:, :, 0] = target.model.embed_tokens(ids.gather(1, anchors)).detach()
    q = a_n * gamma
    # context strictly before the anchor
    ctx_ok = torch.arange(s, device=dev)[None, None, :] < anchors.reshape(b, a_n, 1)
    ctx_ok = ctx_ok[:, :, None, :].expand(b, a_n, gamma, s).reshape(b, q, s)
    blk = torch.arange(a_n, device=dev).repeat_interleave(gamma)
    same_block = (blk[:, None] == blk[None, :]).expand(b, q, q)
    mask = torch.cat([ctx_ok, same_block], -1).unsqueeze(1)
    h = drafter.block_hidden(emb.reshape(b, q, -1), pos.reshape(b, q), ctx_kv, mask)  # [B, Q, d]
    logits = draft_logits(h, target, vocab)
    tgt_pos = (pos + 1).clamp(max=s - 1)
    labels = ids.gather(1, tgt_pos.reshape(b, q))
    at = pos.clamp(max=s - 1).reshape(b, q)
    prev = ids.gather(1, at)  # teacher-forced previous token
    bias = drafter.markov_bias(prev, vocab)
    if bias is not None:
        logits = logits + bias.float()
    # supervised: inside the sequence, generated, and every earlier position of the block too
    in_gen = gen_mask.gather(1, tgt_pos.reshape(b, q)).reshape(b, a_n, gamma) & ((pos + 1) < s)
    eval_mask = (in_gen.long().cumprod(-1).bool() & valid[:, :, None]).reshape(b, q)
    w = eval_mask.float() * torch.exp(-offs.float() / 4).repeat(a_n)[None, :]
    wsum = w.sum().clamp_min(1.0)
    targets = labels.flatten() if vocab is None else vocab.index(labels.flatten())
    ce = F.cross_entropy(logits.reshape(b * q, -1), targets, reduction="none", ignore_index=-100).view(b, q)
    ce = (ce * w).sum() / wsum
    with torch.no_grad():  # p_target at block slot i: the target's distribution for token a+i+1
        tgt_h = final.gather(1, at[..., None].expand(b, q, final.shape[-1]))
        p_t, outside = target_probs(target, tgt_h, vocab, None if lse is None else lse.gather(1, at))
        best = p_t.argmax(-1) if vocab is None else amax.gather(1, at).long()
    p_d = F.softmax(logits, -1)
    l1_each = (p_d - p_t).abs().sum(-1) + outside  # [B, Q], in [0, 2]
    l1 = (l1_each * w).sum() / wsum
    drafted = logits.argmax(-1) if vocab is None else vocab.ids[logits.argmax(-1)]
    hit = (drafted == best) & eval_mask
    if hits is not None:
        hits.append(hit.view(b, a_n, gamma))
    metrics = {"ce": ce.item(), "l1": l1.item(), "acc": hit.sum().item() / max(1, eval_mask.sum().item())}
    if method == "dflash":
        return ce, metrics
    loss = 0.1 * ce + 0.9 * l1
    if cfg.confidence_head:
        label = (1 - 0.5 * l1_each).clamp(0, 1).detach()
        conf = drafter.confidence_logit(h, prev)
        bce = (F.binary_cross_entropy_with_logits(conf.float(), label, reduction="none") * w).sum() / wsum
        loss = loss + bce
        metrics["bce"] = bce.item()
    return loss, metrics


def eagle3_loss(drafter, target, ids, gen_mask, taps, final, decay: float = 0.8, max_slots: int = 512,
                gen: torch.Generator | None = None, vocab: DraftVocab | None = None, lse=None, amax=None):
    """Training-time test: unroll `block_size` steps, each feeding back the drafter's own hidden.

    Slot t at step i has position t+i, input (hidden, embedding of token t+1+i) and predicts token t+2+i
    against the target's distribution there; it attends to step-0 slots <= t and to its own chain (slot t of
    steps 1..i), exactly what drafting step i sees at inference. Each step's loss is taken on at most `max_slots`
    random supervised slots. A slot's chain depends on no other chain, so only the chains some step supervises
    are unrolled; step 0 projects every slot (all of them are keys) but runs attention and the MLP only for
    those chains.

    With `vocab` (see drafter_loss) the soft CE runs over the draft vocabulary: the target's mass outside it is
    a term the drafter cannot change, left out."""
    b, s = ids.shape
    steps = drafter.cfg.block_size
    t = torch.arange(s, device=ids.device)
    picks = []  # per step: flat indices row * s + col of the supervised slots
    for i in range(steps):
        ok = (t + 2 + i < s)[None, :] & gen_mask[:, (t + 2 + i).clamp(max=s - 1)]
        flat = ok.flatten().nonzero()[:, 0]
        if len(flat) > max_slots:
            flat = flat[torch.randperm(len(flat), generator=gen)[:max_slots].to(ids.device)]
        picks.append(flat)
    chains = torch.unique(torch.cat(picks))  # sorted: row-major, as attend_slots wants
    if len(chains) == 0:
        return (drafter.fc.weight * 0).sum(), {}
    rows, cols = chains // s, chains % s
    hidden0 = drafter.fc(taps.to(drafter.fc.weight.dtype))
    emb = target.model.embed_tokens(ids[:, (t + 1).clamp(max=s - 1)]).detach()
    q, k0, v0 = drafter.project(hidden0, emb, t.expand(b, s))
    hidden = drafter.finish(hidden0[rows, cols], drafter.attend_slots(q[rows, cols], k0, v0, rows, cols, [], []))
    keys, vals = [], []
    total, metrics = 0.0, {}
    for i in range(steps):
        if i:
            emb = target.model.embed_tokens(ids[rows, (cols + 1 + i).clamp(max=s - 1)]).detach()
            q, k, v = drafter.project(hidden, emb, cols + i)
            keys.append(k)
            vals.append(v)
            hidden = drafter.finish(hidden, drafter.attend_slots(q, k0, v0, rows, cols, keys, vals))
        if len(picks[i]) == 0:
            continue
        at_rows, at = picks[i] // s, picks[i] % s + 1 + i  # the target's distribution at t+1+i predicts t+2+i
        logits = draft_logits(drafter.norm(hidden[torch.searchsorted(chains, picks[i])]), target, vocab)
        with torch.no_grad():
            p_t, _ = target_probs(target, final[at_rows, at], vocab, None if lse is None else lse[at_rows, at])
            best = p_t.argmax(-1) if vocab is None else amax[at_rows, at].long()
        soft_ce = -(p_t * F.log_softmax(logits, -1)).sum(-1)
        total = total + decay**i * soft_ce.mean()
        if i == 0:
            drafted = logits.argmax(-1) if vocab is None else vocab.ids[logits.argmax(-1)]
            metrics["acc"] = (drafted == best).float().mean().item()
            metrics["ce"] = soft_ce.mean().item()
    return total, metrics


def train_drafter(model_dir: str, out: str, method: str = "dspark", steps: int = 1500, batch: int = 16,
                  anchors: int = 16, block_size: int = 7, num_layers: int = 2, markov_rank: int | None = None,
                  lr: float = 1e-3, seed: int = 0, num_prompts: int = 1536, max_new: int = 128,
                  data_cache: str | None = None, save_every: int = 250, stop_after: int | None = None,
                  device: str = "cpu", intermediate_size: int = 0, markov_factored: bool = False,
                  taps: int = 5, gen_limit: int | None = None, log_every: int = 25,
                  init_from: str | None = None, threads: int | None = None,
                  draft_vocab_size: int = 0) -> dict | None:
    """Train and save to `out`. `stop_after` ends this run after that many steps, leaving a checkpoint that the
    next call resumes from exactly (model, optimizer, schedule and data-sampling state). Every `log_every`
    steps (and a run's first and the last) the log records the loss and the data rows the batch drew.

    Weights are float32 on every device; where the target serves in bfloat16 (CUDA, CPUs with bf16 kernels) the
    forward runs under bf16 autocast. Data sampling uses a CPU generator, so the batches are the same on every
    device.

    `draft_vocab_size` K > 0 trains over the target's K most frequent answer tokens (the ranking saved beside
    the drafter, which serving's --draft-vocab-size reads): the drafter then learns exactly what it drafts, and
    a step's V-wide tensors become K-wide (several times faster at K = 8192 of 49,152 on the default model)."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but CUDA is not available")
    target = load_model(model_dir, device=device).eval()
    for p in target.parameters():
        p.requires_grad_(False)
    stem = f"drafter-data-{Path(model_dir).name}-{num_prompts}-{max_new}-{seed}"
    stem += f"-{gen_limit}" if gen_limit else ""
    cache = Path(data_cache or Path("runs") / f"{stem}.pt")
    if cache.exists():
        data = torch.load(cache)
    else:
        t0 = time.time()
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_suffix(".partial")
        if gen_limit:
            resume_from_shorter(cache, gen_limit, partial)
        data = generate_data(model_dir, num_prompts, max_new, seed, device=device, partial=partial, limit=gen_limit)
        torch.save(data, cache)
        partial.unlink(missing_ok=True)
        print(f"generated {sum(len(x['ids']) - x['prompt_len'] for x in data)} target tokens in "
              f"{time.time() - t0:.0f}s -> {cache}")
    d = target.config.hidden_size
    dspark = method == "dspark"
    cfg = DrafterConfig(
        method=method, target_layer_ids=default_layer_ids(target.config.num_hidden_layers, taps),
        block_size=block_size, num_layers=1 if method == "eagle3" else num_layers,
        intermediate_size=intermediate_size,
        markov_rank=(min(256, d) if markov_rank is None else markov_rank) if dspark else 0,
        markov_factored=markov_factored and dspark,
        confidence_head=dspark, target_fingerprint=target_fingerprint(target), target_name=Path(model_dir).name,
    )
    pad = target.config.eos_token_id[0] if target.config.eos_token_id else 0
    serve_dtype = Settings(model=model_dir, device=device).torch_dtype
    amp = serve_dtype == torch.bfloat16  # matmuls in bf16 where the target serves in it (CUDA, bf16 CPUs)
    fcache = cache.with_name(f"{cache.stem}-feats-{'-'.join(map(str, cfg.target_layer_ids))}.pt")
    if fcache.exists():
        feats = torch.load(fcache)
    else:  # in the dtype the target serves in, as the drafter will see it
        served = load_model(model_dir, serve_dtype, device)
        feats = target_features(served, data, cfg.target_layer_ids, pad)
        del served
        torch.save(feats, fcache)
    ranking = token_ranking(data)
    vocab = DraftVocab.top(ranking, draft_vocab_size, target.config.vocab_size, target.config.eos_token_id, dev)
    if vocab is not None:  # the target's logsumexp and argmax per position join each sequence's features
        scache = fcache.with_name(f"{fcache.stem}-lse.pt")
        if scache.exists():
            stats = torch.load(scache)
        else:
            stats = target_stats(target, feats, amp)
            torch.save(stats, scache)
        feats = [(*f, *st) for f, st in zip(feats, stats)]
    drafter = build_drafter(cfg, target).to(dev)
    previous = None
    if init_from:
        previous = DrafterConfig.load(Path(init_from))
        mine, theirs = asdict(cfg), asdict(previous)
        differ = [k for k in mine if k != "training" and mine[k] != theirs[k]]
        if differ:
            raise ValueError(f"--init-from {init_from}: its {', '.join(differ)} differ from this run's")
        state = load_file(str(Path(init_from) / "model.safetensors"))
        drafter.load_state_dict({k: v.float() for k, v in state.items()})
    outdir = Path(out)
    ckpt = outdir / "train_state.pt"
    opt = torch.optim.AdamW([p for p in drafter.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    warm = max(1, steps // 25)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1.0, (t + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps)))
    start, log = 0, []
    gen = torch.Generator().manual_seed(seed)
    if ckpt.exists():  # resume
        st = torch.load(ckpt, map_location=dev)
        drafter.load_state_dict(st["drafter"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        gen.set_state(st["gen"])
        start, log = st["step"], st["log"]
        print(f"resumed from step {start}")
    t0 = time.time()
    bar = tqdm(range(start, steps), desc=f"train {method}", mininterval=5, initial=start, total=steps)
    for step in bar:
        idx = torch.randint(0, len(data), (batch,), generator=gen).tolist()
        ids, gen_mask, tp, fin, *st = make_batch([data[i] for i in idx], pad, [feats[i] for i in idx])
        anc, valid = sample_anchors(gen_mask, anchors, gen)
        ids, gen_mask, anc, valid, tp, fin = (x.to(dev) for x in (ids, gen_mask, anc, valid, tp, fin))
        lse, amax = (x.to(dev) for x in st) if st else (None, None)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            if method == "eagle3":
                # as many supervised slots per unrolled step as the block drafters get blocks per step
                loss, m = eagle3_loss(drafter, target, ids, gen_mask, tp, fin, max_slots=batch * anchors, gen=gen,
                                      vocab=vocab, lse=lse, amax=amax)
            else:
                loss, m = drafter_loss(drafter, target, ids, gen_mask, anc, valid, method, tp, fin, vocab, lse,
                                       amax)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step in (start, steps - 1):
            log.append({"step": step, "loss": round(loss.item(), 4), **{k: round(v, 4) for k, v in m.items()},
                        "rows": idx})
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{m['acc']:.3f}")
        stopping = stop_after is not None and step + 1 - start >= stop_after and step + 1 < steps
        if ((step + 1) % save_every == 0 and step + 1 < steps) or stopping:
            outdir.mkdir(parents=True, exist_ok=True)
            torch.save({"drafter": drafter.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "gen": gen.get_state(), "step": step + 1, "log": log}, ckpt)
        if stopping:
            return None
    cfg.training = {"steps": steps, "batch": batch, "anchors_per_seq": anchors, "lr": lr, "seed": seed,
                    "prompts": num_prompts, "max_new_tokens": max_new, "gen_limit": gen_limit,
                    "sequences": len(data), "data": "ShareGPT / stdlib code / math", "first_step_this_run": start,
                    "draft_vocab_size": draft_vocab_size if vocab is not None else 0,
                    "seconds_this_run": round(time.time() - t0),
                    "final": log[-1] if log else {}}
    if previous is not None:
        cfg.training["continued_from"] = previous.training
    save_drafter(drafter.cpu().eval(), outdir)
    save_ranking(outdir, ranking)  # the reduced draft vocabulary's ranking, from the same answers
    (outdir / "training_log.json").write_text(json.dumps(log, indent=1))
    ckpt.unlink(missing_ok=True)
    return cfg.training
