"""softmax_gpu for CuPy arrays: the online softmax and fused cross-entropy in CUDA C.

The kernels (kernels/online_softmax.cu, kernels/cross_entropy.cu, shipped in the wheel as
softmax_gpu/kernels) are compiled at first use on each device by NVRTC through
cupy.RawModule, with cuda_source.NVRTC_OPTIONS, and cached by CuPy on disk; each kernel
function is looked up once per (device, name). Every call runs and allocates on the device
of its input array, whatever the current device. Importing this module never imports torch.
Inputs are CuPy arrays or anything that speaks DLPack (a torch CUDA tensor, say); outputs
are CuPy arrays. float32, float64 (softmax only) and float16; bfloat16 where CuPy can hold
it (CuPy >= 14 with ml_dtypes: an array whose dtype is named 'bfloat16').

    from softmax_gpu import cupy as sgc
    y = sgc.softmax(x, axis=-1)
    loss, grad = sgc.cross_entropy(logits, target)
"""
import functools

try:
    import cupy
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "softmax_gpu.cupy needs CuPy: pip install 'softmax-gpu[cupy]' (cupy-cuda12x); "
        "the PyTorch API (softmax_gpu.softmax, ...) works without it"
    ) from exc


def _device_count() -> int:
    try:
        return cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError:
        return 0


if _device_count() == 0:
    raise RuntimeError("softmax_gpu.cupy needs a CUDA GPU and driver; CuPy found none")

import numpy as np  # noqa: E402

from .config import cuda_launch  # noqa: E402
from .cuda_source import FAMILIES, NVRTC_OPTIONS, cuda_source, kernel_name, matching_shift, vector_width  # noqa: E402

REDUCTIONS = ("none", "mean", "sum")


@functools.lru_cache(maxsize=None)
def _module(device_id: int) -> "cupy.RawModule":
    """All kernels for one device; NVRTC compiles them there on first use (CuPy caches the binary)."""
    return cupy.RawModule(code=cuda_source(), options=NVRTC_OPTIONS)


@functools.lru_cache(maxsize=None)
def _function(device_id: int, name: str) -> "cupy.RawKernel":
    """One compiled kernel on one device, looked up once. Call with that device current."""
    return _module(device_id).get_function(name)


def _kernel(family: str, a, vec: int, warp_rows: bool = False) -> "cupy.RawKernel":
    """The `family` kernel for array a's dtype and packs of vec, a block or (warp_rows) a warp
    per row, on a's device (call inside `with a.device:`, so that a first use compiles it there)."""
    return _function(a.device.id, kernel_name(family, a.dtype.name, vec, warp_rows))


def _launch(family: str, a, vec: int, n_rows: int, n_cols: int, args: tuple, arrays_cached: int = 1) -> None:
    """Launches the `family` kernel over n_rows rows of n_cols; the kernel takes n_rows last."""
    launch = cuda_launch(n_rows, n_cols, vec, arrays_cached)
    kernel = _kernel(family, a, vec, launch.warp_rows)
    kernel((launch.grid,), (launch.block,), args + (np.int64(n_rows),))


def _as_cupy(x, name: str, fn: str):
    if isinstance(x, cupy.ndarray):
        return x
    if hasattr(x, "__dlpack__"):
        return cupy.from_dlpack(x)
    raise TypeError(f"{fn}: '{name}' must be a CuPy array or support DLPack, not {type(x).__name__}")


def _check_dtype(a, fn: str, family: str) -> None:
    allowed = FAMILIES[family]
    if a.dtype.name not in allowed:
        raise TypeError(f"{fn}: expected a {' / '.join(allowed)} array, got {a.dtype}")


def _same_device(fn: str, **arrays) -> None:
    (first, a), *others = arrays.items()
    for name, b in others:
        if b.device != a.device:
            raise ValueError(f"{fn}: '{name}' is on device {b.device.id} but '{first}' is on device {a.device.id}")


def _axis(axis: int, ndim: int) -> int:
    rank = max(ndim, 1)
    if not -rank <= axis < rank:
        raise IndexError(f"axis {axis} is out of bounds for array of dimension {ndim}")
    return axis % rank


