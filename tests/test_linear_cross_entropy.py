"""Linear cross-entropy against float64 F.linear + F.cross_entropy (+ our z-loss and soft cap).

Shapes are irregular on purpose: N = 33 rows, H = 40 features, V = 300 classes are multiples
of no chunk or slab. Each parity case runs in both modes, and twice in each: with the shipped
budgets (one chunk, one slab at these sizes) and under config.linear_limit(16, 64), which cuts
the batch into three chunks of 16, 16 and 1 rows (speed: dW accumulated over them) and the
vocabulary into five slabs of 64 ... 44 classes (low_memory: the slab merge and dX's
accumulation), so every loop and every edge runs.
"""
import contextlib
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import ATOL_16BIT, assert_matches, max_abs_err, poisoned

import softmax_gpu
from softmax_gpu import config, reference
from softmax_gpu.loss_options import LossOptions
from softmax_gpu.ops import linear_cross_entropy as lce

N, H, V = 33, 40, 300
LIMITS = [None, (16, 64)]  # the shipped budgets, and small chunks and slabs that force every loop
MODES = ("speed", "low_memory")
RTOL = 1e-5  # float32 against float64: relative to the largest element of each result


def tiles(limit):
    return config.linear_limit(*limit) if limit else contextlib.nullcontext()


def reference_loss(x, w, b, target, weight=None, reduction="mean", ignore_index=-100, label_smoothing=0.0,
                   z_loss=0.0, softcap=None):  # fmt: skip
    """The unfused definition, in whatever dtype its inputs have: F.linear, the soft cap, then
    F.cross_entropy plus z_loss * w_t * lse^2 per counted row (the repo's z-loss)."""
    z = F.linear(x, w, b)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    flat, tgt = z.reshape(-1, z.shape[-1]), target.reshape(-1, z.shape[-1]) if target.is_floating_point() else target
    tgt = tgt if tgt.is_floating_point() else tgt.reshape(-1).long()
    w_ce = weight.to(z.dtype) if weight is not None else None
    rows = F.cross_entropy(flat, tgt.to(z.dtype) if tgt.is_floating_point() else tgt, w_ce, ignore_index=ignore_index,
                           reduction="none", label_smoothing=label_smoothing)  # fmt: skip
    if tgt.is_floating_point():
        w_t = torch.ones(len(flat), dtype=z.dtype)
    else:
        valid = tgt != ignore_index
        w_t = (w_ce[tgt.clamp(0)] if w_ce is not None else torch.ones_like(flat[:, 0])) * valid
    if z_loss:
        rows = rows + z_loss * w_t * torch.logsumexp(flat, -1) ** 2
    if reduction == "none":
        return rows.reshape(target.shape[:-1] if target.is_floating_point() else target.shape)
    return rows.sum() / w_t.sum() if reduction == "mean" else rows.sum()


def make_inputs(device, dtype=torch.float32, n=N, h=H, v=V, bias=False, shape=None):
    x = torch.randn(*(shape or (n,)), h, device=device).to(dtype)
    w = (torch.randn(v, h, device=device) / h**0.5 * 3).to(dtype)  # logits of spread ~3
    b = torch.randn(v, device=device).to(dtype) if bias else None
    return x, w, b


def run(x, w, b, target, limit=None, upstream=None, **kw):
    """(loss, grads of x, w, b) from softmax_gpu; upstream: the loss's upstream gradient."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    with tiles(limit):
        loss = softmax_gpu.linear_cross_entropy(leaves[0], leaves[1], target, linear_bias=leaves[2], **kw)
        loss.backward(torch.ones_like(loss) if upstream is None else upstream)
    return loss.detach(), [t.grad if t is not None else None for t in leaves]


def run_reference(x, w, b, target, upstream=None, dtype=torch.float64, **kw):
    """The same from reference_loss on CPU in `dtype` (float64: the truth)."""
    leaves = [t.detach().cpu().to(dtype).requires_grad_() if t is not None else None for t in (x, w, b)]
    kw = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    loss = reference_loss(*leaves, target.cpu(), **kw)
    loss.backward(torch.ones_like(loss) if upstream is None else upstream.cpu().to(dtype))
    return loss.detach(), [t.grad if t is not None else None for t in leaves]


def assert_close_fp32(got, want, what):
    """float32 against float64, relative to the result's scale (sums over H or V rows)."""
    scale = float(want.abs().max()) if want.numel() else 1.0
    assert_matches(got, want.detach().cpu().numpy(), rtol=RTOL, atol=RTOL * scale, what=what)


# Option sets: each combines several options; together they cover every option, every
# reduction, both ignore_index kinds (a negative one, and a valid class that is ignored) and
# both class-index dtypes.
CASES = {
    "plain-mean": dict(reduction="mean"),
    "weight-smooth-bias-sum": dict(reduction="sum", weight=True, label_smoothing=0.2, ignore_index=2, bias=True,
                                   int32=True),  # fmt: skip
    "zloss-softcap-none": dict(reduction="none", z_loss=1e-2, softcap=4.0, ignore_index=-1, weight=True),
    "everything-mean": dict(reduction="mean", weight=True, label_smoothing=0.1, z_loss=1e-3, softcap=5.0, bias=True),
}


def case_inputs(name, device):
    opts = dict(CASES[name])
    bias, use_weight, int32 = opts.pop("bias", False), opts.pop("weight", False), opts.pop("int32", False)
    x, w, b = make_inputs(device, bias=bias)
    target = torch.randint(0, V, (N,), device=device)
    ignore = opts.get("ignore_index", -100)
    target[[1, 7, 20]] = ignore
    target[4] = 2  # class 2: ignored where ignore_index == 2
    if int32:
        target = target.int()
    if use_weight:
        opts["weight"] = torch.rand(V, device=device) + 0.1
    upstream = torch.randn(N, device=device) if opts["reduction"] == "none" else None
    return x, w, b, target, upstream, opts


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("limit", LIMITS)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_unfused(name, limit, mode, device):
    x, w, b, target, upstream, opts = case_inputs(name, device)
    loss, grads = run(x, w, b, target, limit, upstream, mode=mode, **opts)
    ref_loss, ref_grads = run_reference(x, w, b, target, upstream, **opts)
    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape
    assert_close_fp32(loss.cpu(), ref_loss, f"{name} loss")
    for what, got, want in zip(("dx", "dw", "db"), grads, ref_grads):
        assert (got is None) == (want is None), what
        if got is not None:
            assert got.dtype == torch.float32 and got.shape == want.shape
            assert_close_fp32(got.cpu(), want, f"{name} {what}")


def test_same_as_cross_entropy_of_the_linear(device):
    """The definition in the docstring: softmax_gpu.cross_entropy of the materialised logits."""
    x, w, b = make_inputs(device, bias=True)
    target = torch.randint(0, V, (N,), device=device)
    kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
    ours = softmax_gpu.linear_cross_entropy(x, w, target, linear_bias=b, **kw)
    theirs = softmax_gpu.cross_entropy(F.linear(x, w, b), target, **kw)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("limit", LIMITS)
def test_probability_targets(limit, mode, device):
    x, w, b = make_inputs(device, bias=True)
    probs = torch.softmax(2 * torch.randn(N, V, device=device), -1)
    for kw in (dict(reduction="mean"), dict(reduction="sum", weight=torch.rand(V, device=device), label_smoothing=0.3,
                                            z_loss=1e-2, softcap=3.0)):  # fmt: skip
        loss, grads = run(x, w, b, probs, limit, mode=mode, **kw)
        ref_loss, ref_grads = run_reference(x, w, b, probs, **kw)
        assert_close_fp32(loss.cpu(), ref_loss, "soft loss")
        for what, got, want in zip(("dx", "dw", "db"), grads, ref_grads):
            assert_close_fp32(got.cpu(), want, f"soft {what}")


