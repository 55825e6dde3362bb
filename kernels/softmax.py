"""Online softmax and log_softmax, forward and backward, one program per row.

The forward keeps a running maximum m and a running normaliser d over the row
(Milakov & Gimelshein, "Online normalizer calculation for softmax", 2018):

    m' = max(m, max_j x_j)        d' = d * e^(m - m') + sum_j e^(x_j - m')

so the row is read once when it fits in one block (SINGLE_BLOCK) and at most twice
when the program loops over column blocks. Exponentials are exp2 with a log2(e)
scale; 16-bit inputs are accumulated in float32, float64 inputs in float64.

128-bit loads at every width (VEC, HAS_EDGE): a row of odd width (50257 classes, say)
starts at a different byte alignment in every row, so the compiler can prove nothing and
issues one narrow load per element. With VEC = 16 bytes / itemsize, each row is cut in
three (row_layout): a head of fewer than VEC elements up to the first 16-byte boundary, a
body of whole VEC-element vectors whose start offset is written as a multiple of VEC (so
the compiler sees the alignment) and whose masks end on a multiple of VEC (so whole vectors
are in or out), and a tail of fewer than VEC elements. Head and tail, at most 2 (VEC - 1)
elements, travel together as one small "edge" vector (edge_cols); HAS_EDGE = False when the
launcher knows every row is whole vectors (width and row strides multiples of VEC). Every
element is read and written exactly once, and nothing outside the row is touched.
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): e^x == 2^(x * LOG2E)


# Eviction hints of the looped paths, which read a row twice: the first pass asks L2 to keep
# the row ("evict_last": createpolicy L2::evict_last on sm_80+), so that the second pass, which
# marks it "evict_first", finds it there instead of in DRAM.
FIRST_PASS = tl.constexpr("evict_last")
LAST_PASS = tl.constexpr("evict_first")
# Loads of what other programs of the same launch wrote: from L2 (ld.global.cg), never a stale L1 line.
L2_ONLY = tl.constexpr(".cg")
# No hint. A constexpr object, not a bare "": triton 3.6 hands a jit function's bare default
# on to the functions it calls as a str, which tl.load then rejects.
NO_HINT = tl.constexpr("")


@triton.jit
def load_row_block(ptr, cols, n_cols, ACC_FP64: tl.constexpr, EVICT: tl.constexpr = NO_HINT):
    """Loads ptr[cols] (masked to cols < n_cols, padding -inf) in the accumulation dtype,
    with the eviction hint EVICT ("" for none)."""
    x = tl.load(ptr + cols, mask=cols < n_cols, other=-float("inf"), eviction_policy=EVICT)
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
def vec_offset(row, row_stride, VEC: tl.constexpr):
    """The element offset of the first 16-byte aligned element at or after the start of row
    `row` (from a 16-byte aligned base), written so the compiler sees it is a multiple of VEC.
    Equal across tensors whose row strides agree modulo VEC (the launcher checks)."""
    return (row * row_stride + (VEC - 1)) // VEC * VEC


@triton.jit
def row_layout(row, row_stride, n_cols, VEC: tl.constexpr, HAS_EDGE: tl.constexpr):
    """(body, shift, n_body) of a row of n_cols elements (row may be a vector of rows):
    columns [0, shift) are the head, [shift, shift + n_body) the body, which starts at
    element offset `body` (a multiple of VEC) and is a multiple of VEC long, and
    [shift + n_body, n_cols) the tail. Without HAS_EDGE the launcher has checked that rows
    are whole vectors from column 0: shift is the constant 0 and the body the whole row."""
    body = vec_offset(row, row_stride, VEC)
    if HAS_EDGE:
        shift = tl.minimum(body - row * row_stride, n_cols)
        n_body = (n_cols - shift) // VEC * VEC
    else:
        shift = row * 0  # shaped like row
        n_body = row * 0 + n_cols // VEC * VEC
    return body, shift, n_body


@triton.jit
def edge_cols(shift, n_body, n_cols, VEC: tl.constexpr):
    """Column indices and mask of a row's head (lanes 0..VEC-1) and tail (lanes VEC..2VEC-1):
    a [2 VEC] vector, or [rows, 2 VEC] when shift and n_body are [rows, 1] columns."""
    e = tl.arange(0, 2 * VEC)
    head = e < VEC
    cols = tl.where(head, e, shift + n_body + (e - VEC))
    mask = tl.where(head, e < shift, cols < n_cols)
    return cols, mask


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
    VEC: tl.constexpr = 1,
    HAS_EDGE: tl.constexpr = False,
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
    VEC, HAS_EDGE: the aligned body and the head/tail edge (module docstring); x and y
        row strides must agree modulo VEC.
    A row that is -inf everywhere gives NaN, as torch does.
    """
    cols = tl.arange(0, BLOCK_N)
    if SINGLE_BLOCK:
        # 1 read + 1 write: the rows stay in registers.
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        row_ok = (rows < n_rows)[:, None]
        x_body, shift, n_body = row_layout(rows, x_row_stride, n_cols, VEC, HAS_EDGE)
        y_body = vec_offset(rows, y_row_stride, VEC)
        mask = row_ok & (cols[None, :] < n_body[:, None])
        x = to_acc(tl.load(x_ptr + x_body[:, None] + cols[None, :], mask=mask, other=-float("inf")), ACC_FP64)
        m = tl.max(x, axis=1)
        if HAS_EDGE:
            e_cols, e_mask = edge_cols(shift[:, None], n_body[:, None], n_cols, VEC)
            e_mask = row_ok & e_mask
            xe = to_acc(tl.load(x_ptr + (rows * x_row_stride)[:, None] + e_cols, mask=e_mask, other=-float("inf")),
                        ACC_FP64)
            m = tl.maximum(m, tl.max(xe, axis=1), propagate_nan=tl.PropagateNan.ALL)
        shifted = x - m[:, None]  # subtract the maximum so exp never overflows
        e = tl.exp2(shifted * LOG2E)
        d = tl.sum(e, axis=1)
        if HAS_EDGE:
            shifted_e = xe - m[:, None]
            e_e = tl.exp2(shifted_e * LOG2E)
            d += tl.sum(e_e, axis=1)
        if LOG:
            log_d = tl.log(d)[:, None]
            y = shifted - log_d
        else:
            inv_d = (1.0 / d)[:, None]
            y = e * inv_d
        tl.store(y_ptr + y_body[:, None] + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
        if HAS_EDGE:
            if LOG:
                ye = shifted_e - log_d
            else:
                ye = e_e * inv_d
            tl.store(y_ptr + (rows * y_row_stride)[:, None] + e_cols, ye.to(y_ptr.dtype.element_ty), mask=e_mask)
    else:
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * x_row_stride
        y_row = y_ptr + row * y_row_stride
        x_body, shift, n_body = row_layout(row, x_row_stride, n_cols, VEC, HAS_EDGE)
        y_body = vec_offset(row, y_row_stride, VEC)
        # 1. one pass for the per-lane running (max, sum), then merge the lanes (and the edge).
        d_lane = acc_zeros(BLOCK_N, ACC_FP64)
        m_lane = d_lane - float("inf")
        for start in range(0, n_body, BLOCK_N):
            x = load_row_block(x_ptr + x_body + start, cols, n_body - start, ACC_FP64, FIRST_PASS)
            m_lane, d_lane = online_update(m_lane, d_lane, x)
        m = tl.max(m_lane, axis=0)
        if HAS_EDGE:
            e_cols, e_mask = edge_cols(shift, n_body, n_cols, VEC)
            xe = to_acc(tl.load(x_row + e_cols, mask=e_mask, other=-float("inf")), ACC_FP64)
            m = tl.maximum(m, tl.max(xe, axis=0), propagate_nan=tl.PropagateNan.ALL)
        # Lanes that saw only -inf hold d = 0 and contribute 0 (NaN if the whole row is -inf, like torch).
        d = tl.sum(d_lane * tl.exp2((m_lane - m) * LOG2E), axis=0)
        if HAS_EDGE:
            d += tl.sum(tl.exp2((xe - m) * LOG2E), axis=0)
        # 2. second read of the row: normalise and write.
        log_d = tl.log(d)
        inv_d = 1.0 / d
        for start in range(0, n_body, BLOCK_N):
            x = load_row_block(x_ptr + x_body + start, cols, n_body - start, ACC_FP64, LAST_PASS)
            if LOG:
                y = (x - m) - log_d
            else:
                y = tl.exp2((x - m) * LOG2E) * inv_d
            tl.store(y_ptr + y_body + start + cols, y.to(y_ptr.dtype.element_ty), mask=cols < n_body - start)
        if HAS_EDGE:
            if LOG:
                ye = (xe - m) - log_d
            else:
                ye = tl.exp2((xe - m) * LOG2E) * inv_d
            tl.store(y_row + e_cols, ye.to(y_ptr.dtype.element_ty), mask=e_mask)


@triton.jit
def load_grad_block(ptr, cols, n_cols, ACC_FP64: tl.constexpr, EVICT: tl.constexpr = NO_HINT):
    """Loads ptr[cols] (masked to cols < n_cols, padding 0) in the accumulation dtype, with
    the eviction hint EVICT."""
    v = tl.load(ptr + cols, mask=cols < n_cols, other=0.0, eviction_policy=EVICT)
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
    VEC: tl.constexpr = 1,
    HAS_EDGE: tl.constexpr = False,
):
    """Gradient of softmax (or log_softmax when LOG) from its output y and upstream dy.

    softmax:      dx_i = y_i * (dy_i - sum_j dy_j * y_j)      (J_ij = y_i (delta_ij - y_j))
    log_softmax:  dx_i = dy_i - e^(y_i) * sum_j dy_j
    Pointers, strides, ROWS, VEC and HAS_EDGE as in softmax_fwd_kernel (the three row strides
    agree modulo VEC); reads y and dy once and writes dx once when SINGLE_BLOCK, else makes a
    reduction pass first.
    """
    cols = tl.arange(0, BLOCK_N)
    # Padding: 0 for dy, and for y 0 (softmax) or -inf (log_softmax: e^y = 0).
    Y_PAD: tl.constexpr = -float("inf") if LOG else 0.0
    if SINGLE_BLOCK:
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        row_ok = (rows < n_rows)[:, None]
        y_body, shift, n_body = row_layout(rows, y_row_stride, n_cols, VEC, HAS_EDGE)
        dy_body = vec_offset(rows, dy_row_stride, VEC)
        dx_body = vec_offset(rows, dx_row_stride, VEC)
        mask = row_ok & (cols[None, :] < n_body[:, None])
        dy = to_acc(tl.load(dy_ptr + dy_body[:, None] + cols[None, :], mask=mask, other=0.0), ACC_FP64)
        y = to_acc(tl.load(y_ptr + y_body[:, None] + cols[None, :], mask=mask, other=Y_PAD), ACC_FP64)
        if HAS_EDGE:
            e_cols, e_mask = edge_cols(shift[:, None], n_body[:, None], n_cols, VEC)
            e_mask = row_ok & e_mask
            dye = to_acc(tl.load(dy_ptr + (rows * dy_row_stride)[:, None] + e_cols, mask=e_mask, other=0.0), ACC_FP64)
            ye = to_acc(tl.load(y_ptr + (rows * y_row_stride)[:, None] + e_cols, mask=e_mask, other=Y_PAD), ACC_FP64)
        if LOG:
            s = tl.sum(dy, axis=1)
            if HAS_EDGE:
                s += tl.sum(dye, axis=1)
            dx = dy - tl.exp2(y * LOG2E) * s[:, None]
            if HAS_EDGE:
                dxe = dye - tl.exp2(ye * LOG2E) * s[:, None]
        else:
            s = tl.sum(dy * y, axis=1)
            if HAS_EDGE:
                s += tl.sum(dye * ye, axis=1)
            dx = y * (dy - s[:, None])
            if HAS_EDGE:
                dxe = ye * (dye - s[:, None])
        tl.store(dx_ptr + dx_body[:, None] + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_EDGE:
            tl.store(dx_ptr + (rows * dx_row_stride)[:, None] + e_cols, dxe.to(dx_ptr.dtype.element_ty), mask=e_mask)
    else:
        row = tl.program_id(0).to(tl.int64)
        y_body, shift, n_body = row_layout(row, y_row_stride, n_cols, VEC, HAS_EDGE)
        dy_body = vec_offset(row, dy_row_stride, VEC)
        dx_body = vec_offset(row, dx_row_stride, VEC)
        # 1. the row's reduction: sum(dy) for log_softmax, sum(dy * y) for softmax.
        acc = acc_zeros(BLOCK_N, ACC_FP64)
        for start in range(0, n_body, BLOCK_N):
            dy = load_grad_block(dy_ptr + dy_body + start, cols, n_body - start, ACC_FP64, FIRST_PASS)
            if LOG:
                acc += dy
            else:
                acc += dy * load_grad_block(y_ptr + y_body + start, cols, n_body - start, ACC_FP64, FIRST_PASS)
        s = tl.sum(acc, axis=0)
        if HAS_EDGE:
            e_cols, e_mask = edge_cols(shift, n_body, n_cols, VEC)
            dye = to_acc(tl.load(dy_ptr + row * dy_row_stride + e_cols, mask=e_mask, other=0.0), ACC_FP64)
            ye = to_acc(tl.load(y_ptr + row * y_row_stride + e_cols, mask=e_mask, other=Y_PAD), ACC_FP64)
            if LOG:
                s += tl.sum(dye, axis=0)
            else:
                s += tl.sum(dye * ye, axis=0)
        # 2. the gradient, block by block.
        for start in range(0, n_body, BLOCK_N):
            dy = load_grad_block(dy_ptr + dy_body + start, cols, n_body - start, ACC_FP64, LAST_PASS)
            if LOG:
                y = load_row_block(y_ptr + y_body + start, cols, n_body - start, ACC_FP64)
                dx = dy - tl.exp2(y * LOG2E) * s
            else:
                y = load_grad_block(y_ptr + y_body + start, cols, n_body - start, ACC_FP64, LAST_PASS)
                dx = y * (dy - s)
            tl.store(dx_ptr + dx_body + start + cols, dx.to(dx_ptr.dtype.element_ty), mask=cols < n_body - start)
        if HAS_EDGE:
            if LOG:
                dxe = dye - tl.exp2(ye * LOG2E) * s
            else:
                dxe = ye * (dye - s)
            tl.store(dx_ptr + row * dx_row_stride + e_cols, dxe.to(dx_ptr.dtype.element_ty), mask=e_mask)


# ---------------------------------------------------------------------------------------
# Split rows: few long rows, each spread over a (rows, chunks) grid of programs
# ---------------------------------------------------------------------------------------
# Chunk c = program_id(1) of row r = program_id(0) holds elements [c * chunk_cols,
# (c + 1) * chunk_cols) of the row's aligned body (row_layout; chunk_cols a multiple of
# BLOCK_N, so every chunk starts on a whole 16-byte vector; the last chunk is cut by the
# body's end, and its blocks past the end are fully masked). Chunk 0 also takes the row's
# head/tail edge. A first kernel writes each chunk's partial statistics; a second writes
# every chunk, its program first merging the row's partials in a fixed order (no atomics: the
# same bits every run, and the same bits in every chunk of the row), as in split-K decoding.
# Two launches: each partial is written once and read by each chunk of its row, O(rows x
# chunks^2) bytes from L2 beside the rows themselves (at most 128 chunks: 1 KiB a program).
# Partials live in a (n_rows, fields, n_chunks) buffer of the accumulation dtype, so that a
# row's field is one contiguous vector. (Cross-entropy's split keeps a combine launch of its
# own, which also writes the loss: kernels/cross_entropy.py.)


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
def combine_chunks(part_row, n_chunks, CHUNKS_BLOCK: tl.constexpr, ACC_FP64: tl.constexpr,
                   CACHE: tl.constexpr = NO_HINT):  # fmt: skip
    """The row's (max, sum) from its chunks' partials: maxima at part_row[0:n_chunks], sums at
    part_row[n_chunks:2 n_chunks], merged CHUNKS_BLOCK at a time in a fixed order. CACHE:
    the loads' cache modifier (L2_ONLY for partials that other programs of the same launch wrote)."""
    c = tl.arange(0, CHUNKS_BLOCK)
    d_lane = acc_zeros(CHUNKS_BLOCK, ACC_FP64)
    m_lane = d_lane - float("inf")
    for start in range(0, n_chunks, CHUNKS_BLOCK):
        mask = c < n_chunks - start
        m_part = to_acc(tl.load(part_row + start + c, mask=mask, other=-float("inf"), cache_modifier=CACHE), ACC_FP64)
        d_part = to_acc(tl.load(part_row + n_chunks + start + c, mask=mask, other=0.0, cache_modifier=CACHE),
                        ACC_FP64)
        m_lane, d_lane = merge_stats(m_lane, d_lane, m_part, d_part)
    return reduce_lanes(m_lane, d_lane)


@triton.jit
def sum_partials(part_row, n_chunks, CHUNKS_BLOCK: tl.constexpr, ACC_FP64: tl.constexpr,
                 CACHE: tl.constexpr = NO_HINT):  # fmt: skip
    """The sum of part_row[0:n_chunks] (a split row's partial sums), CHUNKS_BLOCK at a time in
    chunk order; CACHE as in combine_chunks."""
    c = tl.arange(0, CHUNKS_BLOCK)
    s_lane = acc_zeros(CHUNKS_BLOCK, ACC_FP64)
    for start in range(0, n_chunks, CHUNKS_BLOCK):
        s_lane += to_acc(tl.load(part_row + start + c, mask=c < n_chunks - start, other=0.0, cache_modifier=CACHE),
                         ACC_FP64)
    return tl.sum(s_lane, axis=0)


@triton.jit
def split_edge(shift, n_body, n_cols, chunk, VEC: tl.constexpr):
    """Column indices and mask of a split row's head/tail edge (edge_cols), live in chunk 0's
    program only: every edge element is read and written by one program."""
    e_cols, e_mask = edge_cols(shift, n_body, n_cols, VEC)
    # A where, not `e_mask & (chunk == 0)`: triton's interpreter (3.x) turns a bool vector
    # & a bool scalar into an int32 vector, which tl.load then rejects as a mask.
    return e_cols, tl.where(chunk == 0, e_mask, False)


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
    VEC: tl.constexpr = 1,
    HAS_EDGE: tl.constexpr = False,
):
    """Partial (max, sum) of chunk c = program_id(1) of row r = program_id(0):
    part[r, 0, c] = m_c = max of the chunk, part[r, 1, c] = sum over it of e^(x - m_c)
    ((-inf, 0) for a chunk that is -inf everywhere; NaN sum with a NaN); chunk 0's include
    the edge. part_ptr: (n_rows, 2, n_chunks), contiguous, the accumulation dtype.
    VEC, HAS_EDGE: the row's aligned body and edge (module docstring).
    Bytes: one read of the chunk, two values written."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    x_body, shift, n_body = row_layout(row, x_row_stride, n_cols, VEC, HAS_EDGE)
    col0 = chunk * chunk_cols
    x_chunk = x_ptr + x_body + col0
    n_left = n_body - col0  # body elements from the chunk's start to the body's end
    cols = tl.arange(0, BLOCK_N)
    d_lane = acc_zeros(BLOCK_N, ACC_FP64)
    m_lane = d_lane - float("inf")
    for start in range(0, chunk_cols, BLOCK_N):
        x = load_row_block(x_chunk + start, cols, n_left - start, ACC_FP64)
        m_lane, d_lane = online_update(m_lane, d_lane, x)
    m, d = reduce_lanes(m_lane, d_lane)
    if HAS_EDGE:
        e_cols, e_mask = split_edge(shift, n_body, n_cols, chunk, VEC)
        xe = to_acc(tl.load(x_ptr + row * x_row_stride + e_cols, mask=e_mask, other=-float("inf")), ACC_FP64)
        m_e, d_e = reduce_lanes(xe, acc_zeros(2 * VEC, ACC_FP64) + 1.0)  # each element a lane of sum 1
        m, d = merge_stats(m, d, m_e, d_e)
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
    ACC_FP64: tl.constexpr,
    CHUNKS_BLOCK: tl.constexpr,
    VEC: tl.constexpr = 1,
    HAS_EDGE: tl.constexpr = False,
):
    """y = softmax(x) (log_softmax when LOG) on chunk c = program_id(1) of row r =
    program_id(0) (and the edge in chunk 0), from the row's (max, sum), which the program
    merges from the row's partials at part_ptr (softmax_split_stats_kernel;
    row_from_partials). x and y row strides agree modulo VEC.
    A row that is -inf everywhere gives m = -inf, d = 0 and so NaN, as torch does.
    Bytes: the row's 2 n_chunks partials, one read of the chunk, one write.
    Roofline of the two launches at 32 x 128256 bf16 (4 chunks a row): 8.2 MB read by the
    stats launch, 8.2 MB read (largely from L2, which holds the rows) and 8.2 MB written
    here, 4 KB of partials: 8.2 us at 3.0 TB/s (H100), 5.7 us at 4.3 TB/s (H200) if the
    second read came from DRAM, plus two launches' latency, which dominates at this size.
    The issue's target (50% of copy for 1 read + 1 write) is 11 us (H100) / 7.6 us (H200);
    the H200 run measured 16.4 us with three launches. Not measured since."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    m, d = combine_chunks(part_ptr + row * 2 * n_chunks, n_chunks, CHUNKS_BLOCK, ACC_FP64)
    log_d = tl.log(d)
    inv_d = 1.0 / d
    x_body, shift, n_body = row_layout(row, x_row_stride, n_cols, VEC, HAS_EDGE)
    col0 = chunk * chunk_cols
    x_chunk = x_ptr + x_body + col0
    y_chunk = y_ptr + vec_offset(row, y_row_stride, VEC) + col0
    n_left = n_body - col0
    cols = tl.arange(0, BLOCK_N)
    for start in range(0, chunk_cols, BLOCK_N):
        x = load_row_block(x_chunk + start, cols, n_left - start, ACC_FP64)
        if LOG:
            y = (x - m) - log_d
        else:
            y = tl.exp2((x - m) * LOG2E) * inv_d
        tl.store(y_chunk + start + cols, y.to(y_ptr.dtype.element_ty), mask=cols < n_left - start)
    if HAS_EDGE:
        e_cols, e_mask = split_edge(shift, n_body, n_cols, chunk, VEC)
        xe = to_acc(tl.load(x_ptr + row * x_row_stride + e_cols, mask=e_mask, other=-float("inf")), ACC_FP64)
        if LOG:
            ye = (xe - m) - log_d
        else:
            ye = tl.exp2((xe - m) * LOG2E) * inv_d
        tl.store(y_ptr + row * y_row_stride + e_cols, ye.to(y_ptr.dtype.element_ty), mask=e_mask)


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
    VEC: tl.constexpr = 1,
    HAS_EDGE: tl.constexpr = False,
):
    """The backward's partial reduction of chunk c = program_id(1) of row r = program_id(0)
    (and of the edge in chunk 0): part[r, c] = sum over it of dy (log_softmax) or dy * y
    (softmax). part_ptr: (n_rows, n_chunks), contiguous, the accumulation dtype."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    y_body, shift, n_body = row_layout(row, y_row_stride, n_cols, VEC, HAS_EDGE)
    col0 = chunk * chunk_cols
    y_chunk = y_ptr + y_body + col0
    dy_chunk = dy_ptr + vec_offset(row, dy_row_stride, VEC) + col0
    n_left = n_body - col0
    cols = tl.arange(0, BLOCK_N)
    acc = acc_zeros(BLOCK_N, ACC_FP64)
    for start in range(0, chunk_cols, BLOCK_N):
        dy = load_grad_block(dy_chunk + start, cols, n_left - start, ACC_FP64)
        if LOG:
            acc += dy
        else:
            acc += dy * load_grad_block(y_chunk + start, cols, n_left - start, ACC_FP64)
    s = tl.sum(acc, axis=0)
    if HAS_EDGE:
        e_cols, e_mask = split_edge(shift, n_body, n_cols, chunk, VEC)
        dye = to_acc(tl.load(dy_ptr + row * dy_row_stride + e_cols, mask=e_mask, other=0.0), ACC_FP64)
        if LOG:
            s += tl.sum(dye, axis=0)
        else:
            ye = to_acc(tl.load(y_ptr + row * y_row_stride + e_cols, mask=e_mask, other=0.0), ACC_FP64)
            s += tl.sum(dye * ye, axis=0)
    tl.store(part_ptr + row * n_chunks + chunk, s.to(part_ptr.dtype.element_ty))


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
    ACC_FP64: tl.constexpr,
    CHUNKS_BLOCK: tl.constexpr,
    VEC: tl.constexpr = 1,
    HAS_EDGE: tl.constexpr = False,
):
    """dx on chunk c = program_id(1) of row r = program_id(0) (and on the edge in chunk 0),
    as softmax_bwd_kernel, with the row's sum s, which the program adds up from the row's
    partials at part_ptr (softmax_split_bwd_stats_kernel; sum_partials). The three row
    strides agree modulo VEC. Bytes: the row's n_chunks partials, y and dy's chunk, dx's."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    s = sum_partials(part_ptr + row * n_chunks, n_chunks, CHUNKS_BLOCK, ACC_FP64)
    y_body, shift, n_body = row_layout(row, y_row_stride, n_cols, VEC, HAS_EDGE)
    col0 = chunk * chunk_cols
    y_chunk = y_ptr + y_body + col0
    dy_chunk = dy_ptr + vec_offset(row, dy_row_stride, VEC) + col0
    dx_chunk = dx_ptr + vec_offset(row, dx_row_stride, VEC) + col0
    n_left = n_body - col0
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
    if HAS_EDGE:
        e_cols, e_mask = split_edge(shift, n_body, n_cols, chunk, VEC)
        dye = to_acc(tl.load(dy_ptr + row * dy_row_stride + e_cols, mask=e_mask, other=0.0), ACC_FP64)
        if LOG:
            ye = to_acc(tl.load(y_ptr + row * y_row_stride + e_cols, mask=e_mask, other=-float("inf")), ACC_FP64)
            dxe = dye - tl.exp2(ye * LOG2E) * s
        else:
            ye = to_acc(tl.load(y_ptr + row * y_row_stride + e_cols, mask=e_mask, other=0.0), ACC_FP64)
            dxe = ye * (dye - s)
        tl.store(dx_ptr + row * dx_row_stride + e_cols, dxe.to(dx_ptr.dtype.element_ty), mask=e_mask)


