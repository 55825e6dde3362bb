"""Vocab-parallel softmax cross-entropy: the two per-shard kernels around the all-reduces.

Each rank holds the logits of classes [start, start + n_cols) of a V-class problem. Its
share of every row sum the loss needs is computed locally (stats kernel), the shares are
combined by two all-reduces on the host (MAX of the row maximum, SUM of the packed
statistics), and the loss and this shard's gradient follow from the combined numbers (loss
kernel). The math is kernels/cross_entropy.py's with lse, z_t, w_t and the smoothing sums
taken over all V classes; every device helper that touches a block of logits is shared
with that kernel. Accumulation is float32 for every logits dtype (the helpers' ACC_FP64 is
False here: float64 logits are not yet computed in float64 as cross_entropy does).

Packed statistics, float32, one row of N_STATS per row of logits (the SUM all-reduce):
  class index t:  0: sum_{j != t} e^(z_j - m)  (the target's own term is left out so that the
                     gradient keeps the confident-row accuracy of cross_entropy; the host
                     rescales it to the global maximum before the SUM)
                  1: z_t on the rank that owns t, 0 elsewhere
                  2: w_t on the owner (HAS_WEIGHT only)
                  next two (HAS_SMOOTHING only): sum_j w_j z_j, sum_j w_j
  probabilities:  0: sum_j e^(z_j - m),  1: sum_j w_j p'_j z_j,  2: sum_j w_j p'_j
m is the shard's own row maximum, written separately for the MAX all-reduce.
"""
import triton
import triton.language as tl

from .cross_entropy import block_terms, load_logits, row_loss, store_grad_block
from .softmax import LOG2E, online_step


@triton.jit
def target_column(t, ignore_index, col_start, n_cols, n_classes):
    """For class index t (int64, global; a scalar or a vector of rows): whether it counts,
    whether it is out of [0, n_classes) while counting (bad), and t_local: its column among
    the n_cols classes from col_start, or -1 when they do not hold it, the row is ignored or
    t is bad (-1 matches no column, so no lane is ever addressed by an unchecked index)."""
    valid = t != ignore_index
    bad = valid & ((t < 0) | (t >= n_classes))
    t_local = t - col_start
    owned = valid & (~bad) & (t_local >= 0) & (t_local < n_cols)
    return valid, bad, tl.where(owned, t_local, -1)


@triton.jit
def class_index_sums(stats_row, m, valid, bad, mask, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr):
    """A row's terms from its merged class-index statistics at stats_row (a row, or a vector
    of rows read where mask; m its global maximum): (the sum without the target, the full sum
    D = that + e^(z_t - m) when the row counts, z_t, w_t (1 or 0 without weights), the smoothing
    sums w z and w (0 without smoothing)). The target's own term is recomputed here, the same
    on every rank and in every tile, rather than summed."""
    other = tl.load(stats_row, mask=mask, other=1.0)
    z_t = tl.load(stats_row + 1, mask=mask, other=0.0)
    d = other + tl.where(valid & (~bad), tl.exp2((z_t - m) * LOG2E), 0.0)
    if HAS_WEIGHT:
        w_t = tl.load(stats_row + 2, mask=mask, other=0.0)
    else:
        w_t = tl.where(valid, 1.0, 0.0)
    sum_wz = 0.0
    sum_w = 0.0
    if HAS_SMOOTHING:
        sum_wz = tl.load(stats_row + 2 + HAS_WEIGHT, mask=mask, other=0.0)
        sum_w = tl.load(stats_row + 3 + HAS_WEIGHT, mask=mask, other=0.0)
    return other, d, z_t, w_t, sum_wz, sum_w


@triton.jit
def owned_target(target_ptr, row, target_row_stride, ignore_index, col_start, n_cols, n_classes):
    """The row's class index t (global) and target_column's (valid, bad, t_local) for this shard."""
    t = tl.load(target_ptr + row * target_row_stride).to(tl.int64)
    valid, bad, t_local = target_column(t, ignore_index, col_start, n_cols, n_classes)
    return t, valid, bad, t_local


