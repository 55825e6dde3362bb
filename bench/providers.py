"""Who is benchmarked: this package, torch eager, torch.compile, Liger-Kernel, QuACK, CuPy.

Each provider is a dict of the functions it offers: softmax(x), log_softmax(x),
cross_entropy(logits, target) (mean reduction), or a direct runner for an op
("softmax_bwd": (y, dy) -> dx, "ce_fwd_bwd": (logits, target) -> grad) where the provider
has no autograd. Optional providers are imported behind try/except and reported as
unavailable with the reason.
"""
import torch
import torch.nn.functional as F


def _ours():
    import softmax_gpu

    return dict(softmax=softmax_gpu.softmax, log_softmax=softmax_gpu.log_softmax, cross_entropy=softmax_gpu.cross_entropy)


def _torch():
    return dict(
        softmax=lambda x: F.softmax(x, -1),
        log_softmax=lambda x: F.log_softmax(x, -1),
        cross_entropy=lambda logits, target: F.cross_entropy(logits, target),
    )


def _torch_compile():
    import torch._dynamo

    # One compiled function per op recompiles for every shape (dynamic=False); allow that.
    for knob in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 1024)
    eager = _torch()
    return {name: torch.compile(fn, dynamic=False) for name, fn in eager.items()}


def _liger():
    from liger_kernel.transformers import LigerCrossEntropyLoss

    funcs = {"cross_entropy": LigerCrossEntropyLoss()}  # note: writes its gradient over the logits
    try:
        from liger_kernel.ops.softmax import LigerSoftmaxFunction

        funcs["softmax"] = LigerSoftmaxFunction.apply
    except ImportError:
        pass
    return funcs


def _quack():
    from quack.cross_entropy import cross_entropy
    from quack.softmax import softmax

    def mean_cross_entropy(logits, target):
        # Some QuACK releases return per-row losses; the benchmark compares mean losses.
        loss = cross_entropy(logits, target)
        return loss if loss.dim() == 0 else loss.mean()

    return dict(softmax=softmax, cross_entropy=mean_cross_entropy)


def _cupy():
    import softmax_gpu.cupy as sgc

    def as_torch(a):
        return torch.from_dlpack(a)

    def ce_fwd_bwd(logits, target):
        loss, grad = sgc.cross_entropy(logits, target)
        return as_torch(grad)

    return dict(
        softmax=lambda x: as_torch(sgc.softmax(x)),
        log_softmax=lambda x: as_torch(sgc.log_softmax(x)),
        softmax_bwd=lambda y, dy: as_torch(sgc.softmax_backward(y, dy)),
        ce_fwd_bwd=ce_fwd_bwd,
    )


FACTORIES = {
    "softmax_gpu": _ours,
    "torch": _torch,
    "torch.compile": _torch_compile,
    "liger": _liger,
    "quack": _quack,
    "cupy": _cupy,
}


def load(names):
    """{name: funcs} for the providers that import, and {name: reason} for those that do not."""
    loaded, missing = {}, {}
    for name in names:
        try:
            loaded[name] = FACTORIES[name]()
        except Exception as exc:  # an optional dependency may fail in many ways
            missing[name] = f"{type(exc).__name__}: {exc}"
    return loaded, missing
