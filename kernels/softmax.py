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


# ---------------------------------------------------------------------------------------
# Split rows: few long rows, each spread over a (rows, chunks) grid of programs
# ---------------------------------------------------------------------------------------
# Chunk c = program_id(1) of row r = program_id(0) holds columns [c * chunk_cols,
# (c + 1) * chunk_cols) of the row (chunk_cols a multiple of BLOCK_N; the last chunk is cut
# by the row's end, and its blocks past the end are fully masked). A first kernel writes each
# chunk's partial statistics, a second combines the row's partials, the same fixed order in
# every program of the row (no atomics: the same bits every run), and writes its chunk, as in
# split-K decoding. Partials live in a (n_rows, fields, n_chunks) buffer of the accumulation
# dtype, so that a program's combine reads each field of its row as one contiguous vector.


@triton.jit
def merge_stats(m, d, m_part, d_part):
    """Merges two per-lane (max, sum) pairs: m' = max(m, m_part) (NaN propagates) and
    d' = d e^(m - m') + d_part e^(m_part - m'), a part that saw only -inf adding 0."""
    m_new, alpha, p = online_step(m, m_part)
    return m_new, d * alpha + d_part * p


@triton.jit
def reduce_lanes(m_lane, d_lane):
    """(m, d) of per-lane (max, sum) vectors: lanes that saw only -inf add 0, so a part that is
    -inf everywhere gives (-inf, 0) (merge_stats then ignores it); a NaN lane makes d NaN."""
    m = tl.max(m_lane, axis=0)
    scale = tl.where(m_lane == -float("inf"), 0.0, tl.exp2((m_lane - m) * LOG2E))
    return m, tl.sum(d_lane * scale, axis=0)


@triton.jit
def combine_chunks(part_row, n_chunks, CHUNKS_BLOCK: tl.constexpr, ACC_FP64: tl.constexpr):
    """The row's (max, sum) from its chunks' partials: maxima at part_row[0:n_chunks], sums at
    part_row[n_chunks:2 n_chunks], merged CHUNKS_BLOCK at a time in a fixed order."""
    c = tl.arange(0, CHUNKS_BLOCK)
    d_lane = acc_zeros(CHUNKS_BLOCK, ACC_FP64)
    m_lane = d_lane - float("inf")
    for start in range(0, n_chunks, CHUNKS_BLOCK):
        mask = c < n_chunks - start
        m_part = to_acc(tl.load(part_row + start + c, mask=mask, other=-float("inf")), ACC_FP64)
        d_part = to_acc(tl.load(part_row + n_chunks + start + c, mask=mask, other=0.0), ACC_FP64)
        m_lane, d_lane = merge_stats(m_lane, d_lane, m_part, d_part)
    return reduce_lanes(m_lane, d_lane)


@triton.jit
def softmax_split_stats_kernel(
    x_ptr,
    part_ptr,
    x_row_stride,
    n_cols,
    chunk_cols,
    n_chunks,
    BLOCK_N: tl.constexpr,
    ACC_FP64: tl.constexpr,
):
    """Partial (max, sum) of chunk c = program_id(1) of row r = program_id(0):
    part[r, 0, c] = m_c = max of the chunk, part[r, 1, c] = sum over it of e^(x - m_c)
    ((-inf, 0) for a chunk that is -inf everywhere; NaN sum with a NaN).
    part_ptr: (n_rows, 2, n_chunks), contiguous, the accumulation dtype. Bytes: one read of
    the chunk, two values written."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    col0 = chunk * chunk_cols
    x_chunk = x_ptr + row * x_row_stride + col0
    n_left = n_cols - col0  # columns from the chunk's start to the row's end
    cols = tl.arange(0, BLOCK_N)
    d_lane = acc_zeros(BLOCK_N, ACC_FP64)
    m_lane = d_lane - float("inf")
    for start in range(0, chunk_cols, BLOCK_N):
        x = load_row_block(x_chunk + start, cols, n_left - start, ACC_FP64)
        m_lane, d_lane = online_update(m_lane, d_lane, x)
    m, d = reduce_lanes(m_lane, d_lane)
    part_row = part_ptr + row * 2 * n_chunks
    tl.store(part_row + chunk, m.to(part_ptr.dtype.element_ty))
    tl.store(part_row + n_chunks + chunk, d.to(part_ptr.dtype.element_ty))


@triton.jit
def softmax_split_fwd_kernel(
    x_ptr,
    y_ptr,
    part_ptr,
    x_row_stride,
    y_row_stride,
    n_cols,
    chunk_cols,
    n_chunks,
    LOG: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHUNKS_BLOCK: tl.constexpr,
    ACC_FP64: tl.constexpr,
):
    """y = softmax(x) (log_softmax when LOG) on chunk c = program_id(1) of row r =
    program_id(0), from the row's partials (softmax_split_stats_kernel) combined here.
    A row that is -inf everywhere gives m = -inf, d = 0 and so NaN, as torch does.
    Bytes: the row's 2 n_chunks partials, one read of the chunk, one write."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    m, d = combine_chunks(part_ptr + row * 2 * n_chunks, n_chunks, CHUNKS_BLOCK, ACC_FP64)
    log_d = tl.log(d)
    col0 = chunk * chunk_cols
    x_chunk = x_ptr + row * x_row_stride + col0
    y_chunk = y_ptr + row * y_row_stride + col0
    n_left = n_cols - col0
    cols = tl.arange(0, BLOCK_N)
    for start in range(0, chunk_cols, BLOCK_N):
        x = load_row_block(x_chunk + start, cols, n_left - start, ACC_FP64)
        if LOG:
            y = (x - m) - log_d
        else:
            y = tl.exp2((x - m) * LOG2E) / d
        tl.store(y_chunk + start + cols, y.to(y_ptr.dtype.element_ty), mask=cols < n_left - start)


