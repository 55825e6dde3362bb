"""Vocab-parallel linear cross-entropy on 2 and 3 gloo ranks against the one-process answer.

The ranks are spawned with test_distributed.py's helpers (one spawn per test, several cases
inside). Every rank builds the same full problem (input, LM head, bias, class weights) from
the parent's seed, takes its rows of the head, and checks the loss, the full input gradient
and the gathered weight/bias gradients against softmax_gpu.linear_cross_entropy on the
full problem and a float64 torch reference; the collectives of each forward and backward
are pinned. A test without processes runs the same kernels on simulated shards.
"""
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import assert_matches, to_f64
from test_distributed import count_collectives, device, needs_gloo, run_ranks

RTOL, ATOL = 1e-5, 1e-6  # float32 products summed in another order than the one-process kernel's
N_ROWS, HIDDEN = 5, 8
SUM, MAX = str(dist.ReduceOp.SUM), str(dist.ReduceOp.MAX)


def torch_reference(x, w, b, target, weight, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                    softcap=None):  # fmt: skip
    """The loss in float64 torch: F.linear, the soft cap, F.cross_entropy, and the z-loss."""
    shape = target.shape
    z = F.linear(x.reshape(-1, x.shape[-1]), w, b)
    target = target.reshape(-1)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    ce = F.cross_entropy(z, target, weight=weight, ignore_index=ignore_index, reduction="none",
                         label_smoothing=label_smoothing)  # fmt: skip
    valid = target != ignore_index
    w_t = torch.where(valid, 1.0 if weight is None else weight[target.clamp(0, z.shape[1] - 1)], 0.0).to(z.dtype)
    per_row = ce + z_loss * w_t * torch.logsumexp(z, -1) ** 2
    if reduction == "none":
        return per_row.view(shape)
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / w_t.sum()


def cases(n_classes, dev):
    weight = torch.rand(n_classes, device=dev) + 0.1
    return [
        dict(what="plain mean", reduction="mean"),
        dict(what="all options sum", reduction="sum", bias=True, weight=weight, label_smoothing=0.1, z_loss=1e-3,
             softcap=5.0, ignore_index=2),  # fmt: skip
        dict(what="none, upstream, (2, 3, H) input", reduction="none", bias=True, batch=(2, 3), ignore_index=-1),
        dict(what="weights and smoothing mean", reduction="mean", weight=weight, label_smoothing=0.2),
    ]


