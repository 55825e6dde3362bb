"""Token log-probabilities and entropy: launchers, PyTorch custom ops, autograd, public functions.

    token_logprobs(logits, tokens, *, temperature=1.0, ignore_index=-100, return_entropy=False)
    linear_token_logprobs(hidden, linear_weight, tokens, *, linear_bias=None, temperature=1.0,
                          ignore_index=-100, return_entropy=False, buffer_bytes=None)

Layers, top to bottom:
  launch_forward / launch_backward           fill preallocated buffers (kernels/token_logprobs.py)
  softmax_gpu::token_logprobs_forward / _backward, softmax_gpu::linear_token_logprobs_forward
  / _backward                                custom ops with fake implementations
  TokenLogprobsFunction, LinearTokenLogprobsFunction   autograd: both outputs differentiable,
                                             either upstream gradient may be absent
  token_logprobs(), linear_token_logprobs()  checks and the public signatures

The logits form reads the logits once forward and once backward (writing the gradient).
The linear form never holds more than a chunk of logits: the tokens in chunks
(config.linear_cross_entropy_plan's "speed" cut), each chunk's logits made by cuBLAS into a
buffer; the backward makes them again, forms the chunk's gradient over them, writes its rows
of dX and adds its term of dW in float32 (4 products in all; extra memory at most
V*H*4 + buffer_bytes). No host synchronisation anywhere.
"""
from typing import Optional

import torch

from .. import config
from ..checks import check_floating, check_same_device, check_tensor
from ..kernels.token_logprobs import (
    token_logprobs_bwd_kernel,
    token_logprobs_combine_kernel,
    token_logprobs_fwd_kernel,
    token_logprobs_partial_kernel,
)
from ..runtime import cached_plan, check_launchable, device_guard, launch, remember_plan
from ..layout import batch_rows
from .cross_entropy import _plain_eager, under_functorch
from .functorch import first_order, first_order_only
from .linear_cross_entropy import _buffer, _logits_into, _view, mm_accumulate

FN = "softmax_gpu.token_logprobs"
LINEAR_FN = "softmax_gpu.linear_token_logprobs"
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _config(n_cols: int) -> config.RowConfig:
    """One program a row, looped in cross-entropy's streaming blocks (1024 wide on 4 warps)
    with per-lane accumulators, as the vocab-parallel statistics kernel."""
    return config.row_config(
        n_cols, config.LOOP_BLOCK_CROSS_ENTROPY, elements_per_thread=config.ELEMENTS_PER_THREAD_CROSS_ENTROPY
    )


def split_config(logits: torch.Tensor) -> Optional[config.SplitConfig]:
    """config.split_rows for these kernels (few rows wider than cross-entropy's single block),
    or None for one program a row."""
    n_rows, n_cols = logits.shape
    return config.split_rows(n_rows, n_cols, logits.element_size(), config.MAX_BLOCK_CROSS_ENTROPY,
                             config.LOOP_BLOCK_CROSS_ENTROPY, config.ELEMENTS_PER_THREAD_CROSS_ENTROPY,
                             config.sm_count(logits.device))  # fmt: skip


def launch_partials(logits, partials, temperature: float, compute_entropy: bool, chunk_cols: int, block_n: int,
                    num_warps: int, fn=FN, static: Optional[dict] = None) -> None:  # fmt: skip
    """partials (N, C, 3) float32: (m, d, s) of each chunk of chunk_cols columns of logits (N, V)
    at `temperature` (s = 0 without compute_entropy). Bytes: one read of the logits.
    static: a stored plan's arguments (_partials_static), whose launches may then be direct."""
    n_rows, n_cols = logits.shape
    planned = static is not None
    if static is None:
        static = _partials_static(logits, temperature, compute_entropy, chunk_cols, block_n, num_warps)
    check_launchable(fn, token_logprobs_partial_kernel, logits)
    with device_guard(logits):
        launch(token_logprobs_partial_kernel, (n_rows, partials.shape[1]), static, planned, logits_ptr=logits,
               partial_ptr=partials)  # fmt: skip