@pytest.mark.parametrize("shape", [(), (3, 11)])
def test_1d_and_3d_inputs(shape, device):
    """(H,) with a 0-d target and (..., H) with target (...): the batch dims are flattened."""
    x = torch.randn(*shape, H, device=device)
    _, w, b = make_inputs(device, bias=True)
    target = torch.randint(0, V, shape, device=device)
    for reduction in ("none", "mean"):
        upstream = torch.randn(shape, device=device) if reduction == "none" else None
        loss, grads = run(x, w, b, target, (16, 64), upstream, reduction=reduction, label_smoothing=0.1)
        ref_loss, ref_grads = run_reference(x, w, b, target, upstream, reduction=reduction, label_smoothing=0.1)
        assert loss.shape == ref_loss.shape == (shape if reduction == "none" else ())
        assert_close_fp32(loss.cpu(), ref_loss, f"{shape} {reduction} loss")
        for what, got, want in zip(("dx", "dw", "db"), grads, ref_grads):
            assert got.shape == want.shape
            assert_close_fp32(got.cpu(), want, f"{shape} {reduction} {what}")


def test_non_contiguous_operands(device):
    """Any strides for the input and the weight (a transposed view, a sliced batch)."""
    x = torch.randn(2 * N, H, device=device)[::2]
    w = torch.randn(H, V, device=device).t() / 4  # (V, H) with column stride V
    target = torch.randint(0, V, (N,), device=device)
    loss, grads = run(x, w, None, target, (16, 64))
    ref_loss, ref_grads = run_reference(x, w, None, target)
    assert_close_fp32(loss.cpu(), ref_loss, "loss")
    for what, got, want in zip(("dx", "dw"), grads, ref_grads):
        assert_close_fp32(got.cpu(), want, what)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_batch(reduction, device):
    """No row counts: torch gives a NaN mean (0 / 0), a zero sum, and zero gradients."""
    x, w, b = make_inputs(device, bias=True)
    target = torch.full((N,), -100, device=device)
    loss, grads = run(x, w, b, target, (16, 64), reduction=reduction)
    ref_loss, ref_grads = run_reference(x, w, b, target, reduction=reduction)
    assert_matches(loss, ref_loss.numpy(), 0, 0, "loss")
    for got, want in zip(grads, ref_grads):
        assert_matches(got, want.numpy(), 0, 0, "grad")


def test_only_the_gradients_asked_for(device):
    """Each of input / linear_weight / linear_bias alone, and none (no statistics saved)."""
    x, w, b = make_inputs(device, bias=True)
    target = torch.randint(0, V, (N,), device=device)
    _, ref_grads = run_reference(x, w, b, target, label_smoothing=0.1)
    for i in range(3):
        leaves = [t.clone().requires_grad_(j == i) for j, t in enumerate((x, w, b))]
        with tiles((16, 64)):
            softmax_gpu.linear_cross_entropy(leaves[0], leaves[1], target, linear_bias=leaves[2],
                                             label_smoothing=0.1).backward()  # fmt: skip
        assert all((t.grad is None) == (j != i) for j, t in enumerate(leaves))
        assert_close_fp32(leaves[i].grad.cpu(), ref_grads[i], f"grad {i} alone")
    loss = softmax_gpu.linear_cross_entropy(x, w, target, linear_bias=b)
    assert not loss.requires_grad


def sixteen_bit_case(device, dtype):
    """Inputs of `dtype` with a bias and an ignored row, and every option at once."""
    x, w, b = make_inputs(device, dtype, bias=True)
    target = torch.randint(0, V, (N,), device=device)
    target[3] = -100
    kw = dict(reduction="mean", weight=torch.rand(V, device=device) + 0.5, label_smoothing=0.1, z_loss=1e-3,
              softcap=8.0)  # fmt: skip
    return x, w, b, target, kw


def assert_within_twice_torch_16bit(loss, grads, x, w, b, target, **kw):
    """Our loss and gradients (from run()) against float64: each error at most twice torch's
    own unfused error in the inputs' dtype (F.linear and F.cross_entropy on 16-bit logits)
    plus a small atol; the loss in float32, the gradients in the input's dtype."""
    dtype = x.dtype
    ref_loss, ref_grads = run_reference(x, w, b, target, **kw)
    torch_loss, torch_grads = run_reference(x, w, b, target, dtype=dtype, **kw)
    for what, got, theirs, want in zip(("loss", "dx", "dw", "db"), [loss, *grads], [torch_loss, *torch_grads],
                                       [ref_loss, *ref_grads]):  # fmt: skip
        assert got.dtype == (torch.float32 if what == "loss" else dtype), what
        budget = 2 * max_abs_err(theirs, want.numpy()) + ATOL_16BIT[dtype]
        assert_matches(got.cpu(), want.numpy(), rtol=0.0, atol=budget, what=f"{dtype} {what}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("limit", LIMITS)
def test_16bit_within_twice_torch_error(dtype, limit, mode, device):
    """Our error against float64 is at most twice torch's own unfused error in that dtype
    (F.linear and F.cross_entropy on 16-bit logits) plus a small atol, for the loss and each
    gradient; the gradients come back in the input's dtype."""
    x, w, b, target, kw = sixteen_bit_case(device, dtype)
    loss, grads = run(x, w, b, target, limit, mode=mode, **kw)
    assert_within_twice_torch_16bit(loss, grads, x, w, b, target, **kw)


def test_nan_input_gives_nan_like_torch(device):
    """A NaN feature makes its row's loss NaN and, through the shared weight gradient, every
    dW and db element NaN; torch in float64 agrees element by element."""
    x, w, b = make_inputs(device, bias=True)
    x[5, 7] = float("nan")
    target = torch.randint(0, V, (N,), device=device)
    loss, grads = run(x, w, b, target, (16, 64), torch.ones(N, device=device), reduction="none")
    ref_loss, ref_grads = run_reference(x, w, b, target, torch.ones(N), reduction="none")
    assert_matches(loss.cpu(), ref_loss.numpy(), 1e-4, 1e-5, "loss")
    for what, got, want in zip(("dx", "dw", "db"), grads, ref_grads):
        assert torch.equal(got.isnan().cpu(), want.isnan()), what


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_confident_rows_keep_the_true_class_gradient(smoothing, device):
    """Row i's true class 30 above the rest: q_t - 1 rounds to 0 in float32, yet the exact
    gradient, -(sum of the other classes' probabilities) = about -V e^-30 here, must come out
    to 1% relative, like softmax_gpu.cross_entropy's. Feature i of row i is 1 and only the
    target's weight row is non-zero there (30), so dX[i, i] = 30 (q_t - 1) alone."""
    target = torch.tensor([3, 299, 16, 150])
    x = torch.randn(4, H) / 10
    x[:, :4] = torch.eye(4)
    w = torch.randn(V, H) / 10
    w[:, :4] = 0
    w[target, torch.arange(4)] = 30.0
    x, w, target = x.to(device), w.to(device), target.to(device)
    _, (dx, _, _) = run(x, w, None, target, (16, 64), reduction="sum", label_smoothing=smoothing)
    _, (ref_dx, _, _) = run_reference(x, w, None, target, reduction="sum", label_smoothing=smoothing)
    got, want = dx.cpu().diagonal().double(), ref_dx.diagonal()
    if smoothing == 0:
        assert (want < 0).all() and (want > -1e-8).all()
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-2)


# ---------------------------------------------------------------------------------------
# Buffers: every element written before it is read; bad targets; the routes
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_poisoned_logits_buffer_is_overwritten(mode, monkeypatch, device):
    """The logits buffer (chunk or slab) comes NaN-filled, and larger than needed: the
    products write every element that the row kernels read, so the results are still exact,
    through every chunk and slab, with every gradient and a bias."""
    made = []

    def nan_buffer(x, rows, cols):
        made.append(poisoned((rows * cols + 7,), x.dtype, x.device))
        return made[-1]

    monkeypatch.setattr(lce, "_buffer", nan_buffer)
    x, w, b, target, upstream, opts = case_inputs("everything-mean", device)
    loss, grads = run(x, w, b, target, (16, 64), upstream, mode=mode, **opts)
    ref_loss, ref_grads = run_reference(x, w, b, target, upstream, **opts)
    assert made, "the buffer was not taken from lce._buffer"
    assert_close_fp32(loss.cpu(), ref_loss, "loss")
    for what, got, want in zip(("dx", "dw", "db"), grads, ref_grads):
        assert_close_fp32(got.cpu(), want, what)


interpreter_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's bounds check")


