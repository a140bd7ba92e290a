"""A reduced draft vocabulary (FR-Spec, Zhao et al. 2025): the drafter scores only the target's most frequent
output tokens, so its LM head costs K rows instead of V.

On the default model the drafter's LM head over 7 positions x 49,152 tokens is most of a drafting round; the
8,192 tokens the target writes most often cover about 92% of what it writes on held-out prompts. A token outside
the subset is never drafted (the draft distribution gives it probability 0, so rejection sampling stays exact,
and greedy verification is unchanged): only acceptance can drop, and only where the drafter would have had to
guess such a token.

The ranking is counted on the drafter's training data, the target's own answers (never the held-out sets), and
kept beside the drafter as `draft_vocab.safetensors`.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from dspark.engine.model import ServingLinear

FILE = "draft_vocab.safetensors"


def token_ranking(data: list[dict]) -> torch.Tensor:
    """Token ids of the target's answers (ids after prompt_len), most frequent first (ties: lower id first)."""
    counts = Counter(t for d in data for t in d["ids"][d["prompt_len"]:])
    return torch.tensor(sorted(counts, key=lambda t: (-counts[t], t)), dtype=torch.int32)


def save_ranking(path: str | Path, ranking: torch.Tensor) -> Path:
    out = Path(path) / FILE
    save_file({"ranking": ranking.to(torch.int32).contiguous()}, str(out))
    return out


class DraftVocab:
    """The K token ids the drafter may propose, and the slices of the target's tables it needs."""

    def __init__(self, ids: torch.Tensor, vocab_size: int):
        self.ids = ids.long().sort().values
        self.host_ids = self.ids.cpu()  # indexes the grammar masks, which are built on the host
        self.vocab_size = vocab_size
        self._rows: dict = {}
        self._head: tuple | None = None  # (rows, their ServingLinear) for drafting

    @classmethod
    def load(cls, drafter_dir: str | Path, size: int, vocab_size: int, always: list[int], device="cpu"
             ) -> DraftVocab | None:
        """The `size` most frequent tokens of the ranking beside the drafter, plus `always` (end of sequence);
        None when there is no ranking or `size` covers the whole vocabulary."""
        path = Path(drafter_dir) / FILE
        if not path.exists():
            return None
        return cls.top(load_file(str(path))["ranking"], size, vocab_size, always, device)

    @classmethod
    def top(cls, ranking: torch.Tensor, size: int, vocab_size: int, always: list[int], device="cpu"
            ) -> DraftVocab | None:
        """The `size` first tokens of a ranking plus `always`; None when `size` covers the whole vocabulary."""
        if size <= 0 or size >= vocab_size:
            return None
        ids = torch.cat([ranking[:size].long(), torch.tensor(always, dtype=torch.long)]).unique()
        return cls(ids.to(device), vocab_size)

    def rows(self, table: torch.Tensor) -> torch.Tensor:
        """table[ids] (an LM head's weight, the Markov head's output table), made once per table version; a
        table being trained is indexed afresh (the gradient flows into it)."""
        if table.requires_grad and torch.is_grad_enabled():
            return table[self.ids.to(table.device)]
        key = (table.data_ptr(), table.dtype, table.shape)
        if key not in self._rows:
            if len(self._rows) >= 4:  # tables were replaced (reloaded weights): drop the stale slices
                self._rows.clear()
            self._rows[key] = table.detach()[self.ids.to(table.device)].contiguous()
        return self._rows[key]

    def index(self, tokens: torch.Tensor) -> torch.Tensor:
        """Each token's place in the subset, -100 (cross_entropy's ignore_index) for tokens outside it."""
        ids = self.ids.to(tokens.device)
        at = torch.searchsorted(ids, tokens).clamp(max=len(ids) - 1)
        return torch.where(ids[at] == tokens, at, torch.full_like(at, -100))

    def logits(self, h: torch.Tensor, lm_head: torch.nn.Linear) -> torch.Tensor:
        """The LM head over the subset only: [..., K]. Drafting goes through a serving projection of those rows
        (oneDNN-packed where the target's projections are: on an AVX2 EPYC the head was 7.4 ms of a 16.5 ms
        batch-1 round, and the round fell to 10.0 ms); training keeps the plain product, which gradients flow
        through."""
        w = self.rows(lm_head.weight)
        if torch.is_grad_enabled():
            return F.linear(h, w)
        if self._head is None or self._head[0] is not w:
            self._head = (w, ServingLinear.of(w))
        return self._head[1](h)

    def spread(self, probs: torch.Tensor) -> torch.Tensor:
        """[B, K] draft probabilities -> [B, V], zero outside the subset (the q verification reads)."""
        full = probs.new_zeros((*probs.shape[:-1], self.vocab_size))
        return full.index_copy_(-1, self.ids.to(probs.device), probs)
