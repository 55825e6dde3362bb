"""What `python -m bench` prints with no GPU: exact bytes per element, and the compile report.

The kernels run in Triton's interpreter (TRITON_INTERPRET=1 must be set before triton is
imported; bench/__main__ does it) at small shapes, once with rows that fit one block and
once on the looped path, while TrafficCounter tallies every load and store. The ratio to
bench.traffic_model.min_bytes is the figure that decides speed for memory-bound kernels.
"""
import contextlib
import dataclasses
import subprocess
import sys

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


def measure_traffic(ops, dtypes):
    """Exact bytes moved by each op and dtype on both paths, from the interpreter."""
    from softmax_gpu import config
    from softmax_gpu.traffic import TrafficCounter

    rows = []
    for op in ops:
        for dtype in dtypes:
            x = torch.randn(ROWS, COLS).to(dtype)
            for path, limit in (("one block", None), ("looped", LOOPED_BLOCK), ("split", LOOPED_BLOCK)):
                split = config.force_split(SPLIT_CHUNK) if path == "split" else contextlib.nullcontext()
                with config.block_limit(limit or 2**20), split, TrafficCounter() as counter:
                    _run_op(op, x)
                minimum = min_bytes(op, ROWS, COLS, x.element_size())
                rows.append(TrafficRow(op, str(dtype).replace("torch.", ""), path, counter.bytes_moved, minimum))
    return rows


def format_traffic(rows) -> str:
    lines = [
        f"Bytes moved, counted exactly in Triton's interpreter ({ROWS} x {COLS}; looped path at block {LOOPED_BLOCK}, "
        f"split rows in chunks of {SPLIT_CHUNK}):",
        f"{'op':<17}{'dtype':<10}{'path':<11}{'bytes/elem':>11}{'minimum':>9}{'ratio':>7}",
    ]
    for r in rows:
        lines.append(
            f"{r.op:<17}{r.dtype:<10}{r.path:<11}{r.per_element:>11.2f}{r.minimum / (ROWS * COLS):>9.2f}{r.ratio:>7.3f}"
        )
    return "\n".join(lines)


def run(ops, dtypes, quick: bool) -> int:
    """Prints the CPU report; returns the compile report's exit code."""
    print("No CUDA GPU found: printing the CPU report instead of timings (no GPU figures are invented).\n")
    # float16 is not run: the interpreter's float16 support is not guaranteed; its traffic equals bfloat16's.
    runnable = [d for d in dtypes if d != torch.float16] or [torch.float32]
    print(format_traffic(measure_traffic(ops, runnable)))
    print("\nCompile report for sm_90 (no GPU needed):", flush=True)
    args = [sys.executable, "-m", "bench.compile_report", "--arch", "90"] + (["--quick"] if quick else [])
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(args, env=env).returncode
