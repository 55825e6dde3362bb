"""Cross-entropy parity with torch where a quiet difference would cost a training run:
16-bit gradients under loss scaling, float64 all the way, and gradients for probability
targets (issue #8, items 2 and 4)."""
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import MEAN_LOADS, MEAN_STORES, assert_matches

import softmax_gpu
from softmax_gpu import config
from softmax_gpu.ops.cross_entropy import DEFERRED_GRAD_DTYPES
from softmax_gpu.traffic import TrafficCounter

PATHS = [None, 16]  # the default single block, and 16-wide blocks that force the looped path


def _block(max_block):
    return config.block_limit(max_block or config.MAX_BLOCK_CROSS_ENTROPY)


def _torch_fp32_gradient(logits, target, upstream, reduction, **kw):
    """torch's gradient as its float32 kernels form it: float32 math, one rounding at the end."""
    x = logits.detach().float().cpu().requires_grad_()
    kw = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}  # weight: on the CPU too
    loss = F.cross_entropy(x, target.cpu(), reduction=reduction, **kw)
    loss.backward(upstream.float().cpu())
    return x.grad.to(logits.dtype)


def _float64_gradient(logits, target, upstream, reduction, **kw):
    """The exact gradient (float64 math), rounded once to the logits' dtype."""
    x = logits.detach().double().cpu().requires_grad_()
    kw = {k: v.cpu().double() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    F.cross_entropy(x, target.cpu(), reduction=reduction, **kw).backward(upstream.double().cpu())
    return x.grad.to(logits.dtype)


def _as_good_as_torch(ours, theirs, truth, tolerance):
    """Each entry within `tolerance` ulps of torch's float32 gradient, or else no further from
    the correctly rounded float64 gradient than torch's is (at least 1 ulp allowed): where
    the float32 math cancels (a smoothed class whose q_j w_j meets eps w_j / C), torch's
    entry may be off by an ulp itself, on the other side."""
    near_torch = _ulps_apart(ours, theirs) <= tolerance
    near_truth = _ulps_apart(ours, truth) <= _ulps_apart(theirs, truth).clamp(min=1)
    return bool((near_torch | near_truth).all())


def _ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units of the 16-bit format's last place (subnormals included)."""
    bits = {torch.float16: torch.int16, torch.bfloat16: torch.int16}[a.dtype]
    ia, ib = a.cpu().view(bits).long(), b.cpu().view(bits).long()
    # sign-magnitude to a monotonic integer line
    ia = torch.where(ia < 0, -(ia & 0x7FFF), ia)
    ib = torch.where(ib < 0, -(ib & 0x7FFF), ib)
    return (ia - ib).abs()


# ---------------------------------------------------------------------------------------
# Item 2: 16-bit gradients under loss scaling
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, n, c, max_block, factor",
    [
        # the case measured in the issue: fp16, N = C = 512, GradScaler's 2^16; 40.8% of the
        # entries torch keeps came out 0 when the forward stored (q - onehot) / N in fp16
        (torch.float16, 512, 512, None, 2.0**16),
        (torch.float16, 64, 256, 64, 2.0**16),  # the same on the looped path
        (torch.float16, 32, 300, None, 1 / 3),  # gradient accumulation's 1/k: no power of two
        (torch.bfloat16, 128, 512, None, 2.0**16),
        (torch.bfloat16, 32, 300, 64, 1 / 3),
    ],
)
def test_16bit_gradient_survives_loss_scaling(dtype, n, c, max_block, factor, device):
    logits = (3 * torch.randn(n, c, device=device)).to(dtype)
    target = torch.randint(0, c, (n,), device=device)
    target[::7] = -100
    upstream = torch.tensor(factor, device=device)
    x = logits.clone().requires_grad_()
    with _block(max_block):
        softmax_gpu.cross_entropy(x, target).backward(upstream)
    theirs = _torch_fp32_gradient(logits, target, upstream, "mean")
    ours = x.grad.cpu()
    kept = theirs != 0
    assert kept.float().mean() > 0.5, "the test needs entries that a late rescale would lose"
    lost = (kept & (ours == 0)).sum().item()
    assert lost == 0, f"{lost} of {kept.sum().item()} entries torch keeps came out 0"
    # one rounding of the same float32 value: at most 1 ulp apart (2 for the twice-rounded bf16
    # gradient under a factor that is not a power of two)
    tolerance = 1 if dtype in DEFERRED_GRAD_DTYPES or factor == 2.0**16 else 2
    truth = _float64_gradient(logits, target, upstream, "mean")
    assert _as_good_as_torch(ours, theirs, truth, tolerance), _ulps_apart(ours, theirs).max()


