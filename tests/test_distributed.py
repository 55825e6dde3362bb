"""Vocab-parallel cross-entropy on 2 and 3 gloo ranks against the one-process answer.

Each test spawns its ranks once (torch.multiprocessing, a file:// rendezvous in a temporary
folder) and runs several cases inside them: spawning costs seconds, a case milliseconds.
Every rank builds the same full problem from the seed the parent draws, takes its shard,
and checks its loss and gradient against softmax_gpu.cross_entropy on the full problem and
the float64 reference; the gathered shards are checked by every rank too. A rank that fails
kills the others (ProcessContext.join), and a rank that hangs fails the test at the deadline.
"""
import contextlib
import importlib
import os
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import ATOL_16BIT, assert_matches, assert_within_torch_error, cpu_instrument, max_abs_err, poisoned, to_f64

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with the gloo backend"
)

RTOL, ATOL = 2e-6, 2e-7  # float32 loss and gradient, as in test_cross_entropy.py
DEADLINE_S = 150  # per spawn: generous for 2 shared CPU cores, short of a silent hang
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- spawning the ranks


def run_ranks(world: int, worker, *args):
    """Runs worker(rank, world, *args) on `world` gloo ranks; fails on any rank's error or a hang."""
    seed = int(torch.randint(0, 2**31, ()).item())  # fresh per test (conftest seeds torch from the run's seed)
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{tmp}/rendezvous"
        ctx = mp.start_processes(
            _entry, args=(world, init, seed, f"{worker.__module__}:{worker.__name__}", args), nprocs=world, join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + DEADLINE_S
        while not ctx.join(timeout=1.0):  # raises, with the rank's traceback, if one failed
            if time.monotonic() > deadline:
                for process in ctx.processes:
                    process.kill()
                pytest.fail(f"{worker.__name__}: the ranks did not finish within {DEADLINE_S} s (a hang?)")


def _entry(rank, world, init, seed, worker_name, args):
    """Child entry point: the interpreter is chosen before anything imports triton."""
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
        from softmax_gpu.interpreter import apply_fixes  # the interpreter fixes the parent's conftest applies

        apply_fixes()
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.manual_seed(seed)  # the same full problem on every rank
        module, name = worker_name.split(":")  # workers may live in other test modules
        getattr(importlib.import_module(module), name)(rank, world, *args)
    except BaseException:
        # Report first, and leave the group up: the other ranks may be inside a collective
        # with this one, and tearing gloo down under them aborts the process (SIGABRT) before
        # spawn has written this traceback. The parent kills the rest.
        traceback.print_exc()
        sys.stderr.flush()
        raise
    # Every rank past its last collective, then out without tearing gloo down: a rank's
    # destroy_process_group() or interpreter exit while a peer's gloo threads still talk to it
    # has aborted a rank now and then in CI ("terminate called without an active exception",
    # SIGABRT, no traceback) after every check had passed. _exit skips that teardown; the
    # barrier's sends have completed when it returns, and exit code 0 is what spawn checks.
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast", "broadcast_object_list",
    "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter",
    "send", "recv", "isend", "irecv", "batch_isend_irecv", "barrier",
)  # fmt: skip


