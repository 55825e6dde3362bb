"""Fused softmax cross-entropy: launchers, PyTorch custom ops, autograd, and cross_entropy().

Layers, top to bottom:
  launch_cross_entropy / launch_cross_entropy_backward / launch_scale_grad
                                            fill preallocated buffers (one launcher per kernel)
  softmax_gpu::cross_entropy_forward[_inplace], ::cross_entropy_backward,
  ::cross_entropy_scale_grad                custom ops
  CrossEntropyFunction                      autograd: the forward stores the gradient and the
                                            backward scales it, or (float16, float64) the
                                            backward computes it with the upstream factor
  cross_entropy()                           checks and torch.nn.functional's signature

Under any tracer (torch.compile, export, make_fx, FakeTensorMode, jit.trace), any active
dispatch mode, tensor subclasses or functorch transforms, the Function calls the custom ops,
which is what those need. For plain tensors in plain eager mode it calls the same Python
implementations directly (`_plain_eager`): the dispatcher round trip of a Python custom op
costs tens of microseconds per call, which the first H100 run showed to dominate a
forward+backward (about 1 ms of host time around a 255 us kernel at 32768 x 4096).
Mutations are then reported to autograd by hand (increment_version), as the custom op would.

Forward plus backward reads the logits once and writes the gradient once (bfloat16 and
float32 rows that fit one block); the backward's scaling costs nothing when the upstream
gradient is 1. float16 and float64 read the logits once more, in the backward.
"""
import os
from typing import Optional

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .. import config, runtime
from ..checks import check_floating, check_same_device, check_tensor
from ..kernels import cross_entropy as cross_entropy_kernels
from ..kernels.cross_entropy import (
    cross_entropy_backward_kernel,
    cross_entropy_cooperative_kernel,
    cross_entropy_kernel,
    cross_entropy_reduce_kernel,
    cross_entropy_prepare_kernel,
    cross_entropy_split_backward_kernel,
    cross_entropy_split_combine_kernel,
    cross_entropy_split_stats_kernel,
    scale_grad_kernel,
)
from ..layout import as_rows, batch_rows
from ..loss_options import REDUCTIONS, LossOptions, check_reduction  # noqa: F401 (REDUCTIONS: re-exported)
from ..runtime import (
    _MISSING, cached_plan, check_launchable, cooperative_launches, cooperative_plan, device_guard, launch, remember_plan,
)
from .functorch import first_order, first_order_only

# On CUDA a bad class index costs a host sync to catch eagerly, so by default it shows up as a
# NaN loss for its row (and so a NaN mean). SOFTMAX_GPU_CHECK_TARGETS=1 checks before launching.
CHECK_TARGETS_ON_CUDA = os.environ.get("SOFTMAX_GPU_CHECK_TARGETS", "0") == "1"


def cross_entropy_config(
    n_cols: int, itemsize: int = 4, streaming: bool = False, plain: bool = False, softcap: bool = False,
    forward_only: bool = False, many_rows: bool = True,
) -> config.RowConfig:
    """Launch configuration for rows of n_cols classes of `itemsize` bytes: the forward's (one
    block when the row fits; wider for the plain variant: class indices without weights or
    smoothing, and a wider loop block), or with streaming=True the backward kernel's, which
    always loops and so streams in the looped path's block width. The plain variant with a
    soft cap keeps the general single-block limit (config.MAX_BLOCK_CROSS_ENTROPY). Without
    the gradient (forward_only, and config.CROSS_ENTROPY_FORWARD_PATH) a row that would loop,
    or whose single block is wider than config.FORWARD_SINGLE_BLOCK_MAX, streams in
    config.LOOP_BLOCK_CROSS_ENTROPY_FORWARD blocks with one running (max, sum) a row; the
    wide single block stays where the rows are few (not many_rows: config.forward_stream_rows),
    as one streaming program a row would then walk its row alone."""
    if forward_only:
        cfg = cross_entropy_config(n_cols, itemsize, plain=plain, softcap=softcap)
        if not config.CROSS_ENTROPY_FORWARD_PATH or (
            cfg.single_block and (cfg.block_n <= config.FORWARD_SINGLE_BLOCK_MAX or not many_rows)
        ):
            return cfg
        return config.row_config(n_cols, config.LOOP_BLOCK_CROSS_ENTROPY_FORWARD, itemsize,
                                 elements_per_thread=config.elements_per_thread_forward(itemsize))  # fmt: skip
    if streaming:
        return config.row_config(
            n_cols, config.LOOP_BLOCK_CROSS_ENTROPY, itemsize,
            elements_per_thread=config.ELEMENTS_PER_THREAD_CROSS_ENTROPY,
        )  # fmt: skip
    plain = plain and itemsize <= 4  # float64's looped plain block spilled (8 bytes, sm_90)
    return config.row_config(
        n_cols,
        config.max_block_cross_entropy_plain(itemsize) if plain and not softcap else config.MAX_BLOCK_CROSS_ENTROPY,
        itemsize,
        loop_block_n=config.LOOP_BLOCK_CROSS_ENTROPY_PLAIN if plain else config.LOOP_BLOCK_CROSS_ENTROPY,
        elements_per_thread=config.ELEMENTS_PER_THREAD_CROSS_ENTROPY,
    )


def cross_entropy_split(
    n_rows: int,
    n_cols: int,
    itemsize: int = 4,
    streaming: bool = False,
    plain: bool = False,
    softcap: bool = False,
    device="cpu",
) -> Optional[config.SplitConfig]:
    """config.split_rows for the cross-entropy kernels: the forward's families as in
    cross_entropy_config (rows split only where the forward would loop: for the soft-capped
    plain variant, past the general single-block limit), or with streaming=True the backward
    kernel's (it always loops, 1024 wide); None: one program a row. Memoised per
    signature (with the tests' overrides in the key)."""
    key = ("split", n_rows, n_cols, itemsize, streaming, plain, softcap, str(device), config._split_chunk,
           config._block_limit)  # fmt: skip
    split = cached_plan(key, _MISSING)  # None is a plan too: no split
    if split is not _MISSING:
        return split
    if streaming:
        max_block = loop_block = config.LOOP_BLOCK_CROSS_ENTROPY
    elif plain and itemsize <= 4:
        max_block = config.MAX_BLOCK_CROSS_ENTROPY if softcap else config.max_block_cross_entropy_plain(itemsize)
        loop_block = config.LOOP_BLOCK_CROSS_ENTROPY_PLAIN
    else:
        max_block, loop_block = config.MAX_BLOCK_CROSS_ENTROPY, config.LOOP_BLOCK_CROSS_ENTROPY
    split = config.split_rows(n_rows, n_cols, itemsize, max_block, loop_block,
                              config.ELEMENTS_PER_THREAD_CROSS_ENTROPY, sms=config.sm_count(device))  # fmt: skip
    remember_plan(key, split)
    return split


def is_plain(target: torch.Tensor, weight: Optional[torch.Tensor], label_smoothing: float) -> bool:
    """The variant with the widest single block: class indices, no weights, no smoothing."""
    return not target.is_floating_point() and weight is None and label_smoothing == 0


