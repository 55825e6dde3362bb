"""Linear cross-entropy's own device code: grad_skip_threshold's tile filter, the backward's
two products over the tiles it keeps, and the opt-in Triton logits product with the row
statistics in its epilogue (config.LINEAR_CE_FUSED) with their merge.

Everything else the op runs on the device is shared: the other matrix products are cuBLAS's
(torch.mm / addmm), the row math between them is cross-entropy's kernels (the speed mode's
chunks: kernels/cross_entropy.py) and the vocab-parallel pair (the low-memory mode's slabs,
which are shards of the vocabulary, and the Triton logits' tiles, which are narrower shards:
kernels/vocab_parallel_cross_entropy.py).
softmax_gpu/ops/linear_cross_entropy.py describes both modes and their roofline.
"""
import triton
import triton.language as tl

from .cross_entropy import fresh, load_weight_block, row_loss, soft_cap, store_grad_block
from .softmax import LOG2E
from .vocab_parallel_cross_entropy import class_index_sums, target_column


@triton.jit
def skip_small_tiles_kernel(
    grad_ptr,
    scale_ptr,
    n_rows,
    n_cols,
    grad_row_stride,
    scale_stride,
    threshold,
    live_ptr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WRITE_LIVE: tl.constexpr = False,
):
    """Zero tile (program_id(0), program_id(1)) of grad when it holds nothing that matters;
    with WRITE_LIVE, write 1 (kept) or 0 (zeroed) to live_ptr[pid_m * num_programs(1) + pid_n]
    for the products that follow (live_tiles_grad_input_kernel, live_tiles_grad_weight_kernel).

    grad_ptr: (n_rows, n_cols) the logits' gradient, unit column stride, row stride
        grad_row_stride, in place. Its row r carries the factor s_r = scale_ptr[r * scale_stride]
        (the reduction's 1 / total, the upstream gradient and, with class weights, the row's
        w_t; stride 0: one factor), so g_rj / s_r is Cut Cross-Entropy's |softmax - target|
        for a plain row.
    The tile is zeroed when |g_rj| < threshold * |s_r| for every element in it, i.e. when
    every unscaled gradient is below the threshold whatever the batch size or reduction.
    A NaN is never below anything, so a tile with one is kept. Tiles past the edges are
    masked. Bytes: one read of grad; one write of each tile that is zeroed. No FLOPs to
    speak of. At 8192 x 128256 bf16 (one speed chunk, 2.1 GB) that is 0.70 ms on an H100
    (3.0 TB/s) and 0.49 ms on an H200 (4.3 TB/s) with nothing skipped, up to twice that when
    every tile is zeroed: next to the ~33 ms of products, the price of the option, which the
    products over the kept tiles alone (below) repay.
    """
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < n_rows
    mask = row_in[:, None] & (cols < n_cols)[None, :]
    ptrs = grad_ptr + rows[:, None] * grad_row_stride + cols[None, :]
    g = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(scale_ptr + rows * scale_stride, mask=row_in, other=0.0).to(tl.float32)
    small = (tl.abs(g) < threshold * tl.abs(s)[:, None]) | (~mask)
    kept = tl.max(tl.max(tl.where(small, 0, 1), axis=1), axis=0)
    if kept == 0:
        tl.store(ptrs, tl.zeros([BLOCK_M, BLOCK_N], tl.float32).to(grad_ptr.dtype.element_ty), mask=mask)
    if WRITE_LIVE:
        tl.store(live_ptr + pid_m * tl.num_programs(1) + pid_n, kept.to(tl.int8))


