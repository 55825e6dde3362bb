"""softmax and log_softmax: kernel launchers, PyTorch custom ops wired to autograd, public functions.

Layers, top to bottom: launch_* fill preallocated 2-D outputs; the custom ops
``softmax_gpu::softmax_forward`` / ``softmax_gpu::softmax_backward`` handle any rank and
dim and allocate; autograd connects the two; softmax() / log_softmax() check the input
and mirror torch.nn.functional.
"""
from typing import Optional

import torch
import triton

from .. import config, runtime
from ..checks import check_floating, check_out_dtype, normalize_dim
from ..kernels.softmax import (
    softmax_bwd_kernel,
    softmax_cooperative_bwd_kernel,
    softmax_cooperative_fwd_kernel,
    softmax_fwd_kernel,
    softmax_split_bwd_kernel,
    softmax_split_bwd_stats_kernel,
    softmax_split_fwd_kernel,
    softmax_split_stats_kernel,
)
from ..layout import as_rows, batch_first, from_rows
from ..kernels import softmax as softmax_kernels
from ..runtime import (
    cached_plan, check_launchable, cooperative_launches, cooperative_plan, device_guard, launch, remember_plan,
)


def _op_name(log: bool) -> str:
    """The public function a launch serves, for its error messages."""
    return "softmax_gpu.log_softmax" if log else "softmax_gpu.softmax"


def launch_softmax_fwd(x: torch.Tensor, y: torch.Tensor, log: bool, cfg: Optional[config.RowConfig] = None):
    """y[r] = (log_)softmax(x[r]) for 2-D x, y with unit column stride; returns the RowConfig used.

    Bytes: 1 read + 1 write per element on the single-block path (rows up to 32768), 2 reads +
    1 write looped.
    Few long rows (config.split_rows) run split instead: launch_softmax_split_fwd, whose
    SplitConfig is returned; many long rows with SOFTMAX_GPU_COOPERATIVE=1 cooperatively:
    launch_softmax_cooperative_fwd, whose CooperativeConfig is returned.
    """
    n_rows = x.shape[0]
    planned = cfg is None
    if planned:  # the eager path: one plan per signature (runtime.cached_plan)
        kind, cfg, static = _eager_plan("softmax_fwd", (x, y), log, config.MAX_BLOCK_SOFTMAX_FWD,
                                        config.LOOP_BLOCK_SOFTMAX_FWD)  # fmt: skip
        if kind == "split":
            return launch_softmax_split_fwd(x, y, log, cfg, static)
        if kind == "cooperative":
            return launch_softmax_cooperative_fwd(x, y, log, cfg, static)
    else:
        cfg = _row_config((x, y), config.MAX_BLOCK_SOFTMAX_FWD, config.LOOP_BLOCK_SOFTMAX_FWD, cfg)
        static = _static((x, y), log, cfg)
    check_launchable(_op_name(log), softmax_fwd_kernel, x)
    with device_guard(x):
        launch(softmax_fwd_kernel, (triton.cdiv(n_rows, cfg.rows),), static, planned, x_ptr=x, y_ptr=y)
    return cfg


def _static(tensors, log: bool, cfg: config.RowConfig) -> dict:
    """The row kernels' arguments besides the pointers, for rows through `tensors` (x, y or
    y, dy, dx: the last is the output): each one's row stride, the shape, the config."""
    out = tensors[-1]
    names = ("x", "y") if len(tensors) == 2 else ("y", "dy", "dx")
    static = {f"{name}_row_stride": t.stride(0) for name, t in zip(names, tensors)}
    static.update(n_rows=out.shape[0], n_cols=out.shape[1], LOG=log, BLOCK_N=cfg.block_n,
                  SINGLE_BLOCK=cfg.single_block, ACC_FP64=out.dtype == torch.float64, ROWS=cfg.rows, VEC=cfg.vec,
                  HAS_EDGE=cfg.edge, num_warps=cfg.num_warps, maxnreg=cfg.maxnreg)  # fmt: skip
    return static