@triton.jit
def vocab_parallel_stats_kernel(
    logits_ptr,
    target_ptr,
    weight_ptr,
    max_ptr,
    stats_ptr,
    logits_row_stride,
    target_row_stride,
    n_cols,
    n_classes,
    col_start,
    ignore_index,
    label_smoothing,
    softcap,
    SOFT_TARGET: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    N_STATS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """This shard's share of row r = program_id(0)'s sums (see the module docstring).

    logits_ptr: (n_rows, n_cols) shard of the logits, column stride 1, row stride logits_row_stride.
    target_ptr: global class index per row (stride target_row_stride), or with SOFT_TARGET
        this shard's (n_rows, n_cols) probabilities (row stride target_row_stride).
    weight_ptr: (n_cols,) this shard's class weights, read only when HAS_WEIGHT.
    max_ptr: (n_rows,) float32, the shard's row maximum of the (soft-capped) logits
        (-inf for an empty shard or one that is -inf everywhere; NaN if the row holds a NaN).
    stats_ptr: (n_rows, N_STATS) float32, contiguous.
    n_classes, col_start: the global class count V and this shard's first class.
    One read of the shard: the program streams it in BLOCK_N-wide blocks with a per-lane
    online (max, sum) (Milakov & Gimelshein, 2018), whatever the width, so there is one path.
    """
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * logits_row_stride
    target_row = target_ptr + row * target_row_stride  # used only for probability targets
    cols = tl.arange(0, BLOCK_N)
    inv_classes = 1.0 / n_classes  # smoothing spreads eps over all V classes, not this shard's

    # 1. Which column of this shard, if any, holds the row's target.
    t_local = -1
    if not SOFT_TARGET:
        _t, _valid, _bad, t_local = owned_target(
            target_ptr, row, target_row_stride, ignore_index, col_start, n_cols, n_classes)

    # 2. One read of the shard: per-lane running (max, sum), the sum without the target, and
    #    the linear terms (z_t, w z, w) of block_terms.
    m_lane = tl.zeros([BLOCK_N], tl.float32) - float("inf")
    d_lane = tl.zeros([BLOCK_N], tl.float32)
    zt_lane = tl.zeros([BLOCK_N], tl.float32)
    wz_lane = tl.zeros([BLOCK_N], tl.float32)
    w_lane = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        zb, zt_b, wz_b, w_b = block_terms(
            logits_row + start + cols, target_row + start + cols, weight_ptr, start + cols, cols < n_cols - start,
            t_local, label_smoothing, inv_classes, softcap, SOFT_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, False)
        m_lane, alpha, p = online_step(m_lane, zb)
        # The target's lane is left out of the index-target sum (column 0, see the docstring).
        d_lane = d_lane * alpha + tl.where(cols + start == t_local, 0.0, p)
        zt_lane += zt_b
        wz_lane += wz_b
        w_lane += w_b
    m = tl.max(m_lane, axis=0)
    # Lanes that saw only -inf hold d = 0 and contribute 0. Unlike a whole row, a shard that is
    # -inf everywhere (masked vocabulary padding) is fine: it gives m = -inf and a sum of 0.
    lane_scale = tl.where(m_lane == -float("inf"), 0.0, tl.exp2((m_lane - m) * LOG2E))
    d = tl.sum(d_lane * lane_scale, axis=0)

    # 3. The packed row.
    stats_row = stats_ptr + row * N_STATS
    tl.store(max_ptr + row, m)
    tl.store(stats_row, d)
    if SOFT_TARGET:
        tl.store(stats_row + 1, tl.sum(wz_lane, axis=0))
        tl.store(stats_row + 2, tl.sum(w_lane, axis=0))
    else:
        tl.store(stats_row + 1, tl.sum(zt_lane, axis=0))
        if HAS_WEIGHT:
            w_t = tl.load(weight_ptr + t_local, mask=t_local >= 0, other=0.0).to(tl.float32)
            tl.store(stats_row + 2, w_t)
        if HAS_SMOOTHING:
            tl.store(stats_row + 2 + HAS_WEIGHT, tl.sum(wz_lane, axis=0))
            tl.store(stats_row + 3 + HAS_WEIGHT, tl.sum(w_lane, axis=0))


@triton.jit
def vocab_parallel_loss_kernel(
    logits_ptr,
    target_ptr,
    weight_ptr,
    max_ptr,
    stats_ptr,
    loss_ptr,
    lse_ptr,
    grad_ptr,
    grad_divisor_ptr,
    upstream_ptr,
    logits_row_stride,
    target_row_stride,
    grad_row_stride,
    upstream_stride,
    n_cols,
    n_classes,
    col_start,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    SOFT_TARGET: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    DIVIDE_GRAD: tl.constexpr,
    HAS_UPSTREAM: tl.constexpr,
    N_STATS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Loss and lse of row r = program_id(0) from the all-reduced statistics and, when
    COMPUTE_GRAD, d loss / d logits for this shard's columns.

    max_ptr: (n_rows,) the global row maximum M (MAX over the ranks' max_ptr of the stats kernel).
    stats_ptr: (n_rows, N_STATS) the SUM over the ranks of the stats kernel's rows, column 0
        rescaled to M by the host. With class indices the full sum is recovered as
        D = column 0 + e^(z_t - M) (when some rank owns t), so lse = M + log D.
    loss_ptr, lse_ptr: (n_rows,) float32; identical on every rank (same inputs, same program).
    grad_ptr: (n_rows, n_cols) gradient rows (row stride grad_row_stride), written when COMPUTE_GRAD.
    grad_divisor_ptr: float32 device scalar dividing the gradient (reduction="mean"), read
        only when DIVIDE_GRAD.
    upstream_ptr: float32 upstream gradient, upstream_ptr[row * upstream_stride] (stride 0: a
        scalar), read only when HAS_UPSTREAM (a gradient formed in the backward): the factor
        is applied before the one rounding to the logits' dtype, so float16 gradients under
        loss scaling keep the entries torch keeps.
    Other pointers, strides and options as in vocab_parallel_stats_kernel; a class index
    outside [0, n_classes) that is not ignore_index gives a NaN loss and gradient row.
    Bytes: O(1) per row for the loss; 1 read + 1 write of the shard's row with COMPUTE_GRAD.
    """
    row = tl.program_id(0).to(tl.int64)
    target_row = target_ptr + row * target_row_stride
    stats_row = stats_ptr + row * N_STATS
    inv_classes = 1.0 / n_classes
    m = tl.load(max_ptr + row)

    # 1. The target and the row's global sums.
    if SOFT_TARGET:
        t_local = -1
        valid = True
        bad = False
        w_t = 1.0
        z_t = 0.0  # (unused with probability targets)
        other = 0.0
        d = tl.load(stats_row)
        sum_wz = tl.load(stats_row + 1)
        sum_w = tl.load(stats_row + 2)
    else:
        t, valid, bad, t_local = owned_target(
            target_ptr, row, target_row_stride, ignore_index, col_start, n_cols, n_classes)
        other, d, z_t, w_t, sum_wz, sum_w = class_index_sums(stats_row, m, valid, bad, True, HAS_WEIGHT,
                                                             HAS_SMOOTHING)  # fmt: skip
    log_d = tl.log(d)
    lse = m + log_d

    # 2. The loss of the row, as in cross_entropy_kernel.
    loss, coef = row_loss(m, log_d, z_t, w_t, sum_w, sum_wz, valid, label_smoothing, inv_classes, z_loss,
                          SOFT_TARGET, HAS_SMOOTHING, HAS_Z_LOSS)
    tl.store(loss_ptr + row, tl.where(bad, float("nan"), loss))
    tl.store(lse_ptr + row, lse)

    # 3. This shard's gradient: q_j = e^(z_j - M) / D needs no further communication.
    if COMPUTE_GRAD:
        scale = 1.0
        if DIVIDE_GRAD:
            scale = 1.0 / tl.load(grad_divisor_ptr)
        if HAS_UPSTREAM:
            scale *= tl.load(upstream_ptr + row * upstream_stride)
        logits_row = logits_ptr + row * logits_row_stride
        grad_row = grad_ptr + row * grad_row_stride
        cols = tl.arange(0, BLOCK_N)
        # The shard's columns are numbered from 0, and t_local = -1 when another rank owns t.
        for start in range(0, n_cols, BLOCK_N):
            mask = cols < n_cols - start
            zb = load_logits(logits_row + start + cols, mask, softcap, HAS_SOFTCAP, False)
            store_grad_block(
                grad_row + start + cols, target_row + start + cols, weight_ptr, start + cols, mask, zb, m, 1.0 / d,
                other / d, coef, scale, t_local, w_t, valid, bad, label_smoothing, inv_classes, softcap,
                SOFT_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, False)