def _rows(a, axis: int):
    """(rows view or copy with unit column stride, its moved shape)."""
    moved = cupy.moveaxis(a, axis, -1) if a.ndim else a.reshape(1)
    rows = moved.reshape(-1, moved.shape[-1])
    if rows.strides[-1] != rows.itemsize:
        rows = cupy.ascontiguousarray(rows)
    return rows, moved.shape


def _row_stride(a) -> int:
    return a.strides[0] // a.itemsize if a.shape[0] > 1 else a.shape[1]


def _vector_width(*arrays) -> int:
    """Packs of 128 bits when every array's rows sit at the same offset from a 16-byte boundary."""
    return vector_width(arrays[0].dtype.name, [(a.data.ptr, _row_stride(a)) for a in arrays])


def _empty_rows_like(a, shape):
    """An empty C-contiguous array of a's dtype and 2-D `shape` (not empty) that starts at a's
    offset from a 16-byte boundary, so that its rows and a's share pack boundaries (and the
    vectorised kernels apply) whenever a's row stride is its row length, or differs from it by
    a multiple of 16 bytes. Costs at most 15 bytes of padding."""
    n = shape[0] * shape[1]
    buffer = cupy.empty(n + 16 // a.itemsize, dtype=a.dtype)
    shift = matching_shift(a.data.ptr, buffer.data.ptr, a.itemsize)
    return buffer[shift : shift + n].reshape(shape)


def _back(rows, moved_shape, axis: int, ndim: int):
    if ndim == 0:
        return rows.reshape(())
    return cupy.ascontiguousarray(cupy.moveaxis(rows.reshape(moved_shape), -1, axis))


def _forward(x, axis: int, log: bool, fn: str):
    x = _as_cupy(x, "x", fn)
    _check_dtype(x, fn, "softmax_fwd")
    axis = _axis(axis, x.ndim)
    with x.device:
        if x.size == 0:  # (N, 0), (0, C), ...: nothing to launch
            return cupy.empty_like(x)
        rows, moved_shape = _rows(x, axis)
        out = _empty_rows_like(rows, rows.shape)
        n_rows, n_cols = rows.shape
        vec = _vector_width(rows, out)
        _launch("softmax_fwd", x, vec, n_rows, n_cols,
                (rows, out, np.int64(_row_stride(rows)), np.int64(n_cols), np.int32(n_cols), np.int32(log)))  # fmt: skip
        return _back(out, moved_shape, axis, x.ndim)


def _backward(y, dy, axis: int, log: bool, fn: str):
    y, dy = _as_cupy(y, "y", fn), _as_cupy(dy, "dy", fn)
    _check_dtype(y, fn, "softmax_bwd")
    if dy.shape != y.shape or dy.dtype != y.dtype:
        raise ValueError(f"{fn}: y {y.shape} {y.dtype} and dy {dy.shape} {dy.dtype} must match")
    _same_device(fn, y=y, dy=dy)
    axis = _axis(axis, y.ndim)
    with y.device:
        if y.size == 0:
            return cupy.empty_like(y)
        y_rows, moved_shape = _rows(y, axis)
        dy_rows, _ = _rows(dy, axis)
        dx = _empty_rows_like(y_rows, y_rows.shape)
        n_rows, n_cols = y_rows.shape
        vec = _vector_width(y_rows, dy_rows, dx)
        _launch("softmax_bwd", y, vec, n_rows, n_cols,
                (y_rows, dy_rows, dx, np.int64(_row_stride(y_rows)), np.int64(_row_stride(dy_rows)),
                 np.int64(n_cols), np.int32(n_cols), np.int32(log)), arrays_cached=2)  # fmt: skip
        return _back(dx, moved_shape, axis, y.ndim)


def softmax(x, axis: int = -1):
    """softmax along `axis`: e^(x - max) / sum e^(x - max), in one pass over rows that fit on chip."""
    return _forward(x, axis, False, "softmax_gpu.cupy.softmax")


def log_softmax(x, axis: int = -1):
    """log_softmax along `axis`: x - max - log(sum e^(x - max))."""
    return _forward(x, axis, True, "softmax_gpu.cupy.log_softmax")


def softmax_backward(y, dy, axis: int = -1):
    """Gradient of softmax at output y for upstream dy: y * (dy - sum(dy * y))."""
    return _backward(y, dy, axis, False, "softmax_gpu.cupy.softmax_backward")


def log_softmax_backward(y, dy, axis: int = -1):
    """Gradient of log_softmax at output y for upstream dy: dy - e^y * sum(dy)."""
    return _backward(y, dy, axis, True, "softmax_gpu.cupy.log_softmax_backward")


def cross_entropy(logits, target, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0):
    """Fused softmax cross-entropy of (N, C) logits and (N,) class indices.

    Returns (loss, grad): loss a float32 scalar ("mean", "sum") or (N,) array ("none"), and
    grad the gradient of that loss with respect to the logits (for "none", of the sum of
    the per-row losses), in the logits' dtype, from the same single pass. Semantics as
    torch.nn.functional.cross_entropy: rows whose target is ignore_index count for nothing,
    "mean" divides by the number of the others (NaN when there are none). A target outside
    [0, C) gives NaN for its row; it is never used as an address. With C == 0 every target
    is out of range: loss NaN, except 0 for ignored rows (NaN too with label_smoothing > 0,
    as torch), "mean" NaN, and an (N, 0) grad. logits and
    target must be on the same device; the work runs there.
    """
    fn = "softmax_gpu.cupy.cross_entropy"
    logits, target = _as_cupy(logits, "logits", fn), _as_cupy(target, "target", fn)
    _check_dtype(logits, fn, "cross_entropy")
    if logits.ndim != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"{fn}: expected (N, C) logits and (N,) targets, got {logits.shape} and {target.shape}")
    if target.dtype.kind not in "iu":
        raise TypeError(f"{fn}: target must hold integer class indices, got {target.dtype}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: {reduction!r} is not a valid value for reduction (expected one of {REDUCTIONS})")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{fn}: label_smoothing must be between 0.0 and 1.0, but got {label_smoothing}")
    _same_device(fn, logits=logits, target=target)
    ignore_index = np.int64(ignore_index)
    n_rows, n_cols = logits.shape
    with logits.device:
        target = cupy.ascontiguousarray(target, dtype=cupy.int64)
        ignored = target == ignore_index
        counted = (~ignored).sum(dtype=cupy.float32)  # on the device: no sync
        scale = (1.0 / counted if reduction == "mean" else cupy.ones((), cupy.float32)).astype(cupy.float32)
        if logits.strides[-1] != logits.itemsize:
            logits = cupy.ascontiguousarray(logits)
        if n_cols == 0:
            # No class exists: every target but ignore_index is out of range, so its row's loss
            # is NaN (the rule for any out-of-range target) and an ignored row's is 0, as torch
            # gives for ignored rows; with label smoothing every row is NaN, as torch's eps / C
            # (inf) times the row's smoothing term (0). Nothing to launch.
            loss = cupy.where(ignored, cupy.zeros((), cupy.float32), cupy.full((), np.nan, cupy.float32))
            if label_smoothing > 0:
                loss[...] = np.nan
            grad = cupy.empty(logits.shape, dtype=logits.dtype)
            if reduction == "sum" and label_smoothing > 0:  # NaN even over no rows, as torch (0 * inf)
                return cupy.full((), np.nan, cupy.float32), grad
        else:
            grad = _empty_rows_like(logits, logits.shape) if n_rows else cupy.empty(logits.shape, logits.dtype)
            loss = cupy.empty(n_rows, dtype=cupy.float32)
            lse = cupy.empty(n_rows, dtype=cupy.float32)
            if n_rows:
                vec = _vector_width(logits, grad)
                _launch("cross_entropy", logits, vec, n_rows, n_cols,
                        (logits, target, loss, lse, grad, np.int64(_row_stride(logits)), np.int64(n_cols),
                         np.int32(n_cols), ignore_index, np.float32(label_smoothing), scale))  # fmt: skip
        if reduction == "none":
            return loss, grad
        total = loss.sum()
        return (total / counted if reduction == "mean" else total), grad