def _row_config(tensors, max_block: int, loop_block: int, cfg=None) -> config.RowConfig:
    """The RowConfig for 2-D rows read or written through `tensors` (unit column stride; the
    last is the output, whose itemsize sets the blocks): cfg, or the shipped one for the
    family's limits, with its vector split."""
    out = tensors[-1]
    n_rows, n_cols = out.shape
    cfg = cfg or config.short_rows(
        config.row_config(n_cols, max_block, out.element_size(), loop_block_n=loop_block), n_rows, out.element_size()
    )
    return config.vectors(cfg, n_rows, n_cols, [(t.element_size(), t.stride(0)) for t in tensors])


def _eager_plan(name: str, tensors, log: bool, max_block: int, loop_block: int):
    """("split", SplitConfig with its vectors, its three kernels' other arguments
    (_split_static)) for few long rows (config.split_rows); ("cooperative", CooperativeConfig
    with its vectors and groups, its launches' arguments (_cooperative_static)) for many long
    rows with SOFTMAX_GPU_COOPERATIVE=1 (config.cooperative_rows); else ("rows", RowConfig,
    the kernel's other arguments (_static)), for an eager launch through `tensors` (as
    _row_config); stored per signature, with the switch and the config's test overrides in
    the key."""
    out = tensors[-1]
    n_rows, n_cols = out.shape
    key = (name, n_rows, n_cols, *((t.dtype, t.stride(0)) for t in tensors), log, str(out.device),
           config._block_limit, config._split_chunk, config._cooperative, config.COOPERATIVE)  # fmt: skip
    plan = cached_plan(key)
    if plan is None:
        sms = config.sm_count(out.device)
        split = config.split_rows(n_rows, n_cols, out.element_size(), max_block, loop_block, sms=sms)
        coop = None
        if split is None:
            family = config.COOPERATIVE_SOFTMAX_FWD if name == "softmax_fwd" else config.COOPERATIVE_SOFTMAX_BWD
            coop = config.cooperative_rows(n_rows, n_cols, out.element_size(), max_block, family, sms=sms)
        if coop is not None:
            coop, phases = _cooperative_static(tensors, log, coop)
            if coop is not None and coop.vec == 1:  # rows whose strides disagree modulo a vector: narrow loads spilled
                coop = None
        if split is not None:
            plan = ("split", *_split_static(tensors, log, split))
        elif coop is not None:
            plan = ("cooperative", coop, phases)
        else:
            rows = _row_config(tensors, max_block, loop_block)
            plan = ("rows", rows, _static(tensors, log, rows))
        remember_plan(key, plan)
    return plan


def launch_softmax_cooperative_fwd(x: torch.Tensor, y: torch.Tensor, log: bool, coop: config.CooperativeConfig,
                                   static: Optional[tuple] = None):  # fmt: skip
    """y[r] = (log_)softmax(x[r]) by groups of coop.chunks resident programs, each holding one
    chunk of a row at a time (config.cooperative_rows; kernels/softmax.py,
    softmax_cooperative_fwd_kernel): one cooperative launch after zeroing the groups'
    counters; in Triton's interpreter, which runs programs one at a time, its two halves.
    Returns coop with its vec / edge filled in. static: the eager plan's kernel arguments
    (_cooperative_static). Bytes: 1 read + 1 write per element on CUDA (2 reads + 1 write in
    the interpreter), plus n_rows * chunks * 2 partials written once and read by each chunk."""
    check_launchable(_op_name(log), softmax_cooperative_fwd_kernel, x)
    planned = static is not None
    coop, phases = (coop, static) if planned else _cooperative_static((x, y), log, coop)
    if coop is None:
        raise ValueError("launch_softmax_cooperative_fwd: the chunks do not fit the GPU's resident programs")
    part = runtime.cooperative_partials((x.shape[0], 2, coop.chunks), x.device)
    with device_guard(x):
        for static, counter in cooperative_launches(coop, phases, "counter_ptr", part):
            launch(softmax_cooperative_fwd_kernel, (coop.programs,), static, planned, x_ptr=x, y_ptr=y, part_ptr=part,
                   **counter)  # fmt: skip
    return coop


