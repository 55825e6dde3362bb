"""The GPU sweep: gate every provider's timed call against float64, then time it twice over.

For each case (op, shape, dtype) the inputs are drawn once. Each provider's call is built
once and its output gated at full size (bench/gate.py); a provider that fails is `wrong` and
is not timed. Then every case is timed `repeats` times, the providers interleaved (each
repetition rotates who goes first), on two clocks (bench/timing.py): device_ms (GPU time
alone, from CUDA graphs, L2 cold) and eager_ms (the call as Python makes it, host
included). A row reports the median of its repetitions and their min-max spread; GB/s and
% of the measured copy bandwidth come from device_ms and the minimum bytes of the op
(bench/traffic_model). Where a provider cannot be captured in a graph it gets eager_ms
only, and its note says why.

Beside the times: the path our implementation takes for the shape, the launches and bytes
that path costs (the traffic model, checked exactly against the interpreter in
tests/test_traffic_model.py), the kernel launches counted by the profiler, peak memory
above the inputs not counting the outputs the caller keeps, and the card's SM clock and
temperature after the case (NVML).

Everything that differs between a GPU run and the CPU dry run (`python -m bench --dry-run`)
sits in one `Platform`: the device, the two clocks, the copy probe, the memory and launch
probes and the card's description. The dry run swaps in CPU stand-ins and runs the rest of
this file unchanged, so the sweep's Python has run before a lent GPU sees it.
"""
import dataclasses
import platform as host
import statistics
import subprocess
import time
from typing import Callable, Optional

import torch

from bench import gate, timing
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
REPEATS = 3  # times each case is timed, interleaved with the other providers
WARM_SECONDS = 1.5  # the card runs matrix products this long before the first case
COPY_BYTES = 2**30

FIELDS = (
    "op", "dtype", "rows", "cols", "provider", "label", "status", "gate",
    "device_ms", "device_ms_min", "device_ms_max", "device_timer",
    "eager_ms", "eager_ms_min", "eager_ms_max", "eager_timer", "repeats", "device_repeats",
    "gbps", "pct_copy", "pct_datasheet", "min_bytes", "path", "model_bytes", "model_launches",
    "launches", "peak_extra_bytes", "sm_clock_mhz", "temp_c", "note",
)  # fmt: skip


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
    device_ms: Callable  # (call, prepare, estimate_ms[, replays]) -> ms; raises timing.NotCapturable
    eager_ms: Callable  # (call, prepare[, reps]) -> ms
    copy_gbps: Callable  # () -> GB/s of a device-to-device copy, counting read + write
    peak_extra_bytes: Callable  # (Prepared) -> bytes above inputs and new outputs, or None
    launches: Callable  # (Prepared) -> kernel launches in one call, or None
    clocks: Callable  # () -> dict(sm_clock_mhz=..., temp_c=...), empty where unknown
    warm: Callable  # () -> None: bring the card to its working clocks
    describe: Callable  # () -> dict(card=..., driver=..., sm_count=...)
    timers: dict  # timer name -> what it measures
    copy_timer: str = timing.DEVICE_TIMER  # the clock of the copy probe (the ceiling)


def gpu_platform() -> Platform:
    flush = timing.flush_buffer("cuda")
    flush_ms = timing.flush_ms(flush)

    def device_ms(call, prepare, estimate_ms, replays=5):
        k = timing.calls_per_graph(estimate_ms, flush_ms)
        return timing.device_ms(call, flush, prepare, k=k, replays=replays)

    return Platform(
        device="cuda", dry_run=False, device_ms=device_ms,
        eager_ms=lambda call, prepare, reps=5: timing.eager_ms(call, flush, prepare, reps=reps),
        copy_gbps=_cuda_copy_gbps, peak_extra_bytes=_cuda_peak_extra_bytes, launches=_cuda_launches,
        clocks=_nvml_clocks(), warm=_cuda_warm, describe=_describe_cuda,
        timers={name: timing.TIMERS[name] for name in (timing.DEVICE_TIMER, timing.EAGER_TIMER)},
    )  # fmt: skip


DRY_RUN_TIMER = "cpu-clock"


def dry_run_platform() -> Platform:
    """CPU stand-ins: a wall clock for both timers, a small copy probe in host memory, no
    memory, launch or clock probes. Every other line of the sweep is the GPU's. Kernels run in
    Triton's interpreter (TRITON_INTERPRET=1), with its rounding fixed as in the tests."""
    from softmax_gpu.interpreter import apply_fixes

    apply_fixes()

    def cpu_ms(call, prepare=None, estimate_ms=None, reps=None, replays=None):
        times = []
        for _ in range(2):
            if prepare is not None:
                prepare()
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    def copy_gbps():
        src = torch.empty(2**24, dtype=torch.uint8).random_()
        dst = torch.empty_like(src)
        return 2 * src.numel() / (cpu_ms(lambda: dst.copy_(src)) * 1e-3) / 1e9

    return Platform(
        device="cpu", dry_run=True, device_ms=cpu_ms, eager_ms=cpu_ms, copy_gbps=copy_gbps,
        peak_extra_bytes=lambda prepared: None, launches=lambda prepared: None, clocks=dict,
        warm=lambda: None, describe=_describe_cpu,
        timers={DRY_RUN_TIMER: "time.perf_counter around one call on the CPU (dry run: no GPU figure)"},
        copy_timer=DRY_RUN_TIMER,
    )  # fmt: skip


