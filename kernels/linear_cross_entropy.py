"""Linear cross-entropy's own device code: grad_skip_threshold's tile filter.

Everything else the op runs on the device is shared: the matrix products are cuBLAS's
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Zero tile (program_id(0), program_id(1)) of grad when it holds nothing that matters.

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
    every tile is zeroed: next to the ~33 ms of products, the price of the option, which saves
    no product time yet (they are cuBLAS's dense ones).
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