def launch_softmax_cooperative_bwd(y: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, log: bool,
                                   coop: config.CooperativeConfig, static: Optional[tuple] = None):  # fmt: skip
    """dx[r] = gradient of (log_)softmax at output y[r] for upstream dy[r] by cooperative groups
    of programs, as launch_softmax_cooperative_fwd (softmax_cooperative_bwd_kernel). Bytes:
    y and dy read and dx written once on a GPU (the interpreter's halves read dy twice and y
    twice for softmax, once for log_softmax), plus n_rows * chunks partial sums written once
    and read by each chunk."""
    check_launchable(_op_name(log) + " backward", softmax_cooperative_bwd_kernel, y)
    planned = static is not None
    coop, phases = (coop, static) if planned else _cooperative_static((y, dy, dx), log, coop)
    if coop is None:
        raise ValueError("launch_softmax_cooperative_bwd: the chunks do not fit the GPU's resident programs")
    part = runtime.cooperative_partials((y.shape[0], coop.chunks), y.device)
    with device_guard(y):
        for static, counter in cooperative_launches(coop, phases, "counter_ptr", part):
            launch(softmax_cooperative_bwd_kernel, (coop.programs,), static, planned, y_ptr=y, dy_ptr=dy, dx_ptr=dx,
                   part_ptr=part, **counter)  # fmt: skip
    return coop


def _cooperative_static(tensors, log: bool, coop: config.CooperativeConfig) -> tuple:
    """(coop with its vectors, the kernel's arguments besides the pointers for each launch:
    one cooperative launch (PHASE 0) of the compiled kernel, the two halves (PHASE 1, 2) in
    Triton's interpreter), for rows through `tensors`: (x, y) forward, (y, dy, dx) backward.
    On CUDA the kernel is compiled here (Triton's warmup) and the groups cut to the programs
    its registers and shared memory leave resident; (None, None) when not even one group fits."""
    out = tensors[-1]
    n_rows, n_cols = out.shape
    coop = config.vectors(coop, n_rows, n_cols, [(t.element_size(), t.stride(0)) for t in tensors])
    names = ("x", "y") if len(tensors) == 2 else ("y", "dy", "dx")
    common = {f"{name}_row_stride": t.stride(0) for name, t in zip(names, tensors)}
    common.update(n_rows=n_rows, n_cols=n_cols, chunk_cols=coop.chunk_cols, n_chunks=coop.chunks, LOG=log,
                  BLOCK_N=coop.block_n, CHUNKS_BLOCK=coop.chunks_block, VEC=coop.vec, HAS_EDGE=coop.edge,
                  num_warps=coop.num_warps, maxnreg=coop.maxnreg)  # fmt: skip
    # (the kernels module's own objects: a tool may have replaced this module's names)
    kernel = softmax_kernels.softmax_cooperative_fwd_kernel if len(tensors) == 2 else \
        softmax_kernels.softmax_cooperative_bwd_kernel  # fmt: skip

    def pointers():
        return dict({f"{name}_ptr": t for name, t in zip(names, tensors)},
                    part_ptr=torch.empty(4, dtype=torch.float32, device=out.device),
                    counter_ptr=torch.zeros(4, dtype=torch.int32, device=out.device))  # fmt: skip

    return cooperative_plan(kernel, coop, common, out.device, pointers)


