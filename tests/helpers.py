"""Shared test helpers: reference comparison with torch's own error as the yardstick."""
import numpy as np
import pytest
import torch

# float32 is held to ~1e-6 relative; 16-bit dtypes to twice torch's own error plus this atol.
RTOL_FP32, ATOL_FP32 = 2e-6, 1e-7
ATOL_16BIT = {torch.bfloat16: 2e-3, torch.float16: 2e-4}


def to_f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def assert_matches(actual: torch.Tensor, expected: np.ndarray, rtol: float, atol: float, what: str = "") -> None:
    """Allclose with a report of how many elements are off and where; NaN/inf must match exactly."""
    a = to_f64(actual)
    expected = np.asarray(expected, dtype=np.float64)
    assert a.shape == expected.shape, f"{what}: shape {a.shape} != {expected.shape}"
    same_special = (np.isnan(a) == np.isnan(expected)).all() and (np.isinf(a) == np.isinf(expected)).all()
    assert same_special, f"{what}: NaN/inf positions differ ({np.isnan(a).sum()} NaN vs {np.isnan(expected).sum()})"
    assert (a[np.isinf(a)] == expected[np.isinf(expected)]).all(), f"{what}: inf signs differ"
    finite = np.isfinite(expected)
    err = np.abs(a[finite] - expected[finite])
    bad = err > atol + rtol * np.abs(expected[finite])
    if bad.any():
        where = np.argwhere(finite)[bad][:5].tolist()
        raise AssertionError(
            f"{what}: {bad.sum()} of {bad.size} elements off (max abs err {err.max():.3e}, rtol {rtol}, "
            f"atol {atol}); first at {where}"
        )


def max_abs_err(actual: torch.Tensor, expected: np.ndarray) -> float:
    a, e = to_f64(actual), np.asarray(expected, np.float64)
    finite = np.isfinite(e)
    return float(np.abs(a[finite] - e[finite]).max()) if finite.any() else 0.0


def assert_within_torch_error(ours: torch.Tensor, theirs: torch.Tensor, expected: np.ndarray, what: str = ""):
    """For 16-bit dtypes: our error against float64 is at most twice torch's own plus a small
    atol, plus half a unit in the last place of the largest expected value: the one rounding
    of the output that no 16-bit result escapes (torch can land on the nearer side of it by
    luck: a log_softmax gradient of 37.33 from a rounded y of ours, 37.39 exactly, rounds to
    37.5 where torch's 37.25 is nearer the truth, 0.171 against torch's 0.079)."""
    finite = np.abs(np.asarray(expected, np.float64))
    finite = finite[np.isfinite(finite)]
    largest = float(finite.max()) if finite.size else 0.0
    half_ulp = 2.0 ** np.floor(np.log2(largest)) * torch.finfo(ours.dtype).eps / 2 if largest > 0 else 0.0
    budget = 2 * max_abs_err(theirs, expected) + ATOL_16BIT[ours.dtype] + half_ulp
    assert_matches(ours, expected, rtol=0.0, atol=budget, what=what)


def poisoned(shape, dtype, device) -> torch.Tensor:
    """An output buffer full of NaN, so an element the kernel fails to write cannot pass."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


# Tests of the CPU instruments (interpreter subprocesses, the compile report, the benchmark's
# dry run): CI runs them; on a GPU machine they would only spend its minutes, and its image
# may pair triton 3.6 with a NumPy its interpreter cannot run under.
cpu_instrument = pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU instrument: CI runs it")


def MEAN_LOADS(n, itemsize, programs):
    """O(N) bytes a cross-entropy forward+backward with reduction="mean" loads besides the
    logits (bfloat16/float32 of `itemsize` bytes, class indices): targets twice (8 B each),
    the target's logit and the row loss (4 B each) per row, the divisor once per forward
    program and the upstream factor once per rescale program (4 B each; programs = rows,
    or fewer when short rows share a program: the two kernels group rows alike, and these
    tests have fewer row blocks than the rescale's grid), and the divisor once more for the
    mean."""
    return n * (8 + 8 + itemsize + 4) + 2 * 4 * programs + 4


def MEAN_STORES(n):
    """... and stores: loss and lse per row, then the counter, the total and the mean."""
    return n * (4 + 4) + 12


def edge_elements(n_rows: int, n_cols: int, row_stride: int, vec: int) -> int:
    """Elements of the rows' heads and tails (outside the aligned body of whole vec-element
    vectors; kernels/softmax.py), which the looped paths read once instead of twice."""
    total = 0
    for row in range(n_rows):
        start = row * row_stride
        shift = min(-start % vec, n_cols)
        total += shift + (n_cols - shift) % vec
    return total
