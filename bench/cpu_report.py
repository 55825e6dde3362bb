"""What `python -m bench` prints with no GPU: exact bytes per element, and the compile report.

The kernels run in Triton's interpreter (TRITON_INTERPRET=1 must be set before triton is
imported; bench/__main__ does it) at small shapes, once with rows that fit one block and
once on the looped path, while TrafficCounter tallies every load and store. The ratio to
bench.traffic_model.min_bytes is the figure that decides speed for memory-bound kernels.

It says what it is doing as it goes (a line per section, a progress bar over the
configurations), prints a one-screen summary, and writes the full tables to files in a folder
it names (--out, else a new temporary folder).
"""
import contextlib
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from bench.traffic_model import min_bytes

ROWS, COLS = 4, 1000  # small: the interpreter costs about a millisecond per block step
LOOPED_BLOCK = 256  # forces the multi-block path at this size
SPLIT_CHUNK = 256  # and the split-row path (few long rows), 4 chunks a row


@dataclasses.dataclass
class TrafficRow:
    op: str
    dtype: str
    path: str
    bytes_moved: int
    minimum: int

    @property
    def per_element(self) -> float:
        return self.bytes_moved / (ROWS * COLS)

    @property
    def ratio(self) -> float:
        return self.bytes_moved / self.minimum


def _run_op(op: str, x: torch.Tensor):
    import softmax_gpu
    import softmax_gpu.ops.softmax  # noqa: F401  (registers torch.ops.softmax_gpu.*)

    if op == "softmax_fwd":
        softmax_gpu.softmax(x)
    elif op == "log_softmax_fwd":
        softmax_gpu.log_softmax(x)
    elif op == "softmax_bwd":
        y = torch.softmax(x.float(), -1).to(x.dtype)
        torch.ops.softmax_gpu.softmax_backward(y, torch.randn_like(y), 1, False)
    elif op == "ce_fwd":
        with torch.no_grad():
            softmax_gpu.cross_entropy(x, torch.randint(0, x.shape[1], (x.shape[0],)))
    elif op == "ce_fwd_bwd":
        logits = x.clone().requires_grad_()
        softmax_gpu.cross_entropy(logits, torch.randint(0, x.shape[1], (x.shape[0],))).backward()
    else:
        raise ValueError(op)


PATHS = ("one block", "looped", "split")


def silence_masked_lane_warnings():
    """The interpreter evaluates masked-off lanes too (0 * -inf padding and the like) and NumPy
    warns; compiled kernels discard those lanes. The same filter as pyproject's pytest one."""
    warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning, "triton.runtime.interpreter")


def _progress(items, desc):
    try:
        from tqdm import tqdm

        return tqdm(items, desc=desc, unit="config", file=sys.stderr, mininterval=1, dynamic_ncols=True)
    except ImportError:  # progress bars are a nicety
        return items


def measure_traffic(ops, dtypes, progress=False):
    """Exact bytes moved by each op and dtype on the three paths, from the interpreter."""
    from softmax_gpu import config
    from softmax_gpu.traffic import TrafficCounter

    silence_masked_lane_warnings()
    jobs = [(op, dtype, path) for op in ops for dtype in dtypes for path in PATHS]
    rows, inputs = [], {}
    for op, dtype, path in _progress(jobs, "interpreter") if progress else jobs:
        if (op, dtype) not in inputs:
            inputs[op, dtype] = torch.randn(ROWS, COLS).to(dtype)
        x = inputs[op, dtype]
        limit = None if path == "one block" else LOOPED_BLOCK
        split = config.force_split(SPLIT_CHUNK) if path == "split" else contextlib.nullcontext()
        with config.block_limit(limit or 2**20), split, TrafficCounter() as counter:
            _run_op(op, x)
        minimum = min_bytes(op, ROWS, COLS, x.element_size())
        rows.append(TrafficRow(op, str(dtype).replace("torch.", ""), path, counter.bytes_moved, minimum))
    return rows


def traffic_title() -> str:
    return (f"Bytes moved, counted exactly in Triton's interpreter ({ROWS} x {COLS}; looped path at block {LOOPED_BLOCK}, "
            f"split rows in chunks of {SPLIT_CHUNK}):")  # fmt: skip


def format_traffic(rows) -> str:
    lines = [traffic_title(), f"{'op':<17}{'dtype':<10}{'path':<11}{'bytes/elem':>11}{'minimum':>9}{'ratio':>7}"]
    for r in rows:
        lines.append(
            f"{r.op:<17}{r.dtype:<10}{r.path:<11}{r.per_element:>11.2f}{r.minimum / (ROWS * COLS):>9.2f}{r.ratio:>7.3f}"
        )
    return "\n".join(lines)


def format_traffic_summary(rows) -> str:
    """One line per op and dtype: the minimum in bytes per element and each path's ratio to it."""
    lines = [f"  {'op':<17}{'dtype':<10}{'minimum B/elem':>15}" + "".join(f"{p:>11}" for p in PATHS)]
    by_key = {}
    for r in rows:
        by_key.setdefault((r.op, r.dtype), {})[r.path] = r
    for (op, dtype), paths in by_key.items():
        minimum = next(iter(paths.values())).minimum / (ROWS * COLS)
        ratios = "".join(f"{paths[p].ratio:>11.3f}" if p in paths else f"{'-':>11}" for p in PATHS)
        lines.append(f"  {op:<17}{dtype:<10}{minimum:>15.2f}{ratios}")
    return "\n".join(lines)


def run(ops, dtypes, quick: bool, out=None) -> int:
    """Prints the CPU report (a summary; the full tables go to files in `out`, else a new
    temporary folder); returns the compile report's exit code."""
    start = time.perf_counter()
    folder = Path(out) if out else Path(tempfile.mkdtemp(prefix="softmax-gpu-cpu-report-"))
    folder.mkdir(parents=True, exist_ok=True)
    print("No CUDA GPU found: printing the CPU report instead of timings (no GPU figures are invented).")
    print(f"Full tables go to {folder}/\n")
    # float16 is not run: the interpreter's float16 support is not guaranteed; its traffic equals bfloat16's.
    runnable = [d for d in dtypes if d != torch.float16] or [torch.float32]
    print(f"[1/2] {traffic_title()[:-1]}: ratio to the minimum per path", flush=True)
    rows = measure_traffic(ops, runnable, progress=True)
    (folder / "traffic.txt").write_text(format_traffic(rows) + "\n")
    print(format_traffic_summary(rows))
    print(f"full table: {folder / 'traffic.txt'} ({time.perf_counter() - start:.0f} s)")

    names = [str(d).replace("torch.", "") for d in dtypes]
    scope = f"--quick, {' and '.join(names)}" if quick else "every configuration"
    print(f"\n[2/2] Compile report for sm_90 (no GPU needed; {scope}):", flush=True)
    table = folder / "compile_report_sm90.txt"
    args = [sys.executable, "-m", "bench.compile_report", "--arch", "90", "--out", str(table)]
    # --quick: the job's own dtypes at a few block sizes each; the full form compiles them all.
    args += ["--quick", "--dtypes", *names] if quick else []
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = subprocess.run(args, env=env).returncode
    print(f"\nCPU report done in {time.perf_counter() - start:.0f} s; tables in {folder}/")
    return code