def launch_softmax_bwd(
    y: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, log: bool, cfg: Optional[config.RowConfig] = None
):
    """dx[r] = gradient of (log_)softmax at output y[r] for upstream dy[r]; returns the RowConfig used.

    Bytes: 2 reads + 1 write per element on the single-block path. Few long rows run split
    (launch_softmax_split_bwd, whose SplitConfig is returned); many long rows with
    SOFTMAX_GPU_COOPERATIVE=1 cooperatively (launch_softmax_cooperative_bwd: a CooperativeConfig).
    """
    n_rows = y.shape[0]
    planned = cfg is None
    if planned:  # the eager path: one plan per signature (runtime.cached_plan)
        kind, cfg, static = _eager_plan("softmax_bwd", (y, dy, dx), log, config.MAX_BLOCK_SOFTMAX_BWD,
                                        config.LOOP_BLOCK_SOFTMAX_BWD)  # fmt: skip
        if kind == "split":
            return launch_softmax_split_bwd(y, dy, dx, log, cfg, static)
        if kind == "cooperative":
            return launch_softmax_cooperative_bwd(y, dy, dx, log, cfg, static)
    else:
        cfg = _row_config((y, dy, dx), config.MAX_BLOCK_SOFTMAX_BWD, config.LOOP_BLOCK_SOFTMAX_BWD, cfg)
        static = _static((y, dy, dx), log, cfg)
    check_launchable(_op_name(log) + " backward", softmax_bwd_kernel, y)
    with device_guard(y):
        launch(softmax_bwd_kernel, (triton.cdiv(n_rows, cfg.rows),), static, planned, y_ptr=y, dy_ptr=dy, dx_ptr=dx)
    return cfg


def launch_softmax_split_fwd(x: torch.Tensor, y: torch.Tensor, log: bool, split: config.SplitConfig,
                             static: Optional[tuple] = None):  # fmt: skip
    """y[r] = (log_)softmax(x[r]) with each row cut into split.chunks chunks: partial (max, sum)
    per chunk, then every chunk's program merges its row's partials into the row's (max, sum)
    and writes its chunk. Chunks cut the rows' aligned bodies, chunk 0 takes the head/tail
    edge (config.vectors). Two launches, no host sync; returns split with its vec / edge
    filled in. static: the eager plan's kernel arguments (_split_static), whose launches
    may then be direct (runtime.launch).
    Bytes: 2 reads + 1 write per element, plus n_rows * chunks * 2 partials written once and
    read by each of the row's chunks."""
    check_launchable(_op_name(log), softmax_split_stats_kernel, x)
    planned = static is not None
    split, (stats, main) = (split, static) if planned else _split_static((x, y), log, split)
    n_rows = x.shape[0]
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    part = torch.empty((n_rows, 2, split.chunks), dtype=acc, device=x.device)
    grid = (n_rows, split.chunks)
    with device_guard(x):
        launch(softmax_split_stats_kernel, grid, stats, planned, x_ptr=x, part_ptr=part)
        launch(softmax_split_fwd_kernel, grid, main, planned, x_ptr=x, y_ptr=y, part_ptr=part)
    return split


def _split_static(tensors, log: bool, split: config.SplitConfig) -> tuple:
    """(split with its vectors (config.vectors), (the stats kernel's and the writing kernel's
    arguments besides the pointers)) for split rows through
    `tensors`: (x, y) for the forward, (y, dy, dx) for the backward."""
    out = tensors[-1]
    n_rows, n_cols = out.shape
    split = config.vectors(split, n_rows, n_cols, [(t.element_size(), t.stride(0)) for t in tensors])
    acc_fp64 = out.dtype == torch.float64
    blocks = dict(n_cols=n_cols, chunk_cols=split.chunk_cols, BLOCK_N=split.block_n, ACC_FP64=acc_fp64, VEC=split.vec,
                  HAS_EDGE=split.edge, num_warps=split.num_warps, maxnreg=split.maxnreg)  # fmt: skip
    if len(tensors) == 2:
        x, y = tensors
        stats = dict(x_row_stride=x.stride(0), n_chunks=split.chunks, **blocks)
        main = dict(x_row_stride=x.stride(0), y_row_stride=y.stride(0), LOG=log, n_chunks=split.chunks,
                    CHUNKS_BLOCK=split.chunks_block, **blocks)  # fmt: skip
    else:
        y, dy, dx = tensors
        common = dict(y_row_stride=y.stride(0), dy_row_stride=dy.stride(0), LOG=log, **blocks)
        stats = dict(n_chunks=split.chunks, **common)
        main = dict(dx_row_stride=dx.stride(0), n_chunks=split.chunks, CHUNKS_BLOCK=split.chunks_block, **common)
    return split, (stats, main)


