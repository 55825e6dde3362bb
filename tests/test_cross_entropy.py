"""Fused cross-entropy against torch.nn.functional.cross_entropy and the float64 reference."""
import contextlib
import dataclasses
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import MEAN_LOADS, MEAN_STORES, assert_matches, assert_within_torch_error, edge_elements, poisoned

import softmax_gpu
from softmax_gpu import config, reference
from softmax_gpu.loss_options import LossOptions
from softmax_gpu.ops.cross_entropy import cross_entropy_config, launch_cross_entropy, launch_cross_entropy_prepare
from softmax_gpu.traffic import TrafficCounter

RTOL, ATOL = 2e-6, 2e-7  # float32 loss and gradient against float64
# The default single block; 16-wide blocks that force the looped path; and split rows (chunks
# of 16 columns, config.force_split) on the same small shapes (29 columns and up).
SPLIT = "split"
PATHS = [None, 16, SPLIT]
LOOP_PATHS = [None, 16]  # (tests that launch the one-program-a-row kernel directly)


@contextlib.contextmanager
def on_path(max_block):
    """Runs the block on the path PATHS names."""
    if max_block == SPLIT:
        with config.block_limit(16), config.force_split(16):
            yield
    else:
        with config.block_limit(max_block or config.MAX_BLOCK_CROSS_ENTROPY):
            yield


