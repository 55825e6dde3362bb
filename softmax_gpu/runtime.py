"""Where kernels can run (CUDA tensors on the GPU, CPU tensors in Triton's interpreter), the
eager launch plans, and the direct launch of a compiled kernel."""
import contextlib
import os

import torch
import triton
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

try:
    from triton import knobs
except ImportError:  # Triton before 3.4: no direct launches (see below)
    knobs = None


def check_launchable(fn: str, kernel, x: torch.Tensor) -> None:
    """CUDA tensors run compiled kernels; CPU tensors run only under Triton's interpreter."""
    if x.device.type == "cuda":
        return
    if x.device.type == "cpu" and interpreted(kernel):
        return
    if x.device.type == "cpu":
        raise RuntimeError(
            f"{fn}(): softmax_gpu runs Triton kernels on CUDA tensors. CPU tensors run only in Triton's "
            "interpreter, which is enabled by setting TRITON_INTERPRET=1 before triton is first imported "
            "(slow; meant for testing). Move the tensor to a CUDA device, or use torch's own CPU op."
        )
    raise RuntimeError(f"{fn}(): unsupported device {x.device}; softmax_gpu needs CUDA tensors")


def interpreted(kernel) -> bool:
    """True when triton was imported with TRITON_INTERPRET=1, so kernels run on the CPU via NumPy."""
    return type(kernel).__name__ == "InterpretedFunction"


