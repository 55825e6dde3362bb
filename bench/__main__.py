"""python -m bench: softmax_gpu against torch eager, torch.compile, Liger-Kernel, QuACK (and
CuPy) on this machine's GPU, against the copy-bandwidth ceiling.

With no CUDA GPU it says so and prints the CPU report instead (exact bytes per element from
Triton's interpreter, and the sm_90 compile report), then exits 0.

`--dry-run` runs the GPU sweep itself on the CPU: the same code top to bottom, with the
kernels in Triton's interpreter on shrunken shapes and CPU stand-ins for the timers and the
copy probe (bench.gpu.dry_run_platform). It proves the sweep, the providers and the result
files work before a GPU is spent on them; none of its figures is a GPU measurement.

    python -m bench [--quick] [--dry-run] [--ops ...] [--dtypes ...] [--shapes 4096x32000 ...]
                    [--providers ...] [--out DIR] [--no-plot]
"""
import argparse
import math
import os
import sys
import tempfile

import torch

OPS = ("softmax_fwd", "softmax_bwd", "log_softmax_fwd", "ce_fwd", "ce_fwd_bwd")
# The fused linear cross-entropy is matmul-bound and has its own cases (tokens x hidden x
# classes) and figures (TFLOP/s, peak memory): bench/linear_ce.py, run only when asked for.
LINEAR_CE_OPS = ("linear_ce_fwd", "linear_ce_fwd_bwd")
LOGPROBS_OPS = ("logprobs_fwd", "logprobs_fwd_bwd", "linear_logprobs_fwd_bwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROVIDERS = ("softmax_gpu", "torch", "torch.compile", "liger", "quack", "cupy")
VOCABS = (32000, 50257, 128256, 151936, 262144)
# Language-model heads: a 4096-class row, the common vocabularies at 4096 tokens, a 32768-class
# row at 16384 tokens, a 262144-class vocabulary, and few long rows (a latency case: no kernel
# nears copy bandwidth there, so read it in microseconds).
LM_SHAPES = [(32768, 4096), (4096, 32000), (4096, 50257), (4096, 128256), (4096, 151936), (16384, 32768),
             (1024, 262144), (32, 128256)]  # fmt: skip
# The full sweep: the LM shapes, the published grid (rows x classes at 2**31 elements from
# 65536 classes up), more vocabularies at 16384 rows, and more latency cases.
SHAPES = list(dict.fromkeys(
    LM_SHAPES
    + [(32768, 2**k) for k in range(8, 17)]
    + [(16384, 131072), (8192, 262144)]
    + [(16384, v) for v in VOCABS]
    + [(1, 128256), (128, 32000)]
))  # fmt: skip
# --quick: bfloat16 and float32, five LM shapes (a fitting row, two vocabularies, a 262144-class
# row, the latency case): 50 cases x 6 providers x 3 repetitions, about three minutes on an
# H200 with torch.compile compiling each case.
QUICK_SHAPES = [(32768, 4096), (4096, 32000), (4096, 128256), (1024, 262144), (32, 128256)]
QUICK_DTYPES = ("bfloat16", "float32")
DRY_RUN_MAX_ROWS, DRY_RUN_MAX_COLS = 4, 256  # the interpreter costs ~1 ms per block step


def dry_run_shape(rows: int, cols: int):
    """A shape the interpreter runs in a moment: at most 4 rows, and classes divided (rounding
    up) by the power of two that brings them to at most 256. Powers of two stay powers of two
    and the real vocabularies stay distinct and unaligned (50257 -> 197, 128256 -> 251), but
    parity is not always kept (50001 -> 196). Rows this short take the kernels' single-block
    path: the looped path is the unit tests' business (config.block_limit), the dry run's is
    the sweep's Python."""
    if cols > DRY_RUN_MAX_COLS:
        cols = math.ceil(cols / 2 ** math.ceil(math.log2(cols / DRY_RUN_MAX_COLS)))
    return min(rows, DRY_RUN_MAX_ROWS), cols


def parse_shape(text: str):
    rows, cols = text.lower().split("x")
    return int(rows), int(cols)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="bfloat16 and float32 at five language-model shapes (about 3 minutes on an H200)")
    p.add_argument(
        "--dry-run", action="store_true",
        help="run the GPU sweep on CPU (interpreter, shrunken shapes, CPU timer): checks the code, measures nothing",
    )  # fmt: skip
    p.add_argument("--ops", nargs="+", choices=OPS + LINEAR_CE_OPS + LOGPROBS_OPS, default=None)
    p.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=None)
    p.add_argument("--shapes", nargs="+", type=parse_shape, default=None, metavar="ROWSxCOLS")
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    p.add_argument(
        "--out", default=None,
        help="folder for JSON, CSV, PNG (default: <card>_<date>/ under $SOFTMAX_GPU_BENCH_OUT, else bench/results; a dry run: a new temporary folder)",
    )  # fmt: skip
    p.add_argument("--no-plot", action="store_true")
    p.add_argument(
        "--compile-only", action="store_true",
        help="call softmax_gpu and torch.compile once per case and stop: fills the compile caches on disk "
        "(device_check.sh runs it beside the tests, so the timed sweep spends no minutes compiling)",
    )  # fmt: skip
    p.add_argument("--repeats", type=int, default=None, help="times each case is timed, interleaved with the other providers (default 3)")
    args = p.parse_args(argv)
    args.ops = args.ops or list(OPS)
    args.dtypes = args.dtypes or list(QUICK_DTYPES if args.quick else DTYPES)
    args.shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
    if args.dry_run:
        args.shapes = list(dict.fromkeys(dry_run_shape(r, c) for r, c in args.shapes))
        # Nothing lands in bench/results/ (where only real GPU runs belong) unless asked for.
        args.out = args.out or tempfile.mkdtemp(prefix="softmax-gpu-dry-run-")
    args.repeats = args.repeats or (2 if args.dry_run else 3)
    return args


