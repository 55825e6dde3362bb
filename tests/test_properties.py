"""Property-based tests: random shapes, dims, views, dtypes and options, with NaN and ±inf
injected, against torch in float64 (values and gradients).

The example budget is fixed (the interpreter runs every example on the CPU) and there is no
deadline. A failure prints the falsifying example and a `@reproduce_failure(...)` line;
paste that line above the test to replay it exactly. SOFTMAX_GPU_HYPOTHESIS_EXAMPLES=<n>
runs more examples locally.
"""
import contextlib
import os

import pytest
import numpy as np
import torch
import torch.nn.functional as F
from helpers import ATOL_16BIT, assert_matches, max_abs_err

import softmax_gpu
from softmax_gpu import config

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXAMPLES = int(os.environ.get("SOFTMAX_GPU_HYPOTHESIS_EXAMPLES", "20"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Widths: 1, primes and odd numbers, powers of two and their neighbours, both sides of the
# single-block limit when it is forced down to 16 or 32 (`max_block`).
WIDTHS = st.sampled_from([1, 2, 3, 5, 7, 13, 16, 17, 31, 32, 33, 61, 64, 97, 127, 128, 129])
# "split": rows longer than 32 columns split into chunks of 32 (16-wide blocks), config.force_split.
MAX_BLOCKS = st.sampled_from([None, 16, 32, "split"])


@contextlib.contextmanager
def _block(max_block):
    if max_block == "split":
        with config.block_limit(16), config.force_split(32):
            yield
    else:
        with config.block_limit(max_block or 1 << 20):
            yield


@st.composite
def logits_tensors(draw, dims=(1, 2, 3)):
    """(tensor, class dim): a view (transposed, strided slice or plain) of random data with
    NaN, +inf and -inf sometimes injected, and -inf rows now and then."""
    ndim = draw(st.sampled_from(dims))
    width = draw(WIDTHS)
    shape = [width] if ndim == 1 else [draw(st.integers(1, 5)), width] + [draw(st.integers(1, 3))] * (ndim - 2)
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from([1.0, 8.0, 40.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    base = scale * torch.randn(*shape, generator=g, dtype=torch.float64)
    for value in (float("nan"), float("inf"), -float("inf")):
        if draw(st.booleans()) and draw(st.booleans()):  # each about a quarter of the time
            flat = base.view(-1)
            flat[draw(st.integers(0, flat.numel() - 1))] = value
    view = draw(st.sampled_from(["plain", "strided", "transposed"]))
    x = base.to(dtype)
    if view == "strided":  # every other element of a twice-as-wide buffer
        wide = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=dtype)
        wide[..., ::2] = x
        x = wide[..., ::2]
    elif view == "transposed" and ndim >= 2:
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
    return x.to(DEVICE), (1 if ndim >= 2 else 0)


def _compare(ours, ours_ref_dtype, truth, what):
    """float32/float64 against float64 truth; 16-bit within twice torch's own error in that dtype."""
    if ours.dtype in (torch.float16, torch.bfloat16):
        budget = 2 * max_abs_err(ours_ref_dtype, truth) + ATOL_16BIT[ours.dtype]
        assert_matches(ours, truth, 0.0, budget, what=what)
    elif ours.dtype == torch.float64:
        assert_matches(ours, truth, 1e-10, 1e-12, what=what)
    else:
        assert_matches(ours, truth, 2e-5, 1e-6, what=what)


@SETTINGS
@given(data=logits_tensors(), log=st.booleans(), max_block=MAX_BLOCKS, dim_choice=st.integers(0, 2),
       seed=st.integers(0, 2**31 - 1))  # fmt: skip
def test_softmax_property(data, log, max_block, dim_choice, seed):
    x, class_dim = data
    dim = [class_dim, -1, 0][dim_choice] if x.dim() > 1 else 0
    fn, ref = (softmax_gpu.log_softmax, F.log_softmax) if log else (softmax_gpu.softmax, F.softmax)
    # the upstream gradient comes from the example's own seed, so a replay is exact
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    leaf = x.detach().clone().requires_grad_()
    with _block(max_block):
        y = fn(leaf, dim=dim)
        y.backward(dy.to(y.dtype).to(y.device))
    x64 = x.detach().cpu().double().requires_grad_()
    y64 = ref(x64, dim=dim)
    y64.backward(dy.to(x.dtype).double())
    # torch in the logits' own dtype (its backward, too, works from the rounded output):
    # its error against float64 is the yardstick for the 16-bit budgets
    x16 = x.detach().cpu().requires_grad_()
    y16 = ref(x16, dim=dim)
    what = f"{'log_' if log else ''}softmax {tuple(x.shape)} {x.dtype} dim={dim} stride={x.stride()} block={max_block}"
    assert y.dtype == x.dtype and y.shape == x.shape
    _compare(y, y16, y64.detach().numpy(), what)
    g16 = torch.autograd.grad(y16, x16, dy.to(x.dtype))[0]
    _compare(leaf.grad, g16, x64.grad.numpy(), what + " grad")


@st.composite
def cross_entropy_cases(draw):
    x, class_dim = draw(logits_tensors())
    shape = list(x.shape)
    n_classes = shape[class_dim]
    target_shape = shape[:class_dim] + shape[class_dim + 1:]
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    ignore_index = draw(st.sampled_from([-100, -1, 0, n_classes - 1]))
    soft = draw(st.booleans()) and x.dim() >= 1
    if soft:
        ignore_index = -100  # torch refuses any other with probabilities (so do we: test_bad_input)
        target = torch.softmax(torch.randn(*shape, generator=g, dtype=torch.float64), class_dim).to(x.dtype)
    else:
        target = torch.randint(0, n_classes, target_shape, generator=g).to(draw(st.sampled_from([torch.int64,
                                                                                                 torch.int32])))
        if target.numel() and draw(st.booleans()):
            target.view(-1)[0] = ignore_index
    kw = dict(
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        label_smoothing=draw(st.sampled_from([0.0, 0.1])),
        ignore_index=ignore_index,
        z_loss=draw(st.sampled_from([0.0, 0.0, 1e-2])),
        softcap=draw(st.sampled_from([None, None, 5.0])),
    )
    if draw(st.booleans()):
        kw["weight"] = (torch.rand(n_classes, generator=g, dtype=torch.float64) + 0.2).to(x.dtype).to(DEVICE)
    # upstream factors up to a loss scale's 2^16, from the example's own seed
    scale = draw(st.sampled_from([1.0, 1.0, 2.0**16, 1 / 3]))
    return x, target.to(DEVICE), kw, class_dim, draw(st.integers(0, 2**31 - 1)), scale


def _composed_cross_entropy(x, target, class_dim, weight=None, ignore_index=-100, reduction="mean",
                            label_smoothing=0.0, z_loss=0.0, softcap=None):
    """torch's cross-entropy plus our options, composed from torch ops in x's dtype:
    z = s tanh(x / s), F.cross_entropy(z, ...) + z_loss * w_t * lse(z)^2 per row (w_t = 1
    for probabilities, 0 for ignored rows), then the reduction (the mean over the summed
    class weight of the counted rows, as torch's)."""
    z = softcap * torch.tanh(x / softcap) if softcap is not None else x
    rows = F.cross_entropy(z, target, weight=weight, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)  # fmt: skip
    if target.is_floating_point():
        valid = torch.ones_like(rows, dtype=torch.bool)
        w_t = torch.ones_like(rows)
        total = torch.tensor(float(rows.numel()), dtype=x.dtype)
    else:
        valid = target != ignore_index
        w_t = (weight[target.clamp(min=0)] if weight is not None else torch.ones_like(rows)) * valid
        total = w_t.sum()
    if z_loss:  # an ignored row adds nothing, NaN logits or not (its cross-entropy is 0 too)
        rows = rows + torch.where(valid, z_loss * w_t * torch.logsumexp(z, dim=class_dim) ** 2, 0.0)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    # torch's mean of an all-ignored batch: NaN (0 / 0), with a zero gradient
    empty = total == 0
    return rows.sum() / torch.where(empty, 1.0, total) + torch.where(empty, float("nan"), 0.0).detach()


@SETTINGS
@given(case=cross_entropy_cases(), max_block=MAX_BLOCKS, target_grad=st.booleans())
def test_cross_entropy_property(case, max_block, target_grad):
    x, target, kw, class_dim, seed, scale = case
    soft = target.is_floating_point()
    leaf = x.detach().clone().requires_grad_()
    tgt = target.detach().clone().requires_grad_(soft and target_grad)
    with _block(max_block):
        loss = softmax_gpu.cross_entropy(leaf, tgt, **kw)
        up = scale * (torch.rand(loss.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5)
        loss.backward(up.to(loss.dtype).to(loss.device))
    ref_kw = {k: (v.cpu().double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    x64 = x.detach().cpu().double().requires_grad_()
    # (clone: for float64 targets .double() is the same tensor, which must not start requiring grad)
    t64 = target.detach().cpu().double().clone().requires_grad_(soft and target_grad) if soft else target.cpu().long()
    loss64 = _composed_cross_entropy(x64, t64, class_dim, **ref_kw)
    loss64.backward(up.to(loss.dtype).double())
    what = f"CE {tuple(x.shape)} {x.dtype} stride={x.stride()} soft={soft} {kw} block={max_block} upstream x{scale}"
    assert loss.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    assert loss.shape == loss64.shape
    # the loss is accumulated in float32 (float64): the same composition in float32 is the yardstick
    kw32 = {k: (v.cpu().float() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    x32 = x.detach().cpu().float().requires_grad_()
    t32 = target.detach().cpu().float() if soft else target.cpu().long()
    loss32 = _composed_cross_entropy(x32, t32, class_dim, **kw32)
    tol = 1e-10 if x.dtype == torch.float64 else 2e-5
    err_budget = max_abs_err(loss32, loss64.detach().numpy())
    assert_matches(loss, loss64.detach().numpy(), tol, 2 * err_budget + 1e-6, what=what + " loss")
    # gradients: torch's float32 computation rounded once to the logits' dtype is the yardstick
    loss32.backward(up.to(loss.dtype).float())
    # (also for float32: q - p cancels where the target is close to softmax(x), and a 2^16
    # upstream factor magnifies float32's own rounding there)
    # the truth as the logits' dtype holds it where it overflows (a 2^16 loss scale can push
    # a float16 gradient past 65504: inf, as torch's, which GradScaler then skips)
    truth = x64.grad.numpy()
    truth = np.where(np.isinf(x64.grad.to(x.dtype).double().numpy()), x64.grad.to(x.dtype).double().numpy(), truth)
    if x.dtype == torch.float64:
        assert_matches(leaf.grad, truth, 1e-10, 1e-12 * max(scale, 1.0), what=what + " grad")
    else:
        atol = ATOL_16BIT.get(x.dtype, 1e-6) * max(scale, 1.0)
        budget = 2 * max_abs_err(x32.grad.to(x.dtype), truth) + atol
        assert_matches(leaf.grad, truth, 2e-5 if x.dtype == torch.float32 else 0.0, budget, what=what + " grad")
    if soft and target_grad:
        assert tgt.grad is not None and tgt.grad.dtype == target.dtype
        rtol = 1e-10 if x.dtype == torch.float64 else 2e-5 if x.dtype == torch.float32 else 2e-2
        held = t64.grad.to(target.dtype).double().numpy()  # overflow to inf as the dtype would
        truth_p = np.where(np.isinf(held), held, t64.grad.numpy())
        assert_matches(tgt.grad, truth_p, rtol, rtol * max(scale, 1.0), what=what + " target grad")