def resident_programs(n_regs: int, shared: int, num_warps: int, regs_per_sm: int = 65536,
                      shared_per_sm: int = 228 << 10, threads_per_sm: int = 2048) -> int:  # fmt: skip
    """How many programs of a compiled kernel (registers a thread, bytes of shared memory, warps)
    one SM holds at once, by the CUDA occupancy rules of sm_80 / sm_90: registers allocated a
    warp at a time, 8 a thread at a time; 1 KiB of shared memory reserved a block; at most 32
    blocks and threads_per_sm threads."""
    by_regs = regs_per_sm // (-(-max(n_regs, 1) // 8) * 8 * 32 * num_warps)
    by_smem = shared_per_sm // (shared + 1024)
    return max(0, min(32, threads_per_sm // (32 * num_warps), by_regs, by_smem))


def compiled_resources(compiled) -> tuple:
    """(registers a thread, bytes of shared memory, warps) of a CompiledKernel. Triton learns
    the registers only when it loads the binary onto the device, which reading its `run`
    property does (Triton 3.6 and 3.9): before that n_regs is not set."""
    compiled.run  # noqa: B018 (loads the binary: CompiledKernel._init_handles sets n_regs)
    return compiled.n_regs, compiled.metadata.shared, compiled.metadata.num_warps


def compiled_residency(compiled, device) -> int:
    """resident_programs of a CompiledKernel on `device` (a CUDA device: its own limits)."""
    props = torch.cuda.get_device_properties(device)
    return resident_programs(*compiled_resources(compiled), getattr(props, "regs_per_multiprocessor", 65536),
                             getattr(props, "shared_memory_per_multiprocessor", 228 << 10),
                             getattr(props, "max_threads_per_multi_processor", 2048))  # fmt: skip


def cooperative_partials(shape, device) -> torch.Tensor:
    """The float32 partials a cooperative launch exchanges, each written before it is read
    (a GPU test poisons them through this name: a wait that let a program read too early
    would then give NaN)."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def cooperative_launches(coop, phases: tuple, counter_arg: str, part: torch.Tensor) -> list:
    """(arguments, counter argument) of each launch of a cooperative kernel (coop: a
    config.CooperativeConfig; phases: its launcher's argument dicts): on a GPU one launch
    (PHASE 0) with the groups' int32 counters zeroed afresh, named counter_arg; in Triton's
    interpreter its two halves, which wait on nothing (the partials `part` stand in for the
    unused counters). The launchers call `launch` on each."""
    if len(phases) == 1:
        return [(phases[0], {counter_arg: torch.zeros(coop.groups, dtype=torch.int32, device=part.device)})]
    return [(phase, {counter_arg: part}) for phase in phases]


def cooperative_plan(kernel, coop, static: dict, device, pointers) -> tuple:
    """(coop, the argument dicts of its launches) for a cooperative kernel given its
    arguments besides the pointers: in Triton's interpreter, which runs programs one at a time
    so that none may wait on another, the kernel's two halves (PHASE 1, 2); otherwise the one
    cooperative launch (PHASE 0), whose groups on CUDA are cut to what the compiled kernel
    leaves resident (fit_cooperative; pointers(): the launch's tensors, or stand-ins of their
    types and alignment, for Triton's warmup); (None, None) when not one group fits."""
    if interpreted(kernel):
        return coop, (dict(static, PHASE=1), dict(static, PHASE=2))
    static = dict(static, PHASE=0, launch_cooperative_grid=True)
    if getattr(device, "type", device) == "cuda":
        coop = fit_cooperative(kernel, coop, device, dict(static, **pointers()))
        if coop is None:
            return None, None
    return coop, (static,)


def fit_cooperative(kernel, coop, device, args: dict):
    """coop (a config.CooperativeConfig) with its groups cut to what the card keeps resident of
    `kernel` compiled for these launch arguments (pointers included: Triton's warmup compiles
    it, or finds it compiled), at most coop.per_sm programs an SM; None when not one group
    fits. Every program of a cooperative launch must be resident at once, and a Triton setting
    that drops the register cap (its instrumentation mode does) would leave fewer than config
    assumes."""
    import dataclasses

    from . import config

    compiled = kernel.warmup(grid=(1,), **args)
    per_sm = min(coop.per_sm, compiled_residency(compiled, device))
    groups = min(coop.groups, per_sm * config.sm_count(device) // coop.chunks)
    return dataclasses.replace(coop, groups=groups) if groups >= 1 else None


def device_guard(x: torch.Tensor):
    """Makes x's GPU the current one for the launch (triton launches on the current device)."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


# Launch plans of the eager path: (op, shapes, strides, dtypes, options, the config's test
# overrides) -> what the launcher derived from them (block choice, vector split, converted
# options). A plan is a pure function of its key (the config's limits are constants; its test
# overrides belong in the key), so a repeated signature skips that work. Bounded: the oldest
# plan goes first.
_PLANS: dict = {}
MAX_PLANS = 512


_MISSING = object()


def cached_plan(key, default=None):
    """The plan stored under key, or `default`. Under torch.compile's tracing there is no
    cache (a traced dict mutation would be replayed on the real dict later, after the real
    calls changed it), so the plan is computed afresh there."""
    if torch.compiler.is_compiling():
        return default
    return _PLANS.get(key, default)


def remember_plan(key, plan):
    """Stores (except while torch.compile traces) and returns plan."""
    if torch.compiler.is_compiling():
        return plan
    while len(_PLANS) >= MAX_PLANS:
        _PLANS.pop(next(iter(_PLANS)), None)
    _PLANS[key] = plan
    return plan


# ---------------------------------------------------------------------------------------
# Direct launches: a compiled kernel called without JITFunction.run's per-call work
# ---------------------------------------------------------------------------------------
# Triton's JITFunction.run binds every argument, computes the specialisation key (pointer
# alignment, integer values, dtypes) and looks the compiled kernel up, then calls its
# launcher: about 14 us of Python per launch on a 2-core CPU (python -m bench.host_time),
# more than this package's own host path around it. launch() does that work once per plan:
# the first launch goes through JITFunction.run, which returns the CompiledKernel; later
# launches with the same plan (the same `static` dict object), device, tensor dtypes and
# 16-byte alignments and the same other per-call values call the kernel's launcher with the
# arguments in the order JITFunction.run passes them (every parameter, defaults filled in),
# which is the same in Triton 3.6 and 3.9 (the test in tests/test_host_time.py compares the
# two calls' arguments, through a launcher that records them). The Triton settings that
# JITFunction.run reads on each call to choose the kernel (debug, instrumentation) are part
# of the key, and a kernel with pre-run hooks always goes through it. Only where that
# comparison was made: Triton 3.6 to 3.9 on CUDA (ROCm's Triton also specialises on whether
# a tensor is under 2 GB, which the key leaves out); plain eager calls only, not while
# torch.compile traces, and never in the interpreter. SOFTMAX_GPU_DIRECT_LAUNCH=0 turns it off.
_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2] if part.isdigit())
DIRECT_LAUNCH = (
    os.environ.get("SOFTMAX_GPU_DIRECT_LAUNCH", "1") != "0"
    and knobs is not None
    and (3, 6) <= _VERSION <= (3, 9)
    and torch.version.hip is None
)
_DIRECT: dict = {}
MAX_DIRECT = 512
direct_launches = 0  # how many launches took the direct path (for tests)


def launch(kernel, grid: tuple, static: dict, planned: bool, **dynamic) -> None:
    """kernel[grid](**static, **dynamic). `static`: every argument and launch option that the
    plan determines; with planned=True it is a stored plan's dict (the same object for every
    call with that plan, never changed), and the launch may be direct; `dynamic`: the rest,
    tensors and per-call values."""
    if (not (planned and DIRECT_LAUNCH and isinstance(kernel, JITFunction)) or kernel.pre_run_hooks
            or torch.compiler.is_compiling()):  # fmt: skip
        kernel[grid](**static, **dynamic)  # (the interpreter's kernels are not JITFunctions)
        return

    device = driver.active.get_current_device()
    spec = tuple((v.dtype, v.data_ptr() % 16 == 0) if isinstance(v, torch.Tensor) else v for v in dynamic.values())
    key = (id(kernel), id(static), device, tuple(dynamic), spec, _settings())
    entry = _DIRECT.get(key)
    if entry is None or entry[0] is not static:
        compiled = kernel[grid](**static, **dynamic)
        if compiled is not None:  # (None: a Triton hook took the launch over)
            _remember_direct(key, kernel, static, dynamic, compiled)
        return
    global direct_launches
    direct_launches += 1
    _, compiled, template, slots = entry
    args = list(template)
    for slot, value in zip(slots, dynamic.values()):
        args[slot] = value
    stream = driver.active.get_current_stream(device)
    grid_1 = grid[1] if len(grid) > 1 else 1
    grid_2 = grid[2] if len(grid) > 2 else 1
    enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    # The launch metadata is for the hooks alone (a profiler's, say); with none registered
    # JITFunction.run still builds it, for nothing: skipped here.
    metadata = None if _idle(enter) and _idle(leave) else compiled.launch_metadata(grid, stream, *args)
    compiled.run(grid[0], grid_1, grid_2, stream, compiled.function, compiled.packed_metadata, metadata, enter, leave,
                 *args)  # fmt: skip


def _settings() -> tuple:
    """The Triton settings JITFunction.run reads on every call that change the kernel it picks."""
    return (knobs.runtime.debug, getattr(knobs.compilation, "instrumentation_mode", None),
            getattr(knobs.compilation, "fpsan_homomorphic_casts", None), knobs.runtime.add_stages_inspection_hook)


def _idle(hook) -> bool:
    """A launch hook that calls nothing: None, or an empty chain (Triton's HookChain)."""
    return hook is None or (type(hook).__name__ == "HookChain" and not hook.calls)


def _remember_direct(key, kernel, static, dynamic, compiled) -> None:
    """Stores (static, compiled kernel, every parameter's value in order with the dynamic ones
    left as None, the dynamic ones' positions) under key; bounded like the plans."""
    names = kernel.arg_names
    template = []
    for param in kernel.params:
        name = param.name
        if name in static:
            template.append(static[name])
        elif name in dynamic:
            template.append(None)
        elif param.has_default:
            template.append(param.default)
        else:
            return  # a parameter nobody passed: JITFunction.run would have raised already
    slots = [names.index(name) for name in dynamic]
    while len(_DIRECT) >= MAX_DIRECT:
        _DIRECT.pop(next(iter(_DIRECT)), None)
    _DIRECT[key] = (static, compiled, tuple(template), slots)
