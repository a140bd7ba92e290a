import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from engine.settings import DEFAULT_MODEL

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = Path(os.environ.get("DSPARK_TEST_MODEL", DEFAULT_MODEL))


@pytest.fixture(scope="session")
def model_dir() -> Path:
    assert (MODEL_DIR / "config.json").exists(), f"no model at {MODEL_DIR}"
    return MODEL_DIR


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model: Path, *flags: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = model.name
        self.model_dir = model
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "server.cli", "serve", "--model", str(model), "--port", str(self.port),
               "--log-level", "warning", *flags]
        self.log = open(REPO / ".pytest_cache" / f"server-{self.port}.log", "w") if (REPO / ".pytest_cache").exists() \
            else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError("server did not become healthy")

    def metric(self, name: str) -> float:
        """Value of a sample; `name` may include its labels, e.g. 'x_total{drafter="dspark"}'."""
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith(name + " ") or ("{" not in name and line.startswith(name + "{")):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="session")
def server(model_dir):
    (REPO / ".pytest_cache").mkdir(exist_ok=True)
    s = ServerProcess(model_dir, "--max-num-batched-tokens", "256", "--speculative", "none")
    yield s
    s.stop()