# ---------------------------------------------------------------------------------------
# Cooperative rows: many long rows, each held on chip by a group of resident programs
# ---------------------------------------------------------------------------------------
# The looped path reads a row wider than one block twice. Here a row is cut into n_chunks
# chunks (as a split row: chunks cut the aligned body, chunk 0 takes the head/tail edge),
# and a group of n_chunks programs holds one row at a time, each its chunk in registers:
# each program writes its chunk's (max, sum), adds one to the group's counter, waits until
# the group's n_chunks programs have all added theirs for this row, merges the row's
# partials (combine_chunks, in chunk order: the same bits in every chunk's program and on
# every run) and writes its chunk from the registers it loaded. The row is read once.
#
# Program p is chunk p % n_chunks of group p // n_chunks; group g takes rows g, g + G,
# g + 2G, ... (G groups), so its counter reaches n_chunks * (i + 1) when row i of the group
# has all its partials. A program waits only on its own group, for the row it just published,
# and the grid is launched cooperatively (launch_cooperative_grid: the driver guarantees that
# every program is resident at once, or refuses the launch), so every program it waits on is
# running and reaches that row after the rows before it, which its whole group has finished:
# no wait can last forever. Partials are per row (never reused within a launch) and the
# counter is zeroed per launch. Ordering: Triton stores a program's scalar partials from one
# thread, the same that then makes the acq_rel atomic (the barrier before it also orders any
# other thread's stores); the acquire comes before a barrier after which every thread loads
# the row's partials, bypassing L1 (L2_ONLY). With TRITON_DEBUG=1 a wait that polls 2^30
# times fails a device assert instead of hanging.
#
# Triton's interpreter runs programs one after another, so no program there may wait on
# another: it runs the kernel twice, PHASE 1 (publish the partials) then PHASE 2 (reload the
# chunk, merge, write), the same code but for the wait and the second load (and with it 2
# reads + 1 write). PHASE 0, the one launch, is the GPU's.