def _partials_static(logits, temperature, compute_entropy, chunk_cols, block_n, num_warps) -> dict:
    """token_logprobs_partial_kernel's arguments besides the pointers."""
    return dict(logits_row_stride=logits.stride(0), n_cols=logits.shape[1], chunk_cols=chunk_cols,
                inv_temperature=1.0 / temperature, COMPUTE_ENTROPY=compute_entropy, BLOCK_N=block_n,
                num_warps=num_warps)  # fmt: skip


def launch_forward(logits, tokens, logprobs, entropy, stats, temperature: float, ignore_index: int, fn=FN) -> None:
    """logprobs and (when entropy is given) entropy, (N,) float32, and stats (2 N,) float32
    (each row's max m and log d of z / T: lse = m + log d) of logits (N, V) with unit column
    stride at `temperature`. Bytes: one read of the logits + O(N) (+ O(N C) for split rows).
    Eager calls reuse a plan per signature (the split decision, block, converted options) and
    launch the compiled kernel directly (runtime.launch)."""
    n_rows, n_cols = logits.shape
    compute_entropy = entropy is not None
    key = ("token_logprobs", n_rows, n_cols, logits.dtype, logits.stride(0), tokens.dtype, tokens.stride(0),
           compute_entropy, temperature, ignore_index, str(logits.device), config._block_limit,
           config._split_chunk)  # fmt: skip
    plan = cached_plan(key)
    planned = plan is not None
    if plan is None:
        split = split_config(logits)
        static = dict(logits_row_stride=logits.stride(0), tokens_stride=tokens.stride(0), n_cols=n_cols,
                      inv_temperature=1.0 / temperature, ignore_index=ignore_index, COMPUTE_ENTROPY=compute_entropy)
        partial = None
        if split is None:
            cfg = _config(n_cols)
            static.update(BLOCK_N=cfg.block_n, num_warps=cfg.num_warps)
        else:  # the combine's arguments, and the partials kernel's
            static.update(n_chunks=split.chunks, CHUNKS_BLOCK=split.chunks_block, num_warps=config.SPLIT_COMBINE_WARPS)
            partial = _partials_static(logits, temperature, compute_entropy, split.chunk_cols, split.block_n,
                                       split.num_warps)  # fmt: skip
        plan = remember_plan(key, (split, static, partial))
    split, static, partial = plan
    # (entropy_ptr is written only with COMPUTE_ENTROPY)
    outputs = dict(tokens_ptr=tokens, logprobs_ptr=logprobs, entropy_ptr=entropy if compute_entropy else logprobs,
                   stats_ptr=stats)  # fmt: skip
    if split is not None:
        partials = torch.empty(n_rows, split.chunks, 3, dtype=torch.float32, device=logits.device)
        launch_partials(logits, partials, temperature, compute_entropy, split.chunk_cols, split.block_n,
                        split.num_warps, fn, partial if planned else None)  # fmt: skip
        with device_guard(logits):
            launch(token_logprobs_combine_kernel, (n_rows,), static, planned, partial_ptr=partials, logits_ptr=logits,
                   **outputs)  # fmt: skip
        return
    check_launchable(fn, token_logprobs_fwd_kernel, logits)
    with device_guard(logits):
        launch(token_logprobs_fwd_kernel, (n_rows,), static, planned, logits_ptr=logits, **outputs)