def launch_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    loss: torch.Tensor,
    lse: torch.Tensor,
    grad: Optional[torch.Tensor],
    grad_divisor: Optional[torch.Tensor],
    options: LossOptions,
    cfg: Optional[config.RowConfig] = None,
    stats: Optional[torch.Tensor] = None,
    reduced: Optional[torch.Tensor] = None,
    counter: Optional[torch.Tensor] = None,
    reduction: str = "none",
) -> "config.RowConfig | config.CooperativeConfig":
    """Per-row loss and lse (float32; float64 for float64 logits) and, when grad is given,
    the gradient (may be logits itself); with stats ((N, 4), the accumulation dtype) the row
    statistics launch_cross_entropy_backward needs. For reduction "sum" / "mean" the reduced
    loss goes to the 0-d `reduced`, using the int32 `counter` that launch_cross_entropy_prepare
    zeroed (and for "mean" its total, passed as grad_divisor); where config.reduce_launch
    says (the gradient, many row tiles) a one-program launch after the loss kernel sums the
    losses instead, and the counter is not touched.

    logits (N, C) with unit column stride; target (N,) class indices or (N, C) probabilities
    with unit column stride; grad_divisor None, or a device scalar the gradient is divided
    by (the mean's total weight). Returns the RowConfig used, or with SOFTMAX_GPU_COOPERATIVE=1
    the CooperativeConfig of launch_cross_entropy_cooperative where the rows take it.
    Bytes: N*C reads (+ N*C writes with grad) + O(N) on the single-block path.
    """
    n_rows, n_cols = logits.shape
    if (reduced is None or counter is None) != (reduction == "none"):
        raise ValueError(f"launch_cross_entropy: reduction {reduction!r} needs `reduced` and `counter` exactly when not 'none'")
    if cfg is None and grad is not None and stats is None:
        coop = _cooperative_plan(logits, target, weight, grad, grad_divisor, options, reduction)
        if coop is not None:
            return launch_cross_entropy_cooperative(logits, target, loss, lse, grad, grad_divisor, reduced, counter,
                                                    *coop)  # fmt: skip
    key = None
    if cfg is None:  # the eager path: one plan per signature (runtime.cached_plan)
        key = ("ce", n_rows, n_cols, logits.dtype, logits.stride(0), target.dtype, target.dim(), target.stride(0),
               weight is None, None if grad is None else (grad.dtype, grad.stride(0)), grad_divisor is None,
               options, stats is None, reduction, str(logits.device), config._block_limit,
               config.CROSS_ENTROPY_FORWARD_PATH, config.CROSS_ENTROPY_REDUCE_LAUNCH,
               config.REDUCE_LAUNCH_TILES_PER_SM)  # fmt: skip
    plan = cached_plan(key) if key is not None else None
    if plan is None:
        plan = _forward_plan(logits, target, weight, grad, grad_divisor, stats, options, reduction, cfg)
        if key is not None:
            remember_plan(key, plan)
    cfg, grid, static, reduce_static = plan
    check_launchable("softmax_gpu.cross_entropy", cross_entropy_kernel, logits)
    with device_guard(logits):
        launch(
            cross_entropy_kernel, grid, static, key is not None,
            logits_ptr=logits,
            target_ptr=target,
            weight_ptr=weight if weight is not None else loss,  # never read without HAS_WEIGHT
            loss_ptr=loss,
            lse_ptr=lse,
            grad_ptr=grad if grad is not None else loss,  # never written without COMPUTE_GRAD
            stats_ptr=stats if stats is not None else loss,  # never written without SAVE_STATS
            reduced_ptr=reduced if reduced is not None else loss,  # used only with REDUCE
            counter_ptr=counter if counter is not None else target,
            grad_divisor_ptr=grad_divisor if grad_divisor is not None else loss,  # read only with DIVIDE_GRAD
        )
        if reduce_static is not None:  # the reduction as its own launch (config.reduce_launch)
            launch(cross_entropy_reduce_kernel, (1,), reduce_static, key is not None, loss_ptr=loss,
                   reduced_ptr=reduced, divisor_ptr=grad_divisor if grad_divisor is not None else loss)  # fmt: skip
    return cfg


