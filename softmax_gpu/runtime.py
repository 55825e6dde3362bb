"""Where kernels can run: CUDA tensors on the GPU, CPU tensors in Triton's interpreter."""
import contextlib

import torch


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