def _describe_cuda() -> dict:
    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.split("\n")[0].strip() or "unknown"
    except OSError:
        driver = "unknown"
    props = torch.cuda.get_device_properties(0)
    return dict(card=torch.cuda.get_device_name(), driver=driver, sm_count=props.multi_processor_count,
                l2_bytes=getattr(props, "L2_cache_size", None))  # fmt: skip


def _describe_cpu() -> dict:
    from softmax_gpu import config

    return dict(card="dry-run-cpu", driver=f"none (CPU dry run on {host.machine()}, Triton interpreter)",
                sm_count=config.DEFAULT_SM_COUNT, l2_bytes=None)  # fmt: skip


def _cuda_warm(seconds: float = WARM_SECONDS) -> None:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()


def _cuda_copy_gbps() -> float:
    """The ceiling: a device-to-device copy of COPY_BYTES timed on the device clock, as every
    row is, counting bytes read and written."""
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    flush = timing.flush_buffer("cuda")
    copy = lambda: dst.copy_(src)  # noqa: E731
    ms = statistics.median(timing.device_ms(copy, flush, k=4) for _ in range(3))
    return 2 * COPY_BYTES / (ms * 1e-3) / 1e9


def _nvml_clocks() -> Callable:
    """A probe of the SM clock and temperature through NVML, or one returning {} without it."""
    try:
        import pynvml

        pynvml.nvmlInit()
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        try:  # by PCI address: NVML numbers every card, CUDA only the visible ones
            bus_id = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
            handle = pynvml.nvmlDeviceGetHandleByPciBusId(bus_id)
        except Exception:
            handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    except Exception:
        return dict

    def read():
        try:
            return dict(sm_clock_mhz=pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
                        temp_c=pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))  # fmt: skip
        except Exception:
            return {}

    return read


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _tensors(item)]
    return []


def _cuda_peak_extra_bytes(prepared) -> int:
    """Peak memory of one call above what was allocated before it (inputs), not counting the
    outputs it returns (the caller keeps those) when the call allocated them: an output that
    aliases an input (an in-place peer's gradient) is not subtracted. Allocations outside
    torch's allocator are invisible here (the CuPy provider allocates through torch's)."""
    if prepared.prepare is not None:
        prepared.prepare()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    before = {t.untyped_storage().data_ptr() for t in _tensors(list(prepared.gate_inputs.values()))}
    out = prepared.call()
    torch.cuda.synchronize()
    new = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in _tensors(out)}
    kept = sum(n for ptr, n in new.items() if ptr not in before and ptr not in prepared.owned)
    del out
    return max(torch.cuda.max_memory_allocated() - base - kept, 0)