@pytest.mark.parametrize("max_block", PATHS)
def test_float16_per_row_upstream_with_options(max_block, device):
    """reduction="none" with a different large factor per row, smoothing and weights: each
    entry is the float32 value times its row's factor, rounded once."""
    n, c = 6, 40
    logits = (2 * torch.randn(n, c, device=device)).half()
    target = torch.randint(0, c, (n,), device=device)
    target[3] = -100
    weight = torch.rand(c, device=device) + 0.5
    upstream = torch.tensor([2.0**16, 1.0, 3.0e3, 0.0, 2.0**-3, 7.0], device=device)
    x = logits.clone().requires_grad_()
    kw = dict(weight=weight, label_smoothing=0.1)
    with _block(max_block):
        softmax_gpu.cross_entropy(x, target, reduction="none", **kw).backward(upstream)
    theirs = _torch_fp32_gradient(logits, target, upstream, "none", **kw)
    assert (theirs[upstream.cpu() != 0].abs() > 0).all()
    truth = _float64_gradient(logits, target, upstream, "none", **kw)
    assert _as_good_as_torch(x.grad.cpu(), theirs, truth, 1), _ulps_apart(x.grad.cpu(), theirs).max()


@pytest.mark.parametrize("dtype", DEFERRED_GRAD_DTYPES)
def test_deferred_gradient_allows_retain_graph(dtype, device):
    """float16 and float64 form the gradient in the backward, so a second backward through
    the same graph (retain_graph=True) gives the same gradient again, as torch's does."""
    logits = torch.randn(4, 9, device=device).to(dtype).requires_grad_()
    target = torch.tensor([0, 8, -100, 3], device=device)
    loss = softmax_gpu.cross_entropy(logits, target)
    (g1,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, logits, torch.tensor(2.0, device=device, dtype=loss.dtype))
    assert torch.equal(g2.float(), (2 * g1.float()))


@pytest.mark.parametrize("max_block", PATHS)
def test_float16_inplace_backward_writes_the_scaled_gradient_over_the_logits(max_block, device):
    n, c = 5, 70
    logits = torch.randn(n, c, device=device).half()
    target = torch.randint(0, c, (n,), device=device)
    leaf = logits.clone().requires_grad_()
    x = leaf * 1  # a non-leaf that the gradient may overwrite
    with _block(max_block):
        loss = softmax_gpu.cross_entropy(x, target, inplace_backward=True)
        loss.backward(torch.tensor(2.0**16, device=device))
    theirs = _torch_fp32_gradient(logits, target, torch.tensor(2.0**16), "mean")
    assert _ulps_apart(leaf.grad.cpu(), theirs).max().item() <= 1
    assert torch.equal(x.detach().cpu(), leaf.grad.cpu())  # the logits' storage holds the gradient


@pytest.mark.skipif(torch.cuda.is_available(), reason="counted in Triton's interpreter")
def test_traffic_float16_reads_logits_twice_bfloat16_once():
    """What each way costs: bfloat16 stays 1 read + 1 write of N x C for forward+backward;
    float16 pays one more read, in the backward."""
    n, c = 4, 100
    target = torch.randint(0, c, (n,))
    counts = {}
    for dtype in (torch.bfloat16, torch.float16):
        logits = torch.randn(n, c).to(dtype).requires_grad_()
        with TrafficCounter() as t:
            softmax_gpu.cross_entropy(logits, target).backward()
        counts[dtype] = (t.bytes_loaded, t.bytes_stored)
    nc = n * c * 2
    # beyond N x C, the mean's O(N) bytes (helpers.MEAN_LOADS / MEAN_STORES); fp16 reads no
    # divisor in the forward, writes 4 stats a row and reads them back, reads the target
    # again, and the upstream and divisor once a row in the backward.
    assert counts[torch.bfloat16] == (nc + MEAN_LOADS(n, 2, programs=1), nc + MEAN_STORES(n))  # 4 rows, 1 program
    assert counts[torch.float16] == (2 * nc + MEAN_LOADS(n, 2, programs=0) + n * (8 + 16 + 4 + 4), nc + MEAN_STORES(n) + 16 * n)


