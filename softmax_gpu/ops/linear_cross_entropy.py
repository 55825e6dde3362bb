"""Linear cross-entropy: cross_entropy(input @ W^T + b, target) without an N x V tensor.

The three (or four) matrix products go to cuBLAS (torch.mm / addmm: the library's full
speed on every card, deterministic); between them, cross-entropy's own row kernels work on
a bounded buffer of logits whose size comes from a memory budget (config.linear_cross_entropy_plan):

  speed       (mode="speed", the default) the tokens in chunks; per chunk of Nc rows:
                z = X_c W^T + b                         product 1, into the (Nc, V) buffer
                loss, lse and G = d loss / d z over z   cross_entropy_kernel, in place,
                                                        divided by the mean's total
                dX_c = G W                              product 2, written once
                dW (+)= G^T X_c, db (+)= sum_rows G     product 3 (one product when N fits
                                                        one chunk; else into float32)
              All in the forward; the backward only multiplies by the upstream gradient
              (nothing to do for 1). It needs a scalar upstream factor, so reduction="none",
              probability targets that need a gradient, and float16 (whose gradient must
              take the upstream factor, a loss scale, before its rounding, as
              cross_entropy's does) take the low-memory route instead.
  low_memory  the vocabulary in slabs of Vc classes, each slab a shard of the vocab-parallel
              kernels (kernels/vocab_parallel_cross_entropy.py):
                forward   z_s = X W_s^T + b_s (product 1); the slab's row maxima and sums
                          (vocab_parallel_stats_kernel); merged over the slabs in a fixed
                          order; then loss and lse (vocab_parallel_loss_kernel, O(N))
                backward  z_s again (product 2); G_s over z_s with the upstream factor
                          (vocab_parallel_loss_kernel); dW_s = G_s^T X (product 3, written
                          once); dX += G_s W_s (product 4, into one (N, H) float32 tensor)
  float64 (for checking, not speed) is F.linear followed by softmax_gpu.cross_entropy.

Roofline at 8192 tokens x H 4096 x V 128256, bfloat16 (H100: 3.0 TB/s copy, ~790 TFLOP/s
dense bf16, the rate taken for these cards (its datasheet says 989); H200: 4.3 TB/s, the
same FLOP rate). One product is 2 N H V = 8.61 TFLOP, 10.9 ms.
  speed: 3 products, 25.8 TFLOP = 32.7 ms. Bytes besides the products' own operands (X 67 MB,
    W 1.05 GB, dW 1.05 GB): the logits buffer (N V 2 = 2.10 GB) written by product 1, read and
    written by the row kernel, read by products 2 and 3, of which the row kernel's passes
    are not hidden under a product: at V = 128256 it reads each row twice (the second read
    partly from L2) and writes G, 6.3 GB at most (2.1 ms H100, 1.5 ms H200). Predicted
    34-35 ms (H100) / 34 ms (H200) at the dense peak; about 40 ms at cuBLAS's usual 85%.
    Extra memory: the one chunk, N V 2 = 2.10 GB (<= V H 4 + 512 MiB = 2.64 GB).
  low_memory: 4 products, 34.4 TFLOP = 43.6 ms, plus the stats kernel's read of each slab
    (2.1 GB in all) and the backward row kernel's read + write (4.2 GB): ~2.1 ms (H100),
    1.5 ms (H200). Predicted 46 ms at the peak, ~53 ms at 85%. Extra memory: a 256 MiB slab
    (16384 classes at N = 8192) and dX's float32 accumulator, N H 4 = 134 MB.
Neither mode keeps a float32 accumulator per tile pair, and neither makes an N x V tensor
(a speed chunk holds all N rows only when that fits the budget above). No host
synchronisation, no atomics: bitwise reproducible on one card and library version (cuBLAS
is, on one stream; CUBLAS_WORKSPACE_CONFIG when streams run products concurrently).

Layers, top to bottom:
  plan / mm_accumulate / launch_skip_small_tiles    helpers; with grad_skip_threshold the
  / launch_live_tiles_products                      backward's products over the kept tiles
                                                    (Triton) replace cuBLAS's dense two
  fused_route / launch_logits /                     the opt-in Triton logits with their tile
  launch_merge_tile_stats                           statistics (config.LINEAR_CE_FUSED): the
                                                    speed chunks, the low-memory forward
                                                    (no logits stored) and its backward;
                                                    roofline in kernels/linear_cross_entropy.py,
                                                    model in bench/linear_ce.py (route_model)
  _speed, _slab_stats, _slab_backward               the two modes' loops (launches only)
  softmax_gpu::linear_cross_entropy_speed, ::linear_cross_entropy_forward,
  ::linear_cross_entropy_backward, ::linear_cross_entropy_scale
                                                    custom ops with fake implementations,
                                                    so torch.compile(fullgraph=True) traces them
  LinearCrossEntropyFunction                        autograd; picks the route
  linear_cross_entropy()                            checks and torch's signature
"""
from typing import Optional

import torch
import torch.nn.functional as F

from .. import config
from ..loss_options import LossOptions, check_reduction
from ..checks import check_floating, check_same_device, check_tensor
from ..kernels.linear_cross_entropy import (
    linear_logits_kernel,
    live_tiles_grad_input_kernel,
    live_tiles_grad_weight_kernel,
    merge_tile_stats_kernel,
    skip_small_tiles_kernel,
)
from ..runtime import check_launchable, device_guard
from ..kernels.cross_entropy import cross_entropy_kernel
from .cross_entropy import (
    _check_class_indices,
    _forward_split,
    _plain_eager,
    _target_gradient,
    _total_weight,
    launch_cross_entropy,
    launch_cross_entropy_split,
    launch_scale_grad,
    zero_class_reduce,
    under_functorch,
    zero_class_rows,
)
from .functorch import first_order
from .vocab_parallel_cross_entropy import launch_vocab_parallel_loss, launch_vocab_parallel_stats, n_stats

FN = "softmax_gpu.linear_cross_entropy"
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SPEED_DTYPES = (torch.float32, torch.bfloat16)


def plan(mode: str, x: torch.Tensor, w: torch.Tensor, buffer_bytes: Optional[int], accumulator: bool = True,
         itemsize: Optional[float] = None) -> config.LinearPlan:  # fmt: skip
    """config.linear_cross_entropy_plan for these operands; itemsize: the buffer bytes a logit
    takes (None: the logit's own; fused_logits adds its tile statistics, or is only them)."""
    itemsize = x.element_size() if itemsize is None else itemsize
    return config.linear_cross_entropy_plan(mode, x.shape[0], w.shape[0], x.shape[1], itemsize, buffer_bytes,
                                            accumulator)  # fmt: skip


# ---------------------------------------------------------------------------------------
# Helpers: products, the skip filter
# ---------------------------------------------------------------------------------------

_DTYPE_ADDMM = {"ok": None}  # whether addmm(..., out_dtype=float32) runs here (cuBLAS: 16-bit in, float32 C)


