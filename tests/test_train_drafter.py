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
    kw = dict(method=method, steps=4, batch=2, anchors=4, data_cache=data_cache, seed=3)
    train_drafter(str(TEST_MODEL), str(tmp_path / "a"), **kw)
    train_drafter(str(TEST_MODEL), str(tmp_path / "b"), **kw)
    assert train_drafter(str(TEST_MODEL), str(tmp_path / "c"), stop_after=2, **kw) is None
    assert (tmp_path / "c" / "train_state.pt").exists()
    train_drafter(str(TEST_MODEL), str(tmp_path / "c"), **kw)  # resumes at step 2
    assert not (tmp_path / "c" / "train_state.pt").exists()
    a, b, c = (load_file(str(tmp_path / x / "model.safetensors")) for x in "abc")
    for k in a:
        assert a[k].equal(b[k]), f"not deterministic: {k}"
        assert a[k].equal(c[k]), f"resume diverged: {k}"
    d = load_drafter(tmp_path / "a", load_model(TEST_MODEL))
    assert d.cfg.method == method and d.cfg.training["steps"] == 4