def launch_backward(logits, tokens, stats, entropy, grad_logprobs, grad_entropy, grad, temperature: float,
                    ignore_index: int, fn=FN, col_start: int = 0, n_classes: Optional[int] = None) -> None:  # fmt: skip
    """grad (N, V) = d(sum_r u_lp[r] logprob_r + u_H[r] entropy_r) / d logits, u_lp / u_H
    float32 (N,) or 0-d, or None for an absent upstream gradient. grad may be logits. The
    columns are classes [col_start, col_start + V) of n_classes (a vocab-parallel shard;
    default: all of them). Split rows (split_config) run a program a chunk. Eager calls
    reuse a plan per signature and launch directly, as launch_forward.
    Bytes: one read of the logits, one write of grad, O(N)."""
    n_rows, n_cols = logits.shape
    lp_stride = grad_logprobs.stride(0) if grad_logprobs is not None and grad_logprobs.dim() else 0
    ent_stride = grad_entropy.stride(0) if grad_entropy is not None and grad_entropy.dim() else 0
    key = ("token_logprobs_backward", n_rows, n_cols, logits.dtype, logits.stride(0), tokens.dtype, tokens.stride(0),
           grad.dtype, grad.stride(0), grad_logprobs is None, lp_stride, grad_entropy is None, ent_stride,
           temperature, ignore_index, col_start, n_classes, str(logits.device), config._block_limit,
           config._split_chunk)  # fmt: skip
    plan = cached_plan(key)
    planned = plan is not None
    if plan is None:
        split = split_config(logits)
        if split is not None:
            block_n, num_warps, chunk_cols, chunks = split.block_n, split.num_warps, split.chunk_cols, split.chunks
        else:
            cfg = _config(n_cols)
            block_n, num_warps, chunk_cols, chunks = cfg.block_n, cfg.num_warps, n_cols, 1
        static = dict(
            logits_row_stride=logits.stride(0), tokens_stride=tokens.stride(0), grad_row_stride=grad.stride(0),
            grad_logprobs_stride=lp_stride, grad_entropy_stride=ent_stride, n_cols=n_cols, chunk_cols=chunk_cols,
            col_start=col_start, n_classes=n_cols if n_classes is None else n_classes,
            inv_temperature=1.0 / temperature, ignore_index=ignore_index,
            HAS_GRAD_LOGPROBS=grad_logprobs is not None, HAS_GRAD_ENTROPY=grad_entropy is not None, BLOCK_N=block_n,
            num_warps=num_warps,
        )  # fmt: skip
        plan = remember_plan(key, ((n_rows, chunks), static))
    grid, static = plan
    check_launchable(fn, token_logprobs_bwd_kernel, logits)
    with device_guard(logits):
        launch(
            token_logprobs_bwd_kernel, grid, static, planned, logits_ptr=logits, tokens_ptr=tokens, stats_ptr=stats,
            entropy_ptr=entropy if grad_entropy is not None else stats,  # read only with HAS_GRAD_ENTROPY
            grad_logprobs_ptr=grad_logprobs if grad_logprobs is not None else stats,
            grad_entropy_ptr=grad_entropy if grad_entropy is not None else stats,
            grad_ptr=grad,
        )  # fmt: skip


def _outputs(n_rows: int, like: torch.Tensor, compute_entropy: bool):
    """(logprobs, entropy or an empty tensor, the rows' (m, log d) statistics, interleaved in
    one (2 N,) tensor), float32."""
    f32 = dict(dtype=torch.float32, device=like.device)
    entropy = torch.empty(n_rows, **f32) if compute_entropy else torch.empty(0, **f32)
    return torch.empty(n_rows, **f32), entropy, torch.empty(2 * n_rows, **f32)


# ---------------------------------------------------------------------------------------
# From logits
# ---------------------------------------------------------------------------------------


