"""Vocab-parallel fused linear cross-entropy: launcher, PyTorch custom ops and autograd.

Each rank of a process group holds the rows [col_start, col_start + V_local) of the LM
head's weight (and bias, class weights); the input and the global class-index targets are
the same on every rank. Layers, top to bottom:
  launch_vocab_parallel_linear_stats        this shard's row maxima and packed statistics
  softmax_gpu::vocab_parallel_linear_stats, softmax_gpu::vocab_parallel_linear_backward
                                            custom ops with fake implementations
  combine_stats (the logits variant's)      all-reduce MAX of N floats, all-reduce SUM of the
                                            packed (N, 3 to 6) statistics
  finish_rows                               O(N) torch ops: the full problem's loss, lse and
                                            the four floats a row the linear backward reads
  VocabParallelLinearCrossEntropyFunction   autograd; its backward runs the unchanged linear
                                            backward kernels on the shard (SHARDED) and does
                                            one all-reduce SUM of dX, (N, H) float32
The public function and its checks are in softmax_gpu/distributed.py. No tensor of size
N x V_local exists at any point, and nothing is read back to the host.
"""
from typing import Optional

import torch
import torch.distributed as dist

from ..kernels.vocab_parallel_linear_cross_entropy import n_stats, vocab_parallel_linear_stats_kernel
from ..runtime import check_launchable, device_guard
from .cross_entropy import _bad_class_indices, _check_class_indices
from .linear_cross_entropy import _input_precision, _tiles, launch_backward_input, launch_backward_weight, triton_cdiv
from .vocab_parallel_cross_entropy import combine_stats

FN = "softmax_gpu.vocab_parallel_linear_cross_entropy"


