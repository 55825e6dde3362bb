"""Token log-probabilities and entropy at a temperature: the per-token quantities RL fine-tuning needs.

For a row of logits z (V classes), temperature T and the sampled token t, with x = z / T:

  logprob = x_t - lse(x),     entropy = -sum_j p_j log p_j = lse(x) - sum_j p_j x_j,  p = softmax(x)

forward   one program per row streams the row once with a per-lane online (max m, sum d of
          e^(x - m)) and, for the entropy, the sum of e^(x - m) (x - m), shifted along with
          m; then one load of z_t. Writes logprob = (x_t - m) - log d, entropy = log d -
          E_p[x - m] and the row's (m, log d) (O(1) per row). Keeping m and log d apart, not
          their sum lse, keeps the values near the top of the row (the ones that matter)
          free of lse's rounding: x - m is exact there.
backward  one program per row streams the row again and writes
            d/dz_j = (u_lp (onehot_j - p_j) - u_H p_j (log p_j + H)) / T
          with u_lp, u_H the upstream gradients of the two outputs (either may be absent),
          log p_j = (x_j - m) - log d; one read and one write of the row.

split rows (few rows, each wider than cross-entropy's single block: config.split_rows) and a
          vocab-parallel shard: program (r, c) writes the (m, d, s) of chunk c of row r
          (token_logprobs_partial_kernel); one program a row merges them in chunk order and
          writes what the forward writes (token_logprobs_combine_kernel; the vocab-parallel
          form merges in torch around its two all-reduces instead); the backward runs a
          program a chunk. Merging (m, d, s) parts moves each to the larger maximum M:
          d e^(m - M), e^(m - M) (s + (m - M) d).

Roofline, 16 x 1024 tokens x V 128256 in bfloat16 (4.2 GB of logits): forward 4.2 GB read
(1.4 ms at the H100's 3.0 TB/s copy rate, 0.98 ms on an H200's 4.3 TB/s); backward 4.2 GB
read + 4.2 GB written (2.8 / 2.0 ms). The naive torch composition (log_softmax, gather,
softmax, the entropy product and sum) reads and writes several N x V float32 tensors: at
least 5 passes. Split rows add 12 bytes a chunk written and read (at 32 rows x 128256, 4
chunks a row: 1.5 KB against 8.2 MB of logits), so a handful of long rows fills the GPU at
the same traffic.

Rows whose token is ignore_index give 0 for both outputs and a zero gradient row; a token
outside [0, V) that is not ignored gives NaN for the row (never an address). A NaN logit
makes its row NaN, as in torch. Accumulation is float32 for every logits dtype.
"""
import triton
import triton.language as tl

from .softmax import LOG2E, online_step


@triton.jit
def _row_token(tokens_ptr, row, tokens_stride, n_classes, ignore_index):
    """(t, counted, in_range): the row's token, whether it is not ignore_index, whether it is a class."""
    t = tl.load(tokens_ptr + row * tokens_stride).to(tl.int64)
    counted = t != ignore_index
    in_range = (t >= 0) & (t < n_classes)
    return t, counted, in_range


