"""Fused linear + cross-entropy: launchers, PyTorch custom ops, autograd, and linear_cross_entropy().

Layers, top to bottom:
  launch_forward / launch_backward_input / launch_backward_weight   fill preallocated buffers
                                            (one launcher per kernel)
  softmax_gpu::linear_cross_entropy_forward, softmax_gpu::linear_cross_entropy_backward
                                            custom ops with fake implementations, so
                                            torch.compile(fullgraph=True) traces them
  LinearCrossEntropyFunction                autograd: the forward saves the input, the weights
                                            and four floats a row; the backward recomputes
  linear_cross_entropy()                    checks and torch.nn.functional's signature

Memory: besides its outputs the forward allocates O(N) floats (loss, lse, the row
statistics) and the backward O(N + V) plus the gradients themselves, accumulated in float32
(for 16-bit inputs a float32 buffer of each requested gradient, then cast). No N x V tensor
exists at any point, and nothing syncs with the host.
"""
from typing import Optional

import torch

from .. import config
from ..checks import check_floating, check_same_device, check_tensor
from ..kernels.linear_cross_entropy import (
    N_STATS,
    linear_cross_entropy_bwd_input_kernel,
    linear_cross_entropy_bwd_weight_kernel,
    linear_cross_entropy_fwd_kernel,
)
from ..runtime import check_launchable, device_guard
from .cross_entropy import _check_class_indices, _check_options, _total_weight, zero_class_reduce, zero_class_rows

FN = "softmax_gpu.linear_cross_entropy"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _input_precision(x: torch.Tensor) -> str:
    """tl.dot's precision. float32 follows torch's TF32 switch for matmuls: TF32 when it is on,
    as F.linear; when it is off (torch's default), 3xTF32, float32-level accuracy on tensor
    cores (Triton's exact "ieee" products run on FMA units and spilled registers in every
    tile shape tried). 16-bit products are exact in float32 either way."""
    if x.dtype != torch.float32:
        return "ieee"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def _common_args(x, w, b, target, weight):
    """Keyword arguments every kernel takes: the operands, their strides and sizes."""
    soft = target.is_floating_point()
    return dict(
        x_ptr=x,
        w_ptr=w,
        b_ptr=b if b is not None else w,  # never read without HAS_BIAS
        target_ptr=target,
        weight_ptr=weight if weight is not None else w,  # never read without HAS_WEIGHT
        n_rows=x.shape[0],
        n_cols=w.shape[0],
        hidden=x.shape[1],
        stride_xm=x.stride(0),
        stride_xk=x.stride(1),
        stride_wv=w.stride(0),
        stride_wk=w.stride(1),
        stride_tm=target.stride(0),
        stride_tv=target.stride(1) if soft else 0,
        SOFT_TARGET=soft,
        HAS_BIAS=b is not None,
        HAS_WEIGHT=weight is not None,
        INPUT_PRECISION=_input_precision(x),
    )


def _tiles(kernel: str, x: torch.Tensor, w: torch.Tensor) -> config.TileConfig:
    return config.linear_cross_entropy_tiles(kernel, x.element_size(), x.shape[0], w.shape[0], x.shape[1])