def launch_softmax_split_bwd(
    y: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, log: bool, split: config.SplitConfig,
    static: Optional[tuple] = None,
):  # fmt: skip
    """dx[r] = gradient of (log_)softmax with each row cut into split.chunks chunks: the partial
    sum of dy * y (dy for log_softmax) per chunk, then every chunk's program adds up its row's
    partials and writes its chunk; rows cut as in launch_softmax_split_fwd. Two launches;
    returns split with its vec / edge filled in. static: as in launch_softmax_split_fwd.
    Bytes: as the looped path (softmax: 4 reads + 1 write; log_softmax: 3 + 1), plus
    n_rows * chunks partials written once and read by each of the row's chunks."""
    check_launchable(_op_name(log) + " backward", softmax_split_bwd_stats_kernel, y)
    planned = static is not None
    split, (stats, main) = (split, static) if planned else _split_static((y, dy, dx), log, split)
    n_rows = y.shape[0]
    acc = torch.float64 if dx.dtype == torch.float64 else torch.float32
    part = torch.empty((n_rows, split.chunks), dtype=acc, device=y.device)
    grid = (n_rows, split.chunks)
    with device_guard(y):
        launch(softmax_split_bwd_stats_kernel, grid, stats, planned, y_ptr=y, dy_ptr=dy, part_ptr=part)
        launch(softmax_split_bwd_kernel, grid, main, planned, y_ptr=y, dy_ptr=dy, dx_ptr=dx, part_ptr=part)
    return split


def _softmax_forward(x: torch.Tensor, dim: int, log: bool, dtype: torch.dtype) -> torch.Tensor:
    """(log_)softmax of x along dim, returned contiguous in `dtype`."""
    # Casting up is exact, so the kernel reads x as it is and writes `dtype`; a narrowing
    # cast happens first, as in torch (softmax of x.to(dtype)).
    if dtype.itemsize < x.dtype.itemsize or (dtype.itemsize == x.dtype.itemsize and dtype != x.dtype):
        x = x.to(dtype)
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=dtype, device=x.device)
    x_rows = as_rows(x, dim)
    y_rows = torch.empty(x_rows.shape, dtype=dtype, device=x.device)
    launch_softmax_fwd(x_rows, y_rows, log)
    return from_rows(y_rows, x, dim)


softmax_forward = torch.library.custom_op("softmax_gpu::softmax_forward", _softmax_forward, mutates_args=())


@softmax_forward.register_fake
def _(x, dim, log, dtype):
    return torch.empty(x.shape, dtype=dtype, device=x.device)


