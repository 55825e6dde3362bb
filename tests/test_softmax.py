"""softmax / log_softmax / hardmax against the float64 NumPy reference, through the interpreter on CPU."""
import contextlib
import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ATOL_FP32, RTOL_FP32, assert_matches, assert_within_torch_error, edge_elements, poisoned

import softmax_gpu
from softmax_gpu import config, reference
from softmax_gpu.ops.softmax import launch_softmax_bwd, launch_softmax_fwd
from softmax_gpu.traffic import TrafficCounter

OPS = {  # name -> (ours, torch's, reference forward, reference backward)
    "softmax": (softmax_gpu.softmax, torch.softmax, reference.softmax, reference.softmax_backward),
    "log_softmax": (softmax_gpu.log_softmax, torch.log_softmax, reference.log_softmax, reference.log_softmax_backward),
}

# float32 tolerance per op. log_softmax's y = (x - m) - log(d) subtracts two terms of size
# |x - m| ~ 10 that were each rounded, so its error is absolute (~1e-6 per unit of range),
# not relative to a result that can be near 0.
TOL32 = {"softmax": (RTOL_FP32, ATOL_FP32), "log_softmax": (RTOL_FP32, 4e-6)}

# Shapes (rows, cols) per regime, at the interpreter's small scale: 1 column; fewer
# columns than the smallest block; a block-sized row; odd widths that leave a ragged
# last block; and a row that needs several blocks once block_limit(16) is in force.
SHAPES = [(1, 1), (3, 1), (4, 7), (2, 16), (5, 100), (3, 781)]


# Paths a test runs on: the default single block; 16-wide blocks, which force the looped
# path; and split rows (chunks of 32 columns in 16-wide blocks, config.force_split).
SPLIT = "split"
PATHS = [None, 16, SPLIT]


@contextlib.contextmanager
def on_path(max_block):
    """Runs the block on the path PATHS names."""
    if max_block == SPLIT:
        with config.block_limit(16), config.force_split(32):
            yield
    else:
        with config.block_limit(max_block or config.MAX_BLOCK_SOFTMAX_FWD):
            yield


def rows_of(shape, dtype, device):
    return (3 * torch.randn(shape, dtype=torch.float32)).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------
# The seed's worked examples
# ---------------------------------------------------------------------------------------


def test_seed_examples(device):
    x = torch.tensor([2.0, 3.0, 5.0], device=device)
    np.testing.assert_allclose(softmax_gpu.softmax(x).cpu().numpy(), [0.04201007, 0.11419519, 0.8437947], rtol=1e-6)
    np.testing.assert_allclose((x / x.sum()).cpu().numpy(), [0.2, 0.3, 0.5])  # plain normalisation, for contrast
    big = [123.0, 456.0, 789.0]
    with pytest.warns(RuntimeWarning):
        assert np.isnan(reference.naive_softmax(big)).any()
    with np.errstate(all="raise"):  # the stable one must not even warn
        stable = reference.softmax(big)
    np.testing.assert_allclose(stable, [5.75274406e-290, 2.39848787e-145, 1.0], rtol=1e-8)
    ours = softmax_gpu.softmax(torch.tensor(big, dtype=torch.float64, device=device))
    np.testing.assert_allclose(ours.cpu().numpy(), stable, rtol=1e-12)
    hard = softmax_gpu.hardmax(torch.tensor([1.0, 2, 3, 4, 5], device=device))
    assert hard.tolist() == [0, 0, 0, 0, 1]


def test_hardmax_is_the_low_temperature_limit(device):
    x = torch.tensor([[0.3, 2.0, 2.0, -1.0], [5.0, 1.0, 4.9, 0.0]], device=device)
    np.testing.assert_array_equal(softmax_gpu.hardmax(x).cpu().numpy(), reference.hardmax(x.cpu().numpy()))
    assert softmax_gpu.hardmax(x)[0].tolist() == [0, 1, 0, 0]  # first index on ties
    np.testing.assert_allclose(softmax_gpu.softmax(x[1] / 1e-3).cpu().numpy(), [1, 0, 0, 0], atol=1e-12)
    assert softmax_gpu.hardmax(x, dim=0).sum(0).tolist() == [1, 1, 1, 1]


# ---------------------------------------------------------------------------------------
# Forward against the reference, both paths, outputs poisoned
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("max_block", [None, 16])
def test_forward_float32_every_element_written(op, shape, max_block, device):
    x = rows_of(shape, torch.float32, device)
    y = poisoned(shape, torch.float32, device)
    cfg = config.row_config(shape[1], max_block or config.MAX_BLOCK_SOFTMAX_FWD)
    used = launch_softmax_fwd(x, y, log=op == "log_softmax", cfg=cfg)
    assert used.single_block == (shape[1] <= used.block_n)
    assert_matches(y, OPS[op][2](x.cpu().numpy()), *TOL32[op], what=op)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("max_block", PATHS)
def test_forward_16bit_within_twice_torch_error(op, dtype, max_block, device):
    ours_fn, torch_fn, ref_fn, _ = OPS[op]
    x = rows_of((6, 203), dtype, device)
    expected = ref_fn(x.double().cpu().numpy())
    theirs = torch_fn(x.cpu(), -1)  # torch's own result in this dtype
    with on_path(max_block):
        ours = ours_fn(x)
    assert ours.dtype == dtype
    assert_within_torch_error(ours, theirs, expected, what=f"{op} {dtype}")


