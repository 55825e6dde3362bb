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
