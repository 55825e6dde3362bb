"""Vocab-parallel cross-entropy: launchers, PyTorch custom ops and autograd.

Each rank of a process group holds the logits of a contiguous slice of the classes. Layers,
top to bottom:
  launch_vocab_parallel_stats / launch_vocab_parallel_loss   fill preallocated buffers
  softmax_gpu::vocab_parallel_stats, softmax_gpu::vocab_parallel_loss   custom ops
  combine_stats                       the two all-reduces between them (the only communication)
  VocabParallelCrossEntropyFunction   autograd, with cross_entropy's two gradient routes (formed
                                      in the forward, or in the backward for float16/float64);
                                      the backward never communicates
The public function, its checks and the shard-layout validation are in softmax_gpu/distributed.py.

Per forward, per rank: the stats kernel reads the shard once; one all-reduce MAX of the row
maxima (N float32) and one all-reduce SUM of the packed row statistics (N x n_stats float32,
n_stats 2-5); the loss kernel reads the shard once more and writes the gradient. Nothing of
size N x V is ever exchanged, and nothing is read back to the host.
"""
from typing import Optional

import torch
import torch.distributed as dist

from .. import config
from ..loss_options import LossOptions
from ..kernels.vocab_parallel_cross_entropy import vocab_parallel_loss_kernel, vocab_parallel_stats_kernel
from ..runtime import cached_plan, check_launchable, device_guard, launch, remember_plan
from .cross_entropy import (
    DEFERRED_GRAD_DTYPES,
    _bad_class_indices,
    _check_class_indices,
    _cross_entropy_scale_grad,
    _plain_eager,
    cross_entropy_config,
    cross_entropy_scale_grad,
)
from .functorch import first_order


def stats_config(n_cols: int) -> config.RowConfig:
    """The stats kernel's blocks: it always streams the row with per-lane online accumulators,
    which is cross-entropy's looped path, so it takes that path's width (1024 on 4 warps); at
    8192 on 32 warps the all-options variants spill on sm_80 and sm_90 (bf16: 40-56 bytes)."""
    return config.row_config(
        n_cols, config.LOOP_BLOCK_CROSS_ENTROPY, elements_per_thread=config.ELEMENTS_PER_THREAD_CROSS_ENTROPY
    )


def n_stats(soft_target: bool, has_weight: bool, has_smoothing: bool) -> int:
    """Columns of the packed statistics (kernels/vocab_parallel_cross_entropy.py lists them):
    3 for probability targets; for class indices 2, +1 with weights, +2 with smoothing."""
    if soft_target:
        return 3
    return 2 + int(has_weight) + 2 * int(has_smoothing)


def launch_vocab_parallel_stats(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    row_max: torch.Tensor,
    stats: torch.Tensor,
    n_classes: int,
    col_start: int,
    options: LossOptions,
) -> None:
    """This shard's row maxima (N,) and packed row statistics (N, n_stats), float32.

    logits (N, V_local) and probability targets with unit column stride; target class
    indices are global. Bytes: N * V_local reads + O(N). Eager calls reuse a plan per
    signature and may launch the compiled kernel directly (runtime.launch)."""
    n_rows, n_cols = logits.shape
    key = ("vp_stats", n_cols, logits.dtype, logits.stride(0), target.dtype, target.dim(), target.stride(0),
           weight is None, stats.shape[1], options, str(logits.device), config._block_limit)  # fmt: skip
    static = cached_plan(key)
    if static is None:
        cfg = stats_config(n_cols)
        static = dict(logits_row_stride=logits.stride(0), target_row_stride=target.stride(0), n_cols=n_cols,
                      SOFT_TARGET=target.is_floating_point(), HAS_WEIGHT=weight is not None, N_STATS=stats.shape[1],
                      BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
                      **options.kernel_args(z_loss=False, hi_lo=False))  # fmt: skip
        remember_plan(key, static)
    check_launchable("softmax_gpu.vocab_parallel_cross_entropy", vocab_parallel_stats_kernel, logits)
    with device_guard(logits):
        launch(vocab_parallel_stats_kernel, (n_rows,), static, True, logits_ptr=logits, target_ptr=target,
               weight_ptr=weight if weight is not None else stats,  # never read without HAS_WEIGHT
               max_ptr=row_max, stats_ptr=stats, n_classes=n_classes, col_start=col_start)  # fmt: skip