def run_both(logits, target, upstream=None, max_block=None, **kw):
    """Loss and input gradient from softmax_gpu and from torch (float64 CPU, the truth)."""
    ours_in = logits.detach().clone().requires_grad_()
    with on_path(max_block):
        ours = softmax_gpu.cross_entropy(ours_in, target, **kw)
        ours.backward(torch.ones_like(ours) if upstream is None else upstream)
    kw64 = {k: (v.double().cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    ref_in = logits.detach().double().cpu().requires_grad_()
    tgt = target.cpu().double() if target.is_floating_point() else target.cpu().long()
    theirs = F.cross_entropy(ref_in, tgt, **kw64)
    theirs.backward(torch.ones_like(theirs) if upstream is None else upstream.double().cpu())
    return ours, ours_in.grad, theirs.detach(), ref_in.grad


@pytest.mark.parametrize("max_block", PATHS)
@pytest.mark.parametrize("target_dtype", [torch.int64, torch.int32])
def test_index_targets_every_torch_option(max_block, target_dtype, device):
    n, c = 7, 37
    logits = 2 * torch.randn(n, c, device=device)
    weight = torch.rand(c, device=device) + 0.1
    for ignore_index, reduction, smoothing, use_weight in itertools.product(
        (-100, -1, 2), ("mean", "sum", "none"), (0.0, 0.15), (False, True)
    ):
        target = torch.randint(0, c, (n,), device=device)
        target[1] = ignore_index if ignore_index != 2 else 2  # 2 is both a valid class and ignored
        target[4] = -100 if ignore_index == -100 else target[4]
        kw = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=smoothing)
        if use_weight:
            kw["weight"] = weight
        upstream = torch.randn(n, device=device) if reduction == "none" else None
        ours, grad, theirs, ref_grad = run_both(logits, target.to(target_dtype), upstream, max_block, **kw)
        what = f"{kw.keys()} ignore={ignore_index} {reduction} eps={smoothing} weight={use_weight}"
        assert ours.dtype == torch.float32
        assert_matches(ours, theirs.numpy(), RTOL, ATOL, what=what + " loss")
        assert_matches(grad, ref_grad.numpy(), RTOL, ATOL, what=what + " grad")


@pytest.mark.parametrize("max_block", PATHS)
def test_probability_targets(max_block, device):
    n, c = 5, 29
    logits = 2 * torch.randn(n, c, device=device)
    probs = torch.softmax(torch.randn(n, c, device=device), -1)
    one_hot = F.one_hot(torch.randint(0, c, (n,)), c).float().to(device)
    weight = torch.rand(c, device=device) + 0.1
    for target, reduction, smoothing, use_weight in itertools.product(
        (probs, one_hot), ("mean", "sum", "none"), (0.0, 0.2), (False, True)
    ):
        kw = dict(reduction=reduction, label_smoothing=smoothing, weight=weight if use_weight else None)
        ours, grad, theirs, ref_grad = run_both(logits, target, None, max_block, **kw)
        assert_matches(ours, theirs.numpy(), RTOL, ATOL, what=f"soft {reduction} {smoothing} {use_weight}")
        assert_matches(grad, ref_grad.numpy(), RTOL, ATOL, what=f"soft grad {reduction} {smoothing} {use_weight}")


UNALIGNED_OPTIONS = {
    "plain": {},
    "weights, smoothing, ignore": dict(weight=True, label_smoothing=0.1, ignore_index=2),
    "z-loss, softcap": dict(z_loss=1e-3, softcap=3.0),
    "probabilities": dict(soft=True, label_smoothing=0.1),
    "probabilities, other stride": dict(soft="other stride"),
    "none, upstream": dict(reduction="none"),
}
# Gradient tolerance per dtype against float64 (the loss is float32, float64 for float64).
GRAD_TOL = {torch.float32: (RTOL, ATOL), torch.float64: (1e-12, 1e-14), torch.bfloat16: (8e-3, 1e-4),
            torch.float16: (1e-3, 1e-5)}  # fmt: skip


@pytest.mark.parametrize("max_block", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("what", UNALIGNED_OPTIONS)
def test_unaligned_rows_of_odd_width(what, dtype, max_block, device):
    """Logits that are a view at column 3 of a NaN buffer, rows 53 wide 60 apart: every row
    starts at another alignment, so the kernels take head, aligned body and tail (and the
    float16/float64 backward kernel and the rescale kernel too; split rows cut the body into
    chunks and give chunk 0 the edge). A stray read of the NaN
    around the view would turn its row's loss NaN; in-place, a stray write would land in it."""
    n, c, pitch, offset = 6, 53, 60, 3
    options = dict(UNALIGNED_OPTIONS[what])
    soft = options.pop("soft", False)
    kw = dict(options)
    if kw.pop("weight", False):
        kw["weight"] = (torch.rand(c, device=device) + 0.1).to(torch.float64 if dtype == torch.float64 else torch.float32)
    values = 2 * torch.randn(n, c, device=device)
    if soft:
        t_pitch, t_offset = (pitch, offset) if soft is True else (c + 2, 0)
        t_buf = torch.full((n, t_pitch), float("nan"), device=device, dtype=dtype)
        target = t_buf[:, t_offset:t_offset + c]
        target.copy_(torch.softmax(torch.randn(n, c, device=device), -1))
    else:
        target = torch.randint(0, c, (n,), device=device)
        target[1] = kw.get("ignore_index", -100)
    upstream = torch.randn(n, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32) if (
        kw.get("reduction") == "none") else None  # fmt: skip
    ref_in = values.to(dtype).double().cpu().requires_grad_()
    for inplace in (False, True):
        leaf = values.to(dtype).clone().requires_grad_()
        buf = torch.full((n, pitch), float("nan"), device=device, dtype=dtype)
        buf[:, offset:offset + c] = leaf  # buf now holds the logits and carries their graph
        logits = buf[:, offset:offset + c]
        with on_path(max_block):
            loss = softmax_gpu.cross_entropy(logits, target, inplace_backward=inplace, **kw)
            loss.backward(torch.ones_like(loss) if upstream is None else upstream)
        if not inplace:
            kw64 = {k: (v.double().cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
            z_loss, softcap = kw64.pop("z_loss", 0.0), kw64.pop("softcap", None)
            z = ref_in if softcap is None else softcap * torch.tanh(ref_in / softcap)
            tgt = target.double().cpu() if soft else target.cpu()
            ref = F.cross_entropy(z, tgt, **kw64)
            if z_loss:  # over the rows that count (mean: this option set has no weights)
                counted = (target.cpu() != -100).double()
                ref = ref + z_loss * (counted * torch.logsumexp(z, -1) ** 2).sum() / counted.sum()
            ref.backward(torch.ones_like(ref) if upstream is None else upstream.double().cpu())
            loss_tol = (1e-12, 1e-14) if dtype == torch.float64 else (RTOL, ATOL)
            assert_matches(loss, ref.detach().numpy(), *loss_tol, what=f"{what} {dtype} loss")
        assert_matches(leaf.grad, ref_in.grad.numpy(), *GRAD_TOL[dtype], what=f"{what} {dtype} inplace={inplace} grad")
        if inplace:  # the gradient went through the logits' storage
            torch.testing.assert_close(logits.detach(), leaf.grad, rtol=0, atol=0)
        outside = torch.ones(n, pitch, dtype=torch.bool)
        outside[:, offset:offset + c] = False
        assert buf.detach().cpu()[outside].isnan().all(), "a write outside the rows"


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("what", ["plain", "weights, smoothing, ignore", "probabilities", "z-loss, softcap"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_short_rows_several_a_program(dtype, what, reduction, device):
    """Rows narrower than config.SHORT_ROWS_TILE share a program ([rows x block] tiles): 37
    rows of 101 classes take 3 programs of 16 rows, the last one partial, and the reduction's
    last-program sum counts programs, not rows. Outputs poisoned, every option, every dtype."""
    n, c = 37, 101
    f64 = dtype == torch.float64
    acc = torch.float64 if f64 else torch.float32
    logits = (2 * torch.randn(n, c, device=device)).to(dtype)
    kw = {}
    if what == "probabilities":
        target = torch.softmax(torch.randn(n, c, device=device), -1).to(dtype)
    else:
        target = torch.randint(0, c, (n,), device=device)
        target[[1, 20]] = 2 if what.endswith("ignore") else -100
    if what.startswith("weights"):
        kw = dict(weight=(torch.rand(c, device=device) + 0.1).to(acc), label_smoothing=0.1, ignore_index=2)
    if what == "z-loss, softcap":
        kw = dict(z_loss=1e-3, softcap=3.0)
    loss, lse = poisoned((n,), acc, device), poisoned((n,), acc, device)
    grad = poisoned((n, c), dtype, device)
    reduced, counter, total = poisoned((), acc, device), torch.full((), 5, dtype=torch.int32, device=device), None
    eps, lam, cap = kw.get("label_smoothing", 0.0), kw.get("z_loss", 0.0), kw.get("softcap")
    ignore = kw.get("ignore_index", -100)
    if reduction == "mean":
        total = poisoned((), acc, device)
    buffers = [t for t in (logits, target, loss, lse, grad, reduced, counter, total, kw.get("weight")) if t is not None]
    bounds = TrafficCounter(buffers=buffers) if not torch.cuda.is_available() else contextlib.nullcontext()
    with bounds:  # in the interpreter, every access is checked against the buffers
        if reduction != "none":
            launch_cross_entropy_prepare(target, kw.get("weight"), total, counter, c, ignore)
        cfg = launch_cross_entropy(logits, target, kw.get("weight"), loss, lse, grad, total,
                                   LossOptions(ignore, eps, lam, cap), reduced=None if reduction == "none" else reduced,
                                   counter=None if reduction == "none" else counter, reduction=reduction)
    assert cfg.single_block and cfg.rows == 16
    # float64 torch: the per-row losses and the gradient of the (reduced) loss.
    z64 = logits.double().cpu().requires_grad_()
    z = z64 if cap is None else cap * torch.tanh(z64 / cap)
    tgt = target.double().cpu() if what == "probabilities" else target.cpu()
    kw64 = {k: (v.double().cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items() if k in ("weight", "label_smoothing", "ignore_index")}
    per_row = F.cross_entropy(z, tgt, reduction="none", **kw64)
    if lam:
        per_row = per_row + lam * torch.where(tgt != -100, torch.logsumexp(z, -1) ** 2, 0.0)
    if what == "probabilities" or "weight" not in kw:
        counted = torch.ones(n, dtype=torch.float64) if what == "probabilities" else (tgt != ignore).double()
    else:
        counted = torch.where(tgt != ignore, kw64["weight"][tgt.clamp(0, c - 1)], 0.0)
    reduced64 = per_row.sum() / (counted.sum() if reduction == "mean" else 1.0)
    reduced64.backward()
    tol = (1e-12, 1e-14) if f64 else (RTOL, ATOL)
    assert_matches(loss, per_row.detach().numpy(), *tol, what=f"{what} {dtype} row losses")
    assert_matches(lse, torch.logsumexp(z, -1).detach().numpy(), *tol, what=f"{what} {dtype} lse")
    if reduction != "none":
        assert_matches(reduced, reduced64.detach().numpy(), *tol, what=f"{what} {dtype} {reduction}")
    # the gradient of the sum ("none", "sum") or the mean of the row losses; float32 to ~1e-6 of
    # the gradient's scale (the soft cap's chain rule and the z-loss term add roundings: seed
    # 1131726886 put one element 3.3e-7 off, past the fixed 2e-7)
    rtol, atol = GRAD_TOL[dtype]
    if dtype == torch.float32:
        atol = max(atol, 1e-6 * float(z64.grad.abs().max()))
    assert_matches(grad, z64.grad.numpy(), rtol, atol, what=f"{what} {dtype} grad")


def test_one_hot_gradient_is_softmax_minus_one_hot(device):
    logits = torch.randn(4, 10, device=device, requires_grad=True)
    target = torch.tensor([1, 3, 0, 9], device=device)
    softmax_gpu.cross_entropy(logits, target, reduction="sum").backward()
    expected = torch.softmax(logits.detach(), -1) - F.one_hot(target, 10).float()
    torch.testing.assert_close(logits.grad, expected, rtol=1e-6, atol=1e-7)


def test_all_ignored_batch(device):
    logits = torch.randn(4, 9, device=device)
    target = torch.full((4,), -100, device=device)
    for reduction in ("mean", "sum", "none"):
        ours, grad, theirs, ref_grad = run_both(logits, target, None, None, reduction=reduction)
        assert_matches(ours, theirs.numpy(), 0, 0, what=reduction)  # NaN under "mean", zeros otherwise
        assert (grad == 0).all() and (ref_grad == 0).all()


def test_shapes_1d_spatial_and_non_contiguous(device):
    # (C,) with a 0-d target
    logits = torch.randn(11, device=device)
    for reduction in ("mean", "none"):
        ours, grad, theirs, ref_grad = run_both(logits, torch.tensor(4, device=device), reduction=reduction)
        assert ours.shape == theirs.shape == ()
        assert_matches(grad, ref_grad.numpy(), RTOL, ATOL)
    # (N, C, d1, d2): class dim 1, not innermost
    logits = torch.randn(3, 13, 4, 2, device=device)
    target = torch.randint(0, 13, (3, 4, 2), device=device)
    target[0, 1, 1] = -100
    for max_block in PATHS:
        upstream = torch.randn(3, 4, 2, device=device)
        ours, grad, theirs, ref_grad = run_both(logits, target, upstream, max_block, reduction="none")
        assert ours.shape == (3, 4, 2)
        assert_matches(ours, theirs.numpy(), RTOL, ATOL)
        assert_matches(grad, ref_grad.numpy(), RTOL, ATOL)
    probs = torch.softmax(torch.randn(3, 13, 4, device=device), 1)
    ours, grad, theirs, ref_grad = run_both(torch.randn(3, 13, 4, device=device), probs)
    assert_matches(grad, ref_grad.numpy(), RTOL, ATOL)
    # a transposed (non-contiguous) (N, C) input
    logits = torch.randn(21, 6, device=device).t()
    assert not logits.is_contiguous()
    ours, grad, theirs, ref_grad = run_both(logits, torch.randint(0, 21, (6,), device=device))
    assert_matches(ours, theirs.numpy(), RTOL, ATOL)
    assert_matches(grad, ref_grad.numpy(), RTOL, ATOL)
    # an empty batch
    empty = torch.randn(0, 5, device=device, requires_grad=True)
    assert softmax_gpu.cross_entropy(empty, torch.zeros(0, dtype=torch.long, device=device), reduction="sum").item() == 0


@pytest.mark.parametrize("max_block", PATHS)
def test_bfloat16_within_twice_torch_error(max_block, device):
    n, c = 6, 203
    logits = (3 * torch.randn(n, c)).bfloat16().to(device)
    target = torch.randint(0, c, (n,), device=device)
    a = logits.clone().requires_grad_()
    with on_path(max_block):
        loss = softmax_gpu.cross_entropy(a, target, label_smoothing=0.1)
        loss.backward()
    b = logits.cpu().clone().requires_grad_()
    torch_loss = F.cross_entropy(b, target.cpu(), label_smoothing=0.1)
    torch_loss.backward()
    exp_loss, exp_grad = reference.cross_entropy(logits.double().cpu().numpy(), target.cpu().numpy(), label_smoothing=0.1)
    assert loss.dtype == torch.float32 and a.grad.dtype == torch.bfloat16
    assert_matches(loss, exp_loss, 1e-6, 1e-6)  # float32 loss from exact bf16 inputs: float32 accuracy
    assert_within_torch_error(a.grad, b.grad, exp_grad, what="bf16 grad")


@pytest.mark.parametrize("max_block", PATHS)
def test_z_loss_and_softcap(max_block, device):
    n, c = 6, 45
    logits = 20 * torch.randn(n, c, device=device)
    target = torch.randint(0, c, (n,), device=device)
    target[2] = -100
    weight = torch.rand(c, device=device) + 0.5
    for z_loss, softcap, use_weight, smoothing in itertools.product((0.0, 1e-3), (None, 15.0), (False, True), (0, 0.1)):
        kw = dict(z_loss=z_loss, softcap=softcap, label_smoothing=smoothing, weight=weight if use_weight else None)
        a = logits.clone().requires_grad_()
        with on_path(max_block):
            loss = softmax_gpu.cross_entropy(a, target, **kw)
            loss.backward()
        exp_loss, exp_grad = reference.cross_entropy(
            logits.cpu().numpy(), target.cpu().numpy(), None if not use_weight else weight.cpu().numpy(),
            label_smoothing=smoothing, z_loss=z_loss, softcap=softcap,
        )
        assert_matches(loss, exp_loss, 1e-5, 1e-6, what=str(kw))
        assert_matches(a.grad, exp_grad, 1e-5, 1e-7, what=f"grad {kw}")
    # the same against a torch composition: softcap * tanh, then CE + z_loss * logsumexp^2
    b = logits.double().cpu().requires_grad_()
    capped = 15.0 * torch.tanh(b / 15.0)
    valid = target.cpu() != -100
    lse = torch.logsumexp(capped, -1)
    composed = (F.cross_entropy(capped, target.cpu(), reduction="none") + 1e-3 * lse**2)[valid].mean()
    ours = softmax_gpu.cross_entropy(logits, target, z_loss=1e-3, softcap=15.0)
    torch.testing.assert_close(ours.double().cpu(), composed.detach(), rtol=1e-5, atol=1e-6)
    # soft targets with z-loss
    probs = torch.softmax(torch.randn(n, c, device=device), -1)
    exp_loss, exp_grad = reference.cross_entropy(logits.cpu().numpy(), probs.cpu().numpy(), z_loss=1e-3, softcap=15.0)
    a = logits.clone().requires_grad_()
    softmax_gpu.cross_entropy(a, probs, z_loss=1e-3, softcap=15.0).backward()
    assert_matches(a.grad, exp_grad, 1e-5, 1e-7)


@pytest.mark.parametrize("max_block", PATHS)
def test_extreme_logits(max_block, device):
    c = 40
    logits = torch.randn(5, c, device=device)
    logits[0, ::2] = 1e4
    logits[0, 1::2] = -1e4
    logits[1, ::3] = -float("inf")  # masked vocabulary
    logits[2, :] = -float("inf")
    logits[2, 7] = 3.0  # -inf everywhere but the target
    target = torch.tensor([1, 4, 7, 0, 9], device=device)
    ours, grad, theirs, ref_grad = run_both(logits, target, None, max_block, reduction="none")
    assert torch.isfinite(ours).all() and torch.isfinite(grad).all()
    assert_matches(ours, theirs.numpy(), RTOL, 1e-3, what="loss")
    assert_matches(grad, ref_grad.numpy(), RTOL, ATOL, what="grad")
    assert ours[2] == 0 and (grad[2] == 0).all()


@pytest.mark.parametrize("max_block", PATHS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_nan_logit_makes_its_row_nan(max_block, smoothing, device):
    """A NaN anywhere in a row: that row's loss and gradient are NaN, whatever the path; an
    ignored row with a NaN has loss 0 and a NaN gradient, exactly as torch."""
    nan = float("nan")
    logits = 2 * torch.randn(6, 53, device=device)
    logits[0, 0] = nan  # first element
    logits[1, 40] = nan  # a later block on the looped path
    logits[2, :] = -float("inf")
    logits[2, 7] = nan  # among -inf only
    logits[3, 52] = nan  # ragged last block
    logits[4, 9] = nan  # ignored row
    target = torch.tensor([3, 40, 7, 0, -100, 11], device=device)
    ours, grad, theirs, ref_grad = run_both(logits, target, None, max_block, reduction="none", label_smoothing=smoothing)
    assert_matches(ours, theirs.numpy(), RTOL, ATOL, what="loss")  # NaN positions must match too
    assert_matches(grad, ref_grad.numpy(), 1e-5, 1e-6, what="grad")
    assert torch.isnan(grad[:5]).all() and torch.isfinite(grad[5]).all()
    mean, *_ = run_both(logits, target, None, max_block, label_smoothing=smoothing)
    assert torch.isnan(mean)


def test_nan_probability_target_row(device):
    logits = torch.randn(3, 20, device=device)
    logits[1, 13] = float("nan")
    target = torch.softmax(torch.randn(3, 20, device=device), -1)
    for max_block in PATHS:
        ours, grad, theirs, ref_grad = run_both(logits, target, None, max_block, reduction="none")
        assert_matches(ours, theirs.numpy(), RTOL, ATOL, what="loss")
        assert_matches(grad, ref_grad.numpy(), 1e-5, 1e-6, what="grad")


def test_weight_with_any_strides_and_integer_options(device):
    logits = 2 * torch.randn(6, 10, device=device)
    target = torch.tensor([1, 9, -100, 4, 0, 7], device=device)
    big = torch.rand(20, device=device) + 0.1
    for weight in (big[::2], big.view(10, 2)[:, 1], big[:10].flip(0)):  # strided, column, negative stride
        ours, grad, theirs, ref_grad = run_both(logits, target, weight=weight)
        assert_matches(ours, theirs.numpy(), RTOL, ATOL, what="loss")
        assert_matches(grad, ref_grad.numpy(), 1e-5, 1e-7, what="grad")
    # Python ints where floats are expected behave as the same floats
    ints = softmax_gpu.cross_entropy(logits, target, label_smoothing=1, z_loss=1, softcap=3)
    floats = softmax_gpu.cross_entropy(logits, target, label_smoothing=1.0, z_loss=1.0, softcap=3.0)
    assert ints.item() == floats.item()


def test_out_of_range_target_with_weight_never_indexes(device, monkeypatch):
    """With class weights a bad class index must not go through weight[target] (a device-side
    assert on CUDA): the mean loss comes out NaN instead. On CPU the eager IndexError check is
    switched off here, to take the path CUDA takes by default."""
    import softmax_gpu.ops.cross_entropy as ce

    monkeypatch.setattr(ce, "_check_class_indices", lambda *args: None)
    logits = torch.randn(3, 6, device=device, requires_grad=True)
    target = torch.tensor([2, 6, -100], device=device)
    weight = torch.rand(6, device=device)
    assert torch.isnan(ce._total_weight(target, weight, -100))  # (the fused linear cross-entropy's total)
    assert torch.isfinite(ce._total_weight(torch.tensor([2, 5, -100], device=device), weight, -100))
    total = ce._forward(logits.detach(), target, weight, LossOptions(), "mean", None)[2]
    assert torch.isnan(total)  # the prepare kernel's total, which cross_entropy uses
    loss = softmax_gpu.cross_entropy(logits, target, weight=weight)
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()  # a device-side assert would surface here
    assert torch.isnan(loss) and torch.isnan(logits.grad[:2]).all() and (logits.grad[2] == 0).all()  # row 2 ignored


@pytest.mark.parametrize("max_block", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_very_confident_rows_keep_the_true_class_gradient(max_block, dtype, smoothing, device):
    """The true class 30 above the rest: q_t - 1 is exactly 0 in float32, yet the exact
    gradient (about -C e^-30, or dominated by smoothing) must come out to ~1% relative."""
    c = 70
    logits = torch.randn(4, c)
    target = torch.tensor([3, 69, 16, 40])
    logits[torch.arange(4), target] = logits.max() + 30.0
    logits[3, 41] = logits[3, 40] + 1  # one row where the target is not the maximum
    logits = logits.to(dtype).to(device)
    a = logits.clone().requires_grad_()
    with on_path(max_block):
        softmax_gpu.cross_entropy(a, target.to(device), reduction="sum", label_smoothing=smoothing).backward()
    # The expected value in float64, written so that it keeps its own digits: q_t - 1 as
    # -(sum of the other q_j). (The reference's e^(z_t - lse) - 1 loses them: lse near 33
    # carries 7e-15 of rounding against a gradient of 1e-13.)
    z = logits.double().cpu().numpy()
    e = np.exp(z - z.max(axis=1, keepdims=True))
    q = e / e.sum(axis=1, keepdims=True)
    rows = np.arange(4)
    others = np.where(np.arange(c)[None, :] == target.numpy()[:, None], 0.0, q).sum(axis=1)
    want = smoothing * q[rows, target.numpy()] - (1 - smoothing) * others - smoothing / c
    got = a.grad.cpu()[torch.arange(4), target].double().numpy()
    assert (got < 0).all() and (want[:3] > -1e-9).all() if smoothing == 0 else True
    np.testing.assert_allclose(got, want, rtol=1e-4 if dtype == torch.float32 else 1e-2)


def test_confident_bfloat16_keeps_true_class_gradient(device):
    c = 300
    logits = torch.randn(4, c)
    target = torch.tensor([3, 100, 250, 0])
    logits[torch.arange(4), target] = 12.0  # p_true close to 1: grad = p - 1 is tiny and must not cancel to 0
    logits = logits.bfloat16().to(device)
    a = logits.clone().requires_grad_()
    softmax_gpu.cross_entropy(a, target.to(device), reduction="sum").backward()
    _, exp_grad = reference.cross_entropy(logits.double().cpu().numpy(), target.numpy(), reduction="sum")
    got = a.grad.cpu()[torch.arange(4), target].double().numpy()
    want = exp_grad[np.arange(4), target.numpy()]
    assert (got < 0).all()
    np.testing.assert_allclose(got, want, rtol=1e-2)


def test_inplace_backward(device):
    x = torch.randn(6, 33, device=device)
    w = torch.randn(33, 33, device=device, requires_grad=True)
    target = torch.randint(0, 33, (6,), device=device)
    grads = []
    for inplace in (False, True):
        w.grad = None
        logits = x @ w
        softmax_gpu.cross_entropy(logits, target, inplace_backward=inplace).backward()
        grads.append(w.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-7)
    # The logits now hold the gradient: autograd refuses a graph that saved their values.
    logits = x @ w
    side = (logits**2).sum()  # pow saves its input
    loss = softmax_gpu.cross_entropy(logits, target, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + side).backward()
    leaf = torch.randn(3, 5, device=device, requires_grad=True)
    with pytest.raises(ValueError, match="leaf"):
        softmax_gpu.cross_entropy(leaf, torch.tensor([0, 1, 2], device=device), inplace_backward=True)
    with torch.no_grad():  # nothing to differentiate: the logits are left alone
        kept = x.clone()
        softmax_gpu.cross_entropy(kept, target, inplace_backward=True)
        assert torch.equal(kept, x)


def test_backward_twice_is_refused(device):
    logits = torch.randn(3, 7, device=device, requires_grad=True)
    loss = softmax_gpu.cross_entropy(logits, torch.tensor([0, 1, 2], device=device))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_deterministic(device):
    logits = torch.randn(9, 77, device=device, requires_grad=True)
    target = torch.randint(0, 77, (9,), device=device)
    results = []
    for _ in range(2):
        logits.grad = None
        loss = softmax_gpu.cross_entropy(logits, target, label_smoothing=0.1, z_loss=1e-4)
        loss.backward()
        results.append((loss.detach().clone(), logits.grad.clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


# ---------------------------------------------------------------------------------------
# Traffic and bounds (interpreter only)
# ---------------------------------------------------------------------------------------

interpreter_only = pytest.mark.skipif(torch.cuda.is_available(), reason="counted in Triton's interpreter")


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_traffic_forward_backward_reads_logits_once(dtype):
    n, c = 4, 100
    logits = torch.randn(n, c).to(dtype).requires_grad_()
    target = torch.randint(0, c, (n,))
    logits_bytes = n * c * logits.element_size()
    with TrafficCounter() as t:
        loss = softmax_gpu.cross_entropy(logits, target)
        loss.backward()
    assert cross_entropy_config(c).single_block
    # O(N) beyond the logits: per row the target (8 B) read twice (the mean's total, the loss),
    # the target's logit, the grad scale, the upstream and the row loss (for the mean) read
    # (4 B each); loss and lse written (4 B each); then the counter, the total and the mean
    # (4 B each) and the mean's divisor read once more.
    size = logits.element_size()
    assert t.bytes_loaded == logits_bytes + MEAN_LOADS(n, size, programs=1)  # 4 short rows, one program
    assert t.bytes_stored == logits_bytes + MEAN_STORES(n)
    with TrafficCounter() as looped, config.block_limit(32):
        softmax_gpu.cross_entropy(logits, target).backward()
    # looped: 2 reads + 1 write, but the few head and tail elements of each row are read once
    edge = edge_elements(n, c, c, 16 // size) * size
    assert edge > 0 or size == 4
    assert looped.bytes_loaded == 2 * logits_bytes - edge + MEAN_LOADS(n, size, programs=n)
    assert looped.bytes_stored == logits_bytes + MEAN_STORES(n)


@interpreter_only
@pytest.mark.parametrize(
    "dtype, c, kw, logit_reads",
    [
        # plain rows read once up to config.max_block_cross_entropy_plain: 32768 in 16 bits
        # (32000-class vocabularies), 16384 in float32
        (torch.bfloat16, 32768, {}, 1),
        (torch.bfloat16, 32769, {}, 2),
        (torch.float32, 16384, {}, 1),
        (torch.float32, 16385, {}, 2),
        (torch.bfloat16, 8192, dict(label_smoothing=0.1), 1),  # the option-heavy variants up to 8192
        (torch.bfloat16, 8193, dict(label_smoothing=0.1), 2),
    ],
)
def test_traffic_single_read_limits(dtype, c, kw, logit_reads):
    """Forward + backward: N x C read logit_reads times and written once."""
    n = 2
    size = torch.tensor([], dtype=dtype).element_size()
    logits = torch.randn(n, c).to(dtype).requires_grad_()
    target = torch.randint(0, c, (n,))
    with TrafficCounter() as t, config.no_split():  # (two such rows would otherwise split)
        softmax_gpu.cross_entropy(logits, target, **kw).backward()
    nc = n * c * size
    edge = edge_elements(n, c, c, 16 // size) * size if logit_reads == 2 else 0  # the looped path reads the edge once
    assert t.bytes_loaded == logit_reads * nc - edge + MEAN_LOADS(n, size, programs=n)
    assert t.bytes_stored == nc + MEAN_STORES(n)


def test_16bit_wide_block_needs_vectors(device):
    """The 32768-wide 16-bit block fits its registers only with 16-byte vectors: logits whose
    row stride disagrees with the gradient's modulo a vector take float32's limits (looped,
    8192 wide) instead, with the same results."""
    n, c = 2, 20000
    buf = torch.randn(n, c + 1, device=device).bfloat16()
    logits = buf[:, :c]  # row stride 20001: not a whole number of 8-element vectors
    target = torch.tensor([3, 19999], device=device)
    loss, lse = poisoned((n,), torch.float32, device), poisoned((n,), torch.float32, device)
    grad = poisoned((n, c), torch.bfloat16, device)
    cfg = launch_cross_entropy(logits, target, None, loss, lse, grad, None, LossOptions())
    assert (cfg.vec, cfg.single_block, cfg.block_n) == (1, False, config.LOOP_BLOCK_CROSS_ENTROPY_PLAIN)
    aligned = config.vectors(cross_entropy_config(c, 2, plain=True), n, c, [(2, c), (2, c)])
    assert aligned.single_block and aligned.block_n == 32768  # what whole vectors would have taken
    ref = logits.double().cpu().requires_grad_()
    per_row = F.cross_entropy(ref, target.cpu(), reduction="none")
    per_row.sum().backward()
    assert_matches(loss, per_row.detach().numpy(), RTOL, 1e-6, what="loss")
    assert_matches(grad, ref.grad.numpy(), 1e-2, 1e-2, what="gradient")


@interpreter_only
@pytest.mark.parametrize("max_block", [None, 16])
def test_traffic_probability_targets_and_weights_read_once(max_block):
    """On the single-block path the probability targets and the class weights are read once
    (the gradient reuses them from registers); the looped path reads them again with the
    logits. Beyond that: the upstream (0-d, 4 B) once per rescale program in the backward,
    the row loss for the mean (4 B a row); the divisor once a program and once for the mean."""
    n, c = 4, 100
    logits = torch.randn(n, c, requires_grad=True)
    target = torch.softmax(torch.randn(n, c), -1)
    with TrafficCounter() as t, config.block_limit(max_block or config.MAX_BLOCK_CROSS_ENTROPY):
        softmax_gpu.cross_entropy(logits, target, weight=torch.rand(c) + 0.1, label_smoothing=0.1).backward()
    nc = n * c * 4
    if max_block is None:  # one program of 4 rows
        assert t.bytes_loaded == 3 * nc + n * 4 + 4 + 4 + 4
    else:  # 4 programs; the second pass reads the body of logits, targets and weights again, not the edge
        assert t.bytes_loaded == 6 * nc + n * (4 + 4) + 4 * n + 4


@interpreter_only
def test_traffic_no_grad_forward_reads_only():
    n, c = 4, 100
    logits, target = torch.randn(n, c), torch.randint(0, c, (n,))
    with torch.no_grad(), TrafficCounter() as t:
        softmax_gpu.cross_entropy(logits, target)
    # + the targets again and the row losses for the mean; counter, total and mean stored
    assert t.bytes_loaded == n * c * 4 + n * (8 + 8 + 4 + 4) + 4 and t.bytes_stored == n * 8 + 12  # + z_t


@interpreter_only
def test_traffic_non_uniform_upstream_scales_rows():
    n, c = 3, 50
    logits = torch.randn(n, c, requires_grad=True)
    with TrafficCounter() as t:
        loss = softmax_gpu.cross_entropy(logits, torch.randint(0, c, (n,)), reduction="none")
        loss.backward(torch.tensor([1.0, 2.0, 1.0]))  # only the middle row is rescaled
    assert t.bytes_stored == 2 * n * 4 + n * c * 4 + c * 4


def _launch_with_bad_class_indices(max_block, device, counter):
    n, c = 3, 40
    logits, target = torch.randn(n, c, device=device), torch.tensor([5, 40, -7], device=device)
    loss, lse, grad = poisoned((n,), torch.float32, device), poisoned((n,), torch.float32, device), torch.empty(n, c, device=device)
    divisor = torch.full((), 2.0, device=device)
    cfg = config.row_config(c, max_block or config.MAX_BLOCK_CROSS_ENTROPY)
    with counter([logits, target, loss, lse, grad, divisor]):
        launch_cross_entropy(logits, target, None, loss, lse, grad, divisor, LossOptions(), cfg=cfg)
    loss, grad = loss.cpu(), grad.cpu()
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1:]).all() and torch.isnan(grad[1:]).all()
    assert torch.isfinite(grad[0]).all()
    # the mean with class weights: the prepare kernel gathers weight[t] only for good t, and
    # the last program's row sum reads only the n row losses (50 lands in padding lanes)
    target = torch.tensor([5, 40, -7, 50], device=device)
    logits = torch.randn(4, c, device=device)
    weight = torch.rand(c, device=device)
    loss, lse = poisoned((4,), torch.float32, device), poisoned((4,), torch.float32, device)
    total, reduced = poisoned((), torch.float32, device), poisoned((), torch.float32, device)
    count = torch.full((), 7, dtype=torch.int32, device=device)
    with counter([logits, target, weight, loss, lse, total, reduced, count]):
        launch_cross_entropy_prepare(target, weight, total, count, c, -100)
        launch_cross_entropy(logits, target, weight, loss, lse, None, total, LossOptions(), cfg=cfg,
                             reduced=reduced, counter=count, reduction="mean")  # fmt: skip
    assert torch.isnan(total) and torch.isnan(reduced) and count.item() == 4
    good = torch.tensor([5, 0, 39, -100], device=device)  # and a clean batch: the mean itself
    with counter([logits, good, weight, loss, lse, total, reduced, count]):
        launch_cross_entropy_prepare(good, weight, total, count, c, -100)
        launch_cross_entropy(logits, good, weight, loss, lse, None, total, LossOptions(), cfg=cfg,
                             reduced=reduced, counter=count, reduction="mean")  # fmt: skip
    expected = F.cross_entropy(logits.double().cpu(), good.cpu(), weight=weight.double().cpu())
    torch.testing.assert_close(reduced.double().cpu(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total.cpu(), weight[good[:3]].sum().cpu())


@interpreter_only
@pytest.mark.parametrize("max_block", LOOP_PATHS)
def test_bad_class_index_never_reads_out_of_bounds(max_block):
    """The interpreter's counter checks every address against the buffers' bounds."""
    _launch_with_bad_class_indices(max_block, "cpu", lambda buffers: TrafficCounter(buffers=buffers))
    logits, target = torch.randn(3, 40), torch.tensor([5, 40, -7])
    with pytest.raises(IndexError, match="Target 40 is out of bounds"):
        softmax_gpu.cross_entropy(logits, target)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernel; the interpreter's twin is above")
@pytest.mark.parametrize("max_block", LOOP_PATHS)
def test_cuda_bad_class_index_rows_are_nan(max_block):
    """Out-of-range targets on the GPU (no eager check there): NaN rows, and no stray access,
    which bench/device_check.sh confirms by running this test under compute-sanitizer."""

    _launch_with_bad_class_indices(max_block, "cuda", lambda buffers: contextlib.nullcontext())
    torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------
# Bad input, registration, modules, Keras form
# ---------------------------------------------------------------------------------------


def test_bad_input_raises_before_launch(device):
    x = torch.randn(4, 5, device=device)
    t = torch.tensor([0, 1, 2, 3], device=device)
    cases = [
        (dict(input=x.long(), target=t), TypeError, "floating-point"),
        (dict(input=x, target=t.float()), ValueError, "probability targets"),
        (dict(input=x, target=t[:3]), ValueError, "class-index target"),
        (dict(input=x, target=t.to(torch.int16)), TypeError, "int64 or int32"),
        (dict(input=x, target=t, weight=torch.ones(4, device=device)), ValueError, "weight must have shape"),
        (dict(input=x, target=t, reduction="avg"), ValueError, "reduction"),
        (dict(input=x, target=t, label_smoothing=1.5), ValueError, "label_smoothing"),
        (dict(input=x, target=t, softcap=0.0), ValueError, "softcap"),
        (dict(input=x, target=t, z_loss=-1.0), ValueError, "z_loss"),
        (dict(input=x, target=t.to("meta")), RuntimeError, "same device"),
        (dict(input=torch.tensor(1.0, device=device), target=t), ValueError, "at least one dim"),
        (dict(input=x, target=torch.softmax(x, -1), ignore_index=0), RuntimeError, "not supported for floating"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            softmax_gpu.cross_entropy(**kwargs)


def _opcheck_samples(device):
    """Sample arguments for every cross-entropy custom op, covering its options: class
    indices and probabilities, weight, smoothing, z-loss, softcap, both divisors, the stats
    of the deferred gradient, 16-bit and float64 logits."""
    ops = torch.ops.softmax_gpu
    n, c = 4, 9
    target = torch.tensor([0, 8, -100, 3], device=device)
    probs = torch.softmax(torch.randn(n, c, device=device), -1)
    weight = torch.rand(c, device=device)
    for dtype in (torch.float32, torch.float16, torch.float64):
        logits = torch.randn(n, c, device=device).to(dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        total = torch.tensor(3.0, device=device, dtype=acc)
        samples = (
            (target, weight, total, (-100, 0.1, 1e-3, 5.0, "mean")),
            (target.clamp(min=0), None, None, (3, 0.0, 0.0, None, "none")),
            (probs.to(dtype), weight, total, (-100, 0.2, 1e-2, 2.0, "sum")),
        )
        for tgt, w, divisor, options in samples if dtype == torch.float32 else samples[:1]:
            for compute_grad, save_stats in ((True, False), (False, True)):
                yield ops.cross_entropy_forward.default, (logits, tgt, w, *options, compute_grad, save_stats)
            yield ops.cross_entropy_forward_inplace.default, (logits.clone(), tgt, w, *options)
            stats = ops.cross_entropy_forward.default(logits, tgt, w, *options, False, True)[3]
            for upstream in (torch.tensor(2.0**16, device=device, dtype=acc), torch.rand(n, device=device, dtype=acc)):
                yield ops.cross_entropy_backward.default, (logits, tgt, w, stats, upstream, divisor, *options[:4])
        if dtype != torch.float64:
            grad = torch.randn(n, c, device=device).to(dtype)
            yield ops.cross_entropy_scale_grad.default, (grad, torch.tensor(2.0, device=device))
            yield ops.cross_entropy_scale_grad.default, (grad, torch.rand(n, device=device))


def test_opcheck(device):
    """torch.library.opcheck on every cross-entropy op: schema, fake (meta) kernel, autograd
    registration and dispatch, for each sample."""
    seen = set()
    for op, args in _opcheck_samples(device):
        torch.library.opcheck(op, args)
        seen.add(op)
    assert {o.name() for o in seen} == {
        f"softmax_gpu::{name}"
        for name in ("cross_entropy_forward", "cross_entropy_forward_inplace", "cross_entropy_backward",
                     "cross_entropy_scale_grad")
    }  # fmt: skip


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("inplace", [False, True])
def test_eager_fast_path_matches_the_custom_ops_bitwise(reduction, inplace, device, monkeypatch):
    """Plain eager calls skip the dispatcher; the custom-op path must give the same bits, and
    both must report the in-place writes to autograd (version counters)."""
    import softmax_gpu.ops.cross_entropy as ce

    logits = 3 * torch.randn(5, 37, device=device)
    target = torch.tensor([0, 36, -100, 7, 7], device=device)
    weight = torch.rand(37, device=device)
    results = []
    for plain in (True, False):
        monkeypatch.setattr(ce, "_plain_eager", lambda *tensors, plain=plain: plain)
        leaf = logits.clone().requires_grad_()
        x = leaf * 1.0 if inplace else leaf  # in-place needs a non-leaf
        version = x._version
        loss = softmax_gpu.cross_entropy(x, target, weight, reduction=reduction, label_smoothing=0.1,
                                         inplace_backward=inplace)  # fmt: skip
        if inplace:
            assert x._version > version  # the gradient overwrote x: autograd must know
        seen, version = [], x._version
        leaf.register_hook(lambda g: seen.append(g._version))
        loss.backward(torch.full_like(loss, 0.5))  # upstream != 1: the scaling kernel writes
        if inplace:
            assert x._version > version  # the scaling wrote into x's storage
        else:
            assert seen and seen[0] >= 1  # the scaling wrote the gradient in place
        results.append((loss.detach(), leaf.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_tracers_see_the_custom_op(device):
    """make_fx, FakeTensorMode and export must trace the custom op, not the eager shortcut."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    logits = torch.randn(4, 9, device=device)
    target = torch.tensor([0, 8, -100, 3], device=device)

    def f(x, y):
        return softmax_gpu.cross_entropy(x, y)

    for mode in ("real", "fake"):
        graph = make_fx(f, tracing_mode=mode)(logits, target).graph
        assert any("softmax_gpu.cross_entropy_forward" in str(n.target) for n in graph.nodes), mode
    with FakeTensorMode() as fake:
        assert f(fake.from_tensor(logits), fake.from_tensor(target)).shape == ()

    class Loss(torch.nn.Module):
        def forward(self, x, y):
            return f(x, y)

    exported = torch.export.export(Loss(), (logits, target))
    assert any("softmax_gpu.cross_entropy_forward" in str(n.target) for n in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(logits, target), f(logits, target))


def test_torch_compile_training_step(device):
    model = torch.nn.Linear(8, 17).to(device)
    loss_fn = softmax_gpu.nn.CrossEntropyLoss(label_smoothing=0.1)

    def forward(x, y):
        logits = model(x)
        return loss_fn(logits, y) + softmax_gpu.log_softmax(logits, -1).mean()

    # fullgraph with the default backend (inductor): the loss (custom ops inside an
    # autograd.Function) and the log_softmax op trace with no graph break, and the compiled
    # backward runs on .backward().
    compiled = torch.compile(forward, fullgraph=True)
    x, y = torch.randn(5, 8, device=device), torch.randint(0, 17, (5,), device=device)
    loss = compiled(x, y)
    loss.backward()
    got = model.weight.grad.clone()
    model.weight.grad = None
    logits = model(x)
    expected = F.cross_entropy(logits, y, label_smoothing=0.1) + F.log_softmax(logits, -1).mean()
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, model.weight.grad, rtol=1e-5, atol=1e-6)


def test_module_matches_torch_module(device):
    weight = torch.rand(6, device=device)
    ours = softmax_gpu.nn.CrossEntropyLoss(weight=weight, ignore_index=1, reduction="sum", label_smoothing=0.05)
    theirs = torch.nn.CrossEntropyLoss(weight=weight, ignore_index=1, reduction="sum", label_smoothing=0.05)
    x, y = torch.randn(8, 6, device=device), torch.randint(0, 6, (8,), device=device)
    torch.testing.assert_close(ours(x, y), theirs(x, y), rtol=1e-6, atol=1e-6)
    assert "label_smoothing=0.05" in repr(ours)
    assert torch.equal(ours.state_dict()["weight"], weight)


def test_seed_categorical_crossentropy_from_logits_both_ways(device):
    """The seed's example: 2 samples, 10 classes, labels 1 and 3, one-hot y_true."""
    logits = torch.tensor(
        [[0.5, 2.1, -1.3, 0.0, 0.7, -0.2, 1.1, -2.0, 0.3, 0.9], [1.5, -0.4, 0.2, 3.3, -1.1, 0.6, 0.0, 0.8, -0.7, 1.2]],
        device=device,
    )
    y_true = F.one_hot(torch.tensor([1, 3]), 10).float().to(device)
    from_logits = softmax_gpu.categorical_crossentropy(y_true, logits, from_logits=True)
    from_probs = softmax_gpu.categorical_crossentropy(y_true, softmax_gpu.softmax(logits))
    expected = -np.log(reference.softmax(logits.cpu().numpy())[[0, 1], [1, 3]])
    np.testing.assert_allclose(from_logits.cpu().numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(from_probs.cpu().numpy(), expected, rtol=1e-6)
    smoothed = softmax_gpu.categorical_crossentropy(y_true, logits, from_logits=True, label_smoothing=0.1)
    smoothed_probs = softmax_gpu.categorical_crossentropy(y_true, softmax_gpu.softmax(logits), label_smoothing=0.1)
    torch.testing.assert_close(smoothed, smoothed_probs, rtol=1e-6, atol=1e-6)
    # Keras clips probabilities: a confident wrong prediction costs -log(1e-7), not inf.
    hard = softmax_gpu.categorical_crossentropy(y_true, F.one_hot(torch.tensor([0, 0]), 10).float().to(device))
    np.testing.assert_allclose(hard.cpu().numpy(), [-np.log(1e-7)] * 2, rtol=1e-5)
    # the overflow example: logits [123, 456, 789] are fine from_logits, and along axis 0
    big = torch.tensor([[123.0], [456.0], [789.0]], device=device)
    onehot = torch.tensor([[0.0], [0.0], [1.0]], device=device)
    assert softmax_gpu.categorical_crossentropy(onehot, big, from_logits=True, axis=0).item() == 0.0


# ---------------------------------------------------------------------------------------
# On a GPU only: sizes the interpreter cannot reach
# ---------------------------------------------------------------------------------------

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda_only
@pytest.mark.parametrize("n_cols", [50257, 128256, 151936])
def test_cuda_real_vocabularies(n_cols):
    logits = (2 * torch.randn(16, n_cols, device="cuda")).bfloat16()
    target = torch.randint(0, n_cols, (16,), device="cuda")
    ours, grad, theirs, ref_grad = run_both(logits, target, None, None, label_smoothing=0.1)
    assert_matches(ours, theirs.numpy(), 1e-5, 1e-5)
    assert_matches(grad.float(), ref_grad.numpy(), 1e-2, 1e-6)


@cuda_only
def test_cuda_offsets_beyond_2_pow_32_elements():
    """N x C above 2**32: the last rows' offsets overflow 32 bits; check them against the reference."""
    n_cols = 131072
    n_rows = 2**32 // n_cols + 3
    need = n_rows * n_cols * 2 * 2 + 2**30  # bf16 logits and gradient, plus slack
    if torch.cuda.mem_get_info()[0] < need:
        pytest.skip("not enough free GPU memory")
    logits = torch.empty(n_rows, n_cols, device="cuda", dtype=torch.bfloat16).normal_()
    target = torch.randint(0, n_cols, (n_rows,), device="cuda")
    leaf = logits.requires_grad_()
    loss = softmax_gpu.cross_entropy(leaf, target, reduction="none")
    loss.sum().backward()
    for row in (0, n_rows - 1):
        exp_loss, exp_grad = reference.cross_entropy(
            logits[row : row + 1].detach().double().cpu().numpy(), target[row : row + 1].cpu().numpy(), reduction="sum"
        )
        assert abs(loss[row].item() - exp_loss) < 1e-4
        assert_matches(leaf.grad[row : row + 1].float(), exp_grad, 1e-2, 1e-6)


# Ops that only allocate or re-view memory; anything else seen under the mode launches a kernel.
_NO_LAUNCH = {"empty", "empty_like", "new_empty", "empty_strided", "view", "_unsafe_view", "reshape", "as_strided",
              "alias", "detach", "t", "transpose", "permute", "expand", "select", "slice", "squeeze", "unsqueeze"}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "kw", [{}, dict(weight=True, label_smoothing=0.1, z_loss=1e-3), dict(soft=True)], ids=["plain", "options", "soft"]
)
def test_forward_launches_at_most_two_kernels(reduction, kw, device, monkeypatch):
    """A cross-entropy forward (with the gradient, for every reduction) launches the loss
    kernel and, for "sum" and "mean", the one-program prepare kernel: nothing else. Triton
    launches are counted at the launcher's kernels; torch ops under a dispatch mode, which
    also routes the call through the custom ops, as torch.compile would."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import softmax_gpu.ops.cross_entropy as ce

    inside_launch = []  # the interpreter's own tensor traffic while a kernel runs is not counted

    class Counted:
        def __init__(self, kernel):
            self.kernel, self.launches = kernel, 0

        def __getitem__(self, grid):
            self.launches += 1

            def launch(*args, **kwargs):
                inside_launch.append(True)
                try:
                    return self.kernel[grid](*args, **kwargs)
                finally:
                    inside_launch.pop()

            return launch

    class TorchOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.launching = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if func.namespace != "softmax_gpu" and name not in _NO_LAUNCH and not inside_launch:
                self.launching.append(name)
            return func(*args, **(kwargs or {}))

    kw = dict(kw)
    monkeypatch.setattr(ce, "_check_class_indices", lambda *args: None)  # CPU-only eager check (CUDA skips it)
    n, c = 6, 40
    logits = torch.randn(n, c, device=device, requires_grad=True)
    if kw.pop("soft", False):
        target = torch.softmax(torch.randn(n, c, device=device), -1)
    else:
        target = torch.randint(0, c, (n,), device=device)
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(c, device=device)
    kernels = {name: Counted(getattr(ce, name)) for name in ("cross_entropy_kernel", "cross_entropy_prepare_kernel")}
    for name, counted in kernels.items():
        monkeypatch.setattr(ce, name, counted)
    monkeypatch.setattr("softmax_gpu.runtime.interpreted", lambda kernel: True)
    # A dispatch mode does not see inside a custom op; so the Python bodies run under it here
    # (the eager fast path, forced), and every torch op they make is seen.
    monkeypatch.setattr(ce, "_plain_eager", lambda *tensors: True)
    with TorchOps() as mode:
        loss = softmax_gpu.cross_entropy(logits, target, reduction=reduction, **kw)
    triton_launches = sum(k.launches for k in kernels.values())
    assert triton_launches == (1 if reduction == "none" else 2)
    assert mode.launching == [], mode.launching
    monkeypatch.undo()
    for name, counted in kernels.items():  # (undo restored the kernels too)
        monkeypatch.setattr(ce, name, counted)
    monkeypatch.setattr("softmax_gpu.runtime.interpreted", lambda kernel: True)
    monkeypatch.setattr(ce, "_check_class_indices", lambda *args: None)
    assert loss.shape == (() if reduction != "none" else (n,))
    # the plain eager path (no mode) launches the same kernels
    before = triton_launches
    softmax_gpu.cross_entropy(logits, target, reduction=reduction, **kw)
    assert sum(k.launches for k in kernels.values()) - before == triton_launches


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reduce_launch_every_reduction_and_option(dtype, device, monkeypatch):
    """The reduction in its own launch after the loss kernel that writes the gradient (forced
    with a threshold of 0 tiles an SM): sum and mean, with class weights, smoothing, z-loss and
    an ignored row, agree with the done-counter's route to rounding and with float64 torch;
    the gradients are the same bits (only the sum's grouping differs); a class index out of
    range makes the reduced loss NaN on both routes."""
    n, c = 9, 300
    logits = (3 * torch.randn(n, c, device=device)).to(dtype)
    weight = torch.rand(c, device=device) + 0.1
    target = torch.randint(0, c, (n,), device=device)
    target[2] = -100
    cases = [dict(reduction="sum"), dict(reduction="mean"), dict(reduction="mean", weight=weight, label_smoothing=0.1),
             dict(reduction="sum", z_loss=1e-3)]  # fmt: skip
    shipped = config.REDUCE_LAUNCH_TILES_PER_SM
    for kw in cases:
        runs = {}
        for tiles_per_sm in (shipped, 0):
            monkeypatch.setattr(config, "REDUCE_LAUNCH_TILES_PER_SM", tiles_per_sm)
            x = logits.clone().requires_grad_()
            loss = softmax_gpu.cross_entropy(x, target, **kw)
            loss.backward()
            runs[tiles_per_sm] = (loss.detach(), x.grad)
        (counter_loss, counter_grad), (launch_loss, launch_grad) = runs[shipped], runs[0]
        torch.testing.assert_close(launch_loss, counter_loss, rtol=1e-6, atol=1e-6)
        assert torch.equal(launch_grad, counter_grad), kw
        if "z_loss" not in kw:
            torch_kw = {k: v for k, v in kw.items()}
            expected = F.cross_entropy(logits.double().cpu(), target.cpu(), **{
                k: (v.double().cpu() if isinstance(v, torch.Tensor) else v) for k, v in torch_kw.items()})
            assert abs(launch_loss.item() - expected.item()) <= 2e-6 * abs(expected.item()) + 1e-6, kw
    # a class index out of range: NaN, on the launch route too (through the launcher: the public
    # function refuses it on the CPU before any launch)
    bad = target.clone()
    bad[4] = c + 1
    for reduction in ("sum", "mean"):
        loss, lse = torch.empty(n, device=device), torch.empty(n, device=device)
        reduced, counter = torch.empty((), device=device), torch.empty((), dtype=torch.int32, device=device)
        total = torch.empty((), device=device) if reduction == "mean" else None
        launch_cross_entropy_prepare(bad, None, total, counter, c, -100)
        launch_cross_entropy(logits, bad, None, loss, lse, torch.empty_like(logits), total,
                             LossOptions(-100, 0.0, 0.0, None), reduced=reduced, counter=counter,
                             reduction=reduction)  # fmt: skip
        assert reduced.isnan(), reduction


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the last-program reduction's ordering needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_cuda_reduction_over_many_programs_is_exact_and_deterministic(dtype, reduction):
    """2^17 rows: the programs finish in any order and the last one sums every row's loss
    (the interpreter always runs them in order, so only a GPU exercises this). The result
    matches float64 and is the same bits every run, also with two calls in flight on two
    streams."""
    n, c = 1 << 17, 64
    logits = torch.randn(n, c, device="cuda").to(dtype)
    target = torch.randint(0, c, (n,), device="cuda")
    target[::5] = -100
    expected = F.cross_entropy(logits.double(), target, reduction=reduction)
    first = softmax_gpu.cross_entropy(logits, target, reduction=reduction)
    torch.testing.assert_close(first.double(), expected, rtol=1e-5, atol=1e-3)
    for _ in range(20):
        assert torch.equal(softmax_gpu.cross_entropy(logits, target, reduction=reduction), first)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    results = []
    for stream in streams:
        with torch.cuda.stream(stream):
            results.append(softmax_gpu.cross_entropy(logits, target, reduction=reduction))
    torch.cuda.synchronize()
    assert all(torch.equal(r, first) for r in results)
    # with the gradient: one program a row, the reduction in a launch of its own (float16
    # defers its gradient: the same route as above)
    x = logits.clone().requires_grad_()
    with_grad = softmax_gpu.cross_entropy(x, target, reduction=reduction)
    torch.testing.assert_close(with_grad.double(), expected, rtol=1e-5, atol=1e-3)
    for _ in range(5):
        assert torch.equal(softmax_gpu.cross_entropy(x, target, reduction=reduction), with_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_grad_short_rows(dtype, device):
    """The backward's rescale on short rows (37 x 101: 16 a program, odd width, so head, body
    and tail): each row times its factor in float32, rounded once; rows whose factor is
    exactly 1 are neither read nor written (bytes counted in the interpreter), and a 0-d
    factor scales every row."""
    from softmax_gpu.ops.cross_entropy import launch_scale_grad

    n, c = 37, 101
    grad = torch.randn(n, c, device=device).to(dtype)
    upstream = torch.rand(n, device=device) + 0.5
    upstream[[0, 5, 36]] = 1.0
    g = grad.clone()
    counter = TrafficCounter(buffers=[g, upstream]) if not torch.cuda.is_available() else contextlib.nullcontext()
    with counter:
        cfg = launch_scale_grad(g, upstream)
    assert cfg.single_block and cfg.rows == 16
    torch.testing.assert_close(g, (grad.float() * upstream[:, None]).to(dtype), rtol=0, atol=0)
    if not torch.cuda.is_available():
        live = (n - 3) * c * grad.element_size()
        assert (counter.bytes_loaded, counter.bytes_stored) == (n * 4 + live, live)
    g = grad.clone()
    launch_scale_grad(g, torch.tensor(3.0, device=device))
    torch.testing.assert_close(g, (grad.float() * 3.0).to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("path", ["single", "short rows", "looped"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_programs_stride_over_the_row_tiles(path, reduction, dtype, device, monkeypatch):
    """The loss kernel without the gradient on fewer programs than row tiles
    (config.cross_entropy_programs: a few an SM; forced to 3 here): each program strides over
    its tiles, and every output (losses, lse, the reduced loss, which the last of the 3
    programs sums in row order) has the same bits as with one program a tile; the same bytes
    move. 23 rows of
    37 classes with ignored rows and smoothing: one row a tile, four (the last one partial),
    or the looped path."""
    n, c = 23, 37
    logits = (2 * torch.randn(n, c, device=device)).to(dtype)
    target = torch.randint(0, c, (n,), device=device)
    target[[2, 17]] = -100
    options = LossOptions(-100, 0.1, 1e-3, None)
    with config.block_limit(16) if path == "looped" else contextlib.nullcontext():
        cfg = cross_entropy_config(c, logits.element_size())
    if path == "short rows":
        cfg = dataclasses.replace(cfg, rows=4)
    assert cfg.single_block == (path != "looped")
    tiles = -(-n // cfg.rows)

    def run(programs):
        monkeypatch.setattr(config, "cross_entropy_programs", lambda n_tiles, warps, dev, persistent=True: min(n_tiles, programs) if persistent else n_tiles)
        out = dict(loss=poisoned((n,), torch.float32, device), lse=poisoned((n,), torch.float32, device),
                   reduced=poisoned((), torch.float32, device),
                   total=poisoned((), torch.float32, device))  # fmt: skip
        counter = torch.full((), 5, dtype=torch.int32, device=device)
        reduce = reduction != "none"
        total = out["total"] if reduction == "mean" else None
        traffic = TrafficCounter(buffers=[logits, target, counter, *out.values()]) if not torch.cuda.is_available() else None
        with traffic or contextlib.nullcontext():
            if reduce:
                launch_cross_entropy_prepare(target, None, total, counter, c, -100)
            launch_cross_entropy(logits, target, None, out["loss"], out["lse"], None, total, options, cfg=cfg,
                                 reduced=out["reduced"] if reduce else None, counter=counter if reduce else None,
                                 reduction=reduction)  # fmt: skip
        if not reduce:
            del out["reduced"], out["total"]
        elif total is None:
            del out["total"]
        return out, traffic and (traffic.bytes_loaded, traffic.bytes_stored)

    strided, strided_bytes = run(3)
    one_a_tile, tile_bytes = run(tiles)
    for name, value in one_a_tile.items():
        assert not value.isnan().any(), f"{name} not written"
        assert torch.equal(strided[name], value), f"{path} {reduction} {dtype}: {name} differs on 3 programs"
    assert strided_bytes == tile_bytes


def test_loss_programs_grid(device):
    """The loss kernel's grid: programs an SM by warps (64 warps an SM, at most 32 programs),
    never more than the tiles; one a tile when it writes the gradient or holds a row wider
    than FORWARD_SINGLE_BLOCK_MAX in one block; SOFTMAX_GPU_CE_FORWARD_PATH=0
    (CROSS_ENTROPY_FORWARD_PATH off) gives one program a tile, and the forward the gradient's
    row configurations."""
    sms = config.sm_count(device)
    assert config.cross_entropy_programs(10**6, 16, device) == 4 * sms
    assert config.cross_entropy_programs(10**6, 1, device) == 32 * sms
    assert config.cross_entropy_programs(10**6, 32, device) == 2 * sms
    assert config.cross_entropy_programs(7, 32, device) == 7
    assert config.cross_entropy_programs(10**6, 16, device, persistent=False) == 10**6
    wide_single = cross_entropy_config(32000, 2, plain=True)
    assert not config.cross_entropy_persistent(True, cross_entropy_config(4096, 2, plain=True))
    assert config.cross_entropy_persistent(False, cross_entropy_config(4096, 2, plain=True))
    assert config.cross_entropy_persistent(False, cross_entropy_config(32000, 2, plain=True, forward_only=True))
    assert wide_single.single_block and not config.cross_entropy_persistent(False, wide_single)  # few rows' block
    wide = cross_entropy_config(32000, 2, plain=True, forward_only=True)
    assert (wide.block_n, wide.single_block, wide.num_warps) == (config.LOOP_BLOCK_CROSS_ENTROPY_FORWARD, False, 4)
    narrow = cross_entropy_config(4096, 2, plain=True, forward_only=True)
    assert narrow == cross_entropy_config(4096, 2, plain=True) and narrow.single_block
    assert cross_entropy_config(config.FORWARD_SINGLE_BLOCK_MAX, 2, plain=True, forward_only=True).single_block
    assert not cross_entropy_config(config.FORWARD_SINGLE_BLOCK_MAX + 1, 2, plain=True, forward_only=True).single_block
    few = cross_entropy_config(32000, 2, plain=True, forward_only=True, many_rows=False)
    assert few == cross_entropy_config(32000, 2, plain=True) and few.single_block  # few rows keep the block
    old = config.CROSS_ENTROPY_FORWARD_PATH
    try:
        config.CROSS_ENTROPY_FORWARD_PATH = False
        assert not config.cross_entropy_persistent(False, cross_entropy_config(4096, 2, plain=True))
        assert cross_entropy_config(32000, 2, plain=True, forward_only=True) == cross_entropy_config(32000, 2, plain=True)
    finally:
        config.CROSS_ENTROPY_FORWARD_PATH = old


@pytest.mark.parametrize("max_block", LOOP_PATHS)
@pytest.mark.parametrize("what", ["plain", "weights, smoothing, ignore", "probabilities", "z-loss, softcap"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_forward_without_gradient_every_option(max_block, what, dtype, device):
    """The forward without the gradient (no_grad: the looped rows keep one running (max, sum)
    a row, ROW_SCALARS, on the persistent grid) against float64 torch: per-row losses and the
    mean, every option, every dtype, odd width (head/tail edges); a row whose first 16-wide
    blocks are all -inf (the running max starts at -inf), rows with one NaN, one of them
    among -inf (NaN loss),
    a row far from 0 (shifted by 1e4 where the dtype keeps the loss)."""
    n, c = 9, 53
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    z = 2 * torch.randn(n, c, device=device, dtype=acc)
    z[1, :40] = float("-inf")
    z[4, 17] = float("nan")
    z[7, :40] = float("-inf")
    z[7, 5] = float("nan")  # a NaN among -inf: tl.max skips it, the row's loss must not
    if dtype == torch.float64 or (dtype == torch.float32 and what == "plain"):
        z[6] += 1e4  # (smoothing's and probabilities' terms of 1e4 cancel: not float32's to keep)
    logits = z.to(dtype)
    kw = {}
    if what == "probabilities":
        target = torch.softmax(torch.randn(n, c, device=device), -1).to(dtype)
    else:
        target = torch.randint(40, c, (n,), device=device)
        target[2] = 2 if what.endswith("ignore") else -100
    if what.startswith("weights"):
        kw = dict(weight=(torch.rand(c, device=device) + 0.1).to(acc), label_smoothing=0.1, ignore_index=2)
    if what == "z-loss, softcap":
        kw = dict(z_loss=1e-3, softcap=30.0)
    with torch.no_grad(), on_path(max_block):
        per_row = softmax_gpu.cross_entropy(logits, target, reduction="none", **kw)
        mean = softmax_gpu.cross_entropy(logits, target, **kw)
    z64 = logits.double().cpu()
    cap, lam = kw.get("softcap"), kw.get("z_loss", 0.0)
    zc = z64 if cap is None else cap * torch.tanh(z64 / cap)
    tgt = target.double().cpu() if what == "probabilities" else target.cpu()
    kw64 = {k: (v.double().cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()
            if k in ("weight", "label_smoothing", "ignore_index")}  # fmt: skip
    ref = F.cross_entropy(zc, tgt, reduction="none", **kw64)
    if lam:
        ref = ref + lam * torch.where(tgt != -100, torch.logsumexp(zc, -1) ** 2, 0.0)
    ignore = kw.get("ignore_index", -100)
    if what == "probabilities":
        counted = torch.ones(n, dtype=torch.float64)
    elif "weight" in kw:
        counted = torch.where(tgt != ignore, kw64["weight"][tgt.clamp(0, c - 1)], 0.0)
    else:
        counted = (tgt != ignore).double()
    tol = (1e-12, 1e-12) if dtype == torch.float64 else (RTOL, ATOL)
    assert per_row[4].isnan() and per_row[7].isnan() and mean.isnan()
    keep = (torch.arange(n) != 4) & (torch.arange(n) != 7)
    assert_matches(per_row.cpu()[keep], ref[keep].numpy(), *tol, what=f"{what} {dtype} row losses")
    with torch.no_grad(), on_path(max_block):
        mean = softmax_gpu.cross_entropy(logits[keep], target[keep], **kw)
    assert_matches(mean.cpu(), (ref[keep].sum() / counted[keep].sum()).numpy(), *tol, what=f"{what} {dtype} mean")


@pytest.mark.parametrize("factor", [1.0, 0.5])
def test_scale_grad_programs_stride_over_the_rows(factor, device):
    """More row blocks than the rescale's grid (config.scale_grad_programs: twice the SM
    count): each program strides over its blocks and every row is scaled exactly once; a 0-d
    factor of 1 costs each program one 4-byte read and writes nothing."""
    from softmax_gpu.ops.cross_entropy import launch_scale_grad

    n, c = 2 * config.SCALE_GRAD_PROGRAMS_PER_SM * config.sm_count(device) + 37, 24
    programs = config.scale_grad_programs(n, device)
    assert programs < n
    grad = torch.randn(n, c, device=device)
    g = grad.clone()
    upstream = torch.tensor(factor, device=device)
    counter = TrafficCounter(buffers=[g, upstream]) if not torch.cuda.is_available() else contextlib.nullcontext()
    with counter:
        cfg = launch_scale_grad(g, upstream, cfg=config.row_config(c, 32))  # one row a block
    assert cfg.rows == 1
    torch.testing.assert_close(g, grad * factor, rtol=0, atol=0)
    if not torch.cuda.is_available():
        moved = 0 if factor == 1.0 else n * c * 4
        assert (counter.bytes_loaded, counter.bytes_stored) == (programs * 4 + moved, moved)


@pytest.mark.parametrize("rows_per_block", [1, 8])
def test_scale_grad_strides_with_per_row_factors(rows_per_block, device, monkeypatch):
    """Three programs striding over 37 rows (one row a block, or blocks of 8 rows with a
    short last one), per-row factors, some exactly 1: every row scaled once, rows whose
    factor is 1 neither read nor written."""
    from softmax_gpu.ops.cross_entropy import launch_scale_grad

    monkeypatch.setattr(config, "scale_grad_programs", lambda n_blocks, device: min(n_blocks, 3))
    n, c = 37, 40
    grad = torch.randn(n, c, device=device)
    upstream = torch.rand(n, device=device) + 0.5
    upstream[[0, 9, 36]] = 1.0
    g = grad.clone()
    counter = TrafficCounter(buffers=[g, upstream]) if not torch.cuda.is_available() else contextlib.nullcontext()
    with counter:
        cfg = launch_scale_grad(g, upstream, cfg=dataclasses.replace(config.row_config(c, 64), rows=rows_per_block))
    assert cfg.rows == rows_per_block
    torch.testing.assert_close(g, grad * upstream[:, None], rtol=0, atol=0)
    if not torch.cuda.is_available():
        live = (n - 3) * c * 4
        assert (counter.bytes_loaded, counter.bytes_stored) == (n * 4 + live, live)


# ---------------------------------------------------------------------------------------
# Split rows (few long rows: a (rows, chunks) grid, config.split_rows)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_split_rows_every_option(dtype, reduction, device):
    """Forced split (chunks of 32 columns in 16-wide blocks, the last one partial) against
    float64 torch: class indices (one ignored, one a valid class that is ignore_index) with
    and without weights, smoothing, z-loss and softcap, and probability targets; forward and
    the gradient (always deferred to the backward for split rows)."""
    n, c = 4, 150
    logits = (3 * torch.randn(n, c, device=device)).to(dtype)
    weight = torch.rand(c, device=device) + 0.1
    cases = [dict(), dict(weight=weight, label_smoothing=0.1, ignore_index=5), dict(soft=True, label_smoothing=0.2),
             dict(soft=True, weight=weight)]
    for kw in cases:
        kw = dict(kw)
        if kw.pop("soft", False):
            target = torch.softmax(torch.randn(n, c, device=device), -1)
        else:
            target = torch.randint(0, c, (n,), device=device)
            target[1], target[2] = kw.get("ignore_index", -100), 5  # ignored; a class, ignored where ignore_index=5
        upstream = torch.randn(n, device=device) if reduction == "none" else None
        with config.force_split(32):
            ours, grad, theirs, ref_grad = run_both(logits.float(), target, upstream, 16, reduction=reduction, **kw)
            ours_dtype, grad_dtype, _, _ = run_both(logits, target.to(dtype) if target.is_floating_point() else target,
                                                    upstream, 16, reduction=reduction, **kw)  # fmt: skip
        what = f"{dtype} {reduction} {sorted(kw)}"
        assert_matches(ours, theirs.numpy(), RTOL, 1e-6, what=what + " loss (float32)")
        assert_matches(grad, ref_grad.numpy(), RTOL, ATOL, what=what + " grad (float32)")
        tol = {torch.float64: (1e-12, 1e-12), torch.float32: (RTOL, 1e-6)}.get(dtype, (1e-2, 1e-2))
        assert_matches(ours_dtype, theirs.numpy(), *tol, what=what + " loss")
        assert_matches(grad_dtype, ref_grad.numpy(), *tol, what=what + " grad")


def test_split_rows_z_loss_softcap_nan_and_determinism(device):
    """Split rows with z-loss and softcap; a NaN logit makes its row's loss and gradient NaN
    (also in another chunk than the target's); two runs give the same bits."""
    n, c = 3, 130
    logits = 3 * torch.randn(n, c, device=device)
    target = torch.tensor([3, 120, 64], device=device)
    results = []
    for _ in range(2):
        x = logits.clone().requires_grad_()
        with config.block_limit(16), config.force_split(32):
            loss = softmax_gpu.cross_entropy(x, target, z_loss=1e-3, softcap=4.0, reduction="sum")
            loss.backward()
        results.append((loss.detach(), x.grad))
    ref = logits.double().cpu().requires_grad_()
    z = 4.0 * torch.tanh(ref / 4.0)
    lse = torch.logsumexp(z, -1)
    (F.cross_entropy(z, target.cpu(), reduction="sum") + 1e-3 * (lse**2).sum()).backward()
    assert_matches(results[0][1], ref.grad.numpy(), RTOL, ATOL, what="z-loss softcap split grad")
    logits[1, 10] = float("nan")  # chunk 0; the target (120) is in chunk 3
    with config.force_split(32):
        loss, grad, _, _ = run_both(logits, target, None, 16, reduction="none")
    assert torch.isnan(loss[1]) and torch.isnan(grad[1]).all()
    assert torch.isfinite(loss[[0, 2]]).all() and torch.isfinite(grad[[0, 2]]).all()


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_traffic_split_rows(dtype):
    """Split forward + backward (mean): the looped path's 2 reads + 1 write of the logits (one
    read in the forward, one read and the write in the backward, whose gradient is always
    deferred for split rows), plus O(N * chunks) values: the partials (2 a chunk and z_t)
    written once and read once, by the row's combine program, and a few scalars a program."""
    n, c = 3, 200
    logits = torch.randn(n, c).to(dtype).requires_grad_()
    target = torch.randint(0, c, (n,))
    with config.block_limit(32), config.force_split(32):
        split = softmax_gpu.ops.cross_entropy.cross_entropy_split(n, c, logits.element_size())
        backward_split = softmax_gpu.ops.cross_entropy.cross_entropy_split(n, c, logits.element_size(), streaming=True)
    chunks = split.chunks
    assert chunks == backward_split.chunks == 7
    logits_bytes = n * c * logits.element_size()
    with TrafficCounter() as looped, config.block_limit(32), config.no_split():
        softmax_gpu.cross_entropy(logits, target).backward()
    with TrafficCounter() as t, config.block_limit(32), config.force_split(32):
        softmax_gpu.cross_entropy(logits, target).backward()
    assert c % (16 // logits.element_size()) == 0  # whole vectors: no edge, read twice like the body
    assert looped.bytes_loaded == 2 * logits_bytes + MEAN_LOADS(n, logits.element_size(), programs=n)
    partials = n * chunks * 2 * 4  # (max, sum without the target) a chunk, float32
    # Stats launch: the target in each program (8 B), the target's logit in chunk 0's, the
    # targets once more for the mean's total (program (0, 0)). Combine, a program a row: the
    # target, z_t (4 B), the row's partials once; the last program the n row losses and the
    # divisor. Backward, a program a chunk: the target, the 4 row statistics, the upstream
    # gradient and the divisor (4 B each).
    stats_launch = n * chunks * 8 + n * logits.element_size() + n * 8
    combine = n * (8 + 4) + partials + n * 4 + 4
    backward = n * chunks * (8 + 4 * 4 + 4 + 4)
    assert t.bytes_loaded == 2 * logits_bytes + stats_launch + combine + backward
    # Beside the looped path's stores: the partials and z_t, and the 4 statistics a row.
    assert t.bytes_stored == looped.bytes_stored + partials + n * 4 + n * 4 * 4


def test_split_rows_forward_launches_two_kernels(device, monkeypatch):
    """Every reduction: the split stats kernel (a program a chunk) and the combine (a program
    a row), no prepare launch."""
    import softmax_gpu.ops.cross_entropy as ce

    launches = []

    class Counted:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launches.append((self.name, grid))
            return self.kernel[grid]

    for name in ("cross_entropy_kernel", "cross_entropy_prepare_kernel", "cross_entropy_split_stats_kernel",
                 "cross_entropy_split_combine_kernel"):
        monkeypatch.setattr(ce, name, Counted(name, getattr(ce, name)))
    monkeypatch.setattr("softmax_gpu.runtime.interpreted", lambda kernel: True)
    logits, target = torch.randn(2, 70, device=device), torch.randint(0, 70, (2,), device=device)
    for reduction in ("mean", "sum", "none"):
        launches.clear()
        with torch.no_grad(), config.force_split(32):
            loss = softmax_gpu.cross_entropy(logits, target, reduction=reduction)
        assert launches == [("cross_entropy_split_stats_kernel", (2, 3)), ("cross_entropy_split_combine_kernel", (2,))]
        expected = F.cross_entropy(logits.double().cpu(), target.cpu(), reduction=reduction)
        torch.testing.assert_close(loss.double().cpu(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_rows_forward_given_grad(dtype, device):
    """The forward op asked for the gradient (as autograd asks for one-program rows of these
    dtypes) on split rows: after the stats and combine launches, the split backward kernel
    writes it with an upstream gradient of 1, over the mean's divisor. Against float64 torch
    and the one-program path."""
    n, c = 3, 90
    logits = (2 * torch.randn(n, c, device=device)).to(dtype)
    target = torch.tensor([4, 80, -100], device=device)
    outputs = {}
    for path in ("split", "one program"):
        with config.block_limit(16), (config.force_split(32) if path == "split" else config.no_split()):
            outputs[path] = torch.ops.softmax_gpu.cross_entropy_forward(
                logits, target, None, -100, 0.1, 0.0, None, "mean", True, False)
    loss, _lse, grad, _stats, total = outputs["split"]
    ref = logits.double().cpu().requires_grad_()
    ref_loss = F.cross_entropy(ref, target.cpu(), label_smoothing=0.1)
    ref_loss.backward()
    tol = (RTOL, 1e-6) if dtype == torch.float32 else (1e-2, 1e-2)
    assert_matches(loss, ref_loss.detach().numpy(), RTOL, 1e-6, what="split forward's loss")
    assert_matches(grad, ref.grad.numpy(), *tol, what="split forward's gradient")
    assert total.item() == 2
    torch.testing.assert_close(grad, outputs["one program"][2], rtol=2e-6 if dtype == torch.float32 else 1e-2, atol=1e-6)


def test_split_rows_defer_the_gradient_so_retain_graph_works(device):
    """bfloat16 split rows take the deferred route (the one-program path stores the gradient
    and refuses a second backward): two backwards through one graph give the same bits."""
    x = torch.randn(2, 70, device=device).bfloat16().requires_grad_()
    target = torch.tensor([3, 66], device=device)
    with config.force_split(32):
        loss = softmax_gpu.cross_entropy(x, target)
        loss.backward(retain_graph=True)
        first = x.grad.clone()
        x.grad = None
        loss.backward()
    assert torch.equal(first, x.grad)


def test_split_rows_opcheck(device):
    logits = torch.randn(2, 70, device=device)
    target = torch.randint(0, 70, (2,), device=device)
    with config.force_split(32):
        torch.library.opcheck(torch.ops.softmax_gpu.cross_entropy_forward.default,
                              (logits, target, None, -100, 0.1, 0.0, None, "mean", True, False))
        torch.library.opcheck(torch.ops.softmax_gpu.cross_entropy_forward.default,
                              (logits.double(), target, None, -100, 0.0, 1e-3, 3.0, "sum", False, True))


@pytest.mark.parametrize("rows, cols, plain, split", [(1, 128256, True, True), (32, 128256, True, True),
                                                      (32, 128256, False, True), (4096, 128256, True, False),
                                                      (1, 16384, True, False), (1, 8192, False, False)])
def test_config_splits_few_long_rows(rows, cols, plain, split):
    """The cross-entropy split for issue 9's few long rows and not for a training batch or
    rows the forward reads in one block."""
    from softmax_gpu.ops.cross_entropy import cross_entropy_split

    for itemsize in (2, 4, 8):
        cfg = cross_entropy_split(rows, cols, itemsize, plain=plain)
        # float64's single block is a quarter as wide, so its narrower rows loop and split too
        assert (cfg is not None) == (split or (itemsize == 8 and 2 * rows <= config.DEFAULT_SM_COUNT)), (itemsize, cfg)
        if cfg is not None:
            assert cfg.chunks >= 2 and rows * cfg.chunks <= config.DEFAULT_SM_COUNT + rows
            assert (cfg.chunks - 1) * cfg.chunk_cols < cols <= cfg.chunks * cfg.chunk_cols
    assert cross_entropy_split(1, 128256, 2, plain=True).chunks == 126
    assert cross_entropy_split(32, 128256, 2, streaming=True).chunks == 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_rows_inplace_backward(dtype, device):
    """inplace_backward with split rows: each program overwrites only its own chunk, and no
    program reads another chunk's logits after the first launch (the target's logit among
    them: the stats launch hands it over), so the gradient is the out-of-place one."""
    n, c = 3, 100
    x = torch.randn(n, c, device=device).to(dtype)
    w = torch.eye(c, device=device, dtype=dtype).requires_grad_()
    target = torch.tensor([90, 5, 40], device=device)  # the last chunk, the first, a middle one
    grads = []
    for inplace in (False, True):
        w.grad = None
        with config.force_split(16):
            softmax_gpu.cross_entropy(x @ w, target, label_smoothing=0.1, inplace_backward=inplace).backward()
        grads.append(w.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def _outcome(fn, logits, target, reduction, **kw):
    """('ok', loss, gradient of the logits (and of probability targets)) or ('raised', type, message)."""
    logits, target = logits.clone().requires_grad_(), target.clone()
    if target.is_floating_point():
        target.requires_grad_()
    try:
        loss = fn(logits, target, reduction=reduction, **kw)
    except Exception as e:  # noqa: BLE001 - the error itself is compared
        return "raised", type(e), str(e)
    loss.sum().backward()
    return "ok", loss.detach(), logits.grad, target.grad


def _assert_same_outcome(ours, torchs, case):
    assert ours[0] == torchs[0], (case, ours, torchs)
    if ours[0] == "raised":
        assert ours[1] is torchs[1] and ours[2] == torchs[2], (case, ours, torchs)
        return
    for a, b in zip(ours[1:], torchs[1:]):
        if a is None or b is None:
            assert a is None and b is None, case
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, (case, a, b)
        torch.testing.assert_close(a, b, equal_nan=True, msg=lambda m: f"{case}: {m}")
        signed = ~a.isnan()  # -0.0 where torch gives -0.0 (an empty sum negated)
        assert torch.equal(a.signbit() & signed, b.signbit() & signed), (case, a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_classes_as_torch(dtype, monkeypatch):
    """C == 0, as torch.nn.functional.cross_entropy: targets all ignore_index give 0 a row, a
    0 sum and a NaN mean (0 / 0); any other class index raises torch's IndexError; label
    smoothing makes every row NaN (torch adds eps / C = inf times 0); probability targets
    give -0.0 a row and a NaN mean (torch divides by numel / C). Gradients are empty, of the
    input's shape. Nothing launches: a launch would raise here (the interpreter is 'off')."""
    monkeypatch.setattr("softmax_gpu.runtime.interpreted", lambda kernel: False)
    ignored, long = torch.full((4,), -100), dict(dtype=torch.long)
    cases = [  # (logits shape, target)
        ((4, 0), ignored),
        ((4, 0), torch.zeros(4, **long)),  # IndexError: Target 0 is out of bounds.
        ((4, 0), torch.tensor([-100, -100, -3, -100])),  # IndexError, a negative one
        ((4, 0), torch.empty(4, 0, dtype=dtype)),  # probabilities
        ((0, 0), torch.empty(0, **long)),
        ((0, 0), torch.empty(0, 0, dtype=dtype)),
        ((0,), torch.tensor(-100)),  # unbatched
        ((0,), torch.tensor(2)),
        ((2, 0, 3), torch.empty(2, 0, 3, dtype=dtype)),  # (N, C, d): probabilities
    ]
    options = [{}, dict(label_smoothing=0.1), dict(weight=torch.empty(0, dtype=dtype)),
               dict(weight=torch.empty(0, dtype=dtype), label_smoothing=0.3)]  # fmt: skip
    for (shape, target), kw, reduction in itertools.product(cases, options, ("none", "sum", "mean")):
        logits = torch.empty(shape, dtype=dtype)
        case = (shape, target.tolist(), kw, reduction)
        ours = _outcome(softmax_gpu.cross_entropy, logits, target, reduction, **kw)
        _assert_same_outcome(ours, _outcome(F.cross_entropy, logits, target, reduction, **kw), case)
    # (N, C, d) class indices: torch fails inside its own reshape ("size mismatch"); ours
    # treats them as the 2-D case does.
    loss = softmax_gpu.cross_entropy(torch.empty(2, 0, 3, dtype=dtype), torch.full((2, 3), -100), reduction="none")
    assert loss.shape == (2, 3) and (loss == 0).all()
    # The extensions: ignored rows stay 0 under z_loss and softcap; the in-place backward
    # and split rows have nothing to write.
    with config.force_split(16):
        logits = torch.empty(4, 0, dtype=dtype, requires_grad=True)
        loss = softmax_gpu.cross_entropy(logits * 1, ignored, reduction="sum", z_loss=0.1, softcap=5.0,
                                         inplace_backward=True)  # fmt: skip
        loss.backward()
    assert loss.item() == 0 and logits.grad.shape == (4, 0)


# ---------------------------------------------------------------------------------------
# Cooperative rows: the plain loss with its gradient, a long row held by a group of programs
# ---------------------------------------------------------------------------------------
# config.force_cooperative(chunk, programs) as in tests/test_softmax.py: in Triton's
# interpreter the kernel's two halves, on a GPU the one cooperative launch.


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cooperative_rows_every_option_it_takes(dtype, reduction, device):
    """Forced cooperative rows (chunks of 48 classes, 2 groups a grid, several rows a group)
    against float64 torch: class indices with an ignored row and a row whose target is the
    last class, z-loss, a soft cap, another ignore_index, int32 targets; loss and gradient,
    per-row upstream factors for "none". Options it does not take (weights, smoothing,
    probability targets) keep their paths and still agree."""
    n, c = 7, 150
    logits = (3 * torch.randn(n, c, device=device)).to(dtype)
    cases = [dict(), dict(z_loss=1e-3), dict(softcap=5.0), dict(z_loss=1e-3, softcap=4.0, ignore_index=5),
             dict(int32=True), dict(label_smoothing=0.1), dict(weight=torch.rand(c, device=device) + 0.1)]
    for kw in cases:
        kw = dict(kw)
        target = torch.randint(0, c, (n,), device=device)
        target[1], target[2], target[3] = kw.get("ignore_index", -100), 5, c - 1
        if kw.pop("int32", False):
            target = target.int()
        upstream = torch.randn(n, device=device) if reduction == "none" else None
        with config.force_cooperative(48, 8):
            plan = softmax_gpu.ops.cross_entropy._cooperative_plan(
                logits, target, kw.get("weight"), logits, None, LossOptions(kw.get("ignore_index", -100),
                kw.get("label_smoothing", 0.0), kw.get("z_loss", 0.0), kw.get("softcap")), reduction)  # fmt: skip
            assert (plan is not None) == ("weight" not in kw and "label_smoothing" not in kw), kw
            if "z_loss" in kw or "softcap" in kw:  # torch has neither: the explicit formula in float64
                x = logits.clone().requires_grad_()
                ours = softmax_gpu.cross_entropy(x, target, reduction=reduction, **kw)
                ours.backward(torch.ones_like(ours) if upstream is None else upstream)
                grad = x.grad
                theirs, ref_grad = _z_loss_softcap_reference(logits, target, upstream, reduction, **kw)
            else:
                ours, grad, theirs, ref_grad = run_both(logits, target, upstream, None, reduction=reduction, **kw)
        if plan is not None:
            assert (plan[0].chunks, plan[0].groups) == (4, 2)
        what = f"{dtype} {reduction} {sorted(kw)}"
        tol = (RTOL, 1e-6) if dtype == torch.float32 else (1e-2, 1e-2)
        assert_matches(ours, theirs.numpy(), *tol, what=what + " loss")
        assert_matches(grad, ref_grad.numpy(), tol[0], ATOL if dtype == torch.float32 else 1e-2, what=what + " grad")


def _z_loss_softcap_reference(logits, target, upstream, reduction, z_loss=0.0, softcap=None, ignore_index=-100):
    """(loss, gradient) in float64 of the soft-capped loss with z-loss, reduced like torch."""
    x = logits.double().cpu().requires_grad_()
    z = softcap * torch.tanh(x / softcap) if softcap else x
    t = target.cpu().long()
    valid = t != ignore_index
    per_row = F.cross_entropy(z, t, reduction="none", ignore_index=ignore_index)
    per_row = per_row + z_loss * torch.logsumexp(z, -1) ** 2 * valid
    loss = {"mean": lambda: per_row.sum() / valid.sum(), "sum": per_row.sum, "none": lambda: per_row}[reduction]()
    loss.backward(torch.ones_like(loss) if upstream is None else upstream.double().cpu())
    return loss.detach(), x.grad


def test_cooperative_rows_nan_bad_target_inplace_and_determinism(device):
    """A NaN logit makes its row's loss and gradient NaN (in a chunk other than the
    target's); a class index out of range gives a NaN loss (the mean NaN) without touching
    another row; the in-place backward gives the out-of-place gradient bit for bit (no program
    reads another chunk's logits: the target's logit travels in the partials); two runs give
    the same bits."""
    n, c = 5, 130
    logits = 3 * torch.randn(n, c, device=device)
    target = torch.tensor([3, 120, 64, 0, 129], device=device)
    logits[1, 10] = float("nan")
    with config.force_cooperative(32, 10):
        loss, grad, _, _ = run_both(logits, target, None, None, reduction="none")
    assert torch.isnan(loss[1]) and torch.isnan(grad[1]).all()
    assert torch.isfinite(loss[[0, 2, 3, 4]]).all() and torch.isfinite(grad[[0, 2, 3, 4]]).all()
    logits[1, 10] = 0.0
    w = torch.eye(c, device=device).requires_grad_()
    runs = []
    for inplace in (False, True, True):
        w.grad = None
        with config.force_cooperative(32, 10):
            softmax_gpu.cross_entropy(logits @ w, target, z_loss=1e-3, inplace_backward=inplace).backward()
        runs.append(w.grad.clone())
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[1], runs[2])
    if device == "cpu":  # (a bad class index is caught before the launch on CUDA only when asked to)
        return
    bad = target.clone()
    bad[2] = c + 7
    x = logits.clone().requires_grad_()
    with config.force_cooperative(32, 10):
        per_row = softmax_gpu.cross_entropy(x, bad, reduction="none")
    assert torch.isnan(per_row[2]) and torch.isfinite(per_row[[0, 1, 3, 4]]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cooperative_rows_edges_ignored_nan_and_bad_index(dtype, reduction, device):
    """Through launch_cross_entropy itself (the public function refuses a bad class index on
    the CPU), rows of 131 classes whose heads and tails lie outside whole 16-byte vectors:
    a target in row 1's head and one in row 2's tail (chunk 0's edge), an ignored row with a
    NaN logit (loss 0, gradient NaN, as the one-program-a-row kernel gives), a class index out
    of range (loss NaN, gradient NaN; the mean NaN), against float64 for the others and
    bit for bit against the NaN pattern of the one-program-a-row path."""
    n, c = 6, 131
    vec = 16 // torch.empty((), dtype=dtype).element_size()
    logits = (3 * torch.randn(n, c, device=device)).to(dtype)
    target = torch.randint(0, c, (n,), device=device)
    head = (-1 * c) % vec  # row 1 starts at element 131: its head is columns [0, head)
    assert 0 < head < c
    target[1] = head - 1
    shift2 = (-2 * c) % vec
    tail = (c - shift2) % vec  # row 2's tail: its last `tail` columns
    assert tail > 0
    target[2] = c - 1
    target[3] = -100
    logits[3, 7] = float("nan")
    target[4] = c + 3
    results = {}
    for path in ("cooperative", "rows"):
        loss, lse = torch.empty(n, device=device), torch.empty(n, device=device)
        grad = poisoned((n, c), dtype, device)
        reduced = counter = total = None
        if reduction != "none":
            reduced, counter = torch.empty((), device=device), torch.empty((), dtype=torch.int32, device=device)
            total = torch.empty((), device=device)
            launch_cross_entropy_prepare(target, None, total, counter, c, -100)
        context = config.force_cooperative(48, 6) if path == "cooperative" else contextlib.nullcontext()
        with context:
            used = launch_cross_entropy(logits, target, None, loss, lse, grad, total, LossOptions(-100, 0.0, 0.0, None),
                                        reduced=reduced, counter=counter, reduction=reduction)  # fmt: skip
        assert isinstance(used, config.CooperativeConfig) == (path == "cooperative") and (path == "rows" or used.edge)
        results[path] = (loss, lse, grad, reduced)
    loss, lse, grad, reduced = results["cooperative"]
    assert torch.equal(grad.isnan(), results["rows"][2].isnan()) and torch.equal(loss.isnan(), results["rows"][0].isnan())
    assert loss[3] == 0 and grad[3].isnan().all() and loss[4].isnan() and grad[4].isnan().all()
    assert not loss[[0, 1, 2, 5]].isnan().any() and not grad[[0, 1, 2, 5]].isnan().any()
    if reduced is not None:
        assert reduced.isnan()
    ok = torch.tensor([0, 1, 2, 5], device=device)
    x = logits[ok].double().cpu().requires_grad_()
    expected = F.cross_entropy(x, target[ok].cpu(), reduction="none")
    expected.backward(torch.ones_like(expected) / (n - 1 if reduction == "mean" else 1))  # (the mean: 5 valid rows)
    tol = (RTOL, 1e-6) if dtype == torch.float32 else (1e-2, 1e-2)
    assert_matches(loss[ok], expected.detach().numpy(), *tol, what="cooperative loss")
    assert_matches(grad[ok], x.grad.numpy(), tol[0], ATOL if dtype == torch.float32 else 1e-2, what="cooperative grad")


@pytest.mark.skipif(torch.cuda.is_available(), reason="traffic is counted in Triton's interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_traffic_cooperative_rows(dtype):
    """Cooperative rows, forward + backward (mean), in the interpreter's two halves: the
    logits read twice (once on a GPU) and the gradient written once, and beside them, exactly:
    each program's class index a row in each half (8 B), the 3 partials a chunk written once
    and read by each of the row's chunks, the loss and lse of each row, the mean's prepare
    kernel (the targets once) and last program (the n losses, the divisor), each program's
    divisor a row (4 B) and the rescale's read of the upstream factor of 1 (4 B a program)."""
    n, c = 3, 200
    logits = torch.randn(n, c).to(dtype).requires_grad_()
    target = torch.randint(0, c, (n,))
    with TrafficCounter() as t, config.force_cooperative(48, 10):
        softmax_gpu.cross_entropy(logits, target).backward()
    chunks, programs = 5, 10
    logits_bytes = n * c * logits.element_size()
    partials = n * chunks * 3 * 4
    scale_rows = config.short_rows(cross_entropy_config(c), n, logits.element_size(),
                                   config.ELEMENTS_PER_THREAD_CROSS_ENTROPY).rows  # (the rescale's row blocks)
    rescale = config.scale_grad_programs(-(-n // scale_rows), "cpu") * 4
    loads = 2 * logits_bytes + 2 * n * chunks * 8 + partials * chunks + n * 8 + (n * 4 + 4) + n * chunks * 4 + rescale
    assert t.bytes_loaded == loads
    assert t.bytes_stored == logits_bytes + partials + 2 * n * 4 + 4 + 4 + 4  # + the total, the counter, the mean
    assert programs == 2 * chunks


@pytest.mark.parametrize(
    "rows, cols, itemsize, softcap, chunks, groups",
    [(4096, 128256, 2, False, 32, 12), (4096, 128256, 4, False, 32, 12), (4096, 50257, 2, False, 13, 30),
     (4096, 32000, 4, False, 8, 49), (4096, 16384, 4, True, 4, 99),
     (4096, 32000, 2, False, None, None), (4096, 16384, 4, False, None, None), (32, 128256, 2, False, None, None)],
)
def test_config_cooperative_rows(monkeypatch, rows, cols, itemsize, softcap, chunks, groups):
    """With SOFTMAX_GPU_COOPERATIVE=1 the plain loss's rows past its single block (32768 16-bit,
    16384 float32; 8192 with a soft cap) take cooperative rows of at most 4096 classes on 4
    warps, 3 programs an SM; fewer rows than half the SMs split instead. Off by default."""
    dtype = torch.bfloat16 if itemsize == 2 else torch.float32
    logits = torch.empty(rows, cols, dtype=dtype, device="meta")
    target = torch.empty(rows, dtype=torch.int64, device="meta")
    options = LossOptions(-100, 0.0, 0.0, 30.0 if softcap else None)
    plan = softmax_gpu.ops.cross_entropy._cooperative_plan
    assert plan(logits, target, None, logits, None, options, "mean") is None  # the default
    monkeypatch.setattr(config, "COOPERATIVE", True)
    if rows <= config.DEFAULT_SM_COUNT // 2:
        assert softmax_gpu.ops.cross_entropy.cross_entropy_split(rows, cols, itemsize, plain=True) is not None
    coop = plan(logits, target, None, logits, None, options, "mean")
    if chunks is None:
        assert coop is None
        return
    coop = coop[0]
    assert (coop.chunks, coop.groups, coop.block_n, coop.num_warps, coop.maxnreg) == (chunks, groups, 4096, 4, 168)
    assert coop.programs <= 3 * config.DEFAULT_SM_COUNT


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the cooperative launch and its waits run on a GPU only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cooperative_rows_at_the_grid_limit_on_gpu(monkeypatch, dtype):
    """The shipped configuration on the card, the grid at its limit (many rounds a group), the
    partials poisoned with NaN before each launch: forward + backward (mean) against float64
    torch, the same bits twice and through a CUDA graph."""
    from softmax_gpu import runtime
    from softmax_gpu.ops import cross_entropy as ce

    monkeypatch.setattr(config, "COOPERATIVE", True)
    monkeypatch.setattr(runtime, "cooperative_partials", lambda shape, device: torch.full(shape, float("nan"),
                                                                                           device=device))  # fmt: skip
    launched = []
    cooperative = ce.launch_cross_entropy_cooperative
    monkeypatch.setattr(ce, "launch_cross_entropy_cooperative", lambda *a: launched.append(1) or cooperative(*a))
    n, c = 1000, 128256
    logits = (2 * torch.randn(n, c, device="cuda")).to(dtype)
    target = torch.randint(0, c, (n,), device="cuda")
    target[7] = -100
    plan = softmax_gpu.ops.cross_entropy._cooperative_plan(logits, target, None, logits, torch.empty((), device="cuda"),
                                                           LossOptions(-100, 0.0, 0.0, None), "mean")  # fmt: skip
    assert plan is not None and plan[0].programs > 2 * config.sm_count("cuda")
    runs = []
    for _ in range(2):
        x = logits.clone().requires_grad_()
        loss = softmax_gpu.cross_entropy(x, target)
        loss.backward()
        runs.append((loss.detach(), x.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1]) and len(launched) == 2
    # the loss kernel alone (reduction "none": no prepare launch) captured and replayed
    loss, lse, grad = torch.empty(n, device="cuda"), torch.empty(n, device="cuda"), torch.empty_like(logits)
    options = LossOptions(-100, 0.0, 0.0, None)
    ce.launch_cross_entropy(logits, target, None, loss, lse, grad, None, options)  # (plan and compile first)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ce.launch_cross_entropy(logits, target, None, loss, lse, grad, None, options)
    replayed = grad.clone()
    grad.fill_(float("nan"))
    graph.replay()
    assert torch.equal(grad, replayed) and not grad.isnan().any()
    ref = logits.double().requires_grad_()
    expected = F.cross_entropy(ref, target)
    expected.backward()
    assert abs(runs[0][0].item() - expected.item()) < 1e-5 * abs(expected.item()) + 1e-6
    assert_matches(runs[0][1], ref.grad.cpu().numpy(), 1e-2 if dtype == torch.bfloat16 else RTOL, 1e-8,
                   what="cooperative gradient on the GPU")  # fmt: skip
