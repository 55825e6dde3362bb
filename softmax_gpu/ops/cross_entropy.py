"""Fused softmax cross-entropy: launchers, PyTorch custom ops, autograd, and cross_entropy().

Layers, top to bottom:
  launch_cross_entropy / launch_scale_grad  fill preallocated buffers (one launcher per kernel)
  softmax_gpu::cross_entropy_forward[_inplace], softmax_gpu::cross_entropy_scale_grad   custom ops
  CrossEntropyFunction                      autograd: the forward stores the gradient, the
                                            backward scales it by the upstream gradient
  cross_entropy()                           checks and torch.nn.functional's signature

Under any tracer (torch.compile, export, make_fx, FakeTensorMode, jit.trace), any active
dispatch mode, tensor subclasses or functorch transforms, the Function calls the custom ops,
which is what those need. For plain tensors in plain eager mode it calls the same Python
implementations directly (`_plain_eager`): the dispatcher round trip of a Python custom op
costs tens of microseconds per call, which the first H100 run showed to dominate a
forward+backward (about 1 ms of host time around a 255 us kernel at 32768 x 4096).
Mutations are then reported to autograd by hand (increment_version), as the custom op would.

Forward plus backward reads the logits once and writes the gradient once (when a row
fits one block); the backward's scaling costs nothing when the upstream gradient is 1.
"""
import os
from typing import Optional

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .. import config
from ..checks import check_floating, check_same_device, check_tensor
from ..kernels.cross_entropy import cross_entropy_kernel, scale_grad_kernel
from ..layout import as_rows
from ..runtime import check_launchable, device_guard

REDUCTIONS = ("none", "mean", "sum")
# On CUDA a bad class index costs a host sync to catch eagerly, so by default it shows up as a
# NaN loss for its row (and so a NaN mean). SOFTMAX_GPU_CHECK_TARGETS=1 checks before launching.
CHECK_TARGETS_ON_CUDA = os.environ.get("SOFTMAX_GPU_CHECK_TARGETS", "0") == "1"


def cross_entropy_config(n_cols: int) -> config.RowConfig:
    """Launch configuration of both cross-entropy kernels for rows of n_cols classes."""
    return config.row_config(
        n_cols,
        config.MAX_BLOCK_CROSS_ENTROPY,
        loop_block_n=config.LOOP_BLOCK_CROSS_ENTROPY,
        elements_per_thread=config.ELEMENTS_PER_THREAD_CROSS_ENTROPY,
    )


def launch_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    loss: torch.Tensor,
    lse: torch.Tensor,
    grad: Optional[torch.Tensor],
    grad_divisor: Optional[torch.Tensor],
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    cfg: Optional[config.RowConfig] = None,
) -> config.RowConfig:
    """Per-row loss and lse (float32) and, when grad is given, the gradient (may be logits itself).

    logits (N, C) with unit column stride; target (N,) class indices or (N, C) probabilities
    with unit column stride; grad_divisor None, or a float32 device scalar the gradient is
    divided by (the mean's total weight). Returns the RowConfig used.
    Bytes: N*C reads (+ N*C writes with grad) + O(N) on the single-block path.
    """
    n_rows, n_cols = logits.shape
    cfg = cfg or cross_entropy_config(n_cols)
    soft = target.is_floating_point()
    check_launchable("softmax_gpu.cross_entropy", cross_entropy_kernel, logits)
    with device_guard(logits):
        cross_entropy_kernel[(n_rows,)](
            logits_ptr=logits,
            target_ptr=target,
            weight_ptr=weight if weight is not None else loss,  # never read without HAS_WEIGHT
            loss_ptr=loss,
            lse_ptr=lse,
            grad_ptr=grad if grad is not None else loss,  # never written without COMPUTE_GRAD
            logits_row_stride=logits.stride(0),
            target_row_stride=target.stride(0),
            grad_row_stride=grad.stride(0) if grad is not None else 0,
            grad_divisor_ptr=grad_divisor if grad_divisor is not None else loss,  # read only with DIVIDE_GRAD
            n_cols=n_cols,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap or 0.0,
            SOFT_TARGET=soft,
            HAS_WEIGHT=weight is not None,
            HAS_SMOOTHING=label_smoothing > 0,
            HAS_Z_LOSS=z_loss != 0,
            HAS_SOFTCAP=softcap is not None,
            COMPUTE_GRAD=grad is not None,
            DIVIDE_GRAD=grad is not None and grad_divisor is not None,
            BLOCK_N=cfg.block_n,
            SINGLE_BLOCK=cfg.single_block,
            num_warps=cfg.num_warps,
        )
    return cfg


