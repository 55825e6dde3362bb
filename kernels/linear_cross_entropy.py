"""Fused linear + cross-entropy: the loss of z = x W^T + b without ever storing z.

The logits of a language-model head, N tokens x V classes, are the largest tensors of a
training step. Here they exist only as [BLOCK_M rows x BLOCK_V classes] tiles in registers,
each the tl.dot of an input tile and a weight tile summed over the hidden dim H:

  forward       one program per row tile walks the vocabulary tile by tile, keeping the
                online (max, sum) of every row (Milakov & Gimelshein, 2018), the target
                logit and the option terms; it writes the loss, lse and four floats a row
                for the backward. Nothing of size N x V is written.
  backward dX   one program per row tile recomputes the logit tiles of its rows, forms
                dloss/dz and accumulates dX[rows] += G W[cols] over the vocabulary.
  backward dW   one program per vocabulary tile recomputes the logit tiles of its classes,
                forms the same dloss/dz and accumulates dW[cols] += G^T X[rows] and
                db[cols] += sum_rows G over the batch.

Each gradient element has one owner program that adds its terms in a fixed order, so the
results are bitwise reproducible with no atomics. The price is that the logits are
computed three times (forward and each backward kernel): 5 matmul-sized products in all,
against 4 for a scheme that accumulates dX or dW with atomics.

dloss/dz is the one of kernels/cross_entropy.py (its docstring gives the formulas), written
per tile: q_j = e^(z_j - m) / d from the row's maximum m and sum d, the target's
q_t * coef - c_t as q_t (coef - c_t) - c_t * (1 - q_t) with 1 - q_t summed over the other
classes (so a confident row keeps its true-class gradient), and the soft cap's chain rule
1 - (z / s)^2.
"""
import triton
import triton.language as tl

from .cross_entropy import row_loss, soft_cap
from .softmax import LOG2E

# Rows of the per-row statistics the forward saves for the backward (a (4, N) float32 tensor).
STAT_MAX = tl.constexpr(0)  # m, the row's largest logit
STAT_INV_SUM = tl.constexpr(1)  # 1 / d, d = sum_j e^(z_j - m)
STAT_OTHER = tl.constexpr(2)  # sum_{j != t} e^(z_j - m) / d = 1 - q_t, for class-index targets
STAT_COEF = tl.constexpr(3)  # coef: dloss/dz_j = q_j coef - (the target's terms)
N_STATS = 4


