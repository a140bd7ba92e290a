"""Drafter training: deterministic under a seed, and a stopped run resumes exactly where it left off."""

import pytest
from conftest import TEST_MODEL
from safetensors.torch import load_file

from engine.drafters import load_drafter
from engine.model import load_model
from engine.training.train_drafter import generate_data, train_drafter


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    import torch

    path = tmp_path_factory.mktemp("data") / "data.pt"
    torch.save(generate_data(str(TEST_MODEL), n=12, max_new=32, seed=0), path)
    return str(path)


@pytest.mark.parametrize("method", ["dspark", "eagle3"])
def test_deterministic_and_resumable(method, data_cache, tmp_path):
    """Same seed, same weights; training moves them; a stopped run resumes at its step with its data position,
    optimizer and schedule, so it ends where the uninterrupted run did (a fresh run would too, so the resumed
    run's own first step and batches are asserted, not only its result)."""
    import json

    import torch

    kw = dict(method=method, steps=4, batch=2, anchors=4, data_cache=data_cache, seed=3, log_every=1)
    assert train_drafter(str(TEST_MODEL), str(tmp_path / "a"), **kw)["first_step_this_run"] == 0
    train_drafter(str(TEST_MODEL), str(tmp_path / "b"), **kw)
    assert train_drafter(str(TEST_MODEL), str(tmp_path / "c"), stop_after=2, **kw) is None
    ckpt = torch.load(tmp_path / "c" / "train_state.pt")
    assert ckpt["step"] == 2 and [e["step"] for e in ckpt["log"]] == [0, 1]
    resumed = train_drafter(str(TEST_MODEL), str(tmp_path / "c"), **kw)
    assert resumed["first_step_this_run"] == 2, "did not resume from the checkpoint"
    assert not (tmp_path / "c" / "train_state.pt").exists()
    logs = [json.loads((tmp_path / x / "training_log.json").read_text()) for x in "ac"]
    assert [(e["step"], e["rows"]) for e in logs[1]] == [(e["step"], e["rows"]) for e in logs[0]], "data position"
    a, b, c = (load_file(str(tmp_path / x / "model.safetensors")) for x in "abc")
    for k in a:
        assert a[k].equal(b[k]), f"not deterministic: {k}"
        assert a[k].equal(c[k]), f"resume diverged: {k}"
    # the two steps after the checkpoint moved every trained weight (saved in bf16: compare at that precision)
    at_ckpt = {k: v.to(a[k].dtype) for k, v in ckpt["drafter"].items() if k in a}
    moved = [k for k in at_ckpt if a[k].is_floating_point() and not a[k].equal(at_ckpt[k])]
    trained = [k for k in at_ckpt if a[k].is_floating_point() and "conf_temperature" not in k]
    assert len(moved) >= 0.9 * len(trained), f"weights did not move: {sorted(set(trained) - set(moved))}"
    d = load_drafter(tmp_path / "a", load_model(TEST_MODEL))
    assert d.cfg.method == method and d.cfg.training["steps"] == 4