# ---------------------------------------------------------------------------------------
# Item 4: float64 in, float64 math, float64 loss
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_block", PATHS)
def test_float64_matches_torch_to_float64_precision(max_block, device):
    n, c = 6, 37
    logits = (4 * torch.randn(n, c, device=device)).double()
    weight = torch.rand(c, device=device, dtype=torch.float64) + 0.1
    probs = torch.softmax(torch.randn(n, c, device=device, dtype=torch.float64), -1)
    for reduction, smoothing, use_weight, soft in itertools.product(
        ("mean", "sum", "none"), (0.0, 0.1), (False, True), (False, True)
    ):
        target = probs if soft else torch.randint(0, c, (n,), device=device)
        if not soft:
            target[2] = -100
        kw = dict(reduction=reduction, label_smoothing=smoothing, weight=weight if use_weight else None)
        x = logits.clone().requires_grad_()
        with _block(max_block):
            ours = softmax_gpu.cross_entropy(x, target, **kw)
            ours.backward(torch.ones_like(ours))
        ref_x = logits.cpu().clone().requires_grad_()
        kw_cpu = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        theirs = F.cross_entropy(ref_x, target.cpu(), **kw_cpu)
        theirs.backward(torch.ones_like(theirs))
        what = f"{reduction} eps={smoothing} weight={use_weight} soft={soft}"
        assert ours.dtype == torch.float64, what
        assert_matches(ours, theirs.detach().numpy(), 1e-12, 1e-14, what=what + " loss")
        assert_matches(x.grad, ref_x.grad.numpy(), 1e-12, 1e-14, what=what + " grad")


def test_float64_z_loss_and_softcap_match_a_float64_composition(device):
    n, c = 5, 23
    logits = (20 * torch.randn(n, c, device=device)).double()
    target = torch.randint(0, c, (n,), device=device)
    x = logits.clone().requires_grad_()
    ours = softmax_gpu.cross_entropy(x, target, z_loss=1e-3, softcap=15.0, label_smoothing=0.1)
    ours.backward()
    ref_x = logits.cpu().clone().requires_grad_()
    capped = 15.0 * torch.tanh(ref_x / 15.0)
    lse = torch.logsumexp(capped, -1)
    theirs = (F.cross_entropy(capped, target.cpu(), reduction="none", label_smoothing=0.1) + 1e-3 * lse**2).mean()
    theirs.backward()
    assert_matches(ours, theirs.detach().numpy(), 1e-12, 1e-14)
    assert_matches(x.grad, ref_x.grad.numpy(), 1e-11, 1e-14)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(reduction="sum", label_smoothing=0.2),
        dict(reduction="none", weight=True, ignore_index=5),
        dict(z_loss=1e-2, softcap=3.0, weight=True, label_smoothing=0.1),
        dict(soft=True, reduction="none", label_smoothing=0.1, weight=True),
        dict(soft=True, z_loss=1e-2, softcap=2.0),
    ],
    ids=["plain", "sum-smoothing", "none-weight-ignore", "zloss-softcap-weight", "soft-none", "soft-zloss-softcap"],
)
@pytest.mark.parametrize("max_block", PATHS)
def test_gradcheck_every_option(kw, max_block, device):
    """torch.autograd.gradcheck (float64 finite differences against our backward), for the
    logits and, with probability targets, the targets too. Fast mode (random projections of
    the Jacobian) keeps the interpreter's cost down; every entry still enters the check."""
    kw = dict(kw)
    n, c = 2, 18
    soft = kw.pop("soft", False)
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(c, device=device, dtype=torch.float64) + 0.5
    logits = torch.randn(n, c, device=device, dtype=torch.float64, requires_grad=True)
    if soft:
        target = torch.softmax(torch.randn(n, c, device=device, dtype=torch.float64), -1).requires_grad_()
        inputs = (logits, target)
    else:
        target = torch.tensor([5, 17], device=device)
        inputs = (logits,)

    def f(x, t=target):
        return softmax_gpu.cross_entropy(x, t, **kw)

    with _block(max_block):
        assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


