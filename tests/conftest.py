import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from dspark.loadtest.sweep import Server, scrape

REPO = Path(__file__).resolve().parents[1]
# The tests' fast fixture: a 5M-parameter model trained here (the server's default is SmolLM2-135M-Instruct,
# which tests/test_real_model.py covers). Settings() in tests and the servers they start use it.
TEST_MODEL = REPO / "models" / "tiny-qwen3-5m"
MODEL_DIR = Path(os.environ.get("DSPARK_TEST_MODEL", TEST_MODEL))
os.environ["DSPARK_MODEL"] = str(MODEL_DIR)
os.environ["DSPARK_DTYPE"] = "float32"  # the servers tests start compare with in-process fp32 engines


# .ci/run sets this: a tool a test needs (nginx, Prometheus, kubectl, hadolint) that is missing fails the test
# instead of skipping it, so a green CI run has really run them.
REQUIRE_TOOLS = os.environ.get("DSPARK_REQUIRE_TOOLS") == "1"


def needs_tool(path: str | Path | None, reason: str):
    """skipif the tool is missing; under DSPARK_REQUIRE_TOOLS=1 the test runs anyway and fails on it."""
    missing = path is None or not Path(path).exists()
    return pytest.mark.skipif(missing and not REQUIRE_TOOLS, reason=reason)


def venv_tool(name: str) -> str | None:
    """A command from this interpreter's environment (the test extra's wheels) first, then PATH."""
    return shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


def wait_for(pred, timeout=10.0) -> bool:
    """Poll `pred` until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="session")
def model_dir() -> Path:
    assert (MODEL_DIR / "config.json").exists(), f"no model at {MODEL_DIR}"
    return MODEL_DIR


class ServerProcess(Server):
    """`dspark serve --model <model> <flags>` for a test; its log goes to .pytest_cache/server-<port>.log."""

    def __init__(self, model: Path, *flags: str):
        self.name = model.name
        self.model_dir = model
        logs = REPO / ".pytest_cache"
        # a short drain by default, so stopping a server with a stream still open costs no test 30 s
        super().__init__(["--model", str(model), "--drain-grace-s", "5", *flags], logs if logs.exists() else None,
                         ready_timeout=120)

    def metric(self, name: str, default: float | None = None) -> float:
        """Value of a sample; `name` may include its labels, e.g. 'x_total{drafter="dspark"}'. A labelled child
        not created yet (no request has reached it) reads as `default` when one is given."""
        for key, value in scrape(self.url).items():
            if key == name or ("{" not in name and key.startswith(name + "{")):
                return value
        if default is not None:
            return default
        raise KeyError(name)


@pytest.fixture(scope="session")
def server(model_dir):
    (REPO / ".pytest_cache").mkdir(exist_ok=True)
    s = ServerProcess(model_dir, "--max-num-batched-tokens", "256", "--speculative", "none")
    yield s
    s.stop()


def cheap_drafting(eng) -> None:
    """Make the adaptive policy draft under any load: drafting free, verification cost growing with B, so the
    lengths it verifies vary with the confidences (the scheduler's rule runs, not a fixed length)."""
    eng.cost.draft.seconds = [0.0] * len(eng.cost.draft.points)
    eng.cost.verify.seconds = [1.0 + 0.002 * b for b in eng.cost.verify.points]
    eng.cost.verify.alpha = eng.cost.draft.alpha = 0.0  # keep these numbers: no online refresh


def processes_under(pid: int, marker: bytes, any_depth: bool = False) -> list[int]:
    """Processes whose command line holds `marker`, among `pid`'s children (with any_depth, its descendants)."""
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
                cmd = (stat.parent / "cmdline").read_bytes()
            except (OSError, ValueError, IndexError):
                continue
            if ppid == parent:
                if any_depth:
                    todo.append(int(stat.parent.name))
                if marker in cmd:
                    out.append(int(stat.parent.name))
    return out


def spawned_children(pid: int) -> list[int]:
    """The processes multiprocessing's spawn started for this one."""
    return processes_under(pid, b"spawn_main")