@contextmanager
def count_collectives():
    """Records (name, reduce op, elements, dtype) of every torch.distributed collective called."""
    calls, originals = [], {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            tensor = kwargs.get("tensor", args[0] if args and isinstance(args[0], torch.Tensor) else None)
            if name == "all_gather":
                tensor = kwargs.get("tensor", args[1] if len(args) > 1 else None)
            op = kwargs.get("op", dist.ReduceOp.SUM if name == "all_reduce" else None)
            calls.append((name, str(op), None if tensor is None else tensor.numel(),
                          None if tensor is None else tensor.dtype))  # fmt: skip
            return fn(*args, **kwargs)

        return counted

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------- one case, on every rank


def shard_bounds(rank, world, n_classes, starts):
    """This rank's [start, stop): equal shards in rank order, or the given (start, size) table."""
    if starts is None:
        size = n_classes // world
        return rank * size, (rank + 1) * size
    start, size = starts[rank]
    return start, start + size


def check_case(rank, world, n_classes, starts, what, logits, target, upstream=None, max_block=None,
               dtype=torch.float32, expect_collectives=None, **kw):  # fmt: skip
    """One case on this rank: loss and shard gradient against the full problem (our one-process
    kernel and float64), the same loss bits on every rank, and the gathered gradient."""
    import softmax_gpu
    from softmax_gpu import config, reference
    from softmax_gpu.distributed import vocab_parallel_cross_entropy

    start, stop = shard_bounds(rank, world, n_classes, starts)
    weight = kw.pop("weight", None)
    soft = target.is_floating_point()
    # This rank's inputs, taken from the full problem.
    shard = logits[:, start:stop].to(dtype).clone().requires_grad_()
    shard_target = target[:, start:stop] if soft else target
    shard_kw = dict(kw, weight=None if weight is None else weight[start:stop])
    vocab_start = None if starts is None else start
    with config.block_limit(max_block or config.MAX_BLOCK_CROSS_ENTROPY):
        with count_collectives() as forward_calls:
            loss = vocab_parallel_cross_entropy(shard, shard_target, vocab_start=vocab_start, **shard_kw)
        with count_collectives() as backward_calls:
            loss.backward(torch.ones_like(loss) if upstream is None else upstream)
        # The same problem in one process.
        full = logits.to(dtype).clone().requires_grad_()
        expected = softmax_gpu.cross_entropy(full, target, weight=weight, **kw)
        expected.backward(torch.ones_like(expected) if upstream is None else upstream)
    if expect_collectives is not None:
        assert forward_calls == expect_collectives, f"{what}: forward collectives {forward_calls}"
    assert backward_calls == [], f"{what}: the backward communicated: {backward_calls}"

    loss64, grad64 = reference.cross_entropy(
        to_f64(logits.to(dtype)), target.cpu().numpy() if not soft else to_f64(target),
        weight=None if weight is None else to_f64(weight), **kw,
    )  # fmt: skip
    if kw.get("reduction") == "none" and upstream is not None:
        grad64 = grad64 * to_f64(upstream)[:, None]
    grad = shard.grad
    if dtype == torch.float32:
        assert_matches(loss, expected.detach().cpu().numpy(), RTOL, ATOL, what=f"{what}: loss vs cross_entropy")
        assert_matches(loss, loss64, RTOL, ATOL, what=f"{what}: loss vs float64")
        assert_matches(grad, to_f64(full.grad[:, start:stop]), RTOL, ATOL, what=f"{what}: grad vs cross_entropy")
        assert_matches(grad, grad64[:, start:stop], RTOL, ATOL, what=f"{what}: grad vs float64")
    else:  # 16-bit: within twice torch's own error, as test_cross_entropy.py holds cross_entropy
        ref_in = logits.to(dtype).clone().requires_grad_()
        theirs = torch.nn.functional.cross_entropy(ref_in, target, weight=weight, **kw)
        theirs.backward(torch.ones_like(theirs) if upstream is None else upstream)
        budget = 2 * max_abs_err(theirs, loss64) + ATOL_16BIT[dtype]  # our loss is float32, theirs bf16
        assert_matches(loss, loss64, rtol=0.0, atol=budget, what=f"{what}: bf16 loss")
        assert_within_torch_error(grad, ref_in.grad[:, start:stop], grad64[:, start:stop], what=f"{what}: bf16 grad")

    # Every rank holds the same loss bits, and the shards put together are the full gradient.
    gathered = [None] * world
    dist.all_gather_object(gathered, (loss.detach().cpu(), start, grad.detach().cpu()))
    for other_loss, _, _ in gathered:
        torch.testing.assert_close(other_loss, loss.detach().cpu(), rtol=0, atol=0, equal_nan=True)
    assembled = torch.cat([g for _, _, g in sorted(gathered, key=lambda item: item[1])], dim=1)
    if dtype == torch.float32:
        assert_matches(assembled, grad64, RTOL, ATOL, what=f"{what}: gathered gradient")
    return loss, grad


def options_cases(n_rows, n_classes, dev):
    """A few combinations of the options rather than their full product: every reduction,
    weights, smoothing, z-loss, softcap, ignore_index (-100, -1, and 2: a class that is ignored)."""
    weight = torch.rand(n_classes, device=dev) + 0.1
    probs = torch.softmax(torch.randn(n_rows, n_classes, device=dev), -1)
    cases = []
    for reduction in ("mean", "sum", "none"):
        cases += [
            dict(what=f"plain {reduction}", reduction=reduction),
            dict(what=f"all options {reduction}", reduction=reduction, weight=weight, label_smoothing=0.1,
                 z_loss=1e-3, softcap=5.0, ignore_index=2),  # fmt: skip
            dict(what=f"smoothing {reduction}", reduction=reduction, label_smoothing=0.2, ignore_index=-1),
            dict(what=f"probabilities {reduction}", reduction=reduction, target=probs, weight=weight,
                 label_smoothing=0.1, z_loss=1e-3),  # fmt: skip
        ]
    return cases


def class_targets(n_rows, n_classes, dev, ignore_index):
    target = torch.randint(0, n_classes, (n_rows,), device=dev)
    target[1] = ignore_index if ignore_index != 2 else 2
    target[3] = n_classes - 1  # the last class: on the last shard
    return target


def _options_worker(rank, world, n_rows, n_classes, starts, max_block):
    dev = device()
    for case in options_cases(n_rows, n_classes, dev):
        what = f"{case.pop('what')} block={max_block}"
        logits = 3 * torch.randn(n_rows, n_classes, device=dev)
        target = case.pop("target", None)
        if target is None:
            target = class_targets(n_rows, n_classes, dev, case.get("ignore_index", -100))
            target[0] = 0
        upstream = torch.randn(n_rows, device=dev) if case["reduction"] == "none" else None
        check_case(rank, world, n_classes, starts, what, logits, target, upstream, max_block, **case)


def _token_logprobs_worker(rank, world, n_rows, n_classes, starts):
    """vocab_parallel_token_logprobs against float64 torch on the full rows: logprobs and
    entropy at T = 0.7 with ignored, out-of-range and NaN rows, the shard's gradient of both
    together and of each alone, on one program a row and on split rows, and the collectives."""
    from test_token_logprobs import grads, reference

    from softmax_gpu import config
    from softmax_gpu.distributed import vocab_parallel_token_logprobs

    dev, temperature = device(), 0.7
    start, stop = shard_bounds(rank, world, n_classes, starts)
    vocab_start = None if starts is None else start
    z = 3 * torch.randn(n_rows, n_classes, device=dev)
    tokens = torch.randint(0, n_classes, (n_rows,), device=dev)
    tokens[0], tokens[1], tokens[2] = -100, n_classes, n_classes - 1  # ignored, out of range, the last class
    z[3, n_classes // 2] = float("nan")
    u_lp, u_h = torch.randn(n_rows, device=dev), torch.randn(n_rows, device=dev)
    want_lp, want_ent = reference(z.cpu(), tokens.cpu(), temperature)
    for limit in (None, (16, 16)):
        paths = (config.block_limit(16), config.force_split(16)) if limit else (config.no_split(),)
        with contextlib.ExitStack() as stack:
            for p in paths:
                stack.enter_context(p)

            def ours(shard):
                return vocab_parallel_token_logprobs(shard, tokens, vocab_start=vocab_start, temperature=temperature,
                                                     return_entropy=True)  # fmt: skip

            with count_collectives() as calls:
                lp, ent = ours(z[:, start:stop])
            got = {k: grads(ours, z[:, start:stop], *u) for k, u in
                   {"both": (u_lp, u_h), "logprobs": (u_lp, None), "entropy": (None, u_h)}.items()}  # fmt: skip
        what = f"rank {rank} split={limit}"
        if calls and calls[0][0] == "all_gather":  # the first call for a layout checks it (3 int64 a rank)
            calls = calls[1:]
        assert [c[:2] for c in calls] == [("all_reduce", "RedOpType.MAX"), ("all_reduce", "RedOpType.SUM")], calls
        assert calls[0][2] == n_rows and calls[1][2] == 3 * n_rows, calls
        for got_out, want in ((lp, want_lp), (ent, want_ent)):
            assert got_out[0] == 0 and got_out[1].isnan() and got_out[3].isnan(), what
            ok = torch.ones(n_rows, dtype=torch.bool)
            ok[[0, 1, 3]] = False
            scale = float(want[ok].abs().max())
            assert_matches(got_out[ok].cpu(), want[ok].numpy(), rtol=2e-6, atol=2e-6 * scale, what=what)
        for k, (a, b) in {"both": (u_lp, u_h), "logprobs": (u_lp, None), "entropy": (None, u_h)}.items():
            up = [u.cpu().double() if u is not None else None for u in (a, b)]
            want = grads(lambda x: reference(x, tokens.cpu(), temperature), z.cpu().double(), *up)[:, start:stop]
            assert got[k][1].isnan().all() and got[k][3].isnan().all() and not got[k][0].any(), f"{what} {k}"
            rows = [0, 2] + list(range(4, n_rows))
            scale = float(want[rows].abs().max())
            assert_matches(got[k][rows].cpu(), want[rows].numpy(), rtol=0.0, atol=1e-5 * scale, what=f"{what} grad {k}")


def _dtensor_worker(rank, world):
    """cross_entropy and linear_cross_entropy of DTensors on a 1-D mesh of every rank: logits
    sharded on the classes (uneven over 3 ranks) against F.cross_entropy under loss_parallel(),
    replicated and batch-sharded logits against the plain call on the full tensors, a
    column-parallel head; losses and the full gradients."""
    import softmax_gpu
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    mesh = init_device_mesh(device(), (world,))
    n_rows, n_classes, hidden = 2 * world + 1, 37, 8  # batch shards uneven too (torch.chunk's: 3 + 2, 3 + 3 + 1)
    z = 3 * torch.randn(n_rows, n_classes, device=device())
    t = torch.randint(0, n_classes, (n_rows,), device=device())
    t[1] = -100
    class_weight = torch.rand(n_classes, device=device()) + 0.5
    dt = distribute_tensor(t, mesh, [Replicate()])

    def both(fn, placement, **kw):
        leaf = distribute_tensor(z, mesh, [placement]).requires_grad_()
        loss = fn(leaf, dt if placement != Shard(0) else distribute_tensor(t, mesh, [Shard(0)]), **kw)
        assert isinstance(loss, DTensor)
        loss.full_tensor().sum().backward()
        return loss.full_tensor().detach(), leaf.grad.full_tensor()

    cases = [dict(reduction="mean"), dict(reduction="sum", label_smoothing=0.1), dict(reduction="none"),
             dict(reduction="mean", weight=class_weight)]  # fmt: skip
    for kw in cases:
        what = f"rank {rank} {kw.get('reduction')} {sorted(kw)}"
        full = z.clone().requires_grad_()
        plain = F.cross_entropy(full, t, **kw)
        plain.sum().backward()
        for placement in (Shard(1), Replicate(), Shard(0)):
            got = both(softmax_gpu.cross_entropy, placement, **kw)
            torch.testing.assert_close(got[0], plain.detach(), rtol=2e-6, atol=2e-7, msg=f"{what} {placement}")
            torch.testing.assert_close(got[1], full.grad, rtol=2e-6, atol=2e-7, msg=f"{what} {placement}")
    # torch's own loss_parallel() (without an ignored row or smoothing: on this torch both
    # fail there, masked_fill_ on a Partial placement)
    t[1] = 3
    dt = distribute_tensor(t, mesh, [Replicate()])
    with loss_parallel():
        want = both(F.cross_entropy, Shard(1))
    got = both(softmax_gpu.cross_entropy, Shard(1))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-7, msg=f"rank {rank} against loss_parallel()")

    # A column-parallel LM head: the weight sharded on its classes, the input replicated.
    x = torch.randn(n_rows, hidden, device=device())
    w = torch.randn(n_classes, hidden, device=device()) / hidden**0.5
    dx = distribute_tensor(x, mesh, [Replicate()]).requires_grad_()
    dw = distribute_tensor(w, mesh, [Shard(0)]).requires_grad_()
    loss = softmax_gpu.linear_cross_entropy(dx, dw, dt, label_smoothing=0.1)
    loss.full_tensor().backward()
    fx, fw = x.clone().requires_grad_(), w.clone().requires_grad_()
    want = F.cross_entropy(F.linear(fx, fw), t, label_smoothing=0.1)
    want.backward()
    torch.testing.assert_close(loss.full_tensor().detach(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dw.grad.full_tensor(), fw.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx.grad.full_tensor(), fx.grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="pass the input as a DTensor"):
        softmax_gpu.linear_cross_entropy(x, dw, t)
    with pytest.raises(NotImplementedError, match="grad_skip_threshold"):
        softmax_gpu.linear_cross_entropy(dx, dw, dt, grad_skip_threshold=0.5)
    with pytest.raises(ValueError, match="mode must be one of"):
        softmax_gpu.linear_cross_entropy(dx, dw, dt, mode="fast")

    # A vocabulary shorter than the mesh's ranks' chunks: over 3 ranks, torch.chunk leaves the
    # last rank no class, and it still takes part in every collective.
    small = 2
    ws = torch.randn(small, hidden, device=device())
    ts = torch.randint(0, small, (n_rows,), device=device())
    dws = distribute_tensor(ws, mesh, [Shard(0)]).requires_grad_()
    dzs = distribute_tensor(F.linear(x, ws), mesh, [Shard(1)]).requires_grad_()
    dts = distribute_tensor(ts, mesh, [Replicate()])
    for got in (softmax_gpu.linear_cross_entropy(distribute_tensor(x, mesh, [Replicate()]), dws, dts),
                softmax_gpu.cross_entropy(dzs, dts)):  # fmt: skip
        got.full_tensor().backward()
        torch.testing.assert_close(got.full_tensor().detach(), F.cross_entropy(F.linear(x, ws), ts), rtol=1e-5, atol=1e-6)
    fw = ws.clone().requires_grad_()
    F.cross_entropy(F.linear(x, fw), ts).backward()
    torch.testing.assert_close(dws.grad.full_tensor(), fw.grad, rtol=1e-5, atol=1e-6)

    # Data parallelism by DTensor: the input's rows sharded (3-D, uneven), the head
    # replicated; its gradient is every rank's rows' (summed), the loss per token or reduced.
    x3 = torch.randn(n_rows, 2, hidden, device=device())
    t3 = torch.randint(0, n_classes, (n_rows, 2), device=device())
    t3[0, 1] = -100
    for reduction in ("mean", "sum", "none"):
        dx3 = distribute_tensor(x3, mesh, [Shard(0)]).requires_grad_()
        dw3 = distribute_tensor(w, mesh, [Replicate()]).requires_grad_()
        loss = softmax_gpu.linear_cross_entropy(dx3, dw3, distribute_tensor(t3, mesh, [Shard(0)]), reduction=reduction)
        assert loss.shape == ((n_rows, 2) if reduction == "none" else ()), loss.shape
        upstream = torch.linspace(0.5, 1.5, 2 * n_rows, device=device()).view(n_rows, 2)
        (loss.full_tensor() * (upstream if reduction == "none" else 1.0)).sum().backward()
        fx, fw = x3.clone().requires_grad_(), w.clone().requires_grad_()
        want = F.cross_entropy(F.linear(fx, fw).transpose(1, 2), t3, reduction=reduction)
        (want * (upstream if reduction == "none" else 1.0)).sum().backward()
        what = f"rank {rank} data-parallel {reduction}"
        torch.testing.assert_close(loss.full_tensor().detach(), want.detach(), rtol=1e-5, atol=1e-6, msg=what)
        torch.testing.assert_close(dw3.grad.full_tensor(), fw.grad, rtol=1e-5, atol=1e-6, msg=what)
        torch.testing.assert_close(dx3.grad.full_tensor(), fx.grad, rtol=1e-5, atol=1e-6, msg=what)


def _two_ranks_worker(rank, world):
    _token_logprobs_worker(rank, world, 6, 42, None)  # 21 classes a rank: a layout of its own
    _dtensor_worker(rank, world)
    _options_worker(rank, world, 5, 38, None, None)  # 19 classes a rank, one block per row
    # A new layout (20 classes a rank), so the first call validates it.
    _collectives_and_special_rows_worker(rank, world, 5, 40)


@needs_gloo
def test_two_ranks_every_option_collectives_nan_masked_confident_bf16():
    """One spawn (spawning costs more than the cases): every option and reduction, then the
    collectives pinned and the special rows."""
    run_ranks(2, _two_ranks_worker)


def _three_ranks_worker(rank, world):
    # Rank 0 holds the middle, rank 2 the start: starts in any order, sizes 20, 7 and 10.
    # 16-wide blocks: rank 0's rows take the looped path (two blocks, the second ragged).
    _options_worker(rank, world, 5, 37, ((10, 20), (30, 7), (0, 10)), 16)
    _token_logprobs_worker(rank, world, 6, 37, ((10, 20), (30, 7), (0, 10)))
    _dtensor_worker(rank, world)  # 13, 13 and 11 classes
    _bad_input_worker(rank, world)
    _subgroup_worker(rank, world)


def _subgroup_worker(rank, world):
    """Any process group: ranks 0 and 2 share a 22-class vocabulary in a group of their own
    (implied starts follow the rank in that group), while rank 1 sits it out."""
    import softmax_gpu
    from softmax_gpu.distributed import vocab_parallel_cross_entropy

    group = dist.new_group([0, 2])  # every rank must call new_group
    torch.manual_seed(torch.initial_seed() + 1)  # the bad-input cases drew different sizes per rank
    logits = 2 * torch.randn(5, 22, device=device())
    target = torch.randint(0, 22, (5,), device=device())
    if rank == 1:
        return
    start = 11 * dist.get_rank(group)
    shard = logits[:, start : start + 11].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(shard, target, group=group, label_smoothing=0.1)
    loss.backward()
    full = logits.clone().requires_grad_()
    expected = softmax_gpu.cross_entropy(full, target, label_smoothing=0.1)
    expected.backward()
    assert_matches(loss, expected.detach().cpu().numpy(), RTOL, ATOL, what="subgroup loss")
    assert_matches(shard.grad, to_f64(full.grad[:, start : start + 11]), RTOL, ATOL, what="subgroup grad")


@needs_gloo
def test_three_ranks_uneven_shards_every_option_bad_shards_raise_on_every_rank_subgroup():
    run_ranks(3, _three_ranks_worker)


def _collectives_and_special_rows_worker(rank, world, n_rows, n_classes):
    dev = device()
    logits = 3 * torch.randn(n_rows, n_classes, device=dev)
    target = class_targets(n_rows, n_classes, dev, -100)
    k_plain, k_all = 2, 5  # packed columns: (sum-exp, z_t); + w_t, sum w z, sum w
    # First call for this layout: one all-gather of (explicit, start, V_local), then the two
    # all-reduces. Later calls: the two all-reduces only. The backward: nothing.
    first = [("all_gather", "None", 3, torch.int64), ("all_reduce", str(dist.ReduceOp.MAX), n_rows, torch.float32),
             ("all_reduce", str(dist.ReduceOp.SUM), n_rows * k_plain, torch.float32)]  # fmt: skip
    check_case(rank, world, n_classes, None, "first call", logits, target, expect_collectives=first)
    check_case(rank, world, n_classes, None, "cached layout", logits, target, expect_collectives=first[1:])
    weight = torch.rand(n_classes, device=dev) + 0.1
    all_options = [first[1], ("all_reduce", str(dist.ReduceOp.SUM), n_rows * k_all, torch.float32)]
    check_case(rank, world, n_classes, None, "all options", logits, target, expect_collectives=all_options,
               weight=weight, label_smoothing=0.1, z_loss=1e-3, softcap=5.0)  # fmt: skip
    probs = torch.softmax(torch.randn(n_rows, n_classes, device=dev), -1)
    soft = [first[1], ("all_reduce", str(dist.ReduceOp.SUM), n_rows * 3, torch.float32)]
    check_case(rank, world, n_classes, None, "probabilities", logits, probs, expect_collectives=soft)

    # NaN in, NaN out: a NaN on one rank's shard makes that row's loss and every rank's
    # gradient row NaN (the other rows stay finite under "sum").
    import softmax_gpu
    from softmax_gpu.distributed import vocab_parallel_cross_entropy

    nan_logits = logits.clone()
    nan_logits[2, n_classes - 1] = float("nan")  # on the last rank only
    start, stop = shard_bounds(rank, world, n_classes, None)
    shard = nan_logits[:, start:stop].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(shard, target, reduction="none")
    loss.sum().backward()
    assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3, 4]]).all(), loss
    assert torch.isnan(shard.grad[2]).all() and torch.isfinite(shard.grad[[0, 1, 3, 4]]).all()

    # Masked classes: row 0 is -inf over the whole last shard (and beyond), as padded
    # vocabulary entries are; that shard contributes e^-inf = 0, not NaN. Against torch in
    # float64 (the NumPy reference's smoothing term makes 0 * inf there) and cross_entropy.
    masked = logits.clone()
    masked[0, n_classes // 2 - 3 :] = -float("inf")
    target = target.clone()
    target[0] = 0  # a class that is not masked
    shard = masked[:, start:stop].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(shard, target, weight=weight[start:stop], reduction="sum")
    loss.backward()
    full = masked.clone().requires_grad_()
    expected = softmax_gpu.cross_entropy(full, target, weight=weight, reduction="sum")
    expected.backward()
    ref_in = masked.double().requires_grad_()
    F.cross_entropy(ref_in, target, weight=weight.double(), reduction="sum").backward()
    assert_matches(loss, expected.detach().cpu().numpy(), RTOL, ATOL, what="masked: loss vs cross_entropy")
    assert_matches(shard.grad, to_f64(full.grad[:, start:stop]), RTOL, ATOL, what="masked: grad vs cross_entropy")
    assert_matches(shard.grad, to_f64(ref_in.grad[:, start:stop]), RTOL, ATOL, what="masked: grad vs torch")
    assert torch.isfinite(loss) and torch.isfinite(shard.grad).all()

    # A confident row: the true class's gradient keeps its accuracy though q_t rounds to 1,
    # when the target's shard and the rest of the row are on different ranks.
    from softmax_gpu import reference

    confident = logits.clone()
    t4 = int(target[4])
    confident[4, t4] += 30.0
    _, grad = check_case(rank, world, n_classes, None, "confident row", confident, target, reduction="sum")
    _, grad64 = reference.cross_entropy(to_f64(confident), target.cpu().numpy(), reduction="sum")
    if start <= t4 < stop:  # the owner: q_t - 1 ~ -1e-11, far below the absolute tolerance
        ours, exact = float(grad[4, t4 - start]), float(grad64[4, t4])
        assert exact < 0 and abs(ours - exact) <= 0.02 * abs(exact), (ours, exact)

    # float16 under loss scaling: the gradient is formed in the backward with the factor
    # applied before the rounding, as cross_entropy does, so entries far below float16's
    # smallest subnormal before the factor (q ~ e^-24 / N) survive x 2^16.
    spread = 6 * logits
    half = spread[:, start:stop].half().requires_grad_()
    with count_collectives() as calls:
        (vocab_parallel_cross_entropy(half, target) * 65536.0).backward()
    assert calls[-1][0] == "all_reduce" and len(calls) == 2, calls  # forward only: nothing in the backward
    full = spread.half().requires_grad_()
    (softmax_gpu.cross_entropy(full, target) * 65536.0).backward()
    kept = full.grad[:, start:stop] != 0
    assert kept.sum() > 0 and (half.grad[kept] != 0).all(), "float16 gradient entries lost under loss scaling"
    torch.testing.assert_close(half.grad.float(), full.grad[:, start:stop].float(), rtol=2e-3, atol=1e-5)

    # bfloat16 logits, float32 loss: within twice torch's own bfloat16 error.
    check_case(rank, world, n_classes, None, "bf16", logits, target, dtype=torch.bfloat16, label_smoothing=0.1)


def _bad_input_worker(rank, world):
    """Every layout below is wrong; every rank must raise the same ValueError (so nobody hangs
    in a later collective), then go on to the next one."""
    from softmax_gpu.distributed import vocab_parallel_cross_entropy

    dev = device()
    target = torch.tensor([0, 5, -100], device=dev)
    bad_layouts = [  # (V_local, vocab_start) per rank, and the message
        ([8, 8, 9], [None] * 3, "every rank must hold the same number of classes"),
        ([5, 5, 5], [0, 6, 10], r"leave classes \[5, 6\) to no rank"),
        ([5, 5, 5], [0, 4, 9], "overlap"),
        ([5, 5, 5], [1, 6, 11], r"leave classes \[0, 1\) to no rank"),
        ([5, 5, 5], [0, None, 10], "vocab_start must be given on every rank or on none"),
        ([0, 0, 0], [0, 0, 0], "no rank holds any class"),
    ]
    for sizes, starts, message in bad_layouts:
        logits = torch.randn(3, sizes[rank], device=dev)
        with pytest.raises(ValueError, match=message):
            vocab_parallel_cross_entropy(logits, target, vocab_start=starts[rank])
    # The layout that works, then a class index outside [0, V): IndexError on every rank for
    # CPU tensors (before any all-reduce), as cross_entropy raises; a NaN row on CUDA.
    logits = torch.randn(3, 5, device=dev)
    for bad in (15, -3):
        target = torch.tensor([0, bad, -100], device=dev)
        if dev == "cpu":
            with pytest.raises(IndexError, match=f"Target {bad} is out of bounds"):
                vocab_parallel_cross_entropy(logits, target, reduction="none")
        else:
            loss = vocab_parallel_cross_entropy(logits, target, reduction="none")
            assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    # Checks that need no communication raise before any.
    with pytest.raises(ValueError, match="logits must be"):
        vocab_parallel_cross_entropy(torch.randn(15, device=dev), target)
    with pytest.raises(ValueError, match="weight must have shape"):
        vocab_parallel_cross_entropy(logits, target, weight=torch.ones(15, device=dev))
    with pytest.raises(ValueError, match="label_smoothing"):
        vocab_parallel_cross_entropy(logits, target, label_smoothing=1.5)
    with pytest.raises(TypeError, match="vocab_start"):
        vocab_parallel_cross_entropy(logits, target, vocab_start=1.0)
    with pytest.raises(RuntimeError, match="ignore_index is not supported for floating point target"):
        vocab_parallel_cross_entropy(logits, torch.rand(3, 5, device=dev), ignore_index=0)


# ---------------------------------------------------------------- in the test process


@pytest.mark.parametrize("max_block", [None, 16])
def test_kernels_on_simulated_ranks_with_poisoned_buffers(max_block, device):
    """The two kernels for four shards in one process, the all-reduces done by hand: uneven
    shards, one of them empty, every output buffer NaN before the launch."""
    from softmax_gpu import config, reference
    from softmax_gpu.loss_options import LossOptions
    from softmax_gpu.ops import vocab_parallel_cross_entropy as vp

    n_rows, n_classes = 6, 41
    bounds = [(0, 17), (17, 17), (17, 30), (30, 41)]  # the second shard holds no class
    logits = 3 * torch.randn(n_rows, n_classes, device=device)
    weight = torch.rand(n_classes, device=device) + 0.1
    index = torch.randint(0, n_classes, (n_rows,), device=device)
    index[2] = -100
    index[4] = 20  # the first class of the third shard
    probs = torch.softmax(torch.randn(n_rows, n_classes, device=device), -1)
    options = dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
    upstream = torch.randn(n_rows, device=device)
    for target, use_weight in ((index, True), (index.int(), False), (probs, True)):
        w = weight if use_weight else None
        soft = target.is_floating_point()
        width = vp.n_stats(soft, use_weight, True)
        shards = []
        with config.block_limit(max_block or config.MAX_BLOCK_CROSS_ENTROPY):
            for start, stop in bounds:
                row_max, stats = poisoned((n_rows,), torch.float32, device), poisoned((n_rows, width), torch.float32, device)
                tgt = target[:, start:stop] if soft else target
                vp.launch_vocab_parallel_stats(logits[:, start:stop], tgt, None if w is None else w[start:stop],
                                               row_max, stats, n_classes, start, LossOptions(-100, **options))  # fmt: skip
                shards.append((start, stop, tgt, row_max, stats))
            global_max = torch.stack([s[3] for s in shards]).amax(0)
            total = sum(s[4] * torch.cat([torch.exp(s[3] - global_max)[:, None],
                                          torch.ones(n_rows, width - 1, device=device)], 1) for s in shards)  # fmt: skip
            grads, losses = [], []
            for start, stop, tgt, _, _ in shards:
                loss, lse = poisoned((n_rows,), torch.float32, device), poisoned((n_rows,), torch.float32, device)
                grad = poisoned((n_rows, stop - start), torch.float32, device)
                vp.launch_vocab_parallel_loss(logits[:, start:stop], tgt, None if w is None else w[start:stop],
                                              global_max, total, loss, lse, grad, None, upstream, n_classes, start,
                                              LossOptions(-100, **options))  # fmt: skip
                grads.append(grad)
                losses.append((loss, lse))
        loss64, grad64 = reference.cross_entropy(to_f64(logits), to_f64(target) if soft else target.cpu().numpy(),
                                                 weight=None if w is None else to_f64(w), reduction="none", **options)
        grad64 = grad64 * to_f64(upstream)[:, None]  # the factor the backward route applies in the kernel
        lse64 = np.log(np.exp(5.0 * np.tanh(to_f64(logits) / 5.0)).sum(1))
        what = f"soft={soft} weight={use_weight} block={max_block}"
        for loss, lse in losses:  # every shard computes the whole loss, bit for bit the same
            assert torch.equal(loss, losses[0][0]) and torch.equal(lse, losses[0][1]), what
        assert_matches(loss, loss64, RTOL, ATOL, what=what + " loss")
        assert_matches(lse, lse64, RTOL, ATOL, what=what + " lse")
        assert_matches(torch.cat(grads, 1), grad64, RTOL, ATOL, what=what + " grad")



def test_imports_without_a_process_group_and_says_so():
    """The module imports with no process group (and so under torch.compile's tracing of other
    code); a call without one raises a RuntimeError that names the function."""
    from softmax_gpu.distributed import vocab_parallel_cross_entropy

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="vocab_parallel_cross_entropy.*(not initialised|no torch.distributed)"):
        vocab_parallel_cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]))


