"""Drafter checkpoint format: a directory with config.json + model.safetensors, naming its target."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

METHODS = ("dspark", "dflash", "eagle3")


@dataclass
class DrafterConfig:
    method: str  # dspark | dflash | eagle3
    target_layer_ids: list[int]  # 0-based decoder layers whose outputs are fused into the context features
    block_size: int = 7  # gamma: the most tokens one round drafts
    num_layers: int = 2
    intermediate_size: int = 0  # the drafter layers' MLP width; 0 = the target's
    markov_rank: int = 0  # 0 = no Markov head (dflash, eagle3)
    # The Markov head as W_lm B A E[prev]: through the target's frozen embedding E and LM head W_lm, with only
    # A (rank x d) and B (d x rank) stored, 2 d r weights instead of 2 V r (a 49k vocabulary makes the latter MBs).
    markov_factored: bool = False
    confidence_head: bool = False
    target_fingerprint: str = ""
    target_name: str = ""
    training: dict = field(default_factory=dict)

    def save(self, path: Path) -> None:
        (path / "config.json").write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> DrafterConfig:
        fields = json.loads((path / "config.json").read_text())
        fields.pop("markov_candidates", None)  # retired inference option (a greedy top-k shortcut) of older files
        return cls(**fields)


def default_layer_ids(num_layers: int, n: int = 5) -> list[int]:
    """Spread taps from low to high layers, never the last one (DFlash/DSpark's rule; small models: all but last)."""
    if num_layers - 1 <= n:
        return list(range(max(1, num_layers - 1)))
    return sorted({round(1 + i * (num_layers - 4) / (n - 1)) for i in range(n)})


def target_fingerprint(model) -> str:
    """Identifies the target: its shape plus a sample of its embedding weights (a retrained target differs)."""
    c = model.config
    shape = [c.architecture, c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads]
    w = model.model.embed_tokens.weight.detach()[:64, :64].to(torch.bfloat16).float().cpu()
    h = hashlib.sha256(json.dumps(shape).encode() + w.numpy().tobytes())
    return h.hexdigest()[:16]
