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
                    m, d = _merge(m, d, k, value, 1.0)
        while m.size > 1:  # tree merge of lane pairs, as a shuffle reduction would
            half = m.size // 2
            m_new = np.maximum(m[:half], m[half:])
            d = _rescale(d[:half], m[:half], m_new) + _rescale(d[half:], m[half:], m_new)
            m = m_new
        with np.errstate(invalid="ignore"):
            out[r] = np.exp(row - m[0]) / d[0]
    return out.reshape(np.shape(x)) if np.ndim(x) > 1 else out[0]


def _rescale(d, m_old, m_new):
    """d * e^(m_old - m_new), taking 0 where the lane saw only -inf (avoids -inf - -inf)."""
    with np.errstate(invalid="ignore"):
        return np.where(m_new == -np.inf, 0.0, d * np.exp(m_old - m_new))


def _merge(m, d, k, value, weight):
    m_new = max(m[k], value)
    if m_new == -np.inf:
        return m, d
    d[k] = d[k] * np.exp(m[k] - m_new) + weight * np.exp(value - m_new)
    m[k] = m_new
    return m, d
