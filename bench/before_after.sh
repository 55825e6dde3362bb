#!/usr/bin/env bash
# Before and after on one card, in one lease: our scoreboard rows for the ops a switch
# changes, timed twice in two processes, first with the switches that put this wave's
# changes out of the way (before), then as shipped (after), and printed side by side. The
# switches (docs/benchmark.md): SOFTMAX_GPU_CE_FORWARD_PATH=0 (the gradient-free
# cross-entropy forward on the gradient's configurations), SOFTMAX_GPU_DIRECT_LAUNCH=0
# (every launch through JITFunction.run: eager times only) and SOFTMAX_GPU_CE_REDUCE_LAUNCH=0
# (the loss kernel with the gradient ends each row on the done-counter's fenced atomic again). The after run also sets
# SOFTMAX_GPU_COOPERATIVE=1 (the softmax forward's and backward's long rows, and cross-entropy's
# with its gradient, read once by cooperative groups of programs; off by default until a run
# like this one has measured it),
# and adds the softmax forward and backward at the long-row shapes. Run it after
# bench/device_check.sh, in the same lease (about 3 minutes on an H100: 52 cases, twice).
#
#   bash bench/before_after.sh [--dry-run] OUT_DIR
#
# --dry-run: the same on CPU (Triton's interpreter, shrunken shapes, one repetition): checks
# the script, measures nothing (tests/test_bench.py runs it).
set -uo pipefail
py="${PYTHON:-python3}"
dry=()
out=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry=(--dry-run --repeats 1) ;;
        -*) echo "before_after.sh: unknown option $arg" >&2; exit 2 ;;
        *) out="$arg" ;;
    esac
done
[ -n "$out" ] || { echo "usage: bash bench/before_after.sh [--dry-run] OUT_DIR" >&2; exit 2; }
cd "$(dirname "$0")/.."
mkdir -p "$out/before" "$out/after" "$out/before_softmax" "$out/after_softmax"
# issue 21's shapes, bfloat16 and float32: the cross-entropy forward without and with the
# gradient, and the softmax forward and backward where their rows loop (wider than their
# 32768- and 16384-wide blocks; the forward's 32000 fits: a check of the noise)
common=(--providers softmax_gpu --dtypes bfloat16 float32 --no-plot)
ce=(--ops ce_fwd ce_fwd_bwd "${common[@]}"
    --shapes 32768x4096 4096x32000 4096x50257 4096x128256 4096x151936 16384x32768 1024x262144 32x128256)
sm=(--ops softmax_fwd softmax_bwd "${common[@]}" --shapes 4096x32000 4096x50257 4096x128256 4096x151936 1024x262144)
limit=200
[ ${#dry[@]} -gt 0 ] && limit=600
before=(env SOFTMAX_GPU_CE_FORWARD_PATH=0 SOFTMAX_GPU_DIRECT_LAUNCH=0 SOFTMAX_GPU_CE_REDUCE_LAUNCH=0
        SOFTMAX_GPU_COOPERATIVE=0)
cooperative=1
# The cooperative kernels' waits had never run on a GPU when this was written: their GPU tests
# at the grid limit first (90 s at most); if they fail or hang, the after run leaves them off.
if [ ${#dry[@]} -eq 0 ]; then
    if ! timeout 90 "$py" -m pytest -q -p no:cacheprovider -o addopts="" tests/ -k "grid_limit_on_gpu" \
            > "$out/cooperative_check.txt" 2>&1; then
        echo "cooperative kernels failed their GPU check ($out/cooperative_check.txt): after runs without them" >&2
        cooperative=0
    fi
fi
echo "$cooperative" > "$out/cooperative_after.txt"
after=(env SOFTMAX_GPU_COOPERATIVE=$cooperative)
"${before[@]}" timeout "$limit" "$py" -m bench "${ce[@]}" "${dry[@]}" --out "$out/before" > "$out/before/bench.txt" 2>&1
before_rc=$?
"${after[@]}" timeout "$limit" "$py" -m bench "${ce[@]}" "${dry[@]}" --out "$out/after" > "$out/after/bench.txt" 2>&1
after_rc=$?
"${before[@]}" timeout "$limit" "$py" -m bench "${sm[@]}" "${dry[@]}" --out "$out/before_softmax" \
    > "$out/before_softmax/bench.txt" 2>&1 || before_rc=$?
"${after[@]}" timeout "$limit" "$py" -m bench "${sm[@]}" "${dry[@]}" --out "$out/after_softmax" \
    > "$out/after_softmax/bench.txt" 2>&1 || after_rc=$?
"$py" - "$out" <<'PY' | tee "$out/before_after.txt"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
runs = {}
for name in ("before", "after"):
    runs[name] = {"meta": {}, "results": []}
    for folder in (name, name + "_softmax"):
        path = out / folder / "scoreboard.json"
        if path.exists():
            run = json.loads(path.read_text())
            runs[name]["meta"] = runs[name]["meta"] or run["meta"]
            runs[name]["results"] += run["results"]
meta = runs["after"]["meta"]
cooperative = (out / "cooperative_after.txt").read_text().strip()
if cooperative != "1":
    cooperative += " (the cooperative kernels failed their GPU check: cooperative_check.txt)"
print(f"{meta.get('card', '?')}, commit {meta.get('commit', '?')}; before: SOFTMAX_GPU_CE_FORWARD_PATH=0 "
      f"SOFTMAX_GPU_DIRECT_LAUNCH=0 SOFTMAX_GPU_CE_REDUCE_LAUNCH=0 SOFTMAX_GPU_COOPERATIVE=0; "
      f"after: SOFTMAX_GPU_COOPERATIVE={cooperative}; "
      f"device and eager time of our rows, median of the repetitions")
if meta.get("dry_run"):
    print(meta.get("warning", "DRY RUN"))
key = lambda r: (r["op"], r["dtype"], r["rows"], r["cols"])  # noqa: E731
before = {key(r): r for r in runs["before"]["results"]}
print(f"{'op':<12}{'dtype':<10}{'shape':>13}{'dev µs before':>15}{'after':>9}{'ratio':>7}"
      f"{'eager µs before':>17}{'after':>9}{'%copy after':>13}  {'path before/after':<22}gate (after)")
for r in runs["after"]["results"]:
    b = before.get(key(r), {})
    def us(row, field):
        value = row.get(field)
        return f"{value * 1e3:.1f}" if isinstance(value, (int, float)) else "-"
    ratio = (f"{b['device_ms'] / r['device_ms']:.2f}x" if isinstance(b.get("device_ms"), (int, float))
             and isinstance(r.get("device_ms"), (int, float)) and r["device_ms"] else "-")
    pct = f"{r['pct_copy']:.1f}" if isinstance(r.get("pct_copy"), (int, float)) else "-"
    print(f"{r['op']:<12}{r['dtype']:<10}{str(r['rows']) + 'x' + str(r['cols']):>13}{us(b, 'device_ms'):>15}"
          f"{us(r, 'device_ms'):>9}{ratio:>7}{us(b, 'eager_ms'):>17}{us(r, 'eager_ms'):>9}{pct:>13}  "
          f"{b.get('path', '-') + '/' + r.get('path', '-'):<22}{r.get('gate', '')}")
PY
echo "before: exit $before_rc, after: exit $after_rc (124: cut by the time limit)"
[ "$before_rc" -eq 0 ] && [ "$after_rc" -eq 0 ]
