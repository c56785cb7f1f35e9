#!/usr/bin/env bash
# One GPU check of the triton backend, under 10 minutes on an H100/H200:
#   1. the gpu-marked tests (bf16 on CUDA, > 65,535-program grids, ...) and the triton tests on CUDA;
#   2. the kernels' timings (fp16, bf16, fp32 models; head dims 32 and 64; full and panel cells; plain vs
#      profiled 12-layer encoder forward) -> benches/results/gpu.json.
# Usage: bash benches/gpu_check.sh [extra args for benches/gpu_check.py, e.g. --quick]
set -uo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: no CUDA GPU here; nothing to run (python benches/gpu_check.py --dry-run shows the plan)" >&2
    exit 2
fi
export TRITON_DEFAULT_FP_FUSION=1
mkdir -p benches/results
status=0
echo "== gpu tests"
timeout 240 python -m pytest -q -x -m gpu tests/test_triton.py tests/test_triton_precision.py \
    tests/test_triton_deterministic.py 2>&1 | tail -n 20 || status=1
echo "== triton timings -> benches/results/gpu.json"
timeout 420 python benches/gpu_check.py --budget 360 "$@" || status=1
exit $status
