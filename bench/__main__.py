"""python -m bench: softmax_gpu against torch eager, torch.compile, Liger-Kernel, QuACK (and
CuPy) on this machine's GPU, against the copy-bandwidth ceiling.

With no CUDA GPU it says so and prints the CPU report instead (exact bytes per element from
Triton's interpreter, and the sm_90 compile report), then exits 0.

    python -m bench [--quick] [--ops ...] [--dtypes ...] [--shapes 4096x32000 ...]
                    [--providers ...] [--out DIR] [--no-plot]
"""
import argparse
import os
import sys

import torch

OPS = ("softmax_fwd", "softmax_bwd", "log_softmax_fwd", "ce_fwd", "ce_fwd_bwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROVIDERS = ("softmax_gpu", "torch", "torch.compile", "liger", "quack", "cupy")
VOCABS = (32000, 50257, 128256, 151936, 262144)
# The published grid (rows x classes at 2**31 elements from 65536 classes up), real
# vocabularies at 4096 and 16384 rows, and small latency cases.
SHAPES = (
    [(32768, 2**k) for k in range(8, 17)]
    + [(16384, 131072), (8192, 262144)]
    + [(rows, v) for rows in (4096, 16384) for v in VOCABS]
    + [(1, 128256), (32, 128256), (128, 32000)]
)
# --quick: bfloat16, four shapes (a fitting row, two vocabularies, a latency case); about
# 20 cases x 6 providers, dominated by torch.compile's compile per case.
QUICK_SHAPES = [(32768, 4096), (4096, 32000), (4096, 128256), (32, 128256)]
QUICK_DTYPES = ("bfloat16",)


def parse_shape(text: str):
    rows, cols = text.lower().split("x")
    return int(rows), int(cols)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small subset (bfloat16, 4 shapes) meant to finish in under 2 minutes on an H100")
    p.add_argument("--ops", nargs="+", choices=OPS, default=None)
    p.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=None)
    p.add_argument("--shapes", nargs="+", type=parse_shape, default=None, metavar="ROWSxCOLS")
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    p.add_argument(
        "--out", default=os.environ.get("SOFTMAX_GPU_BENCH_OUT", "bench/results"), help="folder for JSON, CSV, PNG"
    )
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    args.ops = args.ops or list(OPS)
    args.dtypes = args.dtypes or list(QUICK_DTYPES if args.quick else DTYPES)
    args.shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
    return args


def run_gpu(args) -> int:
    from tqdm import tqdm

    from bench import gpu, providers, results

    copy_gbps = gpu.copy_bandwidth_gbps()
    meta = gpu.card_meta(copy_gbps)
    print(f"{meta['card']} (driver {meta['driver']}, torch {meta['torch']}, triton {meta['triton']})")
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s" + (f"; datasheet {meta['datasheet_gbps']:.0f} GB/s" if meta["datasheet_gbps"] else ""))
    loaded, missing = providers.load(args.providers)
    for name, reason in missing.items():
        print(f"skipping provider {name}: not importable ({reason})")
    meta["providers_skipped"] = missing
    cases = [gpu.Case(op, r, c, DTYPES[d]) for op in args.ops for d in args.dtypes for r, c in args.shapes]
    names = list(loaded)
    if not names:
        print("no provider could be imported: nothing to measure")
        return 1
    rows = []
    for i, case in enumerate(tqdm(cases, desc="bench", unit="case")):
        # Rotate who goes first, so no provider always inherits the others' warm caches or clocks.
        for name in names[i % len(names):] + names[: i % len(names)]:
            rows.append(gpu.measure(case, name, loaded[name], copy_gbps, meta["datasheet_gbps"]))
    print(results.format_table(rows))
    paths = results.write_results(rows, meta, args.out)
    if not args.no_plot:
        try:
            paths += (results.plot_results(rows, meta, args.out),)
        except ImportError:
            print("matplotlib is not installed: no plot (pip install 'softmax-gpu[plot]')")
    print("wrote " + ", ".join(str(p) for p in paths if p))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if torch.cuda.is_available():
        return run_gpu(args)
    # No GPU: the kernels run in Triton's interpreter, which must be chosen before triton loads.
    os.environ["TRITON_INTERPRET"] = "1"
    from bench import cpu_report

    cpu_report.run(args.ops, [DTYPES[d] for d in args.dtypes], args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
