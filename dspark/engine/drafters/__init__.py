"""Drafters for speculative decoding: one interface, three algorithms (dspark, dflash, eagle3)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dspark.engine.drafters.block import BlockDrafter, Draft
from dspark.engine.drafters.config import METHODS, DrafterConfig, default_layer_ids, target_fingerprint
from dspark.engine.drafters.eagle3 import Eagle3Drafter

__all__ = ["BlockDrafter", "Eagle3Drafter", "Draft", "DrafterConfig", "build_drafter", "load_drafter", "save_drafter",
           "default_layer_ids", "target_fingerprint", "METHODS"]


def build_drafter(cfg: DrafterConfig, target) -> BlockDrafter | Eagle3Drafter:
    if cfg.method == "eagle3":
        drafter = Eagle3Drafter(cfg, target.config)
        drafter.attach_target(target)
        return drafter
    if cfg.method not in ("dspark", "dflash"):
        raise ValueError(f"unknown drafter method {cfg.method!r} (have: {', '.join(METHODS)})")
    drafter = BlockDrafter(cfg, target.config)
    drafter.attach_target(target)
    return drafter


def save_drafter(drafter: BlockDrafter, path: str | Path) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    drafter.cfg.save(path)
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in drafter.state_dict().items()}
    state["conf_temperature"] = drafter.conf_temperature.float()  # calibration stays exact
    save_file(state, str(path / "model.safetensors"))


def load_drafter(path: str | Path, target, dtype: torch.dtype = torch.float32, device: str = "cpu") -> BlockDrafter:
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no drafter at {path} (expected config.json + model.safetensors)")
    cfg = DrafterConfig.load(path)
    fp = target_fingerprint(target)
    if cfg.target_fingerprint != fp:
        raise ValueError(f"drafter {path} was trained for target {cfg.target_name!r} (fingerprint "
                         f"{cfg.target_fingerprint}), not for the loaded model (fingerprint {fp})")
    drafter = build_drafter(cfg, target)
    state = load_file(str(path / "model.safetensors"), device=device)
    drafter.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    return drafter.to(device=device, dtype=dtype).eval()