def _forward_plan(logits, target, weight, grad, grad_divisor, stats, options, reduction, cfg):
    """launch_cross_entropy's (RowConfig, grid, non-pointer arguments, the reduce kernel's
    arguments or None) for this signature: cfg (or the shipped one) with its vector split, the
    options converted, and the reduction in its own launch where config.reduce_launch says."""
    n_rows, n_cols = logits.shape
    cfg = cfg or config.short_rows(
        cross_entropy_config(
            n_cols, logits.element_size(), plain=is_plain(target, weight, options.label_smoothing),
            softcap=options.softcap is not None, forward_only=grad is None,
            many_rows=n_rows >= config.forward_stream_rows(logits.device),
        ),
        n_rows,
        logits.element_size(),
        config.ELEMENTS_PER_THREAD_CROSS_ENTROPY,
    )
    soft = target.is_floating_point()
    cfg = config.vectors(cfg, n_rows, n_cols, _row_tensors(logits, grad, target))
    if cfg.vec == 1 and cfg.block_n > config.MAX_BLOCK_CROSS_ENTROPY_PLAIN:
        # Rows that cannot stream 16-byte vectors (the logits' and gradient's row strides
        # disagree) lose the 16-bit single block's last registers to addresses: float32 limits.
        cfg = config.vectors(cross_entropy_config(n_cols, 4, plain=True), n_rows, n_cols,
                             _row_tensors(logits, grad, target))  # fmt: skip
    persistent = config.cross_entropy_persistent(grad is not None, cfg, logits.dtype == torch.float64)
    n_tiles = -(-n_rows // cfg.rows)
    reduce_static = None
    if reduction != "none" and config.reduce_launch(grad is not None, persistent, n_tiles,
                                                    config.sm_count(logits.device)):  # fmt: skip
        reduce_static = dict(n_rows=n_rows, DIVIDE=reduction == "mean", ACC_FP64=logits.dtype == torch.float64,
                             BLOCK=config.PREPARE_BLOCK, num_warps=config.PREPARE_WARPS)  # fmt: skip
    static = dict(
        logits_row_stride=logits.stride(0),
        target_row_stride=target.stride(0),
        grad_row_stride=grad.stride(0) if grad is not None else 0,
        n_rows=n_rows,
        n_cols=n_cols,
        zero=0,
        SOFT_TARGET=soft,
        HAS_WEIGHT=weight is not None,
        COMPUTE_GRAD=grad is not None,
        DIVIDE_GRAD=grad is not None and grad_divisor is not None,
        SAVE_STATS=stats is not None,
        REDUCE=0 if reduce_static is not None else REDUCE_CODES[reduction],
        ACC_FP64=logits.dtype == torch.float64,
        BLOCK_N=cfg.block_n,
        SINGLE_BLOCK=cfg.single_block,
        REDUCE_BLOCK=config.reduce_block(cfg.num_warps),
        VEC=cfg.vec,
        HAS_EDGE=cfg.edge,
        ROWS=cfg.rows,
        ROW_SCALARS=grad is None and not cfg.single_block and config.CROSS_ENTROPY_FORWARD_PATH,
        PERSISTENT=persistent,
        num_warps=cfg.num_warps,
        maxnreg=cfg.maxnreg,
        **options.kernel_args(),
    )
    programs = config.cross_entropy_programs(n_tiles, cfg.num_warps, logits.device, persistent)
    return cfg, (programs,), static, reduce_static


REDUCE_CODES = {"none": 0, "sum": 1, "mean": 2}


def _cooperative_plan(logits, target, weight, grad, grad_divisor, options: LossOptions, reduction: str):
    """(CooperativeConfig, its launches' arguments) when the loss with its gradient takes
    cooperative rows (config.cooperative_rows: with SOFTMAX_GPU_COOPERATIVE=1 or forced; the
    plain loss, class indices without weights or smoothing, rows past the plain single block,
    16-bit or float32, vectors), else None. Stored per signature like the forward's plans."""
    n_rows, n_cols = logits.shape
    if (config._cooperative is None and not config.COOPERATIVE) or not is_plain(target, weight, options.label_smoothing):
        return None
    key = ("ce_cooperative", n_rows, n_cols, logits.dtype, logits.stride(0), target.dtype, target.stride(0),
           grad.dtype, grad.stride(0), grad_divisor is None, options, reduction, str(logits.device),
           config._cooperative, config.COOPERATIVE)  # fmt: skip
    plan = cached_plan(key, _MISSING)  # None is a plan too
    if plan is not _MISSING:
        return plan
    plan = None
    itemsize = logits.element_size()
    max_block = config.MAX_BLOCK_CROSS_ENTROPY if options.softcap is not None else \
        config.max_block_cross_entropy_plain(itemsize)  # fmt: skip
    coop = config.cooperative_rows(n_rows, n_cols, itemsize, max_block, config.COOPERATIVE_CROSS_ENTROPY,
                                   sms=config.sm_count(logits.device))  # fmt: skip
    if coop is not None:
        coop = config.vectors(coop, n_rows, n_cols, _row_tensors(logits, grad, target))
    if coop is not None and coop.vec > 1:
        args = options.kernel_args()
        static = dict(
            logits_row_stride=logits.stride(0), target_row_stride=target.stride(0), grad_row_stride=grad.stride(0),
            n_rows=n_rows, n_cols=n_cols, chunk_cols=coop.chunk_cols, n_chunks=coop.chunks,
            ignore_index=args["ignore_index"], z_loss=args["z_loss"], softcap=args["softcap"],
            HAS_Z_LOSS=args["HAS_Z_LOSS"], HAS_SOFTCAP=args["HAS_SOFTCAP"], DIVIDE_GRAD=grad_divisor is not None,
            REDUCE=REDUCE_CODES[reduction], BLOCK_N=coop.block_n, CHUNKS_BLOCK=coop.chunks_block,
            REDUCE_BLOCK=config.reduce_block(coop.num_warps), VEC=coop.vec, HAS_EDGE=coop.edge,
            num_warps=coop.num_warps, maxnreg=coop.maxnreg,
        )  # fmt: skip
        def pointers():
            f32 = dict(dtype=torch.float32, device=logits.device)
            counter = torch.zeros(4, dtype=torch.int32, device=logits.device)
            # (the types the launch passes: the target in the unused counter's place for "none")
            return dict(logits_ptr=logits, target_ptr=target, loss_ptr=torch.empty(4, **f32),
                        lse_ptr=torch.empty(4, **f32), grad_ptr=grad, reduced_ptr=torch.empty(4, **f32),
                        counter_ptr=target if reduction == "none" else counter, grad_divisor_ptr=torch.empty(4, **f32),
                        part_ptr=torch.empty(4, **f32), group_counter_ptr=counter)  # fmt: skip

        # (the kernels module's own object: a tool may have replaced this module's name)
        coop, phases = cooperative_plan(cross_entropy_kernels.cross_entropy_cooperative_kernel, coop, static,
                                        logits.device, pointers)  # fmt: skip
        plan = (coop, phases) if coop is not None else None
    remember_plan(key, plan)
    return plan


def launch_cross_entropy_cooperative(logits, target, loss, lse, grad, grad_divisor, reduced, counter,
                                     coop: config.CooperativeConfig, phases: tuple) -> config.CooperativeConfig:  # fmt: skip
    """launch_cross_entropy's work on cooperative rows (_cooperative_plan;
    kernels/cross_entropy.py, cross_entropy_cooperative_kernel): one cooperative launch after
    zeroing the groups' counters, or in Triton's interpreter its two halves. Returns coop.
    Bytes: the logits read once and the gradient written once (the interpreter's halves read
    the logits twice), each program's class index and the mean's divisor a row, the loss and
    lse, and n_rows * chunks * 3 partials written once and read by each chunk of the row."""
    check_launchable("softmax_gpu.cross_entropy", cross_entropy_cooperative_kernel, logits)
    part = runtime.cooperative_partials((logits.shape[0], 3, coop.chunks), logits.device)
    pointers = dict(logits_ptr=logits, target_ptr=target, loss_ptr=loss, lse_ptr=lse, grad_ptr=grad,
                    reduced_ptr=reduced if reduced is not None else loss,  # used only with REDUCE
                    counter_ptr=counter if counter is not None else target,
                    grad_divisor_ptr=grad_divisor if grad_divisor is not None else loss, part_ptr=part)  # fmt: skip
    with device_guard(logits):
        for static, counter in cooperative_launches(coop, phases, "group_counter_ptr", part):
            launch(cross_entropy_cooperative_kernel, (coop.programs,), static, True, **pointers, **counter)
    return coop


def _row_tensors(*tensors):
    """(itemsize, row stride) of the (N, C) row tensors a kernel streams (config.vectors):
    logits and gradient, and probability targets; class indices and absent ones are skipped."""
    return [(t.element_size(), t.stride(0)) for t in tensors if t is not None and t.dim() == 2]


def launch_cross_entropy_split(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    loss: torch.Tensor,
    lse: torch.Tensor,
    grad: Optional[torch.Tensor],
    total: Optional[torch.Tensor],
    options: LossOptions,
    split: config.SplitConfig,
    stats: Optional[torch.Tensor] = None,
    reduced: Optional[torch.Tensor] = None,
    counter: Optional[torch.Tensor] = None,
    reduction: str = "none",
) -> config.SplitConfig:
    """launch_cross_entropy's outputs for rows cut into split.chunks chunks (few long rows):
    partials per chunk (cross_entropy_split_stats_kernel), then one program a row merges them
    into the row's loss, lse and statistics (cross_entropy_split_combine_kernel). For "sum" /
    "mean" the first launch also does the prepare kernel's work (zeroes `counter`; for the
    mean writes the divisor into the 0-d `total`), so the loss is two launches for every
    reduction. A split row's gradient is always formed from the statistics, by
    launch_cross_entropy_split_backward: the autograd function defers it to the backward; given
    grad here (an upstream gradient of 1), a third launch writes it. Chunks cut the rows'
    aligned bodies and chunk 0 takes the head/tail edge (config.vectors); returns split with
    its vec / edge filled in.
    Bytes: one read of the logits (and a second one plus one write of grad, when given),
    plus the partials: n_rows * (chunks * N_PART + 1) values written and read once
    (N_PART = 4 with probability targets or smoothing, else 2; the one: the target's logit,
    read once more by chunk 0's program) and O(n_rows * chunks) scalars. grad may be logits."""
    check_launchable("softmax_gpu.cross_entropy", cross_entropy_split_stats_kernel, logits)
    n_rows, n_cols = logits.shape
    if (reduced is None or counter is None) != (reduction == "none"):
        raise ValueError(f"launch_cross_entropy_split: reduction {reduction!r} needs `reduced` and `counter` exactly when not 'none'")
    acc = _acc_dtype(logits)
    if grad is not None and stats is None:
        stats = torch.empty((n_rows, 4), dtype=acc, device=logits.device)
    key = ("ce_split", n_rows, n_cols, logits.dtype, logits.stride(0), target.dtype, target.dim(), target.stride(0),
           weight is None, total is None, stats is None, options, reduction, split)  # fmt: skip
    plan = cached_plan(key)
    if plan is None:
        plan = remember_plan(key, _split_plan(logits, target, weight, stats, options, reduction, split))
    split, n_part, stats_static, combine_static = plan
    part = torch.empty((n_rows, n_part * split.chunks + 1), dtype=acc, device=logits.device)
    pointers = dict(target_ptr=target, weight_ptr=weight if weight is not None else part,  # read only with HAS_WEIGHT
                    part_ptr=part, counter_ptr=counter if counter is not None else target)  # used only with REDUCE
    with device_guard(logits):
        launch(cross_entropy_split_stats_kernel, (n_rows, split.chunks), stats_static, True, logits_ptr=logits,
               total_ptr=total if total is not None else part, **pointers)  # (total: written only for the mean)
        launch(cross_entropy_split_combine_kernel, (n_rows,), combine_static, True, loss_ptr=loss, lse_ptr=lse,
               stats_ptr=stats if stats is not None else loss,  # written only with SAVE_STATS
               reduced_ptr=reduced if reduced is not None else loss,  # used only with REDUCE
               total_ptr=total if total is not None else loss, **pointers)  # (total: read only for the mean)
    if grad is not None:  # in the backward kernel's own chunks (its blocks compile for the streaming widths)
        chunks = cross_entropy_split(n_rows, n_cols, logits.element_size(), streaming=True, device=logits.device)
        launch_cross_entropy_split_backward(logits, target, weight, stats, None, total, grad, options,
                                            chunks or split)  # fmt: skip
    return split


def _split_plan(logits, target, weight, stats, options: LossOptions, reduction: str, split: config.SplitConfig):
    """launch_cross_entropy_split's (split with its vectors, values a chunk writes, the stats
    and combine kernels' arguments besides the pointers) for this signature."""
    n_rows, n_cols = logits.shape
    soft = target.is_floating_point()
    # (grad is written by the backward kernel's launch, which vectorises for it itself)
    split = config.vectors(split, n_rows, n_cols, _row_tensors(logits, target))
    n_part = 4 if soft or options.label_smoothing > 0 else 2  # values a chunk; one more a row: the target's logit
    opts = options.kernel_args()
    common = dict(
        target_row_stride=target.stride(0), n_rows=n_rows, n_cols=n_cols, n_chunks=split.chunks,
        ignore_index=opts["ignore_index"], label_smoothing=opts["label_smoothing"],
        label_smoothing_lo=opts["label_smoothing_lo"], SOFT_TARGET=soft, HAS_WEIGHT=weight is not None,
        HAS_SMOOTHING=opts["HAS_SMOOTHING"], REDUCE=REDUCE_CODES[reduction], ACC_FP64=logits.dtype == torch.float64,
    )  # fmt: skip
    stats_static = dict(
        logits_row_stride=logits.stride(0), chunk_cols=split.chunk_cols, softcap=opts["softcap"],
        softcap_lo=opts["softcap_lo"], HAS_SOFTCAP=opts["HAS_SOFTCAP"], BLOCK_N=split.block_n,
        PREPARE_BLOCK=config.reduce_block(split.num_warps), VEC=split.vec, HAS_EDGE=split.edge,
        num_warps=split.num_warps, maxnreg=split.maxnreg, **common,
    )  # fmt: skip
    combine_static = dict(
        z_loss=opts["z_loss"], z_loss_lo=opts["z_loss_lo"], HAS_Z_LOSS=opts["HAS_Z_LOSS"],
        SAVE_STATS=stats is not None, CHUNKS_BLOCK=split.chunks_block,
        REDUCE_BLOCK=config.reduce_block(config.SPLIT_COMBINE_WARPS), num_warps=config.SPLIT_COMBINE_WARPS, **common,
    )  # fmt: skip
    return split, n_part, stats_static, combine_static


def launch_cross_entropy_prepare(
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    total: Optional[torch.Tensor],
    counter: torch.Tensor,
    n_classes: int,
    ignore_index: int,
) -> None:
    """Zeroes `counter` and, when `total` (0-d, the accumulation dtype) is given, writes the
    mean's divisor into it. One program; bytes: one read of the class indices."""
    check_launchable("softmax_gpu.cross_entropy", cross_entropy_prepare_kernel, target)
    soft, has_weight, total_dtype = target.is_floating_point(), weight is not None, None if total is None else total.dtype
    key = ("prepare", soft, has_weight, total_dtype)
    static = cached_plan(key)
    if static is None:
        static = remember_plan(key, dict(SOFT_TARGET=soft, HAS_WEIGHT=has_weight, COMPUTE_TOTAL=total is not None,
                                         ACC_FP64=total_dtype == torch.float64, BLOCK=config.PREPARE_BLOCK,
                                         num_warps=config.PREPARE_WARPS))  # fmt: skip
    with device_guard(target):
        launch(
            cross_entropy_prepare_kernel, (1,), static, True,
            target_ptr=target,
            weight_ptr=weight if weight is not None else counter,  # never read without HAS_WEIGHT
            total_ptr=total if total is not None else counter,  # never written without COMPUTE_TOTAL
            counter_ptr=counter,
            target_row_stride=target.stride(0),
            n_rows=target.shape[0],
            n_cols=n_classes,
            ignore_index=ignore_index,
        )


def launch_cross_entropy_backward(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    stats: torch.Tensor,
    upstream: torch.Tensor,
    grad_divisor: Optional[torch.Tensor],
    grad: torch.Tensor,
    options: LossOptions,
    cfg: Optional[config.RowConfig] = None,
) -> config.RowConfig:
    """grad = d loss / d logits * upstream (/ grad_divisor), from the stats launch_cross_entropy
    saved; upstream (N,) or 0-d in the accumulation dtype. grad may be logits itself.
    Bytes: N*C reads + N*C writes + O(N)."""
    n_rows, n_cols = logits.shape
    planned = cfg is None
    key = ("ce_bwd", *_backward_key(logits, target, weight, grad, upstream, grad_divisor, options),
           config._block_limit)  # fmt: skip
    plan = cached_plan(key) if planned else None
    if plan is None:
        cfg = config.vectors(cfg or cross_entropy_config(n_cols, logits.element_size(), streaming=True), n_rows, n_cols,
                             _row_tensors(logits, grad, target))  # fmt: skip
        plan = (cfg, dict(_backward_static(logits, target, weight, grad, grad_divisor, options), BLOCK_N=cfg.block_n,
                          VEC=cfg.vec, HAS_EDGE=cfg.edge, num_warps=cfg.num_warps, maxnreg=cfg.maxnreg))  # fmt: skip
        if planned:
            remember_plan(key, plan)
    cfg, static = plan
    check_launchable("softmax_gpu.cross_entropy backward", cross_entropy_backward_kernel, logits)
    with device_guard(logits):
        launch(cross_entropy_backward_kernel, (n_rows,), static, planned,
               **_backward_pointers(logits, target, weight, stats, upstream, grad_divisor, grad))  # fmt: skip
    return cfg


def _backward_key(logits, target, weight, grad, upstream, grad_divisor, options) -> tuple:
    """What the backward kernels' launch arguments depend on, besides their blocks."""
    return (*logits.shape, logits.dtype, logits.stride(0), target.dtype, target.dim(), target.stride(0), grad.dtype,
            grad.stride(0), weight is None, grad_divisor is None, upstream is None, options)  # fmt: skip


def _backward_static(logits, target, weight, grad, grad_divisor, options) -> dict:
    return dict(logits_row_stride=logits.stride(0), target_row_stride=target.stride(0), grad_row_stride=grad.stride(0),
                n_cols=logits.shape[1], SOFT_TARGET=target.is_floating_point(), HAS_WEIGHT=weight is not None,
                DIVIDE_GRAD=grad_divisor is not None, ACC_FP64=logits.dtype == torch.float64,
                **options.kernel_args(z_loss=False))  # fmt: skip


def _backward_pointers(logits, target, weight, stats, upstream, grad_divisor, grad) -> dict:
    """The backward kernels' pointers (a placeholder where an input is absent: never read),
    and the upstream's stride (0 for a 0-d factor)."""
    return dict(
        logits_ptr=logits,
        target_ptr=target,
        weight_ptr=weight if weight is not None else stats,  # read only with HAS_WEIGHT
        stats_ptr=stats,
        upstream_ptr=upstream if upstream is not None else stats,  # read only with HAS_UPSTREAM (split)
        grad_divisor_ptr=grad_divisor if grad_divisor is not None else stats,  # read only with DIVIDE_GRAD
        grad_ptr=grad,
        upstream_stride=upstream.stride(0) if upstream is not None and upstream.dim() else 0,
    )


def launch_cross_entropy_split_backward(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    stats: torch.Tensor,
    upstream: Optional[torch.Tensor],
    grad_divisor: Optional[torch.Tensor],
    grad: torch.Tensor,
    options: LossOptions,
    split: config.SplitConfig,
) -> config.SplitConfig:
    """launch_cross_entropy_backward for rows cut into split.chunks chunks, one program a
    chunk (the same four row statistics), rows cut as in launch_cross_entropy_split; upstream
    None stands for 1. Returns split with its vec / edge filled in.
    Bytes: N*C reads + N*C writes + O(N * chunks)."""
    check_launchable("softmax_gpu.cross_entropy backward", cross_entropy_split_backward_kernel, logits)
    n_rows, n_cols = logits.shape
    key = ("ce_split_bwd", *_backward_key(logits, target, weight, grad, upstream, grad_divisor, options), split)
    plan = cached_plan(key)
    if plan is None:
        split = config.vectors(split, n_rows, n_cols, _row_tensors(logits, grad, target))
        plan = remember_plan(key, (split, dict(
            _backward_static(logits, target, weight, grad, grad_divisor, options), chunk_cols=split.chunk_cols,
            BLOCK_N=split.block_n, VEC=split.vec, HAS_EDGE=split.edge, HAS_UPSTREAM=upstream is not None,
            num_warps=split.num_warps, maxnreg=split.maxnreg,
        )))  # fmt: skip
    split, static = plan
    with device_guard(logits):
        launch(cross_entropy_split_backward_kernel, (n_rows, split.chunks), static, True,
               **_backward_pointers(logits, target, weight, stats, upstream, grad_divisor, grad))  # fmt: skip
    return split


def launch_scale_grad(grad: torch.Tensor, upstream: torch.Tensor, cfg: Optional[config.RowConfig] = None):
    """grad[r] *= upstream[r] in place; a 0-d upstream scales every row. Rows whose factor is
    exactly 1 are left untouched without being read; a 0-d factor of 1 costs each program one
    read. Short rows go several to a program (config.short_rows), as in the forward, on at
    most config.scale_grad_programs programs. Eager calls reuse a plan per signature."""
    n_rows, n_cols = grad.shape
    key = None
    if cfg is None:
        key = ("scale", n_rows, n_cols, grad.dtype, grad.stride(0), upstream.dim(), str(grad.device),
               config._block_limit)  # fmt: skip
        plan = cached_plan(key)
    if cfg is not None or plan is None:
        cfg = cfg or config.short_rows(cross_entropy_config(n_cols), n_rows, grad.element_size(),
                                       config.ELEMENTS_PER_THREAD_CROSS_ENTROPY)  # fmt: skip
        cfg = config.vectors(cfg, n_rows, n_cols, _row_tensors(grad))
        static = dict(grad_row_stride=grad.stride(0), n_rows=n_rows, n_cols=n_cols, BLOCK_N=cfg.block_n, VEC=cfg.vec,
                      HAS_EDGE=cfg.edge, ROWS=cfg.rows, SCALAR=upstream.dim() == 0, num_warps=cfg.num_warps,
                      maxnreg=cfg.maxnreg)  # fmt: skip
        plan = (cfg, (config.scale_grad_programs(-(-n_rows // cfg.rows), grad.device),), static)
        if key is not None:
            remember_plan(key, plan)
    cfg, grid, static = plan
    check_launchable("softmax_gpu.cross_entropy backward", scale_grad_kernel, grad)
    with device_guard(grad):
        launch(scale_grad_kernel, grid, static, key is not None, grad_ptr=grad, upstream_ptr=upstream,
               upstream_stride=upstream.stride(0) if upstream.dim() else 0)  # fmt: skip
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


def _acc_dtype(logits: torch.Tensor) -> torch.dtype:
    """The dtype of the loss, lse and every accumulation: float64 for float64 logits, else float32."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


# Logits dtypes whose gradient is written in the backward, with the upstream factor, instead
# of in the forward: float16, whose (q - onehot) / N underflows before a loss scale of 2^16
# could rescue it, and float64, where the price (a second read of the logits) is no concern
# next to exactness, and which gradcheck and retain_graph then work with.
DEFERRED_GRAD_DTYPES = (torch.float16, torch.float64)


def _total_weight(
    target: torch.Tensor, weight: Optional[torch.Tensor], ignore_index: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The denominator of reduction="mean", on device (no sync): the summed class weight of the
    rows that are not ignored (their count without weights), or the row count for
    probability targets. Two small launches in the common case (compare, sum)."""
    if target.is_floating_point():  # torch: numel / C, so NaN (0 / 0) with no classes
        rows = float(target.shape[0]) if target.shape[1] else float("nan")
        return torch.full((), rows, dtype=dtype, device=target.device)
    if weight is None:
        return (target != ignore_index).sum(dtype=dtype)
    return row_weights(target, weight, ignore_index, dtype).sum()


def row_weights(target: torch.Tensor, weight: Optional[torch.Tensor], ignore_index: int,
                dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """Each class-index row's share of reduction="mean"'s denominator, on device: its class
    weight (1 without weights), 0 when ignored, NaN for an index out of range (with weights)."""
    valid = target != ignore_index
    if weight is None:
        return valid.to(dtype)
    # Never index with an unchecked class index: on CUDA an out-of-range one would trip a
    # device-side assert and kill the context. A bad row makes the total NaN instead (its
    # loss is NaN too, so the mean is NaN either way, and so is every gradient).
    n_classes = weight.shape[0]
    if n_classes == 0:  # every row is ignored or out of range
        return torch.where(valid, float("nan"), 0.0).to(dtype)
    w_t = weight.to(dtype)[target.clamp(0, n_classes - 1)]
    return torch.where(_bad_class_indices(target, n_classes, ignore_index), float("nan"), w_t * valid)


def zero_class_rows(target: torch.Tensor, options: LossOptions, dtype: torch.dtype) -> torch.Tensor:
    """The per-row loss for zero classes, as torch.nn.functional.cross_entropy gives it, with
    nothing to launch. Class indices: 0 for an ignored row; NaN for any other (out of range:
    the row rule on CUDA, which callers check first on CPU); NaN for every row with
    label_smoothing > 0 (torch adds eps / C = inf times the row's smoothing term, 0).
    Probabilities: -0.0, an empty sum negated (inf with z_loss > 0: lse = log 0 = -inf)."""
    n_rows = target.shape[0]
    if target.is_floating_point():
        return torch.full((n_rows,), float("inf") if options.z_loss > 0 else -0.0, dtype=dtype, device=target.device)
    if options.label_smoothing > 0:
        return torch.full((n_rows,), float("nan"), dtype=dtype, device=target.device)
    return torch.where(target == options.ignore_index, 0.0, float("nan")).to(dtype)


def zero_class_reduce(loss: torch.Tensor, soft: bool, label_smoothing: float, reduction: str) -> torch.Tensor:
    """zero_class_rows' loss reduced as torch reduces it: the mean always NaN (no row counts,
    or 0 / 0 for probabilities, whose divisor torch takes as numel / C); the sum NaN with
    smoothing of class indices (even over no rows: 0 * inf), -0.0 for probability targets."""
    if reduction == "mean" or (reduction == "sum" and label_smoothing > 0 and not soft):
        return torch.full((), float("nan"), dtype=loss.dtype, device=loss.device)
    return loss.neg().sum().neg() if soft else loss.sum()  # -(sum of +0.0) is torch's -0.0


def _forward(logits, target, weight, options: LossOptions, reduction, grad, stats=None, split=_MISSING):
    """Shared body of the two forward ops: (loss, lse, total) with the loss per row, or
    reduced to a 0-d tensor, and total the mean's divisor (else None); fills grad / stats if
    given. Two launches for "sum" and "mean" (prepare, then the loss kernel; a third, the
    reduction's own, after a loss kernel that writes grad over many rows), one for "none";
    split rows (few long ones, cross_entropy_split) two for every reduction, and a third when
    given grad (the autograd function defers their gradient to the backward instead). split:
    _forward_split's answer where the caller has it already."""
    n_rows, n_classes = logits.shape
    _check_class_indices(target, n_classes, options.ignore_index)
    acc = dict(dtype=_acc_dtype(logits), device=logits.device)
    if n_classes == 0:  # torch's values (zero_class_rows); nothing to launch, grad is empty
        loss = zero_class_rows(target, options, acc["dtype"])
        if stats is not None:
            stats.zero_()  # never read: the backward has no element to write
        total = torch.zeros((), **acc) if reduction == "mean" else None
        if reduction != "none":
            loss = zero_class_reduce(loss, target.is_floating_point(), options.label_smoothing, reduction)
        return loss, torch.full((n_rows,), float("-inf"), **acc), total
    loss = torch.empty(n_rows, **acc)
    lse = torch.empty(n_rows, **acc)
    reduced = total = counter = None
    if split is _MISSING:
        split = _forward_split(logits, target, weight, options)
    if reduction != "none":
        reduced = torch.empty((), **acc)
        counter = torch.empty((), dtype=torch.int32, device=logits.device)
        total = torch.empty((), **acc) if reduction == "mean" else None
        if n_rows and split is None:
            launch_cross_entropy_prepare(target, weight, total, counter, n_classes, options.ignore_index)
        elif not n_rows:  # torch: the sum of nothing is 0, the mean 0 / 0 = NaN
            reduced.fill_(0.0 if reduction == "sum" else float("nan"))
            if total is not None:
                total.fill_(0.0)
    if split is not None:  # few long rows: two launches, the prepare kernel's work folded into the first
        launch_cross_entropy_split(logits, target, weight, loss, lse, grad, total, options, split, stats=stats,
                                   reduced=reduced, counter=counter, reduction=reduction)  # fmt: skip
    elif n_rows:
        launch_cross_entropy(logits, target, weight, loss, lse, grad, total, options, stats=stats, reduced=reduced,
                             counter=counter, reduction=reduction)  # fmt: skip
    return (loss if reduced is None else reduced), lse, total


def _forward_split(logits, target, weight, options: LossOptions) -> Optional[config.SplitConfig]:
    """How the forward splits these (N, C) logits' rows (cross_entropy_split), or None."""
    n_rows, n_classes = logits.shape
    if not n_rows:
        return None
    return cross_entropy_split(n_rows, n_classes, logits.element_size(),
                               plain=is_plain(target, weight, options.label_smoothing),
                               softcap=options.softcap is not None, device=logits.device)  # fmt: skip


def _fake_outputs(logits, reduction):
    """Shapes of (loss, lse, total): the loss (N,) or 0-d, lse (N,), total 0-d for the mean
    (else empty), all in the accumulation dtype."""
    acc = dict(dtype=_acc_dtype(logits), device=logits.device)
    n_rows = logits.shape[0]
    loss = logits.new_empty(n_rows if reduction == "none" else (), **acc)
    total = logits.new_empty(() if reduction == "mean" else (0,), **acc)
    return loss, logits.new_empty(n_rows, **acc), total


def _cross_entropy_forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    reduction: str,
    compute_grad: bool,
    save_stats: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss (per row, or reduced), lse, gradient of the reduced loss or an empty tensor, row
    statistics for cross_entropy_backward or an empty tensor, the mean's divisor or an empty
    tensor) for 2-D logits."""
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if compute_grad else None
    stats = logits.new_empty((logits.shape[0], 4), dtype=_acc_dtype(logits)) if save_stats else None
    options = LossOptions(ignore_index, label_smoothing, z_loss, softcap)
    loss, lse, total = _forward(logits, target, weight, options, reduction, grad, stats)
    # Separate empty tensors: a custom op's outputs may not alias one another.
    return (
        loss,
        lse,
        grad if grad is not None else logits.new_empty(0),
        stats if stats is not None else lse.new_empty(0),
        total if total is not None else lse.new_empty(0),
    )


cross_entropy_forward = torch.library.custom_op(
    "softmax_gpu::cross_entropy_forward", _cross_entropy_forward, mutates_args=()
)


@cross_entropy_forward.register_fake
def _(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, reduction, compute_grad,
      save_stats=False):
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if compute_grad else logits.new_empty(0)
    acc = _acc_dtype(logits)
    stats = logits.new_empty((logits.shape[0], 4) if save_stats else (0,), dtype=acc)
    loss, lse, total = _fake_outputs(logits, reduction)
    return loss, lse, grad, stats, total


def _cross_entropy_forward_inplace(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    reduction: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As cross_entropy_forward, but the gradient overwrites the logits (no N x C buffer)."""
    options = LossOptions(ignore_index, label_smoothing, z_loss, softcap)
    loss, lse, total = _forward(logits, target, weight, options, reduction, logits)
    return loss, lse, total if total is not None else lse.new_empty(0)


cross_entropy_forward_inplace = torch.library.custom_op(
    "softmax_gpu::cross_entropy_forward_inplace", _cross_entropy_forward_inplace, mutates_args=("logits",)
)


@cross_entropy_forward_inplace.register_fake
def _(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, reduction):
    return _fake_outputs(logits, reduction)


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


def _backward_into(grad, logits, target, weight, stats, upstream, grad_divisor, options: LossOptions):
    if grad.numel():
        args = (logits, target, weight, stats, upstream, grad_divisor, grad, options)
        split = cross_entropy_split(*logits.shape, logits.element_size(), streaming=True, device=logits.device)
        if split is not None:
            launch_cross_entropy_split_backward(*args, split)
        else:
            launch_cross_entropy_backward(*args)
    return grad


def _cross_entropy_backward(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    stats: torch.Tensor,
    upstream: torch.Tensor,
    grad_divisor: Optional[torch.Tensor],
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
) -> torch.Tensor:
    """d loss / d logits times upstream ((N,) or 0-d) over grad_divisor, in one rounding to
    the logits' dtype, from the row statistics cross_entropy_forward saved (z_loss is in
    them already: it is taken only so that the four options pass as one)."""
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    options = LossOptions(ignore_index, label_smoothing, z_loss, softcap)
    return _backward_into(grad, logits, target, weight, stats, upstream, grad_divisor, options)


cross_entropy_backward = torch.library.custom_op(
    "softmax_gpu::cross_entropy_backward", _cross_entropy_backward, mutates_args=()
)


@cross_entropy_backward.register_fake
def _(logits, target, weight, stats, upstream, grad_divisor, ignore_index, label_smoothing, z_loss, softcap):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _target_gradient(logits, lse, weight, scale, label_smoothing, softcap, dtype):
    """d loss / d p for probability targets: (1 - eps) w_j (lse - z_j) times the row's scale
    (the upstream gradient, over the row count for a mean), in the accumulation dtype, rounded
    once to the target's dtype. Smoothing's p' = (1 - eps) p + eps / C gives the (1 - eps)."""
    z = logits.to(lse.dtype)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    g = (lse.unsqueeze(1) - z) * ((1.0 - label_smoothing) * (scale.unsqueeze(1) if scale.dim() else scale))
    if weight is not None:
        g = g * weight.to(lse.dtype)
    return g.to(dtype)


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


def under_functorch(*tensors) -> bool:
    """True when a torch.func transform (grad, vmap, ...) wraps one of the tensors: the ops
    then take their torch.func paths (softmax_gpu/ops/functorch.py). Not while torch.compile
    traces (it handles the transforms itself, and cannot trace this check)."""
    if torch.compiler.is_compiling():
        return False
    return any(t is not None and _is_functorch_wrapped(t) for t in tensors)


class CrossEntropyFunction(torch.autograd.Function):
    """The loss, with the gradient of the logits formed one of two ways:

    stored:   the forward writes d loss / d logits (for an upstream gradient of 1, divided by
              the mean's total); the backward rescales it in place only where the upstream
              gradient is not 1. 1 read + 1 write of N x C in all: bfloat16 and float32.
    deferred: the forward saves 4 numbers per row; the backward reads the logits again and
              writes the gradient with the upstream factor applied before rounding. 2 reads
              + 1 write: float16 and float64 (DEFERRED_GRAD_DTYPES), and split rows (few
              long ones, every dtype), whose forward reads them once anyway.
    Probability targets that require grad get d loss / d p in the backward from the saved
    logits and lse.
    """

    @staticmethod
    def forward(ctx, logits, target, weight, options, reduction, inplace):
        logits_grad = ctx.needs_input_grad[0]
        target_grad = target.is_floating_point() and ctx.needs_input_grad[1]
        eager = _plain_eager(logits, target, weight)
        split = _forward_split(logits, target, weight, options)
        defer = logits_grad and (logits.dtype in DEFERRED_GRAD_DTYPES or split is not None)
        grad = stats = None
        if logits_grad and inplace and not defer:
            # Declared as mutating `logits`, so its version counter is bumped: anything else in
            # the graph that saved the logits' values fails autograd's version check at
            # backward instead of silently using the gradient. (mark_dirty is not used because
            # a Function that dirties a view may return only that one tensor.)
            if eager:  # the custom op's body, without the dispatcher and its empty outputs
                loss, lse, total = _forward(logits, target, weight, options, reduction, logits, split=split)
                torch.autograd.graph.increment_version(logits)
            else:
                loss, lse, total = cross_entropy_forward_inplace(logits, target, weight, *options, reduction)
            grad = logits
        else:
            if eager:
                grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if logits_grad and not defer else None
                stats = logits.new_empty((logits.shape[0], 4), dtype=_acc_dtype(logits)) if defer else None
                loss, lse, total = _forward(logits, target, weight, options, reduction, grad, stats, split=split)
            else:
                loss, lse, grad, stats, total = cross_entropy_forward(logits, target, weight, *options, reduction,
                                                                      logits_grad and not defer, defer)  # fmt: skip
            if defer and inplace and eager:
                # The backward will write the gradient over the logits: the same contract as
                # the stored in-place path, whose version bump this repeats now.
                torch.autograd.graph.increment_version(logits)
        total = total if reduction == "mean" else None
        ctx.mode = "deferred" if defer else "stored" if logits_grad else None
        ctx.inplace = inplace and eager
        ctx.options = options
        ctx.reduction = reduction
        ctx.target_grad_dtype = target.dtype if target_grad else None
        ctx.acc = _acc_dtype(logits)
        keep_logits = defer or target_grad
        ctx.save_for_backward(
            grad if ctx.mode == "stored" else None,
            logits if keep_logits else None,
            target if defer else None,
            weight if keep_logits else None,
            stats if defer else None,
            total,
            lse if target_grad else None,
        )
        ctx.mark_non_differentiable(lse)
        ctx.backward_done = False
        return loss, lse

    @staticmethod
    @first_order("softmax_gpu.cross_entropy")
    def backward(ctx, grad_loss, *unused):
        if ctx.mode == "stored" or (ctx.mode == "deferred" and ctx.inplace):
            if ctx.backward_done:  # checked before saved_tensors, whose version check would fail first
                raise RuntimeError(
                    "softmax_gpu.cross_entropy: backward ran twice through the same graph; the fused loss "
                    "stores its gradient once, so run the forward again instead of retain_graph=True"
                )
            ctx.backward_done = True
        grad, logits, target, weight, stats, total, lse = ctx.saved_tensors
        options = ctx.options
        upstream = grad_loss.to(ctx.acc) if grad_loss.dim() == 0 else grad_loss.reshape(-1).to(ctx.acc)
        grad_target = None
        if ctx.target_grad_dtype is not None:  # before an in-place backward overwrites the logits
            scale = upstream / total if ctx.reduction == "mean" else upstream
            grad_target = _target_gradient(logits, lse, weight, scale, options.label_smoothing, options.softcap,
                                           ctx.target_grad_dtype)  # fmt: skip
        if ctx.mode == "stored":
            if _plain_eager(grad, upstream):
                _cross_entropy_scale_grad(grad, upstream)
                torch.autograd.graph.increment_version(grad)
            else:
                cross_entropy_scale_grad(grad, upstream)
        elif ctx.mode == "deferred":
            args = (target, weight, stats, upstream, total)
            if ctx.inplace and _plain_eager(logits, target, weight, stats, upstream):
                grad = _backward_into(logits, logits, *args, options)
                torch.autograd.graph.increment_version(logits)
            elif _plain_eager(logits, target, weight, stats, upstream):  # (a traced backward allocates)
                grad = _backward_into(torch.empty_like(logits, memory_format=torch.contiguous_format), logits, *args,
                                      options)  # fmt: skip
            else:
                grad = cross_entropy_backward(logits, *args, *options)
        return grad, grad_target, None, None, None, None


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


@torch.library.register_vmap("softmax_gpu::cross_entropy_forward")
def _(info, in_dims, logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, reduction, compute_grad,
      save_stats=False):  # fmt: skip
    if reduction != "none" or compute_grad or in_dims[2] is not None:
        raise NotImplementedError("softmax_gpu::cross_entropy_forward under vmap: per-row losses only, one weight")
    b = info.batch_size
    loss, lse, grad, stats, total = cross_entropy_forward(
        batch_rows(logits, in_dims[0], b), batch_rows(target, in_dims[1], b), weight, ignore_index, label_smoothing,
        z_loss, softcap, reduction, compute_grad, save_stats,
    )  # fmt: skip
    per = lambda t: t.view(b, t.shape[0] // b, *t.shape[1:]) if t.numel() else t.new_empty(b, 0)  # noqa: E731
    return (per(loss), per(lse), per(grad), per(stats), per(total)), (0, 0, 0, 0, 0)


@torch.library.register_vmap("softmax_gpu::cross_entropy_backward")
def _(info, in_dims, logits, target, weight, stats, upstream, grad_divisor, ignore_index, label_smoothing, z_loss,
      softcap):  # fmt: skip
    if in_dims[2] is not None or grad_divisor is not None:
        raise NotImplementedError("softmax_gpu::cross_entropy_backward under vmap: per-row upstream, one weight")
    b = info.batch_size
    rows = batch_rows(logits, in_dims[0], b)
    grad = cross_entropy_backward(rows, batch_rows(target, in_dims[1], b), weight, batch_rows(stats, in_dims[3], b),
                                  batch_rows(upstream, in_dims[4], b), None, ignore_index, label_smoothing, z_loss,
                                  softcap)  # fmt: skip
    return grad.view(b, -1, rows.shape[-1]), 0


class FunctorchCrossEntropy(torch.autograd.Function):
    """The custom ops for torch.func transforms (see softmax_gpu/ops/functorch.py): per-row
    losses forward (the reduction is done by cross_entropy() in torch ops, so vmap reduces
    each sample on its own), the deferred gradient backward; first derivatives only."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap):
        loss, lse, _grad, stats, _total = cross_entropy_forward(
            logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, "none", False, True
        )
        return loss, stats

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, weight, *options = inputs
        ctx.save_for_backward(logits, target, weight, output[1])
        ctx.options = options
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        logits, target, weight, stats = ctx.saved_tensors
        upstream = grad_loss.to(_acc_dtype(logits))
        grad = cross_entropy_backward(logits.detach(), target, weight, stats, upstream.detach(), None, *ctx.options)
        return first_order_only(grad, "softmax_gpu.cross_entropy", logits, upstream), None, None, None, None, None, None


def _rows_are_a_view(x: torch.Tensor, class_dim: int) -> bool:
    """Whether as_rows(x, class_dim) is a view of x (not a copy), from the strides alone (so
    that torch.compile can trace it): the class dim at unit stride, the other dims one
    flattenable run (dims of size 1 may have any stride)."""
    moved = x.movedim(class_dim, -1)
    if moved.shape[-1] > 1 and moved.stride(-1) != 1:
        return False
    dims = [(size, stride) for size, stride in zip(moved.shape[:-1], moved.stride()[:-1]) if size != 1]
    return all(stride == inner_size * inner_stride for (_, stride), (inner_size, inner_stride) in zip(dims, dims[1:]))


def _functorch_cross_entropy(rows, tgt, weight, options: LossOptions, reduction):
    """cross_entropy() under torch.func: per-row losses from FunctorchCrossEntropy, reduced here."""
    if tgt.is_floating_point():
        raise NotImplementedError(
            "softmax_gpu.cross_entropy(): probability targets are not supported under torch.func transforms"
        )
    loss, _stats = FunctorchCrossEntropy.apply(rows, tgt, weight, *options)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / _total_weight(tgt, weight, options.ignore_index, loss.dtype)


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
        input: logits (C,), (N, C) or (N, C, d1, ...), classes along dim 1; float32, float16,
            bfloat16 or float64.
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
        the loss, float32 (float64 for float64 input): a scalar, or the target's shape for
        reduction="none". Gradients flow to input and to probability targets.

    For bfloat16 and float32 the forward reads the logits once and, when they require grad,
    writes the gradient in the same pass (the backward rescales it only where the upstream
    gradient is not 1). For float16 and float64, and for few rows long enough to be split
    across the GPU (config.split_rows) in every dtype, the backward writes it, with the
    upstream factor (a loss scale, say) applied before the one rounding; that reads the
    logits twice.
    No host synchronisation anywhere. A class index out of range gives a NaN
    loss for its row on CUDA (an IndexError on CPU, or on CUDA with SOFTMAX_GPU_CHECK_TARGETS=1).
    No classes (C == 0) launch nothing and give torch's values (zero_class_rows).
    """
    fn = "softmax_gpu.cross_entropy"
    if type(input).__name__ == "DTensor":  # torch.distributed.tensor, imported only when one arrives
        from ..distributed import dtensor_cross_entropy

        if inplace_backward:
            raise NotImplementedError(f"{fn}(): inplace_backward=True is not supported for DTensor logits")
        return dtensor_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap)
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
    check_reduction(fn, reduction)
    options = LossOptions.checked(fn, ignore_index, label_smoothing, z_loss, softcap)
    if target.is_floating_point() and ignore_index != -100:
        raise RuntimeError(f"{fn}(): ignore_index is not supported for floating point target (as in torch)")

    class_dim = 1 if input.dim() > 1 else 0
    if input.dim() == 2 and input.stride(1) == 1:
        rows = input  # already (N, C) rows with unit column stride (as_rows would make this view)
    else:
        rows = as_rows(input, class_dim)  # (N * d1 * ..., C), ordered like the target
    if inplace_backward and input.requires_grad and torch.is_grad_enabled():
        if input.is_leaf:
            raise ValueError(f"{fn}(): inplace_backward=True would overwrite a leaf tensor that requires grad")
        if target.is_floating_point() and target.requires_grad:
            raise ValueError(
                f"{fn}(): inplace_backward=True overwrites the logits that the probability target's gradient needs"
            )
        if not _rows_are_a_view(input, class_dim):
            raise ValueError(f"{fn}(): inplace_backward=True needs logits whose class dim has stride 1")
        # rows is (N, C) with unit column stride: its elements overlap exactly when rows are
        # closer than C apart (an expanded tensor has row stride 0).
        if rows.shape[0] > 1 and rows.stride(0) < rows.shape[1]:
            raise ValueError(f"{fn}(): inplace_backward=True needs logits whose elements do not overlap (not expanded)")
    if target.is_floating_point():
        tgt = as_rows(target, class_dim)
    else:
        tgt = target if target.dim() == 1 else target.reshape(-1)
    if weight is not None:
        weight = weight.contiguous()  # the kernel reads weight[j] at unit stride
    if under_functorch(rows, tgt, weight):
        loss = _functorch_cross_entropy(rows, tgt, weight, options, reduction)
    else:
        loss, _lse = CrossEntropyFunction.apply(rows, tgt, weight, options, reduction, inplace_backward)
    if reduction == "none":  # rows were ordered (N, d1, ...), the target's own order
        return loss.view(input.shape[:1] + input.shape[2:] if input.dim() > 1 else ())
    return loss
