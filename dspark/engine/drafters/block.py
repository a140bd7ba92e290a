"""Parallel block drafter: DSpark (with Markov and confidence heads) and DFlash (the same, without them).

The block is [anchor, mask, ..., mask] (gamma positions) at positions a..a+gamma-1, where the anchor is the
last committed token; position i predicts token a+i+1. Context enters every layer as extra keys/values made
from fused target-layer hidden states of tokens 0..a-1. Queries come only from the block, which attends to
itself bidirectionally. Embedding and LM head are the target's, frozen and not stored with the drafter.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dspark.engine.drafters.config import DrafterConfig
from dspark.engine.drafters.vocab import DraftVocab
from dspark.engine.grammar import unpack
from dspark.engine.model import MLP, RMSNorm, RotaryEmbedding, apply_rope
from dspark.engine.model_config import ModelConfig
from dspark.engine.sampling import Rng, SamplingParams, filter_logits, index_at_rows, uniforms


def _version(t: torch.Tensor) -> int:
    """In-place update counter (cache keys); inference tensors have none (-1: their data pointer decides)."""
    try:
        return t._version
    except RuntimeError:
        return -1


class BlockAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lead = x.shape[:-1]
        k = self.k_norm(self.k_proj(x).view(*lead, self.n_kv, self.head_dim))
        v = self.v_proj(x).view(*lead, self.n_kv, self.head_dim)
        return apply_rope(k, cos.unsqueeze(-2), sin.unsqueeze(-2)), v

    def forward(self, x, cos, sin, ctx_k, ctx_v, mask):
        """x [B, Q, d]; ctx_k/v [B, C, Hkv, D]; mask [B, 1, Q, C + Q] (True = attend)."""
        b, q_len, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, q_len, self.n_heads, self.head_dim))
        q = apply_rope(q, cos.unsqueeze(-2), sin.unsqueeze(-2))
        k, v = self.kv(x, cos, sin)
        k, v = torch.cat([ctx_k, k], 1), torch.cat([ctx_v, v], 1)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                           enable_gqa=self.n_heads != self.n_kv)
        return self.o_proj(o.transpose(1, 2).reshape(b, q_len, -1))


class BlockLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = BlockAttention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, ctx_k, ctx_v, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx_k, ctx_v, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class Draft:
    tokens: list[int]
    q: torch.Tensor | None  # [k, V] distribution each token was drawn from (None when greedy)
    confidence: list[float]  # calibrated survival probability of each drafted token, given the ones before
    source: str = "model"  # or "lookup": prompt lookup's (its verified rounds refine its confidence)

    def truncate(self, n: int) -> Draft:
        """The first n tokens (the scheduler verifies a prefix of what was drafted)."""
        if n >= len(self.tokens):
            return self
        return Draft(self.tokens[:n], None if self.q is None else self.q[:n], self.confidence[:n], self.source)


def point_mass(tokens: list[int], vocab_size: int, device) -> torch.Tensor:
    """The q of a model-free draft (prompt lookup, suffix decoding) for a sampled request: each token "drawn" with
    probability 1, so rejection sampling accepts it with probability p(x) and stays exact."""
    q = torch.zeros(len(tokens), vocab_size, device=device)
    q[torch.arange(len(tokens)), torch.tensor(tokens)] = 1.0
    return q


class DraftSampler:
    """A drafting round's token choice for the whole batch at one position, on the drafter's device: argmax for
    greedy requests, an inverse-CDF draw from the filtered distribution (temperature / top-k / top-p, as the
    target's is filtered at verification) for sampled ones, whose q rows are kept for rejection sampling.

    Each sampled request's uniforms for the round come from its own counter-based stream (all requests' in one
    call), `steps` of them
    whatever the draft's final length, so a seeded request drafts the same tokens whatever shares the batch.

    A structured-output request drafts within its grammar: its logits are masked by the grammar's state after
    the tokens drafted so far (its matcher advances over them, then rolls back), which costs one host read of
    those requests' tokens per position; without it almost every draft token would be rejected."""

    def __init__(self, params: list[SamplingParams], gens: list[Rng], steps: int, device,
                 constraints: list | None = None, vocab: DraftVocab | None = None):
        self.vocab = vocab  # logits come over its K tokens: draws map back to token ids, q spreads back to V
        self.rows = [r for r, p in enumerate(params) if not p.greedy]
        self.q: list[torch.Tensor] = []  # per position: [len(rows), V]
        self.constrained = [(r, c) for r, c in enumerate(constraints or ()) if c is not None]
        self.consumed = dict.fromkeys((r for r, _ in self.constrained), 0)
        self.off_grammar: set[int] = set()  # drafted a token its grammar forbids: no masks past it
        if self.rows:
            sp = [params[r] for r in self.rows]
            self.idx = torch.tensor(self.rows, device=device)
            self.filters = (torch.tensor([p.temperature for p in sp], device=device),
                            torch.tensor([max(p.top_k, 0) for p in sp], device=device),
                            torch.tensor([p.top_p for p in sp], device=device),
                            torch.tensor([p.min_p for p in sp], device=device))
            self.u = uniforms([gens[r] for r in self.rows], [steps] * len(self.rows), device).view(-1, steps)

    def __call__(self, logits: torch.Tensor, i: int) -> torch.Tensor:
        """Tokens [B] at position i from the drafter's logits [B, V], or [B, K] over the reduced vocabulary
        (float32)."""
        vocab = self.vocab
        live = [(r, c) for r, c in self.constrained if r not in self.off_grammar]
        if live:
            rows = torch.tensor([r for r, _ in live], device=logits.device)
            allowed = unpack(torch.from_numpy(np.stack([c.bitmask() for _, c in live])), live[0][1].vocab)
            sub = allowed if vocab is None else allowed[:, vocab.host_ids]
            # none allowed (a finished grammar, or nothing of the subset): all, and the token is rejected
            masks = (sub | ~sub.any(-1, keepdim=True)).to(logits.device)
            logits = logits.clone()
            logits[rows] = logits[rows].masked_fill(~masks, float("-inf"))
        tokens = logits.argmax(-1)
        if self.rows:
            probs = filter_logits(logits[self.idx], *self.filters)
            tokens[self.idx] = index_at_rows(probs, self.u[:, i])
            self.q.append(probs if vocab is None else vocab.spread(probs))
        if vocab is not None:
            tokens = vocab.ids[tokens]
        if live:
            for (r, c), t, m in zip(live, tokens[rows].tolist(), allowed):
                if c.try_consume(t, m):
                    self.consumed[r] += 1
                else:
                    self.off_grammar.add(r)
        return tokens

    def drafts(self, tokens: torch.Tensor, lengths: torch.Tensor, confidence: torch.Tensor | None) -> list[Draft]:
        """Per-request drafts from the round's tokens [B, steps], lengths [B] and confidences [B, steps], with one
        copy to the host; q stays on the device (a view per request)."""
        for r, c in self.constrained:  # drafting was speculative: the grammars go back to the committed state
            c.rollback(self.consumed[r])
        b, steps = tokens.shape
        parts = [tokens.double(), lengths.double()[:, None]]
        if confidence is not None:
            parts.append(confidence.double())
        host = torch.cat(parts, 1).cpu()  # token ids are exact in float64
        toks = host[:, :steps].long().tolist()
        ns = host[:, steps].long().tolist()
        conf = host[:, steps + 1 :].tolist() if confidence is not None else [[1.0] * steps] * b
        out = [Draft(t[:n], None, c[:n]) for t, n, c in zip(toks, ns, conf)]
        if self.rows:
            q = torch.stack(self.q, 1)  # [len(rows), steps, V]
            for j, r in enumerate(self.rows):
                if ns[r]:
                    out[r].q = q[j, : ns[r]]
        return out


