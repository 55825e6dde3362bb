"""Vocab-parallel linear cross-entropy: PyTorch custom ops and autograd.

Each rank of a process group holds the rows [col_start, col_start + V_local) of the LM
head's weight (and bias, class weights); the input and the global class-index targets are
the same on every rank. The rank's shard runs linear_cross_entropy's low-memory mode
(softmax_gpu/ops/linear_cross_entropy.py): its classes in slabs, each slab's logits made by
cuBLAS into a bounded buffer and summarised by the vocab-parallel stats kernel. Layers:
  softmax_gpu::vocab_parallel_linear_stats      this shard's row maxima and packed statistics
                                                (the slabs merged in order)
  combine_stats (the logits variant's)          all-reduce MAX of N floats, all-reduce SUM of
                                                the packed (N, 2 to 5) statistics
  softmax_gpu::vocab_parallel_loss              loss and lse from them (O(N), no logits read)
  softmax_gpu::vocab_parallel_linear_backward   the slab backward on the shard: dW and db of
                                                the shard, this shard's terms of dX (float32)
  VocabParallelLinearCrossEntropyFunction       autograd; one all-reduce SUM of dX, (N, H)
                                                float32, in the backward
The public function and its checks are in softmax_gpu/distributed.py. No tensor of size
N x V_local is made beyond a slab (config.LINEAR_CE_BUFFER_BYTES["low_memory"]), and
nothing is read back to the host.
"""
from typing import Optional

import torch
import torch.distributed as dist

from .. import config
from ..loss_options import LossOptions
from .cross_entropy import _check_class_indices, _plain_eager
from .functorch import first_order
from .linear_cross_entropy import _slab_backward, _slab_stats
from .vocab_parallel_cross_entropy import _vocab_parallel_loss, combine_stats, n_stats, total_weight, vocab_parallel_loss

FN = "softmax_gpu.vocab_parallel_linear_cross_entropy"


def _fake_stats(input, target, weight, label_smoothing):
    f32 = dict(dtype=torch.float32)
    n_rows = input.shape[0]
    width = n_stats(target.is_floating_point(), weight is not None, label_smoothing > 0)
    return input.new_empty(n_rows, **f32), input.new_empty((n_rows, width), **f32)


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
    z_loss: float,
    softcap: Optional[float],
    fused_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row maxima (N,), packed statistics (N, n_stats)) of this shard, float32 (z_loss plays
    no part: it is taken so that the four options pass as one)."""
    _check_class_indices(target, n_classes, ignore_index)  # IndexError on CPU, as cross_entropy
    return _slab_stats(input, linear_weight, linear_bias, target, weight, n_classes, col_start,
                       LossOptions(ignore_index, label_smoothing, z_loss, softcap), None, fn=FN,
                       fused_logits=fused_logits)  # fmt: skip


vocab_parallel_linear_stats = torch.library.custom_op(
    "softmax_gpu::vocab_parallel_linear_stats", _stats, mutates_args=()
)


@vocab_parallel_linear_stats.register_fake
def _(input, linear_weight, linear_bias, target, weight, n_classes, col_start, ignore_index, label_smoothing, z_loss,
      softcap, fused_logits=False):  # fmt: skip
    return _fake_stats(input, target, weight, label_smoothing)


def _backward(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: Optional[torch.Tensor],
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    row_max: torch.Tensor,
    stats: torch.Tensor,
    upstream: torch.Tensor,
    grad_divisor: Optional[torch.Tensor],
    n_classes: int,
    col_start: int,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    input_grad: bool,
    weight_grad: bool,
    bias_grad: bool,
    fused_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This shard's terms of the gradients of sum_r upstream_r loss_r / grad_divisor: dX as
    float32 (the caller all-reduces it, then casts), dW and db of the shard in their dtypes;
    an empty tensor for each one not asked for. row_max, stats: the all-reduced ones."""
    needs = (input_grad, weight_grad, bias_grad, False)
    dx, dw, db, _ = _slab_backward(input, linear_weight, linear_bias, target, weight, row_max, stats, None, upstream,
                                   grad_divisor, n_classes, col_start,
                                   LossOptions(ignore_index, label_smoothing, z_loss, softcap), None, needs, None,
                                   fn=FN, fused_logits=fused_logits)  # fmt: skip
    empty = input.new_empty
    return (dx if dx is not None else empty(0), dw if dw is not None else empty(0), db if db is not None else empty(0))


