"""The package installs beside anything: one import root (`dspark`), nothing importable by a generic name, and
Hugging Face's `kernels` (which transformers imports) and transformers' model configs import in the same process
as ours, from a checkout and from a wheel installed without -e."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest
from conftest import REPO, TEST_MODEL, wait_for

from dspark.loadtest.sweep import answers_ok, free_port


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built from this checkout with the locked setuptools (no network, no isolation)."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(REPO)], check=True, cwd=out)
    (whl,) = out.glob("dspark-*.whl")
    return whl


def test_wheel_has_one_top_level_import_name(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"dspark"}, f"the wheel installs {sorted(tops)} into site-packages"
    (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")] or [None]
    if top_level:
        assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["dspark"]
    for part in ("server", "engine", "scheduler", "kernels", "loadtest"):
        assert f"dspark/{part}/__init__.py" in names, f"dspark.{part} is not in the wheel"
    entry = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "dspark = dspark.cli:main" in zipfile.ZipFile(wheel).read(entry[0]).decode()


def test_no_generic_import_name_at_the_top_of_the_checkout():
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")}
    modules = {p.stem for p in REPO.glob("*.py")}
    assert packages | modules == {"dspark"}, f"importable from the repository's root: {sorted(packages | modules)}"


IMPORT_BOTH = """
import kernels, transformers
from transformers import LlamaConfig, Qwen2Config, Qwen3Config, MistralConfig
from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
import dspark, dspark.kernels.torch_backend, dspark.engine.model, dspark.server.app
assert hasattr(kernels, "CUDAProperties"), kernels.__file__  # Hugging Face's, the name transformers imports
print(dspark.__file__)
print(kernels.__file__)
"""


def test_hf_kernels_and_transformers_import_beside_dspark_from_the_checkout():
    """Run from the repository's root, where the current directory comes first on sys.path: the shadowing case."""
    out = subprocess.run([sys.executable, "-c", IMPORT_BOTH], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    ours, theirs = out.stdout.split()
    assert Path(ours).is_relative_to(REPO / "dspark")
    assert "site-packages" in Path(theirs).parts, theirs  # the installed distribution, not a folder of ours


def test_wheel_installed_without_e_serves_beside_hf_kernels(wheel, tmp_path):
    """`pip install` of the wheel (not editable) into an environment that has transformers and Hugging Face's
    kernels: both import from there, and its `dspark serve` answers. The install goes to a folder of its own that
    comes first on sys.path, and everything runs outside the checkout, so nothing is read from it but the model."""
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True)
    env = {**os.environ, "PYTHONPATH": str(site), "DSPARK_MODEL": str(TEST_MODEL), "DSPARK_DTYPE": "float32"}
    out = subprocess.run([sys.executable, "-c", IMPORT_BOTH], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    ours, theirs = out.stdout.split()
    assert Path(ours).is_relative_to(site), f"dspark came from {ours}, not the wheel"
    assert "site-packages" in Path(theirs).parts, theirs

    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([str(site / "bin" / "dspark"), "serve", "--port", str(port), "--speculative", "none"],
                                cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        up = wait_for(lambda: proc.poll() is not None or answers_ok(f"{base}/health"), timeout=120)
        assert up and proc.poll() is None, log.read_text()
        assert httpx.get(f"{base}/v1/models").json()["data"][0]["id"] == "tiny-qwen3-5m"
        r = httpx.post(f"{base}/v1/completions", json={"model": "tiny-qwen3-5m", "prompt": "def add(a, b):",
                                                       "max_tokens": 8, "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] > 0
    finally:
        proc.terminate()
        proc.wait(timeout=60)