def mm_accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, acc float32 and a, b of the input's dtype, in one product where it can be:
    cuBLAS's 16-bit x 16-bit -> float32 GEMM with beta = 1 (torch's addmm with out_dtype, in
    place), else the product in the inputs' dtype added in float32 in row blocks of at most
    config.LINEAR_CE_FALLBACK_BYTES (each partial rounded once; a bounded temporary). Which
    route runs is decided by the first call in the process; an out-of-memory error is the
    caller's, never a reason to switch."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda and _DTYPE_ADDMM["ok"] is not False:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            _DTYPE_ADDMM["ok"] = True
            return
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError, NotImplementedError):
            if _DTYPE_ADDMM["ok"]:
                raise
            _DTYPE_ADDMM["ok"] = False
    rows = max(1, config.LINEAR_CE_FALLBACK_BYTES // max(1, b.shape[1] * a.element_size()))
    for r0 in range(0, acc.shape[0], rows):
        acc[r0 : r0 + rows].add_(torch.mm(a[r0 : r0 + rows], b))


def _logits_into(z: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> None:
    """z = x @ w^T (+ b), one cuBLAS call, in the operands' dtype (as F.linear)."""
    if b is None:
        torch.mm(x, w.t(), out=z)
    else:
        torch.addmm(b, x, w.t(), out=z)


def launch_skip_small_tiles(grad: torch.Tensor, scale: torch.Tensor, threshold: float, tile: tuple, fn=FN,
                            live: bool = False) -> Optional[torch.Tensor]:  # fmt: skip
    """Zero every tile of grad (rows x classes, `tile` = (rows, classes)) whose every element
    is below threshold * |scale_r| (scale (N,) or 0-d: the factor its rows carry); see
    skip_small_tiles_kernel. One read of grad, a write of the zeroed tiles. With live=True
    returns the (row tiles, class tiles) int8 map of the tiles kept, for the products over
    them (launch_live_tiles_products)."""
    n_rows, n_cols = grad.shape
    block_m, block_n = _skip_blocks(tile)
    grid = (-(-n_rows // block_m), -(-n_cols // block_n))
    live_map = torch.empty(grid, dtype=torch.int8, device=grad.device) if live else None
    if not grad.numel():
        return live_map
    check_launchable(fn, skip_small_tiles_kernel, grad)
    with device_guard(grad):
        skip_small_tiles_kernel[grid](
            grad_ptr=grad, scale_ptr=scale, n_rows=n_rows, n_cols=n_cols, grad_row_stride=grad.stride(0),
            scale_stride=scale.stride(0) if scale.dim() else 0, threshold=threshold,
            live_ptr=live_map if live else grad, BLOCK_M=block_m, BLOCK_N=block_n, WRITE_LIVE=live,
            num_warps=config.LINEAR_CE_SKIP_WARPS,
        )  # fmt: skip
    return live_map


def _skip_blocks(tile: tuple) -> tuple:
    """The filter's (rows, classes) block for a skip tile: each side a power of two."""
    return config.next_power_of_2(tile[0]), config.next_power_of_2(tile[1])


def products_over_live_tiles(tile: tuple, *operands: torch.Tensor) -> bool:
    """Whether the backward's products over G take only the kept tiles (Triton, below) rather
    than cuBLAS's dense products over G with the skipped tiles zeroed: tiles of at least
    config.LINEAR_CE_LIVE_MIN_TILE a side, and operands with unit column stride."""
    block_m, block_n = _skip_blocks(tile)
    if not _triton_dots(operands[0]):
        return False
    return min(block_m, block_n) >= config.LINEAR_CE_LIVE_MIN_TILE and all(t.stride(-1) == 1 for t in operands)


def _triton_dots(x: torch.Tensor) -> bool:
    """Whether tl.dot multiplies x's dtype right where x lives: on a GPU, yes; Triton's
    interpreter multiplies 16-bit dot operands as raw bits unless its fixes are in
    (softmax_gpu.interpreter, which the tests and the benchmark's CPU runs apply)."""
    if x.device.type == "cuda" or x.element_size() != 2:
        return True
    from .. import interpreter

    return interpreter._applied


_PRECISION = {"highest": "ieee", "high": "tf32", "medium": "tf32"}  # as cuBLAS: TF32 below "highest"


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for operands of `dtype`: float32 as torch.get_float32_matmul_precision()
    says (exact for "highest", TF32 otherwise, as cuBLAS); ignored for 16-bit operands."""
    return _PRECISION.get(torch.get_float32_matmul_precision(), "ieee") if dtype == torch.float32 else "tf32"


def live_tiles_blocks(dtype: torch.dtype, tile_m: int) -> tuple:
    """The products' (row, hidden, class, step) blocks and warps for operands of `dtype` and
    tiles of tile_m rows: smaller for float32."""
    if dtype == torch.float32:
        b = config.LINEAR_CE_LIVE_FP32
        return min(b["BLOCK_M"], tile_m), b["BLOCK_H"], b["BLOCK_V"], b["BLOCK_K"], b["WARPS"]
    return (tile_m, config.LINEAR_CE_LIVE_BLOCK_H, config.LINEAR_CE_LIVE_BLOCK_V, config.LINEAR_CE_LIVE_BLOCK_K,
            config.LINEAR_CE_LIVE_WARPS)  # fmt: skip


def launch_live_tiles_products(g: torch.Tensor, live: torch.Tensor, tile: tuple, dx_out: Optional[torch.Tensor],
                               w: torch.Tensor, dw_out: Optional[torch.Tensor], x: torch.Tensor,
                               accumulate_dx: bool, accumulate_dw: bool, fn=FN) -> None:  # fmt: skip
    """dx_out (+)= G W and dw_out (+)= G^T X over the tiles `live` marks (the filter's map
    for G's (rows x classes) tiles): live_tiles_grad_input_kernel and _grad_weight_kernel.
    g (n, V), w (V, H), x (n, H) and the outputs with unit column stride; an output is
    written in its dtype, or added to (float32) where accumulate_*. None: not asked for.
    float32 operands multiply as torch.get_float32_matmul_precision() says (as cuBLAS)."""
    n_rows, n_cols = g.shape
    hidden = w.shape[1]
    if not n_rows or not hidden:
        return
    block_m, block_n = _skip_blocks(tile)
    precision = dot_precision(g.dtype)
    block_rows, block_h, block_v, block_k, warps = live_tiles_blocks(g.dtype, block_m)
    common = dict(live_ptr=live, n_rows=n_rows, n_cols=n_cols, hidden=hidden, g_row_stride=g.stride(0), TILE_M=block_m,
                  TILE_N=block_n, BLOCK_H=block_h, INPUT_PRECISION=precision, num_warps=warps)  # fmt: skip
    check_launchable(fn, live_tiles_grad_input_kernel, g)
    with device_guard(g):
        if dx_out is not None:
            live_tiles_grad_input_kernel[(-(-n_rows // block_rows), -(-hidden // block_h))](
                g_ptr=g, w_ptr=w, out_ptr=dx_out, w_row_stride=w.stride(0), out_row_stride=dx_out.stride(0),
                n_col_tiles=live.shape[1], BLOCK_M=block_rows, BLOCK_K=min(block_k, block_n), ACCUMULATE=accumulate_dx,
                **common,
            )  # fmt: skip
        if dw_out is not None:
            block_v = min(block_v, block_n)
            live_tiles_grad_weight_kernel[(-(-n_cols // block_v), -(-hidden // block_h))](
                g_ptr=g, x_ptr=x, out_ptr=dw_out, x_row_stride=x.stride(0), out_row_stride=dw_out.stride(0),
                n_row_tiles=live.shape[0], n_col_tiles=live.shape[1], BLOCK_V=block_v, BLOCK_K=min(block_k, block_m),
                ACCUMULATE=accumulate_dw, **common,
            )  # fmt: skip


def skip_scale(scale: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], n_rows: int) -> torch.Tensor:
    """The factor each gradient row carries beyond |softmax - target|: the reduction's and the
    upstream's `scale` (0-d or (N,)), times the row's class weight w_t for class-index
    targets with weights (so a weighted row is filtered on its own |p - y|, as Cut
    Cross-Entropy filters). O(N) torch ops on the device."""
    if weight is None or target.is_floating_point():
        return scale
    n_classes = weight.shape[0]
    w_t = weight.float()[target.clamp(0, n_classes - 1)]
    return (scale * w_t).reshape(n_rows)


# ---------------------------------------------------------------------------------------
# The logits in Triton with their row statistics (config.LINEAR_CE_FUSED, opt-in)
# ---------------------------------------------------------------------------------------


def fused_route(x: torch.Tensor, w: torch.Tensor, target: torch.Tensor, enabled: Optional[bool] = None) -> bool:
    """Whether this call makes its logits with linear_logits_kernel: where enabled (None:
    config.linear_ce_fused(); the autograd functions read it once, in the forward, and hand
    it to the backward), for class-index targets, a hidden dim, operands with unit column
    stride and a device whose tl.dot is right for them; everything else keeps cuBLAS's."""
    if enabled is None:
        enabled = config.linear_ce_fused()
    if not enabled or target.is_floating_point() or not x.shape[1] or not w.shape[0]:
        return False
    return x.stride(-1) == 1 and w.stride(-1) == 1 and _triton_dots(x)


def logits_blocks(dtype: torch.dtype) -> dict:
    """linear_logits_kernel's tiles, warps and stages for operands of `dtype` (config)."""
    return config.LINEAR_CE_LOGITS_FP32 if dtype == torch.float32 else config.LINEAR_CE_LOGITS


def stats_bytes_per_logit(dtype: torch.dtype, width: int) -> float:
    """The tile statistics' buffer bytes per logit: (1 + width) float32 per row a class tile."""
    return (1 + width) * 4 / logits_blocks(dtype)["BLOCK_N"]


def _tile_buffers(x: torch.Tensor, n_rows: int, max_cols: int, width: int) -> tuple:
    """Flat float32 buffers for the tile maxima and statistics of up to n_rows x max_cols logits."""
    tiles = n_rows * -(-max_cols // logits_blocks(x.dtype)["BLOCK_N"])
    f32 = dict(dtype=torch.float32, device=x.device)
    return torch.empty(tiles, **f32), torch.empty(tiles * width, **f32)


def _tile_views(buffers: tuple, x: torch.Tensor, n_rows: int, n_cols: int, width: int) -> tuple:
    """(tile maxima (n_rows, n_tiles), statistics (n_rows, n_tiles, width)) for n_cols classes,
    contiguous views of _tile_buffers' buffers."""
    n_tiles = -(-n_cols // logits_blocks(x.dtype)["BLOCK_N"])
    tile_max, tile_stats = buffers
    return (tile_max[: n_rows * n_tiles].view(n_rows, n_tiles),
            tile_stats[: n_rows * n_tiles * width].view(n_rows, n_tiles, width))  # fmt: skip


def launch_logits(x, w, b, z, target=None, weight=None, tiles=None, n_classes=0, col_start=0,
                  options: Optional[LossOptions] = None, fn=FN, grad: Optional[tuple] = None) -> None:  # fmt: skip
    """z = x @ w^T (+ b) by linear_logits_kernel, rounded to x's dtype; z None: not stored. With
    tiles = (tile_max (N, n_tiles), tile_stats (N, n_tiles, width)), also every tile's share
    of the row statistics for target (global class indices of n_classes; w holds classes
    col_start + [0, V_local)), weight (this launch's classes) and options. With grad =
    (row_max, stats, grad_divisor or None, upstream or None), z receives d loss / d z instead
    of the logits, from those merged statistics (the low-memory backward). See the kernel.
    x (N, H) and w (V_local, H) with unit column stride, H > 0; z (N, V_local) likewise."""
    n_rows, hidden = x.shape
    n_cols = w.shape[0]
    if not n_rows or not n_cols:
        return
    blocks = logits_blocks(x.dtype)
    check_launchable(fn, linear_logits_kernel, x)
    stats = tiles is not None
    row_math = stats or grad is not None
    flags = dict(ignore_index=0, label_smoothing=0.0, z_loss=0.0, softcap=0.0, HAS_SMOOTHING=False, HAS_SOFTCAP=False,
                 HAS_Z_LOSS=False)  # fmt: skip
    if row_math:
        flags = dict(options.kernel_args(hi_lo=False))
        flags["HAS_Z_LOSS"] = flags["HAS_Z_LOSS"] and grad is not None  # (the statistics take no z-loss)
    row_max, row_stats, divisor, upstream = grad if grad is not None else (None, None, None, None)
    width = tiles[1].shape[2] if stats else row_stats.shape[1] if grad is not None else 1
    grid = (-(-n_rows // blocks["BLOCK_M"]) * -(-n_cols // blocks["BLOCK_N"]),)
    with device_guard(x):
        linear_logits_kernel[grid](
            x_ptr=x, w_ptr=w, bias_ptr=b if b is not None else x, z_ptr=z if z is not None else x,
            target_ptr=target if row_math else x, weight_ptr=weight if row_math and weight is not None else x,
            tile_max_ptr=tiles[0] if stats else x, tile_stats_ptr=tiles[1] if stats else x,
            max_ptr=row_max if grad is not None else x, stats_ptr=row_stats if grad is not None else x,
            grad_divisor_ptr=divisor if divisor is not None else x,
            upstream_ptr=upstream if upstream is not None else x,
            n_rows=n_rows, n_cols=n_cols, hidden=hidden, x_row_stride=x.stride(0), w_row_stride=w.stride(0),
            z_row_stride=z.stride(0) if z is not None else 0, target_stride=target.stride(0) if row_math else 0,
            upstream_stride=upstream.stride(0) if upstream is not None and upstream.dim() else 0,
            bias_stride=b.stride(0) if b is not None else 0,
            n_classes=n_classes, col_start=col_start, zero=0, HAS_BIAS=b is not None,
            STORE_LOGITS=z is not None and grad is None, STATS=stats, GRAD=grad is not None,
            DIVIDE_GRAD=divisor is not None, HAS_UPSTREAM=upstream is not None,
            HAS_WEIGHT=row_math and weight is not None, N_STATS=width, EVEN_K=hidden % blocks["BLOCK_K"] == 0,
            BLOCK_M=blocks["BLOCK_M"], BLOCK_N=blocks["BLOCK_N"], BLOCK_K=blocks["BLOCK_K"], GROUP_M=blocks["GROUP_M"],
            INPUT_PRECISION=dot_precision(x.dtype), num_warps=blocks["WARPS"], num_stages=blocks["STAGES"], **flags,
        )  # fmt: skip


def launch_merge_tile_stats(tiles: tuple, row_max: torch.Tensor, stats: torch.Tensor, accumulate: bool,
                            fn=FN) -> None:  # fmt: skip
    """(row_max (N,), stats (N, width)) <- the merge of every row's tiles (launch_logits' tiles,
    or one slab's statistics as a single tile: (N, 1) and (N, 1, width) views), in tile order,
    in the vocab-parallel packing; with accumulate, merged into what they hold. One program a
    row, LINEAR_CE_MERGE_BLOCK tiles a step (the only block the compile report compiles)."""
    tile_max, tile_stats = tiles
    n_rows, n_tiles = tile_max.shape
    if not n_rows:
        return
    check_launchable(fn, merge_tile_stats_kernel, tile_max)
    with device_guard(tile_max):
        merge_tile_stats_kernel[(n_rows,)](
            tile_max_ptr=tile_max, tile_stats_ptr=tile_stats, max_ptr=row_max, stats_ptr=stats, n_tiles=n_tiles,
            ACCUMULATE=accumulate, N_STATS=stats.shape[1], BLOCK_T=config.LINEAR_CE_MERGE_BLOCK,
            num_warps=config.LINEAR_CE_MERGE_WARPS,
        )  # fmt: skip


def _buffer(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return x.new_empty(rows * cols)


def _view(buf: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The first rows x cols elements of the flat buffer as a contiguous (rows, cols) tensor."""
    return buf[: rows * cols].view(rows, cols)


# ---------------------------------------------------------------------------------------
# The speed mode: token chunks, everything in the forward
# ---------------------------------------------------------------------------------------


def _speed(x, w, b, target, weight, total, options: LossOptions, skip, needs, buffer_bytes, fused_logits=None):
    """(loss per row, lse, dX, dW, db) of the summed loss divided by total (None: 1); each
    gradient None unless asked for (needs: input, weight, bias), in the input's dtype."""
    n_rows, hidden = x.shape
    n_cols = w.shape[0]
    check_launchable(FN, cross_entropy_kernel, x)  # before any product: a CPU tensor without the interpreter
    fused = fused_route(x, w, target, fused_logits)
    width = n_stats(False, weight is not None, options.label_smoothing > 0)
    itemsize = x.element_size() + stats_bytes_per_logit(x.dtype, width) if fused else None
    cut = plan("speed", x, w, buffer_bytes, accumulator=needs[1], itemsize=itemsize)
    f32 = dict(dtype=torch.float32, device=x.device)
    loss, lse = torch.empty(n_rows, **f32), torch.empty(n_rows, **f32)
    dx = torch.empty(n_rows, hidden, dtype=x.dtype, device=x.device) if needs[0] else None
    one_chunk = cut.rows >= n_rows
    dw = dw_acc = None
    if needs[1]:
        dw = torch.empty(n_cols, hidden, dtype=w.dtype, device=x.device)
        if one_chunk:
            dw_acc = dw
        elif dw.dtype == torch.float32:  # accumulate in place
            dw_acc = dw.zero_()
        else:
            dw_acc = torch.zeros(n_cols, hidden, **f32)
    db = torch.zeros(n_cols, **f32) if needs[2] else None
    if not n_rows:
        if dw is not None:
            dw.zero_()
        return loss, lse, dx, dw, db.to(w.dtype) if db is not None else None
    if skip is not None:
        scale = skip_scale((1.0 / total) if total is not None else torch.ones((), **f32), target, weight, n_rows)
    sparse = skip is not None and products_over_live_tiles(cut.skip_tile, x, w)
    chunk = min(cut.rows, n_rows)
    buf = _buffer(x, chunk, n_cols)
    if fused:
        tiles = _tile_buffers(x, chunk, n_cols, width)
        row_max, stats = torch.empty(chunk, **f32), torch.empty(chunk, width, **f32)
    for r0 in range(0, n_rows, cut.rows):
        r1 = min(n_rows, r0 + cut.rows)
        x_c, z = x[r0:r1], _view(buf, r1 - r0, n_cols)
        t_c = target[r0:r1]
        if fused:  # the logits with their tiles' statistics; merged; loss, lse and G in place
            views = _tile_views(tiles, x, r1 - r0, n_cols, width)
            launch_logits(x_c, w, b, z, t_c, weight, views, n_cols, 0, options)
            launch_merge_tile_stats(views, row_max[: r1 - r0], stats[: r1 - r0], False)
            launch_vocab_parallel_loss(z, t_c, weight, row_max[: r1 - r0], stats[: r1 - r0], loss[r0:r1], lse[r0:r1],
                                       z, total, None, n_cols, 0, options)  # fmt: skip
        else:
            _logits_into(z, x_c, w, b)
            split = _forward_split(z, t_c, weight, options)
            args = (z, t_c, weight, loss[r0:r1], lse[r0:r1], z, total, options)
            if split is not None:
                launch_cross_entropy_split(*args, split)
            else:
                launch_cross_entropy(*args)
        live = None
        if skip is not None:
            live = launch_skip_small_tiles(z, scale if scale.dim() == 0 else scale[r0:r1], skip, cut.skip_tile,
                                           live=sparse)  # fmt: skip
        if live is not None:  # the products over the kept tiles only
            launch_live_tiles_products(z, live, cut.skip_tile, dx[r0:r1] if dx is not None else None, w,
                                       dw_acc if dw is not None else None, x_c, False, not one_chunk)  # fmt: skip
        else:
            if dx is not None:
                torch.mm(z, w, out=dx[r0:r1])
            if dw is not None:
                if one_chunk:
                    torch.mm(z.t(), x_c, out=dw)
                else:
                    mm_accumulate(dw_acc, z.t(), x_c)
        if db is not None:
            db.add_(z.sum(0, dtype=torch.float32))
    if dw is not None and dw_acc is not dw:
        dw.copy_(dw_acc)
    return loss, lse, dx, dw, db.to(w.dtype) if db is not None else None


def _speed_op(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: Optional[torch.Tensor],
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    total: Optional[torch.Tensor],
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    grad_skip_threshold: Optional[float],
    input_grad: bool,
    weight_grad: bool,
    bias_grad: bool,
    buffer_bytes: Optional[int] = None,
    fused_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per row, lse, dX, dW, db): the gradients of the summed loss over `total` (None: 1)
    for an upstream gradient of 1, each an empty tensor when not asked for."""
    _check_class_indices(target, linear_weight.shape[0], ignore_index)
    loss, lse, dx, dw, db = _speed(input, linear_weight, linear_bias, target, weight, total,
                                   LossOptions(ignore_index, label_smoothing, z_loss, softcap), grad_skip_threshold,
                                   (input_grad, weight_grad, bias_grad), buffer_bytes, fused_logits)  # fmt: skip
    empty = input.new_empty  # one empty tensor each: a custom op's outputs must not alias
    return loss, lse, *(g if g is not None else empty(0) for g in (dx, dw, db))


linear_cross_entropy_speed = torch.library.custom_op(
    "softmax_gpu::linear_cross_entropy_speed", _speed_op, mutates_args=()
)


@linear_cross_entropy_speed.register_fake
def _(input, linear_weight, linear_bias, target, weight, total, ignore_index, label_smoothing, z_loss, softcap,
      grad_skip_threshold, input_grad, weight_grad, bias_grad, buffer_bytes=None, fused_logits=False):  # fmt: skip
    n_rows = input.shape[0]
    f32 = dict(dtype=torch.float32)
    contiguous = dict(memory_format=torch.contiguous_format)
    return (
        input.new_empty(n_rows, **f32),
        input.new_empty(n_rows, **f32),
        torch.empty_like(input, **contiguous) if input_grad else input.new_empty(0),
        torch.empty_like(linear_weight, **contiguous) if weight_grad else input.new_empty(0),
        input.new_empty(linear_weight.shape[0]) if bias_grad else input.new_empty(0),
    )


def _scale(grad: torch.Tensor, upstream: torch.Tensor) -> None:
    """grad *= upstream (0-d float32) in place, untouched where it is exactly 1."""
    if grad.numel():
        launch_scale_grad(grad if grad.dim() == 2 else grad.view(1, -1), upstream)


linear_cross_entropy_scale = torch.library.custom_op(
    "softmax_gpu::linear_cross_entropy_scale", _scale, mutates_args=("grad",)
)


@linear_cross_entropy_scale.register_fake
def _(grad, upstream):
    return None


# ---------------------------------------------------------------------------------------
# The low-memory mode: vocabulary slabs, the gradients in the backward
# ---------------------------------------------------------------------------------------


def _slab_targets(target, weight, c0, c1):
    """The slab's probability targets (class indices are global: all of them) and weights."""
    tgt = target[:, c0:c1] if target.is_floating_point() else target
    return tgt, (weight[c0:c1] if weight is not None else None)


def _slab_stats(x, w, b, target, weight, n_classes, col_start, options: LossOptions, buffer_bytes, fn=FN,
                fused_logits=None):  # fmt: skip
    """(row maxima (N,), packed statistics (N, n_stats)) float32 of the classes
    [col_start, col_start + V_local) that w holds, slab by slab, merged in slab order as the
    vocab-parallel all-reduces merge shards: column 0 rescaled to the common maximum, summed."""
    n_rows, n_local = x.shape[0], w.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    width = n_stats(target.is_floating_point(), weight is not None, options.label_smoothing > 0)
    if not n_local or not n_rows:
        return torch.full((n_rows,), float("-inf"), **f32), torch.zeros(n_rows, width, **f32)
    check_launchable(fn, cross_entropy_kernel, x)  # before any product: a CPU tensor without the interpreter
    row_max = torch.empty(n_rows, **f32)
    stats = torch.empty(n_rows, width, **f32)
    if fused_route(x, w, target, fused_logits):  # no logits stored: each slab's tile statistics, merged as they come
        cut = plan("low_memory", x, w, buffer_bytes, itemsize=stats_bytes_per_logit(x.dtype, width))
        tiles = _tile_buffers(x, n_rows, min(cut.cols, n_local), width)
        for c0 in range(0, n_local, cut.cols):
            c1 = min(n_local, c0 + cut.cols)
            views = _tile_views(tiles, x, n_rows, c1 - c0, width)
            tgt, wt = _slab_targets(target, weight, c0, c1)
            launch_logits(x, w[c0:c1], b[c0:c1] if b is not None else None, None, tgt, wt, views, n_classes,
                          col_start + c0, options, fn)  # fmt: skip
            launch_merge_tile_stats(views, row_max, stats, c0 > 0, fn)
        return row_max, stats
    cut = plan("low_memory", x, w, buffer_bytes)
    slab_max = torch.empty(n_rows, **f32)
    slab_stats = torch.empty(n_rows, width, **f32)
    buf = _buffer(x, n_rows, min(cut.cols, n_local))
    for c0 in range(0, n_local, cut.cols):
        c1 = min(n_local, c0 + cut.cols)
        z = _view(buf, n_rows, c1 - c0)
        _logits_into(z, x, w[c0:c1], b[c0:c1] if b is not None else None)
        tgt, wt = _slab_targets(target, weight, c0, c1)
        first = c0 == 0
        launch_vocab_parallel_stats(z, tgt, wt, row_max if first else slab_max, stats if first else slab_stats,
                                    n_classes, col_start + c0, options)  # fmt: skip
        if not first:  # the slab as one tile merged into the running statistics
            launch_merge_tile_stats((slab_max[:, None], slab_stats[:, None]), row_max, stats, True, fn)
    return row_max, stats


def _loss_from_stats(x, target, weight, row_max, stats, n_classes, options: LossOptions):
    """(loss per row, lse) from the merged statistics: vocab_parallel_loss_kernel without a
    gradient reads no logits (O(N)), so it gets an (N, 0) tensor in their place."""
    f32 = dict(dtype=torch.float32, device=x.device)
    n_rows = x.shape[0]
    loss, lse = torch.empty(n_rows, **f32), torch.empty(n_rows, **f32)
    if n_rows:
        no_logits = x.new_empty(n_rows, 0)
        launch_vocab_parallel_loss(no_logits, target if not target.is_floating_point() else target[:, :0], weight,
                                   row_max, stats, loss, lse, None, None, None, n_classes, 0, options)  # fmt: skip
    return loss, lse


def _slab_backward(x, w, b, target, weight, row_max, stats, lse, upstream, total, n_classes, col_start,
                   options: LossOptions, skip, needs, buffer_bytes, fn=FN, fused_logits=None):  # fmt: skip
    """The gradients of sum_r upstream_r loss_r / total (total None: 1) for the classes w
    holds: (dX float32, summed over these classes only; dW_local, db_local and d/d target
    in their dtypes); None for each not asked for (needs: input, weight, bias, target)."""
    n_rows, hidden = x.shape
    n_local = w.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    dx = torch.zeros(n_rows, hidden, **f32) if needs[0] else None
    dw = torch.empty(n_local, hidden, dtype=w.dtype, device=x.device) if needs[1] else None
    db = torch.empty(n_local, dtype=w.dtype, device=x.device) if needs[2] else None
    dt = torch.empty_like(target, memory_format=torch.contiguous_format) if needs[3] else None
    if not n_rows or not n_local:
        for g in (dw, db, dt):
            if g is not None:
                g.zero_()
        return dx, dw, db, dt
    check_launchable(fn, cross_entropy_kernel, x)  # before any product: a CPU tensor without the interpreter
    scale = None  # each row's factor, for the target's gradient and the skip filter only
    if dt is not None or skip is not None:
        scale = upstream / total if total is not None else upstream
    cut = plan("low_memory", x, w, buffer_bytes)
    cols = cut.cols
    if dt is not None:  # the target's gradient takes ~4 float32 slab-sized temporaries: they share the budget
        cols = max(1, cols * x.element_size() // (4 * 4))  # (an eighth as wide for 16-bit logits)
    if skip is not None:
        skip_factor = skip_scale(scale, target, weight, n_rows)
    sparse = skip is not None and products_over_live_tiles(cut.skip_tile, x, w)
    fused = fused_route(x, w, target, fused_logits)  # as the forward's: its statistics are of these logits
    buf = _buffer(x, n_rows, min(cols, n_local))
    scratch = torch.empty(2, n_rows, **f32)  # the loss kernel's loss and lse, not needed again
    for c0 in range(0, n_local, cols):
        c1 = min(n_local, c0 + cols)
        z = _view(buf, n_rows, c1 - c0)
        tgt, wt = _slab_targets(target, weight, c0, c1)
        if fused:  # the slab's gradient straight from the product's epilogue (class indices: no dt)
            launch_logits(x, w[c0:c1], b[c0:c1] if b is not None else None, z, tgt, wt, None, n_classes,
                          col_start + c0, options, fn, grad=(row_max, stats, total, upstream))  # fmt: skip
        else:
            _logits_into(z, x, w[c0:c1], b[c0:c1] if b is not None else None)
            if dt is not None:  # from the logits, before the gradient overwrites them
                dt[:, c0:c1] = _target_gradient(z, lse, wt, scale, options.label_smoothing, options.softcap, dt.dtype)
            launch_vocab_parallel_loss(z, tgt, wt, row_max, stats, scratch[0], scratch[1], z, total, upstream,
                                       n_classes, col_start + c0, options)  # fmt: skip
        live = None
        if skip is not None:
            live = launch_skip_small_tiles(z, skip_factor, skip, cut.skip_tile, fn, live=sparse)
        if live is not None:  # the products over the kept tiles only
            launch_live_tiles_products(z, live, cut.skip_tile, dx, w[c0:c1], dw[c0:c1] if dw is not None else None, x,
                                       True, False, fn)  # fmt: skip
        else:
            if dw is not None:
                torch.mm(z.t(), x, out=dw[c0:c1])
            if dx is not None:
                mm_accumulate(dx, z, w[c0:c1])
        if db is not None:
            db[c0:c1] = z.sum(0, dtype=torch.float32)
    return dx, dw, db, dt


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
    buffer_bytes: Optional[int] = None,
    fused_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per row, lse, row maxima, packed statistics), float32, for input (N, H),
    linear_weight (V, H), target (N,) class indices or (N, V) probabilities: the low-memory
    forward. The last two are what the backward reads."""
    n_classes = linear_weight.shape[0]
    _check_class_indices(target, n_classes, ignore_index)
    options = LossOptions(ignore_index, label_smoothing, z_loss, softcap)
    row_max, stats = _slab_stats(input, linear_weight, linear_bias, target, weight, n_classes, 0, options, buffer_bytes,
                                 fused_logits=fused_logits)  # fmt: skip
    if n_classes == 0:  # torch's values for no classes (cross_entropy.zero_class_rows); nothing to launch
        loss = zero_class_rows(target, options, torch.float32)
        return loss, torch.full_like(loss, float("-inf")), row_max, stats
    loss, lse = _loss_from_stats(input, target, weight, row_max, stats, n_classes, options)
    return loss, lse, row_max, stats


linear_cross_entropy_forward = torch.library.custom_op(
    "softmax_gpu::linear_cross_entropy_forward", _forward, mutates_args=()
)


@linear_cross_entropy_forward.register_fake
def _(input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing, z_loss, softcap,
      buffer_bytes=None, fused_logits=False):  # fmt: skip
    n_rows = input.shape[0]
    f32 = dict(dtype=torch.float32)
    width = n_stats(target.is_floating_point(), weight is not None, label_smoothing > 0)
    return (input.new_empty(n_rows, **f32), input.new_empty(n_rows, **f32), input.new_empty(n_rows, **f32),
            input.new_empty((n_rows, width), **f32))  # fmt: skip


def _backward(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: Optional[torch.Tensor],
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    row_max: torch.Tensor,
    stats: torch.Tensor,
    lse: torch.Tensor,
    upstream: torch.Tensor,
    grad_divisor: Optional[torch.Tensor],
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    input_grad: bool,
    weight_grad: bool,
    bias_grad: bool,
    target_grad: bool = False,
    grad_skip_threshold: Optional[float] = None,
    buffer_bytes: Optional[int] = None,
    fused_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of sum_r upstream_r loss_r / grad_divisor (upstream a float32 scalar or (N,))
    with respect to input, linear_weight, linear_bias and probability targets, in their
    dtypes; an empty tensor for each one not asked for. The low-memory backward."""
    needs = (input_grad, weight_grad, bias_grad, target_grad)
    dx, dw, db, dt = _slab_backward(input, linear_weight, linear_bias, target, weight, row_max, stats, lse, upstream,
                                    grad_divisor, linear_weight.shape[0], 0,
                                    LossOptions(ignore_index, label_smoothing, z_loss, softcap), grad_skip_threshold,
                                    needs, buffer_bytes, fused_logits=fused_logits)  # fmt: skip
    empty = input.new_empty
    return (
        dx.to(input.dtype) if dx is not None else empty(0),
        dw if dw is not None else empty(0),
        db if db is not None else empty(0),
        dt if dt is not None else empty(0),
    )


linear_cross_entropy_backward = torch.library.custom_op(
    "softmax_gpu::linear_cross_entropy_backward", _backward, mutates_args=()
)


@linear_cross_entropy_backward.register_fake
def _(input, linear_weight, linear_bias, target, weight, row_max, stats, lse, upstream, grad_divisor, ignore_index,
      label_smoothing, z_loss, softcap, input_grad, weight_grad, bias_grad, target_grad=False,
      grad_skip_threshold=None, buffer_bytes=None, fused_logits=False):  # fmt: skip
    contiguous = dict(memory_format=torch.contiguous_format)
    return (
        torch.empty_like(input, **contiguous) if input_grad else input.new_empty(0),
        torch.empty_like(linear_weight, **contiguous) if weight_grad else input.new_empty(0),
        torch.empty_like(linear_bias, **contiguous) if bias_grad else input.new_empty(0),
        torch.empty_like(target, **contiguous) if target_grad else input.new_empty(0),
    )


# ---------------------------------------------------------------------------------------
# Autograd and the public function
# ---------------------------------------------------------------------------------------


def route(mode: str, dtype: torch.dtype, reduction: str, target_grad: bool, any_grad: bool) -> str:
    """"speed", "low_memory" or "float64" (see the module docstring): the speed mode needs a
    scalar upstream factor, a dtype whose gradient may be rounded before it (bf16, fp32) and
    no target gradient; the forward alone (no gradient) is the low-memory forward."""
    if dtype == torch.float64:
        return "float64"
    if mode == "speed" and any_grad and reduction != "none" and dtype in SPEED_DTYPES and not target_grad:
        return "speed"
    return "low_memory"


class LinearCrossEntropyFunction(torch.autograd.Function):
    """speed: the forward returns the loss and keeps dX, dW, db (for an upstream gradient of
    1); the backward scales them in place, once. low_memory: the forward keeps the inputs and
    O(N) statistics; the backward recomputes the logits slab by slab (and may run more than
    once)."""

    @staticmethod
    def forward(ctx, input, linear_weight, linear_bias, target, weight, options, reduction, grad_skip_threshold, mode,
                buffer_bytes):  # fmt: skip
        needs = ctx.needs_input_grad[:3]
        target_grad = target.is_floating_point() and ctx.needs_input_grad[3]
        ctx.route = route(mode, input.dtype, reduction, target_grad, any(needs) or target_grad)
        if linear_weight.shape[0] == 0:  # no classes: torch's values, nothing launched (the low-memory ops)
            ctx.route = "low_memory"
        total = _total_weight(target, weight, options.ignore_index) if reduction == "mean" else None
        eager = _plain_eager(input, linear_weight, linear_bias, target, weight)
        fused = config.linear_ce_fused()  # read once: the backward makes its logits as the forward did
        if ctx.route == "speed":
            op = _speed_op if eager else linear_cross_entropy_speed
            loss, lse, dx, dw, db = op(input, linear_weight, linear_bias, target, weight, total, *options,
                                       grad_skip_threshold, needs[0], needs[1], needs[2] and linear_bias is not None,
                                       buffer_bytes, fused)  # fmt: skip
            ctx.save_for_backward(dx, dw, db)
            ctx.backward_done = False
        else:
            op = _forward if eager else linear_cross_entropy_forward
            loss, lse, row_max, stats = op(input, linear_weight, linear_bias, target, weight, *options, buffer_bytes,
                                           fused)  # fmt: skip
            if any(needs) or target_grad:
                ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, row_max, stats, lse, total)
            ctx.options = (*options, grad_skip_threshold, buffer_bytes, fused)
            ctx.target_grad = target_grad
        ctx.mark_non_differentiable(lse)
        if reduction != "none" and linear_weight.shape[0] == 0:
            loss = zero_class_reduce(loss, target.is_floating_point(), options.label_smoothing, reduction)
        elif reduction == "mean":
            loss = loss.sum() / total
        elif reduction == "sum":
            loss = loss.sum()
        return loss, lse

    @staticmethod
    @first_order(FN)
    def backward(ctx, grad_loss, _grad_lse):
        needs = ctx.needs_input_grad[:3]
        bias = needs[2]
        upstream = grad_loss.float() if grad_loss.dim() == 0 else grad_loss.reshape(-1).float()
        if ctx.route == "speed":
            if ctx.backward_done:
                raise RuntimeError(f"{FN}: backward ran twice through the same graph; mode='speed' forms the "
                                   f"gradients once, in the forward (use mode='low_memory' for retain_graph=True)")
            ctx.backward_done = True
            dx, dw, db = ctx.saved_tensors
            for g, need in zip((dx, dw, db), needs):
                if need and g.numel():
                    if _plain_eager(g, upstream):
                        _scale(g, upstream)
                    else:
                        linear_cross_entropy_scale(g, upstream)
            grads = (dx, dw, db, None)
        else:
            input, linear_weight, linear_bias, target, weight, row_max, stats, lse, total = ctx.saved_tensors
            *options, skip, buffer_bytes, fused = ctx.options
            bias = bias and linear_bias is not None
            args = (input, linear_weight, linear_bias, target, weight, row_max, stats, lse, upstream, total, *options,
                    needs[0], needs[1], bias, ctx.target_grad, skip, buffer_bytes, fused)  # fmt: skip
            eager = _plain_eager(input, linear_weight, linear_bias, target, weight, upstream)
            grads = (_backward if eager else linear_cross_entropy_backward)(*args)
        dx, dw, db, dt = grads
        return (
            dx if needs[0] else None,
            dw if needs[1] else None,
            db if bias else None,
            dt if ctx.route != "speed" and ctx.target_grad else None,
            None, None, None, None, None, None,
        )  # fmt: skip


def _materialised(x, w, b, target, weight, options: LossOptions, reduction):
    """The logits made in full, then softmax_gpu.cross_entropy: float64 (for checking) and
    torch.func transforms."""
    from .cross_entropy import cross_entropy

    logits = F.linear(x, w, b)
    if target.is_floating_point():
        target = target.to(logits.dtype)
    return cross_entropy(logits, target, weight, options.ignore_index, reduction, options.label_smoothing,
                         z_loss=options.z_loss, softcap=options.softcap)  # fmt: skip


def _is_dtensor(t) -> bool:
    return t is not None and type(t).__name__ == "DTensor" and type(t).__module__.startswith("torch.distributed")


def _check_not_sharded(fn, input, linear_weight, linear_bias):
    """A DTensor head with a plain input is FSDP2's shard of a module whose forward did not run
    (its pre-forward all-gathers the weight, its post-backward reduces the gradient), or a
    tensor-parallel head whose input was not made a DTensor: refuse both rather than compute
    a gradient that no rank reduces."""
    if not _is_dtensor(input) and (_is_dtensor(linear_weight) or _is_dtensor(linear_bias)):
        raise TypeError(
            f"{fn}(): linear_weight is a DTensor but input is not: the LM head looks sharded by FSDP2's fully_shard "
            "outside a forward that gathers it. Call the loss inside the forward of a module whose fully_shard group "
            "holds the head (the root, or the head's own module with "
            "torch.distributed.fsdp.register_fsdp_forward_method), so that its weight arrives all-gathered. For a "
            "tensor-parallel head, pass the input as a DTensor (Replicate) on the head's mesh"
        )


def _check_operands(fn, input, linear_weight, target, linear_bias, weight, allow_no_classes=False, dtypes=DTYPES):
    check_floating(fn, "input", input)
    check_floating(fn, "linear_weight", linear_weight)
    check_tensor(fn, "target", target)
    _check_not_sharded(fn, input, linear_weight, linear_bias)
    if input.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{fn}(): input must be one of {names}, got {input.dtype}")
    if input.dim() == 0:
        raise ValueError(f"{fn}(): input must have at least one dim (the hidden features)")
    if linear_weight.dim() > 2:
        raise ValueError(
            f"{fn}(): linear_weight must be 2-D (num_classes, hidden); the K-dimensional (C, d1, ..., dK, H) form "
            f"of torch's linear_cross_entropy is not supported, got shape {tuple(linear_weight.shape)}"
        )
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


def check_linear_options(fn, mode, buffer_bytes, grad_skip_threshold):
    """Checks linear_cross_entropy's own options (mode, buffer_bytes, grad_skip_threshold);
    returns grad_skip_threshold as a float (or None)."""
    if mode not in config.LINEAR_CE_MODES:
        raise ValueError(f"{fn}(): mode must be one of {config.LINEAR_CE_MODES}, got {mode!r}")
    if buffer_bytes is not None and (isinstance(buffer_bytes, bool) or not isinstance(buffer_bytes, int)
                                     or buffer_bytes < 1):  # fmt: skip
        raise ValueError(f"{fn}(): buffer_bytes must be a positive int or None, got {buffer_bytes!r}")
    if grad_skip_threshold is None:
        return None
    if isinstance(grad_skip_threshold, torch.Tensor) or not isinstance(grad_skip_threshold, (int, float)):
        raise TypeError(f"{fn}(): grad_skip_threshold must be a float or None, got "
                        f"{type(grad_skip_threshold).__name__}")  # fmt: skip
    grad_skip_threshold = float(grad_skip_threshold)
    if not (0.0 <= grad_skip_threshold < float("inf")):
        raise ValueError(f"{fn}(): grad_skip_threshold must be a finite number >= 0 (or None), got "
                         f"{grad_skip_threshold}")  # fmt: skip
    return grad_skip_threshold or None  # 0: no |g| is below it, so nothing is skipped: off


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
    mode: str = "speed",
    buffer_bytes: Optional[int] = None,
) -> torch.Tensor:
    """cross_entropy(input @ linear_weight.T + linear_bias, target) without storing the logits.

    Args:
        input: (H,), (N, H) or (..., H) features; bfloat16, float32, float16 or float64.
        linear_weight: (V, H), the input's dtype; linear_bias: (V,) or None. V == 0 gives
            torch's answer for no classes (cross_entropy's), with nothing launched.
        target: class indices (int64/int32) shaped like input without its last dim, or class
            probabilities shaped like input with H replaced by V (these get a gradient too).
        weight: (V,) class weights; ignore_index (None means -100, as in torch): target value
            that contributes nothing; reduction: "none" | "mean" | "sum"; label_smoothing in
            [0, 1]; z_loss: adds z_loss * lse^2 per row (times its class weight); softcap: logits
            -> softcap * tanh(logits / softcap) before the softmax. All as in softmax_gpu.cross_entropy.
        grad_skip_threshold: None (the default: exact gradients), or a finite float >= 0, Cut
            Cross-Entropy's meaning: every [rows x classes] tile (config.LINEAR_CE_SKIP_TILE)
            of the logits' gradient in which each |d loss_r / d z_rj| (before the mean's
            division, the upstream factor and the row's class weight; |softmax - target|
            for a plain row) is below it is left out. The same number means the same thing at any batch size. Changes the
            gradients, never the loss; 0.0 leaves nothing out.
        mode: "speed" (the default: 3 products, the gradients formed in the forward; extra
            memory at most V*H*4 + buffer_bytes) or "low_memory" (4 products, the gradients
            in the backward; extra memory at most N*H*4 + buffer_bytes + O(N)). Only bfloat16
            and float32 with reduction "mean" or "sum" and no target gradient take the speed
            route; everything else runs low_memory whatever `mode` says. float64 materialises
            the logits (it is for checking).
        buffer_bytes: the logits buffer's budget (None: config.LINEAR_CE_BUFFER_BYTES,
            512 MiB for speed and 256 MiB for low_memory). In speed mode, when linear_weight
            needs a gradient, a single chunk of all N rows may also use the V*H*4 bytes that
            a chunked run's float32 dW would take.
    Returns:
        float32 loss (float64 for float64 input): a scalar, or the target's batch shape for
        reduction="none".

    Equal to softmax_gpu.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)
    up to rounding, with torch.nn.functional.linear_cross_entropy's argument names. The
    logits are made by cuBLAS in the input's dtype, as F.linear makes them, and the float32
    products follow torch's float32 matmul precision. Deterministic; no host synchronisation.
    mode="speed" forms the gradients once: a second backward through the same graph raises.
    """
    if ignore_index is None:
        ignore_index = -100
    if _is_dtensor(input):
        from ..distributed import dtensor_linear_cross_entropy

        return dtensor_linear_cross_entropy(input, linear_weight, target, linear_bias, weight, ignore_index, reduction,
                                            label_smoothing, z_loss, softcap, grad_skip_threshold=grad_skip_threshold,
                                            mode=mode, buffer_bytes=buffer_bytes)  # fmt: skip
    _check_operands(FN, input, linear_weight, target, linear_bias, weight, allow_no_classes=True)
    check_reduction(FN, reduction)
    options = LossOptions.checked(FN, ignore_index, label_smoothing, z_loss, softcap)
    if target.is_floating_point() and ignore_index != -100:
        raise RuntimeError(f"{FN}(): ignore_index is not supported for floating point target (as in torch)")
    grad_skip_threshold = check_linear_options(FN, mode, buffer_bytes, grad_skip_threshold)
    n_classes, hidden = linear_weight.shape
    x = input.reshape(input.shape[:-1].numel(), hidden)  # a view when it can be: cuBLAS takes the strides
    tgt = target.reshape(x.shape[0], n_classes) if target.is_floating_point() else target.reshape(-1)
    if grad_skip_threshold is not None and input.dtype == torch.float64:
        raise ValueError(f"{FN}(): grad_skip_threshold is not supported for float64 input (which is for checking)")
    functorch = under_functorch(x, linear_weight, linear_bias, tgt)
    if functorch and grad_skip_threshold is not None:
        raise NotImplementedError(f"{FN}(): grad_skip_threshold is not supported under torch.func transforms")
    if input.dtype == torch.float64 or functorch:
        # float64 (for checking) and torch.func transforms (grad, vmap, jacrev: per-sample
        # gradients) form the logits and take cross_entropy's path for them.
        loss = _materialised(x, linear_weight, linear_bias, tgt, weight, options, reduction)
    else:
        if weight is not None:
            weight = weight.contiguous()  # the row kernels read weight[j] at unit stride
        if tgt.is_floating_point() and tgt.stride(-1) != 1:
            tgt = tgt.contiguous()  # the row kernels read probabilities at unit column stride
        loss, _lse = LinearCrossEntropyFunction.apply(x, linear_weight, linear_bias, tgt, weight, options, reduction,
                                                      grad_skip_threshold, mode, buffer_bytes)  # fmt: skip
    if reduction == "none":
        return loss.view(input.shape[:-1])
    return loss