def _forward(logits: torch.Tensor, tokens: torch.Tensor, temperature: float, ignore_index: int,
             compute_entropy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(logprobs, entropy or an empty tensor, (m, log d) per row), float32, for logits (N, V), tokens (N,)."""
    logprobs, entropy, stats = _outputs(logits.shape[0], logits, compute_entropy)
    if logits.shape[0]:
        launch_forward(logits, tokens, logprobs, entropy if compute_entropy else None, stats, temperature, ignore_index)
    return logprobs, entropy, stats


token_logprobs_forward = torch.library.custom_op("softmax_gpu::token_logprobs_forward", _forward, mutates_args=())


@token_logprobs_forward.register_fake
def _(logits, tokens, temperature, ignore_index, compute_entropy):
    n_rows = logits.shape[0]
    f32 = dict(dtype=torch.float32)
    return logits.new_empty(n_rows, **f32), logits.new_empty(n_rows if compute_entropy else 0, **f32), \
        logits.new_empty(2 * n_rows, **f32)


def _backward(logits: torch.Tensor, tokens: torch.Tensor, stats: torch.Tensor, entropy: torch.Tensor,
              grad_logprobs: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor], temperature: float,
              ignore_index: int, col_start: int, n_classes: int) -> torch.Tensor:  # fmt: skip
    """d / d logits of sum(grad_logprobs * logprobs + grad_entropy * entropy), logits' dtype;
    the columns are classes [col_start, col_start + V) of n_classes."""
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    if grad.numel():
        launch_backward(logits, tokens, stats, entropy, grad_logprobs, grad_entropy, grad, temperature, ignore_index,
                        col_start=col_start, n_classes=n_classes)  # fmt: skip
    return grad


token_logprobs_backward = torch.library.custom_op("softmax_gpu::token_logprobs_backward", _backward, mutates_args=())


@token_logprobs_backward.register_fake
def _(logits, tokens, stats, entropy, grad_logprobs, grad_entropy, temperature, ignore_index, col_start, n_classes):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _upstream(grad: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if grad is None else grad.reshape(-1).float()


class TokenLogprobsFunction(torch.autograd.Function):
    """Forward: logprobs, entropy (or an empty tensor), one read of the logits; saves the
    logits and O(N) floats. Backward: one read of the logits, one write of their gradient,
    with whichever upstream gradients arrived (both outputs flow back together)."""

    @staticmethod
    def forward(ctx, logits, tokens, temperature, ignore_index, compute_entropy):
        op = _forward if _plain_eager(logits, tokens) else token_logprobs_forward
        logprobs, entropy, stats = op(logits, tokens, temperature, ignore_index, compute_entropy)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, tokens, stats, entropy)
        ctx.options = (temperature, ignore_index, 0, logits.shape[1])  # all the classes, from the first
        ctx.mark_non_differentiable(stats)
        return logprobs, entropy, stats

    @staticmethod
    @first_order(FN)
    def backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
        return saved_logits_gradient(ctx, grad_logprobs, grad_entropy), None, None, None, None


def saved_logits_gradient(ctx, grad_logprobs, grad_entropy) -> Optional[torch.Tensor]:
    """The logits' gradient in a backward of TokenLogprobsFunction or its vocab-parallel twin:
    from the saved (logits, tokens, stats, entropy) and ctx.options (temperature,
    ignore_index, the columns' first class, V); None when the logits need none."""
    logits, tokens, stats, entropy = ctx.saved_tensors
    if not ctx.needs_input_grad[0] or (grad_logprobs is None and grad_entropy is None):
        return None
    if not entropy.numel():
        grad_entropy = None
    return backward_logits(logits, tokens, stats, entropy, grad_logprobs, grad_entropy, *ctx.options)


def backward_logits(logits, tokens, stats, entropy, grad_logprobs, grad_entropy, temperature, ignore_index, col_start,
                    n_classes) -> torch.Tensor:  # fmt: skip
    """The logits' gradient from the upstream gradients autograd handed over (either may be None)."""
    args = (logits, tokens, stats, entropy, _upstream(grad_logprobs), _upstream(grad_entropy), temperature,
            ignore_index, col_start, n_classes)  # fmt: skip
    op = _backward if _plain_eager(logits, tokens, stats, *[g for g in args[4:6] if g is not None]) \
        else token_logprobs_backward
    return op(*args)


@torch.library.register_vmap("softmax_gpu::token_logprobs_forward")
def _(info, in_dims, logits, tokens, temperature, ignore_index, compute_entropy):
    b = info.batch_size
    logprobs, entropy, stats = token_logprobs_forward(batch_rows(logits, in_dims[0], b), batch_rows(tokens, in_dims[1], b),
                                                      temperature, ignore_index, compute_entropy)  # fmt: skip
    return (logprobs.view(b, -1), entropy.view(b, entropy.numel() // b), stats.view(b, -1)), (0, 0, 0)


@torch.library.register_vmap("softmax_gpu::token_logprobs_backward")
def _(info, in_dims, logits, tokens, stats, entropy, grad_logprobs, grad_entropy, temperature, ignore_index, col_start,
      n_classes):  # fmt: skip
    b = info.batch_size
    logits_rows = batch_rows(logits, in_dims[0], b)
    # stats (2 N,), entropy (N,) or (0,), the upstream gradients (N,) per sample: flat, they
    # are in row order.
    flat = [batch_rows(t, d, b) for t, d in zip((stats, entropy, grad_logprobs, grad_entropy), in_dims[2:6])]
    grad = token_logprobs_backward(logits_rows, batch_rows(tokens, in_dims[1], b), *flat, temperature, ignore_index,
                                   col_start, n_classes)  # fmt: skip
    return grad.view(b, -1, logits_rows.shape[-1]), 0


class FunctorchTokenLogprobs(torch.autograd.Function):
    """The custom ops for torch.func transforms (see softmax_gpu/ops/functorch.py): grad,
    vjp, jacrev, and vmap over them; first derivatives only."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits, tokens, temperature, ignore_index, compute_entropy):
        return token_logprobs_forward(logits, tokens, temperature, ignore_index, compute_entropy)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, tokens, temperature, ignore_index, _ = inputs
        ctx.save_for_backward(logits, tokens, output[2], output[1])
        ctx.options = (temperature, ignore_index)
        ctx.mark_non_differentiable(output[2])

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, _grad_stats):
        logits, tokens, stats, entropy = ctx.saved_tensors
        if not entropy.numel():
            grad_entropy = None
        upstream = [None if g is None else g.float() for g in (grad_logprobs, grad_entropy)]
        grad = token_logprobs_backward(logits.detach(), tokens, stats, entropy.detach(),
                                       *[None if u is None else u.detach() for u in upstream], *ctx.options, 0,
                                       logits.shape[-1])  # fmt: skip
        return first_order_only(grad, FN, logits, *upstream), None, None, None, None


def _check_common(fn, tokens, temperature, ignore_index):
    check_tensor(fn, "tokens", tokens)
    if tokens.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{fn}(): tokens must be int64 or int32, got {tokens.dtype}")
    if isinstance(temperature, torch.Tensor) or not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
        raise TypeError(f"{fn}(): temperature must be a float, got {type(temperature).__name__}")
    if not (0.0 < float(temperature) < float("inf")):
        raise ValueError(f"{fn}(): temperature must be a finite number > 0, got {temperature}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{fn}(): ignore_index must be an int, got {type(ignore_index).__name__}")


def check_logits_and_tokens(fn, logits, tokens, temperature, ignore_index):
    """token_logprobs' checks, shared by its vocab-parallel form (where a shard may be empty)."""
    check_floating(fn, "logits", logits)
    if logits.dtype not in DTYPES:
        raise TypeError(f"{fn}(): logits must be float32, bfloat16, float16 or float64, got {logits.dtype}")
    if logits.dim() == 0:
        raise ValueError(f"{fn}(): logits must have at least one dim (the vocabulary)")
    _check_common(fn, tokens, temperature, ignore_index)
    if tokens.shape != logits.shape[:-1]:
        raise ValueError(f"{fn}(): tokens must have shape {tuple(logits.shape[:-1])} for logits of shape "
                         f"{tuple(logits.shape)}, got {tuple(tokens.shape)}")  # fmt: skip
    check_same_device(fn, logits=logits, tokens=tokens)


def token_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """log softmax(logits / T) at each position's token, and optionally the entropy of
    softmax(logits / T), without any N x V intermediate.

    Args:
        logits: (..., V), float32, bfloat16, float16 or float64 (accumulated in float32).
        tokens: (...) int64 or int32, the sampled token at each position.
        temperature: T > 0. ignore_index: positions with this token get 0 for both
            outputs and no gradient. A token outside [0, V) gives NaN for its position.
        return_entropy: also return -sum_j p_j log p_j per position.
    Returns:
        logprobs, or (logprobs, entropy): float32, shaped like tokens. Both are
        differentiable with respect to the logits, together or alone.
    """
    fn = FN
    check_logits_and_tokens(fn, logits, tokens, temperature, ignore_index)
    if logits.shape[-1] == 0:
        raise ValueError(f"{fn}(): logits must have at least one class")
    rows = logits.reshape(-1, logits.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()  # the kernels stream rows at unit stride
    function = FunctorchTokenLogprobs if under_functorch(rows, tokens) else TokenLogprobsFunction
    logprobs, entropy, _ = function.apply(rows, tokens.reshape(-1), float(temperature), ignore_index,
                                          bool(return_entropy))  # fmt: skip
    logprobs = logprobs.view(tokens.shape)
    return (logprobs, entropy.view(tokens.shape)) if return_entropy else logprobs


# ---------------------------------------------------------------------------------------
# From hidden states (the LM head fused)
# ---------------------------------------------------------------------------------------


def _chunks(x, w, buffer_bytes):
    cut = config.linear_cross_entropy_plan("speed", x.shape[0], w.shape[0], x.shape[1], x.element_size(),
                                           buffer_bytes)  # fmt: skip
    return cut.rows


def _linear_forward(hidden: torch.Tensor, linear_weight: torch.Tensor, linear_bias: Optional[torch.Tensor],
                    tokens: torch.Tensor, temperature: float, ignore_index: int, compute_entropy: bool,
                    buffer_bytes: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(logprobs, entropy or an empty tensor, (m, log d) per row), float32, for hidden (N, H) and the head
    linear_weight (V, H) (+ linear_bias), token chunk by token chunk."""
    n_rows, n_cols = hidden.shape[0], linear_weight.shape[0]
    logprobs, entropy, stats = _outputs(n_rows, hidden, compute_entropy)
    if not n_rows:
        return logprobs, entropy, stats
    check_launchable(LINEAR_FN, token_logprobs_fwd_kernel, hidden)  # before any product
    rows = _chunks(hidden, linear_weight, buffer_bytes)
    buf = _buffer(hidden, min(rows, n_rows), n_cols)
    for r0 in range(0, n_rows, rows):
        r1 = min(n_rows, r0 + rows)
        z = _view(buf, r1 - r0, n_cols)
        _logits_into(z, hidden[r0:r1], linear_weight, linear_bias)
        launch_forward(z, tokens[r0:r1], logprobs[r0:r1], entropy[r0:r1] if compute_entropy else None, stats[2 * r0 : 2 * r1],
                       temperature, ignore_index, LINEAR_FN)  # fmt: skip
    return logprobs, entropy, stats


linear_token_logprobs_forward = torch.library.custom_op(
    "softmax_gpu::linear_token_logprobs_forward", _linear_forward, mutates_args=()
)


@linear_token_logprobs_forward.register_fake
def _(hidden, linear_weight, linear_bias, tokens, temperature, ignore_index, compute_entropy, buffer_bytes=None):
    n_rows = hidden.shape[0]
    f32 = dict(dtype=torch.float32)
    return hidden.new_empty(n_rows, **f32), hidden.new_empty(n_rows if compute_entropy else 0, **f32), \
        hidden.new_empty(2 * n_rows, **f32)


def _linear_backward(hidden: torch.Tensor, linear_weight: torch.Tensor, linear_bias: Optional[torch.Tensor],
                     tokens: torch.Tensor, stats: torch.Tensor, entropy: torch.Tensor,
                     grad_logprobs: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor], temperature: float,
                     ignore_index: int, input_grad: bool, weight_grad: bool, bias_grad: bool,
                     buffer_bytes: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dX, dW, db) in their dtypes, an empty tensor for each one not asked for: per chunk,
    the logits again, their gradient over them, dX rows written once, dW and db summed in
    float32 in chunk order."""
    n_rows, hidden_size = hidden.shape
    n_cols = linear_weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    dx = torch.empty(n_rows, hidden_size, dtype=hidden.dtype, device=hidden.device) if input_grad else None
    dw_acc = torch.zeros(n_cols, hidden_size, **f32) if weight_grad else None
    db_acc = torch.zeros(n_cols, **f32) if bias_grad else None
    if n_rows:
        check_launchable(LINEAR_FN, token_logprobs_bwd_kernel, hidden)  # before any product
        rows = _chunks(hidden, linear_weight, buffer_bytes)
        buf = _buffer(hidden, min(rows, n_rows), n_cols)
        for r0 in range(0, n_rows, rows):
            r1 = min(n_rows, r0 + rows)
            x_c, z = hidden[r0:r1], _view(buf, r1 - r0, n_cols)
            _logits_into(z, x_c, linear_weight, linear_bias)
            launch_backward(z, tokens[r0:r1], stats[2 * r0 : 2 * r1], entropy[r0:r1] if grad_entropy is not None else stats,
                            grad_logprobs[r0:r1] if grad_logprobs is not None else None,
                            grad_entropy[r0:r1] if grad_entropy is not None else None, z, temperature, ignore_index,
                            LINEAR_FN)  # fmt: skip
            if dx is not None:
                torch.mm(z, linear_weight, out=dx[r0:r1])
            if dw_acc is not None:
                mm_accumulate(dw_acc, z.t(), x_c)
            if db_acc is not None:
                db_acc.add_(z.sum(0, dtype=torch.float32))
    empty = hidden.new_empty
    return (
        dx if dx is not None else empty(0),
        dw_acc.to(linear_weight.dtype) if dw_acc is not None else empty(0),
        db_acc.to(linear_bias.dtype) if db_acc is not None else empty(0),
    )


linear_token_logprobs_backward = torch.library.custom_op(
    "softmax_gpu::linear_token_logprobs_backward", _linear_backward, mutates_args=()
)


@linear_token_logprobs_backward.register_fake
def _(hidden, linear_weight, linear_bias, tokens, stats, entropy, grad_logprobs, grad_entropy, temperature, ignore_index,
      input_grad, weight_grad, bias_grad, buffer_bytes=None):  # fmt: skip
    contiguous = dict(memory_format=torch.contiguous_format)
    return (
        torch.empty_like(hidden, **contiguous) if input_grad else hidden.new_empty(0),
        torch.empty_like(linear_weight, **contiguous) if weight_grad else hidden.new_empty(0),
        torch.empty_like(linear_bias, **contiguous) if bias_grad else hidden.new_empty(0),
    )


class LinearTokenLogprobsFunction(torch.autograd.Function):
    """Forward: chunk by chunk, logprobs and entropy; saves the inputs and O(N) floats.
    Backward: the chunks' logits again, their gradient, dX, dW, db (may run more than once)."""

    @staticmethod
    def forward(ctx, hidden, linear_weight, linear_bias, tokens, temperature, ignore_index, compute_entropy,
                buffer_bytes):  # fmt: skip
        eager = _plain_eager(hidden, linear_weight, linear_bias, tokens)
        op = _linear_forward if eager else linear_token_logprobs_forward
        logprobs, entropy, stats = op(hidden, linear_weight, linear_bias, tokens, temperature, ignore_index,
                                    compute_entropy, buffer_bytes)  # fmt: skip
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, linear_weight, linear_bias, tokens, stats, entropy)
        ctx.options = (temperature, ignore_index)
        ctx.buffer_bytes = buffer_bytes
        ctx.mark_non_differentiable(stats)
        return logprobs, entropy, stats

    @staticmethod
    @first_order(LINEAR_FN)
    def backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
        hidden, linear_weight, linear_bias, tokens, stats, entropy = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        bias_grad = needs[2] and linear_bias is not None
        if not any(needs) or (grad_logprobs is None and grad_entropy is None):
            return None, None, None, None, None, None, None, None
        if not entropy.numel():
            grad_entropy = None
        upstream = (_upstream(grad_logprobs), _upstream(grad_entropy))
        args = (hidden, linear_weight, linear_bias, tokens, stats, entropy, *upstream, *ctx.options, needs[0], needs[1],
                bias_grad, ctx.buffer_bytes)  # fmt: skip
        eager = _plain_eager(hidden, linear_weight, linear_bias, tokens, *[u for u in upstream if u is not None])
        dx, dw, db = (_linear_backward if eager else linear_token_logprobs_backward)(*args)
        return (dx if needs[0] else None, dw if needs[1] else None, db if bias_grad else None,
                None, None, None, None, None)  # fmt: skip


def linear_token_logprobs(
    hidden: torch.Tensor,
    linear_weight: torch.Tensor,
    tokens: torch.Tensor,
    *,
    linear_bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    buffer_bytes: Optional[int] = None,
):
    """token_logprobs(hidden @ linear_weight.T + linear_bias, tokens, ...) without the logits.

    Args:
        hidden: (..., H), bfloat16, float32 or float16; linear_weight (V, H) and linear_bias
            (V,) or None in its dtype; tokens (...) int64 or int32.
        temperature, ignore_index, return_entropy: as in token_logprobs.
        buffer_bytes: the chunk buffer's budget (None: config.LINEAR_CE_BUFFER_BYTES["speed"]).
    Returns:
        logprobs, or (logprobs, entropy): float32, shaped like tokens, differentiable with
        respect to hidden, linear_weight and linear_bias. The logits are made by cuBLAS in
        the input's dtype, as F.linear makes them; at most a chunk of them exists at once
        (extra memory at most V*H*4 + buffer_bytes).
    """
    from .linear_cross_entropy import _check_operands

    fn = LINEAR_FN
    _check_common(fn, tokens, temperature, ignore_index)
    _check_operands(fn, hidden, linear_weight, tokens, linear_bias, None, dtypes=DTYPES[:3])
    if buffer_bytes is not None and (isinstance(buffer_bytes, bool) or not isinstance(buffer_bytes, int)
                                     or buffer_bytes < 1):  # fmt: skip
        raise ValueError(f"{fn}(): buffer_bytes must be a positive int or None, got {buffer_bytes!r}")
    x = hidden.reshape(-1, hidden.shape[-1])
    if under_functorch(x, linear_weight, linear_bias, tokens):
        # torch.func transforms (grad, vmap, jacrev): the logits are formed, then token_logprobs.
        return token_logprobs(torch.nn.functional.linear(hidden, linear_weight, linear_bias), tokens,
                              temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy)
    logprobs, entropy, _ = LinearTokenLogprobsFunction.apply(
        x, linear_weight, linear_bias, tokens.reshape(-1), float(temperature), ignore_index, bool(return_entropy),
        buffer_bytes,
    )  # fmt: skip
    logprobs = logprobs.view(tokens.shape)
    return (logprobs, entropy.view(tokens.shape)) if return_entropy else logprobs
