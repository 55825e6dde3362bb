"""bench.host_time: the eager host path timed on the CPU with kernel launches stubbed, and
the direct launch of compiled kernels (softmax_gpu.runtime.launch) against Triton's own.

Times are benchmark figures and are not asserted; the launches each eager call makes, and
the arguments a launch passes, are exact, and are."""
import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import cpu_instrument

ROOT = Path(__file__).resolve().parents[1]


@cpu_instrument
def test_host_time_runs_compiled_mode_triton_with_both_stubs():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run(
        [sys.executable, "-m", "bench.host_time", "--reps", "3", "--shape", "8x300"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines()[2:]}  # op: ours µs, triton µs, launches
    # the launches the traffic model gives for each path (pinned against the interpreter in
    # tests/test_traffic_model.py): the eager path launches nothing else
    import torch

    from bench.traffic_model import ours

    def model(op):
        return ours(op, 8, 300, torch.bfloat16, sm_count=132).launches

    expected = dict(softmax_fwd=model("softmax_fwd"), log_softmax_fwd=model("log_softmax_fwd"),
                    softmax_fwd_bwd=model("softmax_fwd") + model("softmax_bwd"), ce_fwd=model("ce_fwd"),
                    ce_fwd_bwd=model("ce_fwd_bwd"),
                    logprobs_fwd=1, logprobs_fwd_bwd=2)  # fmt: skip  (token log-probs: a forward, a backward kernel)
    assert {op: float(v[2]) for op, v in rows.items()} == expected, out.stdout
    assert all(float(v[0]) > 0 and float(v[1]) > 0 for v in rows.values())


def test_launch_plans_are_reused_and_keyed_on_the_test_overrides(device):
    """The eager path stores one plan per signature and reuses it; a test override (a block
    limit) is part of the key, so a forced path never reuses the shipped one, and the results
    agree bit for bit with a fresh plan."""
    import torch

    import softmax_gpu
    from softmax_gpu import config, runtime

    x = torch.randn(5, 300, device=device)
    t = torch.randint(0, 300, (5,), device=device)
    runtime._PLANS.clear()
    first = softmax_gpu.cross_entropy(x, t, label_smoothing=0.1)
    stored = set(runtime._PLANS)
    assert any(k[0] == "ce" for k in stored) and any(k[0] == "split" for k in stored)
    again = softmax_gpu.cross_entropy(x, t, label_smoothing=0.1)
    assert set(runtime._PLANS) == stored and torch.equal(first, again)
    with config.block_limit(64):
        looped = softmax_gpu.cross_entropy(x, t, label_smoothing=0.1)
    assert len(set(runtime._PLANS) - stored) >= 1  # the forced path has plans of its own
    torch.testing.assert_close(looped, first)
    y = softmax_gpu.softmax(x)
    assert any(k[0] == "softmax_fwd" for k in runtime._PLANS)
    torch.testing.assert_close(softmax_gpu.softmax(x), y, rtol=0, atol=0)
    try:
        for i in range(runtime.MAX_PLANS + 5):
            runtime.remember_plan(("probe", i), i)
        assert len(runtime._PLANS) == runtime.MAX_PLANS and runtime.cached_plan(("probe", 0)) is None
    finally:
        runtime._PLANS.clear()  # later tests in this process start from an empty cache


DIRECT_LAUNCH_SCRIPT = r"""
import json

import torch

import softmax_gpu
from bench.host_time import fake_device
from softmax_gpu import config, runtime
from softmax_gpu.ops import cross_entropy as ce, softmax as sm, token_logprobs as tlp

launched = fake_device()
pairs = []


def both_ways(kernel, grid, static, planned, **dynamic):
    before = runtime.direct_launches
    runtime.launch(kernel, grid, static, planned, **dynamic)
    direct = runtime.direct_launches > before
    kernel[grid](**static, **dynamic)  # Triton's own JITFunction.run, the same arguments
    pairs.append((kernel.fn.__name__, direct, launched[-2], launched[-1]))


ce.launch = sm.launch = tlp.launch = both_ways


def same(ours, triton):
    if isinstance(ours, torch.Tensor) or callable(ours):
        return ours is triton
    if type(triton).__name__ == "LazyDict":  # launch metadata, for the launch hooks: none is registered here
        return ours is None
    return type(ours) is type(triton) and ours == triton


for dtype in (torch.bfloat16, torch.float32):
    base = torch.randn(7, 301).to(dtype)
    for x in (base[:, :300], base[:, 1:]):  # aligned rows, then a view 2 or 4 bytes off
        t = torch.randint(0, 300, (7,))
        leaf = x.clone().requires_grad_()
        for _ in range(3):
            softmax_gpu.softmax(x)
            softmax_gpu.log_softmax(x, dim=-1)
            torch.autograd.grad(softmax_gpu.softmax(leaf), leaf, torch.randn_like(x))
            for reduction in ("mean", "sum"):
                softmax_gpu.cross_entropy(x, t, reduction=reduction)
                torch.autograd.grad(softmax_gpu.cross_entropy(leaf, t.int(), reduction=reduction), leaf)
            loss = softmax_gpu.cross_entropy(leaf, t, reduction="none")
            torch.autograd.grad(loss, leaf, torch.rand(7))  # per-row upstream factors
            torch.autograd.grad(softmax_gpu.cross_entropy(leaf, t, label_smoothing=0.1, z_loss=1e-3), leaf)
            # token log-probabilities: both outputs and either upstream alone, per-row upstreams
            lp, ent = softmax_gpu.token_logprobs(leaf, t, temperature=0.8, return_entropy=True)
            torch.autograd.grad((lp, ent), leaf, (torch.randn(7), torch.randn(7)))
            torch.autograd.grad(softmax_gpu.token_logprobs(leaf, t.int(), ignore_index=3).sum(), leaf)
for dtype in (torch.bfloat16, torch.float16):  # few long rows: the split kernels (float16: its deferred backward)
    x = torch.randn(2, 70001).to(dtype)[:, 1:]
    t = torch.randint(0, 70000, (2,))
    leaf = x.clone().requires_grad_()
    for _ in range(3):
        softmax_gpu.softmax(x)
        torch.autograd.grad(softmax_gpu.log_softmax(leaf, dim=-1), leaf, torch.randn_like(x))
        torch.autograd.grad(softmax_gpu.cross_entropy(leaf, t, label_smoothing=0.1), leaf)
        lp, ent = softmax_gpu.token_logprobs(leaf, t, temperature=0.7, return_entropy=True)  # its split kernels
        torch.autograd.grad((lp, ent), leaf, (torch.randn(2), torch.randn(2)))
    leaf = torch.randn(3, 50).half().requires_grad_()  # rows that fit: the deferred backward's own kernel
    for _ in range(3):
        torch.autograd.grad(softmax_gpu.cross_entropy(leaf, t[:1].repeat(3) % 50), leaf)
from softmax_gpu.loss_options import LossOptions
from softmax_gpu.ops import vocab_parallel_cross_entropy as vp

vp.launch = both_ways
for _ in range(3):  # vocab-parallel kernels on one shard (no process group needed to launch them)
    for target, weight in ((torch.randint(0, 600, (5,)), torch.rand(300)), (torch.softmax(torch.randn(5, 300), -1), None)):
        logits = torch.randn(5, 300)
        soft = target.is_floating_point()
        width = vp.n_stats(soft, weight is not None, True)
        row_max, stats = torch.empty(5), torch.empty(5, width)
        options = LossOptions(-100, 0.1, 1e-3, 5.0)
        vp.launch_vocab_parallel_stats(logits, target, weight, row_max, stats, 600, 300, options)
        vp.launch_vocab_parallel_loss(logits, target, weight, row_max, stats, torch.empty(5), torch.empty(5),
                                      torch.empty(5, 300), torch.ones(()), torch.randn(5), 600, 300, options)
shipped_tiles = config.REDUCE_LAUNCH_TILES_PER_SM
config.REDUCE_LAUNCH_TILES_PER_SM = 0  # the reduction in its own launch, as for many rows
for _ in range(3):
    for reduction in ("mean", "sum"):
        leaf = torch.randn(7, 300).requires_grad_()
        torch.autograd.grad(softmax_gpu.cross_entropy(leaf, torch.randint(0, 300, (7,)), reduction=reduction), leaf)
config.REDUCE_LAUNCH_TILES_PER_SM = shipped_tiles
for dtype in (torch.bfloat16, torch.float32):  # cooperative rows: one launch, launch_cooperative_grid
    with config.force_cooperative(512, 12):
        for _ in range(3):
            softmax_gpu.softmax(torch.randn(5, 2000).to(dtype))  # whole vectors
            leaf = torch.randn(5, 2001).to(dtype).requires_grad_()  # heads and tails, and the backward
            torch.autograd.grad(softmax_gpu.log_softmax(leaf, dim=-1), leaf, torch.randn(5, 2001).to(dtype))
            t = torch.randint(0, 2001, (5,))
            torch.autograd.grad(softmax_gpu.cross_entropy(leaf, t, z_loss=1e-3), leaf)  # with its gradient
kernels = sorted({name for name, *_ in pairs})
direct = sum(d for _, d, *_ in pairs)
bad = [(name, i, a, b) for name, d, x, y in pairs if d
       for i, (a, b) in enumerate(zip(x, y)) if not same(a, b)]
bad += [(name, "length") for name, d, x, y in pairs if d and len(x) != len(y)]
print(json.dumps(dict(launches=len(pairs), direct=direct, kernels=kernels, mismatches=[repr(b) for b in bad[:5]])))
"""


@cpu_instrument
def test_direct_launch_passes_what_triton_passes():
    """softmax_gpu.runtime.launch's direct path calls the compiled kernel's launcher with the
    same arguments, in the same order, as Triton's own JITFunction.run for the same launch
    (Triton in compiled mode with a fake sm_90 driver, bench.host_time.fake_device: kernels
    compile with ptxas, the launcher records instead of calling CUDA; each compiled kernel
    has its own function handle, so a launch of the wrong specialisation shows). Every eager
    kernel of softmax, cross-entropy and token log-probabilities, split rows, cooperative rows
    (whose launcher also carries launch_cooperative_grid), the vocab-parallel stats and loss
    kernels and the deferred backward included;
    bfloat16, float16 and float32, aligned and misaligned rows (a new specialisation, so a
    new entry), scalar and per-row upstream factors, int32 targets."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", DIRECT_LAUNCH_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["mismatches"] == [], result
    assert result["direct"] >= result["launches"] // 2, result  # the first launch of each plan goes through Triton
    assert set(result["kernels"]) == {
        "softmax_fwd_kernel", "softmax_bwd_kernel", "cross_entropy_kernel", "cross_entropy_prepare_kernel",
        "scale_grad_kernel", "softmax_split_stats_kernel", "softmax_split_fwd_kernel",
        "softmax_split_bwd_stats_kernel", "softmax_split_bwd_kernel", "cross_entropy_split_stats_kernel",
        "cross_entropy_split_combine_kernel", "cross_entropy_split_backward_kernel", "cross_entropy_backward_kernel",
        "token_logprobs_fwd_kernel", "token_logprobs_bwd_kernel", "token_logprobs_partial_kernel",
        "token_logprobs_combine_kernel", "softmax_cooperative_fwd_kernel", "softmax_cooperative_bwd_kernel",
        "cross_entropy_cooperative_kernel", "cross_entropy_reduce_kernel", "vocab_parallel_stats_kernel",
        "vocab_parallel_loss_kernel",
    }, result  # fmt: skip


def test_direct_launches_on_a_gpu_give_the_same_results():
    """On a GPU: repeated eager calls take the direct path (softmax_gpu.runtime.launch) and
    give bit-for-bit what the same calls give through Triton's own launch."""
    import pytest
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (tests/test_host_time.py checks the arguments on the CPU)")
    import softmax_gpu
    from softmax_gpu import runtime

    x = torch.randn(33, 3001, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, 3001, (33,), device="cuda")

    def results():
        leaf = x.clone().requires_grad_()
        loss = softmax_gpu.cross_entropy(leaf, t, label_smoothing=0.1)
        (grad,) = torch.autograd.grad(loss * 3.0, leaf)
        y = x.float().requires_grad_()
        (dy,) = torch.autograd.grad(softmax_gpu.softmax(y), y, torch.ones_like(y))
        return loss, grad, softmax_gpu.log_softmax(x, dim=-1), dy

    before = runtime.direct_launches
    first, direct = results(), results()
    assert runtime.direct_launches > before
    saved = runtime.DIRECT_LAUNCH
    runtime.DIRECT_LAUNCH = False
    try:
        through_triton = results()
    finally:
        runtime.DIRECT_LAUNCH = saved
    for a, b, c in zip(first, direct, through_triton):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_cooperative_residency_rule_reads_the_loaded_kernel():
    """The cooperative launchers size their groups by what the compiled kernel leaves an SM
    (softmax_gpu.runtime.fit_cooperative): its registers are known only once Triton has loaded
    the binary (CompiledKernel's `run` property), and the rule is the CUDA occupancy rule the
    compile report prints (3 programs of 8 warps at 80 registers, 2 at 88; shared memory and
    threads too)."""
    from types import SimpleNamespace

    from softmax_gpu import runtime

    class Compiled:  # a CompiledKernel before its binary is loaded: no n_regs yet
        metadata = SimpleNamespace(shared=1024, num_warps=8)

        @property
        def run(self):
            self.n_regs = 80
            return None

    assert runtime.compiled_resources(Compiled()) == (80, 1024, 8)
    assert runtime.resident_programs(80, 1024, 8) == 3 and runtime.resident_programs(88, 1024, 8) == 2
    assert runtime.resident_programs(168, 1024, 4) == 3  # cross-entropy's family
    assert runtime.resident_programs(32, 100 << 10, 4) == 2  # shared memory bound
    assert runtime.resident_programs(16, 0, 32) == 2  # threads bound (2048 an SM)