def _softmax_backward(y: torch.Tensor, dy: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
    """Gradient with respect to the input of (log_)softmax along dim, from output y and upstream dy."""
    if y.numel() == 0:
        return torch.empty(y.shape, dtype=y.dtype, device=y.device)
    dy = dy.to(y.dtype)
    y_rows, dy_rows = as_rows(y, dim), as_rows(dy, dim)
    dx_rows = torch.empty(y_rows.shape, dtype=y.dtype, device=y.device)
    launch_softmax_bwd(y_rows, dy_rows, dx_rows, log)
    return from_rows(dx_rows, y, dim)


softmax_backward = torch.library.custom_op("softmax_gpu::softmax_backward", _softmax_backward, mutates_args=())


@softmax_backward.register_fake
def _(y, dy, dim, log):
    return torch.empty(y.shape, dtype=y.dtype, device=y.device)


def _setup_context(ctx, inputs, output):
    x, dim, log, _ = inputs
    ctx.save_for_backward(output)
    ctx.dim, ctx.log, ctx.input_dtype = dim, log, x.dtype


def _backward(ctx, grad_output):
    (y,) = ctx.saved_tensors
    grad_input = softmax_backward(y, grad_output, ctx.dim, ctx.log)
    return grad_input.to(ctx.input_dtype), None, None, None


torch.library.register_autograd("softmax_gpu::softmax_forward", _backward, setup_context=_setup_context)


@torch.library.register_vmap("softmax_gpu::softmax_forward")
def _(info, in_dims, x, dim, log, dtype):
    # Row-wise: the vmapped dim is one more batch dim in front (dim is non-negative here). A
    # 0-d sample is a row of one.
    x = batch_first(x, in_dims[0], info.batch_size)
    if x.dim() == 1:
        return softmax_forward(x[:, None], 1, log, dtype)[:, 0], 0
    return softmax_forward(x, dim + 1, log, dtype), 0


@torch.library.register_vmap("softmax_gpu::softmax_backward")
def _(info, in_dims, y, dy, dim, log):
    y, dy = (batch_first(t, d, info.batch_size) for t, d in zip((y, dy), in_dims))
    if y.dim() == 1:
        return softmax_backward(y[:, None], dy[:, None], 1, log)[:, 0], 0
    return softmax_backward(y, dy, dim + 1, log), 0


class FunctorchSoftmax(torch.autograd.Function):
    """The custom ops for torch.func transforms (grad, vjp, jacrev, jacfwd, vmap over any of
    them): torch.library's own autograd for a custom op does not support them. vmap runs
    forward and backward under the ops' vmap rules (the vmapped dim joins the rows); jvp is
    y (t - sum(y t)) for softmax and t - sum(e^y t) for log_softmax, in torch ops."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, dim, log, dtype):
        return softmax_forward(x, dim, log, dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, dim, log, _ = inputs
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)
        ctx.dim, ctx.log, ctx.input_dtype = dim, log, x.dtype

    @staticmethod
    def backward(ctx, grad_output):
        (y,) = ctx.saved_tensors
        grad = FunctorchSoftmaxBackward.apply(y, grad_output.to(y.dtype), ctx.dim, ctx.log)
        return grad.to(ctx.input_dtype), None, None, None

    @staticmethod
    def jvp(ctx, x_t, *_):
        (y,) = ctx.saved_tensors
        x_t = x_t.to(y.dtype)
        p = y.exp() if ctx.log else y
        centred = x_t - (p * x_t).sum(ctx.dim, keepdim=True)
        return centred if ctx.log else y * centred


class FunctorchSoftmaxBackward(torch.autograd.Function):
    """dx from (y, dy) by the backward kernel, itself differentiable (in torch ops) so that
    hessians and grad-of-grad are right. With s = sum(dy y) and v the cotangent of dx:
    softmax, dx = y (dy - s): d/d dy = y (v - sum(v y)), d/dy = v (dy - s) - dy sum(v y);
    log_softmax, dx = dy - e^y sum(dy): d/d dy = v - sum(v e^y), d/dy = -v e^y sum(dy)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(y, dy, dim, log):
        return softmax_backward(y, dy, dim, log)

    @staticmethod
    def setup_context(ctx, inputs, output):
        y, dy, dim, log = inputs
        ctx.save_for_backward(y, dy)
        ctx.save_for_forward(y, dy)
        ctx.dim, ctx.log = dim, log

    @staticmethod
    def jvp(ctx, y_t, dy_t, *_):
        y, dy = ctx.saved_tensors
        dim = ctx.dim
        y_t = torch.zeros_like(y) if y_t is None else y_t
        dy_t = torch.zeros_like(dy) if dy_t is None else dy_t
        if ctx.log:
            p = y.exp()
            return dy_t - p * y_t * dy.sum(dim, keepdim=True) - p * dy_t.sum(dim, keepdim=True)
        s = (dy * y).sum(dim, keepdim=True)
        return y_t * (dy - s) + y * (dy_t - (dy_t * y + dy * y_t).sum(dim, keepdim=True))

    @staticmethod
    def backward(ctx, v):
        y, dy = ctx.saved_tensors
        dim = ctx.dim
        if ctx.log:
            p = y.exp()
            return -v * p * dy.sum(dim, keepdim=True), v - (v * p).sum(dim, keepdim=True), None, None
        vy = (v * y).sum(dim, keepdim=True)
        return v * (dy - (dy * y).sum(dim, keepdim=True)) - dy * vy, y * (v - vy), None, None


class _EagerSoftmax(torch.autograd.Function):
    """The same forward and backward as the custom ops, called directly: the eager bypass of
    the dispatcher (cross_entropy's _plain_eager decides when it is safe). Compiled, traced,
    functorch-wrapped and subclassed calls go through the custom ops."""

    @staticmethod
    def forward(ctx, x, dim, log, dtype):
        y = _softmax_forward(x, dim, log, dtype)
        ctx.save_for_backward(y)
        ctx.dim, ctx.log, ctx.input_dtype = dim, log, x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_output):
        (y,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a backward that is differentiable again
            return FunctorchSoftmaxBackward.apply(y, grad_output.to(y.dtype), ctx.dim, ctx.log).to(ctx.input_dtype), \
                None, None, None
        return _softmax_backward(y, grad_output, ctx.dim, ctx.log).to(ctx.input_dtype), None, None, None


def _apply(fn: str, x: torch.Tensor, dim: int, dtype: Optional[torch.dtype], log: bool) -> torch.Tensor:
    from .cross_entropy import _plain_eager, under_functorch

    check_floating(fn, "input", x)
    check_out_dtype(fn, dtype)
    dim = normalize_dim(dim, x.dim())
    dtype = dtype or x.dtype
    if under_functorch(x):
        return FunctorchSoftmax.apply(x, dim, log, dtype)
    if _plain_eager(x):
        if x.requires_grad and torch.is_grad_enabled():
            return _EagerSoftmax.apply(x, dim, log, dtype)
        return _softmax_forward(x, dim, log, dtype)
    return softmax_forward(x, dim, log, dtype)


def softmax(x: torch.Tensor, dim: int = -1, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """softmax(x)_i = e^(x_i - m) / sum_j e^(x_j - m) along `dim`, with m the row maximum.

    Mirrors torch.nn.functional.softmax: any rank and dim, non-contiguous input, empty
    tensors; float16/bfloat16 accumulate in float32. `dtype` casts the input first (the
    result has that dtype). Differentiable; compiles under torch.compile(fullgraph=True).
    A row that is -inf everywhere gives NaN, like torch.
    """
    return _apply(_op_name(False), x, dim, dtype, log=False)


def log_softmax(x: torch.Tensor, dim: int = -1, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """log_softmax(x)_i = x_i - m - log(sum_j e^(x_j - m)) along `dim`; arguments as softmax()."""
    return _apply(_op_name(True), x, dim, dtype, log=True)


def hardmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """One-hot of the arg-max along `dim` (the first index on ties): softmax(x / T) as T -> 0."""
    check_floating("softmax_gpu.hardmax", "input", x)
    dim = normalize_dim(dim, x.dim())
    out = torch.zeros_like(x)
    if x.numel() == 0:
        return out
    return out.scatter_(dim, x.argmax(dim, keepdim=True), 1.0) if x.dim() else out.fill_(1.0)