def test_opcheck_of_both_ops(device):
    """The two custom ops' fake (meta) implementations, schemas and autograd registration."""
    from softmax_gpu.ops.vocab_parallel_cross_entropy import vocab_parallel_loss, vocab_parallel_stats

    logits = torch.randn(4, 9, device=device)
    target = torch.tensor([0, 12, -100, 3], device=device)  # 12: another rank's class
    weight = torch.rand(9, device=device)
    stats_args = (logits, target, weight, 20, 0, -100, 0.1, 1e-3, 5.0)
    torch.library.opcheck(vocab_parallel_stats, stats_args)
    row_max, stats = vocab_parallel_stats(*stats_args)
    upstream = torch.randn(4, device=device)
    for divisor, factor in ((torch.tensor(3.0, device=device), None), (None, upstream)):
        args = (logits, target, weight, row_max, stats, divisor, factor, 20, 0, -100, 0.1, 1e-3, 5.0, True)
        torch.library.opcheck(vocab_parallel_loss, args)


def test_ops_trace_under_torch_compile(device):
    """Importing softmax_gpu.distributed leaves torch.compile working, and dynamo traces both
    custom ops through their fake implementations with no graph break."""
    importlib.import_module("softmax_gpu.distributed")
    from softmax_gpu.ops.vocab_parallel_cross_entropy import vocab_parallel_loss, vocab_parallel_stats

    def shard_loss(logits, target):  # one rank's kernels, no collective between them
        row_max, stats = vocab_parallel_stats(logits, target, None, 9, 0, -100, 0.0, 0.0, None)
        loss, _lse, grad = vocab_parallel_loss(logits, target, None, row_max, stats, None, None, 9, 0, -100, 0.0,
                                               0.0, None, True)  # fmt: skip
        return loss.sum(), grad

    logits, target = torch.randn(3, 9, device=device), torch.tensor([0, 8, -100], device=device)
    compiled = torch.compile(shard_loss, backend="eager", fullgraph=True)
    for got, want in zip(compiled(logits, target), shard_loss(logits, target)):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(shard_loss(logits, target)[0], torch.nn.functional.cross_entropy(logits, target, reduction="sum"))


@cpu_instrument
@needs_gloo
def test_tensor_parallel_example_on_two_cpu_ranks():
    """examples/train_tensor_parallel.py under torchrun: 2 gloo ranks in the interpreter, a few
    steps, each step's loss within 1e-4 of the same model trained in one process."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "examples" / "train_tensor_parallel.py"), "--steps", "3", "--batch", "2", "--seq", "8"]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=DEADLINE_S, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "largest per-step difference" in result.stdout, result.stdout
