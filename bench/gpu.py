"""The GPU sweep: check every provider against the float64 reference, then time it.

Timing: triton.testing.do_bench medians (warm-up, L2 flushed between runs), or CUDA-graph
replays (do_bench_cudagraph) for runs under ~50 us. Bandwidth is min_bytes / time, reported
also as % of a device-to-device copy measured on the same card in the same run.

Everything that differs between a GPU run and the CPU dry run (`python -m bench --dry-run`)
sits in one `Platform`: the device, the two timers, the copy probe, the memory probe and
the card's description. The dry run swaps in CPU stand-ins and runs the rest of this file
unchanged, so the sweep's Python has run before a lent GPU sees it (the GPU-only lines are
the Platform's CUDA functions; the kernels' looped paths are covered by the unit tests).
"""
import dataclasses
import inspect
import platform as host
import statistics
import subprocess
import time
from typing import Callable

import numpy as np
import torch

from bench.traffic_model import min_bytes

# Datasheet memory bandwidth (GB/s) of cards we know, matched by substring of the name.
DATASHEET_GBPS = {
    "H200": 4800.0,
    "H100 80GB HBM3": 3350.0,
    "H100 NVL": 3900.0,
    "H100 PCIe": 2000.0,
    "A100-SXM4-80GB": 2039.0,
    "A100-SXM4-40GB": 1555.0,
    "A100 80GB PCIe": 1935.0,
    "L40S": 864.0,
    "RTX 4090": 1008.0,
}
CHECK_ROWS = 8  # rows checked against the NumPy float64 reference before timing
CUDAGRAPH_BELOW_MS = 0.05
# Keywords for triton.testing's timers, shared by the GPU run and the dry run (which binds
# them to the real functions' signatures, so a keyword a triton release lacks fails on CPU).
DO_BENCH_KW = dict(warmup=25, rep=100, return_mode="median")
CUDAGRAPH_KW = dict(rep=100, return_mode="median")
COPY_KW = dict(warmup=25, rep=200, return_mode="median")
# Tolerances for the correctness gate (max abs error on probabilities, log-probabilities and losses).
GATE_ATOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


@dataclasses.dataclass
class Case:
    op: str
    rows: int
    cols: int
    dtype: torch.dtype


@dataclasses.dataclass
class Platform:
    """Where the sweep runs: a CUDA GPU, or the CPU dry run."""

    device: str
    dry_run: bool
    bench: Callable  # (fn, **DO_BENCH_KW) -> median ms
    bench_graph: Callable  # (fn, **CUDAGRAPH_KW) -> median ms
    graph_below_ms: float  # runs faster than this are re-timed with bench_graph
    copy_bytes: int  # size of the copy-bandwidth probe
    peak_extra_bytes: Callable  # (run) -> bytes above the inputs, or None where not measurable
    describe: Callable  # () -> dict(card=..., driver=...)


def gpu_platform() -> Platform:
    import triton.testing

    return Platform(
        device="cuda", dry_run=False, bench=triton.testing.do_bench, bench_graph=triton.testing.do_bench_cudagraph,
        graph_below_ms=CUDAGRAPH_BELOW_MS, copy_bytes=2**30, peak_extra_bytes=_cuda_peak_extra_bytes,
        describe=_describe_cuda,
    )  # fmt: skip


def dry_run_platform() -> Platform:
    """CPU stand-ins: a wall-clock timer that accepts exactly the keywords the triton timer it
    replaces accepts, a small copy probe in host memory, no memory probe. Every other line of
    the sweep is the GPU's. Kernels run in Triton's interpreter (TRITON_INTERPRET=1)."""
    import triton.testing

    return Platform(
        device="cpu", dry_run=True, bench=_cpu_timer(triton.testing.do_bench),
        bench_graph=_cpu_timer(triton.testing.do_bench_cudagraph),
        graph_below_ms=float("inf"),  # so the graph-replay branch runs too
        copy_bytes=2**24, peak_extra_bytes=lambda run: None, describe=_describe_cpu,
    )  # fmt: skip


