"""Host time of the eager path, measured on the CPU with every kernel launch stubbed out.

    python -m bench.host_time [--shape 4096x32000] [--dtype bfloat16] [--reps 300]

What a user's Python pays per call before the GPU sees work (argument checks, the custom-op
dispatcher or its eager bypass, the launch plan, output allocation, autograd) is the same
code on any machine, so it can be timed without a GPU: the ops run on CPU tensors with
Triton's real (compiled-mode) JIT functions, whose `run` is replaced by a stub that counts
the launch and returns. The figure leaves out Triton's own launcher (binding the arguments,
looking up the compiled kernel, the driver call), which the scoreboard's eager time on a GPU
includes; it is the part of the host path this package owns.

It needs Triton imported in compiled mode: with TRITON_INTERPRET=1 in the environment it
re-runs itself without it.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

OPS = ("softmax_fwd", "softmax_fwd_bwd", "log_softmax_fwd", "ce_fwd", "ce_fwd_bwd")


def stub_launches():
    """Replace every Triton launch with a counter and let CPU tensors through the device check;
    returns the counter (a one-element list)."""
    import importlib
    import pkgutil

    import triton.runtime.jit

    import softmax_gpu.ops
    from softmax_gpu import runtime

    modules = [importlib.import_module(f"softmax_gpu.ops.{m.name}") for m in pkgutil.iter_modules(softmax_gpu.ops.__path__)]

    launches = [0]

    def run(self, *args, grid, warmup, **kwargs):
        launches[0] += 1

    triton.runtime.jit.JITFunction.run = run
    for module in [runtime] + modules:
        if hasattr(module, "check_launchable"):
            module.check_launchable = lambda *args, **kwargs: None
        if hasattr(module, "_check_class_indices"):
            # The eager range check of class indices runs on CPU tensors only (a CUDA call
            # skips it: it would sync), so it is no part of the host path being measured.
            module._check_class_indices = lambda *args, **kwargs: None
    return launches


def calls(op: str, rows: int, cols: int, dtype):
    """The eager call of `op` as the scoreboard makes it, on CPU tensors."""
    import torch

    import softmax_gpu

    x = torch.randn(rows, cols).to(dtype)
    target = torch.randint(0, cols, (rows,))
    if op == "softmax_fwd":
        return lambda: softmax_gpu.softmax(x)
    if op == "log_softmax_fwd":
        return lambda: softmax_gpu.log_softmax(x)
    leaf = x.clone().requires_grad_()
    if op == "softmax_fwd_bwd":
        dy = torch.randn(rows, cols).to(dtype)
        return lambda: torch.autograd.grad(softmax_gpu.softmax(leaf), leaf, dy)[0]
    if op == "ce_fwd":

        def forward():
            with torch.no_grad():
                return softmax_gpu.cross_entropy(x, target)

        return forward
    if op == "ce_fwd_bwd":
        return lambda: torch.autograd.grad(softmax_gpu.cross_entropy(leaf, target), leaf)[0]
    raise ValueError(f"unknown op {op!r}; expected one of {OPS}")


def measure(ops, rows, cols, dtype, reps):
    """[(op, median µs per call, launches per call)]."""
    launches = stub_launches()
    table = []
    for op in ops:
        call = calls(op, rows, cols, dtype)
        for _ in range(20):  # warm-up: first-call caches, torch's dispatcher
            call()
        launches[0] = 0
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        table.append((op, statistics.median(times) * 1e6, launches[0] / reps))
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.host_time", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="4096x32000", metavar="ROWSxCOLS")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--reps", type=int, default=300)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":  # compiled-mode Triton is what users run
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "bench.host_time", *(argv or sys.argv[1:])], env=env).returncode
    import torch

    rows, cols = (int(v) for v in args.shape.lower().split("x"))
    table = measure(args.ops, rows, cols, getattr(torch, args.dtype), args.reps)
    print(f"Host time per eager call on this CPU, kernel launches stubbed ({args.shape}, {args.dtype}, "
          f"median of {args.reps}; Triton's own launcher not included):")  # fmt: skip
    print(f"{'op':<18}{'host µs':>9}{'launches':>10}")
    for op, us, n in table:
        print(f"{op:<18}{us:>9.1f}{n:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
