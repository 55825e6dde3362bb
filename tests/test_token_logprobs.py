"""token_logprobs / linear_token_logprobs against float64 torch (log_softmax(z / T).gather and
the entropy of the float64 softmax), outputs and gradients, for every dtype, temperatures
0.5, 1 and 2, single-block and looped rows (config.block_limit), 1-D/2-D/3-D inputs,
ignored positions, bad tokens and NaN rows; the linear form against F.linear then the same,
across several chunks (config.linear_limit)."""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from helpers import ATOL_16BIT, assert_matches, max_abs_err, poisoned

import softmax_gpu
from softmax_gpu import config
from softmax_gpu.ops import token_logprobs as tlp

N, V, H = 37, 300, 24
RTOL = 1e-5  # float32 against float64, relative to the largest element of the result
# One block a row; 64-wide blocks (five per row, the last partial); split rows: chunks of
# 48 columns in 16-wide blocks (7 a row, the last partial), merged in one combine step, and
# chunks of 16 (19 a row) merged 16 at a time (two steps).
PATHS = [None, 64, (48, 16), (16, 16)]


@contextlib.contextmanager
def path(limit):
    """limit: None, a block limit, or (chunk columns, block limit) to split every row."""
    chunk, block = limit if isinstance(limit, tuple) else (None, limit)
    with contextlib.ExitStack() as stack:
        if block:
            stack.enter_context(config.block_limit(block))
        stack.enter_context(config.force_split(chunk) if chunk else config.no_split())
        yield


def reference(z, tokens, temperature, ignore_index=-100):
    """float64 logprobs and entropy, 0 at ignored positions, NaN at bad tokens (as ours)."""
    logp = torch.log_softmax(z.double() / temperature, -1)
    counted = tokens != ignore_index
    in_range = (tokens >= 0) & (tokens < z.shape[-1])
    picked = logp.gather(-1, tokens.clamp(0, z.shape[-1] - 1).long().unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).nansum(-1)
    entropy = torch.where(logp.isnan().any(-1), float("nan"), entropy)
    bad = counted & ~in_range
    return (torch.where(counted, torch.where(bad, float("nan"), picked), 0.0),
            torch.where(counted, torch.where(bad, float("nan"), entropy), 0.0))  # fmt: skip


def grads(fn, z, u_lp, u_h):
    """Gradient of sum(u_lp * logprobs + u_h * entropy) (either factor None: that output unused)."""
    leaf = z.detach().clone().requires_grad_()
    lp, ent = fn(leaf)
    total = sum((u * out).sum() for u, out in ((u_lp, lp), (u_h, ent)) if u is not None)
    total.backward()
    return leaf.grad


def ours(tokens, temperature, **kw):
    return lambda z: softmax_gpu.token_logprobs(z, tokens, temperature=temperature, return_entropy=True, **kw)


def theirs(tokens, temperature, **kw):
    return lambda z: reference(z, tokens, temperature, **kw)


def close_fp32(got, want, what):
    want = want.detach()
    scale = float(want[want.isfinite()].abs().max()) if want.isfinite().any() else 1.0
    assert_matches(got.cpu(), want.detach().cpu().numpy(), rtol=RTOL, atol=RTOL * scale, what=what)


