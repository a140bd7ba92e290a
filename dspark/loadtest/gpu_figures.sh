#!/usr/bin/env bash
# The CUDA-graph figures (issues 14/15) on the offline GPU host, after ../shared/gpu/check.sh has installed the
# carried wheels into /tmp/site. One `run` call from the project root:
#   bash .gpu/check.sh; bash dspark/loadtest/gpu_figures.sh
# Each bench writes its table into docs/benchmarks.md, copied to $OUT at the end (most important first, so a cut
# leaves the main tables). About 3-4 minutes once check.sh has JIT-compiled FlashInfer for head_dim 128.
set -u
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
sps() {
  echo "--- $(date +%T) bench --sps qwen3-8b $*"
  timeout 150 python3 -m dspark bench --sps qwen3-8b --device cuda --dtype bfloat16 --attention-backend flashinfer \
    --write docs/benchmarks.md "$@" 2>&1 | grep -v -i warn | tail -10
  cp docs/benchmarks.md "${OUT:-/tmp}/benchmarks.md" 2>/dev/null
}
{
sps --cuda-graphs on
sps --cuda-graphs off
sps --cuda-graphs on --sps-draft 0   # plain decoding: at 1 request, steps/s is the per-user tokens/s
sps --cuda-graphs on --sps-context 4096
sps --cuda-graphs off --sps-context 4096
} 2>&1 | tee -a "${OUT:-/tmp}/figures.txt"