@triton.jit
def softmax_split_bwd_stats_kernel(
    y_ptr,
    dy_ptr,
    part_ptr,
    y_row_stride,
    dy_row_stride,
    n_cols,
    chunk_cols,
    n_chunks,
    LOG: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACC_FP64: tl.constexpr,
):
    """The backward's partial reduction of chunk c = program_id(1) of row r = program_id(0):
    part[r, c] = sum over the chunk of dy (log_softmax) or dy * y (softmax).
    part_ptr: (n_rows, n_chunks), contiguous, the accumulation dtype."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    col0 = chunk * chunk_cols
    y_chunk = y_ptr + row * y_row_stride + col0
    dy_chunk = dy_ptr + row * dy_row_stride + col0
    n_left = n_cols - col0
    cols = tl.arange(0, BLOCK_N)
    acc = acc_zeros(BLOCK_N, ACC_FP64)
    for start in range(0, chunk_cols, BLOCK_N):
        dy = load_grad_block(dy_chunk + start, cols, n_left - start, ACC_FP64)
        if LOG:
            acc += dy
        else:
            acc += dy * load_grad_block(y_chunk + start, cols, n_left - start, ACC_FP64)
    tl.store(part_ptr + row * n_chunks + chunk, tl.sum(acc, axis=0).to(part_ptr.dtype.element_ty))


@triton.jit
def softmax_split_bwd_kernel(
    y_ptr,
    dy_ptr,
    dx_ptr,
    part_ptr,
    y_row_stride,
    dy_row_stride,
    dx_row_stride,
    n_cols,
    chunk_cols,
    n_chunks,
    LOG: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHUNKS_BLOCK: tl.constexpr,
    ACC_FP64: tl.constexpr,
):
    """dx on chunk c = program_id(1) of row r = program_id(0), as softmax_bwd_kernel, with the
    row's sum s added up from its partials (softmax_split_bwd_stats_kernel) in a fixed order."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    c = tl.arange(0, CHUNKS_BLOCK)
    s_lane = acc_zeros(CHUNKS_BLOCK, ACC_FP64)
    for start in range(0, n_chunks, CHUNKS_BLOCK):
        s_lane += to_acc(tl.load(part_ptr + row * n_chunks + start + c, mask=c < n_chunks - start, other=0.0),
                         ACC_FP64)
    s = tl.sum(s_lane, axis=0)
    col0 = chunk * chunk_cols
    y_chunk = y_ptr + row * y_row_stride + col0
    dy_chunk = dy_ptr + row * dy_row_stride + col0
    dx_chunk = dx_ptr + row * dx_row_stride + col0
    n_left = n_cols - col0
    cols = tl.arange(0, BLOCK_N)
    for start in range(0, chunk_cols, BLOCK_N):
        dy = load_grad_block(dy_chunk + start, cols, n_left - start, ACC_FP64)
        if LOG:
            y = load_row_block(y_chunk + start, cols, n_left - start, ACC_FP64)
            dx = dy - tl.exp2(y * LOG2E) * s
        else:
            y = load_grad_block(y_chunk + start, cols, n_left - start, ACC_FP64)
            dx = y * (dy - s)
        tl.store(dx_chunk + start + cols, dx.to(dx_ptr.dtype.element_ty), mask=cols < n_left - start)