@pytest.mark.parametrize("op", OPS)
def test_dtype_argument_matches_torch(op, device):
    ours_fn, torch_fn, _, _ = OPS[op]
    x = rows_of((3, 50), torch.bfloat16, device)
    up = ours_fn(x, dim=-1, dtype=torch.float32)  # exact upcast inside the kernel
    assert up.dtype == torch.float32
    torch.testing.assert_close(up.cpu(), torch_fn(x.cpu(), -1, dtype=torch.float32), rtol=TOL32[op][0], atol=TOL32[op][1])
    x32 = rows_of((3, 50), torch.float32, device)
    down = ours_fn(x32, dim=-1, dtype=torch.bfloat16)  # narrowing cast happens first, like torch
    assert down.dtype == torch.bfloat16
    torch.testing.assert_close(down.cpu(), torch_fn(x32.cpu(), -1, dtype=torch.bfloat16), rtol=8e-3, atol=8e-3)
    f64 = ours_fn(x32, dim=-1, dtype=torch.float64)
    torch.testing.assert_close(f64.cpu(), torch_fn(x32.cpu().double(), -1), rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------
# Odd widths and unaligned rows: the aligned body, head and tail (128-bit loads at any width)
# ---------------------------------------------------------------------------------------

# (x dtype, y dtype, x column offset in its buffer, y offset, extra columns of x's buffer, of y's)
LAYOUTS = {
    "contiguous": (torch.float32, torch.float32, 0, 0, 0, 0),
    "bf16 contiguous": (torch.bfloat16, torch.bfloat16, 0, 0, 0, 0),
    "bf16 in, fp32 out": (torch.bfloat16, torch.float32, 0, 0, 0, 0),
    "unaligned bases, strides agree": (torch.float16, torch.float16, 3, 5, 9, 9),
    "strides disagree (no split)": (torch.float32, torch.float32, 1, 0, 9, 0),
    "float64 offset": (torch.float64, torch.float64, 1, 1, 3, 3),
}
# (rows, cols) and the path (a PATHS entry) per regime of the row layout; the looped and split
# paths read the rows twice, the split one cutting each row's body into 32-wide chunks.
LAYOUT_PATHS = {"single": ((3, 1501), None), "looped": ((3, 101), 16), "split": ((3, 101), SPLIT),
                "short rows": ((37, 13), None), "tiny": ((5, 3), None)}  # fmt: skip


def in_buffer(n_rows, n_cols, dtype, offset, extra, fill):
    """An (n_rows, n_cols) view at column `offset` of a wider buffer whose other entries are `fill`."""
    buf = torch.full((n_rows, n_cols + extra), fill, dtype=dtype)
    return buf, buf[:, offset:offset + n_cols]


@pytest.mark.skipif(torch.cuda.is_available(), reason="traffic and bounds are counted in Triton's interpreter")
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("path", LAYOUT_PATHS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_odd_widths_and_unaligned_rows(op, path, layout):
    """Every element of every row is read and written exactly once whatever the rows' alignment:
    NaN around the views (a stray read would turn its row NaN, a stray write would overwrite
    it), a NaN-poisoned output, the exact bytes moved, and the float64 reference, forward and
    backward, on the single-block, looped, split and short-rows paths."""
    (n_rows, n_cols), max_block = LAYOUT_PATHS[path]
    split_path = max_block == SPLIT
    x_dtype, y_dtype, x_off, y_off, x_extra, y_extra = LAYOUTS[layout]
    log = op == "log_softmax"
    nan = float("nan")
    x_buf, x = in_buffer(n_rows, n_cols, x_dtype, x_off, x_extra, nan)
    x.copy_(rows_of((n_rows, n_cols), x_dtype, "cpu"))
    y_buf, y = in_buffer(n_rows, n_cols, y_dtype, y_off, y_extra, nan)
    cfg = None if max_block in (None, SPLIT) else config.row_config(n_cols, max_block, y.element_size())
    x_untouched = x_buf.clone()
    y_outside = torch.ones(y_buf.shape, dtype=torch.bool)
    y_outside[:, y_off:y_off + n_cols] = False
    # Bounds are checked against the buffers, except on the split path, whose launches also
    # touch the partials they allocate (the NaN around the views still catches strays there).
    with TrafficCounter(buffers=[] if split_path else [x_buf, y_buf]) as fwd, on_path(max_block):
        used = launch_softmax_fwd(x, y, log, cfg=cfg)
    if split_path:
        assert isinstance(used, config.SplitConfig) and used.chunks == 4
    else:
        assert used.single_block == (max_block is None) and (used.rows > 1) == (path in ("short rows", "tiny"))
    split = "disagree" not in layout
    assert (used.vec > 1) == split
    expected = OPS[op][2](x.double().numpy())
    tol = TOL32[op] if y_dtype == torch.float32 else (1e-12, 1e-12) if y_dtype == torch.float64 else (1e-2, 1e-2)
    assert_matches(y, expected, *tol, what=f"{op} {layout} {path}")
    assert torch.equal(x_buf.isnan(), x_untouched.isnan())
    assert y_buf[y_outside].isnan().all(), "a write outside the rows"
    reads = x.numel() * x.element_size()
    # The split path: 2 partials a chunk, stored once and read by each chunk's program of the
    # row, which merges them itself: O(rows x chunks^2) values.
    acc = 8 if y_dtype == torch.float64 else 4
    partials = n_rows * used.chunks * acc if split_path else 0
    chunks = used.chunks if split_path else 0
    if split_path:  # the stats and the output launches each read the whole row (chunk 0 the edge)
        reads = 2 * reads + 2 * partials * chunks
    elif not used.single_block:  # the looped path reads the body twice, the edge once
        edge = edge_elements(n_rows, n_cols, x.stride(0), used.vec) if used.edge else 0
        reads = 2 * reads - edge * x.element_size()
    assert (fwd.bytes_loaded, fwd.bytes_stored) == (reads, y.numel() * y.element_size() + 2 * partials)

    # Backward: y, dy and dx in the same kind of layout as y.
    dy_buf, dy = in_buffer(n_rows, n_cols, y_dtype, y_off, y_extra, nan)
    dy.copy_(torch.randn(n_rows, n_cols).to(y_dtype))
    dx_buf, dx = in_buffer(n_rows, n_cols, y_dtype, y_off, y_extra, nan)
    with TrafficCounter(buffers=[] if split_path else [y_buf, dy_buf, dx_buf]) as bwd, on_path(max_block):
        used = launch_softmax_bwd(y, dy, dx, log, cfg=cfg)
    assert used.vec > 1  # y, dy and dx share a layout
    expected = OPS[op][3](y.double().numpy(), dy.double().numpy())
    # dx = y (dy - s) cancels in dy - s: float32 error is absolute, about 1e-7 of |dy| ~ 1
    bwd_tol = (1e-5, 1e-6) if y_dtype == torch.float32 else tol
    assert_matches(dx, expected, *bwd_tol, what=f"{op} backward {layout} {path}")
    assert dx_buf[y_outside].isnan().all(), "a write outside the rows"
    n = y.numel() * y.element_size()
    reads = 2 * n
    if split_path:  # and one partial sum a chunk, read by each chunk's program of the row
        reads = (3 * n if log else 4 * n) + partials * chunks
    elif not used.single_block:
        edge = edge_elements(n_rows, n_cols, y.stride(0), used.vec) * y.element_size() if used.edge else 0
        reads = (3 * n - edge) if log else (4 * n - 2 * edge)
    assert (bwd.bytes_loaded, bwd.bytes_stored) == (reads, n + partials)


def test_row_layout_covers_every_column_once():
    """The index arithmetic of row_layout/edge_cols, replayed in Python for every start
    alignment and width: head, body and tail cover [0, n_cols) exactly once, the body starts
    on a vector boundary and is whole vectors, and head and tail are shorter than a vector."""
    for vec in (1, 2, 4, 8):
        for start in range(0, 3 * vec):
            for n_cols in range(0, 5 * vec):
                body = (start + vec - 1) // vec * vec
                shift = min(body - start, n_cols)
                n_body = (n_cols - shift) // vec * vec
                head = list(range(shift))
                tail = list(range(shift + n_body, n_cols))
                covered = head + list(range(shift, shift + n_body)) + tail
                assert covered == list(range(n_cols)), (vec, start, n_cols)
                assert body % vec == 0 and n_body % vec == 0 and len(head) < vec and len(tail) < vec
                if n_body:
                    assert (start + shift) == body  # the body's first element is the aligned one
                expected_edge = edge_elements(2, n_cols, start, vec) - edge_elements(1, n_cols, start, vec)
                assert len(head) + len(tail) == expected_edge  # row 1 of rows `start` apart


# ---------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_block", PATHS)
def test_properties(max_block, device):
    x = rows_of((4, 45), torch.float32, device)
    with on_path(max_block):
        y = softmax_gpu.softmax(x)
        torch.testing.assert_close(y.sum(-1).cpu(), torch.ones(4), rtol=0, atol=2e-6)
        assert ((y >= 0) & (y <= 1)).all()
        # Shift invariance: exact in float64; in float32 x + 1000 is itself rounded, so check it is stable.
        x64 = x.double()
        torch.testing.assert_close(softmax_gpu.softmax(x64 + 1000.0), softmax_gpu.softmax(x64), rtol=1e-10, atol=1e-13)
        shifted = x + 1000.0
        assert_matches(softmax_gpu.softmax(shifted), reference.softmax(shifted.cpu().numpy()), RTOL_FP32, ATOL_FP32)
        torch.testing.assert_close(softmax_gpu.log_softmax(x).exp(), y, rtol=1e-5, atol=1e-7)

        masked = x.clone()
        masked[0, ::3] = -float("inf")
        masked[1, :] = -float("inf")
        ym = softmax_gpu.softmax(masked)
        assert (ym[0, ::3] == 0).all()  # exact zeros
        assert torch.isnan(ym[1]).all() and torch.isnan(torch.softmax(masked.cpu(), -1)[1]).all()  # like torch
        assert torch.isneginf(softmax_gpu.log_softmax(masked)[0, ::3]).all()
        assert_matches(ym[[0, 2, 3]], reference.softmax(masked[[0, 2, 3]].cpu().numpy()), RTOL_FP32, ATOL_FP32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("max_block", PATHS)
def test_huge_logits_stay_finite(dtype, max_block, device):
    x = torch.tensor([[1e4, -1e4, 0.0, 9990.0] * 10, [-1e4] * 39 + [1e4]], dtype=dtype, device=device)
    with on_path(max_block):
        y, ly = softmax_gpu.softmax(x), softmax_gpu.log_softmax(x)
    assert torch.isfinite(y).all() and torch.isfinite(ly).all()
    assert_matches(y.float(), reference.softmax(x.double().cpu().numpy()), rtol=1e-2, atol=1e-3)


def nan_rows(n_cols, device):
    """Rows that hide a NaN from a NaN-dropping maximum in different ways, and a clean row."""
    nan, inf = float("nan"), float("inf")
    x = rows_of((6, n_cols), torch.float32, device)
    x[0, 0] = nan  # the first element: every lane's running max is still -inf
    x[1, n_cols // 2 + 3] = nan  # the middle of a later block
    x[2, :] = -inf
    x[2, n_cols - 5] = nan  # NaN among -inf only: max(-inf, NaN) must not be -inf
    x[3, n_cols - 1] = nan  # the ragged last block
    x[4, :] = nan
    return x


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("max_block", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_makes_its_row_nan(op, max_block, dtype, device):
    """Any NaN in a row makes the whole row NaN, on the single-block, looped and split paths, as
    in torch; the clean row is unaffected. Gradients likewise."""
    ours_fn, torch_fn, ref_fn, ref_bwd = OPS[op]
    x = nan_rows(61, device).to(dtype)
    with on_path(max_block):
        leaf = x.detach().requires_grad_()
        y = ours_fn(leaf, -1)
        dy = torch.randn_like(y)
        y.backward(dy)
    expected = torch_fn(x.double().cpu(), -1)
    assert torch.isnan(y[:5].float()).all(), torch.isnan(y.float()).sum(-1)
    assert_matches(y[5:].float(), ref_fn(x[5:].double().cpu().numpy()), 2e-2, 1e-2, what="clean row")
    assert torch.isnan(expected[:5]).all()  # torch agrees
    assert torch.isnan(leaf.grad[:5].float()).all() and torch.isfinite(leaf.grad[5]).all()


# ---------------------------------------------------------------------------------------
# Layouts: any rank, any dim, non-contiguous, empty
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dim", [0, 1, 2, -1])
def test_3d_along_every_dim(op, dim, device):
    ours_fn, _, ref_fn, _ = OPS[op]
    x = rows_of((3, 4, 37), torch.float32, device).reshape(3, 4, 37)
    for max_block in (None, 16):
        with config.block_limit(max_block or config.MAX_BLOCK_SOFTMAX_FWD):
            y = ours_fn(x, dim=dim)
        assert y.shape == x.shape and y.is_contiguous()
        assert_matches(y, ref_fn(x.cpu().numpy(), axis=dim), *TOL32[op], what=f"dim={dim}")


def test_non_contiguous_inputs(device):
    base = rows_of((40, 30), torch.float32, device)
    for x in (base.t(), base[:, ::2], base[::3], base.t()[5:9]):
        assert not x.is_contiguous()
        assert_matches(softmax_gpu.softmax(x), reference.softmax(x.cpu().numpy()), RTOL_FP32, ATOL_FP32)
        expected = reference.log_softmax(x.cpu().numpy(), 0)
        assert_matches(softmax_gpu.log_softmax(x, 0), expected, *TOL32["log_softmax"])


def test_empty_and_degenerate_shapes(device):
    for shape, dim in [((0, 5), -1), ((5, 0), -1), ((0,), 0), ((2, 0, 3), 1), ((2, 0, 3), 2)]:
        x = torch.empty(shape, device=device)
        assert softmax_gpu.softmax(x, dim).shape == shape
        assert softmax_gpu.log_softmax(x, dim).shape == shape
        assert softmax_gpu.hardmax(x, dim).shape == shape
    scalar = torch.tensor(3.5, device=device)
    assert softmax_gpu.softmax(scalar).item() == 1.0 and softmax_gpu.log_softmax(scalar, 0).item() == 0.0
    ones = softmax_gpu.softmax(rows_of((6, 1), torch.float32, device))  # dim of size 1
    assert (ones == 1).all()


# ---------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------


def test_backward_matches_explicit_jacobian(device):
    x = rows_of((1, 6), torch.float64, device).requires_grad_()
    y = softmax_gpu.softmax(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    jac = reference.softmax_jacobian(y.detach().cpu().numpy()[0])
    np.testing.assert_allclose(jac, jac.T, atol=0)  # the softmax Jacobian is symmetric
    np.testing.assert_allclose(x.grad.cpu().numpy()[0], jac.T @ dy.cpu().numpy()[0], rtol=1e-12, atol=1e-15)
    full = torch.autograd.functional.jacobian(lambda v: softmax_gpu.softmax(v), x.detach()[0])
    np.testing.assert_allclose(full.cpu().numpy(), jac, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", [(3, 1), (4, 7), (5, 100), (3, 781)])
@pytest.mark.parametrize("max_block", [None, 16])
def test_backward_launcher_every_element_written(op, shape, max_block, device):
    _, _, ref_fwd, ref_bwd = OPS[op]
    y = torch.from_numpy(ref_fwd(3 * np.random.default_rng(torch.seed() % 2**32).standard_normal(shape)))
    y = y.float().to(device)
    dy = rows_of(shape, torch.float32, device)  # non-uniform upstream gradient
    dx = poisoned(shape, torch.float32, device)
    cfg = config.row_config(shape[1], max_block or config.MAX_BLOCK_SOFTMAX_BWD)
    launch_softmax_bwd(y, dy, dx, log=op == "log_softmax", cfg=cfg)
    expected = ref_bwd(y.cpu().numpy(), dy.cpu().numpy())
    # The row sum (of dy, or dy * y) is accumulated in float32 over n terms: its rounding,
    # about eps * sqrt(n) * the largest term, reaches dx scaled by e^y or y (both <= 1).
    terms = (dy if op == "log_softmax" else dy * y).abs().max().item()
    atol = 1e-6 + 4 * torch.finfo(torch.float32).eps * shape[1] ** 0.5 * terms
    assert_matches(dx, expected, rtol=1e-5, atol=atol, what=op)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_matches_torch_autograd(op, dtype, device):
    ours_fn, torch_fn, _, _ = OPS[op]
    x = rows_of((3, 5, 300), dtype, device)
    dy = rows_of((3, 5, 300), dtype, device)
    for dim in (-1, 1):
        a = x.clone().requires_grad_()
        ours_fn(a, dim).backward(dy)
        b = x.detach().cpu().double().requires_grad_()
        torch_fn(b, dim).backward(dy.cpu().double())
        c = x.detach().cpu().clone().requires_grad_()
        torch_fn(c, dim).backward(dy.cpu())
        assert a.grad.dtype == dtype
        if dtype == torch.float32:
            # dx = y (dy - sum(dy y)) inherits y's float32 rounding times |dy - s|, which reaches
            # ~10 max|dy| here: the absolute budget scales with the upstream gradient.
            assert_matches(a.grad, b.grad.numpy(), rtol=1e-5, atol=2e-6 * dy.abs().max().item())
        else:
            assert_within_torch_error(a.grad, c.grad, b.grad.numpy(), what=f"{op} grad {dtype}")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("max_block", [None, 16])
def test_gradcheck_float64(op, max_block, device):
    x = torch.randn(3, 21, dtype=torch.float64, device=device, requires_grad=True)
    with config.block_limit(max_block or config.MAX_BLOCK_SOFTMAX_BWD):
        assert torch.autograd.gradcheck(lambda v: OPS[op][0](v, 0), (x,))
        assert torch.autograd.gradcheck(lambda v: OPS[op][0](v, -1), (x,))


def test_backward_through_dtype_cast(device):
    x = rows_of((2, 40), torch.bfloat16, device).requires_grad_()
    softmax_gpu.softmax(x, dtype=torch.float32).backward(torch.ones(2, 40, device=device).cumsum(-1))
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()


# ---------------------------------------------------------------------------------------
# Memory traffic (exact, via the interpreter) and bounds
# ---------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="traffic is counted in Triton's interpreter")
@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_traffic_forward(log, dtype):
    rows, cols = 3, 101  # odd: every row has a head or a tail
    x = rows_of((rows, cols), dtype, "cpu")
    y = torch.empty_like(x)
    element = rows * cols * x.element_size()
    with TrafficCounter(buffers=[x, y]) as single:
        cfg = launch_softmax_fwd(x, y, log)
    assert cfg.single_block
    assert (single.bytes_loaded, single.bytes_stored) == (element, element)  # 1 read + 1 write
    with TrafficCounter(buffers=[x, y]) as looped:
        cfg = launch_softmax_fwd(x, y, log, cfg=config.row_config(cols, 32))
    assert not cfg.single_block and cfg.block_n == 32
    edge = edge_elements(rows, cols, cols, 16 // x.element_size()) * x.element_size()
    assert edge > 0
    # 2 reads + 1 write; the few head and tail elements (the edge) are read once.
    assert (looped.bytes_loaded, looped.bytes_stored) == (2 * element - edge, element)


@pytest.mark.skipif(torch.cuda.is_available(), reason="traffic is counted in Triton's interpreter")
@pytest.mark.parametrize("log", [False, True])
def test_traffic_backward(log):
    y = torch.softmax(torch.randn(4, 77), -1)
    dy, dx = torch.randn(4, 77), torch.empty(4, 77)
    element = y.numel() * 4
    with TrafficCounter(buffers=[y, dy, dx]) as single:
        assert launch_softmax_bwd(y, dy, dx, log).single_block
    assert (single.bytes_loaded, single.bytes_stored) == (2 * element, element)  # 2 reads + 1 write
    with TrafficCounter(buffers=[y, dy, dx]) as looped:
        assert not launch_softmax_bwd(y, dy, dx, log, cfg=config.row_config(77, 16)).single_block
    edge = edge_elements(4, 77, 77, 4) * 4
    # log_softmax's reduction pass needs only dy; the edge is read once.
    reads = (3 * element - edge) if log else (4 * element - 2 * edge)
    assert (looped.bytes_loaded, looped.bytes_stored) == (reads, element)


@pytest.mark.skipif(torch.cuda.is_available(), reason="traffic is counted in Triton's interpreter")
@pytest.mark.parametrize("cols, reads", [(16384, 2), (16385, 4)])
def test_traffic_backward_single_read_limit(cols, reads):
    """The backward reads y and dy once up to 16384 columns (config.MAX_BLOCK_SOFTMAX_BWD),
    and twice past it (one program a row: two such rows would otherwise split)."""
    assert config.MAX_BLOCK_SOFTMAX_BWD == 16384
    y = torch.softmax(torch.randn(2, cols), -1)
    dy, dx = torch.randn(2, cols), torch.empty(2, cols)
    with TrafficCounter(buffers=[y, dy, dx]) as t, config.no_split():
        launch_softmax_bwd(y, dy, dx, False)
    edge = edge_elements(2, cols, cols, 4) * 4 if reads == 4 else 0  # the looped path reads the edge once
    assert (t.bytes_loaded, t.bytes_stored) == (reads * y.numel() * 4 - 2 * edge, y.numel() * 4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="bounds are checked in Triton's interpreter")
def test_traffic_counter_catches_out_of_bounds():
    """The bounds check is live: a launch that claims 50 columns on 40-column rows reads past the end."""
    from softmax_gpu.kernels.softmax import softmax_fwd_kernel

    x, y = torch.randn(2, 40), torch.empty(2, 40)
    with pytest.raises(Exception, match="OutOfBoundsAccess"), TrafficCounter(buffers=[x, y]):
        softmax_fwd_kernel[(2,)](x, y, 40, 40, 2, 50, LOG=False, BLOCK_N=64, SINGLE_BLOCK=True, ACC_FP64=False)


# ---------------------------------------------------------------------------------------
# Bad input, devices, modules, registration
# ---------------------------------------------------------------------------------------


def test_bad_input_raises_before_launch(device):
    x = torch.randn(3, 4, device=device)
    with pytest.raises(TypeError, match="floating-point"):
        softmax_gpu.softmax(torch.ones(3, 4, dtype=torch.int64, device=device))
    with pytest.raises(TypeError, match="floating-point"):
        softmax_gpu.log_softmax(torch.ones(3, dtype=torch.bool, device=device))
    with pytest.raises(IndexError, match="Dimension out of range"):
        softmax_gpu.softmax(x, dim=2)
    with pytest.raises(IndexError, match="Dimension out of range"):
        softmax_gpu.hardmax(x, dim=-3)
    with pytest.raises(TypeError, match="must be Tensor"):
        softmax_gpu.softmax([1.0, 2.0])
    with pytest.raises(TypeError, match="dtype"):
        softmax_gpu.softmax(x, dtype=torch.int32)


# Run without Triton's interpreter (one process for every op: it imports torch and triton once).
# Each call gets a CPU tensor, which must fail before any launch with an error naming the op
# called (a shared launcher once named softmax_gpu.softmax for log_softmax too).
NO_INTERPRETER_SCRIPT = r"""
import os, sys, torch, torch.distributed as dist, softmax_gpu
from softmax_gpu import nn
from softmax_gpu.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy
from softmax_gpu.ops.vocab_parallel_linear_cross_entropy import vocab_parallel_linear_backward

x, t, w, h = torch.randn(4, 6), torch.tensor([0, 1, -100, 5]), torch.randn(6, 3), torch.randn(4, 3)
y = torch.softmax(x, 1)
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
calls = {
    "softmax_gpu.softmax": [lambda: softmax_gpu.softmax(x), lambda: nn.Softmax()(x)],
    "softmax_gpu.log_softmax": [lambda: softmax_gpu.log_softmax(x), lambda: nn.LogSoftmax()(x)],
    "softmax_gpu.softmax backward": [lambda: torch.ops.softmax_gpu.softmax_backward(y, y, 1, False)],
    "softmax_gpu.log_softmax backward": [lambda: torch.ops.softmax_gpu.softmax_backward(y, y, 1, True)],
    "softmax_gpu.cross_entropy": [lambda: softmax_gpu.cross_entropy(x, t, reduction=r) for r in ("none", "mean")]
    + [lambda: softmax_gpu.cross_entropy(x, y), lambda: nn.CrossEntropyLoss()(x, t)],
    "softmax_gpu.categorical_crossentropy": [lambda: softmax_gpu.categorical_crossentropy(y, x, from_logits=True)],
    "softmax_gpu.linear_cross_entropy": [lambda: softmax_gpu.linear_cross_entropy(h, w, t),
                                         lambda: nn.LinearCrossEntropyLoss()(h, w, t)],
    "softmax_gpu.vocab_parallel_cross_entropy": [lambda: vocab_parallel_cross_entropy(x, t)],
    "softmax_gpu.vocab_parallel_linear_cross_entropy": [
        lambda: vocab_parallel_linear_cross_entropy(h, w, t),
        lambda: vocab_parallel_linear_backward(h, w, None, t, None, torch.zeros(4), torch.zeros(4, 2), torch.ones(()),
                                               None, 6, 0, -100, 0.0, 0.0, None, True, True, False),
    ],
}
for name, fns in calls.items():
    for fn in fns:
        try:
            fn()
            print("NO ERROR", name)
        except RuntimeError as e:
            message = str(e)
            ok = message.startswith(name + "(): ") and "TRITON_INTERPRET=1" in message
            print("OK" if ok else "WRONG", name, "|", message[:120])
os._exit(0)  # skip gloo's teardown
"""


def test_cpu_tensor_without_interpreter_names_the_op(tmp_path):
    """Every public op, on a CPU tensor with the interpreter off: a RuntimeError that names
    that op and says how to run on CPU (TRITON_INTERPRET=1)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", NO_INTERPRETER_SCRIPT, str(tmp_path / "rendezvous")], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    lines = out.stdout.splitlines()
    assert out.returncode == 0 and len(lines) == 16, out.stdout + out.stderr
    assert all(line.startswith("OK ") for line in lines), out.stdout


def test_nn_modules(device):
    x = rows_of((2, 3, 9), torch.float32, device)
    torch.testing.assert_close(softmax_gpu.nn.Softmax(dim=1)(x), torch.softmax(x, 1), rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(softmax_gpu.nn.LogSoftmax()(x), torch.log_softmax(x, -1), rtol=2e-6, atol=1e-6)
    assert "dim=1" in repr(softmax_gpu.nn.Softmax(dim=1))


def test_opcheck(device):
    x = torch.randn(3, 17, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.softmax_gpu.softmax_forward.default, (x, 1, False, torch.float32))
    torch.library.opcheck(torch.ops.softmax_gpu.softmax_forward.default, (x, 0, True, torch.float32))
    y = torch.softmax(x.detach(), 1)
    torch.library.opcheck(torch.ops.softmax_gpu.softmax_backward.default, (y, torch.randn_like(y), 1, False))


def test_torch_compile_fullgraph(device):
    model = torch.nn.Sequential(torch.nn.Linear(8, 12), softmax_gpu.nn.LogSoftmax(dim=-1)).to(device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 8, device=device)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, torch.log_softmax(model[0](x), -1), rtol=2e-6, atol=1e-6)
    assert model[0].weight.grad is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_offsets_beyond_2_pow_31_elements():
    """n_rows x row_stride above 2**31: the last row's offset needs 64 bits."""
    n_cols = 32768
    n_rows = 2**31 // n_cols + 2
    if torch.cuda.mem_get_info()[0] < 2 * n_rows * n_cols * 2 + 2**30:
        pytest.skip("not enough free GPU memory")
    x = torch.randn(n_rows, n_cols, device="cuda", dtype=torch.bfloat16)
    y = softmax_gpu.softmax(x)
    for row in (0, n_rows - 1):
        expected = reference.softmax(x[row].double().cpu().numpy())
        assert_within_torch_error(y[row].cpu(), torch.softmax(x[row].cpu(), -1), expected, what=f"row {row}")


# ---------------------------------------------------------------------------------------
# Split rows (few long rows: a (rows, chunks) grid, config.split_rows)
# ---------------------------------------------------------------------------------------
# Forced on small rows (rows, cols, chunk width): chunks of 32 columns walked in 16-wide
# blocks (two steps a chunk, the last chunk partial and, at 203 columns, ragged), and 19
# single-block chunks, more than one combine step (block_limit caps its width at 16 too).
SPLIT_SHAPES = [(3, 100, 32), (2, 203, 32), (1, 300, 16)]


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", SPLIT_SHAPES)
def test_split_rows_forward_and_backward(shape, dtype, log, device):
    *shape, chunk = shape
    """Split forward and backward against the float64 reference, outputs poisoned, with a NaN
    row, a -inf row and a row -inf in a whole chunk (that chunk adds nothing)."""
    op = "log_softmax" if log else "softmax"
    _, torch_fn, ref_fwd, ref_bwd = OPS[op]
    x = rows_of(tuple(shape), dtype, device)
    x[0, 40:72] = float("-inf")  # the second chunk entirely
    if shape[0] > 1:
        x[1, shape[1] // 2] = float("nan")
    if shape[0] > 2:
        x[2] = float("-inf")
    shape = tuple(shape)
    y = poisoned(shape, dtype, device)
    with config.block_limit(16), config.force_split(chunk):
        split = launch_softmax_fwd(x, y, log)
    assert isinstance(split, config.SplitConfig) and (split.block_n, split.chunk_cols) == (16, chunk)
    assert split.chunks == -(-shape[1] // chunk) and split.chunks_block == min(16, config.next_power_of_2(split.chunks))
    expected = ref_fwd(x.double().cpu().numpy())
    if dtype in (torch.float32, torch.float64):
        rtol, atol = TOL32[op] if dtype == torch.float32 else (1e-12, 1e-12)
        assert_matches(y, expected, rtol, atol, what=f"{op} split forward")
    else:
        assert_within_torch_error(y, torch_fn(x.float(), -1).to(dtype), expected, what=f"{op} split forward")
    # the backward at a finite output (the reference has no NaN/inf rows to differentiate)
    y = torch.from_numpy(ref_fwd(rows_of(shape, torch.float64, "cpu").numpy())).to(device=device, dtype=dtype)
    dy, dx = rows_of(shape, dtype, device), poisoned(shape, dtype, device)
    with config.block_limit(16), config.force_split(chunk):
        assert isinstance(launch_softmax_bwd(y, dy, dx, log), config.SplitConfig)
    expected = ref_bwd(y.double().cpu().numpy(), dy.double().cpu().numpy())
    tol = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-12, 1e-12)}.get(dtype, (2e-2, 2e-2))
    assert_matches(dx, expected, *tol, what=f"{op} split backward")


def test_split_rows_match_one_program_a_row_and_are_deterministic(device):
    """Through the public functions: the split path gives what the looped path gives (to
    rounding), and the same bits on every run, forward and backward."""
    x = rows_of((2, 150), torch.float32, device).requires_grad_()
    runs = []
    for _ in range(2):
        x.grad = None
        with config.block_limit(16), config.force_split(48):
            y = softmax_gpu.log_softmax(x)
            y.backward(torch.ones_like(y))
        runs.append((y.detach().clone(), x.grad.clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    x.grad = None
    with config.block_limit(16):
        y = softmax_gpu.log_softmax(x)
        y.backward(torch.ones_like(y))
    torch.testing.assert_close(runs[0][0], y, rtol=2e-6, atol=4e-6)
    torch.testing.assert_close(runs[0][1], x.grad, rtol=2e-6, atol=4e-6)


def test_split_gradcheck_float64(device):
    x = torch.randn(2, 70, dtype=torch.float64, device=device, requires_grad=True)
    with config.block_limit(16), config.force_split(32):
        assert torch.autograd.gradcheck(lambda t: softmax_gpu.softmax(t, -1), (x,))


@pytest.mark.skipif(torch.cuda.is_available(), reason="traffic is counted in Triton's interpreter")
@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_traffic_split_rows(log, dtype):
    """Split: the looped path's 2 reads + 1 write forward (3 + 1 or 4 + 1 backward), plus
    O(rows x chunks^2) values: each chunk writes its partials (2 values forward, 1 backward),
    and each chunk's program of the second launch reads all of its row's (no combine launch)."""
    rows, cols = 3, 200
    x = rows_of((rows, cols), dtype, "cpu")
    y = torch.empty_like(x)
    element = rows * cols * x.element_size()
    acc = 8 if dtype == torch.float64 else 4
    with TrafficCounter() as fwd, config.block_limit(16), config.force_split(32):
        split = launch_softmax_fwd(x, y, log)
    chunks = split.chunks
    assert chunks == 7
    partials = rows * chunks * 2 * acc
    assert (fwd.bytes_loaded, fwd.bytes_stored) == (2 * element + partials * chunks, element + partials)
    dy, dx = rows_of((rows, cols), dtype, "cpu"), torch.empty_like(x)
    with TrafficCounter() as bwd, config.block_limit(16), config.force_split(32):
        launch_softmax_bwd(y, dy, dx, log)
    partials = rows * chunks * acc
    reads = (3 if log else 4) * element
    assert (bwd.bytes_loaded, bwd.bytes_stored) == (reads + partials * chunks, element + partials)


@pytest.mark.parametrize(
    "rows, cols, split",
    [(1, 128256, True), (32, 128256, True), (66, 50257, True), (67, 50257, False), (4096, 128256, False),
     (1, 32768, False), (8, 1000, False)],
)
def test_config_splits_few_long_rows(rows, cols, split):
    """Rows split when they would loop and are at most half the SM count; chunks fill the SMs."""
    for fwd in (True, False):
        family = (config.MAX_BLOCK_SOFTMAX_FWD, config.LOOP_BLOCK_SOFTMAX_FWD) if fwd else (
            config.MAX_BLOCK_SOFTMAX_BWD, config.LOOP_BLOCK_SOFTMAX_BWD)
        for itemsize in (2, 4, 8):
            cfg = config.split_rows(rows, cols, itemsize, *family)
            if not split or (fwd and cols <= config.block_cap(family[0], itemsize)):
                assert cfg is None or not fwd or not split, cfg
                continue
            assert cfg is not None, (rows, cols, itemsize, fwd)
            assert cfg.chunks >= 2 and cfg.chunk_cols % cfg.block_n == 0 and cfg.chunk_cols >= config.SPLIT_MIN_CHUNK
            assert (cfg.chunks - 1) * cfg.chunk_cols < cols <= cfg.chunks * cfg.chunk_cols  # no empty chunk
            assert rows * cfg.chunks <= config.DEFAULT_SM_COUNT + rows and cfg.chunks <= config.SPLIT_MAX_CHUNKS
    one = config.split_rows(1, 128256, 4, config.MAX_BLOCK_SOFTMAX_FWD, config.LOOP_BLOCK_SOFTMAX_FWD)
    assert one.chunks == 126 and one.block_n == 1024  # 126 programs on 132 SMs instead of 1
    with config.no_split():
        assert config.split_rows(1, 128256, 4, config.MAX_BLOCK_SOFTMAX_FWD, config.LOOP_BLOCK_SOFTMAX_FWD) is None


def test_split_rows_opcheck(device):
    x = torch.randn(2, 70, device=device)
    with config.force_split(32):
        torch.library.opcheck(torch.ops.softmax_gpu.softmax_forward.default, (x, 1, False, torch.float32))
        y = torch.softmax(x, 1)
        torch.library.opcheck(torch.ops.softmax_gpu.softmax_backward.default, (y, torch.randn_like(y), 1, True))


# ---------------------------------------------------------------------------------------
# Cooperative rows: many long rows, each held by a group of resident programs
# ---------------------------------------------------------------------------------------
# config.force_cooperative(chunk, programs): rows of more than `chunk` columns are cut into
# chunks of about `chunk` columns (multiples of 16), groups of one program a chunk on a grid
# of at most `programs`. In Triton's interpreter the launcher runs the kernel's two halves
# (PHASE 1, 2); on a GPU the one cooperative launch, whose programs wait on each other.

# (rows, cols, chunk, programs): 7 rounds of one group; 2 groups taking 5 and 4 rows; a
# single row; 5 chunks of 48 with the last one short (200 = 4 x 48 + 8)
COOP_SHAPES = [(7, 200, 48, 6), (9, 131, 48, 7), (1, 100, 32, 8), (4, 200, 48, 12)]


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", COOP_SHAPES)
def test_cooperative_rows_forward(shape, dtype, log, device):
    """The cooperative forward against the float64 reference, output poisoned, with a NaN row,
    a -inf row and a row -inf over a whole chunk (that chunk's partial adds nothing)."""
    rows, cols, chunk, programs = shape
    op = "log_softmax" if log else "softmax"
    x = rows_of((rows, cols), dtype, device)
    x[0, chunk:2 * chunk] = float("-inf")
    if rows > 1:
        x[1, cols // 2] = float("nan")
    if rows > 2:
        x[2] = float("-inf")
    y = poisoned((rows, cols), dtype, device)
    with config.force_cooperative(chunk, programs):
        coop = launch_softmax_fwd(x, y, log)
    assert isinstance(coop, config.CooperativeConfig)
    assert coop.chunks == -(-cols // coop.chunk_cols) and coop.chunk_cols % 16 == 0 and coop.chunk_cols <= coop.block_n
    assert coop.groups == min(rows, programs // coop.chunks) and coop.programs <= programs
    expected = OPS[op][2](x.double().cpu().numpy())
    if dtype == torch.float32:
        assert_matches(y, expected, *TOL32[op], what=f"{op} cooperative")
    else:
        assert_within_torch_error(y, OPS[op][1](x.float(), -1).to(dtype), expected, what=f"{op} cooperative")


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", COOP_SHAPES)
def test_cooperative_rows_backward(shape, dtype, log, device):
    """The cooperative backward (y and dy held, one partial sum a chunk) against the float64
    reference at a finite output, dx poisoned; heads and tails where the width is odd."""
    rows, cols, chunk, programs = shape
    op = "log_softmax" if log else "softmax"
    y = torch.from_numpy(OPS[op][2](rows_of((rows, cols), torch.float64, "cpu").numpy())).to(device=device, dtype=dtype)
    dy, dx = rows_of((rows, cols), dtype, device), poisoned((rows, cols), dtype, device)
    with config.force_cooperative(chunk, programs):
        coop = launch_softmax_bwd(y, dy, dx, log)
    assert isinstance(coop, config.CooperativeConfig) and coop.edge == (cols % (16 // y.element_size()) != 0)
    expected = OPS[op][3](y.double().cpu().numpy(), dy.double().cpu().numpy())
    tol = (1e-5, 1e-5) if dtype == torch.float32 else (2e-2, 2e-2)
    assert_matches(dx, expected, *tol, what=f"{op} cooperative backward")


@pytest.mark.parametrize("layout", ["unaligned bases, strides agree", "strides disagree (no split)", "bf16 in, fp32 out"])
def test_cooperative_rows_unaligned(layout, device):
    """Heads and tails outside whole 16-byte vectors (chunk 0's): every element written once,
    nothing outside the views. Row strides that disagree modulo a vector (no vectors: the
    unvectorised block spilled on sm_90) take the one-program-a-row path instead."""
    x_dtype, y_dtype, x_off, y_off, x_extra, y_extra = LAYOUTS[layout]
    rows, cols = 5, 131
    x_buf, x = in_buffer(rows, cols, x_dtype, x_off, x_extra, float("nan"))
    x.copy_(rows_of((rows, cols), x_dtype, "cpu"))
    y_buf, y = in_buffer(rows, cols, y_dtype, y_off, y_extra, float("nan"))
    x_buf, y_buf = x_buf.to(device), y_buf.to(device)
    x, y = x_buf[:, x_off:x_off + cols], y_buf[:, y_off:y_off + cols]
    with config.force_cooperative(48, 5):
        coop = launch_softmax_fwd(x, y, False)
    if "disagree" in layout:
        assert isinstance(coop, config.RowConfig) and coop.vec == 1
    else:
        assert isinstance(coop, config.CooperativeConfig) and coop.vec > 1
    expected = reference.softmax(x.double().cpu().numpy())
    tol = TOL32["softmax"] if y_dtype == torch.float32 else (1e-2, 1e-2)
    assert_matches(y, expected, *tol, what=f"cooperative {layout}")
    outside = torch.ones(y_buf.shape, dtype=torch.bool, device=device)
    outside[:, y_off:y_off + cols] = False
    assert y_buf[outside].isnan().all(), "a write outside the rows"


@pytest.mark.skipif(torch.cuda.is_available(), reason="traffic is counted in Triton's interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_traffic_cooperative_rows(dtype):
    """In the interpreter the two halves read the rows twice (the GPU's one launch reads them
    once: its second half uses the registers the first loaded) and write them once; each chunk
    writes its 2 partials once and reads its row's 2 x chunks. The backward alike."""
    rows, cols = 3, 200
    x = rows_of((rows, cols), dtype, "cpu")
    y = torch.empty_like(x)
    element = rows * cols * x.element_size()
    with TrafficCounter() as fwd, config.force_cooperative(48, 5):
        coop = launch_softmax_fwd(x, y, False)
    assert (coop.chunks, coop.groups) == (5, 1)
    partials = rows * coop.chunks * 2 * 4
    assert (fwd.bytes_loaded, fwd.bytes_stored) == (2 * element + partials * coop.chunks, element + partials)
    # the backward's halves: dy twice, y twice (log_softmax's first half needs no y), one
    # partial sum a chunk
    for log in (False, True):
        dy, dx = rows_of((rows, cols), dtype, "cpu"), torch.empty_like(x)
        with TrafficCounter() as bwd, config.force_cooperative(48, 5):
            coop = launch_softmax_bwd(y, dy, dx, log)
        partials = rows * coop.chunks * 4
        reads = (3 if log else 4) * element + partials * coop.chunks
        assert (bwd.bytes_loaded, bwd.bytes_stored) == (reads, element + partials)


def test_cooperative_rows_deterministic_through_the_public_function(device):
    """softmax_gpu.log_softmax on the cooperative path: the same bits on every run, what the
    looped path gives to rounding, and a gradient (the backward is the usual one)."""
    x = rows_of((6, 150), torch.float32, device).requires_grad_()
    runs = []
    for _ in range(2):
        x.grad = None
        with config.force_cooperative(48, 6):
            y = softmax_gpu.log_softmax(x)
        y.backward(torch.ones_like(y))
        runs.append((y.detach().clone(), x.grad.clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    with config.block_limit(16):
        y = softmax_gpu.log_softmax(x)
    torch.testing.assert_close(runs[0][0], y, rtol=2e-6, atol=4e-6)


@pytest.mark.parametrize(
    "rows, cols, itemsize, chunks, groups",
    [(4096, 128256, 2, 16, 24), (4096, 128256, 4, 16, 24), (4096, 50257, 2, 7, 56), (1024, 262144, 2, 32, 12),
     (4096, 151936, 2, 19, 20), (67, 50257, 2, 7, 56), (70, 40000, 2, 5, 70), (10, 50257, 2, None, None),
     (66, 50257, 2, None, None), (4096, 32768, 2, None, None), (4096, 128256, 8, None, None)],
)
def test_config_cooperative_rows(monkeypatch, rows, cols, itemsize, chunks, groups):
    """With SOFTMAX_GPU_COOPERATIVE=1: rows that would loop, more than half the SM count of
    them (fewer split), 16-bit or float32; chunks of at most 8192 columns (its family's), as
    even as whole 16-column steps allow; as many groups as the resident programs allow (3 an
    SM), never more than the rows. Off by default."""
    family = config.MAX_BLOCK_SOFTMAX_FWD
    assert config.cooperative_rows(rows, cols, itemsize, family, config.COOPERATIVE_SOFTMAX_FWD) is None  # the default
    assert launch_plan("softmax_fwd", rows, cols, itemsize) is None  # (the switch is in the plans' key)
    monkeypatch.setattr(config, "COOPERATIVE", True)
    cfg = config.cooperative_rows(rows, cols, itemsize, family, config.COOPERATIVE_SOFTMAX_FWD)
    assert cfg == (launch_plan("softmax_fwd", rows, cols, itemsize) if chunks else None)
    if chunks is None:
        assert cfg is None
        return
    if rows > config.DEFAULT_SM_COUNT // 2:
        assert config.split_rows(rows, cols, itemsize, family, config.LOOP_BLOCK_SOFTMAX_FWD) is None
    assert (cfg.chunks, cfg.groups) == (chunks, groups)
    assert cfg.chunk_cols <= config.COOPERATIVE_SOFTMAX_FWD.chunk and (cfg.chunks - 1) * cfg.chunk_cols < cols
    assert (cfg.block_n, cfg.num_warps, cfg.maxnreg) == (8192, 8, 80)  # 3 programs an SM: 3 x 256 x 80 registers
    assert cfg.programs <= config.COOPERATIVE_SOFTMAX_FWD.per_sm * config.DEFAULT_SM_COUNT


@pytest.mark.parametrize(
    "rows, cols, itemsize, chunks, groups",
    [(4096, 128256, 2, 32, 12), (4096, 32000, 2, 8, 49), (4096, 32000, 4, 8, 49), (4096, 16385, 2, 5, 79),
     (4096, 16384, 2, None, None), (32, 32000, 2, None, None)],
)
def test_config_cooperative_rows_backward(monkeypatch, rows, cols, itemsize, chunks, groups):
    """The backward holds y and dy: chunks of at most 4096 for the same 32
    values a thread, past its own single block (16384)."""
    monkeypatch.setattr(config, "COOPERATIVE", True)
    cfg = config.cooperative_rows(rows, cols, itemsize, config.MAX_BLOCK_SOFTMAX_BWD, config.COOPERATIVE_SOFTMAX_BWD)
    assert cfg == (launch_plan("softmax_bwd", rows, cols, itemsize) if chunks else None)
    if chunks is None:
        assert cfg is None
        return
    assert (cfg.chunks, cfg.groups) == (chunks, groups)
    assert (cfg.block_n, cfg.num_warps, cfg.maxnreg) == (4096, 8, 80) and cfg.chunk_cols <= 4096


def launch_plan(name, rows, cols, itemsize):
    """The config the eager launcher's plan holds for a contiguous rows x cols problem, on meta
    tensors (no launch): the cooperative one without its vectors, else None."""
    from softmax_gpu.ops.softmax import _eager_plan

    dtype = torch.bfloat16 if itemsize == 2 else torch.float32
    tensors = [torch.empty(rows, cols, dtype=dtype, device="meta") for _ in range(2 if name == "softmax_fwd" else 3)]
    kind, cfg, _ = _eager_plan(name, tensors, False, *(
        (config.MAX_BLOCK_SOFTMAX_FWD, config.LOOP_BLOCK_SOFTMAX_FWD) if name == "softmax_fwd"
        else (config.MAX_BLOCK_SOFTMAX_BWD, config.LOOP_BLOCK_SOFTMAX_BWD)))  # fmt: skip
    return dataclasses.replace(cfg, vec=1, edge=False) if kind == "cooperative" else None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the cooperative launch and its waits run on a GPU only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cooperative_rows_at_the_grid_limit_on_gpu(monkeypatch, dtype):
    """The shipped configuration on the card: every resident program of the grid in use (the
    groups fill the family's per_sm programs an SM), many rounds a group, a NaN row;
    partials poisoned with NaN before each launch (a program that read its row's partials
    before its group had written them would turn the row NaN); against float64 torch, bitwise
    the same on a second run and through a CUDA graph (how the benchmark times it). The
    backward alike."""
    from softmax_gpu import runtime

    monkeypatch.setattr(config, "COOPERATIVE", True)
    monkeypatch.setattr(runtime, "cooperative_partials", lambda shape, device: torch.full(shape, float("nan"),
                                                                                           device=device))  # fmt: skip
    rows, cols = 1000, 128256
    x = (3 * torch.randn(rows, cols, device="cuda")).to(dtype)
    x[5, 77] = float("nan")
    y = poisoned((rows, cols), dtype, "cuda")
    coop = launch_softmax_fwd(x, y, False)
    assert isinstance(coop, config.CooperativeConfig) and coop.chunks == 16
    assert coop.programs > (coop.per_sm - 1) * config.sm_count(x.device)
    again = softmax_gpu.softmax(x)
    assert torch.equal(y.isnan(), again.isnan()) and torch.equal(y.nan_to_num(), again.nan_to_num())
    assert y[5].isnan().all() and not y[[4, 6]].isnan().any()
    graph_out = poisoned((rows, cols), dtype, "cuda")
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        launch_softmax_fwd(x, graph_out, False)  # (plan and compile outside the capture)
        with torch.cuda.graph(graph, stream=stream):
            launch_softmax_fwd(x, graph_out, False)
    torch.cuda.current_stream().wait_stream(stream)
    graph_out.fill_(float("nan"))
    graph.replay()
    assert torch.equal(y.nan_to_num(), graph_out.nan_to_num()) and torch.equal(y.isnan(), graph_out.isnan())
    keep = torch.ones(rows, dtype=torch.bool, device="cuda")
    keep[5] = False
    expected = torch.softmax(x[keep].double(), -1).cpu().numpy()
    if dtype == torch.float32:
        assert_matches(y[keep], expected, *TOL32["softmax"], what="cooperative forward on the GPU")
    else:
        assert_within_torch_error(y[keep], torch.softmax(x[keep].float(), -1).to(dtype), expected)
    # the backward at the same shape (32 chunks of 4016: 12 groups of 32 at 132 SMs)
    y, dy = y[keep], torch.randn_like(y[keep])
    dx = poisoned(y.shape, dtype, "cuda")
    coop = launch_softmax_bwd(y, dy, dx, False)
    assert isinstance(coop, config.CooperativeConfig) and coop.chunks == 32
    again = poisoned(y.shape, dtype, "cuda")
    launch_softmax_bwd(y, dy, again, False)
    assert torch.equal(dx, again)
    y64 = y.double()
    expected = y64 * (dy.double() - (dy.double() * y64).sum(-1, keepdim=True))
    assert_matches(dx, expected.cpu().numpy(), 2e-2, 2e-2, what="cooperative backward on the GPU")