# ---------------------------------------------------------------------------------------
# The backward's products over the tiles the filter kept (grad_skip_threshold)
# ---------------------------------------------------------------------------------------
# With grad_skip_threshold the filter above also writes live[i, j] (1: tile kept, 0:
# zeroed) for the (TILE_M rows x TILE_N classes) tiles of G, and the two products that read
# G run here instead of cuBLAS, each taking only the live tiles: a skipped tile costs its
# products nothing but one byte of the map. Each output tile has one program, which adds
# its terms in a fixed order: bitwise reproducible. float32 accumulation throughout.
#
# Roofline at 8192 tokens x H 4096 x V 128256 bf16, with a fraction f of the tiles live:
# each product is 2 N H V f = 8.61 f TFLOP (10.9 f ms at 790 TFLOP/s, H100 and H200); the
# map is N V / (128 * 256) = 32 KB. Operand traffic per product: G's live tiles once per
# output column block (H / 128 = 32 times, 2.1 f GB each: 67 f GB) and the other operand
# alike; at f = 1 most of it hits L2, at small f there is little of it. The loads sit
# inside the data-dependent branch, so the dense case runs without software pipelining:
# predicted ~2x cuBLAS's time at f = 1 (~22 ms a product) and ~f of it below, e.g. 0.2 ms
# a product at f = 1% against cuBLAS's dense 10.9 ms. Not measured on a GPU yet.


@triton.jit
def load_block(ptr, rows, cols, row_stride, row_in, col_in):
    """The [rows, cols] block at ptr (unit column stride), 0 outside row_in x col_in."""
    return tl.load(ptr + rows[:, None] * row_stride + cols[None, :], mask=row_in[:, None] & col_in[None, :], other=0.0)