def run_case(rank, world, n_classes, starts, case, first):
    import softmax_gpu
    from softmax_gpu.distributed import vocab_parallel_linear_cross_entropy

    dev = device()
    case = dict(case)
    what = case.pop("what")
    batch = case.pop("batch", (N_ROWS,))
    has_bias = case.pop("bias", False)
    weight = case.pop("weight", None)
    n_rows = int(np.prod(batch))
    x_full = torch.randn(*batch, HIDDEN, device=dev)
    w_full = torch.randn(n_classes, HIDDEN, device=dev) / 2
    b_full = torch.randn(n_classes, device=dev) if has_bias else None
    target = torch.randint(0, n_classes, batch, device=dev)
    flat = target.view(-1)
    flat[0] = n_classes - 1  # on the last shard
    flat[1] = case.get("ignore_index", -100)
    flat[2] = 0  # on the first shard
    if case.get("ignore_index") == 2:
        flat[3] = 2  # ignore_index is a class: that row is ignored
    upstream = torch.randn(batch, device=dev) if case["reduction"] == "none" else None

    if starts is None:
        size = n_classes // world
        start, stop, vocab_start = rank * size, (rank + 1) * size, None
    else:
        start, stop = starts[rank][0], starts[rank][0] + starts[rank][1]
        vocab_start = start
    x = x_full.clone().requires_grad_()
    w = w_full[start:stop].clone().requires_grad_()
    b = b_full[start:stop].clone().requires_grad_() if has_bias else None
    with count_collectives() as forward_calls:
        loss = vocab_parallel_linear_cross_entropy(
            x, w, target, vocab_start=vocab_start, linear_bias=b,
            weight=None if weight is None else weight[start:stop], **case,
        )  # fmt: skip
    with count_collectives() as backward_calls:
        loss.backward(torch.ones_like(loss) if upstream is None else upstream)

    # The collectives: O(N) numbers in the forward, one N x H all-reduce in the backward.
    k = 2 + (weight is not None) + 2 * (case.get("label_smoothing", 0) > 0)
    expected_forward = [("all_reduce", MAX, n_rows, torch.float32), ("all_reduce", SUM, n_rows * k, torch.float32)]
    if first:
        expected_forward.insert(0, ("all_gather", "None", 3, torch.int64))  # the layout check, then cached
    assert forward_calls == expected_forward, f"{what}: forward collectives {forward_calls}"
    assert backward_calls == [("all_reduce", SUM, n_rows * HIDDEN, torch.float32)], f"{what}: {backward_calls}"

    # One process, our kernels.
    x1 = x_full.clone().requires_grad_()
    w1 = w_full.clone().requires_grad_()
    b1 = b_full.clone().requires_grad_() if has_bias else None
    expected = softmax_gpu.linear_cross_entropy(x1, w1, target, linear_bias=b1, weight=weight, **case)
    expected.backward(torch.ones_like(expected) if upstream is None else upstream)
    # float64 torch.
    f64 = dict(dtype=torch.float64)
    x64 = x_full.to(**f64).requires_grad_()
    w64 = w_full.to(**f64).requires_grad_()
    b64 = b_full.to(**f64).requires_grad_() if has_bias else None
    ref = torch_reference(x64, w64, b64, target, None if weight is None else weight.to(**f64), **case)
    ref.backward(torch.ones_like(ref) if upstream is None else upstream.to(**f64))

    assert loss.dtype == torch.float32 and loss.shape == expected.shape, f"{what}: {loss.dtype} {loss.shape}"
    assert_matches(loss, to_f64(expected), RTOL, ATOL, what=f"{what}: loss vs linear_cross_entropy")
    assert_matches(loss, to_f64(ref), RTOL, ATOL, what=f"{what}: loss vs float64")
    assert_matches(x.grad, to_f64(x1.grad), RTOL, ATOL, what=f"{what}: dX vs linear_cross_entropy")
    assert_matches(x.grad, to_f64(x64.grad), RTOL, ATOL, what=f"{what}: dX vs float64")
    assert_matches(w.grad, to_f64(w64.grad[start:stop]), RTOL, ATOL, what=f"{what}: dW shard vs float64")

    # Every rank holds the same loss and dX bits; the shards put together are the full dW, db.
    gathered = [None] * world
    shard_b = b.grad.detach().cpu() if has_bias else None
    dist.all_gather_object(gathered, (start, loss.detach().cpu(), x.grad.cpu(), w.grad.detach().cpu(), shard_b))
    for _, other_loss, other_dx, _, _ in gathered:
        torch.testing.assert_close(other_loss, loss.detach().cpu(), rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(other_dx, x.grad.cpu(), rtol=0, atol=0)
    gathered.sort(key=lambda item: item[0])
    dw = torch.cat([item[3] for item in gathered])
    assert_matches(dw, to_f64(w1.grad), RTOL, ATOL, what=f"{what}: gathered dW vs linear_cross_entropy")
    assert_matches(dw, to_f64(w64.grad), RTOL, ATOL, what=f"{what}: gathered dW vs float64")
    if has_bias:
        db = torch.cat([item[4] for item in gathered])
        assert_matches(db, to_f64(b1.grad), RTOL, ATOL, what=f"{what}: gathered db vs linear_cross_entropy")
        assert_matches(db, to_f64(b64.grad), RTOL, ATOL, what=f"{what}: gathered db vs float64")


def _cases_worker(rank, world, n_classes, starts):
    for i, case in enumerate(cases(n_classes, device())):
        run_case(rank, world, n_classes, starts, case, first=i == 0)


@needs_gloo
def test_two_ranks_equal_shards():
    run_ranks(2, _cases_worker, 38, None)  # 19 classes a rank, vocab_start=None


@needs_gloo
def test_three_ranks_uneven_shards():
    run_ranks(3, _cases_worker, 37, [(25, 12), (0, 10), (10, 15)])  # explicit starts, not in rank order


def test_checks_before_any_collective():
    from softmax_gpu.distributed import vocab_parallel_linear_cross_entropy

    x, w = torch.randn(4, 8), torch.randn(6, 8)
    with pytest.raises(TypeError, match="class indices"):
        vocab_parallel_linear_cross_entropy(x, w, torch.rand(4, 6))
    with pytest.raises(ValueError, match="linear_weight must have shape"):
        vocab_parallel_linear_cross_entropy(x, torch.randn(6, 7), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_start must be >= 0"):
        vocab_parallel_linear_cross_entropy(x, w, torch.zeros(4, dtype=torch.long), vocab_start=-1)
    if dist.is_available() and not dist.is_initialized():
        with pytest.raises(RuntimeError, match="vocab_parallel_linear_cross_entropy.*not initialised"):
            vocab_parallel_linear_cross_entropy(x, w, torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("fused", [False, True])
def test_shards_simulated_in_one_process_several_slabs(fused, monkeypatch, device):
    """The ops on 3 simulated shards, the collectives done by hand (max, rescale, sum), with
    16-class slabs so each shard takes several: the full problem's loss, dX summed over the
    shards, and the shards' dW and db put together. fused: the shards' logits and statistics
    from linear_logits_kernel (16 x 16 tiles: shards and slabs cut them off mid-tile)."""
    import softmax_gpu
    from softmax_gpu import config
    from softmax_gpu.ops.vocab_parallel_cross_entropy import total_weight, vocab_parallel_loss
    from softmax_gpu.ops.vocab_parallel_linear_cross_entropy import (
        vocab_parallel_linear_backward,
        vocab_parallel_linear_stats,
    )

    n_rows, hidden, n_classes, bounds = 20, 24, 53, [(0, 17), (17, 40), (40, 53)]
    x = torch.randn(n_rows, hidden, device=device)
    w = torch.randn(n_classes, hidden, device=device) / 3
    b = torch.randn(n_classes, device=device)
    weight = torch.rand(n_classes, device=device) + 0.1
    target = torch.randint(0, n_classes, (n_rows,), device=device)
    target[:3] = torch.tensor([5, 52, 20])
    options = dict(ignore_index=5, label_smoothing=0.1, z_loss=1e-3, softcap=4.0)
    if fused:
        tiles = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, WARPS=4, STAGES=2)
        monkeypatch.setattr(config, "LINEAR_CE_LOGITS_FP32", tiles)
    with config.linear_limit(n_rows, 16):
        maxima, partial = [], []
        for lo, hi in bounds:
            m, s = vocab_parallel_linear_stats(x, w[lo:hi], b[lo:hi], target, weight[lo:hi], n_classes, lo, 5, 0.1, 1e-3,
                                               4.0, fused)  # fmt: skip
            maxima.append(m)
            partial.append(s)
        global_max = torch.stack(maxima).amax(0)
        stats = sum(torch.cat([s[:, :1] * torch.exp(m - global_max)[:, None], s[:, 1:]], 1)
                    for m, s in zip(maxima, partial))  # fmt: skip
        total = total_weight(target, stats, True, 5, n_classes)
        loss, _lse, _ = vocab_parallel_loss(x.new_empty(n_rows, 0), target, weight, global_max, stats, None, None,
                                            n_classes, 0, 5, 0.1, 1e-3, 4.0, False)  # fmt: skip
        upstream = torch.tensor(1.0, device=device)
        grads = [vocab_parallel_linear_backward(x, w[lo:hi], b[lo:hi], target, weight[lo:hi], global_max, stats,
                                                upstream, total, n_classes, lo, 5, 0.1, 1e-3, 4.0, True, True, True, fused)
                 for lo, hi in bounds]  # fmt: skip
        x1, w1, b1 = (t.clone().requires_grad_() for t in (x, w, b))
        expected = softmax_gpu.linear_cross_entropy(x1, w1, target, linear_bias=b1, weight=weight, **options)
        expected.backward()
    assert_matches(loss.sum() / total, to_f64(expected), RTOL, ATOL, what="loss")
    assert_matches(sum(g[0] for g in grads), to_f64(x1.grad), RTOL, ATOL, what="dX summed over shards")
    assert_matches(torch.cat([g[1] for g in grads]), to_f64(w1.grad), RTOL, ATOL, what="dW")
    assert_matches(torch.cat([g[2] for g in grads]), to_f64(b1.grad), RTOL, ATOL, what="db")


def test_opcheck_of_both_ops(device):
    """The two custom ops' fake implementations and schemas."""
    from softmax_gpu.ops.vocab_parallel_linear_cross_entropy import (
        vocab_parallel_linear_backward,
        vocab_parallel_linear_stats,
    )

    x, w, b = torch.randn(4, 8, device=device), torch.randn(9, 8, device=device), torch.randn(9, device=device)
    target = torch.tensor([0, 12, -100, 3], device=device)  # 12: another shard's class
    weight = torch.rand(9, device=device)
    stats_args = (x, w, b, target, weight, 20, 0, -100, 0.1, 1e-3, 5.0)
    torch.library.opcheck(vocab_parallel_linear_stats, stats_args)
    row_max, stats = vocab_parallel_linear_stats(*stats_args)
    for divisor, upstream in ((torch.tensor(3.0, device=device), torch.tensor(1.0, device=device)),
                              (None, torch.randn(4, device=device))):  # fmt: skip
        args = (x, w, b, target, weight, row_max, stats, upstream, divisor, 20, 0, -100, 0.1, 1e-3, 5.0, True, True,
                True)  # fmt: skip
        torch.library.opcheck(vocab_parallel_linear_backward, args)


# ---------------------------------------------------------------- FSDP2 (fully_shard)


def _fsdp_worker(rank, world):
    """A tiny LM under FSDP2 on gloo, each rank on its own slice of the batch, trained 3 steps
    with linear_cross_entropy: the root's group holding the head; the head in a group of
    its own with the loss registered as an FSDP forward method; both match the same model
    trained in one process on the whole batch. The head's sharded weight outside such a
    forward is refused (nothing would reduce its gradient)."""
    import softmax_gpu
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    class Head(torch.nn.Linear):
        def loss(self, hidden, target):
            return softmax_gpu.linear_cross_entropy(hidden, self.weight, target)

    class TinyLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(40, HIDDEN)
            self.head = Head(HIDDEN, 40, bias=False)

        def forward(self, ids, target):
            return self.head.loss(torch.tanh(self.embed(ids)).reshape(-1, HIDDEN), target.reshape(-1))

    mesh = init_device_mesh("cpu", (world,))
    for layout in ("root", "head apart"):
        torch.manual_seed(0)
        model, whole = TinyLM(), TinyLM()
        whole.load_state_dict(model.state_dict())
        if layout == "head apart":
            fully_shard(model.head, mesh=mesh)
            register_fsdp_forward_method(model.head, "loss")
        fully_shard(model, mesh=mesh)
        opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (model, whole)]
        g = torch.Generator().manual_seed(1)
        for step in range(3):
            ids, target = (torch.randint(0, 40, (2 * world, 6), generator=g) for _ in range(2))
            mine = slice(2 * rank, 2 * rank + 2)
            losses = [model(ids[mine], target[mine]), whole(ids, target)]
            for loss, opt in zip(losses, opts):
                loss.backward()
                opt.step()
                opt.zero_grad()
            mean = losses[0].detach().clone()
            dist.all_reduce(mean)
            torch.testing.assert_close(mean / world, losses[1].detach(), rtol=1e-5, atol=1e-6,
                                       msg=f"{layout}: step {step}")  # fmt: skip
    hidden = torch.randn(4, HIDDEN)
    with pytest.raises(TypeError, match="sharded by FSDP2's fully_shard"):
        softmax_gpu.linear_cross_entropy(hidden, model.head.weight, torch.zeros(4, dtype=torch.long))


@needs_gloo
def test_fsdp2_trains_like_one_process():
    run_ranks(2, _fsdp_worker)