def launch_scale_grad(grad: torch.Tensor, upstream: torch.Tensor, cfg: Optional[config.RowConfig] = None):
    """grad[r] *= upstream[r] in place; a 0-d upstream scales every row. Rows whose factor is
    exactly 1 are left untouched without being read."""
    n_rows, n_cols = grad.shape
    cfg = cfg or cross_entropy_config(n_cols)
    check_launchable("softmax_gpu.cross_entropy backward", scale_grad_kernel, grad)
    with device_guard(grad):
        scale_grad_kernel[(n_rows,)](
            grad_ptr=grad,
            upstream_ptr=upstream,
            grad_row_stride=grad.stride(0),
            upstream_stride=upstream.stride(0) if upstream.dim() else 0,
            n_cols=n_cols,
            BLOCK_N=cfg.block_n,
            num_warps=cfg.num_warps,
        )
    return cfg


def _bad_class_indices(target: torch.Tensor, n_classes: int, ignore_index: int) -> torch.Tensor:
    """Where a class index is neither in [0, n_classes) nor ignore_index (bool, on device)."""
    return ((target < 0) | (target >= n_classes)) & (target != ignore_index)


def _check_class_indices(target: torch.Tensor, n_classes: int, ignore_index: int) -> None:
    """Eager range check: free on CPU; on CUDA only with SOFTMAX_GPU_CHECK_TARGETS=1 (it syncs)."""
    if target.is_floating_point() or (target.device.type == "cuda" and not CHECK_TARGETS_ON_CUDA):
        return
    bad = _bad_class_indices(target, n_classes, ignore_index)
    if bad.any():
        raise IndexError(f"Target {target[bad][0].item()} is out of bounds.")


def _total_weight(target: torch.Tensor, weight: Optional[torch.Tensor], ignore_index: int) -> torch.Tensor:
    """The denominator of reduction="mean", on device (no sync): the summed class weight of the
    rows that are not ignored (their count without weights), or the row count for
    probability targets. Two small launches in the common case (compare, sum)."""
    if target.is_floating_point():
        return torch.full((), float(target.shape[0]), dtype=torch.float32, device=target.device)
    valid = target != ignore_index
    if weight is None:
        return valid.sum(dtype=torch.float32)
    # Never index with an unchecked class index: on CUDA an out-of-range one would trip a
    # device-side assert and kill the context. A bad row makes the total NaN instead (its
    # loss is NaN too, so the mean is NaN either way, and so is every gradient).
    n_classes = weight.shape[0]
    w_t = weight.float()[target.clamp(0, n_classes - 1)]
    return torch.where(_bad_class_indices(target, n_classes, ignore_index), float("nan"), w_t * valid).sum()


def _forward(logits, target, weight, grad_divisor, ignore_index, label_smoothing, z_loss, softcap, grad):
    """Shared body of the two forward ops: returns (loss rows, lse), fills grad if given."""
    n_rows, n_classes = logits.shape
    _check_class_indices(target, n_classes, ignore_index)
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows:
        launch_cross_entropy(
            logits, target, weight, loss, lse, grad, grad_divisor, ignore_index, label_smoothing, z_loss, softcap
        )
    return loss, lse