class BlockDrafter(nn.Module):
    def __init__(self, cfg: DrafterConfig, target_cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vocab: DraftVocab | None = None  # drafting from a reduced vocabulary (engine.drafters.vocab)
        d = target_cfg.hidden_size
        self.fc = nn.Linear(len(cfg.target_layer_ids) * d, d, bias=False)
        self.hidden_norm = RMSNorm(d, target_cfg.rms_norm_eps)
        self.mask_embedding = nn.Parameter(torch.randn(d) * 0.02)
        layer_cfg = replace(target_cfg, intermediate_size=cfg.intermediate_size or target_cfg.intermediate_size)
        self.layers = nn.ModuleList(BlockLayer(layer_cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(d, target_cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(target_cfg)
        r = cfg.markov_rank
        self._target: tuple[torch.Tensor, torch.Tensor] | None = None  # (embedding, LM head) weights, not stored
        if r and cfg.markov_factored:
            self.markov_a = nn.Linear(d, r, bias=False)
            self.markov_b = nn.Linear(r, d, bias=False)
            nn.init.normal_(self.markov_a.weight, std=d**-0.5)
            nn.init.zeros_(self.markov_b.weight)  # starts as DFlash, learns the correction
        elif r:
            self.markov_in = nn.Embedding(target_cfg.vocab_size, r)
            self.markov_out = nn.Linear(r, target_cfg.vocab_size, bias=False)
            nn.init.normal_(self.markov_in.weight, std=0.02)
            nn.init.zeros_(self.markov_out.weight)  # starts as DFlash, learns the correction
        if cfg.confidence_head:
            self.confidence = nn.Linear(d + r, 1)
        self.register_buffer("conf_temperature", torch.ones(cfg.block_size), persistent=True)

    # -- shared pieces ------------------------------------------------------------------------------------------
    def fuse(self, taps: torch.Tensor) -> torch.Tensor:
        """Concatenated target hidden states [..., m*d] -> context features [..., d]."""
        return self.hidden_norm(self.fc(taps))

    def context_kv(self, feats: torch.Tensor, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        cos, sin = self.rotary(positions, feats.dtype)
        return [layer.self_attn.kv(feats, cos, sin) for layer in self.layers]

    def block_hidden(self, block_emb, positions, ctx_kv, mask) -> torch.Tensor:
        cos, sin = self.rotary(positions, block_emb.dtype)
        x = block_emb
        for layer, (ck, cv) in zip(self.layers, ctx_kv):
            x = layer(x, cos, sin, ck, cv, mask)
        return self.norm(x)

    def attach_target(self, target) -> None:
        """The factored Markov head reads the target's embedding and LM head (frozen, never saved here)."""
        self._target = (target.model.embed_tokens.weight, target.lm_head.weight)

    def markov_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(in [V, r], out [V, r]): bias(prev) = out @ in[prev]. Factored tables are built once for inference
        (cached on the weights' versions); training computes only the rows it needs (markov_code, markov_bias)."""
        if not self.cfg.markov_factored:
            return self.markov_in.weight, self.markov_out.weight
        assert self._target is not None, "factored Markov head: call attach_target(target) first"
        a, b = self.markov_a.weight, self.markov_b.weight
        key = (a.data_ptr(), _version(a), b.data_ptr(), _version(b), a.dtype)
        if getattr(self, "_tables", (None,))[0] != key:
            emb, lm = (w.detach().to(a.dtype) for w in self._target)
            with torch.no_grad():  # inference only: training reads the rows it needs (markov_code, markov_bias)
                self._tables = (key, (emb @ a.T, lm @ b))
        return self._tables[1]

    def markov_code(self, prev: torch.Tensor) -> torch.Tensor:
        """The Markov head's rank-r code of token `prev`: [..., r]."""
        if self.cfg.markov_factored and torch.is_grad_enabled():  # training: only the rows the batch needs
            a = self.markov_a.weight
            return F.embedding(prev, self._target[0].detach()).to(a.dtype) @ a.T
        return F.embedding(prev, self.markov_tables()[0])

    def markov_bias(self, prev: torch.Tensor, vocab: DraftVocab | None = None) -> torch.Tensor | None:
        """The Markov head's logits bias after token `prev` (over `vocab`'s tokens when drafting from one)."""
        if not self.cfg.markov_rank:
            return None
        if torch.is_grad_enabled():  # training
            if self.cfg.markov_factored:
                # the out table over the drafted tokens only (the frozen LM head's slice is cached), never the
                # V x r tables (at rank 256 those two matmuls cost more than the rest of a step)
                lm, b = self._target[1].detach(), self.markov_b.weight
                w_out = (lm if vocab is None else vocab.rows(lm)).to(b.dtype) @ b
            else:
                w_out = self.markov_out.weight if vocab is None else vocab.rows(self.markov_out.weight)
            return F.linear(self.markov_code(prev), w_out)
        return self.markov_code(prev).float() @ self._markov_out_t(vocab)

    def _markov_out_t(self, vocab: DraftVocab | None) -> torch.Tensor:
        """Inference: the Markov out table over the drafted tokens as a float32 [r, K] matrix, made once per table
        version and vocabulary (a batch-1 product over it is about twice as fast as over the bf16 [K, r] table
        on a CPU, and the bias is added to float32 logits anyway)."""
        w = self.markov_tables()[1]
        key = (w.data_ptr(), _version(w), vocab)
        if getattr(self, "_out_t", (None,))[0] != key:
            self._out_t = (key, (w if vocab is None else vocab.rows(w)).float().T.contiguous())
        return self._out_t[1]

    def confidence_logit(self, h: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        parts = [h, self.markov_code(prev)] if self.cfg.markov_rank else [h]
        return self.confidence(torch.cat(parts, -1)).squeeze(-1)

    # -- inference ------------------------------------------------------------------------------------------
    def extend_context(self, state, taps: torch.Tensor, start: int, next_tokens: list[int]):
        """Add context K/V for tokens start..start+len(taps)-1 from their target hidden states.

        state: None or (per-layer [(K, V)], length). `next_tokens` is unused here (EAGLE-3 needs it)."""
        return self.extend_contexts([state], taps, [start], [len(taps)], [next_tokens])[0]

    @torch.inference_mode()
    def extend_contexts(self, states: list, taps: torch.Tensor, starts: list[int], lengths: list[int],
                        next_tokens: list[list[int]] | None = None) -> list:
        """extend_context for many requests in one pass: taps holds their rows one request after another
        (lengths[r] rows from position starts[r]); the projections run once over all of them."""
        feats = self.fuse(taps.to(self.fc.weight.dtype))
        positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths)]).to(feats.device)
        new = [(k.split(lengths), v.split(lengths)) for k, v in self.context_kv(feats, positions)]
        out = []
        for r, (state, start) in enumerate(zip(states, starts)):
            if state is None:
                assert start == 0, "drafter context must start at position 0"
                out.append(([(k[r], v[r]) for k, v in new], lengths[r]))
                continue
            layers, n = state
            assert n == start, f"drafter context gap: have {n} positions, got features from {start}"
            out.append(([(torch.cat([k, nk[r]]), torch.cat([v, nv[r]])) for (k, v), (nk, nv) in zip(layers, new)],
                        n + lengths[r]))
        return out

    @torch.inference_mode()
    def propose(self, embed: nn.Embedding, lm_head: nn.Linear, anchors: list[int], ctx: list[tuple],
                ks: list[int], params: list[SamplingParams], gens: list[Rng],
                threshold: float = 0.0, constraints: list | None = None) -> list[Draft]:
        """Draft up to ks[b] tokens after each anchor. ctx[b] = (per-layer context K/V list, context length);
        constraints[b]: the request's grammar (engine.grammar.Constraint) or None.

        One block forward for the batch, then a loop over the block's positions on batch tensors (the Markov
        head makes position i depend on the token drawn at i-1); one copy to the host at the end.
        The confidence cut is decided at position i before x_i is drawn (from h_i and x_{i-1}), so the
        proposal length never depends on the token it would cut: speculation stays lossless.
        """
        b, gamma = len(anchors), self.cfg.block_size
        steps = min(gamma, max(ks))
        dev = self.mask_embedding.device
        c_lens = [c[1] for c in ctx]
        c_max = max(c_lens)
        kv = []
        for li in range(len(self.layers)):
            ks_, vs_ = [], []
            for (layer_kv, n) in ctx:
                k, v = layer_kv[li]
                pad = c_max - n
                ks_.append(F.pad(k, (0, 0, 0, 0, 0, pad)))
                vs_.append(F.pad(v, (0, 0, 0, 0, 0, pad)))
            kv.append((torch.stack(ks_), torch.stack(vs_)))
        emb = self.mask_embedding.expand(b, gamma, -1).clone()
        emb[:, 0] = embed(torch.tensor(anchors, device=dev))
        c_len = torch.tensor(c_lens, device=dev)
        positions = c_len[:, None] + torch.arange(gamma, device=dev)
        valid_ctx = torch.arange(c_max, device=dev)[None, :] < c_len[:, None]
        mask = torch.cat([valid_ctx[:, None, :].expand(b, gamma, c_max),
                          torch.ones(b, gamma, gamma, dtype=torch.bool, device=dev)], -1).unsqueeze(1)
        h = self.block_hidden(emb, positions, kv, mask)  # [B, gamma, d]
        vocab = self.vocab
        # [B, steps, V], or [B, steps, K] over a reduced vocabulary
        base = (lm_head(h[:, :steps]) if vocab is None else vocab.logits(h[:, :steps], lm_head)).float()
        sampler = DraftSampler(params, gens, steps, dev, constraints, vocab)
        tokens = torch.zeros(b, steps + 1, dtype=torch.long, device=dev)  # column 0: the anchors
        tokens[:, 0] = prev = torch.tensor(anchors, device=dev)
        for i in range(steps):
            logits = base[:, i]
            bias = self.markov_bias(prev, vocab)
            if bias is not None:
                logits = logits + bias.float()
            tokens[:, i + 1] = prev = sampler(logits, i)
        # Position i is kept while i < ks and its confidence (from h_i and x_{i-1}, never x_i) passes the cut: the
        # same decision the loop could make before drawing x_i, made for all positions in one batched call.
        live = torch.arange(steps, device=dev)[None, :] < torch.tensor(ks, device=dev)[:, None]
        conf = None
        if self.cfg.confidence_head:
            logit = self.confidence_logit(h[:, :steps], tokens[:, :steps]).float()
            conf = torch.sigmoid(logit / self.conf_temperature[:steps])
            live &= conf >= threshold
        lengths = live.long().cumprod(-1).sum(-1)
        return sampler.drafts(tokens[:, 1:], lengths, conf)