def launch_vocab_parallel_linear_stats(x, w, b, target, weight, row_max, stats, n_classes, col_start, ignore_index,
                                       label_smoothing, softcap):  # fmt: skip
    """row_max (N,) and stats (N, n_stats) float32 of x (N, H) @ w (V_local, H)^T + b for
    classes [col_start, col_start + V_local) of n_classes; target (N,) global class indices.
    Tiles: the linear forward's. Reads x once per vocabulary tile, w once per row tile."""
    cfg = _tiles("forward", x, w)
    check_launchable(FN, vocab_parallel_linear_stats_kernel, x)
    grid = (triton_cdiv(x.shape[0], cfg.block_m),)
    with device_guard(x):
        vocab_parallel_linear_stats_kernel[grid](
            x_ptr=x,
            w_ptr=w,
            b_ptr=b if b is not None else w,  # never read without HAS_BIAS
            target_ptr=target,
            weight_ptr=weight if weight is not None else w,  # never read without HAS_WEIGHT
            max_ptr=row_max,
            stats_ptr=stats,
            n_rows=x.shape[0],
            n_cols=w.shape[0],
            hidden=x.shape[1],
            stride_xm=x.stride(0),
            stride_xk=x.stride(1),
            stride_wv=w.stride(0),
            stride_wk=w.stride(1),
            stride_tm=target.stride(0),
            stride_stats=stats.stride(0),
            col_start=col_start,
            n_classes=n_classes,
            ignore_index=ignore_index,
            softcap=softcap or 0.0,
            HAS_BIAS=b is not None,
            HAS_WEIGHT=weight is not None,
            HAS_SMOOTHING=label_smoothing > 0,
            HAS_SOFTCAP=softcap is not None,
            BLOCK_M=cfg.block_m,
            BLOCK_V=cfg.block_v,
            BLOCK_K=cfg.block_k,
            INPUT_PRECISION=_input_precision(x),
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    return cfg


def _fake_stats(input, weight, label_smoothing):
    f32 = dict(dtype=torch.float32, device=input.device)
    n_rows = input.shape[0]
    return input.new_empty(n_rows, **f32), input.new_empty((n_rows, n_stats(weight is not None, label_smoothing > 0)), **f32)


def _stats(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: Optional[torch.Tensor],
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    n_classes: int,
    col_start: int,
    ignore_index: int,
    label_smoothing: float,
    softcap: Optional[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row maxima (N,), packed statistics (N, n_stats)) of this shard, float32."""
    _check_class_indices(target, n_classes, ignore_index)  # IndexError on CPU, as cross_entropy
    row_max, stats = _fake_stats(input, weight, label_smoothing)
    if input.shape[0]:
        launch_vocab_parallel_linear_stats(input, linear_weight, linear_bias, target, weight, row_max, stats, n_classes,
                                           col_start, ignore_index, label_smoothing, softcap)  # fmt: skip
    return row_max, stats


vocab_parallel_linear_stats = torch.library.custom_op(
    "softmax_gpu::vocab_parallel_linear_stats", _stats, mutates_args=()
)


@vocab_parallel_linear_stats.register_fake
def _(input, linear_weight, linear_bias, target, weight, n_classes, col_start, ignore_index, label_smoothing, softcap):
    return _fake_stats(input, weight, label_smoothing)


def _backward(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: Optional[torch.Tensor],
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    stats: torch.Tensor,
    upstream: torch.Tensor,
    grad_divisor: Optional[torch.Tensor],
    n_classes: int,
    col_start: int,
    ignore_index: int,
    label_smoothing: float,
    softcap: Optional[float],
    input_grad: bool,
    weight_grad: bool,
    bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This shard's terms of the gradients of sum_r upstream_r loss_r / grad_divisor: dX as
    float32 (the caller all-reduces it, then casts), dW and db of the shard in their dtypes;
    an empty tensor for each one not asked for. stats: the full problem's (4, N) rows."""
    n_rows, hidden = input.shape
    f32 = dict(dtype=torch.float32, device=input.device)
    shard = (col_start, n_classes)
    options = (ignore_index, label_smoothing, softcap)
    operands = (input, linear_weight, linear_bias, target, weight, stats, upstream, grad_divisor)
    dx = dw = db = None
    if input_grad:
        dx = torch.empty(n_rows, hidden, **f32)
        if n_rows:
            launch_backward_input(*operands, dx, *options, shard=shard, fn=FN)
    if weight_grad or bias_grad:
        dw = torch.empty(linear_weight.shape, **f32) if weight_grad else None
        db = torch.empty(linear_weight.shape[0], **f32) if bias_grad else None
        if n_rows:
            launch_backward_weight(*operands, dw, db, *options, shard=shard, fn=FN)
        else:
            dw = dw.zero_() if dw is not None else None
            db = db.zero_() if db is not None else None
    return (
        dx if dx is not None else input.new_empty(0),
        dw.to(linear_weight.dtype) if dw is not None else input.new_empty(0),
        db.to(linear_bias.dtype) if db is not None else input.new_empty(0),
    )


vocab_parallel_linear_backward = torch.library.custom_op(
    "softmax_gpu::vocab_parallel_linear_backward", _backward, mutates_args=()
)


@vocab_parallel_linear_backward.register_fake
def _(input, linear_weight, linear_bias, target, weight, stats, upstream, grad_divisor, n_classes, col_start,
      ignore_index, label_smoothing, softcap, input_grad, weight_grad, bias_grad):  # fmt: skip
    return (
        input.new_empty(input.shape, dtype=torch.float32) if input_grad else input.new_empty(0),
        torch.empty_like(linear_weight, memory_format=torch.contiguous_format) if weight_grad else input.new_empty(0),
        torch.empty_like(linear_bias, memory_format=torch.contiguous_format) if bias_grad else input.new_empty(0),
    )


def finish_rows(global_max, stats, target, has_weight, n_classes, ignore_index, label_smoothing, z_loss):
    """From the all-reduced maxima and statistics: (loss per row, lse, the (4, N) rows the
    linear backward kernels read (max, 1/sum, 1 - q_t, coef), the rows' target weights), all
    float32, the same on every rank. The formulas of linear_cross_entropy_fwd_kernel's step 3,
    on N-element tensors."""
    valid = target != ignore_index
    bad = _bad_class_indices(target, n_classes, ignore_index)
    d, other, z_t = stats[:, 0], stats[:, 1], stats[:, 2]
    w_t = stats[:, 3] if has_weight else valid.float()
    log_d = torch.log(d)
    lse = global_max + log_d
    keep = 1.0 - label_smoothing
    loss = keep * w_t * ((global_max - z_t) + log_d)  # (1 - eps) w_t (lse - z_t)
    coef = keep * w_t
    if label_smoothing > 0:
        sum_wz, sum_w = stats[:, -2], stats[:, -1]
        loss = loss + (label_smoothing / n_classes) * (sum_w * lse - sum_wz)
        coef = coef + (label_smoothing / n_classes) * sum_w
    if z_loss != 0:
        loss = loss + z_loss * w_t * lse * lse
        coef = coef + 2.0 * z_loss * w_t * lse
    loss = torch.where(valid, loss, 0.0)
    loss = torch.where(bad, float("nan"), loss)
    rows = torch.stack([global_max, 1.0 / d, other / d, coef])
    return loss, lse, rows, torch.where(bad, float("nan"), w_t)


class VocabParallelLinearCrossEntropyFunction(torch.autograd.Function):
    """Forward: stats kernel, two all-reduces (O(N)), finish_rows. Backward: the linear
    backward kernels on this shard, then one all-reduce SUM of dX (N x H float32) when the
    input needs a gradient; dW and db stay local. Like linear_cross_entropy, nothing is
    consumed, so the backward may run more than once (each run all-reduces dX again)."""

    @staticmethod
    def forward(ctx, input, linear_weight, linear_bias, target, weight, group, n_classes, col_start, ignore_index,
                reduction, label_smoothing, z_loss, softcap):  # fmt: skip
        row_max, stats = vocab_parallel_linear_stats(
            input, linear_weight, linear_bias, target, weight, n_classes, col_start, ignore_index, label_smoothing,
            softcap,
        )  # fmt: skip
        if input.shape[0]:  # the same on every rank (the input is), so all skip together
            global_max = combine_stats(row_max, stats, group, n_scaled=2)
        else:
            global_max = row_max
        loss, lse, rows, w_t = finish_rows(global_max, stats, target, weight is not None, n_classes, ignore_index,
                                           label_smoothing, z_loss)  # fmt: skip
        total = w_t.sum() if reduction == "mean" else None
        needs = ctx.needs_input_grad[:3]
        if any(needs):
            ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, rows, total)
        ctx.group = group
        ctx.options = (n_classes, col_start, ignore_index, label_smoothing, softcap)
        ctx.mark_non_differentiable(lse)
        if reduction == "mean":
            loss = loss.sum() / total
        elif reduction == "sum":
            loss = loss.sum()
        return loss, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_lse):
        input, linear_weight, linear_bias, target, weight, rows, total = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        bias_grad = needs[2] and linear_bias is not None
        upstream = grad_loss.float() if grad_loss.dim() == 0 else grad_loss.reshape(-1).float()
        dx, dw, db = vocab_parallel_linear_backward(
            input, linear_weight, linear_bias, target, weight, rows, upstream, total, *ctx.options,
            needs[0], needs[1], bias_grad,
        )  # fmt: skip
        if needs[0]:
            if input.shape[0]:
                dist.all_reduce(dx, op=dist.ReduceOp.SUM, group=ctx.group)
            dx = dx.to(input.dtype)
        return (
            dx if needs[0] else None,
            dw if needs[1] else None,
            db if bias_grad else None,
            None, None, None, None, None, None, None, None, None, None,
        )  # fmt: skip