def launch_forward(x, w, b, target, weight, loss, lse, stats, ignore_index, label_smoothing, z_loss, softcap):
    """Per-row loss and lse (float32, (N,)) of x (N, H) W^T (V, H) + b; with stats ((4, N)
    float32, else None) also what the backward needs. Returns the TileConfig used.
    Reads: x once per vocabulary tile, W once per row tile; writes O(N)."""
    cfg = _tiles("forward", x, w)
    check_launchable(FN, linear_cross_entropy_fwd_kernel, x)
    grid = (triton_cdiv(x.shape[0], cfg.block_m),)
    with device_guard(x):
        linear_cross_entropy_fwd_kernel[grid](
            **_common_args(x, w, b, target, weight),
            loss_ptr=loss,
            lse_ptr=lse,
            stats_ptr=stats if stats is not None else loss,  # never written without COMPUTE_STATS
            stride_stats=stats.stride(0) if stats is not None else 0,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap or 0.0,
            HAS_SMOOTHING=label_smoothing > 0,
            HAS_Z_LOSS=z_loss != 0,
            HAS_SOFTCAP=softcap is not None,
            COMPUTE_STATS=stats is not None,
            BLOCK_M=cfg.block_m,
            BLOCK_V=cfg.block_v,
            BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    return cfg


def _backward_args(stats, upstream, divisor, ignore_index, label_smoothing, softcap, shard, grad_skip_threshold):
    """shard: None, or (col_start, n_classes) for a vocabulary shard (the vocab-parallel op);
    grad_skip_threshold: None, or skip the tiles whose every |gradient| is below it."""
    return dict(
        grad_skip_threshold=grad_skip_threshold if grad_skip_threshold is not None else 0.0,  # read only with SKIP_SMALL
        SKIP_SMALL=grad_skip_threshold is not None,
        col_start=shard[0] if shard is not None else 0,  # read only with SHARDED
        n_classes=shard[1] if shard is not None else 0,
        SHARDED=shard is not None,
        stats_ptr=stats,
        upstream_ptr=upstream,
        divisor_ptr=divisor if divisor is not None else stats,  # read only with DIVIDE
        stride_stats=stats.stride(0),
        stride_up=upstream.stride(0) if upstream.dim() else 0,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        softcap=softcap or 0.0,
        HAS_SMOOTHING=label_smoothing > 0,
        HAS_SOFTCAP=softcap is not None,
        DIVIDE=divisor is not None,
    )


def launch_backward_input(x, w, b, target, weight, stats, upstream, divisor, dx, ignore_index, label_smoothing, softcap,
                          shard=None, grad_skip_threshold=None, fn=FN):  # fmt: skip
    """dx (N, H) float32, unit column stride, = G W with G = d loss / d logits times
    upstream / divisor (upstream a scalar or (N,), divisor None or a float32 scalar).
    shard=(col_start, n_classes): w, b and weight are classes [col_start, col_start + V_local)
    of n_classes, target holds global class indices and stats the full problem's rows.
    grad_skip_threshold (a float >= 0, or None: off): leave out the [rows x classes] tiles
    of G whose every |element| is below it (CCE-style; changes the result). fn: the public
    function served, for the error messages."""
    cfg = _tiles("backward_input", x, w)
    check_launchable(fn, linear_cross_entropy_bwd_input_kernel, x)
    grid = (triton_cdiv(x.shape[0], cfg.block_m),)
    with device_guard(x):
        linear_cross_entropy_bwd_input_kernel[grid](
            **_common_args(x, w, b, target, weight),
            **_backward_args(stats, upstream, divisor, ignore_index, label_smoothing, softcap, shard,
                             grad_skip_threshold),
            dx_ptr=dx,
            stride_dxm=dx.stride(0),
            BLOCK_M=cfg.block_m,
            BLOCK_V=cfg.block_v,
            BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    return cfg


def launch_backward_weight(x, w, b, target, weight, stats, upstream, divisor, dw, db, ignore_index, label_smoothing,
                           softcap, shard=None, grad_skip_threshold=None, fn=FN):  # fmt: skip
    """dw (V, H) float32 = G^T x and/or db (V,) float32 = G summed over the rows (either may be
    None, not both); G, shard and grad_skip_threshold as in launch_backward_input. Needs at
    least one row."""
    cfg = _tiles("backward_weight", x, w)
    check_launchable(fn, linear_cross_entropy_bwd_weight_kernel, x)
    grid = (triton_cdiv(w.shape[0], cfg.block_v),)
    with device_guard(x):
        linear_cross_entropy_bwd_weight_kernel[grid](
            **_common_args(x, w, b, target, weight),
            **_backward_args(stats, upstream, divisor, ignore_index, label_smoothing, softcap, shard,
                             grad_skip_threshold),
            dw_ptr=dw if dw is not None else stats,  # never touched without COMPUTE_DW
            db_ptr=db if db is not None else stats,  # never written without COMPUTE_DB
            stride_dwv=dw.stride(0) if dw is not None else 0,
            COMPUTE_DW=dw is not None,
            COMPUTE_DB=db is not None,
            BLOCK_M=cfg.block_m,
            BLOCK_V=cfg.block_v,
            BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    return cfg


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------


def _forward(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: Optional[torch.Tensor],
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    compute_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per row, lse, statistics for the backward (4, N) or an empty tensor), float32,
    for input (N, H), linear_weight (V, H), target (N,) class indices or (N, V) probabilities."""
    n_rows, n_classes = input.shape[0], linear_weight.shape[0]
    _check_class_indices(target, n_classes, ignore_index)
    f32 = dict(dtype=torch.float32, device=input.device)
    loss = torch.empty(n_rows, **f32)
    lse = torch.empty(n_rows, **f32)
    stats = torch.empty(N_STATS, n_rows, **f32) if compute_stats else None
    if n_classes == 0:  # torch's values for no classes (cross_entropy.zero_class_rows); nothing to launch
        loss = zero_class_rows(target, ignore_index, label_smoothing, z_loss, torch.float32)
        lse.fill_(float("-inf"))
        if stats is not None:
            stats.zero_()  # never read: the backward launches nothing either
    elif n_rows:
        launch_forward(input, linear_weight, linear_bias, target, weight, loss, lse, stats, ignore_index,
                       label_smoothing, z_loss, softcap)  # fmt: skip
    return loss, lse, stats if stats is not None else loss.new_empty(0)


linear_cross_entropy_forward = torch.library.custom_op(
    "softmax_gpu::linear_cross_entropy_forward", _forward, mutates_args=()
)


@linear_cross_entropy_forward.register_fake
def _(input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing, z_loss, softcap,
      compute_stats):  # fmt: skip
    n_rows = input.shape[0]
    f32 = dict(dtype=torch.float32, device=input.device)
    stats = input.new_empty(N_STATS, n_rows, **f32) if compute_stats else input.new_empty(0, **f32)
    return input.new_empty(n_rows, **f32), input.new_empty(n_rows, **f32), stats


def _backward(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: Optional[torch.Tensor],
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    stats: torch.Tensor,
    upstream: torch.Tensor,
    grad_divisor: Optional[torch.Tensor],
    ignore_index: int,
    label_smoothing: float,
    softcap: Optional[float],
    input_grad: bool,
    weight_grad: bool,
    bias_grad: bool,
    grad_skip_threshold: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of sum_r upstream_r loss_r / grad_divisor (upstream a float32 scalar or (N,))
    with respect to input, linear_weight and linear_bias, in their dtypes; an empty tensor
    for each one not asked for. grad_skip_threshold: see launch_backward_input."""
    n_rows, hidden = input.shape
    n_classes = linear_weight.shape[0]
    f32 = dict(dtype=torch.float32, device=input.device)
    options = (ignore_index, label_smoothing, softcap)
    operands = (input, linear_weight, linear_bias, target, weight, stats, upstream, grad_divisor)
    dx = dw = db = None
    if input_grad:
        dx = torch.empty(n_rows, hidden, **f32)
        if n_classes == 0:  # dX = G W over no classes
            dx.zero_()
        elif n_rows:
            launch_backward_input(*operands, dx, *options, grad_skip_threshold=grad_skip_threshold)
    if weight_grad or bias_grad:
        dw = torch.empty(n_classes, hidden, **f32) if weight_grad else None
        db = torch.empty(n_classes, **f32) if bias_grad else None
        if n_rows and n_classes:
            launch_backward_weight(*operands, dw, db, *options, grad_skip_threshold=grad_skip_threshold)
        else:  # an empty batch (no row tile to start the sums from) or no classes
            dw = dw.zero_() if dw is not None else None
            db = db.zero_() if db is not None else None
    return (
        dx.to(input.dtype) if dx is not None else input.new_empty(0),  # one empty tensor each: outputs must not alias
        dw.to(linear_weight.dtype) if dw is not None else input.new_empty(0),
        db.to(linear_bias.dtype) if db is not None else input.new_empty(0),
    )


linear_cross_entropy_backward = torch.library.custom_op(
    "softmax_gpu::linear_cross_entropy_backward", _backward, mutates_args=()
)


@linear_cross_entropy_backward.register_fake
def _(input, linear_weight, linear_bias, target, weight, stats, upstream, grad_divisor, ignore_index,
      label_smoothing, softcap, input_grad, weight_grad, bias_grad, grad_skip_threshold=None):  # fmt: skip
    return (
        torch.empty_like(input, memory_format=torch.contiguous_format) if input_grad else input.new_empty(0),
        torch.empty_like(linear_weight, memory_format=torch.contiguous_format) if weight_grad else input.new_empty(0),
        torch.empty_like(linear_bias, memory_format=torch.contiguous_format) if bias_grad else input.new_empty(0),
    )


# ---------------------------------------------------------------------------------------
# Autograd and the public function
# ---------------------------------------------------------------------------------------


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Forward: loss and per-row statistics, no logits kept. Backward: recomputes the logits
    tile by tile for the gradients that are needed (may run more than once: nothing is consumed)."""

    @staticmethod
    def forward(ctx, input, linear_weight, linear_bias, target, weight, ignore_index, reduction, label_smoothing,
                z_loss, softcap, grad_skip_threshold=None):  # fmt: skip
        needs = ctx.needs_input_grad[:3]
        total = _total_weight(target, weight, ignore_index) if reduction == "mean" else None
        loss, lse, stats = linear_cross_entropy_forward(
            input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing, z_loss, softcap, any(needs)
        )
        if any(needs):
            ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, stats, total)
        ctx.options = (ignore_index, label_smoothing, softcap)
        ctx.grad_skip_threshold = grad_skip_threshold
        ctx.mark_non_differentiable(lse)
        if reduction != "none" and linear_weight.shape[0] == 0:
            loss = zero_class_reduce(loss, target.is_floating_point(), label_smoothing, reduction)
        elif reduction == "mean":
            loss = loss.sum() / total
        elif reduction == "sum":
            loss = loss.sum()
        return loss, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_lse):
        input, linear_weight, linear_bias, target, weight, stats, total = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        upstream = grad_loss.float() if grad_loss.dim() == 0 else grad_loss.reshape(-1).float()
        dx, dw, db = linear_cross_entropy_backward(
            input, linear_weight, linear_bias, target, weight, stats, upstream, total, *ctx.options,
            needs[0], needs[1], needs[2] and linear_bias is not None, ctx.grad_skip_threshold,
        )  # fmt: skip
        return (
            dx if needs[0] else None,
            dw if needs[1] else None,
            db if needs[2] and linear_bias is not None else None,
            None, None, None, None, None, None, None, None,
        )  # fmt: skip


def _check_operands(fn, input, linear_weight, target, linear_bias, weight, allow_no_classes=False):
    check_floating(fn, "input", input)
    check_floating(fn, "linear_weight", linear_weight)
    check_tensor(fn, "target", target)
    if input.dtype not in DTYPES:
        raise TypeError(f"{fn}(): input must be float32, float16 or bfloat16, got {input.dtype}")
    if input.dim() == 0:
        raise ValueError(f"{fn}(): input must have at least one dim (the hidden features)")
    if linear_weight.dim() != 2 or linear_weight.shape[1] != input.shape[-1]:
        raise ValueError(
            f"{fn}(): linear_weight must have shape (num_classes, {input.shape[-1]}) for input of shape "
            f"{tuple(input.shape)}, got {tuple(linear_weight.shape)}"
        )
    n_classes = linear_weight.shape[0]
    if n_classes == 0 and not allow_no_classes:
        raise ValueError(f"{fn}(): linear_weight must have at least one class (row)")
    if linear_weight.dtype != input.dtype:
        raise TypeError(f"{fn}(): input and linear_weight must have the same dtype, got {input.dtype} and "
                        f"{linear_weight.dtype}")  # fmt: skip
    if linear_bias is not None:
        check_floating(fn, "linear_bias", linear_bias)
        if linear_bias.shape != (n_classes,):
            raise ValueError(f"{fn}(): linear_bias must have shape ({n_classes},), got {tuple(linear_bias.shape)}")
        if linear_bias.dtype != input.dtype:
            raise TypeError(f"{fn}(): linear_bias must have the input's dtype {input.dtype}, got {linear_bias.dtype}")
    batch = input.shape[:-1]
    if target.is_floating_point():
        if target.shape != batch + (n_classes,):
            raise ValueError(f"{fn}(): probability targets must have shape {tuple(batch + (n_classes,))} for input "
                             f"{tuple(input.shape)} and {n_classes} classes, got {tuple(target.shape)}")  # fmt: skip
    elif target.dtype in (torch.int64, torch.int32):
        if target.shape != batch:
            raise ValueError(f"{fn}(): expected class-index target of shape {tuple(batch)} for input of shape "
                             f"{tuple(input.shape)}, got {tuple(target.shape)}")  # fmt: skip
    else:
        raise TypeError(f"{fn}(): target must hold class indices (int64 or int32) or probabilities, got {target.dtype}")
    if weight is not None:
        check_floating(fn, "weight", weight)
        if weight.shape != (n_classes,):
            raise ValueError(f"{fn}(): weight must have shape ({n_classes},), got {tuple(weight.shape)}")
    check_same_device(fn, input=input, linear_weight=linear_weight, target=target, linear_bias=linear_bias,
                      weight=weight)  # fmt: skip


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    grad_skip_threshold: Optional[float] = None,
) -> torch.Tensor:
    """cross_entropy(input @ linear_weight.T + linear_bias, target) without storing the logits.

    Args:
        input: (H,), (N, H) or (..., H) features; float32, float16 or bfloat16.
        linear_weight: (V, H), the input's dtype; linear_bias: (V,) or None. V == 0 gives
            torch's answer for no classes (cross_entropy's), with nothing launched.
        target: class indices (int64/int32) shaped like input without its last dim, or class
            probabilities shaped like input with H replaced by V.
        weight: (V,) class weights; ignore_index (None means -100, as in torch): target value
            that contributes nothing; reduction: "none" | "mean" | "sum"; label_smoothing in
            [0, 1]; z_loss: adds z_loss * lse^2 per row (times its class weight); softcap: logits
            -> softcap * tanh(logits / softcap) before the softmax. All as in softmax_gpu.cross_entropy.
        grad_skip_threshold: None (the default: exact gradients), or a finite float >= 0: the
            backward leaves out every [rows x classes] tile of the logits' gradient (after the
            upstream scale) whose every |element| is below it, as Cut Cross-Entropy does. This
            changes the gradients (by less than the threshold per logit element left out),
            not the loss; 0.0 leaves nothing out.
    Returns:
        float32 loss: a scalar, or the target's batch shape for reduction="none".

    Equal to softmax_gpu.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)
    up to rounding, with torch.nn.functional.linear_cross_entropy's argument names. Extra
    memory is O(N + V) floats plus float32 accumulators of the gradients; deterministic;
    no host synchronisation.
    """
    if ignore_index is None:
        ignore_index = -100
    _check_operands(FN, input, linear_weight, target, linear_bias, weight, allow_no_classes=True)
    _check_options(FN, reduction, label_smoothing, z_loss, softcap, ignore_index)
    if target.is_floating_point() and ignore_index != -100:
        raise RuntimeError(f"{FN}(): ignore_index is not supported for floating point target (as in torch)")
    n_classes, hidden = linear_weight.shape
    x = input.reshape(input.shape[:-1].numel(), hidden)  # a view when it can be: the kernels take both strides
    tgt = target.reshape(x.shape[0], n_classes) if target.is_floating_point() else target.reshape(-1)
    softcap = None if softcap is None else float(softcap)
    if grad_skip_threshold is not None:
        if isinstance(grad_skip_threshold, torch.Tensor) or not isinstance(grad_skip_threshold, (int, float)):
            raise TypeError(f"{FN}(): grad_skip_threshold must be a float or None, got "
                            f"{type(grad_skip_threshold).__name__}")  # fmt: skip
        grad_skip_threshold = float(grad_skip_threshold)
        if not (0.0 <= grad_skip_threshold < float("inf")):
            raise ValueError(f"{FN}(): grad_skip_threshold must be a finite number >= 0 (or None), got "
                             f"{grad_skip_threshold}")  # fmt: skip
    if weight is not None:
        weight = weight.contiguous()  # the kernels read weight[j] and linear_bias[j] at unit stride
    if linear_bias is not None:
        linear_bias = linear_bias.contiguous()
    loss, _lse = LinearCrossEntropyFunction.apply(
        x, linear_weight, linear_bias, tgt, weight, ignore_index, reduction, float(label_smoothing), float(z_loss),
        softcap, grad_skip_threshold,
    )  # fmt: skip
    if reduction == "none":
        return loss.view(input.shape[:-1])
    return loss
