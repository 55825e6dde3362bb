"""Online softmax and log_softmax, forward and backward, one program per row.

The forward keeps a running maximum m and a running normaliser d over the row
(Milakov & Gimelshein, "Online normalizer calculation for softmax", 2018):

    m' = max(m, max_j x_j)        d' = d * e^(m - m') + sum_j e^(x_j - m')

so the row is read once when it fits in one block (SINGLE_BLOCK) and at most twice
when the program loops over column blocks. Exponentials are exp2 with a log2(e)
scale; 16-bit inputs are accumulated in float32, float64 inputs in float64.
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): e^x == 2^(x * LOG2E)


@triton.jit
def load_row_block(ptr, cols, n_cols, ACC_FP64: tl.constexpr):
    """Loads ptr[cols] (masked to cols < n_cols, padding -inf) in the accumulation dtype."""
    x = tl.load(ptr + cols, mask=cols < n_cols, other=-float("inf"))
    if ACC_FP64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def to_acc(x, ACC_FP64: tl.constexpr):
    """x in the accumulation dtype: float64 with ACC_FP64, else float32."""
    if ACC_FP64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def acc_zeros(BLOCK_N: tl.constexpr, ACC_FP64: tl.constexpr):
    """A zero vector in the accumulation dtype."""
    if ACC_FP64:
        return tl.zeros([BLOCK_N], tl.float64)
    else:
        return tl.zeros([BLOCK_N], tl.float32)


@triton.jit
def online_step(m, x):
    """One step of the per-lane running maximum: (m', alpha, p) with m' = max(m, x), alpha =
    e^(m - m') to rescale sums kept against m, and p = e^(x - m') to add to them.

    A lane that has only seen -inf keeps m' = -inf and alpha = p = 0; the where() avoids
    the NaN of e^(-inf - (-inf)) there. The maximum propagates NaN: a plain max would
    return -inf for max(-inf, NaN), the lane would count the NaN as "not seen" and the
    row would come out finite. With it, m' and the sums turn NaN and so does the whole
    row, as in torch.
    """
    m_new = tl.maximum(m, x, propagate_nan=tl.PropagateNan.ALL)
    seen = m_new != -float("inf")
    alpha = tl.where(seen, tl.exp2((m - m_new) * LOG2E), 0.0)
    p = tl.where(seen, tl.exp2((x - m_new) * LOG2E), 0.0)
    return m_new, alpha, p


@triton.jit
def online_update(m, d, x):
    """Merges the block x into per-lane running (max, sum) vectors (see online_step)."""
    m_new, alpha, p = online_step(m, x)
    return m_new, d * alpha + p


@triton.jit
def softmax_fwd_kernel(
    x_ptr,
    y_ptr,
    x_row_stride,
    y_row_stride,
    n_rows,
    n_cols,
    LOG: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
    ACC_FP64: tl.constexpr,
    ROWS: tl.constexpr = 1,
):
    """y[r, :] = softmax(x[r, :]) (or log_softmax when LOG), for rows r = program_id(0) * ROWS + i.

    x_ptr, y_ptr: row-major rows whose columns are contiguous (column stride 1).
    x_row_stride, y_row_stride: elements between consecutive rows (int64 offsets are
        used, so n_rows * row_stride may exceed 2**31).
    n_rows, n_cols: the rows' count and length; BLOCK_N >= n_cols when SINGLE_BLOCK, else
        the loop's step.
    LOG: write log_softmax instead of softmax.
    ACC_FP64: accumulate in float64 (float64 inputs) instead of float32.
    ROWS: rows per program, a [ROWS, BLOCK_N] tile (single block only): short rows then
        still give each thread several 16-byte loads and the SM enough bytes in flight.
    A row that is -inf everywhere gives NaN, as torch does.
    """
    cols = tl.arange(0, BLOCK_N)
    if SINGLE_BLOCK:
        # 1 read + 1 write: the rows stay in registers.
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
        x = to_acc(tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=-float("inf")),
                   ACC_FP64)
        shifted = x - tl.max(x, axis=1)[:, None]  # subtract the maximum so exp never overflows
        e = tl.exp2(shifted * LOG2E)
        d = tl.sum(e, axis=1)[:, None]
        if LOG:
            y = shifted - tl.log(d)
        else:
            y = e / d
        tl.store(y_ptr + rows[:, None] * y_row_stride + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * x_row_stride
        y_row = y_ptr + row * y_row_stride
        # 1. one pass for the per-lane running (max, sum), then merge the lanes.
        d_lane = acc_zeros(BLOCK_N, ACC_FP64)
        m_lane = d_lane - float("inf")
        for start in range(0, n_cols, BLOCK_N):
            x = load_row_block(x_row + start, cols, n_cols - start, ACC_FP64)
            m_lane, d_lane = online_update(m_lane, d_lane, x)
        m = tl.max(m_lane, axis=0)
        # Lanes that saw only -inf hold d = 0 and contribute 0 (NaN if the whole row is -inf, like torch).
        d = tl.sum(d_lane * tl.exp2((m_lane - m) * LOG2E), axis=0)
        # 2. second read of the row: normalise and write.
        log_d = tl.log(d)
        for start in range(0, n_cols, BLOCK_N):
            x = load_row_block(x_row + start, cols, n_cols - start, ACC_FP64)
            if LOG:
                y = (x - m) - log_d
            else:
                y = tl.exp2((x - m) * LOG2E) / d
            tl.store(y_row + start + cols, y.to(y_ptr.dtype.element_ty), mask=cols < n_cols - start)


@triton.jit
def load_grad_block(ptr, cols, n_cols, ACC_FP64: tl.constexpr):
    """Loads ptr[cols] (masked to cols < n_cols, padding 0) in the accumulation dtype."""
    v = tl.load(ptr + cols, mask=cols < n_cols, other=0.0)
    if ACC_FP64:
        return v.to(tl.float64)
    else:
        return v.to(tl.float32)


@triton.jit
def softmax_bwd_kernel(
    y_ptr,
    dy_ptr,
    dx_ptr,
    y_row_stride,
    dy_row_stride,
    dx_row_stride,
    n_rows,
    n_cols,
    LOG: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
    ACC_FP64: tl.constexpr,
    ROWS: tl.constexpr = 1,
):
    """Gradient of softmax (or log_softmax when LOG) from its output y and upstream dy.

    softmax:      dx_i = y_i * (dy_i - sum_j dy_j * y_j)      (J_ij = y_i (delta_ij - y_j))
    log_softmax:  dx_i = dy_i - e^(y_i) * sum_j dy_j
    Pointers, strides and ROWS as in softmax_fwd_kernel; reads y and dy once and writes dx
    once when SINGLE_BLOCK, else makes a reduction pass first.
    """
    cols = tl.arange(0, BLOCK_N)
    if SINGLE_BLOCK:
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
        dy = to_acc(tl.load(dy_ptr + rows[:, None] * dy_row_stride + cols[None, :], mask=mask, other=0.0), ACC_FP64)
        y_tile = y_ptr + rows[:, None] * y_row_stride + cols[None, :]
        if LOG:
            y = to_acc(tl.load(y_tile, mask=mask, other=-float("inf")), ACC_FP64)  # -inf padding: e^y = 0
            dx = dy - tl.exp2(y * LOG2E) * tl.sum(dy, axis=1)[:, None]
        else:
            y = to_acc(tl.load(y_tile, mask=mask, other=0.0), ACC_FP64)
            dx = y * (dy - tl.sum(dy * y, axis=1)[:, None])
        tl.store(dx_ptr + rows[:, None] * dx_row_stride + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        row = tl.program_id(0).to(tl.int64)
        y_row = y_ptr + row * y_row_stride
        dy_row = dy_ptr + row * dy_row_stride
        dx_row = dx_ptr + row * dx_row_stride
        # 1. the row's reduction: sum(dy) for log_softmax, sum(dy * y) for softmax.
        acc = acc_zeros(BLOCK_N, ACC_FP64)
        for start in range(0, n_cols, BLOCK_N):
            dy = load_grad_block(dy_row + start, cols, n_cols - start, ACC_FP64)
            if LOG:
                acc += dy
            else:
                acc += dy * load_grad_block(y_row + start, cols, n_cols - start, ACC_FP64)
        s = tl.sum(acc, axis=0)
        # 2. the gradient, block by block.
        for start in range(0, n_cols, BLOCK_N):
            dy = load_grad_block(dy_row + start, cols, n_cols - start, ACC_FP64)
            if LOG:
                y = load_row_block(y_row + start, cols, n_cols - start, ACC_FP64)
                dx = dy - tl.exp2(y * LOG2E) * s
            else:
                y = load_grad_block(y_row + start, cols, n_cols - start, ACC_FP64)
                dx = y * (dy - s)
            tl.store(dx_row + start + cols, dx.to(dx_ptr.dtype.element_ty), mask=cols < n_cols - start)