def inputs(device, dtype=torch.float32, shape=(N,), v=V):
    z = (3 * torch.randn(*shape, v, device=device)).to(dtype)
    tokens = torch.randint(0, v, shape, device=device)
    flat = tokens.view(-1)
    flat[:: max(1, flat.numel() // 3)] = -100  # a few ignored positions
    return z, tokens


@pytest.mark.parametrize("limit", PATHS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_matches_float64(temperature, limit, device):
    z, tokens = inputs(device)
    u_lp, u_h = torch.randn(N, device=device), torch.randn(N, device=device)
    with path(limit):
        lp, ent = ours(tokens, temperature)(z)
        got = {k: grads(ours(tokens, temperature), z, *u) for k, u in
               {"both": (u_lp, u_h), "logprobs": (u_lp, None), "entropy": (None, u_h)}.items()}  # fmt: skip
    ref_lp, ref_ent = reference(z.cpu(), tokens.cpu(), temperature)
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == ent.shape == (N,)
    close_fp32(lp, ref_lp, "logprobs")
    close_fp32(ent, ref_ent, "entropy")
    for k, (a, b) in {"both": (u_lp, u_h), "logprobs": (u_lp, None), "entropy": (None, u_h)}.items():
        up = [u.cpu().double() if u is not None else None for u in (a, b)]
        want = grads(theirs(tokens.cpu(), temperature), z.cpu().double(), *up)
        # The entropy's gradient p (log p + H) cancels in float32 wherever log p is near -H;
        # torch's float32 composition has the same cancellation: twice its error is allowed.
        torch32 = grads(theirs(tokens.cpu(), temperature), z.cpu(), *[u.float() if u is not None else None for u in up])
        scale = float(want.abs().max())
        budget = max(RTOL * scale, 2 * max_abs_err(torch32, want.numpy()))
        assert_matches(got[k].cpu(), want.numpy(), rtol=0.0, atol=budget, what=f"grad of {k}")
        assert not got[k][tokens == -100].any()  # ignored positions: no gradient


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_within_twice_torch_error(dtype, device):
    """Outputs float32 from 16-bit logits: exact to float32 (torch's own 16-bit composition
    rounds each step); the gradient, rounded once to 16 bits, within twice torch's error."""
    z, tokens = inputs(device, dtype)
    u_lp, u_h = torch.randn(N, device=device), torch.randn(N, device=device)
    lp, ent = ours(tokens, 1.0)(z)
    ref_lp, ref_ent = reference(z.cpu(), tokens.cpu(), 1.0)
    close_fp32(lp, ref_lp, "logprobs")
    close_fp32(ent, ref_ent, "entropy")
    g = grads(ours(tokens, 1.0), z, u_lp, u_h)
    assert g.dtype == dtype
    want = grads(theirs(tokens.cpu(), 1.0), z.cpu().double(), u_lp.cpu().double(), u_h.cpu().double())
    torch_g = grads(theirs(tokens.cpu(), 1.0), z.cpu(), u_lp.cpu().to(dtype), u_h.cpu().to(dtype))
    budget = 2 * max_abs_err(torch_g, want.numpy()) + ATOL_16BIT[dtype]
    assert_matches(g.cpu(), want.numpy(), rtol=0.0, atol=budget, what=f"{dtype} grad")


def test_float64_logits(device):
    z, tokens = inputs(device, torch.float64)
    lp, ent = ours(tokens, 0.7)(z)
    ref_lp, ref_ent = reference(z.cpu(), tokens.cpu(), 0.7)
    close_fp32(lp, ref_lp, "logprobs")
    close_fp32(ent, ref_ent, "entropy")
    g = grads(ours(tokens, 0.7), z, torch.ones(N, device=device, dtype=torch.float64), None)
    assert g.dtype == torch.float64
    close_fp32(g, grads(theirs(tokens.cpu(), 0.7), z.cpu(), torch.ones(N, dtype=torch.float64), None), "grad")


@pytest.mark.parametrize("shape", [(), (3, 7)])
def test_1d_and_3d(shape, device):
    z = 2 * torch.randn(*shape, 50, device=device)
    tokens = torch.randint(0, 50, shape, device=device)
    lp, ent = ours(tokens, 1.5)(z)
    ref_lp, ref_ent = reference(z.cpu(), tokens.cpu(), 1.5)
    assert lp.shape == ent.shape == shape
    close_fp32(lp, ref_lp, "logprobs")
    close_fp32(ent, ref_ent, "entropy")
    z_t = z.transpose(-1, -2).contiguous().transpose(-1, -2) if z.dim() > 1 else z  # strided class dim
    close_fp32(softmax_gpu.token_logprobs(z_t, tokens, temperature=1.5), ref_lp, "strided logprobs")


@pytest.mark.parametrize("limit", [None, (16, 16)])
def test_bad_tokens_nan_rows_and_poisoned_outputs(limit, device):
    """A token outside [0, V) gives NaN (never an address: the traffic test below); a NaN
    logit makes its row NaN, as torch; -inf logits are fine (p = 0, p log p = 0), split rows
    whose chunks see only -inf too."""
    z, tokens = inputs(device, v=40, shape=(6,))
    tokens[1], tokens[2] = 40, -5
    z[3, 4] = float("nan")
    z[4, :20] = float("-inf")
    tokens[4] = 35
    with path(limit):
        lp, ent = ours(tokens, 1.0)(z)
        g = grads(ours(tokens, 1.0), z, torch.ones(6, device=device), torch.ones(6, device=device))
    assert lp[1].isnan() and lp[2].isnan() and ent[1].isnan() and lp[3].isnan() and ent[3].isnan()
    ref_lp, ref_ent = reference(z[4:5].cpu(), tokens[4:5].cpu(), 1.0)
    close_fp32(lp[4:5], ref_lp, "-inf row logprob")
    close_fp32(ent[4:5], ref_ent, "-inf row entropy")
    assert g[1].isnan().all() and g[3].isnan().all() and g[4].isfinite().all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's bounds check")
def test_never_out_of_bounds():
    from softmax_gpu.traffic import TrafficCounter

    z = torch.randn(4, 40)
    tokens = torch.tensor([3, 40, -100, -7])
    out = [poisoned((4,), torch.float32, "cpu") for _ in range(2)] + [poisoned((8,), torch.float32, "cpu")]
    grad = poisoned((4, 40), torch.float32, "cpu")
    u = torch.ones(4)
    buffers = [z, tokens, *out, grad, u]
    with config.block_limit(16), TrafficCounter(buffers=buffers) as fwd:
        tlp.launch_forward(z, tokens, out[0], out[1], out[2], 1.0, -100)
    with config.block_limit(16), TrafficCounter(buffers=buffers) as bwd:
        tlp.launch_backward(z, tokens, out[2], out[1], u, u, grad, 1.0, -100)
    assert not out[2].isnan().any() and out[0][0].isfinite() and out[0][1].isnan() and out[0][2] == 0
    # Exact traffic: the forward reads the logits once, plus per row its token (8 bytes) and,
    # for a counted in-range token, that logit again (row 0 only here); it writes 4 floats
    # a row (logprob, entropy, m, log d). The backward reads the logits once and writes the
    # gradient once, plus per row the token, m, log d, entropy and two upstream factors.
    row_bytes = z.numel() * 4
    assert fwd.bytes_loaded == row_bytes + 4 * 8 + 1 * 4 and fwd.bytes_stored == 4 * 4 * 4
    assert bwd.bytes_loaded == row_bytes + 4 * (8 + 5 * 4) and bwd.bytes_stored == row_bytes

    # Split rows (3 chunks of 16 columns a row): the same, plus each chunk's 3 partials
    # written once and read once, and the backward's per-row values read by every chunk.
    # (Counted without the bounds check: the partials are allocated inside the launcher.)
    for t in out + [grad]:
        t.fill_(float("nan"))
    with config.block_limit(16), config.force_split(16), TrafficCounter() as fwd:
        tlp.launch_forward(z, tokens, out[0], out[1], out[2], 1.0, -100)
    with config.block_limit(16), config.force_split(16), TrafficCounter() as bwd:
        tlp.launch_backward(z, tokens, out[2], out[1], u, u, grad, 1.0, -100)
    partials = 4 * 3 * 3 * 4
    assert not out[2].isnan().any() and out[0][1].isnan() and out[0][2] == 0 and not grad[0].isnan().any()
    assert fwd.bytes_loaded == row_bytes + 4 * 8 + 1 * 4 + partials
    assert fwd.bytes_stored == 4 * 4 * 4 + partials
    assert bwd.bytes_loaded == row_bytes + 3 * 4 * (8 + 5 * 4) and bwd.bytes_stored == row_bytes


def test_bad_input_raises_before_launch(device):
    z, tokens = inputs(device, shape=(4,), v=10)
    fn = "softmax_gpu.token_logprobs"
    cases = [
        (dict(logits=z.long(), tokens=tokens), TypeError, "floating-point"),
        (dict(logits=z, tokens=tokens.float()), TypeError, "int64 or int32"),
        (dict(logits=z, tokens=tokens[:3]), ValueError, "tokens must have shape"),
        (dict(logits=z, tokens=tokens, temperature=0.0), ValueError, "temperature must be a finite number > 0"),
        (dict(logits=z, tokens=tokens, temperature=torch.tensor(1.0)), TypeError, "temperature must be a float"),
        (dict(logits=z, tokens=tokens, ignore_index=1.5), TypeError, "ignore_index must be an int"),
        (dict(logits=z[:, :0], tokens=tokens), ValueError, "at least one class"),
        (dict(logits=z, tokens=tokens.to("meta")), RuntimeError, "same device"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match) as info:
            softmax_gpu.token_logprobs(**kwargs)
        assert fn in str(info.value), kwargs


def test_opcheck_and_compile(device):
    z, tokens = inputs(device, shape=(5,), v=30)
    for entropy in (True, False):
        torch.library.opcheck(torch.ops.softmax_gpu.token_logprobs_forward.default, (z, tokens, 0.5, -100, entropy))
    lp, ent, stats = tlp.token_logprobs_forward(z, tokens, 0.5, -100, True)
    u = torch.randn(5, device=device)
    for g_lp, g_h in ((u, u), (u, None), (None, u)):
        torch.library.opcheck(torch.ops.softmax_gpu.token_logprobs_backward.default,
                              (z, tokens, stats, ent, g_lp, g_h, 0.5, -100, 0, 30))  # fmt: skip

    def step(z, t):
        lp, ent = softmax_gpu.token_logprobs(z, t, temperature=0.5, return_entropy=True)
        return (lp * 2 - 0.1 * ent).sum()

    leaf = z.clone().requires_grad_()
    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(leaf, tokens)
    loss.backward()
    eager_leaf = z.clone().requires_grad_()
    step(eager_leaf, tokens).backward()
    torch.testing.assert_close(loss, step(z, tokens), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(leaf.grad, eager_leaf.grad, rtol=1e-6, atol=1e-7)


def test_vocab_parallel_checks_and_partials_op(device):
    """vocab_parallel_token_logprobs checks its input before it looks for a process group;
    its partials op passes opcheck (the multi-rank results: tests/test_distributed.py)."""
    from softmax_gpu.distributed import vocab_parallel_token_logprobs
    from softmax_gpu.ops import vocab_parallel_token_logprobs as vp

    z, tokens = inputs(device, shape=(5,), v=30)
    with pytest.raises(ValueError, match="tokens must have shape"):
        vocab_parallel_token_logprobs(z, tokens[:3])
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        vocab_parallel_token_logprobs(z, tokens, temperature=-1.0)
    with pytest.raises(RuntimeError, match="process group is not initialised"):
        vocab_parallel_token_logprobs(z, tokens)
    for entropy in (True, False):
        torch.library.opcheck(vp.token_logprobs_partials, (z, 0.5, entropy))
    with config.block_limit(16), config.force_split(16):
        partials = vp.token_logprobs_partials(z, 1.0, True)
    assert partials.shape == (5, 2, 3)
    lse = partials[..., 0].amax(1) + torch.log((partials[..., 1] * (partials[..., 0] - partials[..., 0].amax(1, True)).exp()).sum(1))
    torch.testing.assert_close(lse, torch.logsumexp(z, -1), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------
# From hidden states
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [None, (8, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_float64(bias, limit, device):
    x = torch.randn(N, H, device=device)
    w = torch.randn(V, H, device=device) / 3
    b = torch.randn(V, device=device) if bias else None
    _, tokens = inputs(device)
    u_lp, u_h = torch.randn(N, device=device), torch.randn(N, device=device)
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    with config.linear_limit(*limit) if limit else contextlib.nullcontext():
        lp, ent = softmax_gpu.linear_token_logprobs(leaves[0], leaves[1], tokens, linear_bias=leaves[2],
                                                    temperature=0.7, return_entropy=True)  # fmt: skip
        (lp * u_lp + ent * u_h).sum().backward()
    ref = [t.detach().cpu().double().requires_grad_() if t is not None else None for t in (x, w, b)]
    ref_lp, ref_ent = reference(F.linear(*ref), tokens.cpu(), 0.7)
    (ref_lp * u_lp.cpu().double() + ref_ent * u_h.cpu().double()).sum().backward()
    close_fp32(lp, ref_lp, "logprobs")
    close_fp32(ent, ref_ent, "entropy")
    for what, got, want in zip(("dx", "dw", "db"), leaves, ref):
        if want is not None:
            close_fp32(got.grad, want.grad, what)


def test_linear_bf16_and_logprobs_alone(device):
    x = torch.randn(N, H, device=device).bfloat16()
    w = (torch.randn(V, H, device=device) / 3).bfloat16()
    _, tokens = inputs(device)
    xs = x.clone().requires_grad_()
    softmax_gpu.linear_token_logprobs(xs, w, tokens).sum().backward()
    ref_x = x.cpu().double().requires_grad_()
    ref_lp, _ = reference(F.linear(ref_x, w.cpu().double()), tokens.cpu(), 1.0)
    ref_lp.sum().backward()
    torch_x = x.cpu().requires_grad_()
    torch_lp, _ = reference(F.linear(torch_x, w.cpu()).float(), tokens.cpu(), 1.0)  # bf16 logits, as F.linear
    torch_lp.sum().backward()
    assert xs.grad.dtype == torch.bfloat16
    budget = 2 * max_abs_err(torch_x.grad, ref_x.grad.numpy()) + ATOL_16BIT[torch.bfloat16]
    assert_matches(xs.grad.cpu(), ref_x.grad.numpy(), rtol=0.0, atol=budget, what="bf16 dx")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU allocator's profile")
def test_linear_allocates_no_n_by_v():
    from test_linear_cross_entropy import largest_allocation

    n, v, h, budget = 128, 2048, 16, 256 << 10
    x, w = torch.randn(n, h), torch.randn(v, h) / 4
    tokens = torch.randint(0, v, (n,))

    def run():
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        lp, ent = softmax_gpu.linear_token_logprobs(xs, ws, tokens, return_entropy=True, buffer_bytes=budget)
        (lp + ent).sum().backward()

    assert largest_allocation(run) <= max(budget, v * h * 4) < n * v * 4 / 2


def test_linear_opcheck(device):
    x, w, b = torch.randn(5, 16, device=device), torch.randn(30, 16, device=device), torch.randn(30, device=device)
    tokens = torch.tensor([0, 29, -100, 3, 3], device=device)
    with config.linear_limit(2, 16):
        args = (x, w, b, tokens, 0.5, -100, True)
        torch.library.opcheck(torch.ops.softmax_gpu.linear_token_logprobs_forward.default, args)
        lp, ent, stats = tlp.linear_token_logprobs_forward(*args)
        u = torch.randn(5, device=device)
        for g_lp, g_h, needs in ((u, u, (True, True, True)), (None, u, (False, True, False))):
            torch.library.opcheck(torch.ops.softmax_gpu.linear_token_logprobs_backward.default,
                                  (x, w, b, tokens, stats, ent, g_lp, g_h, 0.5, -100, *needs))  # fmt: skip


def test_grpo_example_runs_tiny():
    """examples/grpo_step.py at a tiny size: torch ops and the fused functions agree per step."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run([sys.executable, str(root / "examples" / "grpo_step.py"), "--steps", "2", "--seq", "8",
                          "--vocab", "100"], capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "largest difference" in out.stdout


def test_bench_dry_run(tmp_path):
    """python -m bench.logprobs --dry-run: every provider that imports here gated ok on every
    op (the linear form's on dX and dW), rows written with both clocks named (no GPU figure
    claimed)."""
    import json

    from bench import logprobs

    assert logprobs.main(["--dry-run", "--repeats", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "logprobs.json").read_text())["results"]
    assert {(r["op"], r["provider"]) for r in rows} >= {(op, p) for op in logprobs.ALL_OPS for p in ("softmax_gpu", "torch")}
    assert all(r["min_flops"] == 3 * 2 * 64 * 500 * 32 for r in rows if r["op"] == "linear_logprobs_fwd_bwd")
    assert all(r["status"] == "ok" and r["gate"].startswith("ok") for r in rows), rows
    assert logprobs.min_bytes("logprobs_fwd_bwd", 4, 10) == 3 * 4 * 10 * 2
