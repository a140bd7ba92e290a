"""A large block freed by one step and allocated again by the next is not faulted in 4 KiB at a time: importing
dspark turns on torch's transparent-huge-page allocation (THP_MEM_ALLOC_ENABLE) unless the user set it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import resource, dspark, torch, os
def step():  # a step's logits at 64 requests x 4 rows (50 MB) and their softmax, freed at its end
    logits = torch.empty(256, 49152).fill_(1.0)
    return torch.softmax(logits, -1)[:, 0].sum()
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(os.environ["THP_MEM_ALLOC_ENABLE"], (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def faults_per_step(env: dict) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                         env=env)
    assert out.returncode == 0, out.stderr
    flag, faults = out.stdout.split()[-2:]
    return flag, float(faults)


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(), reason="the kernel has no transparent huge pages")
def test_a_steps_large_temporaries_fault_in_huge_pages():
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    flag, on = faults_per_step(env)
    assert flag == "1"
    kept, off = faults_per_step({**env, "THP_MEM_ALLOC_ENABLE": "0"})
    assert kept == "0"  # the user's choice stands
    assert off > 10000  # 2 x 50 MB in 4 KiB pages (24,578 here)
    assert on < off / 10  # 2 MB pages (about 1,100 here: 2 x 25 huge pages, plus what the rest touches)
