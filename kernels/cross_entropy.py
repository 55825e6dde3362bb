"""Fused softmax cross-entropy: loss, lse and the gradient in one pass over the logits.

For row r with logits x (optionally soft-capped: z = s * tanh(x / s)), lse = log sum_j e^(z_j),
q = softmax(z), class weights w (1 without weights), smoothing eps, C classes, z-loss lam:

  class index t:  loss = (1 - eps) w_t (lse - z_t) + (eps / C) sum_j w_j (lse - z_j) + lam w_t lse^2
                  dloss/dz_j = q_j [(1 - eps) w_t + (eps / C) W + 2 lam w_t lse] - (1 - eps) w_t [j == t] - (eps / C) w_j
                  with W = sum_j w_j (= C without weights)
  probabilities p (smoothed to p' = (1 - eps) p + eps / C):
                  loss = sum_j w_j p'_j (lse - z_j) + lam lse^2
                  dloss/dz_j = q_j [sum_k w_k p'_k + 2 lam lse] - w_j p'_j
  soft cap:       dz/dx = 1 - (z / s)^2

With one-hot p and no options both reduce to dloss/dz = softmax(z) - onehot(t).
The running (max, sum) is the online normaliser of Milakov & Gimelshein (2018).

Two ways to the gradient: cross_entropy_kernel writes it during the forward (scaled for an
upstream gradient of 1; scale_grad_kernel rescales in the backward), or, with SAVE_STATS, it
saves four numbers per row and cross_entropy_backward_kernel writes the gradient in the
backward with the upstream factor folded in before the one rounding to the logits' dtype.
16-bit and float32 accumulate in float32; float64 logits (ACC_FP64) in float64 throughout.
"""
import triton
import triton.language as tl

from .softmax import (
    FIRST_PASS, L2_ONLY, LAST_PASS, LOG2E, NO_HINT, acc_zeros, chunk_lanes, combine_chunks, cooperative_slot, edge_cols,
    merge_stats, online_step, reduce_lanes, row_layout, split_edge, sum_partials, to_acc, vec_offset, wait_for_group,
)

# The widest single-block tile (ROWS x BLOCK_N) whose gradient variants load the target's
# logit beside the row rather than after its reductions (loss_tile): at 8192 the float32
# all-options variant without vectors spilled 8 bytes on sm_90.
EARLY_TARGET_LOGIT_MAX = tl.constexpr(4096)


@triton.jit
def acc_scalar(hi, lo, ACC_FP64: tl.constexpr):
    """A host float passed as float32 hi + lo: hi in float32, hi + lo in float64 (Triton passes
    Python floats as float32, which would cost a float64 kernel 1e-8 relative)."""
    if ACC_FP64:
        return (tl.zeros([], tl.float64) + hi) + lo
    else:
        return hi


@triton.jit
def soft_cap(x, softcap, HAS_SOFTCAP: tl.constexpr):
    """softcap * tanh(x / softcap), written with exp2 (tanh(u) = 1 - 2 / (e^(2u) + 1) saturates cleanly)."""
    if HAS_SOFTCAP:
        return softcap * (1.0 - 2.0 / (tl.exp2(x * (2.0 * LOG2E / softcap)) + 1.0))
    else:
        return x


@triton.jit
def load_logits(ptrs, mask, softcap, HAS_SOFTCAP: tl.constexpr, ACC_FP64: tl.constexpr, EVICT: tl.constexpr = NO_HINT):
    """Soft-capped logits at ptrs in the accumulation dtype; -inf where mask is off. EVICT:
    the eviction hint (kernels/softmax.py, FIRST_PASS / LAST_PASS; "" for none)."""
    x = to_acc(tl.load(ptrs, mask=mask, other=-float("inf"), eviction_policy=EVICT), ACC_FP64)
    if HAS_SOFTCAP:  # the cap maps the masked lanes' -inf to -softcap: put -inf back
        x = tl.where(mask, soft_cap(x, softcap, HAS_SOFTCAP), -float("inf"))
    return x


@triton.jit
def fresh(raw, zero):
    """raw (loaded 16-bit logits) again, as a value the compiler cannot prove equal to raw:
    zero is 0 at run time. Converting fresh(raw, k) to float32 in each pass keeps only the
    packed 16-bit row live between passes (16 registers for 32 values) instead of its float32
    copy; without it the widest single block spills. Passes need different zeros (zero,
    zero >> 1), or the compiler merges them back into one conversion."""
    return (raw.to(tl.int16, bitcast=True) ^ zero.to(tl.int16)).to(raw.dtype, bitcast=True)


@triton.jit
def load_target_block(ptrs, mask, label_smoothing, inv_classes, HAS_SMOOTHING: tl.constexpr, ACC_FP64: tl.constexpr):
    """Probability targets at ptrs, smoothed: p' = (1 - eps) p + eps / C; 0 where mask is off."""
    p = to_acc(tl.load(ptrs, mask=mask, other=0.0), ACC_FP64)
    if HAS_SMOOTHING:
        p = tl.where(mask, (1.0 - label_smoothing) * p + label_smoothing * inv_classes, 0.0)
    return p


@triton.jit
def load_weight_block(weight_ptr, cls, mask, HAS_WEIGHT: tl.constexpr, ACC_FP64: tl.constexpr):
    """Class weights of the classes cls (1.0 without weights); 0 where mask is off."""
    if HAS_WEIGHT:
        return to_acc(tl.load(weight_ptr + cls, mask=mask, other=0.0), ACC_FP64)
    else:
        return tl.where(mask, 1.0, 0.0)


@triton.jit
def block_terms(
    logit_ptrs, target_ptrs, weight_ptr, cls, mask, t, label_smoothing, inv_classes, softcap,
    SOFT_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    ACC_FP64: tl.constexpr, EVICT: tl.constexpr = NO_HINT,
):
    """One block's logits z (lanes at logit_ptrs, of classes cls, live where mask) and its
    share of the loss's linear terms, per lane: z_t where the lane holds the target class,
    w_j z_j and w_j (smoothing) or w_j p'_j z_j and w_j p'_j (probability targets at
    target_ptrs); zeros where unused."""
    z = load_logits(logit_ptrs, mask, softcap, HAS_SOFTCAP, ACC_FP64, EVICT)
    zero = tl.zeros_like(z)
    z_t = zero
    wz = zero
    w = zero
    if SOFT_TARGET:
        p = load_target_block(target_ptrs, mask, label_smoothing, inv_classes, HAS_SMOOTHING, ACC_FP64)
        w = p * load_weight_block(weight_ptr, cls, mask, HAS_WEIGHT, ACC_FP64)
        wz = tl.where(mask, w * z, 0.0)
    else:
        z_t = tl.where(cls == t, z, 0.0)
        if HAS_SMOOTHING:
            w = load_weight_block(weight_ptr, cls, mask, HAS_WEIGHT, ACC_FP64)
            wz = tl.where(mask, w * z, 0.0)
    return z, z_t, wz, w