def _cpu_timer(stands_for: Callable, reps: int = 3) -> Callable:
    signature = inspect.signature(stands_for)

    def timer(fn, **kwargs) -> float:
        signature.bind(fn, **kwargs)  # TypeError here is what the GPU run would have raised
        fn()  # warm-up (torch.compile compiles here)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    return timer


def _describe_cuda() -> dict:
    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.split("\n")[0].strip() or "unknown"
    except OSError:
        driver = "unknown"
    return dict(card=torch.cuda.get_device_name(), driver=driver)


def _describe_cpu() -> dict:
    return dict(card="dry-run-cpu", driver=f"none (CPU dry run on {host.machine()}, Triton interpreter)")


def card_meta(platform: Platform, copy_gbps: float) -> dict:
    import datetime

    import triton

    described = platform.describe()
    datasheet = None if platform.dry_run else next((v for k, v in DATASHEET_GBPS.items() if k in described["card"]), None)
    meta = dict(
        **described, torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
        copy_gbps=copy_gbps, datasheet_gbps=datasheet, date=datetime.date.today().isoformat(),
        dry_run=platform.dry_run,
    )  # fmt: skip
    if platform.dry_run:
        meta["warning"] = DRY_RUN_WARNING
    return meta


DRY_RUN_WARNING = (
    "DRY RUN on CPU: kernels ran in Triton's interpreter on shrunken shapes and were timed with a "
    "CPU clock. No figure here is a GPU measurement."
)


def copy_bandwidth_gbps(platform: Platform) -> float:
    """A device-to-device copy: reads and writes copy_bytes, so 2 * copy_bytes per run."""
    src = torch.empty(platform.copy_bytes, dtype=torch.uint8, device=platform.device).random_()
    dst = torch.empty_like(src)
    ms = platform.bench(lambda: dst.copy_(src), **COPY_KW)
    return 2 * platform.copy_bytes / (ms * 1e-3) / 1e9


def make_inputs(case: Case, generator: torch.Generator):
    """Random inputs of the case on the generator's device."""
    device = generator.device
    x = torch.randn(case.rows, case.cols, device=device, generator=generator).mul_(2).to(case.dtype)
    inputs = {"x": x}
    if case.op == "softmax_bwd":
        inputs["dy"] = torch.randn(x.shape, device=device, generator=generator).to(case.dtype)
    if case.op.startswith("ce"):
        inputs["target"] = torch.randint(0, case.cols, (case.rows,), device=device, generator=generator)
    return inputs


def runner(op: str, funcs: dict, inputs: dict):
    """A zero-argument callable doing one run of `op`, returning what the gate checks; None if unsupported."""
    x = inputs["x"]
    if op in funcs:  # a provider without autograd runs the op directly
        if op == "softmax_bwd":
            y = torch.softmax(x.float(), -1).to(x.dtype)
            return lambda: funcs[op](y, inputs["dy"])
        return lambda: funcs[op](x, inputs["target"])
    if op == "softmax_fwd" and "softmax" in funcs:
        return lambda: funcs["softmax"](x)
    if op == "log_softmax_fwd" and "log_softmax" in funcs:
        return lambda: funcs["log_softmax"](x)
    if op == "softmax_bwd" and "softmax" in funcs:
        leaf = x.detach().requires_grad_()
        y = funcs["softmax"](leaf)
        return lambda: torch.autograd.grad(y, leaf, inputs["dy"], retain_graph=True)[0]
    if op == "ce_fwd" and "cross_entropy" in funcs:

        def forward():
            with torch.no_grad():
                return funcs["cross_entropy"](x, inputs["target"])

        return forward
    if op == "ce_fwd_bwd" and "cross_entropy" in funcs:
        leaf = x.detach().requires_grad_()
        return lambda: torch.autograd.grad(funcs["cross_entropy"](leaf, inputs["target"]), leaf)[0]
    return None