@triton.jit
def logits_tile(
    x_ptr, w_ptr, b_ptr, rows, cols, n_rows, n_cols, hidden,
    stride_xm, stride_xk, stride_wv, stride_wk, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """softcap(x[rows] @ w[cols]^T + b[cols]) as a float32 [BLOCK_M, BLOCK_V] tile, summed over
    the hidden dim BLOCK_K at a time; -inf in the columns past the vocabulary.

    Rows past the batch read zeros (their logits are the bias): the callers mask them out."""
    ks = tl.arange(0, BLOCK_K)
    row_in = rows < n_rows
    col_in = cols < n_cols
    x_ptrs = x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk
    wt_ptrs = w_ptr + cols[None, :] * stride_wv + ks[:, None] * stride_wk  # the [BLOCK_K, BLOCK_V] tile of W^T
    acc = tl.zeros((BLOCK_M, BLOCK_V), tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_in = ks < hidden - k0
        x = tl.load(x_ptrs, mask=row_in[:, None] & k_in[None, :], other=0.0)
        wt = tl.load(wt_ptrs, mask=k_in[:, None] & col_in[None, :], other=0.0)
        acc = tl.dot(x, wt, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        wt_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_in[None, :], soft_cap(acc, softcap, HAS_SOFTCAP), -float("inf"))


@triton.jit
def class_weights(weight_ptr, cols, n_cols, HAS_WEIGHT: tl.constexpr):
    """Class weights of a vocabulary tile (1.0 without weights); 0 past the vocabulary."""
    col_in = cols < n_cols
    if HAS_WEIGHT:
        return tl.load(weight_ptr + cols, mask=col_in, other=0.0).to(tl.float32)
    else:
        return tl.where(col_in, 1.0, 0.0)


@triton.jit
def soft_target_tile(target_ptr, rows, cols, n_rows, n_cols, stride_tm, stride_tv, label_smoothing, inv_classes,
                     HAS_SMOOTHING: tl.constexpr):
    """Smoothed probability targets p' = (1 - eps) p + eps / C of a tile; 0 outside the matrix."""
    inside = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    p = tl.load(target_ptr + rows[:, None] * stride_tm + cols[None, :] * stride_tv, mask=inside, other=0.0)
    p = p.to(tl.float32)
    if HAS_SMOOTHING:
        p = tl.where(inside, (1.0 - label_smoothing) * p + label_smoothing * inv_classes, 0.0)
    return p


@triton.jit
def row_targets(target_ptr, weight_ptr, rows, n_rows, n_cols, stride_t, ignore_index,
                SOFT_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """Per row of the tile: class index t (-1 for probability targets), whether it counts
    (valid), whether it is an out-of-range index (bad: NaN loss and gradient, never an
    address), and its class weight w_t (0 when not valid, 1 for probability targets)."""
    row_in = rows < n_rows
    if SOFT_TARGET:
        t = tl.full(rows.shape, -1, tl.int64)
        valid = row_in
        bad = rows < 0  # all false
        w_t = tl.where(row_in, 1.0, 0.0)
    else:
        t = tl.load(target_ptr + rows * stride_t, mask=row_in, other=ignore_index).to(tl.int64)
        valid = row_in & (t != ignore_index)
        in_range = (t >= 0) & (t < n_cols)
        bad = valid & (~in_range)
        if HAS_WEIGHT:
            w_t = tl.load(weight_ptr + t, mask=valid & in_range, other=0.0).to(tl.float32)
        else:
            w_t = tl.where(valid, 1.0, 0.0)
    return t, valid, bad, w_t


@triton.jit
def shard_row_targets(target_ptr, weight_ptr, rows, n_rows, n_cols, stride_t, ignore_index, col_start, n_classes,
                      HAS_WEIGHT: tl.constexpr):
    """row_targets for a shard holding global classes [col_start, col_start + n_cols) of
    n_classes: t in the shard's own coordinates (-1 when the target lies in another shard, so
    it matches none of this shard's columns), valid and bad judged against all n_classes, and
    w_t the target's weight where this shard holds it (0 elsewhere; the gradient reads w_t
    only in the target's column)."""
    row_in = rows < n_rows
    t = tl.load(target_ptr + rows * stride_t, mask=row_in, other=ignore_index).to(tl.int64)
    valid = row_in & (t != ignore_index)
    bad = valid & ((t < 0) | (t >= n_classes))
    t_local = t - col_start
    mine = valid & (t_local >= 0) & (t_local < n_cols)
    if HAS_WEIGHT:
        w_t = tl.load(weight_ptr + t_local, mask=mine, other=0.0).to(tl.float32)
    else:
        w_t = tl.where(mine, 1.0, 0.0)
    return tl.where(mine, t_local, -1), valid, bad, w_t


@triton.jit
def grad_logits_tile(
    z, rows, cols, n_rows, n_cols, t, valid, bad, w_t, m, inv_d, other_d, coef, scale,
    target_ptr, weight_ptr, stride_tm, stride_tv, label_smoothing, inv_classes, softcap,
    SOFT_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    """d loss / d (x W^T + b) for a tile, float32, times the row's scale; exactly 0 outside the
    batch and the vocabulary, so padding never reaches dX, dW or db.

    q_j = e^(z_j - m) / d from the saved maximum and sum (not e^(z_j - lse): lse rounded to
    float32 would cost |lse| * 6e-8 relative in q). For the target class, q_t coef - c_t with
    c_t = (1 - eps) w_t is q_t (coef - c_t) - c_t (1 - q_t), 1 - q_t being the saved sum of the
    other classes' probabilities: q_t - 1 itself rounds to 0 once q_t > 1 - 6e-8."""
    q = tl.exp2((z - m[:, None]) * LOG2E) * inv_d[:, None]
    if SOFT_TARGET:
        p = soft_target_tile(target_ptr, rows, cols, n_rows, n_cols, stride_tm, stride_tv, label_smoothing,
                             inv_classes, HAS_SMOOTHING)
        g = q * coef[:, None] - p * class_weights(weight_ptr, cols, n_cols, HAS_WEIGHT)[None, :]
    else:
        c_t = (1.0 - label_smoothing) * w_t
        is_t = cols[None, :] == t[:, None]
        g = tl.where(is_t, q * (coef - c_t)[:, None] - (c_t * other_d)[:, None], q * coef[:, None])
        if HAS_SMOOTHING:
            g -= label_smoothing * inv_classes * class_weights(weight_ptr, cols, n_cols, HAS_WEIGHT)[None, :]
    if HAS_SOFTCAP:
        g *= 1.0 - (z / softcap) * (z / softcap)
    # Ignored rows get 0, except where g is NaN (a NaN logit in the row): torch's gradient
    # there is 0 * NaN = NaN too, though the row's loss is 0.
    g = tl.where(valid[:, None], g * scale[:, None], tl.where(g == g, 0.0, g))
    g = tl.where(bad[:, None], float("nan"), g)
    inside = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    return tl.where(inside, g, 0.0)


@triton.jit
def tile_counts(g, grad_skip_threshold, SKIP_SMALL: tl.constexpr):
    """Whether a gradient tile is accumulated: always without SKIP_SMALL, else when some |g|
    reaches grad_skip_threshold or some g is NaN (a NaN is never dropped)."""
    if SKIP_SMALL:
        return tl.max(tl.max(tl.where(g == g, tl.abs(g), float("inf")), axis=1), axis=0) >= grad_skip_threshold
    else:
        return True


@triton.jit
def linear_cross_entropy_fwd_kernel(
    x_ptr, w_ptr, b_ptr, target_ptr, weight_ptr, loss_ptr, lse_ptr, stats_ptr,
    n_rows, n_cols, hidden,
    stride_xm, stride_xk, stride_wv, stride_wk, stride_tm, stride_tv, stride_stats,
    ignore_index, label_smoothing, z_loss, softcap,
    SOFT_TARGET: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, COMPUTE_STATS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Loss and lse of rows [pid * BLOCK_M, +BLOCK_M) and, with COMPUTE_STATS, what the backward needs.

    x_ptr: (n_rows, hidden) input, strides stride_xm / stride_xk.
    w_ptr: (n_cols, hidden) linear weight, strides stride_wv / stride_wk; b_ptr: (n_cols,) bias,
        read only with HAS_BIAS.
    target_ptr: class index per row (stride stride_tm), or with SOFT_TARGET an
        (n_rows, n_cols) probability matrix (strides stride_tm / stride_tv).
    weight_ptr: (n_cols,) class weights, read only with HAS_WEIGHT.
    loss_ptr, lse_ptr: (n_rows,) float32. stats_ptr: (4, n_rows) float32, row stride
        stride_stats (STAT_* above), written only with COMPUTE_STATS.
    ignore_index: rows whose target equals it get loss 0; a class index outside
        [0, n_cols) that is not ignore_index is never an address and gives a NaN loss.
    Reads: the input tile once per vocabulary tile and the weight once per row tile.
    """
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < n_rows
    inv_classes = 1.0 / n_cols

    # 1. The targets of the tile's rows.
    t, valid, bad, w_t = row_targets(target_ptr, weight_ptr, rows, n_rows, n_cols, stride_tm, ignore_index,
                                     SOFT_TARGET, HAS_WEIGHT)

    # 2. One walk over the vocabulary: online (max, sum) per row, and the loss's linear terms.
    m = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    d = tl.zeros((BLOCK_M,), tl.float32)
    other = tl.zeros((BLOCK_M,), tl.float32)  # the sum without the target class
    z_t = tl.zeros((BLOCK_M,), tl.float32)
    sum_wz = tl.zeros((BLOCK_M,), tl.float32)  # sum_j w_j z_j, or sum_j w_j p'_j z_j
    sum_w = tl.zeros((BLOCK_M,), tl.float32)  # sum_j w_j, or sum_j w_j p'_j
    for v0 in range(0, n_cols, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)  # int64: cols * stride_wv may pass 2**31
        z = logits_tile(x_ptr, w_ptr, b_ptr, rows, cols, n_rows, n_cols, hidden,
                        stride_xm, stride_xk, stride_wv, stride_wk, softcap,
                        HAS_BIAS, HAS_SOFTCAP, BLOCK_M, BLOCK_V, BLOCK_K, INPUT_PRECISION)
        # The maximum propagates NaN, so a NaN logit turns its whole row NaN, as in torch.
        m_new = tl.maximum(m, tl.max(z, axis=1), propagate_nan=tl.PropagateNan.ALL)
        seen = m_new != -float("inf")
        alpha = tl.where(seen, tl.exp2((m - m_new) * LOG2E), 0.0)
        p = tl.where(seen[:, None], tl.exp2((z - m_new[:, None]) * LOG2E), 0.0)
        d = d * alpha + tl.sum(p, axis=1)
        m = m_new
        is_t = cols[None, :] == t[:, None]
        if COMPUTE_STATS:
            if not SOFT_TARGET:
                other = other * alpha + tl.sum(tl.where(is_t, 0.0, p), axis=1)
        col_in = (cols < n_cols)[None, :]
        if SOFT_TARGET:
            wp = soft_target_tile(target_ptr, rows, cols, n_rows, n_cols, stride_tm, stride_tv, label_smoothing,
                                  inv_classes, HAS_SMOOTHING)
            wp *= class_weights(weight_ptr, cols, n_cols, HAS_WEIGHT)[None, :]
            sum_wz += tl.sum(tl.where(col_in, wp * z, 0.0), axis=1)
            sum_w += tl.sum(wp, axis=1)
        else:
            z_t += tl.sum(tl.where(is_t, z, 0.0), axis=1)
            if HAS_SMOOTHING:
                wv = class_weights(weight_ptr, cols, n_cols, HAS_WEIGHT)
                sum_wz += tl.sum(tl.where(col_in, wv[None, :] * z, 0.0), axis=1)
                sum_w += tl.sum(wv, axis=0)
    log_d = tl.log(d)
    lse = m + log_d

    # 3. The loss of each row (float32 whatever the input dtype), and coef of its gradient.
    loss, coef = row_loss(m, log_d, z_t, w_t, sum_w, sum_wz, valid, label_smoothing, inv_classes, z_loss,
                          SOFT_TARGET, HAS_SMOOTHING, HAS_Z_LOSS)
    tl.store(loss_ptr + rows, tl.where(bad, float("nan"), loss), mask=row_in)
    tl.store(lse_ptr + rows, lse, mask=row_in)
    if COMPUTE_STATS:
        stats = stats_ptr + rows
        tl.store(stats + STAT_MAX * stride_stats, m, mask=row_in)
        tl.store(stats + STAT_INV_SUM * stride_stats, 1.0 / d, mask=row_in)
        tl.store(stats + STAT_OTHER * stride_stats, other / d, mask=row_in)
        tl.store(stats + STAT_COEF * stride_stats, coef, mask=row_in)


@triton.jit
def row_state(stats_ptr, upstream_ptr, divisor_ptr, rows, n_rows, stride_stats, stride_up, DIVIDE: tl.constexpr):
    """The saved statistics of the tile's rows and their gradient scale: upstream / divisor."""
    row_in = rows < n_rows
    stats = stats_ptr + rows
    m = tl.load(stats + STAT_MAX * stride_stats, mask=row_in, other=0.0)
    inv_d = tl.load(stats + STAT_INV_SUM * stride_stats, mask=row_in, other=0.0)
    other_d = tl.load(stats + STAT_OTHER * stride_stats, mask=row_in, other=0.0)
    coef = tl.load(stats + STAT_COEF * stride_stats, mask=row_in, other=0.0)
    scale = tl.load(upstream_ptr + rows * stride_up, mask=row_in, other=0.0).to(tl.float32)
    if DIVIDE:
        scale = scale / tl.load(divisor_ptr)
    return m, inv_d, other_d, coef, scale


@triton.jit
def linear_cross_entropy_bwd_input_kernel(
    x_ptr, w_ptr, b_ptr, target_ptr, weight_ptr, stats_ptr, upstream_ptr, divisor_ptr, dx_ptr,
    n_rows, n_cols, hidden,
    stride_xm, stride_xk, stride_wv, stride_wk, stride_tm, stride_tv, stride_stats, stride_up, stride_dxm,
    ignore_index, label_smoothing, softcap, col_start, n_classes, grad_skip_threshold,
    SOFT_TARGET: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, DIVIDE: tl.constexpr, SHARDED: tl.constexpr, SKIP_SMALL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dx[rows] = sum over vocabulary tiles of G W[cols], for rows [pid * BLOCK_M, +BLOCK_M).

    Pointers and strides as in the forward kernel, plus stats_ptr (the forward's (4, n_rows)
    statistics), upstream_ptr (the loss's upstream gradient: stride_up 0 for a scalar, 1 for
    one per row), divisor_ptr (float32 scalar dividing it, read only with DIVIDE: the mean's
    total weight) and dx_ptr: (n_rows, hidden) float32, row stride stride_dxm, column stride
    1, accumulated in place tile by tile (read back from the second vocabulary tile on), so
    it needs no zeroing. G is rounded to the input's dtype for the product, as torch's
    unfused backward rounds the logits' gradient.
    SHARDED (class-index targets only): w_ptr, b_ptr and weight_ptr hold global classes
    [col_start, col_start + n_cols) of n_classes, the targets are global indices and the
    stats are the full problem's (see shard_row_targets); dx is then this shard's part of the
    input gradient. Without SHARDED, col_start and n_classes are not read.
    SKIP_SMALL: a [rows x classes] tile whose every |G| (scaled, float32, before the cast) is
    below grad_skip_threshold adds nothing (its product with W is skipped; the logits are
    still recomputed). A tile holding a NaN is never skipped. Without SKIP_SMALL,
    grad_skip_threshold is not read.
    """
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < n_rows
    ks = tl.arange(0, BLOCK_K)
    if SHARDED:
        inv_classes = 1.0 / n_classes
        t, valid, bad, w_t = shard_row_targets(target_ptr, weight_ptr, rows, n_rows, n_cols, stride_tm, ignore_index,
                                               col_start, n_classes, HAS_WEIGHT)
    else:
        inv_classes = 1.0 / n_cols
        t, valid, bad, w_t = row_targets(target_ptr, weight_ptr, rows, n_rows, n_cols, stride_tm, ignore_index,
                                         SOFT_TARGET, HAS_WEIGHT)
    m, inv_d, other_d, coef, scale = row_state(stats_ptr, upstream_ptr, divisor_ptr, rows, n_rows, stride_stats,
                                               stride_up, DIVIDE)
    started = pid * 0  # int: whether dx[rows] holds a first term (from the first vocabulary tile kept)
    for v0 in range(0, n_cols, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)  # int64: cols * stride_wv may pass 2**31
        col_in = cols < n_cols
        z = logits_tile(x_ptr, w_ptr, b_ptr, rows, cols, n_rows, n_cols, hidden,
                        stride_xm, stride_xk, stride_wv, stride_wk, softcap,
                        HAS_BIAS, HAS_SOFTCAP, BLOCK_M, BLOCK_V, BLOCK_K, INPUT_PRECISION)
        g = grad_logits_tile(z, rows, cols, n_rows, n_cols, t, valid, bad, w_t, m, inv_d, other_d, coef, scale,
                             target_ptr, weight_ptr, stride_tm, stride_tv, label_smoothing, inv_classes, softcap,
                             SOFT_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP)
        if tile_counts(g, grad_skip_threshold, SKIP_SMALL):
            # (a new name: triton 3.6 rejects a value whose type changes inside an `if`)
            g_in = g.to(w_ptr.dtype.element_ty)
            w_ptrs = w_ptr + cols[:, None] * stride_wv + ks[None, :] * stride_wk
            if SKIP_SMALL:
                has_dx = (ks * 0 + started)[None, :] > 0  # a term to add to (a tile: the interpreter masks with no scalar)
            else:
                has_dx = v0 > 0
            dx_ptrs = dx_ptr + rows[:, None] * stride_dxm + ks[None, :]
            for k0 in range(0, hidden, BLOCK_K):
                k_in = ks < hidden - k0
                w = tl.load(w_ptrs, mask=col_in[:, None] & k_in[None, :], other=0.0)
                dx_mask = row_in[:, None] & k_in[None, :]
                dx = tl.load(dx_ptrs, mask=dx_mask & has_dx, other=0.0)
                dx = tl.dot(g_in, w, dx, input_precision=INPUT_PRECISION)
                tl.store(dx_ptrs, dx, mask=dx_mask)
                w_ptrs += BLOCK_K * stride_wk
                dx_ptrs += BLOCK_K
            started = pid * 0 + 1
    if SKIP_SMALL:
        if started == 0:  # every tile skipped: dx[rows] = 0
            dx_ptrs = dx_ptr + rows[:, None] * stride_dxm + ks[None, :]
            for k0 in range(0, hidden, BLOCK_K):
                tl.store(dx_ptrs, tl.zeros((BLOCK_M, BLOCK_K), tl.float32),
                         mask=row_in[:, None] & (ks < hidden - k0)[None, :])
                dx_ptrs += BLOCK_K


@triton.jit
def linear_cross_entropy_bwd_weight_kernel(
    x_ptr, w_ptr, b_ptr, target_ptr, weight_ptr, stats_ptr, upstream_ptr, divisor_ptr, dw_ptr, db_ptr,
    n_rows, n_cols, hidden,
    stride_xm, stride_xk, stride_wv, stride_wk, stride_tm, stride_tv, stride_stats, stride_up, stride_dwv,
    ignore_index, label_smoothing, softcap, col_start, n_classes, grad_skip_threshold,
    SOFT_TARGET: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, DIVIDE: tl.constexpr, SHARDED: tl.constexpr, SKIP_SMALL: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dw[cols] = sum over row tiles of G^T X[rows] (COMPUTE_DW) and db[cols] = sum of G over the
    rows (COMPUTE_DB), for classes [pid * BLOCK_V, +BLOCK_V).

    Arguments as in the input-gradient kernel; dw_ptr: (n_cols, hidden) float32, row stride
    stride_dwv, column stride 1, accumulated in place (read back from the second row tile on);
    db_ptr: (n_cols,) float32. The batch must have at least one row (the launcher returns
    zeros for an empty one). SKIP_SMALL and grad_skip_threshold as in the input-gradient
    kernel: a skipped tile adds to neither dw nor db.
    """
    pid = tl.program_id(0).to(tl.int64)
    cols = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    col_in = cols < n_cols
    ks = tl.arange(0, BLOCK_K)
    if SHARDED:
        inv_classes = 1.0 / n_classes
    else:
        inv_classes = 1.0 / n_cols
    db = tl.zeros((BLOCK_V,), tl.float32)
    started = pid * 0  # int: whether dw[cols] holds a first term (from the first row tile kept)
    for r0 in range(0, n_rows, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M).to(tl.int64)
        row_in = rows < n_rows
        if SHARDED:
            t, valid, bad, w_t = shard_row_targets(target_ptr, weight_ptr, rows, n_rows, n_cols, stride_tm,
                                                   ignore_index, col_start, n_classes, HAS_WEIGHT)
        else:
            t, valid, bad, w_t = row_targets(target_ptr, weight_ptr, rows, n_rows, n_cols, stride_tm, ignore_index,
                                             SOFT_TARGET, HAS_WEIGHT)
        m, inv_d, other_d, coef, scale = row_state(stats_ptr, upstream_ptr, divisor_ptr, rows, n_rows, stride_stats,
                                                   stride_up, DIVIDE)
        z = logits_tile(x_ptr, w_ptr, b_ptr, rows, cols, n_rows, n_cols, hidden,
                        stride_xm, stride_xk, stride_wv, stride_wk, softcap,
                        HAS_BIAS, HAS_SOFTCAP, BLOCK_M, BLOCK_V, BLOCK_K, INPUT_PRECISION)
        g = grad_logits_tile(z, rows, cols, n_rows, n_cols, t, valid, bad, w_t, m, inv_d, other_d, coef, scale,
                             target_ptr, weight_ptr, stride_tm, stride_tv, label_smoothing, inv_classes, softcap,
                             SOFT_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP)
        if tile_counts(g, grad_skip_threshold, SKIP_SMALL):
            if COMPUTE_DB:
                db += tl.sum(g, axis=0)
            if COMPUTE_DW:
                gt = tl.trans(g.to(x_ptr.dtype.element_ty))
                x_ptrs = x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk
                if SKIP_SMALL:
                    has_dw = (ks * 0 + started)[None, :] > 0  # a term to add to (a tile: the interpreter masks with no scalar)
                else:
                    has_dw = r0 > 0
                dw_ptrs = dw_ptr + cols[:, None] * stride_dwv + ks[None, :]
                for k0 in range(0, hidden, BLOCK_K):
                    k_in = ks < hidden - k0
                    x = tl.load(x_ptrs, mask=row_in[:, None] & k_in[None, :], other=0.0)
                    dw_mask = col_in[:, None] & k_in[None, :]
                    dw = tl.load(dw_ptrs, mask=dw_mask & has_dw, other=0.0)
                    dw = tl.dot(gt, x, dw, input_precision=INPUT_PRECISION)
                    tl.store(dw_ptrs, dw, mask=dw_mask)
                    x_ptrs += BLOCK_K * stride_xk
                    dw_ptrs += BLOCK_K
            started = pid * 0 + 1
    if COMPUTE_DW and SKIP_SMALL:
        if started == 0:  # every tile skipped: dw[cols] = 0
            dw_ptrs = dw_ptr + cols[:, None] * stride_dwv + ks[None, :]
            for k0 in range(0, hidden, BLOCK_K):
                tl.store(dw_ptrs, tl.zeros((BLOCK_V, BLOCK_K), tl.float32),
                         mask=col_in[:, None] & (ks < hidden - k0)[None, :])
                dw_ptrs += BLOCK_K
    if COMPUTE_DB:
        tl.store(db_ptr + cols, db, mask=col_in)
