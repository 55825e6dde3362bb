#!/usr/bin/env bash
# One command for a whole GPU run: on a machine with a CUDA GPU where torch and triton (and
# optionally cupy) are installed and nothing can be downloaded, run the test suite on the GPU
# and compute-sanitizer's memcheck over the edge tests (side by side), then the quick
# scoreboard with every provider and the linear cross-entropy scoreboard, and print a short
# summary. Each step is cut by `timeout` (the cooperative kernels' tests 90 s, the other tests
# 190 s beside memcheck, scoreboard 170 s, linear cross-entropy 120 s (both modes with cuBLAS's
# and with the Triton logits), token log-probabilities 70 s, the Hugging Face step 60 s), so
# it ends inside 12 minutes (on an H200, 2026-12-04,
# with the first three steps only: 359 s, the tests cut at 150 s, 98% done).
#
#   bash bench/device_check.sh [--dry-run] [OUT_DIR]
#
# OUT_DIR: default $OUT if set, else bench/results/<card>_<date>/ (a dry run: a new temporary
# folder, never bench/results/). Peers' wheels gathered beforehand by bench/fetch_wheels.sh
# into .whl/ (and .whl2/) are installed first (nothing is downloaded here). QuACK's CUTLASS
# libraries are too big for one carry: a first call on the device machine runs
# `bash .whl/install.sh` with .whl/ carried, a second (within the machine's idle window)
# carries .whl2/ and runs this script, which finishes the install.
#
# --dry-run does the same staging on a machine without a GPU and runs what can run there: a
# small interpreter test selection, and the two scoreboards' dry runs (tests/test_bench.py
# runs it, so this script has run before a GPU ever sees it).
#
# The checkout is staged in a temporary folder laid out as an install would be (kernels/ also
# at softmax_gpu/kernels), and everything runs from there with the stage first on PYTHONPATH,
# so `import softmax_gpu` can only find the staged package (checked below). The commit
# measured is recorded before staging.
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
started=$SECONDS
if [ -z "$out" ]; then
    if [ "$dry_run" -eq 1 ]; then
        out="$(mktemp -d -t softmax-gpu-dry-run-XXXXXX)"  # dry runs never land in bench/results/
    elif [ -n "${OUT:-}" ]; then
        out="$OUT"
    else
        card="$("$py" -c 'import re, torch; print(re.sub("[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-"))' 2>/dev/null)"
        out="bench/results/${card:-unknown-card}_$(date +%F)"
    fi
fi
mkdir -p "$out"
out="$(cd "$out" && pwd)"
export SOFTMAX_GPU_COMMIT="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
export SOFTMAX_GPU_DIRTY="$([ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && echo 1 || echo 0)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
stage="$tmp/softmax-gpu"
mkdir -p "$stage"
cp -r softmax_gpu kernels bench tests examples pyproject.toml README.md Dockerfile "$stage/"
cp -r kernels "$stage/softmax_gpu/kernels"
# Peers' wheels carried in .whl/ (or, for QuACK's second half, .whl2/): bench/fetch_wheels.sh.
for carried in .whl2 .whl; do
    if [ "$dry_run" -eq 0 ] && [ -f "$carried/install.sh" ]; then
        eval "$(bash "$carried/install.sh" 2>"$out/peers_install.txt")" || echo "peer wheels: install failed (see peers_install.txt)"
        break
    fi
done
cd "$stage"
export PYTHONPATH="$stage${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION=1
export SOFTMAX_GPU_TEST_SEED="${SOFTMAX_GPU_TEST_SEED:-$RANDOM}"
export PYTHONUNBUFFERED=1
if [ "$dry_run" -eq 1 ]; then
    export TRITON_INTERPRET=1
else
    unset TRITON_INTERPRET
fi
if ! "$py" -c "import softmax_gpu.kernels, sys; sys.exit(not list(softmax_gpu.kernels.__path__)[0].startswith('$stage/'))"; then
    echo "softmax_gpu.kernels does not import from the stage $stage: refusing to test another copy" >&2
    exit 2
fi

{
    echo "== $(date -u +%FT%TZ) device_check$([ "$dry_run" -eq 1 ] && echo ' --dry-run (CPU: nothing here is a GPU measurement)')"
    echo "commit $SOFTMAX_GPU_COMMIT$([ "$SOFTMAX_GPU_DIRTY" = 1 ] && echo ' (with uncommitted changes)')"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader 2>/dev/null \
        || echo "nvidia-smi: not available"
    "$py" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
    "$py" -c "import softmax_gpu.kernels; print('softmax_gpu.kernels from', list(softmax_gpu.kernels.__path__)[0])"
    for mod in cupy liger_kernel quack cut_cross_entropy; do
        "$py" -c "import importlib.metadata as m, $mod; print('$mod', getattr($mod, '__version__', '') or 'importable')" 2>/dev/null \
            || echo "$mod: not importable"
    done
    echo "SOFTMAX_GPU_TEST_SEED=$SOFTMAX_GPU_TEST_SEED"
} 2>&1 | tee "$out/device_info.txt"

# 1. The test suite (on the GPU: every Triton, cross-entropy and CuPy test; interpreter-only
#    ones skip) and, beside it, compute-sanitizer memcheck over the tests that reach the edges
#    (offsets past 2**31 and 2**32 elements, out-of-range class indices, real vocabularies, the
#    CuPy kernels) with torch's caching allocator off, so every tensor is its own allocation
#    and an access past its end is caught (CuPy's pool still sub-allocates). Both are
#    correctness checks, so they may share the card; nothing is timed while they run.
pytest_args=(-p no:cacheprovider -o addopts="" -rfE --tb=short)
sanitizer="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)"
# 0. The cooperative kernels first, alone, in 90 s at most (on every core: most of it is
#    compiling): their programs wait on each other, and no GPU had run them when this step was
#    written; a wait that never ends costs this step, not the test suite's (which deselects them).
workers=()
"$py" -c "import xdist" 2>/dev/null && workers=(-n "$(nproc)")
if [ "$dry_run" -eq 1 ]; then
    echo "cooperative tests: skipped in a dry run (no GPU)" > "$out/gpu_cooperative_tests.txt"
    coop_rc=0
else
    timeout 90 "$py" -m pytest -q "${pytest_args[@]}" tests/ -k cooperative "${workers[@]}" \
        > "$out/gpu_cooperative_tests.txt" 2>&1
    coop_rc=$?
fi
tail -1 "$out/gpu_cooperative_tests.txt"
if [ "$dry_run" -eq 1 ]; then
    timeout 300 "$py" -m pytest -q "${pytest_args[@]}" tests/test_softmax.py -k "seed_examples or hardmax" > "$out/gpu_tests.txt" 2>&1
    tests_rc=$?
    echo "compute-sanitizer: skipped in a dry run (no GPU)" > "$out/memcheck.txt"
    memcheck_rc=0
else
    timeout 190 "$py" -m pytest -v "${pytest_args[@]}" tests/ -k "not cooperative" --maxfail=40 "${workers[@]}" \
        > "$out/gpu_tests.txt" 2>&1 &
    tests_pid=$!
    # Meanwhile, fill torch.compile's and Triton's caches on disk for the scoreboard's cases.
    timeout 190 "$py" -m bench --quick --compile-only > "$tmp/compile_only.txt" 2>&1 &
    compile_pid=$!
    if [ -z "$sanitizer" ]; then
        echo "compute-sanitizer: not found" > "$out/memcheck.txt"
        memcheck_rc=1
    else
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 140 "$sanitizer" --tool memcheck --error-exitcode 3 \
            "$py" -m pytest -q "${pytest_args[@]}" tests/ -k "cuda_offsets or cuda_bad_class or cuda_real_vocab or test_gpu_" \
            > "$out/memcheck.txt" 2>&1
        memcheck_rc=$?
    fi
    wait "$tests_pid"
    tests_rc=$?
    wait "$compile_pid"
    tail -1 "$tmp/compile_only.txt"
fi
tail -3 "$out/gpu_tests.txt"
tail -2 "$out/memcheck.txt"

# 2. The quick scoreboard: every provider, bfloat16 and float32, device and eager times.
bench=(--quick --out "$out")
[ "$dry_run" -eq 1 ] && bench=(--dry-run "${bench[@]}")
timeout 170 "$py" -m bench "${bench[@]}" > "$out/bench.txt" 2>&1
bench_rc=$?

# 3. The linear cross-entropy scoreboard (logits spread like a trained model's).
linear=(--quick --out "$out")
[ "$dry_run" -eq 1 ] && linear=(--dry-run "${linear[@]}")
timeout 120 "$py" -m bench.linear_ce "${linear[@]}" > "$out/linear_ce.txt" 2>&1
linear_rc=$?

# 4. The token log-probability scoreboard (one RL shape, and the linear form at a Llama-3-8B head).
logprobs=(--quick --out "$out")
logprobs_limit=70
if [ "$dry_run" -eq 1 ]; then logprobs=(--dry-run --repeats 1 "${logprobs[@]}"); logprobs_limit=150; fi
timeout "$logprobs_limit" "$py" -m bench.logprobs "${logprobs[@]}" > "$out/logprobs.txt" 2>&1
logprobs_rc=$?

# 5. One line in a Hugging Face script: examples/hf_trainer.py at a Llama-3 vocabulary, both
#    loss curves and each step's peak memory (GPU only: the test suite runs it tiny on CPU).
hf_rc=0
if [ "$dry_run" -eq 0 ]; then
    if "$py" -c "import transformers, accelerate" 2>/dev/null; then
        timeout 60 "$py" examples/hf_trainer.py --steps 4 --batch 4 --seq 1024 --vocab 128256 --hidden 256 \
            > "$out/hf_trainer.txt" 2>&1
        hf_rc=$?
    else
        echo "transformers or accelerate: not importable" > "$out/hf_trainer.txt"
    fi
fi

# 6. The summary: what passed, the headline ratios.
"$py" -m bench.summary "$out" --rc cooperative=$coop_rc tests=$tests_rc memcheck=$memcheck_rc bench=$bench_rc linear_ce=$linear_rc \
    logprobs=$logprobs_rc hf_trainer=$hf_rc \
    --seconds $((SECONDS - started)) 2>&1 | tee "$out/summary.txt"
exit "${PIPESTATUS[0]}"
