"""Linear cross-entropy's own device code: grad_skip_threshold's tile filter, and the
backward's two products over the tiles it keeps.

Everything else the op runs on the device is shared: the other matrix products are cuBLAS's
(torch.mm / addmm), the row math between them is cross-entropy's kernels (the speed mode's
chunks: kernels/cross_entropy.py) and the vocab-parallel pair (the low-memory mode's slabs,
which are shards of the vocabulary: kernels/vocab_parallel_cross_entropy.py).
softmax_gpu/ops/linear_cross_entropy.py describes both modes and their roofline.
"""
import triton
import triton.language as tl


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