def _cross_entropy_forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    grad_divisor: Optional[torch.Tensor],
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per row, lse, gradient of the summed loss divided by grad_divisor, or an empty
    tensor) for 2-D logits."""
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if compute_grad else None
    loss, lse = _forward(logits, target, weight, grad_divisor, ignore_index, label_smoothing, z_loss, softcap, grad)
    return loss, lse, grad if grad is not None else logits.new_empty(0)


cross_entropy_forward = torch.library.custom_op(
    "softmax_gpu::cross_entropy_forward", _cross_entropy_forward, mutates_args=()
)


def _fake_stats(logits):
    """Shapes of (loss per row, lse): float32 (N,) and (N,)."""
    f32 = dict(dtype=torch.float32, device=logits.device)
    n_rows = logits.shape[0]
    return logits.new_empty(n_rows, **f32), logits.new_empty(n_rows, **f32)


@cross_entropy_forward.register_fake
def _(logits, target, weight, grad_divisor, ignore_index, label_smoothing, z_loss, softcap, compute_grad):
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if compute_grad else logits.new_empty(0)
    return (*_fake_stats(logits), grad)


def _cross_entropy_forward_inplace(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    grad_divisor: Optional[torch.Tensor],
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """As cross_entropy_forward, but the gradient overwrites the logits (no N x C buffer)."""
    return _forward(logits, target, weight, grad_divisor, ignore_index, label_smoothing, z_loss, softcap, logits)


cross_entropy_forward_inplace = torch.library.custom_op(
    "softmax_gpu::cross_entropy_forward_inplace", _cross_entropy_forward_inplace, mutates_args=("logits",)
)


@cross_entropy_forward_inplace.register_fake
def _(logits, target, weight, grad_divisor, ignore_index, label_smoothing, z_loss, softcap):
    return _fake_stats(logits)


def _cross_entropy_scale_grad(grad: torch.Tensor, upstream: torch.Tensor) -> None:
    """grad (N, C) *= upstream ((N,) or scalar) in place, skipping rows scaled by exactly 1."""
    if grad.numel():
        launch_scale_grad(grad, upstream)


cross_entropy_scale_grad = torch.library.custom_op(
    "softmax_gpu::cross_entropy_scale_grad", _cross_entropy_scale_grad, mutates_args=("grad",)
)


@cross_entropy_scale_grad.register_fake
def _(grad, upstream):
    return None


def _plain_eager(*tensors) -> bool:
    """True when the ops may skip the dispatcher: no compiler, tracer or dispatch mode is
    active and every tensor is a plain torch.Tensor (or Parameter) outside functorch."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or _get_current_dispatch_mode() is not None:
        return False
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN_TENSOR_TYPES or _is_functorch_wrapped(t)):
            return False
    return True


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
_is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


class CrossEntropyFunction(torch.autograd.Function):
    """Forward computes the loss and stores d loss / d logits; backward scales it by the upstream gradient."""

    @staticmethod
    def forward(ctx, logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, inplace):
        compute_grad = ctx.needs_input_grad[0]
        eager = _plain_eager(logits, target, weight)
        total = _total_weight(target, weight, ignore_index) if reduction == "mean" else None
        options = (ignore_index, label_smoothing, z_loss, softcap)
        if compute_grad and inplace:
            # Declared as mutating `logits`, so its version counter is bumped: anything else in
            # the graph that saved the logits' values fails autograd's version check at
            # backward instead of silently using the gradient. (mark_dirty is not used because
            # a Function that dirties a view may return only that one tensor.)
            op = _cross_entropy_forward_inplace if eager else cross_entropy_forward_inplace
            loss, lse = op(logits, target, weight, total, *options)
            if eager:
                torch.autograd.graph.increment_version(logits)
            grad = logits
        else:
            op = _cross_entropy_forward if eager else cross_entropy_forward
            loss, lse, grad = op(logits, target, weight, total, *options, compute_grad)
        if compute_grad:
            ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(lse)
        ctx.backward_done = False
        if reduction == "mean":
            loss = loss.sum() / total
        elif reduction == "sum":
            loss = loss.sum()
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        if ctx.backward_done:
            raise RuntimeError(
                "softmax_gpu.cross_entropy: backward ran twice through the same graph; the fused loss "
                "stores its gradient once, so run the forward again instead of retain_graph=True"
            )
        ctx.backward_done = True
        (grad,) = ctx.saved_tensors
        upstream = grad_loss.float() if grad_loss.dim() == 0 else grad_loss.reshape(-1).float()
        if _plain_eager(grad, upstream):
            _cross_entropy_scale_grad(grad, upstream)
            torch.autograd.graph.increment_version(grad)
        else:
            cross_entropy_scale_grad(grad, upstream)
        return grad, None, None, None, None, None, None, None, None


