"""Float64 NumPy reference: the oracle every kernel is checked against.

Plain, readable formulas with no GPU and no torch. Functions take array-likes and
return float64 arrays.
"""
import numpy as np


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def naive_softmax(x, axis=-1):
    """e^x / sum(e^x) with no shift: overflows to inf/inf = NaN for large logits.

    Kept to show why the maximum is subtracted: naive_softmax([123, 456, 789]) is NaN
    (NumPy warns about the overflow) while softmax() gives the right answer.
    """
    e = np.exp(_f64(x))
    return e / e.sum(axis=axis, keepdims=True)


def softmax(x, axis=-1):
    """e^(x - m) / sum(e^(x - m)), m = max along axis: the largest exponent is e^0 = 1, so no overflow.

    -inf entries give exact zeros; a row that is -inf everywhere gives NaN, like torch.
    """
    x = _f64(x)
    with np.errstate(invalid="ignore"):  # only an all -inf row reaches -inf - (-inf)
        e = np.exp(x - x.max(axis=axis, keepdims=True))
        return e / e.sum(axis=axis, keepdims=True)


def log_softmax(x, axis=-1):
    """x - m - log(sum(e^(x - m))): the log of softmax without forming it."""
    x = _f64(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        shifted = x - x.max(axis=axis, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def hardmax(x, axis=-1):
    """One-hot of the arg-max (first index on ties): the T -> 0 limit of softmax(x / T)."""
    x = _f64(x)
    out = np.zeros_like(x)
    np.put_along_axis(out, np.expand_dims(np.argmax(x, axis=axis), axis), 1.0, axis=axis)
    return out


def softmax_jacobian(y):
    """The Jacobian dy_i/dx_j of softmax at output y (1-D), term by term:

    i == j:  y_i (1 - y_i)        i != j:  -y_i y_j        i.e. y_i (delta_ij - y_j)
    """
    y = _f64(y)
    if y.ndim != 1:
        raise ValueError(f"softmax_jacobian: expected a 1-D softmax output, got shape {y.shape}")
    off_diagonal = -np.outer(y, y)
    jacobian = off_diagonal.copy()
    np.fill_diagonal(jacobian, y * (1.0 - y))
    return jacobian


def softmax_backward(y, dy, axis=-1):
    """dx = J^T dy = y * (dy - sum(dy * y)) along axis: the Jacobian product without the matrix."""
    y, dy = _f64(y), _f64(dy)
    return y * (dy - (dy * y).sum(axis=axis, keepdims=True))


def log_softmax_backward(y, dy, axis=-1):
    """dx = dy - e^y * sum(dy), with y = log_softmax(x)."""
    y, dy = _f64(y), _f64(dy)
    return dy - np.exp(y) * dy.sum(axis=axis, keepdims=True)


def online_softmax(x, block, lanes=1):
    """Softmax of each row (last axis) computed the streaming way the kernels do.

    The row is visited in blocks of `block` columns; inside a block, lane k of `lanes`
    takes columns k, k + lanes, ... and keeps its own running (max m, sum d):

        m' = max(m, x)      d' = d * e^(m - m') + e^(x - m')

    After the last block the lanes are merged pairwise in a tree (like a warp shuffle
    reduction) with the same rescaling, and a second pass normalises:
    y = e^(x - m) / d. With lanes=1 this is the one-lane online normaliser of
    Milakov & Gimelshein (2018).
    """
    one_row = np.ndim(x) == 1
    x = np.atleast_2d(_f64(x))
    if block < 1 or lanes < 1 or block % lanes:
        raise ValueError(f"online_softmax: need block >= 1 and lanes dividing block, got {block}, {lanes}")
    out = np.empty_like(x)
    for r, row in enumerate(x):
        m = np.full(lanes, -np.inf)
        d = np.zeros(lanes)
        for start in range(0, row.size, block):
            chunk = row[start:start + block]
            for k in range(lanes):
                for value in chunk[k::lanes]:
                    _update_lane(m, d, k, value)
        while m.size > 1:  # tree merge of lane pairs, as a shuffle reduction would
            half = m.size // 2
            m_new = np.maximum(m[:half], m[half:])
            d = _rescale(d[:half], m[:half], m_new) + _rescale(d[half:], m[half:], m_new)
            m = m_new
        with np.errstate(invalid="ignore"):
            out[r] = np.exp(row - m[0]) / d[0]
    return out[0] if one_row else out


def _rescale(d, m_old, m_new):
    """d * e^(m_old - m_new), taking 0 where the lane saw only -inf (avoids -inf - -inf)."""
    with np.errstate(invalid="ignore"):
        return np.where(m_new == -np.inf, 0.0, d * np.exp(m_old - m_new))


def _update_lane(m, d, k, value):
    """Lane k takes one more value: m' = max(m, x), d' = d e^(m - m') + e^(x - m'), in place."""
    m_new = max(m[k], value)
    if m_new == -np.inf:
        return
    d[k] = d[k] * np.exp(m[k] - m_new) + np.exp(value - m_new)
    m[k] = m_new


def cross_entropy(
    logits,
    target,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
):
    """Softmax cross-entropy with torch.nn.functional.cross_entropy's semantics, in float64.

    logits: (C,), (N, C) or (N, C, d1, ...), class dim 1 (0 for 1-D). target: class
    indices shaped like logits without the class dim, or probabilities shaped like logits.
    Returns (loss, grad): loss reduced as asked ("none" keeps the target's shape), grad
    the derivative of that loss with respect to the logits, same shape as the logits.

    Per row, with z the (soft-capped) logits, log q = z - lse the log-probabilities:
      index t:  (1 - eps) w_t (-log q_t) + (eps / C) sum_j w_j (-log q_j) + z_loss w_t lse^2
      probs p:  sum_j w_j p'_j (-log q_j) + z_loss lse^2,   p' = (1 - eps) p + eps / C
    and the gradient is softmax(z) - onehot(t) in the plain case; the comments below give
    each extra term. "mean" divides by the summed weights of non-ignored targets (index
    targets) or by the number of rows (probabilities), as torch does.
    """
    x = _f64(logits)
    if x.ndim == 0:
        raise ValueError("cross_entropy: logits must have at least one dim")
    target = np.asarray(target)
    soft = np.issubdtype(target.dtype, np.floating)
    if x.ndim == 1:
        x = x[None]
        target = target[None]
    n_classes = x.shape[1]
    rows = np.moveaxis(x, 1, -1).reshape(-1, n_classes)
    w = np.ones(n_classes) if weight is None else _f64(weight)
    eps = float(label_smoothing)

    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        z = rows if softcap is None else softcap * np.tanh(rows / softcap)
        lse = _logsumexp(z)
        log_q = z - lse[:, None]
        q = np.exp(log_q)
        if soft:
            p = (1 - eps) * np.moveaxis(_f64(target), 1, -1).reshape(-1, n_classes) + eps / n_classes
            row_loss = -(w * p * log_q).sum(1) + z_loss * lse**2
            # d/dz_j: q_j sum_k w_k p'_k - w_j p'_j, and 2 z_loss lse q_j from the z-loss
            dz = q * (w * p).sum(1, keepdims=True) - w * p + 2 * z_loss * lse[:, None] * q
            denominator = float(len(rows))
        else:
            t = target.reshape(-1).astype(np.int64)
            valid = t != ignore_index
            if ((t[valid] < 0) | (t[valid] >= n_classes)).any():
                raise IndexError(f"Target {t[valid & ((t < 0) | (t >= n_classes))][0]} is out of bounds.")
            safe_t = np.where(valid, t, 0)
            w_t = np.where(valid, w[safe_t], 0.0)
            nll = -log_q[np.arange(len(t)), safe_t]
            smooth = -(w * log_q).sum(1)
            row_loss = (1 - eps) * w_t * nll + eps / n_classes * smooth + z_loss * w_t * lse**2
            row_loss = np.where(valid, row_loss, 0.0)
            one_hot = np.zeros_like(q)
            one_hot[np.arange(len(t)), safe_t] = 1.0
            # d/dz_j: (1 - eps) w_t (q_j - [j == t]) + (eps / C)(W q_j - w_j) + 2 z_loss w_t lse q_j
            dz = (
                (1 - eps) * w_t[:, None] * (q - one_hot)
                + eps / n_classes * (w.sum() * q - w)
                + 2 * z_loss * (w_t * lse)[:, None] * q
            )
            dz = np.where(valid[:, None], dz, 0.0)
            denominator = w_t.sum()
        if softcap is not None:
            dz = dz * (1 - (z / softcap) ** 2)  # d(softcap tanh(x / softcap))/dx

        if reduction == "none":
            loss = row_loss.reshape(np.shape(target)[:1] + np.shape(target)[2:] if soft else np.shape(target))
            if np.ndim(logits) == 1:
                loss = loss.reshape(())
        elif reduction == "sum":
            loss = row_loss.sum()
        elif reduction == "mean":
            loss = row_loss.sum() / denominator
            dz = dz / denominator
        else:
            raise ValueError(f"{reduction} is not a valid value for reduction")
    moved = np.moveaxis(x, 1, -1).shape
    grad = np.moveaxis(dz.reshape(moved), -1, 1).reshape(np.shape(logits))
    return loss, grad


def _logsumexp(z):
    """Row-wise log sum e^z, shifted by the row maximum."""
    m = z.max(axis=1)
    return m + np.log(np.exp(z - m[:, None]).sum(axis=1))