@triton.jit
def wait_for_group(counter_ptr, arrivals):
    """Adds this program to *counter_ptr and returns once the counter has reached `arrivals`:
    the barrier orders every thread's earlier stores before the release, the acquire orders the
    later loads after every other program's release."""
    tl.debug_barrier()
    seen = tl.atomic_add(counter_ptr, 1, sem="acq_rel") + 1
    polls = 0
    while seen < arrivals:
        seen = tl.atomic_add(counter_ptr, 0, sem="acquire")
        polls += 1
        tl.device_assert(polls < 1 << 30, "softmax_gpu: a cooperative group's wait did not end")


@triton.jit
def cooperative_slot(n_chunks, chunk_cols):
    """(group, chunk, groups, col0) of this program of a cooperative grid: program p is chunk
    p % n_chunks of group p // n_chunks, and the chunk starts at body column col0."""
    pid = tl.program_id(0)
    chunk = pid % n_chunks
    return pid // n_chunks, chunk, tl.num_programs(0) // n_chunks, chunk * chunk_cols


@triton.jit
def chunk_lanes(cols, chunk_cols, n_body, col0):
    """The lanes of a chunk's block that hold body columns [col0, col0 + chunk_cols), cut by
    the body's end (none past it). Two comparisons, not one against their minimum: that form
    spilled in two softmax forward variants at their 80-register cap (sm_90)."""
    return (cols < chunk_cols) & (cols < n_body - col0)