def _cuda_launches(prepared) -> Optional[int]:
    """Kernels one call launches, counted by the profiler (copies and memsets left out)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        if prepared.prepare is not None:
            prepared.prepare()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            prepared.call()
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        return sum(1 for n in names if not n.startswith(("Memcpy", "Memset", "[memory]")))
    except Exception:
        return None


def card_meta(platform: Platform, copy_gbps: float) -> dict:
    import datetime

    import triton

    described = platform.describe()
    datasheet = None if platform.dry_run else next((v for k, v in DATASHEET_GBPS.items() if k in described["card"]), None)
    meta = dict(
        **described, torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
        copy_gbps=copy_gbps, copy_timer=platform.copy_timer, datasheet_gbps=datasheet,
        date=datetime.date.today().isoformat(),
        dry_run=platform.dry_run, timers=platform.timers, gate=gate.__doc__.split("\n\n")[0],
        source_sha256=source_sha256(), **_commit(),
    )  # fmt: skip
    if platform.dry_run:
        meta["warning"] = DRY_RUN_WARNING
    return meta


def source_sha256(root=None) -> str:
    """A hash of the code measured (softmax_gpu/ and kernels/ file contents by path): a check
    on the recorded commit, which a copied .git can misreport (`git ls-tree` of the commit
    gives the same files)."""
    import hashlib
    from pathlib import Path

    root = Path(root or Path(__file__).resolve().parents[1])
    digest = hashlib.sha256()
    for folder in ("softmax_gpu", "kernels"):
        for path in sorted((root / folder).rglob("*")):
            rel = path.relative_to(root)
            if rel.parts[:2] == ("softmax_gpu", "kernels"):  # device_check.sh's staged copy of kernels/
                continue
            if path.is_file() and path.suffix in (".py", ".cu", ".cuh") and "__pycache__" not in path.parts:
                digest.update(str(rel).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _commit() -> dict:
    """The commit measured, and whether the tree differed from it (SOFTMAX_GPU_COMMIT wins:
    device_check.sh sets it before staging a copy without .git)."""
    import os

    if os.environ.get("SOFTMAX_GPU_COMMIT"):
        return dict(commit=os.environ["SOFTMAX_GPU_COMMIT"], dirty=os.environ.get("SOFTMAX_GPU_DIRTY") == "1")
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        sha = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip() != ""  # fmt: skip
        return dict(commit=sha or None, dirty=dirty if sha else None)
    except OSError:
        return dict(commit=None, dirty=None)


DRY_RUN_WARNING = (
    "DRY RUN on CPU: kernels ran in Triton's interpreter on shrunken shapes and were timed with a "
    "CPU clock. No figure here is a GPU measurement."
)


def make_inputs(case: Case, generator: torch.Generator):
    """Random inputs of the case on the generator's device: logits N(0, 2^2), upstream N(0, 1)."""
    device = generator.device
    x = torch.randn(case.rows, case.cols, device=device, generator=generator).mul_(2).to(case.dtype)
    inputs = {"x": x}
    if case.op == "softmax_bwd":
        inputs["dy"] = torch.randn(x.shape, device=device, generator=generator).to(case.dtype)
    if case.op.startswith("ce"):
        inputs["target"] = torch.randint(0, case.cols, (case.rows,), device=device, generator=generator)
    return inputs


@dataclasses.dataclass
class Prepared:
    """One provider's call of one case."""

    call: Callable  # the timed call; returns what the gate checks
    prepare: Optional[Callable]  # run before each call, outside the timed region (fresh inputs)
    gate_inputs: dict  # what the gate compares against (y: the forward output a backward used)
    owned: frozenset = frozenset()  # storages (data_ptr) the runner set up: the in-place peer's work copy


def build(op: str, provider, inputs: dict) -> Optional[Prepared]:
    """The zero-argument call doing one run of `op` with `provider`; None if it has no such op."""
    funcs = provider.funcs
    x = inputs["x"]
    prepare = None
    if op in provider.overwrites_input:
        source, work = x, torch.empty_like(x)

        def prepare():
            with torch.no_grad():
                work.copy_(source)

        prepare()
        x = work
        owned = frozenset({work.untyped_storage().data_ptr()})
    else:
        owned = frozenset()
    prepared = _build(op, funcs, x, inputs, prepare)
    if prepared is not None:
        prepared.owned = owned
    return prepared


def _build(op: str, funcs: dict, x: torch.Tensor, inputs: dict, prepare) -> Optional[Prepared]:
    if op in funcs:  # a provider without autograd runs the op directly
        if op == "softmax_bwd":
            y = torch.softmax(x.float(), -1).to(x.dtype)
            return Prepared(lambda: funcs[op](y, inputs["dy"]), prepare, dict(inputs, y=y))
        return Prepared(lambda: funcs[op](x, inputs["target"]), prepare, inputs)
    if op == "softmax_fwd" and "softmax" in funcs:
        return Prepared(lambda: funcs["softmax"](x), prepare, inputs)
    if op == "log_softmax_fwd" and "log_softmax" in funcs:
        return Prepared(lambda: funcs["log_softmax"](x), prepare, inputs)
    if op == "softmax_bwd" and "softmax" in funcs:
        leaf = x.detach().requires_grad_()
        y = funcs["softmax"](leaf)
        call = lambda: torch.autograd.grad(y, leaf, inputs["dy"], retain_graph=True)[0]  # noqa: E731
        return Prepared(call, prepare, dict(inputs, y=y.detach()))
    if op == "ce_fwd" and "cross_entropy" in funcs:

        def forward():
            with torch.no_grad():
                return funcs["cross_entropy"](x, inputs["target"])

        return Prepared(forward, prepare, inputs)
    if op == "ce_fwd_bwd" and "cross_entropy" in funcs:
        leaf = x.detach().requires_grad_()
        call = lambda: torch.autograd.grad(funcs["cross_entropy"](leaf, inputs["target"]), leaf)[0]  # noqa: E731
        return Prepared(call, prepare, inputs)
    return None


def blank_row(case: Case, provider) -> dict:
    row = dict.fromkeys(FIELDS)
    row.update(op=case.op, dtype=str(case.dtype).replace("torch.", ""), rows=case.rows, cols=case.cols,
               provider=provider.name, label=provider.label, status="ok", note="", repeats=0)  # fmt: skip
    return row