def gate(op: str, funcs: dict, inputs: dict) -> str:
    """'' if the provider's output on the first CHECK_ROWS rows matches the float64 reference, else why not."""
    from softmax_gpu import reference

    sub = {k: v[:CHECK_ROWS].clone() for k, v in inputs.items()}
    run = runner(op, funcs, sub)
    out = run()
    x64 = sub["x"].double().cpu().numpy()
    if op == "softmax_fwd":
        expected = reference.softmax(x64)
    elif op == "log_softmax_fwd":
        expected = reference.log_softmax(x64)
    elif op == "softmax_bwd":
        expected = reference.softmax_backward(reference.softmax(x64), sub["dy"].double().cpu().numpy())
        if "softmax_bwd" in funcs:  # fed the rounded y, like any low-precision backward
            y = torch.softmax(sub["x"].float(), -1).to(sub["x"].dtype).double().cpu().numpy()
            expected = reference.softmax_backward(y, sub["dy"].double().cpu().numpy())
    else:
        loss, grad = reference.cross_entropy(x64, sub["target"].cpu().numpy())
        expected = loss if op == "ce_fwd" else grad
    got = out.double().cpu().numpy()
    err = float(np.max(np.abs(got - expected))) if got.size else 0.0
    tol = GATE_ATOL[inputs["x"].dtype] * (10 if op == "log_softmax_fwd" else 1)
    if got.shape != np.shape(expected) or not np.isfinite(got).all() or err > tol:
        return f"wrong: max abs err {err:.2e} > {tol:g} on the first {CHECK_ROWS} rows"
    return ""


def time_ms(platform: Platform, run) -> float:
    ms = platform.bench(run, **DO_BENCH_KW)
    if ms < platform.graph_below_ms:
        try:
            ms = platform.bench_graph(run, **CUDAGRAPH_KW)
        except Exception:
            pass  # not capturable (e.g. a host sync inside): keep the plain median
    return ms


def _cuda_peak_extra_bytes(run) -> int:
    """Peak memory of one run above what was allocated before it (inputs included in the base)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = run()
    torch.cuda.synchronize()
    del out
    return torch.cuda.max_memory_allocated() - base


def measure(platform: Platform, case: Case, provider: str, funcs: dict, copy_gbps: float, datasheet) -> dict:
    row = dict(op=case.op, dtype=str(case.dtype).replace("torch.", ""), rows=case.rows, cols=case.cols,
               provider=provider, status="ok", ms=None, gbps=None, pct_copy=None, pct_datasheet=None,
               peak_extra_bytes=None, min_bytes=None, note="")  # fmt: skip
    generator = torch.Generator(device=platform.device).manual_seed(case.rows * 1_000_003 + case.cols)
    try:
        inputs = make_inputs(case, generator)
        run = runner(case.op, funcs, inputs)
        if run is None:
            row.update(status="n/a", note="provider has no such op")
            return row
        problem = gate(case.op, funcs, inputs)
        if problem:
            row.update(status="wrong", note=problem)
            return row
        ms = time_ms(platform, run)
        nbytes = min_bytes(case.op, case.rows, case.cols, inputs["x"].element_size())
        gbps = nbytes / (ms * 1e-3) / 1e9
        row.update(ms=ms, gbps=gbps, pct_copy=100 * gbps / copy_gbps, min_bytes=nbytes)
        if datasheet:
            row["pct_datasheet"] = 100 * gbps / datasheet
        if case.op == "ce_fwd_bwd":
            row["peak_extra_bytes"] = platform.peak_extra_bytes(run)
    except torch.cuda.OutOfMemoryError:
        row.update(status="oom", note="out of GPU memory")
    except Exception as exc:
        row.update(status="error", note=f"{type(exc).__name__}: {str(exc)[:200]}")
    finally:
        torch.cuda.empty_cache()  # a no-op where CUDA was never initialised (the dry run)
    return row