@triton.jit
def softmax_cooperative_fwd_kernel(
    x_ptr,
    y_ptr,
    part_ptr,
    counter_ptr,
    x_row_stride,
    y_row_stride,
    n_rows,
    n_cols,
    chunk_cols,
    n_chunks,
    LOG: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHUNKS_BLOCK: tl.constexpr,
    PHASE: tl.constexpr = 0,
    VEC: tl.constexpr = 1,
    HAS_EDGE: tl.constexpr = False,
):
    """y = softmax(x) (log_softmax when LOG) by groups of n_chunks resident programs, one chunk
    of chunk_cols (<= BLOCK_N) columns each, every row read once (section comment above).

    x_ptr, y_ptr: rows with unit column stride, 16-bit or float32 (accumulated in float32);
        row strides agree modulo VEC (VEC, HAS_EDGE: the aligned body and edge).
    part_ptr: (n_rows, 2, n_chunks) float32, each row's chunk maxima then sums.
    counter_ptr: (num_programs(0) // n_chunks,) int32, zero at launch (PHASE 0 only).
    PHASE: 0 the one cooperative launch; 1 and 2 its halves for the interpreter.
    A row that is -inf everywhere gives NaN, a NaN makes its row NaN, as in torch.

    Roofline at 4096 x 128256 bf16 (16 chunks of 8016 columns a row, 24 groups on an H100's
    132 SMs at 3 programs an SM, 171 rows a group): 1.05 GB read + 1.05 GB written = 2.10 GB,
    700 us at 3.0 TB/s (H100), 489 us at 4.3 TB/s (H200); partials 4096 x 16 x 8 B = 0.5 MB
    written, read 16 times from L2; per row and program one atomic and the polls until its
    group's slowest chunk arrives (~1-2 us), hidden only while the SM's other 2 programs, at
    other points of their own rows, keep 32 KiB in flight (Little's law wants ~18 KiB on an
    H100, ~26 KiB on an H200). The looped path moves 3.15 GB of requests
    (1050 us / 733 us from DRAM; 680 us measured on the H200 with part of the second read
    from L2); the issue's target, 90% of copy, is 778 us (H100) / 543 us (H200). Not measured:
    no GPU has run this kernel yet.
    """
    group, chunk, n_groups, col0 = cooperative_slot(n_chunks, chunk_cols)
    cols = tl.arange(0, BLOCK_N)
    arrivals = 0
    for row_index in range(group, n_rows, n_groups):
        row = tl.zeros([], tl.int64) + row_index  # int64 offsets (row_index is an int in the interpreter)
        x_body, shift, n_body = row_layout(row, x_row_stride, n_cols, VEC, HAS_EDGE)
        mask = chunk_lanes(cols, chunk_cols, n_body, col0)
        x = tl.load(x_ptr + x_body + col0 + cols, mask=mask, other=-float("inf")).to(tl.float32)
        if HAS_EDGE:
            e_cols, e_mask = split_edge(shift, n_body, n_cols, chunk, VEC)
            xe = tl.load(x_ptr + row * x_row_stride + e_cols, mask=e_mask, other=-float("inf")).to(tl.float32)
        part_row = part_ptr + row * 2 * n_chunks
        if PHASE != 2:
            m_c, d_c = reduce_lanes(x, acc_zeros(BLOCK_N, False) + 1.0)  # each element a lane of sum 1
            if HAS_EDGE:
                m_e, d_e = reduce_lanes(xe, acc_zeros(2 * VEC, False) + 1.0)
                m_c, d_c = merge_stats(m_c, d_c, m_e, d_e)
            tl.store(part_row + chunk, m_c)
            tl.store(part_row + n_chunks + chunk, d_c)
        if PHASE == 0:
            arrivals += n_chunks
            wait_for_group(counter_ptr + group, arrivals)
        if PHASE != 1:
            m, d = combine_chunks(part_row, n_chunks, CHUNKS_BLOCK, False, L2_ONLY)
            y_chunk = y_ptr + vec_offset(row, y_row_stride, VEC) + col0
            if LOG:
                log_d = tl.log(d)
                tl.store(y_chunk + cols, ((x - m) - log_d).to(y_ptr.dtype.element_ty), mask=mask)
                if HAS_EDGE:
                    tl.store(y_ptr + row * y_row_stride + e_cols, ((xe - m) - log_d).to(y_ptr.dtype.element_ty),
                             mask=e_mask)  # fmt: skip
            else:
                inv_d = 1.0 / d
                y = tl.exp2((x - m) * LOG2E) * inv_d
                tl.store(y_chunk + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
                if HAS_EDGE:
                    ye = tl.exp2((xe - m) * LOG2E) * inv_d
                    tl.store(y_ptr + row * y_row_stride + e_cols, ye.to(y_ptr.dtype.element_ty), mask=e_mask)


@triton.jit
def softmax_cooperative_bwd_kernel(
    y_ptr,
    dy_ptr,
    dx_ptr,
    part_ptr,
    counter_ptr,
    y_row_stride,
    dy_row_stride,
    dx_row_stride,
    n_rows,
    n_cols,
    chunk_cols,
    n_chunks,
    LOG: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHUNKS_BLOCK: tl.constexpr,
    PHASE: tl.constexpr = 0,
    VEC: tl.constexpr = 1,
    HAS_EDGE: tl.constexpr = False,
):
    """The gradient of softmax (log_softmax when LOG), as softmax_bwd_kernel, by groups of
    n_chunks resident programs as softmax_cooperative_fwd_kernel: each program holds its
    chunk of y and dy, publishes the chunk's sum of dy * y (dy for log_softmax), waits for
    its group, adds the row's partials in chunk order and writes dx from registers. y, dy and
    dx are read / written once. part_ptr: (n_rows, n_chunks) float32; counter_ptr and PHASE
    as in the forward (in PHASE 1 log_softmax reads no y: its sum needs dy only).

    Roofline at 4096 x 128256 bf16 (32 chunks of 4016 columns a row, 12 groups on an H100's
    132 SMs at 3 programs an SM): y and dy read, dx written, 3.15 GB: 1.05 ms at 3.0 TB/s
    (H100), 733 us at 4.3 TB/s (H200); partials 4096 x 32 x 4 B written, read 32 times from
    L2 (17 MB). The looped path moves 5.25 GB of requests (4 reads + 1 write): 1.75 ms /
    1.22 ms from DRAM; the H200 run of 2026-12-04 measured 1206 us, QuACK 931 us; the issue's
    target (85% of copy for 2 reads + 1 write) is 1.24 ms (H100) / 862 us (H200). Not
    measured: no GPU has run this kernel yet.
    """
    Y_PAD: tl.constexpr = -float("inf") if LOG else 0.0
    group, chunk, n_groups, col0 = cooperative_slot(n_chunks, chunk_cols)
    cols = tl.arange(0, BLOCK_N)
    arrivals = 0
    for row_index in range(group, n_rows, n_groups):
        row = tl.zeros([], tl.int64) + row_index  # int64 offsets (row_index is an int in the interpreter)
        y_body, shift, n_body = row_layout(row, y_row_stride, n_cols, VEC, HAS_EDGE)
        mask = chunk_lanes(cols, chunk_cols, n_body, col0)
        dy = tl.load(dy_ptr + vec_offset(row, dy_row_stride, VEC) + col0 + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_EDGE:
            e_cols, e_mask = split_edge(shift, n_body, n_cols, chunk, VEC)
            dye = tl.load(dy_ptr + row * dy_row_stride + e_cols, mask=e_mask, other=0.0).to(tl.float32)
        if PHASE != 1 or not LOG:
            y = tl.load(y_ptr + y_body + col0 + cols, mask=mask, other=Y_PAD).to(tl.float32)
            if HAS_EDGE:
                ye = tl.load(y_ptr + row * y_row_stride + e_cols, mask=e_mask, other=Y_PAD).to(tl.float32)
        part_row = part_ptr + row * n_chunks
        if PHASE != 2:
            if LOG:
                s_c = tl.sum(dy, axis=0)
                if HAS_EDGE:
                    s_c += tl.sum(dye, axis=0)
            else:
                s_c = tl.sum(dy * y, axis=0)
                if HAS_EDGE:
                    s_c += tl.sum(dye * ye, axis=0)
            tl.store(part_row + chunk, s_c)
        if PHASE == 0:
            arrivals += n_chunks
            wait_for_group(counter_ptr + group, arrivals)
        if PHASE != 1:
            s = sum_partials(part_row, n_chunks, CHUNKS_BLOCK, False, L2_ONLY)
            if LOG:
                dx = dy - tl.exp2(y * LOG2E) * s
            else:
                dx = y * (dy - s)
            dx_chunk = dx_ptr + vec_offset(row, dx_row_stride, VEC) + col0
            tl.store(dx_chunk + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            if HAS_EDGE:
                if LOG:
                    dxe = dye - tl.exp2(ye * LOG2E) * s
                else:
                    dxe = ye * (dye - s)
                tl.store(dx_ptr + row * dx_row_stride + e_cols, dxe.to(dx_ptr.dtype.element_ty), mask=e_mask)
