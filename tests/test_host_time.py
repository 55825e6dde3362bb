"""bench.host_time: the eager host path timed on the CPU with kernel launches stubbed.

Times are benchmark figures and are not asserted; the launches each eager call makes are
exact, and are."""
import os
import subprocess
import sys
from pathlib import Path

from helpers import cpu_instrument

ROOT = Path(__file__).resolve().parents[1]


@cpu_instrument
def test_host_time_runs_compiled_mode_triton_with_stub_launches():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run(
        [sys.executable, "-m", "bench.host_time", "--reps", "3", "--shape", "8x300"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines()[2:]}
    # the launches the traffic model gives for each path (pinned against the interpreter in
    # tests/test_traffic_model.py): the eager path launches nothing else
    import torch

    from bench.traffic_model import ours

    def model(op):
        return ours(op, 8, 300, torch.bfloat16, sm_count=132).launches

    expected = dict(softmax_fwd=model("softmax_fwd"), log_softmax_fwd=model("log_softmax_fwd"),
                    softmax_fwd_bwd=model("softmax_fwd") + model("softmax_bwd"), ce_fwd=model("ce_fwd"),
                    ce_fwd_bwd=model("ce_fwd_bwd"))  # fmt: skip
    assert {op: float(v[1]) for op, v in rows.items()} == expected, out.stdout
    assert all(float(v[0]) > 0 for v in rows.values())


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
