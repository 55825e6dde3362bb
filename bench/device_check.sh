#!/usr/bin/env bash
# GPU check: on a machine with a CUDA GPU where torch, triton (and optionally cupy) are already
# installed and nothing can be downloaded, run the test suite on the GPU, the memcheck
# selection under compute-sanitizer, and `python -m bench --quick`; write logs, results and
# plots to a folder.
#
#   bash bench/device_check.sh [--dry-run] [OUT_DIR]   (default: $OUT if set, else bench/results;
#                                                      with --dry-run a new temporary folder)
#
# --dry-run does the same staging on a machine without a GPU and runs what can run there: a
# small interpreter test selection and `python -m bench --dry-run --quick` instead of the GPU
# sweep (tests/test_bench.py runs it, so this script has run before a GPU ever sees it).
#
# Nothing is installed: the checkout is staged in a temporary folder laid out as an install
# would (kernels/ also at softmax_gpu/kernels), and everything runs from there with the stage
# first on PYTHONPATH, so `import softmax_gpu` can only find the staged package (checked
# below). Budget, each step cut by timeout: tests 240 s (pytest-xdist over 8 workers where it
# is installed: compiling dominates), compute-sanitizer 90 s, benchmark 180 s; about 8.5
# minutes at most.
set -uo pipefail
py="${PYTHON:-python3}"  # the GPU image has python3 (with torch), not always python
dry_run=0
out=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry_run=1 ;;
        -*) echo "device_check.sh: unknown option $arg" >&2; exit 2 ;;
        *) out="$arg" ;;
    esac
done
cd "$(dirname "$0")/.."
if [ -z "$out" ]; then
    if [ "$dry_run" -eq 1 ]; then
        out="$(mktemp -d -t softmax-gpu-dry-run-XXXXXX)"  # dry runs never land in bench/results/
    else
        out="${OUT:-bench/results}"
    fi
fi
mkdir -p "$out"
out="$(cd "$out" && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
stage="$tmp/softmax-gpu"
mkdir -p "$stage"
cp -r softmax_gpu kernels bench tests examples pyproject.toml README.md Dockerfile "$stage/"
cp -r kernels "$stage/softmax_gpu/kernels"
cd "$stage"
export PYTHONPATH="$stage${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION=1
export SOFTMAX_GPU_TEST_SEED="${SOFTMAX_GPU_TEST_SEED:-$RANDOM}"
if [ "$dry_run" -eq 1 ]; then
    export TRITON_INTERPRET=1
else
    unset TRITON_INTERPRET
fi
if ! "$py" -c "import softmax_gpu.kernels, sys; sys.exit(not softmax_gpu.kernels.__file__.startswith('$stage/'))"; then
    echo "softmax_gpu.kernels does not import from the stage $stage: refusing to test another copy" >&2
    exit 2
fi

{
    echo "== $(date -u +%FT%TZ) device_check$([ "$dry_run" -eq 1 ] && echo ' --dry-run (CPU: nothing here is a GPU measurement)')"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader 2>/dev/null \
        || echo "nvidia-smi: not available"
    "$py" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
    "$py" -c "import softmax_gpu.kernels; print('softmax_gpu.kernels from', softmax_gpu.kernels.__file__)"
    "$py" -c "import cupy; print('cupy', cupy.__version__)" 2>/dev/null || echo "cupy: not installed"
    echo "SOFTMAX_GPU_TEST_SEED=$SOFTMAX_GPU_TEST_SEED"
} 2>&1 | tee "$out/device_info.txt"

status=0
pytest_args=(-q -p no:cacheprovider)
# 1. The test suite (on the GPU: every Triton, cross-entropy and CuPy test; interpreter-only ones skip).
if [ "$dry_run" -eq 1 ]; then
    tests=(tests/test_softmax.py -k "seed_examples or hardmax")
else
    tests=(tests/ --maxfail=25)
    if "$py" -c "import xdist" 2>/dev/null; then
        tests+=(-n 8)
    fi
fi
timeout 240 "$py" -m pytest "${pytest_args[@]}" "${tests[@]}" 2>&1 | tee "$out/gpu_tests.txt" | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

# 2. compute-sanitizer memcheck over the tests that reach the edges: offsets past 2**31 and
#    2**32 elements, out-of-range class indices, real vocabularies, the CuPy kernels. torch's
#    caching allocator is switched off so every tensor is its own allocation and an access past
#    its end is caught (CuPy's pool still sub-allocates).
sanitizer="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)"
if [ "$dry_run" -eq 1 ]; then
    echo "compute-sanitizer: skipped in a dry run (no GPU)" | tee "$out/memcheck.txt"
elif [ -z "$sanitizer" ]; then
    echo "compute-sanitizer: not found" | tee "$out/memcheck.txt"
    status=1
else
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 90 "$sanitizer" --tool memcheck --error-exitcode 3 \
        "$py" -m pytest "${pytest_args[@]}" tests/ -k "cuda_offsets or cuda_bad_class or cuda_real_vocab or test_gpu_" \
        2>&1 | tee "$out/memcheck.txt" | tail -15
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

# 3. The quick benchmark (on CPU: the dry run of the same sweep), results and plots written to $out.
if [ "$dry_run" -eq 1 ]; then
    bench=(--dry-run --quick)
else
    bench=(--quick)
fi
timeout 180 "$py" -m bench "${bench[@]}" --out "$out" 2>&1 | tee "$out/bench_quick.txt" | tail -60
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "device check finished with status $status; files in $out"
exit "$status"