def our_model(case: Case, sm_count: int) -> dict:
    """Path, launches and bytes of softmax_gpu's implementation at this case (the traffic model)."""
    try:
        from bench.traffic_model import ours
    except ImportError:
        return {}
    try:
        t = ours(case.op, case.rows, case.cols, case.dtype, sm_count)
    except Exception as exc:  # a model gap must not cost the run
        return dict(path=f"unknown ({type(exc).__name__})")
    return dict(path=t.path, model_bytes=t.bytes, model_launches=t.launches)


class CaseRun:
    """One provider on one case: gated once, then timed once per repetition."""

    def __init__(self, platform: Platform, case: Case, provider, inputs: dict):
        self.platform, self.case, self.provider = platform, case, provider
        self.row = blank_row(case, provider)
        self.device, self.eager = [], []
        self.prepared = None
        self.no_graph = provider.no_graph_ops.get(case.op, "")
        try:
            self.prepared = build(case.op, provider, inputs)
            if self.prepared is None:
                self.row.update(status="n/a", note="provider has no such op")
                return
            verdict = gate.check(case.op, self.prepared.call(), self.prepared.gate_inputs)
            self.row["gate"] = str(verdict)
            if not verdict.ok:
                self.row["status"] = "wrong"
                self.prepared = None
                return
            self.row["peak_extra_bytes"] = platform.peak_extra_bytes(self.prepared)
            self.row["launches"] = platform.launches(self.prepared)
        except Exception as exc:
            self._fail(exc)

    def _fail(self, exc):
        self.prepared = None
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            self.row.update(status="oom", note="out of GPU memory")
        else:
            self.row.update(status="error", note=f"{type(exc).__name__}: {str(exc)[:200]}")

    def time_once(self):
        if self.prepared is None:
            return
        p = self.prepared
        try:
            eager = self.platform.eager_ms(p.call, p.prepare)
            self.eager.append(eager)
            if not self.no_graph:
                try:
                    self.device.append(self.platform.device_ms(p.call, p.prepare, eager))
                except timing.NotCapturable as exc:
                    # All repetitions on one clock or none: earlier samples are dropped.
                    dropped = f" after {len(self.device)} captured repetitions" if self.device else ""
                    self.device = []
                    self.no_graph = f"not capturable in a CUDA graph{dropped} ({exc})"
            self.row.update(self.platform.clocks())
        except Exception as exc:
            self._fail(exc)

    def finish(self, copy_gbps: float, datasheet) -> dict:
        row, timers = self.row, list(self.platform.timers)
        if row["status"] != "ok":
            return row
        nbytes = min_bytes(self.case.op, self.case.rows, self.case.cols, self.case.dtype.itemsize)
        row.update(min_bytes=nbytes, repeats=len(self.eager), device_repeats=len(self.device))
        if self.eager:
            row.update(eager_ms=statistics.median(self.eager), eager_ms_min=min(self.eager),
                       eager_ms_max=max(self.eager), eager_timer=timers[-1])  # fmt: skip
        if self.device:
            ms = statistics.median(self.device)
            row.update(device_ms=ms, device_ms_min=min(self.device), device_ms_max=max(self.device),
                       device_timer=timers[0])  # fmt: skip
            if ms > 0:
                gbps = nbytes / (ms * 1e-3) / 1e9
                row.update(gbps=gbps, pct_copy=100 * gbps / copy_gbps)
                if datasheet:
                    row["pct_datasheet"] = 100 * gbps / datasheet
        if self.no_graph:
            row["note"] = (row["note"] + "; " if row["note"] else "") + f"eager_ms only: {self.no_graph}"
        return row


def run_case(platform: Platform, case: Case, providers: dict, meta: dict, repeats: int = REPEATS):
    """Rows for every provider on one case: inputs drawn once, gates, then `repeats` rounds of
    timing with the providers' order rotated each round."""
    generator = torch.Generator(device=platform.device).manual_seed(case.rows * 1_000_003 + case.cols)
    try:
        inputs = make_inputs(case, generator)
    except torch.cuda.OutOfMemoryError:
        rows = [blank_row(case, p) for p in providers.values()]
        for row in rows:
            row.update(status="oom", note="out of GPU memory drawing the inputs")
        return rows
    runs = [CaseRun(platform, case, p, inputs) for p in providers.values()]
    for r in range(repeats):
        for run in runs[r % len(runs):] + runs[: r % len(runs)]:
            run.time_once()
    rows = [run.finish(meta["copy_gbps"], meta["datasheet_gbps"]) for run in runs]
    model = our_model(case, meta["sm_count"])
    for row in rows:
        if row["provider"] == "softmax_gpu":
            row.update(model)
    del runs, inputs
    if platform.device == "cuda":
        torch.cuda.empty_cache()
    return rows