def launch_vocab_parallel_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    global_max: torch.Tensor,
    stats: torch.Tensor,
    loss: torch.Tensor,
    lse: torch.Tensor,
    grad: Optional[torch.Tensor],
    grad_divisor: Optional[torch.Tensor],
    upstream: Optional[torch.Tensor],
    n_classes: int,
    col_start: int,
    options: LossOptions,
) -> None:
    """Per-row loss and lse (float32) from the all-reduced statistics and, when grad is given,
    d loss / d logits for this shard (divided by the float32 device scalar grad_divisor and
    multiplied by the float32 upstream gradient, (N,) or 0-d, where given). Bytes: O(N), + N * V_local reads and writes with grad. Its blocks are
    cross-entropy's (up to 8192 wide): it keeps no per-lane accumulators, and no variant spills.
    Eager calls reuse a plan per signature and may launch directly, as the stats launcher."""
    n_rows, n_cols = logits.shape
    has_upstream = grad is not None and upstream is not None
    key = ("vp_loss", n_cols, logits.dtype, logits.stride(0), target.dtype, target.dim(), target.stride(0),
           weight is None, stats.shape[1], None if grad is None else (grad.dtype, grad.stride(0)),
           grad_divisor is None, None if not has_upstream else upstream.stride(0) if upstream.dim() else 0, options,
           str(logits.device), config._block_limit)  # fmt: skip
    static = cached_plan(key)
    if static is None:
        cfg = cross_entropy_config(n_cols)
        static = dict(logits_row_stride=logits.stride(0), target_row_stride=target.stride(0),
                      grad_row_stride=grad.stride(0) if grad is not None else 0,
                      upstream_stride=upstream.stride(0) if has_upstream and upstream.dim() else 0, n_cols=n_cols,
                      SOFT_TARGET=target.is_floating_point(), HAS_WEIGHT=weight is not None,
                      COMPUTE_GRAD=grad is not None, DIVIDE_GRAD=grad is not None and grad_divisor is not None,
                      HAS_UPSTREAM=has_upstream, N_STATS=stats.shape[1], BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
                      **options.kernel_args(hi_lo=False))  # fmt: skip
        remember_plan(key, static)
    check_launchable("softmax_gpu.vocab_parallel_cross_entropy", vocab_parallel_loss_kernel, logits)
    with device_guard(logits):
        launch(vocab_parallel_loss_kernel, (n_rows,), static, True, logits_ptr=logits, target_ptr=target,
               weight_ptr=weight if weight is not None else stats,  # never read without HAS_WEIGHT
               max_ptr=global_max, stats_ptr=stats, loss_ptr=loss, lse_ptr=lse,
               grad_ptr=grad if grad is not None else loss,  # never written without COMPUTE_GRAD
               grad_divisor_ptr=grad_divisor if grad_divisor is not None else loss,  # read only with DIVIDE_GRAD
               upstream_ptr=upstream if has_upstream else loss,  # read only with HAS_UPSTREAM
               n_classes=n_classes, col_start=col_start)  # fmt: skip


def _vocab_parallel_stats(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    n_classes: int,
    col_start: int,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row maxima (N,), packed statistics (N, n_stats)) of this shard, float32 (z_loss plays
    no part: it is taken so that the four options pass as one)."""
    _check_class_indices(target, n_classes, ignore_index)  # IndexError on CPU, as cross_entropy
    row_max, stats = _fake_stats(logits, target, weight, label_smoothing)
    if logits.shape[0]:
        options = LossOptions(ignore_index, label_smoothing, z_loss, softcap)
        launch_vocab_parallel_stats(logits, target, weight, row_max, stats, n_classes, col_start, options)
    return row_max, stats


def _fake_stats(logits, target, weight, label_smoothing):
    n_rows = logits.shape[0]
    width = n_stats(target.is_floating_point(), weight is not None, label_smoothing > 0)
    f32 = dict(dtype=torch.float32, device=logits.device)
    return logits.new_empty(n_rows, **f32), logits.new_empty((n_rows, width), **f32)


vocab_parallel_stats = torch.library.custom_op(
    "softmax_gpu::vocab_parallel_stats", _vocab_parallel_stats, mutates_args=()
)


@vocab_parallel_stats.register_fake
def _(logits, target, weight, n_classes, col_start, ignore_index, label_smoothing, z_loss, softcap):
    return _fake_stats(logits, target, weight, label_smoothing)


def _vocab_parallel_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    global_max: torch.Tensor,
    stats: torch.Tensor,
    grad_divisor: Optional[torch.Tensor],
    upstream: Optional[torch.Tensor],
    n_classes: int,
    col_start: int,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per row, lse, this shard's gradient of the summed loss divided by grad_divisor
    and times upstream, or an empty tensor) from the all-reduced maxima and statistics."""
    loss, lse, grad = _fake_loss(logits, compute_grad)
    if logits.shape[0]:
        launch_vocab_parallel_loss(
            logits, target, weight, global_max, stats, loss, lse, grad if compute_grad else None, grad_divisor,
            upstream, n_classes, col_start, LossOptions(ignore_index, label_smoothing, z_loss, softcap),
        )  # fmt: skip
    return loss, lse, grad


def _fake_loss(logits, compute_grad):
    n_rows = logits.shape[0]
    f32 = dict(dtype=torch.float32, device=logits.device)
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if compute_grad else logits.new_empty(0)
    return logits.new_empty(n_rows, **f32), logits.new_empty(n_rows, **f32), grad


