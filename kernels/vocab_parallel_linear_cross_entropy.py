"""Vocab-parallel fused linear + cross-entropy: one shard's partial row statistics.

Each rank holds the rows [col_start, col_start + n_cols) of the LM head's weight (and bias,
and class weights) out of n_classes. This kernel is linear_cross_entropy_fwd_kernel's walk
over the vocabulary restricted to that shard: one program per row tile, tl.dot logit tiles,
an online (max, sum) per row. Instead of a loss it writes what the ranks add up:

  max_ptr    (n_rows,)          m_r, this shard's largest logit of the row
  stats_ptr  (n_rows, N_STATS)  row-major, packed for one all-reduce SUM:
    STAT_SUM     sum_j e^(z_j - m_r)                     (rescaled to the global max on the host)
    STAT_OTHER   the same sum without the target's class (rescaled likewise)
    STAT_ZT      z_t where this shard holds the target, else 0
    STAT_WT      w_t where this shard holds the target, else 0   (HAS_WEIGHT only)
    then, with HAS_SMOOTHING: sum_j w_j z_j and sum_j w_j over this shard's classes.

Summed over the ranks these give the full problem's d, 1 - q_t, z_t, w_t and smoothing sums
(softmax_gpu/ops/vocab_parallel_linear_cross_entropy.py turns them into the loss and the
four per-row floats the unchanged linear backward kernels read). Class-index targets only;
target indices are global. Nothing of size N x V_local is written.
"""
import triton
import triton.language as tl

from .linear_cross_entropy import class_weights, logits_tile, shard_row_targets
from .softmax import LOG2E

STAT_SUM = tl.constexpr(0)
STAT_OTHER = tl.constexpr(1)
STAT_ZT = tl.constexpr(2)
STAT_WT = tl.constexpr(3)  # only with HAS_WEIGHT; the smoothing sums follow the last of these


def n_stats(has_weight: bool, has_smoothing: bool) -> int:
    """Columns of the packed statistics: 3, +1 with class weights, +2 with label smoothing."""
    return 3 + int(has_weight) + 2 * int(has_smoothing)


@triton.jit
def vocab_parallel_linear_stats_kernel(
    x_ptr, w_ptr, b_ptr, target_ptr, weight_ptr, max_ptr, stats_ptr,
    n_rows, n_cols, hidden,
    stride_xm, stride_xk, stride_wv, stride_wk, stride_tm, stride_stats,
    col_start, n_classes, ignore_index, softcap,
    HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """This shard's row maxima and packed statistics (module docstring) for rows
    [pid * BLOCK_M, +BLOCK_M). Operands as in linear_cross_entropy_fwd_kernel, with n_cols the
    shard's class count; stats_ptr has row stride stride_stats and unit column stride."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < n_rows
    t, valid, bad, w_t = shard_row_targets(target_ptr, weight_ptr, rows, n_rows, n_cols, stride_tm, ignore_index,
                                           col_start, n_classes, HAS_WEIGHT)
    m = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    d = tl.zeros((BLOCK_M,), tl.float32)
    other = tl.zeros((BLOCK_M,), tl.float32)
    z_t = tl.zeros((BLOCK_M,), tl.float32)
    sum_wz = tl.zeros((BLOCK_M,), tl.float32)
    sum_w = tl.zeros((BLOCK_M,), tl.float32)
    for v0 in range(0, n_cols, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)  # int64: cols * stride_wv may pass 2**31
        z = logits_tile(x_ptr, w_ptr, b_ptr, rows, cols, n_rows, n_cols, hidden,
                        stride_xm, stride_xk, stride_wv, stride_wk, softcap,
                        HAS_BIAS, HAS_SOFTCAP, BLOCK_M, BLOCK_V, BLOCK_K, INPUT_PRECISION)
        m_new = tl.maximum(m, tl.max(z, axis=1), propagate_nan=tl.PropagateNan.ALL)
        seen = m_new != -float("inf")
        alpha = tl.where(seen, tl.exp2((m - m_new) * LOG2E), 0.0)
        p = tl.where(seen[:, None], tl.exp2((z - m_new[:, None]) * LOG2E), 0.0)
        is_t = cols[None, :] == t[:, None]  # t is -1 where another shard holds the target
        d = d * alpha + tl.sum(p, axis=1)
        other = other * alpha + tl.sum(tl.where(is_t, 0.0, p), axis=1)
        m = m_new
        z_t += tl.sum(tl.where(is_t, z, 0.0), axis=1)
        if HAS_SMOOTHING:
            col_in = (cols < n_cols)[None, :]
            wv = class_weights(weight_ptr, cols, n_cols, HAS_WEIGHT)
            sum_wz += tl.sum(tl.where(col_in, wv[None, :] * z, 0.0), axis=1)
            sum_w += tl.sum(wv, axis=0)
    tl.store(max_ptr + rows, m, mask=row_in)
    out = stats_ptr + rows * stride_stats
    tl.store(out + STAT_SUM, d, mask=row_in)
    tl.store(out + STAT_OTHER, other, mask=row_in)
    tl.store(out + STAT_ZT, z_t, mask=row_in)
    if HAS_WEIGHT:
        tl.store(out + STAT_WT, w_t, mask=row_in)
        smooth = out + STAT_WT + 1
    else:
        smooth = out + STAT_ZT + 1
    if HAS_SMOOTHING:
        tl.store(smooth, sum_wz, mask=row_in)
        tl.store(smooth + 1, sum_w, mask=row_in)
