"""`dspark train-drafter --recipe`: a drafter's whole training, several phases, as one resumable command.

A recipe (configs/drafters/*.yaml) lists phases; each is one `train_drafter` run that starts from the previous
phase's weights (fresh optimizer and schedule, as `--init-from`). `recipe_state.json` in the output directory
counts the finished phases, and a phase stopped mid-way resumes from its own checkpoint, so re-running the same
command after any stop continues where it was."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

from dspark.engine.drafters import DrafterConfig
from dspark.engine.training.train_drafter import train_drafter


def phase_args(recipe: dict, method: str) -> list[dict]:
    """train_drafter keyword arguments of each phase: common < the method's < the phase's own."""
    if method not in recipe.get("methods", {}):
        raise ValueError(f"the recipe has no method {method!r} (it has {', '.join(recipe.get('methods', {}))})")
    base = {**recipe.get("common", {}), **recipe["methods"][method]}
    return [{**base, **phase} for phase in recipe["phases"]]


def train_recipe(model_dir: str, recipe_path: str | Path, method: str, out: str | Path,
                 stop_after: int | None = None, **overrides) -> dict | None:
    """Run the recipe's phases not yet done. `stop_after` stops the current phase after that many steps (the
    next call resumes it); `overrides` (device, threads, data_cache, ...) apply to every phase. Returns the last
    phase's training record (also when every phase was done before), or None when stopped early."""
    text = Path(recipe_path).read_text()
    phases = phase_args(yaml.safe_load(text), method)
    digest = hashlib.sha256(f"{method}\n{text}".encode()).hexdigest()[:16]
    out = Path(out)
    state_file = out / "recipe_state.json"
    if state_file.exists():
        state = json.loads(state_file.read_text())
        if state["recipe"] != digest:
            raise ValueError(f"{out} holds a run of another recipe or method; choose another --out")
    elif (out / "train_state.pt").exists():
        raise ValueError(f"{out} holds a checkpoint of a run outside this recipe; choose another --out")
    else:
        state = {"recipe": digest, "done": []}
        out.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps(state, indent=1))
    if len(state["done"]) == len(phases):  # nothing left: the saved drafter's record
        return DrafterConfig.load(out).training
    result = None
    for i, kw in enumerate(phases):
        if i < len(state["done"]):
            continue
        print(f"recipe phase {i + 1}/{len(phases)}: {kw}")
        result = train_drafter(model_dir, str(out), method=method, init_from=str(out) if i else None,
                               stop_after=stop_after, **kw, **overrides)
        if result is None:
            return None
        state["done"].append({"steps": kw["steps"], "seconds": result["seconds_this_run"],
                              "final": {k: v for k, v in result["final"].items() if k != "rows"}})
        state_file.write_text(json.dumps(state, indent=1))
    return result