@triton.jit
def store_block(ptr, acc, rows, cols, row_stride, row_in, col_in, ACCUMULATE: tl.constexpr):
    """Writes the float32 [rows, cols] block acc at ptr in its dtype, or with ACCUMULATE adds it
    to what is there (float32); only inside row_in x col_in."""
    out = ptr + rows[:, None] * row_stride + cols[None, :]
    mask = row_in[:, None] & col_in[None, :]
    if ACCUMULATE:
        acc += tl.load(out, mask=mask, other=0.0)
    tl.store(out, acc.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def live_tiles_grad_input_kernel(
    g_ptr,
    w_ptr,
    out_ptr,
    live_ptr,
    n_rows,
    n_cols,
    hidden,
    g_row_stride,
    w_row_stride,
    out_row_stride,
    n_col_tiles,
    TILE_M: tl.constexpr,
    TILE_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """out[rows, h] (+)= sum over the live tiles j of row tile i of G[rows, tile j] @ W[tile j, h]:
    dX = G W over the kept tiles. Program (m, k): rows m * BLOCK_M + [0, BLOCK_M) (BLOCK_M
    divides TILE_M: all in row tile i = m * BLOCK_M // TILE_M), hidden columns
    k * BLOCK_H + [0, BLOCK_H). g (n_rows, n_cols) and w (n_cols, hidden), unit column
    stride; out (n_rows, hidden): written in its dtype, or with ACCUMULATE added to
    (float32). live: (cdiv(n_rows, TILE_M), n_col_tiles) int8. Masked at every edge."""
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    ks = tl.arange(0, BLOCK_K)
    row_in = rows < n_rows
    h_in = cols_h < hidden
    acc = tl.zeros([BLOCK_M, BLOCK_H], tl.float32)
    live_row = live_ptr + ((pid_m * BLOCK_M) // TILE_M).to(tl.int64) * n_col_tiles
    for j in range(0, n_col_tiles):
        if tl.load(live_row + j) != 0:
            for k0 in range(0, TILE_N, BLOCK_K):
                # (the base as a multiple of BLOCK_K, which a loop variable does not tell the compiler,
                # so the loads stay 128-bit; j is an int in the interpreter)
                cls = tl.multiple_of(j * TILE_N + k0, BLOCK_K) + ks.to(tl.int64)  # (< n_cols + TILE_N: an int32)
                cls_in = cls < n_cols
                a = load_block(g_ptr, rows, cls, g_row_stride, row_in, cls_in)
                b = load_block(w_ptr, cls, cols_h, w_row_stride, cls_in, h_in)
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    store_block(out_ptr, acc, rows, cols_h, out_row_stride, row_in, h_in, ACCUMULATE)


@triton.jit
def live_tiles_grad_weight_kernel(
    g_ptr,
    x_ptr,
    out_ptr,
    live_ptr,
    n_rows,
    n_cols,
    hidden,
    g_row_stride,
    x_row_stride,
    out_row_stride,
    n_row_tiles,
    n_col_tiles,
    TILE_M: tl.constexpr,
    TILE_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """out[cls, h] (+)= sum over the live row tiles i of class tile j of G[tile i, cls]^T @ X[tile i, h]:
    dW = G^T X over the kept tiles. Program (v, k): classes v * BLOCK_V + [0, BLOCK_V)
    (BLOCK_V divides TILE_N: all in class tile j = v * BLOCK_V // TILE_N), hidden columns
    k * BLOCK_H + [0, BLOCK_H). x (n_rows, hidden); out (n_cols, hidden), written in its
    dtype or with ACCUMULATE added to (float32). Masked at every edge."""
    pid_v = tl.program_id(0)
    pid_h = tl.program_id(1)
    cls = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    cols_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    ks = tl.arange(0, BLOCK_K)
    cls_in = cls < n_cols
    h_in = cols_h < hidden
    tile_j = (pid_v * BLOCK_V) // TILE_N
    acc = tl.zeros([BLOCK_V, BLOCK_H], tl.float32)
    for i in range(0, n_row_tiles):
        if tl.load(live_ptr + i * n_col_tiles + tile_j) != 0:
            for k0 in range(0, TILE_M, BLOCK_K):
                rows = tl.multiple_of(i * TILE_M + k0, BLOCK_K) + ks.to(tl.int64)
                row_in = rows < n_rows
                a = load_block(g_ptr, rows, cls, g_row_stride, row_in, cls_in)
                b = load_block(x_ptr, rows, cols_h, x_row_stride, row_in, h_in)
                acc = tl.dot(tl.trans(a), b, acc, input_precision=INPUT_PRECISION)
    store_block(out_ptr, acc, cls, cols_h, out_row_stride, cls_in, h_in, ACCUMULATE)


# ---------------------------------------------------------------------------------------
# The logits product in Triton, with the row statistics in its epilogue (opt-in)
# ---------------------------------------------------------------------------------------
# config.LINEAR_CE_FUSED (SOFTMAX_GPU_LINEAR_CE_FUSED=1) replaces cuBLAS's logits product
# with linear_logits_kernel: each program makes one (BLOCK_M rows x BLOCK_N classes) tile of
# z = X W^T + b and, before the tile leaves its registers, that tile's share of every row
# sum the loss needs, in the vocab-parallel packing (kernels/vocab_parallel_cross_entropy.py,
# each class tile a shard). merge_tile_stats_kernel merges the tiles of a row in tile order;
# vocab_parallel_loss_kernel then gives the loss and lse and, where asked, the gradient in
# place, as for the vocab-parallel shards and the low-memory slabs.
#
# Roofline at 8192 tokens x H 4096 x V 128256 bf16 (one product: 2 N H V = 8.61 TFLOP,
# 10.9 ms at 790 TFLOP/s, H100 and H200 alike; H100 3.0 TB/s, H200 4.3 TB/s):
#   low-memory forward (STORE_LOGITS=0): the product and 98 MB of tile statistics (N x 1002
#     tiles of 128 classes x 3 float32, written and read once), nothing of N x V. Against
#     cuBLAS's route, which writes the logits (2.1 GB, inside its product's time) and reads
#     them back for the statistics (2.1 GB: 0.70 ms H100, 0.49 ms H200), that saves the read,
#     the write's share of the product's memory traffic and the slab buffer. Predicted
#     11.0 ms at the peak (H100 and H200), if Triton's product runs at cuBLAS's rate; the
#     committed H200 run timed QuACK's fused forward at 11.9 ms.
#   low-memory backward (GRAD=1): each slab's product writes G from its epilogue (the
#     merged statistics in hand), where cuBLAS's route writes the logits and the loss kernel
#     reads them and writes G (4.2 GB: 1.4 ms H100, 1.0 ms H200).
#   speed chunk (STORE_LOGITS=1): the product writes the chunk's logits as cuBLAS's does and
#     saves the statistics pass of the row kernel, which at V = 128256 reads each row twice
#     (the second read mostly from L2): at most 0.70 ms (H100) / 0.49 ms (H200) of the
#     speed mode's predicted 34 ms. So the fused route wins only where Triton's product is
#     within ~5% of cuBLAS's (~10% for the low-memory mode's two, H100); a GPU run decides
#     (bench/linear_ce.py times both routes).
# Operand traffic of the product itself: each program reads (BLOCK_M + BLOCK_N) x H x 2
# bytes (2.1 MB at 128 x 128, for 134 MFLOP); programs run in groups of GROUP_M = 8 row tiles
# that share their class tiles (one wave of 132 tiles touches ~26 MB, within L2), so W
# (1.05 GB) comes from HBM about N / (GROUP_M BLOCK_M) = 8 times (8.4 GB: 2.8 ms H100,
# 2.0 ms H200, under the 10.9 ms of math) and X (67 MB) mostly from L2. The tile is 128 x 128
# rather than cuBLAS-like 128 x 256 because the statistics epilogue spilled at 256 wide
# (config.LINEAR_CE_LOGITS); whether Triton's product then keeps up with cuBLAS's is the
# open question a GPU run answers. One program fits an SM (the 16-bit statistics variants
# take 156-254 registers on 8 warps, 96 KiB of pipeline buffers on sm_90), so each tile's
# pipeline fill and epilogue are not hidden behind another tile: the epilogue's ~16K
# exponentials and reductions, about 1 us against ~22 us of tensor-core time a tile at the
# rate taken (~5%), is the first thing to look at if the product lags (a persistent loop, or
# a register cap that lets two programs share an SM).


@triton.jit
def linear_logits_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    z_ptr,
    target_ptr,
    weight_ptr,
    tile_max_ptr,
    tile_stats_ptr,
    max_ptr,
    stats_ptr,
    grad_divisor_ptr,
    upstream_ptr,
    n_rows,
    n_cols,
    hidden,
    x_row_stride,
    w_row_stride,
    z_row_stride,
    target_stride,
    upstream_stride,
    bias_stride,
    n_classes,
    col_start,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    zero,
    HAS_BIAS: tl.constexpr,
    STORE_LOGITS: tl.constexpr,
    STATS: tl.constexpr,
    GRAD: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr,
    DIVIDE_GRAD: tl.constexpr,
    HAS_UPSTREAM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    N_STATS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One (BLOCK_M x BLOCK_N) tile of z = x @ w^T (+ bias), float32 accumulation, rounded
    once to z's dtype as cuBLAS rounds F.linear's; with STORE_LOGITS written to z, with STATS
    reduced to the tile's share of the row statistics.

    x_ptr: (n_rows, hidden), w_ptr: (n_cols, hidden), both with unit column stride; bias_ptr:
        (n_cols,) at stride bias_stride (0: one value broadcast), read only with HAS_BIAS.
    z_ptr: (n_rows, n_cols), unit column stride, row stride z_row_stride, the input's dtype:
        written with STORE_LOGITS (the logits) or GRAD (their gradient), else never touched.
    target_ptr: (n_rows,) global class indices (stride target_stride); this launch's column c
        is class col_start + c of n_classes. weight_ptr: (n_cols,) the launch's class weights
        (HAS_WEIGHT only). label_smoothing, z_loss: read by the gradient epilogue only (the
        statistics' smoothing sums are the same for any eps). zero: the int 0, which the
        compiler cannot see (tile_logits).
    With GRAD (the low-memory backward), z_ptr receives d loss / d z of the tile instead of
    the logits, from the merged statistics of every class (max_ptr (n_rows,), stats_ptr
    (n_rows, N_STATS): what merge_tile_stats_kernel or the vocab-parallel all-reduces give),
    divided by *grad_divisor_ptr (DIVIDE_GRAD) and times upstream_ptr[row * upstream_stride]
    (HAS_UPSTREAM), as vocab_parallel_loss_kernel writes it (the same row math:
    linear_tile_grad), but without the logits' round trip through memory.
    tile_max_ptr: (n_rows, n_tiles) float32 and tile_stats_ptr: (n_rows, n_tiles, N_STATS)
        float32, contiguous, n_tiles = num_programs / row tiles: at [r, tile], what
        vocab_parallel_stats_kernel would write for row r were this tile's classes a shard
        (the tile's maximum of the soft-capped logits; the sum of e^(z - that maximum) without
        the target, z_t and w_t on the tile that holds t, and the smoothing sums). The
        statistics are those of the rounded logits, so the loss kernel, reading the stored
        logits, sees the same numbers.
    Masked at every edge: rows and classes past the ends load row 0 / class 0 (wrapped, so
    the K loop carries no row mask) and are never stored. Tile order: GROUP_M row tiles at a
    time walk the class tiles together (W's tiles then come from L2 for all but the first).
    """
    pid = tl.program_id(0)
    n_row_tiles = tl.cdiv(n_rows, BLOCK_M)
    n_col_tiles = tl.cdiv(n_cols, BLOCK_N)
    per_group = GROUP_M * n_col_tiles
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(n_row_tiles - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < n_rows
    col_in = cols < n_cols
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + (rows % n_rows)[:, None] * x_row_stride + ks[None, :]
    w_ptrs = w_ptr + (cols % n_cols).to(tl.int64)[None, :] * w_row_stride + ks[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            a = tl.load(x_ptrs, mask=(ks < hidden - k0)[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=(ks < hidden - k0)[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols.to(tl.int64) * bias_stride, mask=col_in, other=0.0).to(tl.float32)[None, :]
    z_out = acc.to(x_ptr.dtype.element_ty)
    if STORE_LOGITS:
        tl.store(z_ptr + rows[:, None] * z_row_stride + cols[None, :], z_out,
                 mask=row_in[:, None] & col_in[None, :])  # fmt: skip
    if GRAD:
        linear_tile_grad(z_out, zero, rows, cols, row_in, col_in, z_ptr, z_row_stride, target_ptr, weight_ptr, max_ptr,
                         stats_ptr, grad_divisor_ptr, upstream_ptr, target_stride, upstream_stride, n_cols, n_classes,
                         col_start, ignore_index, label_smoothing, z_loss, softcap, HAS_WEIGHT, HAS_SMOOTHING,
                         HAS_Z_LOSS, HAS_SOFTCAP, DIVIDE_GRAD, HAS_UPSTREAM, N_STATS)  # fmt: skip
    if STATS:
        linear_tile_stats(z_out, zero, rows, cols, row_in, col_in, pid_n, n_col_tiles, target_ptr, weight_ptr,
                          tile_max_ptr, tile_stats_ptr, target_stride, n_cols, n_classes, col_start, ignore_index,
                          softcap, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, N_STATS, BLOCK_N)  # fmt: skip


@triton.jit
def tile_logits(raw, zero, col_in, softcap, HAS_SOFTCAP: tl.constexpr):
    """The float32 soft-capped logits of the rounded tile raw, -inf past the classes. A 16-bit
    tile is converted afresh on each call (fresh(), with a different runtime zero per pass):
    only its packed 16-bit values stay live between the epilogue's reductions, 64 registers
    a thread at 128 x 256 on 8 warps instead of 128 for float32 beside the rest."""
    if raw.dtype.primitive_bitwidth == 16:
        z = fresh(raw, zero).to(tl.float32)
    else:
        z = raw
    z = soft_cap(z, softcap, HAS_SOFTCAP)
    return tl.where(col_in[None, :], z, -float("inf"))


@triton.jit
def linear_tile_stats(raw, zero, rows, cols, row_in, col_in, tile, n_tiles, target_ptr, weight_ptr, tile_max_ptr,
                      tile_stats_ptr, target_stride, n_cols, n_classes, col_start, ignore_index, softcap,
                      HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                      N_STATS: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """The epilogue's statistics of the rounded tile raw (rows x cols of the launch, live where
    row_in x col_in) at [rows, tile] of tile_max / tile_stats: see linear_logits_kernel. Two
    passes over the tile in registers (tile_logits): its maximum, then the sums. A tile whose
    row is -inf everywhere (or past the classes) gives maximum -inf and sum 0; a NaN logit
    makes the row's sum NaN. w_t is gathered (one load a row whose target is in the tile),
    not summed out of a broadcast of the tile's weights."""
    t = tl.load(target_ptr + rows * target_stride, mask=row_in, other=ignore_index).to(tl.int64)
    # t's column in this launch, or -1 (matching no column) for an ignored or bad row and for a
    # class of another slab or shard, which may otherwise land on the masked tail of a tile
    _valid, _bad, t_local = target_column(t, ignore_index, col_start, n_cols, n_classes)
    # The cap is increasing, so the capped maximum is the cap of the maximum: one cap a row
    # here. A tile of -inf logits caps to -softcap, as each of them does (every tile has a
    # live column), so its classes count in the sum as in torch.
    m = tl.max(tile_logits(raw, zero, col_in, softcap, False), axis=1)
    if HAS_SOFTCAP:
        m = soft_cap(m, softcap, True)
    shift = tl.where(m == -float("inf"), 0.0, m)  # a row of -inf: e^(-inf - 0) = 0, not NaN
    z = tile_logits(raw, zero >> 1, col_in, softcap, HAS_SOFTCAP)
    is_t = cols[None, :] == t_local[:, None]
    d = tl.sum(tl.where(is_t, 0.0, tl.exp2((z - shift[:, None]) * LOG2E)), axis=1)
    z_t = tl.sum(tl.where(is_t, z, 0.0), axis=1)
    base = rows * n_tiles + tile
    tl.store(tile_max_ptr + base, m, mask=row_in)
    stats = tile_stats_ptr + base * N_STATS
    tl.store(stats, d, mask=row_in)
    tl.store(stats + 1, z_t, mask=row_in)
    if HAS_WEIGHT:
        first = tile * BLOCK_N
        owned = (t_local >= first) & (t_local < first + BLOCK_N) & row_in
        w_t = tl.load(weight_ptr + tl.where(owned, t_local, 0), mask=owned, other=0.0).to(tl.float32)
        tl.store(stats + 2, w_t, mask=row_in)
    if HAS_SMOOTHING:
        w = load_weight_block(weight_ptr, cols, col_in, HAS_WEIGHT, False)
        wz = tl.sum(w[None, :] * tl.where(col_in[None, :], z, 0.0), axis=1)  # (0, not -inf x 0, past the classes)
        tl.store(stats + 2 + HAS_WEIGHT, wz, mask=row_in)
        tl.store(stats + 3 + HAS_WEIGHT, tl.zeros_like(wz) + tl.sum(w, axis=0), mask=row_in)


@triton.jit
def linear_tile_grad(raw, zero, rows, cols, row_in, col_in, grad_ptr, grad_row_stride, target_ptr, weight_ptr, max_ptr,
                     stats_ptr, grad_divisor_ptr, upstream_ptr, target_stride, upstream_stride, n_cols, n_classes,
                     col_start, ignore_index, label_smoothing, z_loss, softcap, HAS_WEIGHT: tl.constexpr,
                     HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                     DIVIDE_GRAD: tl.constexpr, HAS_UPSTREAM: tl.constexpr, N_STATS: tl.constexpr):  # fmt: skip
    """The gradient epilogue (see linear_logits_kernel): each row's lse and coefficients from
    the merged statistics, as vocab_parallel_loss_kernel's steps 1 and 2 compute them for one
    row (here a vector of the tile's rows: row_loss takes either), then store_grad_block on
    the tile in registers. Bytes: the tile's G written once, O(BLOCK_M + BLOCK_N) read."""
    t = tl.load(target_ptr + rows * target_stride, mask=row_in, other=ignore_index).to(tl.int64)
    valid, bad, t_local = target_column(t, ignore_index, col_start, n_cols, n_classes)
    stats_row = stats_ptr + rows * N_STATS
    m = tl.load(max_ptr + rows, mask=row_in, other=0.0)
    other, d, z_t, w_t, sum_wz, sum_w = class_index_sums(stats_row, m, valid, bad, row_in, HAS_WEIGHT, HAS_SMOOTHING)
    inv_classes = 1.0 / n_classes
    _loss, coef = row_loss(m, tl.log(d), z_t, w_t, sum_w, sum_wz, valid, label_smoothing, inv_classes, z_loss, False,
                           HAS_SMOOTHING, HAS_Z_LOSS)  # fmt: skip
    scale = tl.full([1], 1.0, tl.float32)
    if DIVIDE_GRAD:
        scale = scale / tl.load(grad_divisor_ptr)
    if HAS_UPSTREAM:
        scale = scale * tl.load(upstream_ptr + rows * upstream_stride, mask=row_in, other=0.0)
    w = load_weight_block(weight_ptr, cols, col_in, HAS_WEIGHT, False)
    z = tile_logits(raw, zero, col_in, softcap, HAS_SOFTCAP)
    store_grad_block(grad_ptr + rows[:, None] * grad_row_stride + cols[None, :], grad_ptr, weight_ptr, cols[None, :],
                     row_in[:, None] & col_in[None, :], z, m[:, None], (1.0 / d)[:, None], (other / d)[:, None],
                     coef[:, None], scale[:, None], t_local[:, None], w_t[:, None], valid[:, None], bad[:, None],
                     label_smoothing, inv_classes, softcap, False, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, False,
                     w[None, :], True)  # fmt: skip


@triton.jit
def merge_tile_stats_kernel(
    tile_max_ptr,
    tile_stats_ptr,
    max_ptr,
    stats_ptr,
    n_tiles,
    ACCUMULATE: tl.constexpr,
    N_STATS: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Row r = program_id(0)'s statistics from its n_tiles tiles (linear_logits_kernel's
    tile_max / tile_stats), in vocab_parallel_stats_kernel's packing: max_ptr[r] the largest
    tile maximum M, stats_ptr[r, 0] = sum_tiles d_tile e^(m_tile - M), the other columns summed.
    With ACCUMULATE the row's present (max, stats) merge in as one more tile, first: the
    running statistics of earlier slabs. A tile at -inf adds 0 (and rescales by nothing);
    a NaN on any side makes the row NaN. Fixed order: the same bits every run. Bytes:
    (1 + N_STATS) x 4 per tile, read once, plus a second read of the maxima (from L1/L2)."""
    row = tl.program_id(0).to(tl.int64)
    ts = tl.arange(0, BLOCK_T)
    tile_max_row = tile_max_ptr + row * n_tiles
    tile_stats_row = tile_stats_ptr + row * n_tiles * N_STATS
    top = tl.full([BLOCK_T], -float("inf"), tl.float32)
    for t0 in range(0, n_tiles, BLOCK_T):
        top = tl.maximum(top, tl.load(tile_max_row + t0 + ts, mask=ts < n_tiles - t0, other=-float("inf")))
    new_max = tl.max(top, axis=0)
    if ACCUMULATE:
        old_max = tl.load(max_ptr + row)
        new_max = tl.maximum(new_max, old_max)
    # (a NaN logit need not reach the maximum, which the compiled max may drop: it is in its
    # tile's sum, whatever that tile's maximum, and so in the row's)
    total_max = new_max
    d = tl.zeros([BLOCK_T], tl.float32)
    for t0 in range(0, n_tiles, BLOCK_T):
        live = ts < n_tiles - t0
        m_t = tl.load(tile_max_row + t0 + ts, mask=live, other=-float("inf"))
        d_t = tl.load(tile_stats_row + (t0 + ts) * N_STATS, mask=live, other=0.0)
        d += tl.where(m_t == -float("inf"), 0.0 * d_t, d_t * tl.exp2((m_t - total_max) * LOG2E))
    d_sum = tl.sum(d, axis=0)
    if ACCUMULATE:
        old_d = tl.load(stats_ptr + row * N_STATS)
        d_sum = tl.where(old_max == -float("inf"), 0.0 * old_d, old_d * tl.exp2((old_max - total_max) * LOG2E)) + d_sum
    tl.store(max_ptr + row, total_max)
    tl.store(stats_ptr + row * N_STATS, d_sum)
    for c in tl.static_range(1, N_STATS):
        s = tl.zeros([BLOCK_T], tl.float32)
        for t0 in range(0, n_tiles, BLOCK_T):
            s += tl.load(tile_stats_row + (t0 + ts) * N_STATS + c, mask=ts < n_tiles - t0, other=0.0)
        s_sum = tl.sum(s, axis=0)
        if ACCUMULATE:
            s_sum = tl.load(stats_ptr + row * N_STATS + c) + s_sum
        tl.store(stats_ptr + row * N_STATS + c, s_sum)