@interpreter_only
@pytest.mark.parametrize("fused_logits", [False, True])
def test_bad_class_index_rows_are_nan(fused_logits):
    """Past the eager check (which the CPU path does), a class index out of range gives its
    row a NaN loss in both modes, as softmax_gpu.cross_entropy on CUDA, and a NaN gradient
    row; the kernels' bounds are checked by the interpreter (the row kernels' own tests,
    test_cross_entropy and test_distributed, prove such an index is never an address)."""
    x, w, _ = make_inputs("cpu", n=4)
    target = torch.tensor([5, V, -100, -7])
    weight = torch.rand(V)
    opts = LossOptions()
    loss_speed, _, dx_speed, _, _ = lce._speed(x, w, None, target, weight, None, opts, None, (True, True, False), None,
                                               fused_logits)  # fmt: skip
    with config.linear_limit(16, 64):
        row_max, stats = lce._slab_stats(x, w, None, target, weight, V, 0, opts, None, fused_logits=fused_logits)
        loss_slabs, lse = lce._loss_from_stats(x, target, weight, row_max, stats, V, opts)
        dx_slabs = lce._slab_backward(x, w, None, target, weight, row_max, stats, lse, torch.ones(()), None, V, 0, opts,
                                      None, (True, False, False, False), None, fused_logits=fused_logits)[0]  # fmt: skip
    for loss in (loss_speed, loss_slabs):
        assert torch.isfinite(loss[0]) and torch.isnan(loss[[1, 3]]).all() and loss[2] == 0, loss
    for dx in (dx_speed, dx_slabs):
        assert dx[[1, 3]].isnan().all() and not dx[[0, 2]].isnan().any() and (dx[2] == 0).all()
    with pytest.raises(IndexError, match=f"Target {V} is out of bounds"):
        softmax_gpu.linear_cross_entropy(x, w, target)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (cuBLAS's 16-bit -> float32 product)")
def test_mm_accumulate_on_cuda():
    """acc += a @ b for bfloat16 a, b into a float32 acc, in place, as float64 would give it
    to float32 rounding of a float32-accumulated product; and whether this torch ran it as
    one cuBLAS product (addmm with out_dtype) rather than the bf16-partial fallback."""
    a = torch.randn(300, 70, device="cuda").bfloat16()
    b = torch.randn(70, 130, device="cuda").bfloat16()
    acc = torch.randn(300, 130, device="cuda")
    want = acc.double() + a.double() @ b.double()
    lce.mm_accumulate(acc, a, b)
    torch.testing.assert_close(acc.double(), want, rtol=1e-5, atol=1e-4)
    print("mm_accumulate one product:", lce._DTYPE_ADDMM["ok"])
    assert lce._DTYPE_ADDMM["ok"] is True


def test_routes():
    """The speed route only where a scalar upstream factor can be applied after the products:
    bf16/fp32, reduction mean or sum, no target gradient; float64 composes."""
    assert lce.route("speed", torch.bfloat16, "mean", False, True) == "speed"
    assert lce.route("speed", torch.float32, "sum", False, True) == "speed"
    assert lce.route("speed", torch.float16, "mean", False, True) == "low_memory"
    assert lce.route("speed", torch.bfloat16, "none", False, True) == "low_memory"
    assert lce.route("speed", torch.bfloat16, "mean", True, True) == "low_memory"
    assert lce.route("speed", torch.bfloat16, "mean", False, False) == "low_memory"
    assert lce.route("low_memory", torch.bfloat16, "mean", False, True) == "low_memory"
    assert lce.route("speed", torch.float64, "mean", False, True) == "float64"


def test_speed_backward_twice_raises_low_memory_does_not(device):
    x, w, _ = make_inputs(device)
    target = torch.randint(0, V, (N,), device=device)
    grads = []
    for mode in MODES:
        xs = x.clone().requires_grad_()
        loss = softmax_gpu.linear_cross_entropy(xs, w, target, mode=mode)
        loss.backward(retain_graph=True)
        if mode == "speed":
            with pytest.raises(RuntimeError, match="backward ran twice"):
                loss.backward()
        else:
            first = xs.grad.clone()
            loss.backward()
            torch.testing.assert_close(xs.grad, 2 * first)
        grads.append(xs.grad)


def test_float64_matches_torch(device):
    """float64 (the checking dtype) against torch's own F.linear + F.cross_entropy in float64,
    with probability targets' gradient as well."""
    x, w, b = (t.double() if t is not None else None for t in make_inputs(device, bias=True))
    for target in (torch.randint(0, V, (N,), device=device),
                   torch.softmax(torch.randn(N, V, device=device, dtype=torch.float64), -1)):  # fmt: skip
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        tgt = target.clone().requires_grad_(target.is_floating_point())
        loss = softmax_gpu.linear_cross_entropy(leaves[0], leaves[1], tgt, linear_bias=leaves[2], label_smoothing=0.1)
        assert loss.dtype == torch.float64
        loss.backward()
        ref = [t.clone().requires_grad_() for t in (x, w, b)]
        rtgt = target.clone().requires_grad_(target.is_floating_point())
        ref_loss = F.cross_entropy(F.linear(*ref), rtgt, label_smoothing=0.1)
        ref_loss.backward()
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
        for got, want in zip(leaves + [tgt], ref + [rtgt]):
            if want.grad is not None:
                torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_probability_target_gradient(dtype, device):
    """d loss / d p = (1 - eps) w_j (lse - softcap(z_j)) times the row's factor, in the
    target's dtype, slab by slab (the speed mode hands such calls to low_memory)."""
    x, w, b = make_inputs(device, dtype, bias=True)
    probs = torch.softmax(2 * torch.randn(N, V, device=device), -1).to(dtype)
    kw = dict(reduction="mean", weight=torch.rand(V, device=device) + 0.5, label_smoothing=0.2, softcap=4.0)
    for limit in LIMITS:
        p = probs.clone().requires_grad_()
        with tiles(limit):
            softmax_gpu.linear_cross_entropy(x, w, p, linear_bias=b, **kw).backward()
        ref_p = probs.double().cpu().requires_grad_()
        ref = reference_loss(x.double().cpu(), w.double().cpu(), b.double().cpu(), ref_p,
                             **{k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
        ref.backward()
        assert p.grad.dtype == dtype
        if dtype == torch.float32:
            assert_close_fp32(p.grad.cpu(), ref_p.grad, f"d/dp {limit}")
        else:
            scale = float(ref_p.grad.abs().max())
            assert_matches(p.grad.cpu(), ref_p.grad.numpy(), rtol=0.0, atol=2e-2 * scale, what=f"bf16 d/dp {limit}")


def test_bad_input_raises_before_launch(device):
    x, w, b = make_inputs(device, n=4, bias=True)
    t = torch.tensor([0, 1, 2, 3], device=device)
    fn = "softmax_gpu.linear_cross_entropy"
    cases = [
        (dict(input=x.long(), linear_weight=w, target=t), TypeError, "floating-point tensor for 'input'"),
        (dict(input=x.to(torch.complex64), linear_weight=w, target=t), TypeError, "floating-point"),
        (dict(input=x, linear_weight=w[None], target=t), ValueError, "K-dimensional"),
        (dict(input=x, linear_weight=w, target=t, mode="fast"), ValueError, "mode must be one of"),
        (dict(input=x, linear_weight=w, target=t, buffer_bytes=0), ValueError, "buffer_bytes must be"),
        (dict(input=x, linear_weight=w.half(), target=t), TypeError, "same dtype"),
        (dict(input=x, linear_weight=w[:, :5], target=t), ValueError, "linear_weight must have shape"),
        (dict(input=x, linear_weight=w, target=t, linear_bias=b[:5]), ValueError, "linear_bias must have shape"),
        (dict(input=x, linear_weight=w, target=t, linear_bias=b.half()), TypeError, "linear_bias must have"),
        (dict(input=x, linear_weight=w, target=t[:3]), ValueError, "class-index target"),
        (dict(input=x, linear_weight=w, target=torch.rand(4, 7, device=device)), ValueError, "probability targets"),
        (dict(input=x, linear_weight=w, target=t.to(torch.int16)), TypeError, "int64 or int32"),
        (dict(input=x, linear_weight=w, target=t, weight=torch.ones(4, device=device)), ValueError, "weight must"),
        (dict(input=x, linear_weight=w, target=t, reduction="avg"), ValueError, "reduction"),
        (dict(input=x, linear_weight=w, target=t, label_smoothing=1.5), ValueError, "label_smoothing"),
        (dict(input=x, linear_weight=w, target=t, z_loss=-1.0), ValueError, "z_loss"),
        (dict(input=x, linear_weight=w, target=t, softcap=0.0), ValueError, "softcap"),
        (dict(input=x, linear_weight=w, target=t.to("meta")), RuntimeError, "same device"),
        (dict(input=x, linear_weight=w, target=torch.rand(4, V, device=device), ignore_index=0), RuntimeError,
         "ignore_index is not supported"),  # as torch, for probability targets
        (dict(input=torch.tensor(1.0, device=device), linear_weight=w, target=t), ValueError, "at least one dim"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match) as info:
            softmax_gpu.linear_cross_entropy(**kwargs)
        assert fn in str(info.value), kwargs


def test_zero_classes_as_torch(monkeypatch):
    """A (0, H) linear_weight: torch's cross_entropy of the (N, 0) logits (see
    test_cross_entropy.test_zero_classes_as_torch): 0 / NaN / -0.0 losses or its IndexError,
    a zero input gradient and empty weight and bias gradients. Nothing launches (a launch
    would raise: the interpreter is 'off' here)."""
    monkeypatch.setattr("softmax_gpu.runtime.interpreted", lambda kernel: False)
    x, w, b = torch.randn(4, 3), torch.empty(0, 3), torch.empty(0)
    targets = [torch.full((4,), -100), torch.tensor([-100, 0, -100, -100]), torch.empty(4, 0)]
    for target, kw, reduction in itertools.product(targets, [{}, dict(label_smoothing=0.1)], ("none", "sum", "mean")):
        outcomes = []
        for fn in (softmax_gpu.linear_cross_entropy,
                   lambda x, w, t, linear_bias, **kw: F.cross_entropy(F.linear(x, w, linear_bias), t, **kw)):
            leaves = [t.clone().requires_grad_() for t in (x, w, b)]
            try:
                loss = fn(leaves[0], leaves[1], target, linear_bias=leaves[2], reduction=reduction, **kw)
            except IndexError as e:
                outcomes.append(str(e))
                continue
            loss.sum().backward()
            outcomes.append([loss.detach()] + [t.grad for t in leaves])
        case = (target.tolist(), kw, reduction)
        if isinstance(outcomes[1], str):
            assert outcomes[0] == outcomes[1] == "Target 0 is out of bounds.", case
            continue
        for ours, torchs in zip(*outcomes):
            assert ours.shape == torchs.shape, case
            torch.testing.assert_close(ours, torchs, equal_nan=True, msg=lambda m: f"{case}: {m}")


def test_empty_batch(device):
    x, w, b = make_inputs(device, n=0, bias=True)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    loss = softmax_gpu.linear_cross_entropy(leaves[0], leaves[1], torch.zeros(0, dtype=torch.long, device=device),
                                            linear_bias=leaves[2], reduction="sum")  # fmt: skip
    loss.backward()
    assert loss == 0 and leaves[0].grad.shape == (0, H)
    assert (leaves[1].grad == 0).all() and (leaves[2].grad == 0).all()


# ---------------------------------------------------------------------------------------
# Memory, determinism, registration
# ---------------------------------------------------------------------------------------


def largest_allocation(fn) -> int:
    """Bytes of the largest single tensor allocation (torch's CPU allocator, through the
    profiler) made while fn() runs, its nested calls included."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    leaves = [e for e in prof.events() if not e.cpu_children and e.cpu_memory_usage > 0]
    return max(e.cpu_memory_usage for e in leaves)


@interpreter_only
@pytest.mark.parametrize("fused_logits", [False, True])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n, v, budget", [(128, 2048, 256 << 10), (256, 4096, 1 << 20)])
def test_allocations_within_the_mode_budget(mode, n, v, budget, fused_logits):
    """Forward + backward allocate nothing of N x V: with a buffer budget of a quarter of the
    logits (4 chunks or slabs), the largest tensor is the budget's buffer or a gradient-sized
    one (speed: dW's float32 accumulator, V x H; low_memory: dX's, N x H, or dW itself),
    under the N x V float32 logits that the unfused pair, measured the same way, allocates.
    With the Triton logits too (their tile statistics share the budget)."""
    h = 16
    x, w, b = make_inputs("cpu", n=n, h=h, v=v, bias=True)
    target = torch.randint(0, v, (n,))
    logits_bytes = n * v * 4
    cut = lce.plan(mode, x, w, budget)
    assert (cut.rows < n) if mode == "speed" else (cut.cols < v)  # several chunks / slabs

    def fused():
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        loss = softmax_gpu.linear_cross_entropy(leaves[0], leaves[1], target, linear_bias=leaves[2],
                                                label_smoothing=0.1, z_loss=1e-3, mode=mode, buffer_bytes=budget)
        loss.backward()

    def unfused():
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        F.cross_entropy(F.linear(leaves[0], leaves[1], leaves[2]), target, label_smoothing=0.1).backward()

    with config.fused_logits(fused_logits):
        ours = largest_allocation(fused)
    gradient_sized = v * h * 4 if mode == "speed" else max(n * h * 4, v * h * 4)
    assert ours <= max(budget, gradient_sized), (ours, budget, gradient_sized)
    assert ours <= logits_bytes / 4, (ours, logits_bytes)
    assert largest_allocation(unfused) >= logits_bytes  # the tracker does see logits when they exist


def test_plans_follow_the_budget():
    """config.linear_cross_entropy_plan at the headline shape: speed holds all 8192 rows in one
    chunk (N V 2 bytes <= V H 4 + 512 MiB), 16384 rows in chunks of 2048 (a multiple of 256
    within 512 MiB); low_memory slabs of 16384 classes (256 MiB at N = 8192); a budget
    overrides both."""
    plan = config.linear_cross_entropy_plan
    assert plan("speed", 8192, 128256, 4096, 2).rows == 8192
    assert plan("speed", 16384, 128256, 4096, 2).rows == 2048
    assert plan("speed", 16384, 128256, 4096, 2).rows * 128256 * 2 <= 512 << 20
    assert plan("low_memory", 8192, 128256, 4096, 2).cols == 16384
    assert plan("low_memory", 8192, 128256, 4096, 2, buffer_bytes=64 << 20).cols == 4096
    assert plan("low_memory", 8, 300, 16, 4).cols == 300  # one slab when it fits
    with config.linear_limit(16, 64):
        cut = plan("speed", 8192, 128256, 4096, 2)
        assert (cut.rows, cut.skip_tile) == (16, (16, 64))
    with pytest.raises(ValueError, match="mode must be one of"):
        plan("fast", 1, 1, 1, 2)


def test_deterministic(device):
    """Bitwise the same twice, with many tiles in every dim (no atomics, fixed order)."""
    x, w, b = make_inputs(device, bias=True)
    target = torch.randint(0, V, (N,), device=device)
    results = [run(x, w, b, target, (16, 64), label_smoothing=0.1, z_loss=1e-4) for _ in range(2)]
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


def test_opcheck(device):
    x, w, b = make_inputs(device, n=5, h=24, v=40, bias=True)
    target = torch.tensor([0, 39, -100, 3, 3], device=device)
    weight = torch.rand(40, device=device)
    total = torch.tensor(4.0, device=device)
    with config.linear_limit(2, 16):
        for skip, needs in ((None, (True, True, True)), (1e-3, (False, True, False))):
            args = (x, w, b, target, weight, total, -100, 0.1, 1e-3, 5.0, skip, *needs)
            torch.library.opcheck(torch.ops.softmax_gpu.linear_cross_entropy_speed.default, args)
        args = (x, w, b, target, weight, -100, 0.1, 1e-3, 5.0)
        torch.library.opcheck(torch.ops.softmax_gpu.linear_cross_entropy_forward.default, args)
        _, lse, row_max, stats = lce.linear_cross_entropy_forward(*args)
        for upstream, divisor, needs, skip in ((torch.tensor(1.0, device=device), total, (True, True, True), None),
                                               (torch.randn(5, device=device), None, (False, True, False), 1e-3)):
            args = (x, w, b, target, weight, row_max, stats, lse, upstream, divisor, -100, 0.1, 1e-3, 5.0, *needs,
                    False, skip)  # fmt: skip
            torch.library.opcheck(torch.ops.softmax_gpu.linear_cross_entropy_backward.default, args)
        probs = torch.softmax(torch.randn(5, 40, device=device), -1)
        args = (x, w, b, probs, None, -100, 0.0, 0.0, None)
        _, lse, row_max, stats = lce.linear_cross_entropy_forward(*args)
        args = (x, w, b, probs, None, row_max, stats, lse, torch.tensor(2.0, device=device), None, -100, 0.0, 0.0,
                None, True, False, False, True)  # fmt: skip
        torch.library.opcheck(torch.ops.softmax_gpu.linear_cross_entropy_backward.default, args)
    grad = torch.randn(5, 24, device=device)
    torch.library.opcheck(torch.ops.softmax_gpu.linear_cross_entropy_scale.default, (grad, torch.tensor(3.0, device=device)))


@pytest.mark.parametrize("mode, ops", [("speed", {"linear_cross_entropy_speed", "linear_cross_entropy_scale"}),
                                       ("low_memory", {"linear_cross_entropy_forward",
                                                       "linear_cross_entropy_backward"})])  # fmt: skip
def test_tracers_see_the_custom_ops(mode, ops, device):
    from torch.fx.experimental.proxy_tensor import make_fx

    x, w, _ = make_inputs(device, n=4, h=16, v=20)
    target = torch.tensor([0, 19, -100, 3], device=device)

    def step(x, w, t):
        w = w.detach().requires_grad_()
        loss = softmax_gpu.linear_cross_entropy(x, w, t, mode=mode)
        return torch.autograd.grad(loss, w)

    graph = make_fx(step, tracing_mode="fake")(x, w, target).graph
    targets = {str(n.target) for n in graph.nodes}
    assert {f"softmax_gpu.{op}.default" for op in ops} <= targets, targets


def test_torch_compile_training_step(device):
    """fullgraph: the custom ops inside the autograd.Function trace with no graph break, and
    the compiled backward runs on .backward()."""
    head = torch.nn.Linear(16, 37, bias=True).to(device)
    body = torch.nn.Linear(8, 16).to(device)
    loss_fn = softmax_gpu.nn.LinearCrossEntropyLoss(label_smoothing=0.1, z_loss=1e-3)

    def forward(x, y):
        return loss_fn(torch.tanh(body(x)), head.weight, y, head.bias)

    compiled = torch.compile(forward, fullgraph=True)
    x, y = torch.randn(6, 8, device=device), torch.randint(0, 37, (6,), device=device)
    loss = compiled(x, y)
    (3 * loss).backward()  # an upstream factor that is not 1: the speed mode's scale runs
    got = [p.grad.clone() for p in (head.weight, head.bias, body.weight)]
    for p in (head.weight, head.bias, body.weight, body.bias):
        p.grad = None
    logits = head(torch.tanh(body(x)))
    expected = softmax_gpu.cross_entropy(logits, y, label_smoothing=0.1, z_loss=1e-3)
    (3 * expected).backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for g, p in zip(got, (head.weight, head.bias, body.weight)):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)


def test_module_and_reference_agree(device):
    """nn.LinearCrossEntropyLoss forwards its options; the float64 NumPy reference of
    cross_entropy on the materialised logits gives the same loss and logit gradient."""
    x, w, b = make_inputs(device, n=6, bias=True)
    target = torch.randint(0, V, (6,), device=device)
    weight = torch.rand(V, device=device)
    module = softmax_gpu.nn.LinearCrossEntropyLoss(weight, reduction="sum", label_smoothing=0.2, z_loss=1e-2,
                                                   softcap=6.0)  # fmt: skip
    assert "z_loss=0.01" in repr(module)
    bb = b.clone().requires_grad_()
    loss = module(x, w, target, bb)
    loss.backward()
    logits = F.linear(x.double(), w.double(), b.double()).cpu().numpy()
    ref_loss, ref_grad = reference.cross_entropy(logits, target.cpu().numpy(), weight.double().cpu().numpy(),
                                                 reduction="sum", label_smoothing=0.2, z_loss=1e-2, softcap=6.0)
    np.testing.assert_allclose(loss.item(), ref_loss, rtol=1e-5)
    np.testing.assert_allclose(bb.grad.cpu().numpy(), ref_grad.sum(0), rtol=1e-4, atol=1e-5)


@interpreter_only
def test_bench_cpu_report(monkeypatch, capsys):
    """`python -m bench --ops linear_ce_fwd_bwd` without a GPU: the allocation table (ours under
    the logits' size, unfused torch at it) and the FLOP counts, at a tiny size."""
    from bench import linear_ce
    from bench.__main__ import main

    monkeypatch.setattr(linear_ce, "CPU_SHAPES", ((32, 16, 128),))
    assert main(["--ops", "linear_ce_fwd_bwd"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[1]: line.split() for line in out.splitlines() if line.startswith("32x16x128")}
    logits = 32 * 128 * 4
    for mode in ("speed", "low_memory"):
        assert int(rows[f"softmax_gpu.{mode}"][2].replace(",", "")) < logits <= int(rows["torch"][2].replace(",", ""))
    assert "linear_ce_fwd_bwd  8192 x 4096 x 128256: 2.582e+13" in out
    assert linear_ce.flops("linear_ce_fwd", 2, 3, 5) == 60 and linear_ce.flops("linear_ce_fwd_bwd", 2, 3, 5) == 180
    # the route model: each mode with cuBLAS's logits and with the Triton ones
    model = [line.split() for line in out.splitlines() if line.strip().startswith("8192x4096x128256")]
    assert [(r[1], r[2]) for r in model] == [(m, k) for m in ("speed", "low_memory") for k in ("cuBLAS", "Triton")]
    m = linear_ce.route_model("speed", True, 256, 64, 1000, itemsize=2, width=2)
    assert m["flop"] == 3 * 2 * 256 * 64 * 1000
    assert m["bytes"] == 2 * 256 * 1000 * 2 + 2 * 256 * 8 * 3 * 4  # z read, G written; 8 tiles' statistics
    assert linear_ce.route_model("low_memory", False, 256, 64, 1000)["bytes"] == 3 * 256 * 1000 * 2
    assert linear_ce.route_model("low_memory", True, 256, 64, 1000)["bytes"] == 2 * 256 * 8 * 3 * 4


# ---------------------------------------------------------------------------------------
# grad_skip_threshold: CCE-style skipping of negligible gradient tiles (off by default)
# ---------------------------------------------------------------------------------------

SKIP_TILES = (16, 64)  # config.linear_limit: 3 row tiles (16, 16, 1 rows) x 5 vocabulary tiles (64 ... 44 classes)


def skewed_inputs(device):
    """Logits where vocabulary tile 0 (classes 0-63) holds nearly all the probability: the
    other tiles' biases are -30, so their |gradient| is ~1e-13, except class 150 (tile 2),
    the target of row 20 (row tile 1), whose gradient is ~-1 there."""
    x, w, _ = make_inputs(device)
    b = torch.full((V,), -30.0, device=device)
    b[:64] = 0.0
    target = torch.randint(0, 64, (N,), device=device)
    target[20] = 150
    return x, w, b, target


def emulated_skip(x, w, b, target, threshold, block_m, block_v):
    """float64 gradients (reduction="sum") with every tile of G whose max |G| < threshold zeroed,
    and the keep mask per (row tile, vocabulary tile)."""
    z = F.linear(x.double().cpu(), w.double().cpu(), b.double().cpu())
    g = torch.softmax(z, -1) - F.one_hot(target.cpu(), V).double()
    keep = torch.zeros(-(-N // block_m), -(-V // block_v), dtype=torch.bool)
    for i in range(keep.shape[0]):
        for j in range(keep.shape[1]):
            tile = g[i * block_m:(i + 1) * block_m, j * block_v:(j + 1) * block_v]
            keep[i, j] = bool(tile.abs().max() >= threshold)
            if not keep[i, j]:
                tile.zero_()
    return (g @ w.double().cpu(), g.T @ x.double().cpu(), g.sum(0)), keep


@pytest.mark.parametrize("mode", MODES)
def test_grad_skip_threshold_off_and_zero_are_exact(mode, device):
    """None (the default) and 0.0 (no |g| is below 0) give bitwise the same gradients."""
    x, w, b, target = skewed_inputs(device)
    _, exact = run(x, w, b, target, SKIP_TILES, reduction="sum", mode=mode)
    for threshold in (None, 0.0):
        _, grads = run(x, w, b, target, SKIP_TILES, reduction="sum", grad_skip_threshold=threshold, mode=mode)
        assert all(torch.equal(a, e) for a, e in zip(grads, exact)), threshold


@pytest.mark.parametrize("mode", MODES)
def test_grad_skip_threshold_skips_only_small_tiles(mode, device):
    """With a threshold between the tiny tiles' |g| (~1e-13) and the others' (~1e-2 and up):
    the result is the float64 gradient with exactly the skipped tiles zeroed; the vocabulary
    tiles no row tile skips keep the exact db bitwise and dW to float32 rounding (the
    products over the kept tiles add in another order than cuBLAS), those all row tiles
    skip get 0; and the change is no more than the skipped terms (each |g| < threshold)."""
    threshold = 1e-6
    x, w, b, target = skewed_inputs(device)
    _, exact = run(x, w, b, target, SKIP_TILES, reduction="sum", mode=mode)
    _, grads = run(x, w, b, target, SKIP_TILES, reduction="sum", grad_skip_threshold=threshold, mode=mode)
    want, keep = emulated_skip(x, w, b, target, threshold, SKIP_TILES[0], SKIP_TILES[1])
    # vocabulary tile 0 kept everywhere; tile 2 only by row tile 1 (row 20's target); the rest skipped
    assert keep[:, 0].all() and keep[:, 2].tolist() == [False, True, False]
    assert not keep[:, [1, 3, 4]].any()
    for what, got, ref in zip(("dx", "dw", "db"), grads, want):
        assert_close_fp32(got.cpu(), ref, what)
    block_v = SKIP_TILES[1]
    dw, db = grads[1].cpu(), grads[2].cpu()
    for j in range(keep.shape[1]):
        cols = slice(j * block_v, (j + 1) * block_v)
        if keep[:, j].all():
            assert torch.equal(db[cols], exact[2].cpu()[cols])
            assert_close_fp32(dw[cols], exact[1].cpu()[cols].double(), f"dw tile {j}")
        elif not keep[:, j].any():
            assert not dw[cols].any() and not db[cols].any()
    # each skipped g_ij < threshold changes dX[i] by at most threshold * |W_j| and dW_j by threshold * |X_i|
    n_skipped_classes = V - block_v
    assert float((grads[0] - exact[0]).abs().max()) <= threshold * n_skipped_classes * float(w.abs().max())
    assert float((grads[1] - exact[1]).abs().max()) <= threshold * N * float(x.abs().max())
    assert float((grads[2] - exact[2]).abs().max()) <= threshold * N


def test_grad_skip_threshold_huge_skips_everything(device):
    """Every tile skipped, in both modes and dtypes: every gradient element is 0, the loss is
    unchanged; through the module too."""
    x, w, b, target = skewed_inputs(device)
    for dtype, mode in itertools.product((torch.float32, torch.bfloat16), MODES):
        args = (x.to(dtype), w.to(dtype), b.to(dtype), target, SKIP_TILES)
        loss, grads = run(*args, grad_skip_threshold=1e30, mode=mode)
        exact_loss, _ = run(*args, mode=mode)
        assert torch.equal(loss, exact_loss)  # the loss is never changed
        assert all(g.dtype == dtype and not g.any() for g in grads), (dtype, mode)
    module = softmax_gpu.nn.LinearCrossEntropyLoss(grad_skip_threshold=1e30)
    xs = x.clone().requires_grad_()
    module(xs, w, target, b).backward()
    assert not xs.grad.any()


def test_grad_skip_threshold_means_the_same_at_any_batch_size(device):
    """The threshold is on each row's own gradient, before the mean's 1/N: a mean over 33 rows
    and a sum skip the same tiles, so their gradients differ by exactly the factor N_valid
    (Cut Cross-Entropy's 2^-12 no longer zeroes everything on a large batch)."""
    x, w, b, target = skewed_inputs(device)
    for mode in MODES:
        _, mean_grads = run(x, w, b, target, SKIP_TILES, reduction="mean", grad_skip_threshold=1e-6, mode=mode)
        _, sum_grads = run(x, w, b, target, SKIP_TILES, reduction="sum", grad_skip_threshold=1e-6, mode=mode)
        for m, s_ in zip(mean_grads, sum_grads):
            assert_close_fp32((m * N).cpu(), s_.double().cpu(), f"{mode} mean x N")
        assert mean_grads[0].abs().max() > 0


def test_skip_kernel_never_leaves_its_tile():
    """The filter on a (33, 300) view inside a larger buffer, with tiles over both edges:
    every access stays inside the view's storage, rows past the view are untouched, and
    only the all-small tiles are zeroed (a NaN keeps its tile)."""
    from softmax_gpu.traffic import TrafficCounter

    big = torch.full((40, 320), 5.0)
    grad = big[:33, :300]
    grad[16:32, 64:128] = 1e-9
    grad[0:16, 128:192] = 1e-9
    grad[0, 130] = float("nan")
    scale = torch.tensor(1.0)
    with TrafficCounter(buffers=[big, scale]):
        lce.launch_skip_small_tiles(grad, scale, 1e-6, (16, 64))
    assert not grad[16:32, 64:128].any()
    assert grad[0:16, 128:192].isnan().any() and (grad[1:16, 128:192] == 1e-9).all()
    assert (big[33:] == 5.0).all() and (big[:, 300:] == 5.0).all()


def test_grad_skip_threshold_bad_values_raise_before_launch(device):
    x, w, _ = make_inputs(device, n=4)
    t = torch.tensor([0, 1, 2, 3], device=device)
    fn = "softmax_gpu.linear_cross_entropy"
    for bad in (-1.0, -1e-30, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=f"{fn}\\(\\): grad_skip_threshold must be a finite number >= 0"):
            softmax_gpu.linear_cross_entropy(x, w, t, grad_skip_threshold=bad)
    for bad in ("1e-3", torch.tensor(1e-3)):
        with pytest.raises(TypeError, match="grad_skip_threshold must be a float or None"):
            softmax_gpu.linear_cross_entropy(x, w, t, grad_skip_threshold=bad)


@interpreter_only
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("n, h, tile", [(37, 40, (16, 64)), (150, 150, (64, 64))])
def test_products_over_live_tiles_read_only_those(n, h, tile, accumulate):
    """launch_live_tiles_products on a (n, 200) float32 G, about half its tiles live and the
    others NaN: dX = G W and dW = G^T X over the live tiles alone, to float32 rounding, no
    NaN (a skipped tile is never read); exact traffic: the map, each live tile of G and the
    matching rows of W and X once per output block, the outputs once (and read once more
    when accumulating); every access inside its buffer. The second shape has several dX
    programs a row tile (64-row tiles, 32-row blocks), three hidden blocks and ragged edges."""
    from softmax_gpu.traffic import TrafficCounter

    v = 200
    tm, tn = tile
    n_rt, n_ct = -(-n // tm), -(-v // tn)
    live = (torch.arange(n_rt * n_ct).reshape(n_rt, n_ct) % 3 != 1).to(torch.int8)
    live[0, 0] = 1
    g = torch.randn(n, v)
    mask = live.repeat_interleave(tm, 0)[:n].repeat_interleave(tn, 1)[:, :v].bool()
    g[~mask] = float("nan")
    w, x = torch.randn(v, h), torch.randn(n, h)
    dx0, dw0 = (torch.randn(n, h), torch.randn(v, h)) if accumulate else (torch.zeros(n, h), torch.zeros(v, h))
    dx, dw = dx0.clone(), dw0.clone()
    with TrafficCounter(buffers=[g, live, w, x, dx, dw]) as t:
        lce.launch_live_tiles_products(g, live, tile, dx, w, dw, x, accumulate, accumulate)
    g64 = torch.where(mask, g, 0.0).double()
    assert_close_fp32(dx, dx0.double() + g64 @ w.double(), "dx")
    assert_close_fp32(dw, dw0.double() + g64.T @ x.double(), "dw")
    block_m, block_h, block_v, _, _ = lce.live_tiles_blocks(torch.float32, tm)
    rows = [min(tm, n - i * tm) for i in range(n_rt)]
    cols = [min(tn, v - j * tn) for j in range(n_ct)]
    n_h = -(-h // block_h)
    row_blocks = [-(-r // block_m) for r in rows]  # dX programs a row tile (per hidden block)
    class_blocks = [-(-c // block_v) for c in cols]  # dW programs a class tile (per hidden block)
    maps = n_h * (sum(row_blocks) * n_ct + sum(class_blocks) * n_rt)  # each program reads its row / column of the map
    live_tiles = live.nonzero().tolist()
    g_read = 2 * n_h * sum(rows[i] * cols[j] * 4 for i, j in live_tiles)  # each live tile, per hidden block, by both
    w_read = sum(cols[j] * h * 4 * row_blocks[i] for i, j in live_tiles)  # dX: W's rows of the tile, per row block
    x_read = sum(rows[i] * h * 4 * class_blocks[j] for i, j in live_tiles)  # dW: X's rows, per class block
    outputs = (n * h + v * h) * 4
    assert t.bytes_loaded == maps + g_read + w_read + x_read + (outputs if accumulate else 0)
    assert t.bytes_stored == outputs
    if (n, h) == (150, 150):
        assert block_m < tm and n_h == 3  # the cases the first shape does not reach


def test_products_over_live_tiles_bfloat16(device):
    """The 16-bit route (the blocks a GPU runs: 128-row dX blocks, 128-wide hidden blocks):
    bfloat16 operands, float32 sums, bfloat16 outputs within their rounding of float64."""
    n, v, h, tile = 70, 300, 136, (32, 64)
    live = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 0, 0, 1], [1, 1, 0, 1, 0]], dtype=torch.int8, device=device)
    g, w, x = (torch.randn(*shape, device=device).bfloat16() for shape in ((n, v), (v, h), (n, h)))
    mask = live.repeat_interleave(32, 0)[:n].repeat_interleave(64, 1)[:, :v].bool()
    dx, dw = (torch.empty(*shape, dtype=torch.bfloat16, device=device) for shape in ((n, h), (v, h)))
    lce.launch_live_tiles_products(g, live, tile, dx, w, dw, x, False, False)
    g64 = torch.where(mask, g.double(), 0.0)
    for got, want in ((dx, g64 @ w.double()), (dw, g64.T @ x.double())):
        scale = float(want.abs().max())
        torch.testing.assert_close(got.double(), want, rtol=2**-7, atol=2**-7 * scale)
    assert lce.products_over_live_tiles(tile, g, w)  # (in the interpreter: its bfloat16 dot fix is in)


def test_grad_skip_falls_back_to_cublas_products(device):
    """Tiles under LIVE_MIN_TILE a side, or operands without unit column stride, keep the dense
    products over the zeroed tiles: the same gradients as the emulated float64 skip."""
    assert not lce.products_over_live_tiles((8, 64), torch.empty(4, 4, device=device))
    assert not lce.products_over_live_tiles((16, 64), torch.empty(4, 4, device=device).t())
    x, w, b, target = skewed_inputs(device)
    threshold = 1e-6
    want, _keep = emulated_skip(x, w, b, target, threshold, 8, 64)
    _, grads = run(x, w, b, target, (8, 64), reduction="sum", grad_skip_threshold=threshold, mode="speed")
    for what, got, ref in zip(("dx", "dw", "db"), grads, want):
        assert_close_fp32(got.cpu(), ref, what)


# ---------------------------------------------------------------------------------------
# The logits in Triton with their tile statistics (config.fused_logits, opt-in)
# ---------------------------------------------------------------------------------------

# Tiles small enough that the N = 33 x V = 300 problem has 3 row tiles (the last with one row),
# 10 class tiles (the last 12 wide), two groups of row tiles (the second a single one) and a
# hidden dim of 40 that BLOCK_K = 16 does not divide (the masked K step).
SMALL_LOGITS = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=2, WARPS=4, STAGES=2)


@pytest.fixture
def fused(monkeypatch):
    """fused_logits on, with SMALL_LOGITS tiles; yields the list of launch_logits calls made:
    "stats" (the forward's logits and tile statistics), "grad" (the low-memory backward's
    gradient epilogue), "logits" (the product alone)."""
    monkeypatch.setattr(config, "LINEAR_CE_LOGITS", SMALL_LOGITS)
    monkeypatch.setattr(config, "LINEAR_CE_LOGITS_FP32", SMALL_LOGITS)
    calls = []
    real = lce.launch_logits

    def spy(x, w, b, z, *args, **kw):
        calls.append("grad" if kw.get("grad") is not None else "stats" if len(args) > 2 and args[2] is not None
                     else "logits")  # fmt: skip
        return real(x, w, b, z, *args, **kw)

    monkeypatch.setattr(lce, "launch_logits", spy)
    with config.fused_logits(True):
        yield calls


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("limit", LIMITS)
@pytest.mark.parametrize("name", list(CASES))
def test_fused_logits_match_float64(name, limit, mode, fused, device):
    """Every option set of test_matches_float64_unfused, through linear_logits_kernel: its
    statistics epilogue, the tile merge (and, in slabs, the merge into earlier slabs) and the
    vocab-parallel loss kernel on its logits, against float64."""
    x, w, b, target, upstream, opts = case_inputs(name, device)
    loss, grads = run(x, w, b, target, limit, upstream, mode=mode, **opts)
    ref_loss, ref_grads = run_reference(x, w, b, target, upstream, **opts)
    route = lce.route(mode, x.dtype, opts["reduction"], False, True)
    assert "stats" in fused and "logits" not in fused and (route == "speed") == ("grad" not in fused), fused
    assert_close_fp32(loss.cpu(), ref_loss, f"{name} loss")
    for what, got, want in zip(("dx", "dw", "db"), grads, ref_grads):
        assert (got is None) == (want is None), what
        if got is not None:
            assert_close_fp32(got.cpu(), want, f"{name} {what}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_logits_16bit_within_twice_torch_error(dtype, mode, fused, device):
    """As test_16bit_within_twice_torch_error, the logits rounded once by the kernel's epilogue."""
    x, w, b, target, kw = sixteen_bit_case(device, dtype)
    loss, grads = run(x, w, b, target, (16, 64), mode=mode, **kw)
    assert "stats" in fused
    assert_within_twice_torch_16bit(loss, grads, x, w, b, target, **kw)


@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("mode", MODES)
def test_fused_logits_masked_vocabulary_and_nan(mode, softcap, fused, device):
    """A bias of -inf over whole class tiles (32-63, padding) and part of another (250-260)
    gives tiles whose maximum is -inf: they add nothing, as in torch; under a soft cap those
    logits are -softcap and count, a tile of them included. A NaN feature makes its row's
    loss NaN and every dW and db element NaN, element for element as torch's. Slabs of 48
    classes end mid-tile, where other slabs' targets must not land."""
    x, w, b = make_inputs(device, bias=True)
    b[32:64] = float("-inf")
    b[250:261] = float("-inf")
    target = torch.randint(0, V, (N,), device=device)
    target[(target >= 32) & (target < 64)] = 5
    target[(target >= 250) & (target <= 260)] = 6
    loss, grads = run(x, w, b, target, (16, 48), mode=mode, reduction="sum", softcap=softcap)
    ref_loss, ref_grads = run_reference(x, w, b, target, reduction="sum", softcap=softcap)
    assert_close_fp32(loss.cpu(), ref_loss, "loss")
    for what, got, want in zip(("dx", "dw"), grads, ref_grads):
        assert_close_fp32(got.cpu(), want, what)
    if softcap is not None:  # every logit -inf: all capped to -softcap, a uniform softmax, as torch
        every = torch.full_like(b, float("-inf"))
        loss, grads = run(x, w, every, target, (16, 48), mode=mode, reduction="sum", softcap=softcap)
        ref_loss, ref_grads = run_reference(x, w, every, target, reduction="sum", softcap=softcap)
        assert_close_fp32(loss.cpu(), ref_loss, "loss, all -inf")
        for what, got, want in zip(("dx", "dw"), grads, ref_grads):
            assert_close_fp32(got.cpu(), want, f"{what}, all -inf")
    x[5, 7] = float("nan")
    loss, grads = run(x, w, b, target, (16, 48), torch.ones(N, device=device), mode=mode, reduction="none",
                      softcap=softcap)  # fmt: skip
    ref_loss, ref_grads = run_reference(x, w, b, target, torch.ones(N), reduction="none", softcap=softcap)
    assert torch.equal(loss.isnan().cpu(), ref_loss.isnan()) and loss.isnan().sum() == 1
    for what, got, want in zip(("dx", "dw", "db"), grads, ref_grads):
        assert torch.equal(got.isnan().cpu(), want.isnan()), what


@pytest.mark.parametrize("mode", MODES)
def test_fused_logits_poisoned_buffers(mode, monkeypatch, fused, device):
    """The logits buffer and both tile-statistics buffers come NaN-filled and larger than
    needed: every tile writes its statistics for every live row before the merge reads
    them, so the results stay exact; and bitwise the same on a second run."""
    def nan_tiles(x, n_rows, max_cols, width):
        tiles = n_rows * -(-max_cols // SMALL_LOGITS["BLOCK_N"])
        return poisoned((tiles + 5,), torch.float32, x.device), poisoned((tiles * width + 9,), torch.float32, x.device)

    monkeypatch.setattr(lce, "_buffer", lambda x, rows, cols: poisoned((rows * cols + 7,), x.dtype, x.device))
    monkeypatch.setattr(lce, "_tile_buffers", nan_tiles)
    x, w, b, target, upstream, opts = case_inputs("everything-mean", device)
    first = run(x, w, b, target, (16, 64), upstream, mode=mode, **opts)
    ref_loss, ref_grads = run_reference(x, w, b, target, upstream, **opts)
    assert_close_fp32(first[0].cpu(), ref_loss, "loss")
    for what, got, want in zip(("dx", "dw", "db"), first[1], ref_grads):
        assert_close_fp32(got.cpu(), want, what)
    second = run(x, w, b, target, (16, 64), upstream, mode=mode, **opts)
    assert torch.equal(first[0], second[0]) and all(torch.equal(a, c) for a, c in zip(first[1], second[1]))


def test_fused_logits_shipped_tiles(monkeypatch, device):
    """The shipped tiles (128 x 128, 64 deep, groups of 8 row tiles: wgmma on sm_90) on a
    problem with 3 row tiles and 8 class tiles, ragged at both ends and H a multiple of 64
    (the unmasked K loop), bfloat16: the speed mode within twice torch's error."""
    n, h, v = 300, 192, 1000
    x, w, b = make_inputs(device, torch.bfloat16, n=n, h=h, v=v, bias=True)
    target = torch.randint(0, v, (n,), device=device)
    calls = []
    real = lce.launch_logits
    monkeypatch.setattr(lce, "launch_logits", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    with config.fused_logits(True):
        loss, grads = run(x, w, b, target, reduction="mean", label_smoothing=0.1)
    assert calls == [1]  # one chunk, through linear_logits_kernel
    assert_within_twice_torch_16bit(loss, grads, x, w, b, target, reduction="mean", label_smoothing=0.1)


@pytest.mark.parametrize("mode", MODES)
def test_fused_logits_bias_of_any_stride(mode, fused, device):
    """A bias that is a strided view (every other element of a wider tensor) or a broadcast
    (stride 0, one stored value): read at its stride, never past its storage."""
    x, w, _ = make_inputs(device)
    target = torch.randint(0, V, (N,), device=device)
    for b in (torch.randn(V, 2, device=device)[:, 0], torch.randn(1, device=device).expand(V)):
        xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
        with config.linear_limit(16, 48):  # (the bias passed as it is: run() would clone it contiguous)
            loss = softmax_gpu.linear_cross_entropy(xl, wl, target, linear_bias=b, reduction="sum", mode=mode)
            loss.backward()
        ref_loss, ref_grads = run_reference(x, w, b, target, reduction="sum")
        assert_close_fp32(loss.detach().cpu(), ref_loss, f"loss, bias stride {b.stride(0)}")
        for what, got, want in zip(("dx", "dw"), (xl.grad, wl.grad), ref_grads):
            assert_close_fp32(got.cpu(), want, f"{what}, bias stride {b.stride(0)}")
    assert "stats" in fused


def test_fused_route_falls_back(device):
    """Probability targets, operands without unit column stride and the switch off keep
    cuBLAS's products."""
    x, w, _ = make_inputs(device)
    target = torch.randint(0, V, (N,), device=device)
    with config.fused_logits(True):
        assert lce.fused_route(x, w, target)
        assert not lce.fused_route(x, w, torch.rand(N, V, device=device))
        assert not lce.fused_route(x.t().contiguous().t(), w, target)
        assert not lce.fused_route(x[:, :0], w[:, :0], target)
    with config.fused_logits(False):
        assert not lce.fused_route(x, w, target)


@interpreter_only
@pytest.mark.parametrize("accumulate", [False, True])
def test_fused_logits_traffic(accumulate, monkeypatch):
    """Exact interpreter traffic of the low-memory forward's two launches, every access inside
    its buffer: linear_logits_kernel reads each program's BLOCK_M rows of X (rows past the end
    wrap to real rows) and BLOCK_N rows of W over the H columns, the bias, targets and class
    weights of its tile and w_t where it holds the target, and writes (1 + width) float32 a
    live row, and no logits;
    merge_tile_stats_kernel reads each row's tiles (the maxima twice) and, accumulating,
    the row's earlier statistics, and writes 1 + width float32 a row."""
    from softmax_gpu.traffic import TrafficCounter

    monkeypatch.setattr(config, "LINEAR_CE_LOGITS_FP32", SMALL_LOGITS)
    x, w, b = make_inputs("cpu", bias=True)
    target = torch.randint(0, V, (N,))
    weight = torch.rand(V) + 0.1
    options = LossOptions(-100, 0.1, 0.0, None)
    width = 5  # weights and smoothing
    tile_max, tile_stats = lce._tile_buffers(x, N, V, width)
    views = lce._tile_views((tile_max, tile_stats), x, N, V, width)
    row_max, stats = torch.full((N,), 0.5), torch.rand(N, width)
    bm, bn = SMALL_LOGITS["BLOCK_M"], SMALL_LOGITS["BLOCK_N"]
    n_rt, n_ct = -(-N // bm), -(-V // bn)
    with TrafficCounter(buffers=[x, w, b, target, weight, tile_max, tile_stats]) as t:
        lce.launch_logits(x, w, b, None, target, weight, views, V, 0, options)
    live_rows = [min(bm, N - i * bm) for i in range(n_rt)]
    live_cols = [min(bn, V - j * bn) for j in range(n_ct)]
    operands = n_rt * n_ct * (bm + bn) * H * 4
    edges = n_rt * V * (4 + 4) + n_ct * N * 8  # bias and weights of each tile's classes; each tile's targets
    edges += N * 4  # w_t, gathered by the tile that holds the row's target (every target counts here)
    assert t.bytes_loaded == operands + edges
    assert t.bytes_stored == n_ct * N * (1 + width) * 4
    assert sum(live_rows) == N and sum(live_cols) == V
    with TrafficCounter(buffers=[tile_max, tile_stats, row_max, stats]) as t:
        lce.launch_merge_tile_stats(views, row_max, stats, accumulate)
    assert t.bytes_loaded == N * n_ct * (2 + width) * 4 + (N * (1 + width) * 4 if accumulate else 0)
    assert t.bytes_stored == N * (1 + width) * 4


def test_fused_logits_switch_is_read_in_the_forward(fused, device):
    """The low-memory backward makes its logits as its forward did, whatever the switch says
    by then (the bench times autograd.grad outside the provider's switch): the forward's
    statistics are of linear_logits_kernel's logits, and the backward's gradient epilogue
    works on the same numbers."""
    x, w, b = make_inputs(device, bias=True)
    target = torch.randint(0, V, (N,), device=device)
    xl = x.clone().requires_grad_()
    with config.linear_limit(16, 64):
        loss = softmax_gpu.linear_cross_entropy(xl, w, target, linear_bias=b, reduction="none")
        with config.fused_logits(False):
            loss.sum().backward()
    assert fused == ["stats"] * 5 + ["grad"] * 5, fused  # five slabs of 64 classes each way
    _, (ref_dx, _, _) = run_reference(x, w, b, target, torch.ones(N), reduction="none")
    assert_close_fp32(xl.grad.cpu(), ref_dx, "dx")
