#!/usr/bin/env bash
# The CUDA-graph figures (issues 14/15) on a GPU host, as the extra command of ../shared/gpu/check.sh (which sets
# PYTHONPATH to the carried wheels):   bash .gpu/check.sh bash loadtest/gpu_figures.sh
# Each run writes its table into docs/benchmarks.md, which check.sh copies back beside its log. About 3-4 minutes
# once check.sh's own runs have JIT-compiled FlashInfer for head_dim 128.
set -u
sps() {
  echo "--- bench --sps qwen3-8b $*"
  timeout 110 python3 -m server.cli bench --sps qwen3-8b --device cuda --dtype bfloat16 --attention-backend flashinfer \
    --write docs/benchmarks.md "$@" 2>&1 | grep -v -i warn | tail -10
}
sps --cuda-graphs on
sps --cuda-graphs off
sps --cuda-graphs on --sps-draft 0   # plain decoding: at 1 request, steps/s is the per-user tokens/s
sps --cuda-graphs on --sps-context 4096
sps --cuda-graphs off --sps-context 4096
