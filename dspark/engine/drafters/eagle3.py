"""EAGLE-3 drafter: one autoregressive decoder layer over fused low/mid/high target features.

Slot t pairs the fused target feature of token t (which predicts t+1) with the embedding of token t+1 and
predicts token t+2; the layer's input is [norm(embedding) ; norm(hidden)] (2d wide), its residual stream is the
hidden. Drafting continues from the last context slot and feeds back the layer's own output hidden, one token
per step. Trained with a "training-time test": the same unroll over several steps (loss weights 0.8^i).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from dspark.engine.drafters.block import Draft, DraftSampler
from dspark.engine.drafters.config import DrafterConfig
from dspark.engine.drafters.vocab import DraftVocab
from dspark.engine.model import MLP, RMSNorm, RotaryEmbedding, apply_rope
from dspark.engine.model_config import ModelConfig
from dspark.engine.sampling import Rng, SamplingParams


class Eagle3Drafter(nn.Module):
    def __init__(self, cfg: DrafterConfig, target_cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vocab: DraftVocab | None = None  # drafting from a reduced vocabulary (engine.drafters.vocab)
        d, eps = target_cfg.hidden_size, target_cfg.rms_norm_eps
        self.n_heads, self.n_kv, self.head_dim = (target_cfg.num_attention_heads, target_cfg.num_key_value_heads,
                                                  target_cfg.head_dim)
        self.fc = nn.Linear(len(cfg.target_layer_ids) * d, d, bias=False)
        self.hidden_norm = RMSNorm(d, eps)
        self.embed_norm = RMSNorm(d, eps)
        self.q_proj = nn.Linear(2 * d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(2 * d, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(2 * d, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.mlp = MLP(replace(target_cfg, intermediate_size=cfg.intermediate_size or target_cfg.intermediate_size))
        self.norm = RMSNorm(d, eps)
        self.rotary = RotaryEmbedding(target_cfg)
        self.register_buffer("conf_temperature", torch.ones(cfg.block_size), persistent=True)

    # -- the layer ------------------------------------------------------------------------------------------
    def project(self, hidden, emb, positions):
        """q, k, v for slots with residual `hidden` [..., d] and next-token embeddings `emb` [..., d]."""
        x = torch.cat([self.embed_norm(emb), self.hidden_norm(hidden)], -1)
        lead = x.shape[:-1]
        cos, sin = self.rotary(positions, x.dtype)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        q = apply_rope(self.q_proj(x).view(*lead, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(*lead, self.n_kv, self.head_dim), cos, sin)
        v = self.v_proj(x).view(*lead, self.n_kv, self.head_dim)
        return q, k, v

    def finish(self, hidden, attn_out):
        """Residual and MLP after attention; returns the new residual hidden (pre-norm)."""
        h = hidden + self.o_proj(attn_out)
        return h + self.mlp(self.post_attention_layernorm(h))

    def attend(self, q, k, v, mask):
        """q [B, Q, H, D], k/v [B, K, Hkv, D], mask [B, 1, Q, K] -> [B, Q, H*D]."""
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                           enable_gqa=self.n_heads != self.n_kv)
        return o.transpose(1, 2).flatten(2)

    def attend_slots(self, q, k0, v0, rows, cols, ks: list, vs: list):
        """Training-time test attention for chosen slots only: slot (row, col) attends causally to step 0's slots
        <= col of its row and to its own slot of each later step (ks / vs: steps 1..i, one entry per chosen
        slot). The slots are sorted by row, so each row's queries are one contiguous block; the query heads
        sharing a kv head are stacked, so keys and values are never repeated.

        q [N, H, D], k0 / v0 [B, S, Hkv, D], rows / cols [N], each of ks / vs [N, Hkv, D] -> [N, H*D]."""
        n, h, d = q.shape
        g, rep, s = self.n_kv, h // self.n_kv, k0.shape[1]
        qg = q.view(n, g, rep, d)
        own = own_v = None
        if ks:
            own = torch.einsum("ngrd,ngdi->ngri", qg, torch.stack(ks, -1)) * d**-0.5  # [N, g, rep, i]
            own_v = torch.stack(vs, -2)  # [N, g, i, D]
        key_pos = torch.arange(s, device=q.device)
        outs, lo = [], 0
        for r, m in enumerate(torch.bincount(rows, minlength=k0.shape[0]).tolist()):
            if m == 0:
                continue
            sl = slice(lo, lo + m)
            lo += m
            scores = torch.einsum("mgrd,sgd->mgrs", qg[sl], k0[r]) * d**-0.5
            future = key_pos[None, :] > cols[sl, None]  # [m, S]
            scores = scores.masked_fill(future[:, None, None, :], float("-inf"))
            if own is not None:
                scores = torch.cat([scores, own[sl]], -1)
            p = scores.softmax(-1)
            o = torch.einsum("mgrs,sgd->mgrd", p[..., :s], v0[r])
            if own is not None:
                o = o + p[..., s:] @ own_v[sl]
            outs.append(o)
        return torch.cat(outs).reshape(n, h * d)

    # -- inference ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def extend_context(self, state, taps: torch.Tensor, start: int, next_tokens: list[int]):
        """Add slots start..start+n-1: (feature of token t, embedding of token t+1), causal over the cache.

        state: None or (K [C, Hkv, D], V, length, last output hidden [d])."""
        n = min(len(taps), len(next_tokens))
        if n == 0:
            return state
        hidden = self.fc(taps[:n].to(self.fc.weight.dtype))
        emb = self.target_embed(torch.tensor(next_tokens[:n], device=hidden.device))
        pos = torch.arange(start, start + n, device=hidden.device)
        q, k, v = self.project(hidden, emb, pos)
        if state is None:
            assert start == 0, "drafter context must start at position 0"
        else:
            k0, v0, c, _ = state
            assert c == start, f"drafter context gap: have {c} slots, got features from {start}"
            k, v = torch.cat([k0, k]), torch.cat([v0, v])
        total = k.shape[0]
        mask = torch.arange(total, device=k.device)[None, :] <= (pos[:, None])
        out = self.finish(hidden, self.attend(q[None], k[None], v[None], mask[None, None])[0])
        return k, v, start + n, out[-1]

    def extend_contexts(self, states: list, taps: torch.Tensor, starts: list[int], lengths: list[int],
                        next_tokens: list[list[int]]) -> list:
        """extend_context for each request in turn (taps: their rows one request after another): each request's
        slots attend causally over its own cache, so there is no batch to share."""
        return [self.extend_context(st, t, s, nt)
                for st, t, s, nt in zip(states, taps.split(lengths), starts, next_tokens)]

    def attach_target(self, target) -> None:
        """Keep a reference to the target's (frozen) embedding without making it part of this module's state."""
        object.__setattr__(self, "target_embed", target.model.embed_tokens)

    @torch.inference_mode()
    def propose(self, embed: nn.Embedding, lm_head: nn.Linear, anchors: list[int], ctx: list[tuple],
                ks: list[int], params: list[SamplingParams], gens: list[Rng],
                threshold: float = 0.0, constraints: list | None = None) -> list[Draft]:
        """Autoregressive drafting: the last context slot's output gives token 1, each step feeds its hidden back;
        batch tensors throughout, one copy to the host at the end."""
        b = len(anchors)
        dev = self.fc.weight.device
        c_lens = [c[2] for c in ctx]
        c_max = max(c_lens)
        steps = max(ks)
        kk = torch.stack([F.pad(c[0], (0, 0, 0, 0, 0, c_max - c[2])) for c in ctx])
        vv = torch.stack([F.pad(c[1], (0, 0, 0, 0, 0, c_max - c[2])) for c in ctx])
        c_len = torch.tensor(c_lens, device=dev)
        valid = torch.arange(c_max, device=dev)[None, :] < c_len[:, None]
        hidden = torch.stack([c[3] for c in ctx])  # [B, d]
        vocab = self.vocab
        sampler = DraftSampler(params, gens, steps, dev, constraints, vocab)
        tokens = torch.zeros(b, steps, dtype=torch.long, device=dev)
        new_k, new_v = [], []
        for i in range(steps):
            h = self.norm(hidden)
            tokens[:, i] = toks = sampler((lm_head(h) if vocab is None else vocab.logits(h, lm_head)).float(), i)
            if i + 1 == steps:
                break
            pos = c_len + i  # slot of (this hidden, embedding of the token just drafted)
            q, k, v = self.project(hidden, embed(toks), pos)
            new_k.append(k)
            new_v.append(v)
            keys = torch.cat([kk, torch.stack(new_k, 1)], 1)
            vals = torch.cat([vv, torch.stack(new_v, 1)], 1)
            mask = torch.cat([valid, torch.ones(b, len(new_k), dtype=torch.bool, device=dev)], 1)[:, None, None, :]
            hidden = self.finish(hidden, self.attend(q[:, None], keys, vals, mask)[:, 0])
        return sampler.drafts(tokens, torch.tensor(ks, device=dev).clamp(max=steps), None)