def run_sweep(args, platform) -> int:
    from bench import gpu, providers, results

    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are a nicety

        def tqdm(items, **_):
            return items

    if platform.dry_run:
        print(gpu.DRY_RUN_WARNING)
    if args.compile_only:
        return compile_only(args, platform)
    platform.warm()
    copy_gbps = platform.copy_gbps()
    meta = gpu.card_meta(platform, copy_gbps)
    print(f"{meta['card']} (driver {meta['driver']}, torch {meta['torch']}, triton {meta['triton']}, "
          f"commit {str(meta.get('commit'))[:10]})")  # fmt: skip
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s" + (f"; datasheet {meta['datasheet_gbps']:.0f} GB/s" if meta["datasheet_gbps"] else ""))
    loaded, missing = providers.load(args.providers)
    for name, reason in missing.items():
        print(f"skipping provider {name}: not importable ({reason})")
    meta["providers_skipped"] = missing
    meta["repeats"] = args.repeats
    cases = [gpu.Case(op, r, c, DTYPES[d]) for d in args.dtypes for r, c in args.shapes for op in args.ops]
    if not loaded:
        print("no provider could be imported: nothing to measure")
        return 1
    # Default: a folder per card and day under $SOFTMAX_GPU_BENCH_OUT (Docker's /results), else bench/results.
    out = args.out or results.run_folder(meta, os.environ.get("SOFTMAX_GPU_BENCH_OUT", results.RESULTS))
    print(f"{len(cases)} cases x {len(loaded)} providers x {args.repeats} repetitions; results in {out}", flush=True)
    rows = []
    for case in tqdm(cases, desc="bench", unit="case", mininterval=5):
        rows += gpu.run_case(platform, case, loaded, meta, repeats=args.repeats)
        results.write_results(rows, meta, out)  # after every case: a run cut short keeps its rows
    print(results.format_table(rows, title=gpu.DRY_RUN_WARNING if platform.dry_run else meta["card"]))
    paths = results.write_results(rows, meta, out)
    if not args.no_plot:
        try:
            # The dry run's shapes are all small: plot them anyway, so the plotting code runs.
            paths += (results.plot_results(rows, meta, out, min_elements=0 if platform.dry_run else 2**20),)
        except ImportError:
            print("matplotlib is not installed: no plot (pip install 'softmax-gpu[plot]')")
    print("wrote " + ", ".join(str(p) for p in paths if p))
    wrong = [r for r in rows if r["status"] == "wrong"]
    for r in wrong:
        print(f"GATE: {r['label']} {r['op']} {r['dtype']} {r['rows']}x{r['cols']}: {r['gate']}")
    return 0


def compile_only(args, platform) -> int:
    """One call per case of the providers that compile (ours, torch.compile): nothing is timed."""
    from bench import gpu, providers

    loaded, _ = providers.load([p for p in args.providers if p in ("softmax_gpu", "torch.compile")])
    cases = [gpu.Case(op, r, c, DTYPES[d]) for d in args.dtypes for r, c in args.shapes for op in args.ops]
    for i, case in enumerate(cases):
        inputs = gpu.make_inputs(case, torch.Generator(device=platform.device).manual_seed(0))
        for provider in loaded.values():
            try:
                prepared = gpu.build(case.op, provider, inputs)
                if prepared is not None:
                    prepared.call()
            except Exception as exc:  # the timed sweep reports errors; this only warms caches
                print(f"compile-only: {provider.name} {case}: {type(exc).__name__}: {exc}")
        print(f"compiled {i + 1}/{len(cases)}: {case.op} {case.rows}x{case.cols} {case.dtype}", flush=True)
        del inputs
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    logprob_ops = [op for op in args.ops if op in LOGPROBS_OPS]
    if logprob_ops:
        from bench import logprobs

        forwarded = ["--dry-run"] * args.dry_run + ["--quick"] * args.quick + (["--out", args.out] if args.out else [])
        status = logprobs.main(["--ops", *logprob_ops, *forwarded])
        args.ops = [op for op in args.ops if op not in LOGPROBS_OPS]
        if not args.ops:
            return status
    linear_ops = [op for op in args.ops if op in LINEAR_CE_OPS]
    if linear_ops:
        from bench import linear_ce

        forwarded = ["--dry-run"] * args.dry_run + ["--quick"] * args.quick + (["--out", args.out] if args.out else [])
        status = linear_ce.main(["--ops", *linear_ops, *forwarded])
        args.ops = [op for op in args.ops if op not in LINEAR_CE_OPS]
        if not args.ops:
            return status
    if args.dry_run:
        # The interpreter must be chosen before triton is first imported.
        os.environ["TRITON_INTERPRET"] = "1"
        from bench import gpu

        return run_sweep(args, gpu.dry_run_platform())
    if torch.cuda.is_available():
        from bench import gpu

        return run_sweep(args, gpu.gpu_platform())
    # No GPU: the kernels run in Triton's interpreter, which must be chosen before triton loads.
    os.environ["TRITON_INTERPRET"] = "1"
    from bench import cpu_report

    cpu_report.run(args.ops, [DTYPES[d] for d in args.dtypes], args.quick, out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