def _check_options(fn, reduction, label_smoothing, z_loss, softcap, ignore_index):
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}(): {reduction!r} is not a valid value for reduction (expected one of {REDUCTIONS})")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{fn}(): label_smoothing must be between 0.0 and 1.0, but got {label_smoothing}")
    if not (z_loss >= 0.0 and z_loss != float("inf")):
        raise ValueError(f"{fn}(): z_loss must be a finite number >= 0, but got {z_loss}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{fn}(): softcap must be None or > 0, but got {softcap}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{fn}(): ignore_index must be an int, but got {type(ignore_index).__name__}")


def _check_target(fn, logits, target):
    check_tensor(fn, "target", target)
    class_shape = logits.shape[:1] + logits.shape[2:] if logits.dim() > 1 else torch.Size([])
    if target.is_floating_point():
        if target.shape != logits.shape:
            raise ValueError(
                f"{fn}(): probability targets must have the input's shape {tuple(logits.shape)}, got {tuple(target.shape)}"
            )
    elif target.dtype in (torch.int64, torch.int32):
        if target.shape != class_shape:
            raise ValueError(
                f"{fn}(): expected class-index target of shape {tuple(class_shape)} for input of shape "
                f"{tuple(logits.shape)}, got {tuple(target.shape)}"
            )
    else:
        raise TypeError(f"{fn}(): target must hold class indices (int64 or int32) or probabilities, got {target.dtype}")


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """Fused softmax cross-entropy with torch.nn.functional.cross_entropy's semantics.

    Args:
        input: logits (C,), (N, C) or (N, C, d1, ...), classes along dim 1; float32/16/bfloat16.
        target: class indices (int64/int32) shaped like input without the class dim, or
            class probabilities shaped like input.
        weight: (C,) class weights; ignore_index: target value that contributes nothing;
        reduction: "none" | "mean" | "sum"; label_smoothing in [0, 1]: as in torch.
        z_loss: adds z_loss * lse^2 per row (times the row's class weight), PaLM's auxiliary loss.
        softcap: logits -> softcap * tanh(logits / softcap) before the softmax (Gemma 2).
        inplace_backward: write the gradient over `input` (saves an N x C buffer). `input`
            then holds the gradient: autograd raises if anything else needed its values, and
            it must not be a leaf that requires grad.
    Returns:
        float32 loss: a scalar, or the target's shape for reduction="none".

    The forward reads the logits once and, when they require grad, writes the gradient in
    the same pass; no host synchronisation anywhere. A class index out of range gives a NaN
    loss for its row on CUDA (an IndexError on CPU, or on CUDA with SOFTMAX_GPU_CHECK_TARGETS=1).
    """
    fn = "softmax_gpu.cross_entropy"
    check_floating(fn, "input", input)
    if input.dim() == 0:
        raise ValueError(f"{fn}(): input must have at least one dim (the classes)")
    _check_target(fn, input, target)
    if weight is not None:
        check_floating(fn, "weight", weight)
        n_classes = input.shape[1] if input.dim() > 1 else input.shape[0]
        if weight.shape != (n_classes,):
            raise ValueError(f"{fn}(): weight must have shape ({n_classes},), got {tuple(weight.shape)}")
    check_same_device(fn, input=input, target=target, weight=weight)
    _check_options(fn, reduction, label_smoothing, z_loss, softcap, ignore_index)

    class_dim = 1 if input.dim() > 1 else 0
    rows = as_rows(input, class_dim)  # (N * d1 * ..., C), ordered like the target
    if inplace_backward and input.requires_grad and torch.is_grad_enabled():
        if input.is_leaf:
            raise ValueError(f"{fn}(): inplace_backward=True would overwrite a leaf tensor that requires grad")
        if rows.untyped_storage().data_ptr() != input.untyped_storage().data_ptr():
            raise ValueError(f"{fn}(): inplace_backward=True needs logits whose class dim has stride 1")
    tgt = as_rows(target, class_dim) if target.is_floating_point() else target.reshape(-1)
    if weight is not None:
        weight = weight.contiguous()  # the kernel reads weight[j] at unit stride
    softcap = None if softcap is None else float(softcap)
    loss, _lse = CrossEntropyFunction.apply(
        rows, tgt, weight, ignore_index, reduction, float(label_smoothing), float(z_loss), softcap, inplace_backward
    )
    if reduction == "none":  # rows were ordered (N, d1, ...), the target's own order
        return loss.view(input.shape[:1] + input.shape[2:] if input.dim() > 1 else ())
    return loss
