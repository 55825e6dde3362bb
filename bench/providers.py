"""Who is benchmarked: this package, torch eager, torch.compile, Liger-Kernel, QuACK, CuPy.

Each provider offers some of: softmax(x), log_softmax(x), cross_entropy(logits, target)
(mean reduction), or a direct runner for an op where it has no autograd ("softmax_bwd":
(y, dy) -> dx, "ce_fwd_bwd": (logits, target) -> grad). A provider without autograd says
so in its label, which is the name every table shows. A provider that writes over its
input (Liger's cross-entropy stores the gradient in the logits) is marked, and the sweep
gives it a fresh copy of the input before every call, outside the timed region. Optional
providers are imported behind try/except and reported as unavailable with the reason.
"""
import dataclasses

import torch
import torch.nn.functional as F


@dataclasses.dataclass
class Provider:
    name: str  # what --providers takes
    funcs: dict
    label: str = ""  # the name in tables; defaults to name
    overwrites_input: frozenset = frozenset()  # ops whose call writes over the logits
    no_graph_ops: dict = dataclasses.field(default_factory=dict)  # op -> why it cannot be captured in a CUDA graph

    def __post_init__(self):
        self.label = self.label or self.name


def _ours():
    import softmax_gpu

    return Provider("softmax_gpu", dict(softmax=softmax_gpu.softmax, log_softmax=softmax_gpu.log_softmax,
                                        cross_entropy=softmax_gpu.cross_entropy))  # fmt: skip


def _torch_funcs():
    return dict(
        softmax=lambda x: F.softmax(x, -1),
        log_softmax=lambda x: F.log_softmax(x, -1),
        cross_entropy=lambda logits, target: F.cross_entropy(logits, target),
    )


def _torch():
    return Provider("torch", _torch_funcs())


def _torch_compile():
    import torch._dynamo

    # One compiled function per op recompiles for every shape (dynamic=False); allow that.
    for knob in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 1024)
    funcs = {name: torch.compile(fn, dynamic=False) for name, fn in _torch_funcs().items()}
    return Provider("torch.compile", funcs)


def _liger():
    from liger_kernel.transformers import LigerCrossEntropyLoss

    funcs = {"cross_entropy": LigerCrossEntropyLoss()}
    try:
        from liger_kernel.ops.softmax import LigerSoftmaxFunction

        funcs["softmax"] = LigerSoftmaxFunction.apply
    except ImportError:
        pass
    # Its cross-entropy forward stores the gradient in the logits it is given (when they
    # require grad), and reads a count back to the host (.item()) in the forward and compares
    # the upstream gradient on the host (torch.equal) in the backward: eager time only.
    return Provider("liger", funcs, overwrites_input=frozenset({"ce_fwd", "ce_fwd_bwd"}),
                    no_graph_ops={"ce_fwd": "host syncs in its cross-entropy (.item(), torch.equal)",
                                  "ce_fwd_bwd": "host syncs in its cross-entropy (.item(), torch.equal)"})  # fmt: skip


def _quack():
    from quack.cross_entropy import cross_entropy
    from quack.softmax import softmax

    def mean_cross_entropy(logits, target):
        # Some QuACK releases return per-row losses; the benchmark compares mean losses.
        loss = cross_entropy(logits, target)
        return loss if loss.dim() == 0 else loss.mean()

    return Provider("quack", dict(softmax=softmax, cross_entropy=mean_cross_entropy))


def _cupy():
    import cupy

    import softmax_gpu.cupy as sgc

    def on_torch_stream(fn):
        """CuPy launches on its own current stream; put it on torch's, so the calls are ordered
        with torch's work and land in a CUDA graph being captured there."""

        def call(*args):
            with cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
                return fn(*args)

        return call

    if torch.cuda.is_available():
        _cupy_allocates_through_torch(cupy)

    def ce_fwd_bwd(logits, target):
        loss, grad = sgc.cross_entropy(logits, target)
        return torch.from_dlpack(grad)

    funcs = dict(
        softmax=lambda x: torch.from_dlpack(sgc.softmax(x)),
        log_softmax=lambda x: torch.from_dlpack(sgc.log_softmax(x)),
        softmax_bwd=lambda y, dy: torch.from_dlpack(sgc.softmax_backward(y, dy)),
        ce_fwd_bwd=ce_fwd_bwd,
    )
    if torch.cuda.is_available():
        funcs = {name: on_torch_stream(fn) for name, fn in funcs.items()}
    return Provider("cupy", funcs, label="cupy (no autograd)")


def _cupy_allocates_through_torch(cupy) -> None:
    """CuPy's own pool keeps an arena per stream that torch cannot see or free, and calls
    cudaMalloc inside a CUDA graph capture; through torch's caching allocator CuPy's memory
    is counted in the peak-memory column, freed by empty_cache, and taken from the graph's
    pool while one is captured."""

    class _Block:
        def __init__(self, size):
            self.ptr = torch.cuda.caching_allocator_alloc(size, stream=torch.cuda.current_stream())

        def __del__(self):
            torch.cuda.caching_allocator_delete(self.ptr)

    def allocate(size):
        block = _Block(size)
        memory = cupy.cuda.memory.UnownedMemory(block.ptr, size, block, torch.cuda.current_device())
        return cupy.cuda.memory.MemoryPointer(memory, 0)

    cupy.cuda.set_allocator(allocate)


FACTORIES = {
    "softmax_gpu": _ours,
    "torch": _torch,
    "torch.compile": _torch_compile,
    "liger": _liger,
    "quack": _quack,
    "cupy": _cupy,
}


def load(names):
    """{name: Provider} for the providers that import, and {name: reason} for those that do not."""
    loaded, missing = {}, {}
    for name in names:
        try:
            loaded[name] = FACTORIES[name]()
        except Exception as exc:  # an optional dependency may fail in many ways
            missing[name] = f"{type(exc).__name__}: {exc}"
    return loaded, missing
