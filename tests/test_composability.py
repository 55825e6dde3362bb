"""The ops inside the rest of PyTorch: torch.func transforms, activation checkpointing,
torch.compile with every option, CUDA graphs (GPU only).

torch.func: vmap, grad, jacrev (and jacfwd, hessians for softmax and log_softmax) against
torch's own ops in float64; a second derivative of an op whose backward kernel is not
differentiable again raises instead of coming out zero. Checkpointing: reentrant and
non-reentrant, every gradient mode (stored, deferred, in place), the same gradients as
without it.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, hessian, jacfwd, jacrev, vmap
from torch.utils.checkpoint import checkpoint

import softmax_gpu

B, N, V, H = 3, 5, 11, 6
CLOSE = dict(rtol=1e-10, atol=1e-12)  # float64 against float64


def data(device, dtype=torch.float64):
    x = 3 * torch.randn(B, N, V, device=device, dtype=dtype)
    t = torch.randint(0, V, (B, N), device=device)
    t[0, 1] = -100
    return x, t


# ---------------------------------------------------------------------------------------
# torch.func
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_func_softmax_every_transform(name, device):
    ours, theirs = getattr(softmax_gpu, name), getattr(torch, name)
    x, _ = data(device)
    torch.testing.assert_close(vmap(ours)(x), theirs(x, -1), **CLOSE)
    torch.testing.assert_close(vmap(lambda r: ours(r, 0), in_dims=2)(x), theirs(x, 0).movedim(2, 0), **CLOSE)
    weights = torch.arange(V, device=device, dtype=x.dtype)

    def scalar(fn):
        return lambda v: (fn(v, -1) * weights).sum()

    row = x[0, 0]
    for transform in (grad, jacrev, jacfwd, hessian):
        torch.testing.assert_close(transform(scalar(ours))(row), transform(scalar(theirs))(row), **CLOSE)
    torch.testing.assert_close(jacrev(lambda v: ours(v, -1))(x[0]), jacrev(lambda v: theirs(v, -1))(x[0]), **CLOSE)
    per_sample = vmap(grad(scalar(ours)))(x.reshape(-1, V))
    torch.testing.assert_close(per_sample, vmap(grad(scalar(theirs)))(x.reshape(-1, V)), **CLOSE)
    scalars = x[0, 0]  # a 0-d sample: a row of one
    torch.testing.assert_close(vmap(lambda r: ours(r, 0))(scalars), vmap(lambda r: theirs(r, 0))(scalars), **CLOSE)
    torch.testing.assert_close(vmap(grad(lambda r: ours(r, 0) * r))(scalars),
                               vmap(grad(lambda r: theirs(r, 0) * r))(scalars), **CLOSE)  # fmt: skip


def test_create_graph_second_derivatives(device):
    """Plain autograd with create_graph=True (a Hessian-vector product): softmax and
    log_softmax give torch's second derivatives; the first-order ops raise at the backward
    instead of silently dropping their term."""
    x, t = data(device)
    w = torch.randn_like(x)
    for ours, theirs in ((softmax_gpu.softmax, torch.softmax), (softmax_gpu.log_softmax, torch.log_softmax)):
        hvps = []
        for fn in (ours, theirs):
            leaf = x.clone().requires_grad_()
            (g,) = torch.autograd.grad((fn(leaf, -1) * w).sum(), leaf, create_graph=True)
            hvps.append(torch.autograd.grad((g * w).sum(), leaf)[0])
        torch.testing.assert_close(*hvps, **CLOSE)
    leaf = x[0].clone().requires_grad_()
    for loss in (lambda: softmax_gpu.cross_entropy(leaf, t[0]), lambda: softmax_gpu.token_logprobs(leaf, t[0].clamp(min=0)).sum(),
                 lambda: softmax_gpu.cross_entropy(leaf.float(), t[0])):  # fmt: skip
        with pytest.raises(RuntimeError, match="create_graph=True is not supported"):
            torch.autograd.grad(loss(), leaf, create_graph=True)


def _torch_ce(x, t, **kw):
    return F.cross_entropy(x, t, **kw)


@pytest.mark.parametrize("options", [dict(reduction="mean"), dict(reduction="sum", label_smoothing=0.1),
                                     dict(reduction="none", z_loss=1e-2), dict(reduction="mean", weight=True)])  # fmt: skip
def test_func_cross_entropy_per_sample_gradients(options, device):
    """vmap(grad(loss)): one gradient per sample (each sample's own mean), as torch's."""
    x, t = data(device)
    kw = dict(options)
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(V, device=device, dtype=x.dtype) + 0.5
    z_loss = kw.pop("z_loss", 0.0)

    def ours(logits, target):
        loss = softmax_gpu.cross_entropy(logits, target, z_loss=z_loss, **kw)
        return loss.sum() if loss.dim() else loss

    def theirs(logits, target):
        loss = _torch_ce(logits, target, reduction="none" if z_loss else kw.get("reduction", "mean"),
                         **{k: v for k, v in kw.items() if k != "reduction"})  # fmt: skip
        if z_loss:
            lse = torch.logsumexp(logits, -1)
            loss = loss + z_loss * torch.where(target != -100, lse * lse, 0.0)
        return loss.sum() if loss.dim() else loss

    torch.testing.assert_close(vmap(ours)(x, t), vmap(theirs)(x, t), **CLOSE)
    torch.testing.assert_close(vmap(grad(ours))(x, t), vmap(grad(theirs))(x, t), **CLOSE)
    torch.testing.assert_close(jacrev(ours)(x[0], t[0]), jacrev(theirs)(x[0], t[0]), **CLOSE)
    if kw.get("reduction") == "none":
        per_row = lambda a: softmax_gpu.cross_entropy(a, t[0], reduction="none", z_loss=z_loss)  # noqa: E731
        assert jacrev(per_row)(x[0]).shape == (N, N, V)


def test_func_second_derivatives_and_forward_mode_raise(device):
    """cross_entropy's and token_logprobs' backward kernels are first order: a second
    derivative raises (it would otherwise come out zero), and so does forward mode (jacfwd,
    hessian), which they do not implement."""
    x, t = data(device)
    for fn in (lambda v: softmax_gpu.cross_entropy(v, t[0]),
               lambda v: softmax_gpu.token_logprobs(v, t[0].clamp(min=0)).sum()):  # fmt: skip
        with pytest.raises(RuntimeError, match="second derivative"):
            jacrev(jacrev(fn))(x[0])
        with pytest.raises(RuntimeError, match="second derivative"):
            grad(lambda v: grad(fn)(v).sum())(x[0])
        with pytest.raises(NotImplementedError, match="jvp"):
            jacfwd(fn)(x[0])


def test_func_token_logprobs(device):
    x, t = data(device)
    t = t.clamp(min=0)
    u = torch.randn(B, N, device=device, dtype=x.dtype)

    def ours(z, tok, w):
        lp, ent = softmax_gpu.token_logprobs(z, tok, temperature=0.7, return_entropy=True)
        return (lp * w).sum() - 0.1 * ent.sum()

    def theirs(z, tok, w):
        logp = torch.log_softmax(z / 0.7, -1)
        return (logp.gather(-1, tok[..., None])[..., 0] * w).sum() + 0.1 * (logp.exp() * logp).sum()

    torch.testing.assert_close(vmap(ours)(x, t, u), vmap(theirs)(x, t, u), rtol=1e-6, atol=1e-6)  # float32 outputs
    # float32 accumulation (token_logprobs' for every dtype) against float64: 2e-6 of the
    # gradient's scale (the entropy term's p (log p + H) cancels; seed 1089966261 put one
    # element 1.9e-7 off at a scale near 1)
    want = vmap(grad(theirs))(x, t, u)
    torch.testing.assert_close(vmap(grad(ours))(x, t, u), want, rtol=0, atol=2e-6 * float(want.abs().max()))
    lp = vmap(lambda z, tok: softmax_gpu.token_logprobs(z, tok))(x, t)
    torch.testing.assert_close(lp.double(), torch.log_softmax(x, -1).gather(-1, t[..., None])[..., 0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_func_linear_cross_entropy_and_linear_token_logprobs(dtype, device):
    """Under torch.func the linear forms make the logits (documented) and take the torch.func
    paths above: per-sample gradients of the hidden states and of the head."""
    hidden = torch.randn(B, N, H, device=device, dtype=dtype)
    w = torch.randn(V, H, device=device, dtype=dtype)
    _, t = data(device)

    def ours(h, w, tok):
        return softmax_gpu.linear_cross_entropy(h, w, tok)

    def theirs(h, w, tok):
        return F.cross_entropy(F.linear(h, w), tok)

    tol = CLOSE if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    got = vmap(grad(ours, argnums=(0, 1)), in_dims=(0, None, 0))(hidden, w, t)
    want = vmap(grad(theirs, argnums=(0, 1)), in_dims=(0, None, 0))(hidden, w, t)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol)
    if dtype == torch.float64:
        return  # linear_token_logprobs takes 16- and 32-bit inputs only
    tok = t.clamp(min=0)
    lp = vmap(lambda h, k: softmax_gpu.linear_token_logprobs(h, w, k), in_dims=(0, 0))(hidden, tok)
    want_lp = torch.log_softmax(F.linear(hidden, w).double(), -1).gather(-1, tok[..., None])[..., 0]
    torch.testing.assert_close(lp.double(), want_lp, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Activation checkpointing
# ---------------------------------------------------------------------------------------

CASES = {
    "softmax": lambda z, t: (softmax_gpu.softmax(z) * torch.arange(V, dtype=z.dtype, device=z.device)).sum(),
    "log_softmax": lambda z, t: softmax_gpu.log_softmax(z).sum(-1).square().sum(),
    "cross_entropy": lambda z, t: softmax_gpu.cross_entropy(z, t),
    "cross_entropy inplace": lambda z, t: softmax_gpu.cross_entropy(z, t, inplace_backward=True),
    "cross_entropy none": lambda z, t: (softmax_gpu.cross_entropy(z, t, reduction="none") * 1.5).sum(),
    "token_logprobs": lambda z, t: sum(o.sum() for o in softmax_gpu.token_logprobs(z, t.clamp(min=0),
                                                                                    return_entropy=True)),  # fmt: skip
}


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # float32: stored gradients; float64: deferred
@pytest.mark.parametrize("case", sorted(CASES))
def test_activation_checkpointing(case, dtype, reentrant, device):
    """A block (a linear layer, then the op) under torch.utils.checkpoint, whose forward runs
    again in the backward: the same gradients as without checkpointing, and no error about
    saved tensors modified in place."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(H, V).to(device=device, dtype=dtype)
    x = torch.randn(2 * N, H, device=device, dtype=dtype)
    t = torch.randint(0, V, (2 * N,), device=device)
    t[3] = -100

    def block(inp):
        return CASES[case](layer(inp), t)

    grads = []
    for wrapped in (False, True):
        layer.zero_grad()
        leaf = x.clone().requires_grad_()
        loss = checkpoint(block, leaf, use_reentrant=reentrant) if wrapped else block(leaf)
        loss.backward()
        grads.append((leaf.grad, layer.weight.grad.clone(), layer.bias.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("mode", ["speed", "low_memory"])
def test_activation_checkpointing_linear_forms(mode, reentrant, device):
    torch.manual_seed(0)
    w = torch.randn(V, H, device=device, requires_grad=True)
    x = torch.randn(2 * N, H, device=device)
    t = torch.randint(0, V, (2 * N,), device=device)

    def block(inp):
        lp, ent = softmax_gpu.linear_token_logprobs(torch.tanh(inp), w, t, return_entropy=True)
        return softmax_gpu.linear_cross_entropy(torch.tanh(inp), w, t, mode=mode) + lp.sum() + 0.1 * ent.sum()

    grads = []
    for wrapped in (False, True):
        w.grad = None
        leaf = x.clone().requires_grad_()
        (checkpoint(block, leaf, use_reentrant=reentrant) if wrapped else block(leaf)).backward()
        grads.append((leaf.grad, w.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------
# torch.compile with every option
# ---------------------------------------------------------------------------------------


COMPILED = {
    "softmax": lambda z, t, w: (softmax_gpu.softmax(z) * 2).sum(),
    "log_softmax": lambda z, t, w: softmax_gpu.log_softmax(z, dtype=torch.float64).sum(),
    "cross_entropy inplace": lambda z, t, w: softmax_gpu.cross_entropy(z, t, label_smoothing=0.1, inplace_backward=True),
    "cross_entropy options": lambda z, t, w: softmax_gpu.cross_entropy(z, t, weight=torch.ones(V, device=z.device),
                                                                       z_loss=1e-3, softcap=5.0, reduction="sum"),
    "cross_entropy probabilities": lambda z, t, w: softmax_gpu.cross_entropy(z, torch.softmax(z.detach(), -1)),
    "token_logprobs": lambda z, t, w: sum(o.sum() for o in softmax_gpu.token_logprobs(z, t.clamp(min=0), temperature=0.7,
                                                                                       return_entropy=True)),
    "linear_cross_entropy": lambda z, t, w: softmax_gpu.linear_cross_entropy(z[:, :H], w, t, mode="speed"),
    "linear_cross_entropy low_memory": lambda z, t, w: softmax_gpu.linear_cross_entropy(z[:, :H], w, t,
                                                                                        mode="low_memory"),
    "linear_token_logprobs": lambda z, t, w: softmax_gpu.linear_token_logprobs(z[:, :H], w, t.clamp(min=0)).sum(),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(COMPILED))
def test_compile_every_op_fullgraph_dynamic_rows(case, device):
    """torch.compile(fullgraph=True, dynamic=True): two row counts through one compiled
    function, loss and gradients as eager (a linear layer in front, so that in-place
    gradients overwrite an activation, not a leaf)."""
    torch._dynamo.reset()  # every case compiles the same `step` code: keep its recompile count its own
    torch.manual_seed(0)
    layer = torch.nn.Linear(H, V).to(device)
    w = torch.randn(V, H, device=device)

    def step(inp, target):
        return COMPILED[case](layer(inp), target, w)

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for rows in (7, 12):
        inp = torch.randn(rows, H, device=device)
        target = torch.randint(0, V, (rows,), device=device)
        target[1] = -100
        grads = []
        for fn in (step, compiled):
            layer.zero_grad()
            leaf = inp.clone().requires_grad_()
            loss = fn(leaf, target)
            loss.backward()
            grads.append((loss.detach(), leaf.grad, layer.weight.grad.clone()))
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_inplace_refuses_what_eager_refuses(device):
    """inplace_backward=True on logits whose rows are not a view (a transpose): the same
    ValueError compiled as eager (the check reads strides, which dynamo traces)."""
    z = torch.randn(V, N, device=device).requires_grad_()
    t = torch.randint(0, V, (N,), device=device)
    logits = lambda: (z * 1.0).t()  # noqa: E731
    with pytest.raises(ValueError, match="class dim has stride 1"):
        softmax_gpu.cross_entropy(logits(), t, inplace_backward=True)
    with pytest.raises(Exception, match="class dim has stride 1"):
        torch.compile(lambda: softmax_gpu.cross_entropy(logits(), t, inplace_backward=True), fullgraph=True)()


# ---------------------------------------------------------------------------------------
# CUDA graphs (GPU only; bench/device_check.sh runs them)
# ---------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("case", sorted(CASES) + ["linear_cross_entropy", "linear_cross_entropy low_memory",
                                                   "linear_token_logprobs"])  # fmt: skip
def test_cuda_graph_capture_and_replay(case):
    """Forward + backward captured once in a torch.cuda.CUDAGraph, replayed on new data: the
    same loss and gradient as an eager call on that data."""
    torch.manual_seed(0)
    dev = "cuda"
    w = torch.randn(V, H, device=dev)
    x_static = torch.randn(64, H, device=dev)
    t_static = torch.randint(0, V, (64,), device=dev)
    t_static[::7] = -100

    def run(x, t):
        leaf = x.detach().requires_grad_()
        if case.startswith("linear_cross_entropy"):
            mode = "low_memory" if "low_memory" in case else "speed"
            loss = softmax_gpu.linear_cross_entropy(leaf, w, t, mode=mode)
        elif case == "linear_token_logprobs":
            lp, ent = softmax_gpu.linear_token_logprobs(leaf, w, t.clamp(min=0), return_entropy=True)
            loss = lp.sum() + 0.1 * ent.sum()
        else:
            loss = CASES[case](F.linear(leaf, w), t)
        (g,) = torch.autograd.grad(loss, leaf)
        return loss.detach(), g

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up: Triton compiles, the allocator settles
            run(x_static, t_static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss, static_grad = run(x_static, t_static)
    new_x, new_t = torch.randn_like(x_static), torch.randint(0, V, (64,), device=dev)
    new_t[::5] = -100  # a different count of ignored rows than at capture: the mean's divisor too
    x_static.copy_(new_x)
    t_static.copy_(new_t)
    graph.replay()
    torch.cuda.synchronize()
    want_loss, want_grad = run(new_x, new_t)
    torch.testing.assert_close(static_loss, want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(static_grad, want_grad, rtol=1e-5, atol=1e-6)