@triton.jit
def _scan(logits_row, lo, hi, inv_temperature, COMPUTE_ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per-lane (m, d, s) of x = z / T over columns [lo, hi): running max m, d = sum e^(x - m)
    and, with COMPUTE_ENTROPY, s = sum e^(x - m) (x - m), moved along with m."""
    cols = tl.arange(0, BLOCK_N)
    m_lane = tl.zeros([BLOCK_N], tl.float32) - float("inf")
    d_lane = tl.zeros([BLOCK_N], tl.float32)
    s_lane = tl.zeros([BLOCK_N], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        mask = cols < hi - start
        x = tl.load(logits_row + start + cols, mask=mask, other=-float("inf")).to(tl.float32) * inv_temperature
        m_new, alpha, p = online_step(m_lane, x)
        if COMPUTE_ENTROPY:
            # sum e^(x - m) (x - m) moved from the old maximum to the new: + (m_old - m_new) d_old
            # (nothing while the lane has seen no class: d = 0); p (x - m) is 0 where p is, a NaN stays
            moved = tl.where(d_lane == 0.0, 0.0, (m_lane - m_new) * d_lane)
            s_lane = alpha * (s_lane + moved) + tl.where(p == 0.0, 0.0, p * (x - m_new))
        d_lane = d_lane * alpha + p
        m_lane = m_new
    return m_lane, d_lane, s_lane


@triton.jit
def _merge_pair(m_a, d_a, s_a, m_b, d_b, s_b, COMPUTE_ENTROPY: tl.constexpr):
    """(m, d, s) of two parts' (m, d, s), elementwise: each part's sums moved to the larger
    maximum (a part that has seen nothing, m = -inf and d = 0, adds nothing; NaN spreads)."""
    m = tl.maximum(m_a, m_b, propagate_nan=tl.PropagateNan.ALL)
    e_a = tl.where(m_a == -float("inf"), 0.0, tl.exp2((m_a - m) * LOG2E))
    e_b = tl.where(m_b == -float("inf"), 0.0, tl.exp2((m_b - m) * LOG2E))
    s = s_a
    if COMPUTE_ENTROPY:
        s = e_a * (s_a + tl.where(d_a == 0.0, 0.0, (m_a - m) * d_a)) + \
            e_b * (s_b + tl.where(d_b == 0.0, 0.0, (m_b - m) * d_b))
    return m, e_a * d_a + e_b * d_b, s


@triton.jit
def _merge(m_vec, d_vec, s_vec, COMPUTE_ENTROPY: tl.constexpr):
    """(m, d, s) of the union of a vector of parts (lanes, or a row's chunks)."""
    m = tl.max(m_vec, axis=0)
    scale = tl.where(m_vec == -float("inf"), 0.0, tl.exp2((m_vec - m) * LOG2E))
    d = tl.sum(d_vec * scale, axis=0)
    s = 0.0
    if COMPUTE_ENTROPY:
        moved = tl.where(d_vec == 0.0, 0.0, (m_vec - m) * d_vec)
        s = tl.sum(scale * (s_vec + moved), axis=0)  # sum_j e^(x_j - m) (x_j - m)
    return m, d, s


@triton.jit
def _finish(row, m, d, s, logits_row, tokens_ptr, tokens_stride, n_cols, inv_temperature, ignore_index,
            logprobs_ptr, entropy_ptr, stats_ptr, COMPUTE_ENTROPY: tl.constexpr):  # fmt: skip
    """Writes row r's logprob, entropy (with COMPUTE_ENTROPY) and (m, log d) from its merged
    (m, d, s) and one load of its token's logit."""
    log_d = tl.log(d)
    t, counted, in_range = _row_token(tokens_ptr, row, tokens_stride, n_cols, ignore_index)
    x_t = tl.load(logits_row + t, mask=counted & in_range, other=0.0).to(tl.float32) * inv_temperature
    logprob = tl.where(in_range, (x_t - m) - log_d, float("nan"))
    tl.store(logprobs_ptr + row, tl.where(counted, logprob, 0.0))
    tl.store(stats_ptr + 2 * row, m)
    tl.store(stats_ptr + 2 * row + 1, log_d)
    if COMPUTE_ENTROPY:
        entropy = tl.where(in_range, log_d - s / d, float("nan"))
        tl.store(entropy_ptr + row, tl.where(counted, entropy, 0.0))


@triton.jit
def token_logprobs_fwd_kernel(
    logits_ptr,
    tokens_ptr,
    logprobs_ptr,
    entropy_ptr,
    stats_ptr,
    logits_row_stride,
    tokens_stride,
    n_cols,
    inv_temperature,
    ignore_index,
    COMPUTE_ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Row r = program_id(0): logprobs_ptr[r], entropy_ptr[r] (when COMPUTE_ENTROPY) and
    stats_ptr[2 r], stats_ptr[2 r + 1] = m, log d (lse = m + log d of z_r / T), all float32.
    logits_ptr: (n_rows, n_cols), unit column stride."""
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * logits_row_stride
    m_lane, d_lane, s_lane = _scan(logits_row, 0, n_cols, inv_temperature, COMPUTE_ENTROPY, BLOCK_N)
    m, d, s = _merge(m_lane, d_lane, s_lane, COMPUTE_ENTROPY)
    _finish(row, m, d, s, logits_row, tokens_ptr, tokens_stride, n_cols, inv_temperature, ignore_index,
            logprobs_ptr, entropy_ptr, stats_ptr, COMPUTE_ENTROPY)  # fmt: skip


@triton.jit
def token_logprobs_partial_kernel(
    logits_ptr,
    partial_ptr,
    logits_row_stride,
    n_cols,
    chunk_cols,
    inv_temperature,
    COMPUTE_ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Split rows, and a vocab-parallel shard: program (r, c) writes partial_ptr[(r C + c) 3 + k],
    k = 0, 1, 2: (m, d, s) of row r's columns [c chunk_cols, (c + 1) chunk_cols) (C =
    num_programs(1); s is 0 without COMPUTE_ENTROPY). One read of the chunk."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    lo = chunk * chunk_cols
    hi = tl.minimum(lo + chunk_cols, n_cols)
    m_lane, d_lane, s_lane = _scan(logits_ptr + row * logits_row_stride, lo, hi, inv_temperature, COMPUTE_ENTROPY,
                                   BLOCK_N)  # fmt: skip
    m, d, s = _merge(m_lane, d_lane, s_lane, COMPUTE_ENTROPY)
    out = partial_ptr + (row * tl.num_programs(1) + chunk) * 3
    tl.store(out, m)
    tl.store(out + 1, d)
    tl.store(out + 2, s)


@triton.jit
def token_logprobs_combine_kernel(
    partial_ptr,
    logits_ptr,
    tokens_ptr,
    logprobs_ptr,
    entropy_ptr,
    stats_ptr,
    n_chunks,
    logits_row_stride,
    tokens_stride,
    n_cols,
    inv_temperature,
    ignore_index,
    COMPUTE_ENTROPY: tl.constexpr,
    CHUNKS_BLOCK: tl.constexpr,
):
    """Split rows: row r = program_id(0) merges its n_chunks partials, CHUNKS_BLOCK at a time
    in chunk order, and writes what token_logprobs_fwd_kernel writes."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, CHUNKS_BLOCK)
    m_acc = tl.zeros([CHUNKS_BLOCK], tl.float32) - float("inf")
    d_acc = tl.zeros([CHUNKS_BLOCK], tl.float32)
    s_acc = tl.zeros([CHUNKS_BLOCK], tl.float32)
    for c0 in range(0, n_chunks, CHUNKS_BLOCK):
        mask = offs < n_chunks - c0
        part = partial_ptr + (row * n_chunks + c0 + offs) * 3
        m_c = tl.load(part, mask=mask, other=-float("inf"))
        d_c = tl.load(part + 1, mask=mask, other=0.0)
        s_c = tl.load(part + 2, mask=mask, other=0.0)
        m_acc, d_acc, s_acc = _merge_pair(m_acc, d_acc, s_acc, m_c, d_c, s_c, COMPUTE_ENTROPY)
    m, d, s = _merge(m_acc, d_acc, s_acc, COMPUTE_ENTROPY)
    _finish(row, m, d, s, logits_ptr + row * logits_row_stride, tokens_ptr, tokens_stride, n_cols, inv_temperature,
            ignore_index, logprobs_ptr, entropy_ptr, stats_ptr, COMPUTE_ENTROPY)  # fmt: skip


@triton.jit
def token_logprobs_bwd_kernel(
    logits_ptr,
    tokens_ptr,
    stats_ptr,
    entropy_ptr,
    grad_logprobs_ptr,
    grad_entropy_ptr,
    grad_ptr,
    logits_row_stride,
    tokens_stride,
    grad_row_stride,
    grad_logprobs_stride,
    grad_entropy_stride,
    n_cols,
    chunk_cols,
    col_start,
    n_classes,
    inv_temperature,
    ignore_index,
    HAS_GRAD_LOGPROBS: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Program (r, c): grad_ptr row r, columns [c chunk_cols, (c + 1) chunk_cols), = d(u_lp
    logprob_r + u_H entropy_r) / d z_r, rounded once to grad's dtype (see the module
    docstring); u_lp = grad_logprobs_ptr[r * stride] when HAS_GRAD_LOGPROBS, u_H likewise,
    else 0. stats_ptr / entropy_ptr: the forward's (m, log d) per row and entropy (read only
    with HAS_GRAD_ENTROPY). The n_cols columns are classes [col_start, col_start + n_cols) of
    n_classes (a vocab-parallel shard; 0 and n_cols otherwise). grad may be the logits
    themselves (each element is read before it is written, by the same program)."""
    row = tl.program_id(0).to(tl.int64)
    lo = tl.program_id(1) * chunk_cols
    hi = tl.minimum(lo + chunk_cols, n_cols)
    logits_row = logits_ptr + row * logits_row_stride
    grad_row = grad_ptr + row * grad_row_stride
    cols = tl.arange(0, BLOCK_N)
    t, counted, in_range = _row_token(tokens_ptr, row, tokens_stride, n_classes, ignore_index)
    t_local = t - col_start
    m = tl.load(stats_ptr + 2 * row)
    log_d = tl.load(stats_ptr + 2 * row + 1)
    u_lp = 0.0
    if HAS_GRAD_LOGPROBS:
        u_lp = tl.load(grad_logprobs_ptr + row * grad_logprobs_stride).to(tl.float32)
    u_h = 0.0
    entropy = 0.0
    if HAS_GRAD_ENTROPY:
        u_h = tl.load(grad_entropy_ptr + row * grad_entropy_stride).to(tl.float32)
        entropy = tl.load(entropy_ptr + row)
    # An ignored row contributes nothing; a bad token's row is NaN, as its outputs are.
    row_scale = tl.where(in_range, inv_temperature, float("nan"))
    for start in range(lo, hi, BLOCK_N):
        mask = cols < hi - start
        x = tl.load(logits_row + start + cols, mask=mask, other=0.0).to(tl.float32) * inv_temperature
        log_p = (x - m) - log_d
        p = tl.exp2(log_p * LOG2E)
        g = -u_lp * p
        if HAS_GRAD_ENTROPY:
            g -= u_h * tl.where(p == 0.0, 0.0, p * (log_p + entropy))
        g = tl.where(start + cols == t_local, g + u_lp, g) * row_scale
        g = tl.where(counted, g, 0.0)
        tl.store(grad_row + start + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)