@triton.jit
def store_grad_block(
    grad_ptrs, target_ptrs, weight_ptr, cls, mask, z, m, inv_d, other_over_d, coef, scale, t, w_t, valid, bad,
    label_smoothing, inv_classes, softcap,
    SOFT_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    ACC_FP64: tl.constexpr, w=0.0, W_GIVEN: tl.constexpr = False,
):
    """Writes d loss / d x for one block (lanes at grad_ptrs, of classes cls, live where mask):
    q_j * coef minus the target terms, times dz/dx and scale. With W_GIVEN, w is the block's
    w_j p'_j (probability targets) or w_j (smoothing) as block_terms returned it, still in
    registers; otherwise they are read again.

    q_j = e^(z_j - m) / d from the row maximum m and 1/d, not e^(z_j - lse): lse rounded
    to float32 loses |lse| * 6e-8 absolute, which for logits near 1e4 is 6e-4 relative in q.
    The target class's q_t * coef - c_t (c_t = (1 - eps) w_t) is computed as
    q_t (coef - c_t) - c_t * other_over_d, with other_over_d = sum_{j != t} q_j = 1 - q_t
    summed directly: q_t - 1 cancels to 0 in float32 once q_t > 1 - 6e-8 (a confident row),
    while the sum of the other classes keeps its relative accuracy. The scale (the upstream
    gradient over the mean's divisor) is applied before the one rounding to the store dtype."""
    q = tl.exp2((z - m) * LOG2E) * inv_d
    if SOFT_TARGET:
        g = q * coef
        if W_GIVEN:
            g -= w
        else:
            p = load_target_block(target_ptrs, mask, label_smoothing, inv_classes, HAS_SMOOTHING, ACC_FP64)
            g -= p * load_weight_block(weight_ptr, cls, mask, HAS_WEIGHT, ACC_FP64)
    else:
        c_t = (1.0 - label_smoothing) * w_t
        g = tl.where(cls == t, q * (coef - c_t) - c_t * other_over_d, q * coef)
        if HAS_SMOOTHING:
            if W_GIVEN:
                g -= label_smoothing * inv_classes * w
            else:
                g -= label_smoothing * inv_classes * load_weight_block(weight_ptr, cls, mask, HAS_WEIGHT, ACC_FP64)
    if HAS_SOFTCAP:
        g *= 1.0 - (z / softcap) * (z / softcap)
    # Ignored rows get 0, except where g is NaN (a NaN logit in the row): torch's gradient
    # there is 0 * NaN = NaN too, though the row's loss is 0.
    g = tl.where(valid, g * scale, tl.where(g == g, 0.0, g))
    g = tl.where(bad, float("nan"), g)
    tl.store(grad_ptrs, g.to(grad_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def row_target(target_ptr, weight_ptr, row, row_ok, target_row_stride, n_cols, ignore_index,
               SOFT_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, ACC_FP64: tl.constexpr):
    """(t, valid, bad, w_t) of a row, or of each row of a vector `row` (those past the end,
    where row_ok is off, read nothing and count as ignored): its class index (-1 for
    probabilities), whether it counts (not ignore_index), whether it is out of range (its
    loss and gradient become NaN; it is never used as an address unmasked) and its class
    weight (0 when ignored)."""
    if SOFT_TARGET:
        t = row * 0 - 1
        valid = row_ok
        bad = t >= 0
        w_t = to_acc(tl.where(row_ok, 1.0, 1.0), ACC_FP64)
    else:
        t = tl.load(target_ptr + row * target_row_stride, mask=row_ok, other=ignore_index).to(tl.int64)
        valid = row_ok & (t != ignore_index)
        in_range = (t >= 0) & (t < n_cols)
        bad = valid & (~in_range)
        if HAS_WEIGHT:
            w_t = to_acc(tl.load(weight_ptr + t, mask=valid & in_range, other=0.0), ACC_FP64)
        else:
            w_t = to_acc(tl.where(valid, 1.0, 0.0), ACC_FP64)
    return t, valid, bad, w_t


@triton.jit
def target_logit(logits_ptr, rows, row_ok, t, logits_row_stride, n_cols, softcap, ROWS: tl.constexpr,
                 SOFT_TARGET: tl.constexpr, HAS_SOFTCAP: tl.constexpr, ACC_FP64: tl.constexpr):
    """z_t of each of the ROWS rows (soft-capped with HAS_SOFTCAP) where t is a class of the
    row, else 0 (and always 0 for probability targets): one scalar load a row."""
    z_t = acc_zeros(ROWS, ACC_FP64)
    if not SOFT_TARGET:
        t_in_row = row_ok & (t >= 0) & (t < n_cols)
        z_t = tl.where(t_in_row, load_logits(logits_ptr + rows * logits_row_stride + t, t_in_row, softcap,
                                             HAS_SOFTCAP, ACC_FP64), 0.0)
    return z_t


@triton.jit
def row_loss(m, log_d, z_t, w_t, sum_w, sum_wz, valid, label_smoothing, inv_classes, z_loss,
             SOFT_TARGET: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr):
    """(loss, coef) of a row (or of each row of a tile) from its lse = m + log_d and the linear
    terms (module docstring): coef is the factor of q_j in d loss / d z_j. Rows that are not
    valid (ignore_index) get loss 0. Shared by every kernel that forms the cross-entropy."""
    lse = m + log_d
    if SOFT_TARGET:
        loss = sum_w * lse - sum_wz
        coef = sum_w
    else:
        loss = (1.0 - label_smoothing) * w_t * ((m - z_t) + log_d)  # (1 - eps) w_t (lse - z_t)
        coef = (1.0 - label_smoothing) * w_t
        if HAS_SMOOTHING:
            loss += label_smoothing * inv_classes * (sum_w * lse - sum_wz)
            coef += label_smoothing * inv_classes * sum_w
    if HAS_Z_LOSS:
        loss += z_loss * w_t * lse * lse
        coef += 2.0 * z_loss * w_t * lse
    return tl.where(valid, loss, 0.0), coef


@triton.jit
def reduce_rows(loss_ptr, reduced_ptr, counter_ptr, divisor_ptr, n_rows, n_joining, DIVIDE: tl.constexpr,
                ACC_FP64: tl.constexpr, REDUCE_BLOCK: tl.constexpr):
    """The last of the n_joining programs that call this to finish sums loss_ptr[0:n_rows] in
    row order (divided by *divisor_ptr when DIVIDE) into *reduced_ptr. n_joining counts
    programs, not rows: every program of a one-dimensional grid whose programs may hold
    several rows (tl.num_programs(0)), or one program a row of a split grid. The barrier puts
    this program's loss stores before its release on the counter; the acquire of the last
    program's atomic, and loads that bypass L1 (.cg), make every other program's loss visible
    to it."""
    tl.debug_barrier()
    done = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    if done == n_joining - 1:
        store_reduced(loss_ptr, reduced_ptr, divisor_ptr, n_rows, DIVIDE, ACC_FP64, REDUCE_BLOCK, L2_ONLY)


@triton.jit
def store_reduced(loss_ptr, reduced_ptr, divisor_ptr, n_rows, DIVIDE: tl.constexpr, ACC_FP64: tl.constexpr,
                  BLOCK: tl.constexpr, CACHE: tl.constexpr = NO_HINT):  # fmt: skip
    """*reduced_ptr = the sum of loss_ptr[0:n_rows] (over *divisor_ptr when DIVIDE), BLOCK
    lanes each adding the rows lane, lane + BLOCK, ... in order, then the lanes: the same bits
    every run for one BLOCK. CACHE: the loads' cache modifier (L2_ONLY for losses other
    programs of the same launch wrote)."""
    r = tl.arange(0, BLOCK)
    acc = acc_zeros(BLOCK, ACC_FP64)
    for start in range(0, n_rows, BLOCK):
        acc += to_acc(tl.load(loss_ptr + start + r, mask=start + r < n_rows, other=0.0, cache_modifier=CACHE), ACC_FP64)
    total = tl.sum(acc, axis=0)
    if DIVIDE:
        total = total / to_acc(tl.load(divisor_ptr), ACC_FP64)
    tl.store(reduced_ptr, total.to(reduced_ptr.dtype.element_ty))


@triton.jit
def cross_entropy_reduce_kernel(loss_ptr, reduced_ptr, divisor_ptr, n_rows, DIVIDE: tl.constexpr,
                                ACC_FP64: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """One program, launched after a loss kernel that writes the gradient (REDUCE 0 there):
    the reduced loss (store_reduced). It stands in for that kernel's done-counter, whose
    fenced atomic held every row's program for a memory round trip after its gradient stores
    (the fence waits for them) with nothing in flight: one dependent step of a latency chain
    a row, against one extra launch. Bytes: the n_rows losses (and the divisor) read, one
    value written. At 32768 rows, 8 dependent 16 KiB steps of PREPARE_BLOCK rows: a few us."""
    store_reduced(loss_ptr, reduced_ptr, divisor_ptr, n_rows, DIVIDE, ACC_FP64, BLOCK)


@triton.jit
def row_outputs(loss_ptr, lse_ptr, stats_ptr, rows, row_ok, m, d, other, z_t, t, w_t, valid, bad, sum_w, sum_wz,
                n_cols, label_smoothing, inv_classes, z_loss,
                SOFT_TARGET: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr,
                KEEP_OTHER: tl.constexpr, SAVE_STATS: tl.constexpr):
    """Stores the loss and lse of a row (or of each row of a vector `rows`, where row_ok) and,
    with SAVE_STATS, its 4 statistics; returns (1/d, sum_{j != t} q_j, coef) for the gradient.
    With KEEP_OTHER, d arrives as the sum without the target class (`other`) and gets the
    target's e^(z_t - m) added back: a sum of positive terms, no cancellation, and no second
    per-lane sum to hold (the widest plain block spilled with one). Whenever t is a class,
    ignored or not, its lane was left out of `other`."""
    if KEEP_OTHER:
        d = other + tl.where((t >= 0) & (t < n_cols), tl.exp2((z_t - m) * LOG2E), 0.0)
    log_d = tl.log(d)
    loss, coef = row_loss(m, log_d, z_t, w_t, sum_w, sum_wz, valid, label_smoothing, inv_classes, z_loss,
                          SOFT_TARGET, HAS_SMOOTHING, HAS_Z_LOSS)
    tl.store(loss_ptr + rows, tl.where(bad, float("nan"), loss).to(loss_ptr.dtype.element_ty), mask=row_ok)
    tl.store(lse_ptr + rows, (m + log_d).to(lse_ptr.dtype.element_ty), mask=row_ok)
    inv_d = 1.0 / d
    other_over_d = other * inv_d
    if SAVE_STATS:
        stats_row = stats_ptr + rows * 4
        tl.store(stats_row, m.to(stats_ptr.dtype.element_ty), mask=row_ok)
        tl.store(stats_row + 1, inv_d.to(stats_ptr.dtype.element_ty), mask=row_ok)
        tl.store(stats_row + 2, other_over_d.to(stats_ptr.dtype.element_ty), mask=row_ok)
        tl.store(stats_row + 3, coef.to(stats_ptr.dtype.element_ty), mask=row_ok)
    return inv_d, other_over_d, coef


@triton.jit
def grad_scale(grad_divisor_ptr, DIVIDE: tl.constexpr, ACC_FP64: tl.constexpr):
    """The factor the forward's gradient is scaled by: 1 / *grad_divisor_ptr (the mean's total
    weight) when DIVIDE, else 1. Loaded where the gradient is formed, so that it holds no
    register while the row is read."""
    scale = to_acc(tl.full([], 1.0, tl.float32), ACC_FP64)
    if DIVIDE:
        scale = 1.0 / to_acc(tl.load(grad_divisor_ptr), ACC_FP64)
    return scale


@triton.jit
def cross_entropy_prepare_kernel(
    target_ptr,
    weight_ptr,
    total_ptr,
    counter_ptr,
    target_row_stride,
    n_rows,
    n_cols,
    ignore_index,
    SOFT_TARGET: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    COMPUTE_TOTAL: tl.constexpr,
    ACC_FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program, run before cross_entropy_kernel when it reduces: zeroes the done-counter
    and, with COMPUTE_TOTAL, writes the mean's divisor: the summed class weight of the rows
    that are not ignored (their count without weights; n_rows for probability targets), or
    NaN when a row's class index is out of range (never used as an address). Rows are summed
    in order, so the total is the same bits every run. Bytes: one read of the targets."""
    tl.store(counter_ptr, 0)
    if COMPUTE_TOTAL:
        if SOFT_TARGET:
            total = to_acc(tl.full([], n_rows, tl.int32), ACC_FP64)
        else:
            r = tl.arange(0, BLOCK)
            acc = acc_zeros(BLOCK, ACC_FP64)
            n_bad = tl.zeros([BLOCK], tl.int32)
            for start in range(0, n_rows, BLOCK):
                rows = start + r
                t = tl.load(target_ptr + rows.to(tl.int64) * target_row_stride, mask=rows < n_rows,
                            other=ignore_index).to(tl.int64)
                valid = (rows < n_rows) & (t != ignore_index)
                in_range = (t >= 0) & (t < n_cols)
                if HAS_WEIGHT:
                    w = to_acc(tl.load(weight_ptr + t, mask=valid & in_range, other=0.0), ACC_FP64)
                else:
                    w = to_acc(tl.where(valid, 1.0, 0.0), ACC_FP64)
                acc += w
                n_bad += (valid & ~in_range).to(tl.int32)
            total = tl.sum(acc, axis=0)
            if HAS_WEIGHT:  # without weights a bad row counts 1, as torch's total does
                total = tl.where(tl.sum(n_bad, axis=0) > 0, float("nan"), total)
        tl.store(total_ptr, total.to(total_ptr.dtype.element_ty))


@triton.jit
def loss_tile(
    pid, cols, label_smoothing, inv_classes, z_loss, softcap, logits_ptr, target_ptr, weight_ptr, loss_ptr, lse_ptr,
    grad_ptr, stats_ptr, logits_row_stride, target_row_stride, grad_row_stride, grad_divisor_ptr, n_rows, n_cols,
    ignore_index, zero, SOFT_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, COMPUTE_GRAD: tl.constexpr, DIVIDE_GRAD: tl.constexpr,
    SAVE_STATS: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
    VEC: tl.constexpr, HAS_EDGE: tl.constexpr, ROWS: tl.constexpr, ROW_SCALARS: tl.constexpr,
):
    """cross_entropy_kernel's work for tile `pid` (rows pid * ROWS + [0, ROWS), or with
    SINGLE_BLOCK False the one row pid): its arguments, with the options already in the
    accumulation dtype (label_smoothing, z_loss, softcap; inv_classes = 1 / n_cols) and
    cols = arange(BLOCK_N)."""
    # The sum over j != t of e^(z_j - m), for the target's gradient (see store_grad_block).
    KEEP_OTHER: tl.constexpr = (COMPUTE_GRAD or SAVE_STATS) and not SOFT_TARGET
    if SINGLE_BLOCK:
        # One read of ROWS rows held in registers, [ROWS, BLOCK_N]; per-row values are [ROWS].
        rows = pid * ROWS + tl.arange(0, ROWS)
        if ROWS == 1:
            row_ok = rows == rows  # every tile is whole: no mask (and no register)
        else:
            row_ok = rows < n_rows
        # 1. The targets: class index, whether the row counts, its weight.
        t, valid, bad, w_t = row_target(target_ptr, weight_ptr, rows, row_ok, target_row_stride, n_cols,
                                        ignore_index, SOFT_TARGET, HAS_WEIGHT, ACC_FP64)
        # The target's logit: one scalar load a row (whenever t is a class, ignored or not).
        # It is issued before the row's reductions, so that its latency hides under the row's
        # load (after them it is a second memory round trip a row), except by the gradient's
        # variants wider than EARLY_TARGET_LOGIT_MAX, which have no register to hold it through
        # the row (the widest float32 one spilled 8 bytes on sm_90) and load it after.
        EARLY_Z_T: tl.constexpr = (not COMPUTE_GRAD) or BLOCK_N * ROWS <= EARLY_TARGET_LOGIT_MAX
        if EARLY_Z_T:
            z_t = target_logit(logits_ptr, rows, row_ok, t, logits_row_stride, n_cols, softcap, ROWS,
                               SOFT_TARGET, HAS_SOFTCAP, ACC_FP64)
        # 2. lse and the loss's linear terms; the body's lanes are columns shift + cols, the edge's e_cls.
        logits_body, shift, n_body = row_layout(rows, logits_row_stride, n_cols, VEC, HAS_EDGE)
        target_body = vec_offset(rows, target_row_stride, VEC)
        grad_body = vec_offset(rows, grad_row_stride, VEC)
        mask = row_ok[:, None] & (cols[None, :] < n_body[:, None])
        # Lane j of the body holds class shift + j: the lanes are numbered from the body's start
        # (weights from weight_ptr + shift, the target as t - shift), so that no per-lane class
        # index is kept in registers.
        body_weights = weight_ptr + shift[:, None]
        # As int32 (a class index fits), so that the per-lane comparisons with it are 32-bit;
        # a class index outside the row (its loss is NaN) matches no lane.
        body_t = tl.where((t >= 0) & (t < n_cols), t - shift, -1).to(tl.int32)[:, None]
        # 16-bit logits without per-class terms or a cap keep the loaded row (raw) and convert
        # it afresh in each pass (fresh()): the 32768-wide block then fits 64 registers.
        REMAT: tl.constexpr = not (SOFT_TARGET or HAS_SMOOTHING or HAS_SOFTCAP or ACC_FP64) and (
            logits_ptr.dtype.element_ty.primitive_bitwidth == 16)
        if REMAT:
            raw = tl.load(logits_ptr + logits_body[:, None] + cols[None, :], mask=mask, other=-float("inf"))
            z = raw.to(tl.float32)
            wz = tl.zeros_like(z)
            w = wz
        else:
            z, _zt, wz, w = block_terms(
                logits_ptr + logits_body[:, None] + cols[None, :], target_ptr + target_body[:, None] + cols[None, :],
                body_weights, cols[None, :], mask, body_t, label_smoothing, inv_classes, softcap,
                SOFT_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, ACC_FP64)
        m = tl.max(z, axis=1)
        if HAS_EDGE:
            e_cls, e_mask = edge_cols(shift[:, None], n_body[:, None], n_cols, VEC)
            e_mask = row_ok[:, None] & e_mask
            logits_rows = logits_ptr + (rows * logits_row_stride)[:, None]
            target_rows = target_ptr + (rows * target_row_stride)[:, None]
            if REMAT:
                raw_e = tl.load(logits_rows + e_cls, mask=e_mask, other=-float("inf"))
                ze = raw_e.to(tl.float32)
                wz_e = tl.zeros_like(ze)
                w_e = wz_e
            else:
                ze, _zt_edge, wz_e, w_e = block_terms(
                    logits_rows + e_cls, target_rows + e_cls, weight_ptr, e_cls, e_mask, t[:, None], label_smoothing,
                    inv_classes, softcap, SOFT_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, ACC_FP64)
            m = tl.maximum(m, tl.max(ze, axis=1), propagate_nan=tl.PropagateNan.ALL)
        if REMAT:
            z = fresh(raw, zero).to(tl.float32)
            if HAS_EDGE:
                ze = fresh(raw_e, zero).to(tl.float32)
        e = tl.exp2((z - m[:, None]) * LOG2E)
        if KEEP_OTHER:
            d = tl.sum(tl.where(cols[None, :] == body_t, 0.0, e), axis=1)  # `other` until row_outputs
        else:
            d = tl.sum(e, axis=1)
        sum_wz = tl.sum(wz, axis=1)
        sum_w = tl.sum(w, axis=1)
        if HAS_EDGE:
            e_e = tl.exp2((ze - m[:, None]) * LOG2E)
            if KEEP_OTHER:
                d += tl.sum(tl.where(e_cls == t[:, None], 0.0, e_e), axis=1)
            else:
                d += tl.sum(e_e, axis=1)
            sum_wz += tl.sum(wz_e, axis=1)
            sum_w += tl.sum(w_e, axis=1)
        if not EARLY_Z_T:
            z_t = target_logit(logits_ptr, rows, row_ok, t, logits_row_stride, n_cols, softcap, ROWS,
                               SOFT_TARGET, HAS_SOFTCAP, ACC_FP64)
        # 3. The loss (float32 for every dtype but float64), lse and the saved statistics.
        other = d if KEEP_OTHER else tl.zeros_like(d)
        inv_d, other_over_d, coef = row_outputs(
            loss_ptr, lse_ptr, stats_ptr, rows, row_ok, m, d, other, z_t, t, w_t, valid, bad, sum_w, sum_wz, n_cols,
            label_smoothing, inv_classes, z_loss, SOFT_TARGET, HAS_SMOOTHING, HAS_Z_LOSS, KEEP_OTHER, SAVE_STATS)
        # 4. The gradient, from registers.
        scale = grad_scale(grad_divisor_ptr, COMPUTE_GRAD and DIVIDE_GRAD, ACC_FP64)
        if REMAT:
            z = fresh(raw, zero >> 1).to(tl.float32)
            if HAS_EDGE:
                ze = fresh(raw_e, zero >> 1).to(tl.float32)
        if COMPUTE_GRAD:
            store_grad_block(
                grad_ptr + grad_body[:, None] + cols[None, :], target_ptr + target_body[:, None] + cols[None, :],
                body_weights, cols[None, :], mask, z, m[:, None], inv_d[:, None], other_over_d[:, None], coef[:, None],
                scale, body_t, w_t[:, None], valid[:, None], bad[:, None], label_smoothing, inv_classes, softcap,
                SOFT_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, ACC_FP64, w, True)
            if HAS_EDGE:
                store_grad_block(
                    grad_ptr + (rows * grad_row_stride)[:, None] + e_cls, target_rows + e_cls, weight_ptr, e_cls,
                    e_mask, ze, m[:, None], inv_d[:, None], other_over_d[:, None], coef[:, None], scale, t[:, None],
                    w_t[:, None], valid[:, None], bad[:, None], label_smoothing, inv_classes, softcap,
                    SOFT_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, ACC_FP64, w_e, True)
    else:
        # One row a program, streamed BLOCK_N at a time: per-lane running sums, or with
        # ROW_SCALARS (no gradient) one running (max, sum) a row.
        row = pid
        row_ok = row < n_rows
        logits_row = logits_ptr + row * logits_row_stride
        target_row = target_ptr + row * target_row_stride  # used only for probability targets
        grad_row = grad_ptr + row * grad_row_stride
        logits_body, shift, n_body = row_layout(row, logits_row_stride, n_cols, VEC, HAS_EDGE)
        target_body = vec_offset(row, target_row_stride, VEC)
        grad_body = vec_offset(row, grad_row_stride, VEC)
        # 1. The target: its class index, whether the row counts, and its weight.
        t, valid, bad, w_t = row_target(target_ptr, weight_ptr, row, row_ok, target_row_stride, n_cols,
                                        ignore_index, SOFT_TARGET, HAS_WEIGHT, ACC_FP64)
        # 2. One read of the row: lse by the online (max, sum), and the loss's linear terms.
        if HAS_EDGE:
            e_cls, e_mask = edge_cols(shift, n_body, n_cols, VEC)
            ze, _zt_edge, wz_e, w_e = block_terms(
                logits_row + e_cls, target_row + e_cls, weight_ptr, e_cls, e_mask, t, label_smoothing, inv_classes,
                softcap, SOFT_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, ACC_FP64)
        if not ROW_SCALARS:
            # Per-lane running (max, sum): no reduction across the block inside the loop.
            m_lane = acc_zeros(BLOCK_N, ACC_FP64) - float("inf")
            d_lane = acc_zeros(BLOCK_N, ACC_FP64)  # without the target's class when KEEP_OTHER
            wz_lane = acc_zeros(BLOCK_N, ACC_FP64)
            w_lane = acc_zeros(BLOCK_N, ACC_FP64)
            for start in range(0, n_body, BLOCK_N):
                cls = shift + start + cols
                zb, _zt_block, wz_b, w_b = block_terms(
                    logits_ptr + logits_body + start + cols, target_ptr + target_body + start + cols, weight_ptr, cls,
                    cols < n_body - start, t, label_smoothing, inv_classes, softcap,
                    SOFT_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, ACC_FP64, FIRST_PASS)
                m_lane, alpha, p = online_step(m_lane, zb)
                if KEEP_OTHER:
                    d_lane = d_lane * alpha + tl.where(cls == t, 0.0, p)
                else:
                    d_lane = d_lane * alpha + p
                wz_lane += wz_b
                w_lane += w_b
            m = tl.max(m_lane, axis=0)
            if HAS_EDGE:
                m = tl.maximum(m, tl.max(ze, axis=0), propagate_nan=tl.PropagateNan.ALL)
            d = tl.sum(d_lane * tl.exp2((m_lane - m) * LOG2E), axis=0)
            sum_wz = tl.sum(wz_lane, axis=0)
            sum_w = tl.sum(w_lane, axis=0)
        else:
            tl.static_assert(not COMPUTE_GRAD, "ROW_SCALARS is the gradient-free forward's loop (its configuration)")
            # Without the gradient the row is read once whatever its width, so what bounds the
            # speed is how many bytes an SM keeps in flight: the running (max, sum) is one scalar
            # pair a row, merged block by block (two block reductions a step), instead of two
            # float32 registers a lane, so that each thread holds little beyond its loaded
            # values and more programs fit an SM (config.LOOP_BLOCK_CROSS_ENTROPY_FORWARD).
            # (scalars made as reductions: tl.full([], ...) here cost 77 -> 94 registers on the
            # 16-bit variant at sm_90, 6 -> 5 programs an SM)
            m = tl.max(acc_zeros(1, ACC_FP64), axis=0) - float("inf")
            d = tl.max(acc_zeros(1, ACC_FP64), axis=0)  # without the target's class when KEEP_OTHER
            sum_wz = d
            sum_w = d
            for start in range(0, n_body, BLOCK_N):
                cls = shift + start + cols
                zb, _zt_block, wz_b, w_b = block_terms(
                    logits_ptr + logits_body + start + cols, target_ptr + target_body + start + cols, weight_ptr,
                    cls, cols < n_body - start, t, label_smoothing, inv_classes, softcap,
                    SOFT_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, ACC_FP64, LAST_PASS)
                # tl.max skips NaN, so m stays a number and a NaN logit must reach d through its
                # own lane: the shift is a finite reference (0 while the row has seen only -inf,
                # where e^(-inf - 0) adds 0 and a NaN stays NaN), never a guard on m_new that
                # would drop a NaN among -inf; d's rescale is guarded on m's change. (A per-lane
                # where() did the same for 16-18 more registers: 94 against 76-78, 16-bit, sm_90.)
                m_new = tl.maximum(m, tl.max(zb, axis=0))
                p = tl.exp2((zb - tl.where(m_new == -float("inf"), 0.0, m_new)) * LOG2E)
                if KEEP_OTHER:
                    p = tl.where(cls == t, 0.0, p)
                d = tl.where(m_new == m, d, d * tl.exp2((m - m_new) * LOG2E)) + tl.sum(p, axis=0)
                m = m_new
                if SOFT_TARGET or HAS_SMOOTHING:
                    sum_wz += tl.sum(wz_b, axis=0)
                    sum_w += tl.sum(w_b, axis=0)
            if HAS_EDGE:  # (its terms join d below, NaN lanes included)
                m_new = tl.maximum(m, tl.max(ze, axis=0))
                d = tl.where(m_new == m, d, d * tl.exp2((m - m_new) * LOG2E))
                m = m_new
        if HAS_EDGE:
            e_e = tl.exp2((ze - m) * LOG2E)
            if KEEP_OTHER:
                d += tl.sum(tl.where(e_cls == t, 0.0, e_e), axis=0)
            else:
                d += tl.sum(e_e, axis=0)
            sum_wz += tl.sum(wz_e, axis=0)
            sum_w += tl.sum(w_e, axis=0)
        # The target's logit: one scalar load, after the pass so it holds no register there.
        z_t = tl.zeros_like(m)
        if not SOFT_TARGET:
            t_in_row = (t >= 0) & (t < n_cols)
            z_t = tl.where(t_in_row, load_logits(logits_row + t, t_in_row, softcap, HAS_SOFTCAP, ACC_FP64), 0.0)
        # 3. The loss, lse and the saved statistics.
        other = d if KEEP_OTHER else tl.zeros_like(d)
        inv_d, other_over_d, coef = row_outputs(
            loss_ptr, lse_ptr, stats_ptr, row, row_ok, m, d, other, z_t, t, w_t, valid, bad, sum_w, sum_wz, n_cols,
            label_smoothing, inv_classes, z_loss, SOFT_TARGET, HAS_SMOOTHING, HAS_Z_LOSS, KEEP_OTHER, SAVE_STATS)
        # 4. The gradient: a second read of the body; the edge from registers.
        scale = grad_scale(grad_divisor_ptr, COMPUTE_GRAD and DIVIDE_GRAD, ACC_FP64)
        if COMPUTE_GRAD:
            for start in range(0, n_body, BLOCK_N):
                body_mask = cols < n_body - start
                zb = load_logits(logits_ptr + logits_body + start + cols, body_mask, softcap, HAS_SOFTCAP, ACC_FP64,
                                 LAST_PASS)
                store_grad_block(
                    grad_ptr + grad_body + start + cols, target_ptr + target_body + start + cols, weight_ptr,
                    shift + start + cols, body_mask, zb, m, inv_d, other_over_d, coef, scale, t, w_t, valid, bad,
                    label_smoothing, inv_classes, softcap, SOFT_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP,
                    ACC_FP64)
            if HAS_EDGE:
                store_grad_block(
                    grad_row + e_cls, target_row + e_cls, weight_ptr, e_cls, e_mask, ze, m, inv_d, other_over_d, coef,
                    scale, t, w_t, valid, bad, label_smoothing, inv_classes, softcap,
                    SOFT_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, ACC_FP64, w_e, True)


@triton.jit
def cross_entropy_kernel(
    logits_ptr,
    target_ptr,
    weight_ptr,
    loss_ptr,
    lse_ptr,
    grad_ptr,
    stats_ptr,
    reduced_ptr,
    counter_ptr,
    logits_row_stride,
    target_row_stride,
    grad_row_stride,
    grad_divisor_ptr,
    n_rows,
    n_cols,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    label_smoothing_lo,
    z_loss_lo,
    softcap_lo,
    zero,
    SOFT_TARGET: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    DIVIDE_GRAD: tl.constexpr,
    SAVE_STATS: tl.constexpr,
    REDUCE: tl.constexpr,
    ACC_FP64: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
    REDUCE_BLOCK: tl.constexpr,
    VEC: tl.constexpr = 1,
    HAS_EDGE: tl.constexpr = False,
    ROWS: tl.constexpr = 1,
    ROW_SCALARS: tl.constexpr = False,
    PERSISTENT: tl.constexpr = False,
):
    """Loss, lse and (when COMPUTE_GRAD) d loss / d logits of rows r = program_id(0) * ROWS + i.

    logits_ptr: (n_rows, n_cols) rows, column stride 1, row stride logits_row_stride.
    target_ptr: class index per row (int32/int64, stride target_row_stride), or with
        SOFT_TARGET a (n_rows, n_cols) probability row (row stride target_row_stride).
    weight_ptr: (n_cols,) class weights, read only when HAS_WEIGHT.
    loss_ptr, lse_ptr: (n_rows,) outputs (float32; float64 with ACC_FP64).
    grad_ptr: gradient rows (row stride grad_row_stride), written when COMPUTE_GRAD; may be
        logits_ptr itself (in-place backward: each block is read before it is overwritten).
    stats_ptr: (n_rows, 4) with SAVE_STATS: the row's max m, 1/d, (sum_{j != t} q_j) and the
        coefficient of q_j in the gradient, all cross_entropy_backward_kernel needs besides
        the logits and target.
    grad_divisor_ptr: device scalar dividing the gradient (the total weight, for
        reduction="mean"), read on device only when DIVIDE_GRAD (and by the reduction when
        REDUCE == 2), so the host never syncs.
    REDUCE: 0 leaves the per-row losses (to cross_entropy_reduce_kernel, launched after it,
        where config.reduce_launch says); 1 (sum) and 2 (mean, over *grad_divisor_ptr) also
        write the reduced loss to reduced_ptr: every program counts itself done on counter_ptr
        (zeroed by cross_entropy_prepare_kernel), and the last one sums the n_rows losses in
        row order, REDUCE_BLOCK at a time, so the result is the same bits every run.
    label_smoothing, z_loss, softcap (float32) and their *_lo remainders: with ACC_FP64 the
        option is hi + lo in float64; otherwise the remainders are unused.
    zero: the int 0, which the compiler cannot see (fresh(): the 16-bit plain single block).
    ignore_index: rows whose target equals it get loss 0 and gradient 0.
    A class index outside [0, n_cols) that is not ignore_index reads nothing out of bounds
    and gives a NaN loss and gradient for its row.
    ROW_SCALARS (looped, without COMPUTE_GRAD): the running (max, sum) as one pair a row,
        merged a block at a time, instead of two registers a lane (more programs an SM).
    VEC, HAS_EDGE: each row as an aligned body of VEC-element vectors and a head/tail edge
        (kernels/softmax.py); the logits, gradient and probability-target row strides agree
        modulo VEC.
    ROWS: rows a tile, a [ROWS, BLOCK_N] tile (single block only), so that short rows still
        give each thread 16-byte loads. With ROWS == 1 no row mask is applied.
    PERSISTENT (without COMPUTE_GRAD): the grid is any number of programs up to
    ceil(n_rows / ROWS), program p taking tiles p, p + num_programs, ...
    (config.cross_entropy_programs: a few programs an SM); otherwise exactly one program a
    tile, with no loop.
    Bytes: 1 read of the row (+1 write with COMPUTE_GRAD) and of the target's logit on the
    single-block path; the looped path reads the row's body twice when it writes the gradient.
    Roofline at 32768 x 4096 bf16, reduction "mean", no gradient: 256 MiB read + 0.4 MiB of
    targets and losses, 89 us at 3.0 TB/s (H100), 62 us at 4.3 TB/s (H200); no FLOPs to
    speak of (an exp a logit). The H200 run of 2026-12-04 took 206 us with one program a
    row. Our reading of it (a model, not a measurement): each program's row load (8 KiB, 4
    programs an SM: 32 KiB in flight, enough by Little's law while they load) was followed
    by two more round trips that held its slot with nothing in flight, the target's logit
    (loaded after the row's reductions) and the done-counter's fenced atomic, so the SM's
    bytes in flight averaged well under what the copy rate needs. Without the gradient both
    are gone here (the logit is loaded beside the row; the atomic comes once a program):
    predicted ~1.1x the copy time. Not measured yet. The variants that write the gradient
    keep one program a tile; where the tiles are many their reduction is a launch of its own
    (config.reduce_launch: no fenced atomic a row) and tiles up to EARLY_TARGET_LOGIT_MAX
    load the target's logit beside the row: at 32768 x 4096 bf16 (512 MiB read + written,
    179 us at 3.0 TB/s, 125 us at 4.3 TB/s) a row's program waits, by our model, on two
    dependent round trips (its class index, then its row and target's logit) instead of four
    (and the fence's wait for its stores); the H200 run
    of 2026-12-04 measured the forward + backward at 391 us with four, QuACK 240 us. Streamed rows (ROW_SCALARS) at 4096 x 128256 bf16: 1.05
    GB read once, 350 us at 3.0 TB/s (H100), 245 us at 4.3 TB/s (H200), against 504 us
    measured on the H200 with one 32-warp program an SM (16 KiB in flight); the issue's 90%
    of copy is 389 us (H100) / 272 us (H200). Not measured yet.
    """
    cols = tl.arange(0, BLOCK_N)
    label_smoothing = acc_scalar(label_smoothing, label_smoothing_lo, ACC_FP64)
    z_loss = acc_scalar(z_loss, z_loss_lo, ACC_FP64)
    softcap = acc_scalar(softcap, softcap_lo, ACC_FP64)
    inv_classes = 1.0 / to_acc(tl.full([], n_cols, tl.int32), ACC_FP64)
    # PERSISTENT: program p takes the tiles of ROWS rows p, p + num_programs, ... (a grid of a
    # few programs an SM: config.cross_entropy_programs), so that a reduction's done-counter
    # atomic and its fence come once a program, not once a row. Otherwise, and always with the
    # gradient, one tile a program and no loop: ptxas kept lane-invariant values live across a
    # real loop (the 4096-wide 16-bit gradient variant went from 39 to 56 registers and the
    # 32768-wide one spilled on sm_90; so did the 32768-wide float16 statistics variant and
    # float64's per-lane loops), and even a one-trip loop moved the widest all-options
    # gradient variant past its cap.
    if COMPUTE_GRAD or not PERSISTENT:
        loss_tile(
            tl.program_id(0).to(tl.int64),
            cols, label_smoothing, inv_classes, z_loss, softcap, logits_ptr, target_ptr, weight_ptr, loss_ptr,
            lse_ptr, grad_ptr, stats_ptr, logits_row_stride, target_row_stride, grad_row_stride, grad_divisor_ptr,
            n_rows, n_cols, ignore_index, zero, SOFT_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_Z_LOSS, HAS_SOFTCAP,
            COMPUTE_GRAD, DIVIDE_GRAD, SAVE_STATS, ACC_FP64, BLOCK_N, SINGLE_BLOCK, VEC, HAS_EDGE, ROWS,
            ROW_SCALARS)
    else:
        n_tiles = tl.cdiv(n_rows + tl.zeros([], tl.int64), ROWS)  # int64: no wrap near 2^31 rows
        for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
            loss_tile(
                tl.zeros([], tl.int64) + tile,  # (tile is an int in the interpreter)
                cols, label_smoothing, inv_classes, z_loss, softcap, logits_ptr, target_ptr, weight_ptr, loss_ptr,
                lse_ptr, grad_ptr, stats_ptr, logits_row_stride, target_row_stride, grad_row_stride, grad_divisor_ptr,
                n_rows, n_cols, ignore_index, zero, SOFT_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_Z_LOSS, HAS_SOFTCAP,
                COMPUTE_GRAD, DIVIDE_GRAD, SAVE_STATS, ACC_FP64, BLOCK_N, SINGLE_BLOCK, VEC, HAS_EDGE, ROWS,
                ROW_SCALARS)
    if REDUCE != 0:
        reduce_rows(loss_ptr, reduced_ptr, counter_ptr, grad_divisor_ptr, n_rows, tl.num_programs(0), REDUCE == 2,
                    ACC_FP64, REDUCE_BLOCK)


@triton.jit
def cross_entropy_backward_kernel(
    logits_ptr,
    target_ptr,
    weight_ptr,
    stats_ptr,
    upstream_ptr,
    grad_divisor_ptr,
    grad_ptr,
    logits_row_stride,
    target_row_stride,
    grad_row_stride,
    upstream_stride,
    n_cols,
    ignore_index,
    label_smoothing,
    softcap,
    label_smoothing_lo,
    softcap_lo,
    SOFT_TARGET: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    DIVIDE_GRAD: tl.constexpr,
    ACC_FP64: tl.constexpr,
    BLOCK_N: tl.constexpr,
    VEC: tl.constexpr = 1,
    HAS_EDGE: tl.constexpr = False,
):
    """d loss / d logits of row r = program_id(0) times the upstream gradient, from the
    row statistics cross_entropy_kernel saved (SAVE_STATS): one read of the logits, one
    write of the gradient, the factor upstream[r * upstream_stride] / divisor applied in
    float32 (float64) before the single rounding to the gradient's dtype. Used where a
    gradient stored at the forward's scale and rescaled later would lose entries: float16
    under a loss scale of 2^16, where (q - onehot) / N underflows before the factor comes.
    grad_ptr may be logits_ptr (each block is read before it is overwritten). Arguments
    otherwise as in cross_entropy_kernel."""
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * logits_row_stride
    target_row = target_ptr + row * target_row_stride
    grad_row = grad_ptr + row * grad_row_stride
    logits_body, shift, n_body = row_layout(row, logits_row_stride, n_cols, VEC, HAS_EDGE)
    target_body = vec_offset(row, target_row_stride, VEC)
    grad_body = vec_offset(row, grad_row_stride, VEC)
    cols = tl.arange(0, BLOCK_N)
    label_smoothing = acc_scalar(label_smoothing, label_smoothing_lo, ACC_FP64)
    softcap = acc_scalar(softcap, softcap_lo, ACC_FP64)
    inv_classes = 1.0 / to_acc(tl.full([], n_cols, tl.int32), ACC_FP64)
    t, valid, bad, w_t = row_target(
        target_ptr, weight_ptr, row, row >= 0, target_row_stride, n_cols, ignore_index, SOFT_TARGET, HAS_WEIGHT,
        ACC_FP64)
    stats_row = stats_ptr + row * 4
    m = to_acc(tl.load(stats_row), ACC_FP64)
    inv_d = to_acc(tl.load(stats_row + 1), ACC_FP64)
    other_over_d = to_acc(tl.load(stats_row + 2), ACC_FP64)
    coef = to_acc(tl.load(stats_row + 3), ACC_FP64)
    scale = to_acc(tl.load(upstream_ptr + row * upstream_stride), ACC_FP64)
    if DIVIDE_GRAD:
        scale = scale / to_acc(tl.load(grad_divisor_ptr), ACC_FP64)
    for start in range(0, n_body, BLOCK_N):
        body_mask = cols < n_body - start
        zb = load_logits(logits_ptr + logits_body + start + cols, body_mask, softcap, HAS_SOFTCAP, ACC_FP64)
        store_grad_block(
            grad_ptr + grad_body + start + cols, target_ptr + target_body + start + cols, weight_ptr,
            shift + start + cols, body_mask, zb, m, inv_d, other_over_d, coef, scale, t, w_t, valid, bad,
            label_smoothing, inv_classes, softcap, SOFT_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, ACC_FP64)
    if HAS_EDGE:
        e_cls, e_mask = edge_cols(shift, n_body, n_cols, VEC)
        ze = load_logits(logits_row + e_cls, e_mask, softcap, HAS_SOFTCAP, ACC_FP64)
        store_grad_block(
            grad_row + e_cls, target_row + e_cls, weight_ptr, e_cls, e_mask, ze, m, inv_d, other_over_d, coef, scale,
            t, w_t, valid, bad, label_smoothing, inv_classes, softcap,
            SOFT_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, ACC_FP64)


@triton.jit
def scale_rows(grad_ptr, upstream_ptr, g_scalar, block, grad_row_stride, upstream_stride, n_rows, n_cols,
               BLOCK_N: tl.constexpr, VEC: tl.constexpr, HAS_EDGE: tl.constexpr, ROWS: tl.constexpr,
               SCALAR: tl.constexpr):
    """scale_grad_kernel's work on rows block * ROWS + i: each row times its factor (g_scalar
    with SCALAR, else its own upstream value), skipped without a read where that is exactly 1."""
    if ROWS > 1:
        rows = block * ROWS + tl.arange(0, ROWS).to(tl.int64)  # (block: an int64 in compiled code)
        row_ok = rows < n_rows
        if SCALAR:
            g_up = tl.zeros([ROWS], tl.float32) + g_scalar
        else:
            g_up = tl.load(upstream_ptr + rows * upstream_stride, mask=row_ok, other=1.0).to(tl.float32)
        live = row_ok & (g_up != 1.0)
        body, shift, n_body = row_layout(rows, grad_row_stride, n_cols, VEC, HAS_EDGE)
        cols = tl.arange(0, BLOCK_N)
        mask = live[:, None] & (cols[None, :] < n_body[:, None])
        ptrs = grad_ptr + body[:, None] + cols[None, :]
        g = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, (g * g_up[:, None]).to(grad_ptr.dtype.element_ty), mask=mask)
        if HAS_EDGE:
            e_cls, e_mask = edge_cols(shift[:, None], n_body[:, None], n_cols, VEC)
            e_mask = live[:, None] & e_mask
            e_ptrs = grad_ptr + (rows * grad_row_stride)[:, None] + e_cls
            g = tl.load(e_ptrs, mask=e_mask, other=0.0).to(tl.float32)
            tl.store(e_ptrs, (g * g_up[:, None]).to(grad_ptr.dtype.element_ty), mask=e_mask)
    else:
        row = block + tl.zeros([], tl.int64)  # (block is a loop index: an int in the interpreter)
        if SCALAR:
            g_up = g_scalar
        else:
            g_up = tl.load(upstream_ptr + row * upstream_stride).to(tl.float32)
        if g_up != 1.0:
            body, shift, n_body = row_layout(row, grad_row_stride, n_cols, VEC, HAS_EDGE)
            cols = tl.arange(0, BLOCK_N)
            for start in range(0, n_body, BLOCK_N):
                mask = cols < n_body - start
                g = tl.load(grad_ptr + body + start + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(grad_ptr + body + start + cols, (g * g_up).to(grad_ptr.dtype.element_ty), mask=mask)
            if HAS_EDGE:
                e_cls, e_mask = edge_cols(shift, n_body, n_cols, VEC)
                grad_row = grad_ptr + row * grad_row_stride
                g = tl.load(grad_row + e_cls, mask=e_mask, other=0.0).to(tl.float32)
                tl.store(grad_row + e_cls, (g * g_up).to(grad_ptr.dtype.element_ty), mask=e_mask)


@triton.jit
def scale_grad_kernel(
    grad_ptr,
    upstream_ptr,
    grad_row_stride,
    upstream_stride,
    n_rows,
    n_cols,
    BLOCK_N: tl.constexpr,
    VEC: tl.constexpr = 1,
    HAS_EDGE: tl.constexpr = False,
    ROWS: tl.constexpr = 1,
    SCALAR: tl.constexpr = False,
):
    """grad[r, :] *= upstream[r * upstream_stride] in place; with SCALAR, by the one value at
    upstream_ptr.

    The grid is at most about twice the SM count (config.scale_grad_programs): program p
    takes the blocks of ROWS rows p, p + num_programs, ... The common training case, a scalar
    loss whose upstream gradient is exactly 1, costs each program one 4-byte read and
    nothing else (no pass over the gradient, no host sync); per-row factors cost one read a
    row, and rows whose factor is 1 are neither read nor written.
    Multiplies in float32 (16-bit and float32 gradients only; float64 takes the backward kernel).
    VEC, HAS_EDGE: the row's aligned body and edge, as in cross_entropy_kernel.
    ROWS > 1: short rows (one block each) as a [ROWS, BLOCK_N] tile, as in cross_entropy_kernel.
    Roofline at 32768 x 4096 bf16: a factor of 1 moves 264 x 4 B on an H100 (132 SMs), a few
    microseconds of launch and no bandwidth to speak of (the old one-program-a-row grid took
    24 us on the first H100 run); any other factor reads and writes the gradient once, 512 MiB:
    0.18 ms at 3.0 TB/s (H100), 0.12 ms at 4.3 TB/s (H200). No FLOPs to speak of.
    """
    n_blocks = tl.cdiv(n_rows + tl.zeros([], tl.int64), ROWS)  # int64: no wrap near 2^31 rows
    if SCALAR:
        g_scalar = tl.load(upstream_ptr).to(tl.float32)
        if g_scalar != 1.0:
            for block in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
                scale_rows(grad_ptr, upstream_ptr, g_scalar, block, grad_row_stride, upstream_stride, n_rows, n_cols,
                           BLOCK_N, VEC, HAS_EDGE, ROWS, SCALAR)
    else:
        for block in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
            scale_rows(grad_ptr, upstream_ptr, 1.0, block, grad_row_stride, upstream_stride, n_rows, n_cols,
                       BLOCK_N, VEC, HAS_EDGE, ROWS, SCALAR)


# ---------------------------------------------------------------------------------------
# Split rows: few long rows, each spread over a (rows, chunks) grid of programs
# ---------------------------------------------------------------------------------------
# As kernels/softmax.py's split kernels: chunk c = program_id(1) of row r = program_id(0)
# holds elements [c * chunk_cols, (c + 1) * chunk_cols) of the row's aligned body, and chunk
# 0 also the row's head/tail edge. cross_entropy_split_stats_kernel writes each chunk's
# partials into a buffer of the accumulation dtype, one row of N_PART * n_chunks + 1 values
# per row of logits, field f of chunk c at f * n_chunks + c:
#   0: m_c, the chunk's maximum          1: sum over the chunk, the target's column left out,
#                                           of e^(z_j - m_c) (see store_grad_block)
#   2, 3 (probability targets or smoothing): the chunk's sum_j w_j z_j and sum_j w_j (as
#        block_terms gives them: with p'_j folded in for probability targets)
# and last, z_t, loaded by chunk 0's program (class indices only).
# cross_entropy_split_combine_kernel, one program a row, merges them in chunk order (the
# same bits every run) into the row's lse, loss and the four statistics of the deferred
# gradient, which cross_entropy_split_backward_kernel then writes chunk by chunk, reading
# no logits but its own chunk's (so the gradient may overwrite them: inplace_backward).
# Each partial is written once and read once.


@triton.jit
def cross_entropy_split_stats_kernel(
    logits_ptr,
    target_ptr,
    weight_ptr,
    part_ptr,
    total_ptr,
    counter_ptr,
    logits_row_stride,
    target_row_stride,
    n_rows,
    n_cols,
    chunk_cols,
    n_chunks,
    ignore_index,
    label_smoothing,
    softcap,
    label_smoothing_lo,
    softcap_lo,
    SOFT_TARGET: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    REDUCE: tl.constexpr,
    ACC_FP64: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PREPARE_BLOCK: tl.constexpr,
    VEC: tl.constexpr = 1,
    HAS_EDGE: tl.constexpr = False,
):
    """The partials of chunk c = program_id(1) of row r = program_id(0) (see above).

    part_ptr: (n_rows, N_PART * n_chunks + 1), contiguous, N_PART = 4 with probability targets
        or smoothing, else 2. Other pointers, strides and options as in cross_entropy_kernel.
    REDUCE != 0: program (0, 0) also does cross_entropy_prepare_kernel's work (zeroes
        *counter_ptr and, for the mean (REDUCE == 2), writes its divisor to *total_ptr), so a
        split forward with a reduction is two launches, like the one-program-a-row one;
        PREPARE_BLOCK is that work's step through the targets (config.reduce_block).
    VEC, HAS_EDGE: the row's aligned body and edge (kernels/softmax.py); the logits' and
        probability targets' row strides agree modulo VEC.
    Bytes: one read of the chunk (and of its probability targets / class weights where the
    options use them), one target per program, N_PART values written (and z_t, one scalar
    read and written by chunk 0's program)."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    if REDUCE != 0:
        if (row == 0) & (chunk == 0):
            cross_entropy_prepare_kernel(
                target_ptr, weight_ptr, total_ptr, counter_ptr, target_row_stride, n_rows, n_cols, ignore_index,
                SOFT_TARGET, HAS_WEIGHT, REDUCE == 2, ACC_FP64, PREPARE_BLOCK)
    LINEAR: tl.constexpr = SOFT_TARGET or HAS_SMOOTHING
    N_PART: tl.constexpr = 4 if LINEAR else 2
    label_smoothing = acc_scalar(label_smoothing, label_smoothing_lo, ACC_FP64)
    softcap = acc_scalar(softcap, softcap_lo, ACC_FP64)
    inv_classes = 1.0 / to_acc(tl.full([], n_cols, tl.int32), ACC_FP64)
    t = row * 0 - 1  # matches no class: probability targets leave nothing out
    if not SOFT_TARGET:
        t = tl.load(target_ptr + row * target_row_stride).to(tl.int64)
    logits_body, shift, n_body = row_layout(row, logits_row_stride, n_cols, VEC, HAS_EDGE)
    target_body = vec_offset(row, target_row_stride, VEC)  # used only for probability targets
    col0 = chunk * chunk_cols
    cols = tl.arange(0, BLOCK_N)
    m_lane = acc_zeros(BLOCK_N, ACC_FP64) - float("inf")
    o_lane = acc_zeros(BLOCK_N, ACC_FP64)
    wz_lane = acc_zeros(BLOCK_N, ACC_FP64)
    w_lane = acc_zeros(BLOCK_N, ACC_FP64)
    for step in range(0, chunk_cols, BLOCK_N):
        start = col0 + step  # body element of the block's first lane; its class is shift + start
        cls = shift + start + cols
        zb, _zt, wz_b, w_b = block_terms(
            logits_ptr + logits_body + start + cols, target_ptr + target_body + start + cols, weight_ptr, cls,
            cols < n_body - start, t, label_smoothing, inv_classes, softcap,
            SOFT_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, ACC_FP64)
        m_lane, alpha, p = online_step(m_lane, zb)
        o_lane = o_lane * alpha + tl.where(cls == t, 0.0, p)
        wz_lane += wz_b
        w_lane += w_b
    m, other = reduce_lanes(m_lane, o_lane)
    sum_wz = tl.sum(wz_lane, axis=0)
    sum_w = tl.sum(w_lane, axis=0)
    if HAS_EDGE:
        e_cls, e_mask = split_edge(shift, n_body, n_cols, chunk, VEC)
        ze, _zt_edge, wz_e, w_e = block_terms(
            logits_ptr + row * logits_row_stride + e_cls, target_ptr + row * target_row_stride + e_cls, weight_ptr,
            e_cls, e_mask, t, label_smoothing, inv_classes, softcap,
            SOFT_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, ACC_FP64)
        # Each edge element a lane of sum 1 (0 for the target's class, left out of `other`).
        m_e, other_e = reduce_lanes(ze, tl.where(e_cls == t, 0.0, acc_zeros(2 * VEC, ACC_FP64) + 1.0))
        m, other = merge_stats(m, other, m_e, other_e)
        sum_wz += tl.sum(wz_e, axis=0)
        sum_w += tl.sum(w_e, axis=0)
    part_row = part_ptr + row * (N_PART * n_chunks + 1)
    part = part_row + chunk
    tl.store(part, m.to(part_ptr.dtype.element_ty))
    tl.store(part + n_chunks, other.to(part_ptr.dtype.element_ty))
    if LINEAR:
        tl.store(part + 2 * n_chunks, sum_wz.to(part_ptr.dtype.element_ty))
        tl.store(part + 3 * n_chunks, sum_w.to(part_ptr.dtype.element_ty))
    if not SOFT_TARGET:
        # The target's logit, for the combine: the one element of the row it needs outside
        # its own chunk, which an in-place gradient may already have overwritten there. No
        # program of this launch writes logits, so chunk 0's may read it wherever it lies.
        first = (chunk == 0) & (t >= 0) & (t < n_cols)
        z_t = load_logits(logits_ptr + row * logits_row_stride + t, first, softcap, HAS_SOFTCAP, ACC_FP64)
        tl.store(part_row + N_PART * n_chunks, z_t.to(part_ptr.dtype.element_ty), mask=first)


@triton.jit
def cross_entropy_split_combine_kernel(
    target_ptr,
    weight_ptr,
    part_ptr,
    loss_ptr,
    lse_ptr,
    stats_ptr,
    reduced_ptr,
    counter_ptr,
    total_ptr,
    target_row_stride,
    n_rows,
    n_cols,
    n_chunks,
    ignore_index,
    label_smoothing,
    z_loss,
    label_smoothing_lo,
    z_loss_lo,
    SOFT_TARGET: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr,
    SAVE_STATS: tl.constexpr,
    REDUCE: tl.constexpr,
    ACC_FP64: tl.constexpr,
    CHUNKS_BLOCK: tl.constexpr,
    REDUCE_BLOCK: tl.constexpr,
):
    """cross_entropy_kernel's row outputs for split row r = program_id(0): its partials
    (cross_entropy_split_stats_kernel) merged CHUNKS_BLOCK at a time in chunk order into the
    row's lse and loss, stored with (SAVE_STATS) the four statistics
    cross_entropy_split_backward_kernel needs. REDUCE: every program (one a row) counts
    itself done on counter_ptr, and the last of the n_rows sums the losses in row order
    (over *total_ptr for the mean). The target's logit z_t comes from the partials too.
    Arguments as in cross_entropy_kernel; part_ptr as in cross_entropy_split_stats_kernel.
    Bytes: the row's N_PART * n_chunks + 1 partials read once, O(1) besides."""
    row = tl.program_id(0).to(tl.int64)
    LINEAR: tl.constexpr = SOFT_TARGET or HAS_SMOOTHING
    N_PART: tl.constexpr = 4 if LINEAR else 2
    label_smoothing = acc_scalar(label_smoothing, label_smoothing_lo, ACC_FP64)
    z_loss = acc_scalar(z_loss, z_loss_lo, ACC_FP64)
    inv_classes = 1.0 / to_acc(tl.full([], n_cols, tl.int32), ACC_FP64)

    # 1. The target, and its logit from the partials (written only when t is a class).
    row_ok = row < n_rows
    t, valid, bad, w_t = row_target(target_ptr, weight_ptr, row, row_ok, target_row_stride, n_cols,
                                    ignore_index, SOFT_TARGET, HAS_WEIGHT, ACC_FP64)
    part_row = part_ptr + row * (N_PART * n_chunks + 1)
    z_t = to_acc(tl.zeros([], tl.float32), ACC_FP64)  # (unused with probability targets)
    if not SOFT_TARGET:
        z_t = to_acc(tl.load(part_row + N_PART * n_chunks, mask=(t >= 0) & (t < n_cols), other=0.0), ACC_FP64)

    # 2. The row's sums from its partials, merged CHUNKS_BLOCK at a time in chunk order: the
    #    (max, sum) fields as the softmax combine merges them, the linear terms summed.
    m, other = combine_chunks(part_row, n_chunks, CHUNKS_BLOCK, ACC_FP64)
    c = tl.arange(0, CHUNKS_BLOCK)
    wz_lane = acc_zeros(CHUNKS_BLOCK, ACC_FP64)
    w_lane = acc_zeros(CHUNKS_BLOCK, ACC_FP64)
    if LINEAR:
        for start in range(0, n_chunks, CHUNKS_BLOCK):
            mask = c < n_chunks - start
            wz_lane += to_acc(tl.load(part_row + 2 * n_chunks + start + c, mask=mask, other=0.0), ACC_FP64)
            w_lane += to_acc(tl.load(part_row + 3 * n_chunks + start + c, mask=mask, other=0.0), ACC_FP64)

    # 3. The loss, lse and statistics (row_outputs adds the target's term back into d).
    KEEP_OTHER: tl.constexpr = not SOFT_TARGET  # the partials always leave the target's class out
    row_outputs(
        loss_ptr, lse_ptr, stats_ptr, row, row_ok, m, other, other, z_t, t, w_t, valid, bad, tl.sum(w_lane, axis=0),
        tl.sum(wz_lane, axis=0), n_cols, label_smoothing, inv_classes, z_loss, SOFT_TARGET, HAS_SMOOTHING,
        HAS_Z_LOSS, KEEP_OTHER, SAVE_STATS)
    if REDUCE != 0:
        reduce_rows(loss_ptr, reduced_ptr, counter_ptr, total_ptr, n_rows, tl.num_programs(0), REDUCE == 2,
                    ACC_FP64, REDUCE_BLOCK)


@triton.jit
def split_grad(
    logits_ptr, target_ptr, weight_ptr, grad_ptr, logits_row_stride, target_row_stride, grad_row_stride, row, chunk,
    n_cols, chunk_cols, m, inv_d, other_over_d, coef, scale, t, w_t, valid, bad, label_smoothing, inv_classes, softcap,
    SOFT_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    ACC_FP64: tl.constexpr, BLOCK_N: tl.constexpr, VEC: tl.constexpr, HAS_EDGE: tl.constexpr,
):
    """Writes d loss / d logits on chunk `chunk` of row `row` (and on the edge for chunk 0)
    from the row's statistics (store_grad_block): one read of the chunk's logits, one write."""
    logits_body, shift, n_body = row_layout(row, logits_row_stride, n_cols, VEC, HAS_EDGE)
    target_body = vec_offset(row, target_row_stride, VEC)
    grad_body = vec_offset(row, grad_row_stride, VEC)
    col0 = chunk * chunk_cols
    cols = tl.arange(0, BLOCK_N)
    for step in range(0, chunk_cols, BLOCK_N):
        start = col0 + step
        body_mask = cols < n_body - start
        zb = load_logits(logits_ptr + logits_body + start + cols, body_mask, softcap, HAS_SOFTCAP, ACC_FP64)
        store_grad_block(
            grad_ptr + grad_body + start + cols, target_ptr + target_body + start + cols, weight_ptr,
            shift + start + cols, body_mask, zb, m, inv_d, other_over_d, coef, scale, t, w_t, valid, bad,
            label_smoothing, inv_classes, softcap, SOFT_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, ACC_FP64)
    if HAS_EDGE:
        e_cls, e_mask = split_edge(shift, n_body, n_cols, chunk, VEC)
        ze = load_logits(logits_ptr + row * logits_row_stride + e_cls, e_mask, softcap, HAS_SOFTCAP, ACC_FP64)
        store_grad_block(
            grad_ptr + row * grad_row_stride + e_cls, target_ptr + row * target_row_stride + e_cls, weight_ptr, e_cls,
            e_mask, ze, m, inv_d, other_over_d, coef, scale, t, w_t, valid, bad, label_smoothing, inv_classes,
            softcap, SOFT_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, ACC_FP64)


@triton.jit
def cross_entropy_split_backward_kernel(
    logits_ptr,
    target_ptr,
    weight_ptr,
    stats_ptr,
    upstream_ptr,
    grad_divisor_ptr,
    grad_ptr,
    logits_row_stride,
    target_row_stride,
    grad_row_stride,
    upstream_stride,
    n_cols,
    chunk_cols,
    ignore_index,
    label_smoothing,
    softcap,
    label_smoothing_lo,
    softcap_lo,
    SOFT_TARGET: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    DIVIDE_GRAD: tl.constexpr,
    ACC_FP64: tl.constexpr,
    BLOCK_N: tl.constexpr,
    VEC: tl.constexpr = 1,
    HAS_EDGE: tl.constexpr = False,
    HAS_UPSTREAM: tl.constexpr = True,
):
    """cross_entropy_backward_kernel on chunk c = program_id(1) of row r = program_id(0) (and
    on the edge in chunk 0): the gradient of a split row (always deferred), from the four row
    statistics of cross_entropy_split_combine_kernel. Without HAS_UPSTREAM the upstream
    gradient is 1 and upstream_ptr is not read (a forward that writes the gradient).
    One read of the chunk, one write."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    label_smoothing = acc_scalar(label_smoothing, label_smoothing_lo, ACC_FP64)
    softcap = acc_scalar(softcap, softcap_lo, ACC_FP64)
    inv_classes = 1.0 / to_acc(tl.full([], n_cols, tl.int32), ACC_FP64)
    t, valid, bad, w_t = row_target(
        target_ptr, weight_ptr, row, row >= 0, target_row_stride, n_cols, ignore_index, SOFT_TARGET, HAS_WEIGHT,
        ACC_FP64)
    stats_row = stats_ptr + row * 4
    m = to_acc(tl.load(stats_row), ACC_FP64)
    inv_d = to_acc(tl.load(stats_row + 1), ACC_FP64)
    other_over_d = to_acc(tl.load(stats_row + 2), ACC_FP64)
    coef = to_acc(tl.load(stats_row + 3), ACC_FP64)
    scale = to_acc(tl.full([], 1.0, tl.float32), ACC_FP64)
    if HAS_UPSTREAM:
        scale = to_acc(tl.load(upstream_ptr + row * upstream_stride), ACC_FP64)
    if DIVIDE_GRAD:
        scale = scale / to_acc(tl.load(grad_divisor_ptr), ACC_FP64)
    split_grad(logits_ptr, target_ptr, weight_ptr, grad_ptr, logits_row_stride, target_row_stride, grad_row_stride,
               row, chunk, n_cols, chunk_cols, m, inv_d, other_over_d, coef, scale, t, w_t, valid, bad,
               label_smoothing, inv_classes, softcap,
               SOFT_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, ACC_FP64, BLOCK_N, VEC, HAS_EDGE)


# ---------------------------------------------------------------------------------------
# Cooperative rows: the plain loss with its gradient, each long row held by a group of programs
# ---------------------------------------------------------------------------------------
# The softmax forward's scheme (kernels/softmax.py, "Cooperative rows": groups of resident
# programs, one chunk of a row each in registers, partials exchanged through global memory,
# a wait on the group's counter) for the training step's usual loss: class indices without
# weights or smoothing (z-loss, a soft cap and ignore_index allowed), the gradient written in
# the forward. Each chunk publishes its (max, sum of e^(z - max) over its classes but the
# target) and the target's logit if the chunk holds it (else 0): no program reads another's
# logits, so the gradient may overwrite the logits in place, and the row's z_t is the sum of
# one value and zeros, exact.


@triton.jit
def cross_entropy_cooperative_kernel(
    logits_ptr,
    target_ptr,
    loss_ptr,
    lse_ptr,
    grad_ptr,
    reduced_ptr,
    counter_ptr,
    grad_divisor_ptr,
    part_ptr,
    group_counter_ptr,
    logits_row_stride,
    target_row_stride,
    grad_row_stride,
    n_rows,
    n_cols,
    chunk_cols,
    n_chunks,
    ignore_index,
    z_loss,
    softcap,
    HAS_Z_LOSS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    DIVIDE_GRAD: tl.constexpr,
    REDUCE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHUNKS_BLOCK: tl.constexpr,
    REDUCE_BLOCK: tl.constexpr,
    PHASE: tl.constexpr = 0,
    VEC: tl.constexpr = 1,
    HAS_EDGE: tl.constexpr = False,
):
    """Loss, lse and d loss / d logits of the plain cross-entropy (section comment above) by
    groups of n_chunks resident programs, one chunk of chunk_cols (<= BLOCK_N) classes each;
    arguments as cross_entropy_kernel's (16-bit or float32 logits, float32 loss and lse;
    grad may be the logits), and:
    part_ptr: (n_rows, 3, n_chunks) float32: each chunk's max, sum without the target, z_t or 0.
    group_counter_ptr: (num_programs(0) // n_chunks,) int32, zero at launch (PHASE 0).
    PHASE: 0 the one cooperative launch; 1 and 2 its halves for Triton's interpreter.
    Chunk 0's program writes the row's loss and lse (NaN for a class index out of range); with
    REDUCE every program then counts itself on counter_ptr (zeroed by the prepare kernel) and
    the last sums the losses (reduce_rows).

    Roofline at 4096 x 128256 bf16 (32 chunks of 4016 classes, 12 groups at 3 programs an SM
    on an H100): the logits read once and the gradient written once, 2.10 GB: 700 us at 3.0
    TB/s (H100), 489 us at 4.3 TB/s (H200); beside them O(rows x chunks^2) partials from L2
    (50 MB) and each program's read of its row's class index. In flight: 3 programs of 4 warps
    hold 24 KiB of 16-bit logits an SM while all load, 16 KiB while one waits on its group
    (Little's law wants ~18 KiB on an H100, ~26 KiB on an H200: the H200 may stay short of
    its copy rate here; float32's 48 KiB does not). The looped gradient moves 3.15
    GB (1.05 ms / 733 us from DRAM); the H200 run of 2026-12-04 measured the forward +
    backward at 1007 us, QuACK 860 us; the issue's target (85% of copy for 1 read + 1 write)
    is 824 us (H100) / 575 us (H200). Not measured: no GPU has run this kernel yet.
    """
    group, chunk, n_groups, col0 = cooperative_slot(n_chunks, chunk_cols)
    cols = tl.arange(0, BLOCK_N)
    inv_classes = 0.0  # (smoothing's 1 / n_cols: no smoothing here)
    arrivals = 0
    for row_index in range(group, n_rows, n_groups):
        row = tl.zeros([], tl.int64) + row_index  # int64 offsets (row_index is an int in the interpreter)
        t, valid, bad, w_t = row_target(target_ptr, target_ptr, row, row == row, target_row_stride, n_cols,
                                        ignore_index, False, False, False)  # fmt: skip
        logits_body, shift, n_body = row_layout(row, logits_row_stride, n_cols, VEC, HAS_EDGE)
        mask = chunk_lanes(cols, chunk_cols, n_body, col0)
        # Lane j holds class shift + col0 + j: the target as a lane number (int32; -1, no lane,
        # when t is no class), so that no per-lane class index is kept in registers.
        lane_t = tl.where((t >= 0) & (t < n_cols), t - shift - col0, -1).to(tl.int32)
        z = load_logits(logits_ptr + logits_body + col0 + cols, mask, softcap, HAS_SOFTCAP, False)
        if HAS_EDGE:
            e_cls, e_mask = split_edge(shift, n_body, n_cols, chunk, VEC)
            ze = load_logits(logits_ptr + row * logits_row_stride + e_cls, e_mask, softcap, HAS_SOFTCAP, False)
        part_row = part_ptr + row * 3 * n_chunks
        if PHASE != 2:
            # (max, sum of e^(z - max) over the chunk's classes but the target), and z_t if here
            # (a lane past the chunk may be numbered t, the class of the next chunk: masked out)
            is_t = mask & (cols == lane_t)
            m_c, other_c = reduce_lanes(z, tl.where(is_t, 0.0, 1.0))
            z_t = tl.sum(tl.where(is_t, z, 0.0), axis=0)
            if HAS_EDGE:
                e_is_t = e_mask & (e_cls == t)
                m_e, other_e = reduce_lanes(ze, tl.where(e_is_t, 0.0, 1.0))
                m_c, other_c = merge_stats(m_c, other_c, m_e, other_e)
                z_t += tl.sum(tl.where(e_is_t, ze, 0.0), axis=0)
            tl.store(part_row + chunk, m_c)
            tl.store(part_row + n_chunks + chunk, other_c)
            tl.store(part_row + 2 * n_chunks + chunk, z_t)
        if PHASE == 0:
            arrivals += n_chunks
            wait_for_group(group_counter_ptr + group, arrivals)
        if PHASE != 1:
            m, other = combine_chunks(part_row, n_chunks, CHUNKS_BLOCK, False, L2_ONLY)
            z_t = sum_partials(part_row + 2 * n_chunks, n_chunks, CHUNKS_BLOCK, False, L2_ONLY)
            inv_d, other_over_d, coef = row_outputs(
                loss_ptr, lse_ptr, lse_ptr, row, chunk == 0, m, other, other, z_t, t, w_t, valid, bad, 0.0, 0.0,
                n_cols, 0.0, inv_classes, z_loss, False, False, HAS_Z_LOSS, True, False)
            scale = grad_scale(grad_divisor_ptr, DIVIDE_GRAD, False)
            grad_body = vec_offset(row, grad_row_stride, VEC)
            store_grad_block(
                grad_ptr + grad_body + col0 + cols, target_ptr, target_ptr, cols, mask, z, m, inv_d, other_over_d,
                coef, scale, lane_t, w_t, valid, bad, 0.0, inv_classes, softcap, False, False, False, HAS_SOFTCAP, False)
            if HAS_EDGE:
                store_grad_block(
                    grad_ptr + row * grad_row_stride + e_cls, target_ptr, target_ptr, e_cls, e_mask, ze, m, inv_d,
                    other_over_d, coef, scale, t, w_t, valid, bad, 0.0, inv_classes, softcap, False, False, False,
                    HAS_SOFTCAP, False)
    if REDUCE != 0:
        if PHASE != 1:
            reduce_rows(loss_ptr, reduced_ptr, counter_ptr, grad_divisor_ptr, n_rows, tl.num_programs(0), REDUCE == 2,
                        False, REDUCE_BLOCK)
