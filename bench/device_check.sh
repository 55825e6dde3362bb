#!/usr/bin/env bash
# GPU check: on a machine with a CUDA GPU where torch, triton (and optionally cupy) are already
# installed and nothing can be downloaded, run the GPU tests and `python -m bench --quick`,
# and write the logs, results and plots to a folder.
#
#   bash bench/device_check.sh [OUT_DIR]      (default: $OUT if set, else bench/results)
#
# Nothing is installed: the package is staged on PYTHONPATH (softmax_gpu/ with kernels/ placed
# at softmax_gpu/kernels, as an install would). Budget: under 8 minutes (320 s of tests, 150 s of
# benchmark, each cut by timeout).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-bench/results}}"
mkdir -p "$out"
stage="$(mktemp -d)"
cp -r softmax_gpu "$stage/"
cp -r kernels "$stage/softmax_gpu/kernels"
export PYTHONPATH="$stage:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET

{
    echo "== $(date -u +%FT%TZ)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
    python -c "import cupy; print('cupy', cupy.__version__)" 2>/dev/null || echo "cupy: not installed"
} 2>&1 | tee "$out/device_info.txt"

status=0
# 1. The test suite on the GPU: Triton ops, cross-entropy, CuPy kernels (interpreter-only tests skip).
timeout 320 python -m pytest -q --maxfail=25 -p no:cacheprovider tests/ 2>&1 | tee "$out/gpu_tests.txt" | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

# 2. The quick benchmark, with results and plots written to $out.
timeout 150 python -m bench --quick --out "$out" 2>&1 | tee "$out/bench_quick.txt" | tail -60
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

rm -rf "$stage"
echo "device check finished with status $status; files in $out"
exit "$status"