vocab_parallel_linear_backward = torch.library.custom_op(
    "softmax_gpu::vocab_parallel_linear_backward", _backward, mutates_args=()
)


@vocab_parallel_linear_backward.register_fake
def _(input, linear_weight, linear_bias, target, weight, row_max, stats, upstream, grad_divisor, n_classes, col_start,
      ignore_index, label_smoothing, z_loss, softcap, input_grad, weight_grad, bias_grad, fused_logits=False):  # fmt: skip
    return (
        input.new_empty(input.shape, dtype=torch.float32) if input_grad else input.new_empty(0),
        torch.empty_like(linear_weight, memory_format=torch.contiguous_format) if weight_grad else input.new_empty(0),
        torch.empty_like(linear_bias, memory_format=torch.contiguous_format) if bias_grad else input.new_empty(0),
    )


class VocabParallelLinearCrossEntropyFunction(torch.autograd.Function):
    """Forward: the shard's slab statistics, two all-reduces (O(N)), the loss (O(N)).
    Backward: the slab backward on this shard, then one all-reduce SUM of dX (N x H float32)
    when the input needs a gradient; dW and db stay local. Nothing is consumed, so the
    backward may run more than once (each run all-reduces dX again)."""

    @staticmethod
    def forward(ctx, input, linear_weight, linear_bias, target, weight, group, n_classes, col_start, options,
                reduction):  # fmt: skip
        eager = _plain_eager(input, linear_weight, linear_bias, target, weight)
        fused = config.linear_ce_fused()  # read once: the backward makes its logits as the forward did
        row_max, stats = (_stats if eager else vocab_parallel_linear_stats)(
            input, linear_weight, linear_bias, target, weight, n_classes, col_start, *options, fused
        )
        if input.shape[0]:  # the same on every rank (the input is), so all skip together
            row_max = combine_stats(row_max, stats, group)
        total = None
        if reduction == "mean":
            total = total_weight(target, stats, weight is not None, options.ignore_index, n_classes)
        no_logits = input.new_empty(input.shape[0], 0)
        loss, lse, _ = (_vocab_parallel_loss if eager else vocab_parallel_loss)(
            no_logits, target, weight, row_max, stats, None, None, n_classes, 0, *options, False
        )
        needs = ctx.needs_input_grad[:3]
        if any(needs):
            ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, row_max, stats, total)
        ctx.group = group
        ctx.shard = (n_classes, col_start, *options)
        ctx.fused = fused
        ctx.mark_non_differentiable(lse)
        if reduction == "mean":
            loss = loss.sum() / total
        elif reduction == "sum":
            loss = loss.sum()
        return loss, lse

    @staticmethod
    @first_order(FN)
    def backward(ctx, grad_loss, _grad_lse):
        input, linear_weight, linear_bias, target, weight, row_max, stats, total = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        bias_grad = needs[2] and linear_bias is not None
        upstream = grad_loss.float() if grad_loss.dim() == 0 else grad_loss.reshape(-1).float()
        args = (input, linear_weight, linear_bias, target, weight, row_max, stats, upstream, total, *ctx.shard,
                needs[0], needs[1], bias_grad, ctx.fused)  # fmt: skip
        eager = _plain_eager(input, linear_weight, linear_bias, target, weight, upstream)
        dx, dw, db = (_backward if eager else vocab_parallel_linear_backward)(*args)
        if needs[0]:
            if input.shape[0]:
                dist.all_reduce(dx, op=dist.ReduceOp.SUM, group=ctx.group)
            dx = dx.to(input.dtype)
        return (
            dx if needs[0] else None,
            dw if needs[1] else None,
            db if bias_grad else None,
            None, None, None, None, None, None, None,
        )  # fmt: skip