# ---------------------------------------------------------------------------------------
# Item 4: gradients for probability targets
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("logits_grad", [True, False])
def test_probability_target_gradient_matches_torch(dtype, logits_grad, device):
    n, c = 5, 29
    logits = (2 * torch.randn(n, c, device=device)).to(dtype)
    probs = torch.softmax(torch.randn(n, c, device=device), -1).to(dtype)
    weight = torch.rand(c, device=device) + 0.1
    for reduction, smoothing, use_weight in itertools.product(("mean", "sum", "none"), (0.0, 0.2), (False, True)):
        kw = dict(reduction=reduction, label_smoothing=smoothing, weight=weight if use_weight else None)
        x = logits.clone().requires_grad_(logits_grad)
        p = probs.clone().requires_grad_()
        ours = softmax_gpu.cross_entropy(x, p, **kw)
        upstream = torch.rand_like(ours) + 0.5
        ours.backward(upstream)
        ref_x = logits.double().cpu().requires_grad_(logits_grad)
        ref_p = probs.double().cpu().requires_grad_()
        kw64 = {k: (v.double().cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        theirs = F.cross_entropy(ref_x, ref_p, **kw64)
        theirs.backward(upstream.double().cpu())
        what = f"{dtype} {reduction} eps={smoothing} weight={use_weight}"
        assert p.grad is not None and p.grad.dtype == dtype, what
        rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (1e-2, 1e-2)
        assert_matches(p.grad, ref_p.grad.numpy(), rtol, atol, what=what + " target grad")
        if logits_grad:
            assert_matches(x.grad, ref_x.grad.numpy(), rtol, atol, what=what + " logits grad")
        else:
            assert x.grad is None


def test_probability_target_gradient_with_softcap_and_spatial_dims(device):
    """(N, C, d) probabilities: the gradient comes back in the target's own layout, and the
    soft cap enters as z = s tanh(x / s) in lse - z_j."""
    logits = 5 * torch.randn(2, 7, 3, device=device)
    probs = torch.softmax(torch.randn(2, 7, 3, device=device), 1).requires_grad_()
    softmax_gpu.cross_entropy(logits, probs, softcap=4.0).backward()
    capped = 4.0 * torch.tanh(logits.double().cpu() / 4.0)
    ref_p = probs.detach().double().cpu().requires_grad_()
    F.cross_entropy(capped, ref_p).backward()
    assert probs.grad.shape == probs.shape
    assert_matches(probs.grad, ref_p.grad.numpy(), 1e-5, 1e-7)


def test_inplace_backward_refuses_a_target_that_needs_the_logits(device):
    x = torch.randn(3, 5, device=device, requires_grad=True) * 1
    p = torch.softmax(torch.randn(3, 5, device=device), -1).requires_grad_()
    with pytest.raises(ValueError, match="probability target's gradient"):
        softmax_gpu.cross_entropy(x, p, inplace_backward=True)


def test_loss_dtypes(device):
    """16-bit logits keep their float32 loss; float64 logits get a float64 one."""
    target = torch.tensor([1, 2], device=device)
    for dtype, loss_dtype in (
        (torch.float16, torch.float32), (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32), (torch.float64, torch.float64),
    ):  # fmt: skip
        loss = softmax_gpu.cross_entropy(torch.randn(2, 4, device=device).to(dtype), target, reduction="none")
        assert loss.dtype == loss_dtype, dtype
    assert np.isfinite(loss.cpu().numpy()).all()
