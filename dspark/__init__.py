"""dspark: an OpenAI-compatible LLM server with DSpark speculative decoding.

The one import root of the project; its parts are `dspark.server` (HTTP API and CLI), `dspark.engine` (model,
KV cache, drafters, the step), `dspark.scheduler`, `dspark.kernels` (attention backends) and `dspark.loadtest`.
"""

import os

__version__ = "0.1.0"

# torch's CPU allocator backs blocks of 2 MB and more with transparent huge pages (torch reads this once, before
# its first allocation, so it is set before anything here imports torch; THP_MEM_ALLOC_ENABLE=0 turns it off).
# Otherwise glibc maps each large block afresh and unmaps it on free, so a step's 50 MB of logits (64 requests x
# 4 rows x 49,152 float32) is faulted in again 4 KiB at a time every step: 12,289 faults, 13.5 ms for one fill
# against 2.9 ms with huge pages, on a 2-core EPYC (AVX512-BF16) with torch 2.13; resident memory after start-up
# measured the same either way. Spawned engine-core processes inherit it.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