vocab_parallel_loss = torch.library.custom_op(
    "softmax_gpu::vocab_parallel_loss", _vocab_parallel_loss, mutates_args=()
)


@vocab_parallel_loss.register_fake
def _(logits, target, weight, global_max, stats, grad_divisor, upstream, n_classes, col_start, ignore_index,
      label_smoothing, z_loss, softcap, compute_grad):  # fmt: skip
    return _fake_loss(logits, compute_grad)


def combine_stats(row_max: torch.Tensor, stats: torch.Tensor, group) -> torch.Tensor:
    """The two collectives of a forward, in place on `stats`; returns the global row maximum.

    MAX of the row maxima (N float32), then each rank rescales its exp-sum (column 0) from
    its own maximum to the global one, e^(m - M), and SUM of the packed (N, n_stats) rows.
    A NaN in a shard makes its own rescale factor NaN, so the SUM carries it to every rank
    whatever the backend's MAX does with NaN."""
    global_max = row_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    stats[:, :1].mul_(torch.exp(row_max - global_max)[:, None])
    dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
    return global_max


def total_weight(target: torch.Tensor, stats: torch.Tensor, has_weight: bool, ignore_index: int, n_classes: int):
    """The denominator of reduction="mean" as a float32 device scalar: the summed weight of the
    rows that are not ignored (w_t comes all-reduced in column 2; a class index out of range
    makes it NaN, as in cross_entropy), their count without weights, the row count for
    probabilities. The same on every rank: target and the all-reduced stats are."""
    if target.is_floating_point():
        return torch.full((), float(target.shape[0]), dtype=torch.float32, device=target.device)
    if not has_weight:
        return (target != ignore_index).sum(dtype=torch.float32)
    bad = _bad_class_indices(target, n_classes, ignore_index)
    return torch.where(bad, float("nan"), stats[:, 2]).sum()


class VocabParallelCrossEntropyFunction(torch.autograd.Function):
    """Forward: stats kernel, two all-reduces, loss kernel. The gradient routes follow
    cross_entropy's: for bfloat16 and float32 the loss kernel also writes this shard's
    d loss / d logits and the backward scales it by the upstream gradient; for float16 and
    float64 (DEFERRED_GRAD_DTYPES) the backward runs the loss kernel again from the saved
    O(N) statistics with the upstream factor applied before the rounding. Neither backward
    communicates: the statistics are already global."""

    @staticmethod
    def forward(ctx, logits, target, weight, group, n_classes, col_start, options, reduction):
        deferred = ctx.needs_input_grad[0] and logits.dtype in DEFERRED_GRAD_DTYPES
        compute_grad = ctx.needs_input_grad[0] and not deferred
        eager = _plain_eager(logits, target, weight)
        shard = (n_classes, col_start, *options)
        row_max, stats = (_vocab_parallel_stats if eager else vocab_parallel_stats)(logits, target, weight, *shard)
        if logits.shape[0]:  # the same on every rank (the target is), so all skip together
            global_max = combine_stats(row_max, stats, group)
        else:
            global_max = row_max
        total = None
        if reduction == "mean":
            total = total_weight(target, stats, weight is not None, options.ignore_index, n_classes)
        loss, lse, grad = (_vocab_parallel_loss if eager else vocab_parallel_loss)(
            logits, target, weight, global_max, stats, total, None, *shard, compute_grad
        )
        ctx.deferred = deferred
        if compute_grad:
            ctx.save_for_backward(grad)
        elif deferred:
            ctx.save_for_backward(logits, target, weight, global_max, stats, total)
            ctx.shard = shard
        ctx.mark_non_differentiable(lse)
        ctx.backward_done = False
        if reduction == "mean":
            loss = loss.sum() / total
        elif reduction == "sum":
            loss = loss.sum()
        return loss, lse

    @staticmethod
    @first_order("softmax_gpu.vocab_parallel_cross_entropy")
    def backward(ctx, grad_loss, *unused):
        upstream = grad_loss.float() if grad_loss.dim() == 0 else grad_loss.reshape(-1).float()
        if ctx.deferred:
            logits, target, weight, global_max, stats, total = ctx.saved_tensors
            loss_op = _vocab_parallel_loss if _plain_eager(logits, upstream) else vocab_parallel_loss
            _loss, _lse, grad = loss_op(logits, target, weight, global_max, stats, total, upstream, *ctx.shard, True)
            return grad, None, None, None, None, None, None, None
        if ctx.backward_done:
            raise RuntimeError(
                "softmax_gpu.vocab_parallel_cross_entropy: backward ran twice through the same graph; the "
                "loss stores its gradient once, so run the forward again instead of retain_graph=True"
            )
        ctx.backward_done = True
        (grad,) = ctx.saved_tensors
        if _plain_eager(grad, upstream):
            _cross_entropy_scale_grad(grad, upstream)
            torch.autograd.graph.increment_version(grad)
        else:
            cross_entropy_scale_grad(grad, upstream)
        return grad, None, None, None, None, None, None, None
