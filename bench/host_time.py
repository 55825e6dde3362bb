"""Host time of the eager path, measured on the CPU with the GPU's part stubbed out.

    python -m bench.host_time [--shape 4096x32000] [--dtype bfloat16] [--reps 300]

What a user's Python pays per call before the GPU sees work (argument checks, the custom-op
dispatcher or its eager bypass, the launch plan, output allocation, autograd, Triton's
launch path) is the same code on any machine, so it can be timed without a GPU. The ops
run on CPU tensors with Triton in compiled mode, two ways:

  ours    JITFunction.run replaced by a stub that counts the launch: this package's host
          path alone.
  triton  Triton's own launch path as on a GPU (binding the arguments, the specialisation
          key, the kernel cache, or softmax_gpu.runtime.launch's direct launch), with a fake
          driver for an sm_90 device (fake_device(): kernels compile for sm_90 on first
          use, and the compiled kernel's launcher, the C call into the CUDA driver, is the
          stub). The driver call itself, a few microseconds, is all it leaves out.

Allocation: on a GPU the outputs come from torch's caching allocator (no system call); CPU
tensors this large would each be mapped and unmapped by glibc, tens of microseconds a call
that a GPU call never pays, so the tool re-runs itself with glibc told to keep freed memory
(MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_), and with TRITON_INTERPRET unset.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

OPS = ("softmax_fwd", "softmax_fwd_bwd", "log_softmax_fwd", "ce_fwd", "ce_fwd_bwd", "logprobs_fwd", "logprobs_fwd_bwd")


def _skip_cpu_checks():
    """Let CPU tensors through the device check, and leave out the CPU-only range check of
    class indices (a CUDA call skips it: it would sync): neither is on a GPU's host path."""
    import importlib
    import pkgutil

    import softmax_gpu.ops
    from softmax_gpu import runtime

    modules = [importlib.import_module(f"softmax_gpu.ops.{m.name}") for m in pkgutil.iter_modules(softmax_gpu.ops.__path__)]
    for module in [runtime] + modules:
        if hasattr(module, "check_launchable"):
            module.check_launchable = lambda *args, **kwargs: None
        if hasattr(module, "_check_class_indices"):
            module._check_class_indices = lambda *args, **kwargs: None


def stub_launches():
    """Replace every Triton launch (JITFunction.run) with a counter; returns the counter (a
    one-element list)."""
    import triton.runtime.jit

    launches = [0]

    def run(self, *args, grid, warmup, **kwargs):
        launches[0] += 1

    triton.runtime.jit.JITFunction.run = run
    from softmax_gpu import runtime

    runtime.DIRECT_LAUNCH = False  # every launch reaches the stub (there is no compiled kernel to call)
    _skip_cpu_checks()
    return launches


def fake_device():
    """Triton's launch path for real on this CPU: a driver that reports device 0 of an sm_90
    target on stream 0, compiled kernels whose launcher appends its arguments to the list
    returned (instead of calling the CUDA driver), and the device checks skipped. Kernels
    compile for sm_90 on their first launch (ptxas runs; no GPU is needed)."""
    import torch
    import triton.compiler.compiler as triton_compiler
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    class FakeDriver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    launched = []

    def init_handles(self):  # CompiledKernel._init_handles without loading a module onto a GPU
        if self.module is None:  # (a function handle of its own: a launch of the wrong kernel shows)
            self.module, self.function, self._run = object(), id(self), lambda *args: launched.append(args)

    triton_compiler.CompiledKernel._init_handles = init_handles
    driver.set_active(FakeDriver())
    _skip_cpu_checks()
    return launched


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
    if op == "logprobs_fwd":  # an RL rollout's scoring: log-probabilities and entropy at T = 0.8

        def score():
            with torch.no_grad():
                return softmax_gpu.token_logprobs(x, target, temperature=0.8, return_entropy=True)

        return score
    if op == "logprobs_fwd_bwd":  # a policy-gradient step's backward through both outputs
        upstream = (torch.randn(rows), torch.randn(rows))

        def step():
            outputs = softmax_gpu.token_logprobs(leaf, target, temperature=0.8, return_entropy=True)
            return torch.autograd.grad(outputs, leaf, upstream)[0]

        return step
    raise ValueError(f"unknown op {op!r}; expected one of {OPS}")


def measure(ops, rows, cols, dtype, reps, launcher="ours"):
    """[(op, median µs per call, launches per call)], with launches stubbed as `launcher` says
    ("ours" or "triton"; one per process: the stubs replace Triton's own functions)."""
    if launcher == "ours":
        launches = stub_launches()
        count = lambda: launches[0]  # noqa: E731
    else:
        launched = fake_device()
        count = lambda: len(launched)  # noqa: E731
    table = []
    for op in ops:
        call = calls(op, rows, cols, dtype)
        for _ in range(20):  # warm-up: first-call caches (and compiles), torch's dispatcher
            call()
        before = count()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        table.append((op, statistics.median(times) * 1e6, (count() - before) / reps))
    return table


KEEP_FREED_MEMORY = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**62)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.host_time", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="4096x32000", metavar="ROWSxCOLS")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--reps", type=int, default=300)
    parser.add_argument("--launcher", choices=("ours", "triton", "both"), default="both",
                        help="what is stubbed: Triton's JITFunction.run (ours), or only the compiled kernel's "
                        "call into the driver (triton); both: one process each")  # fmt: skip
    parser.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)  # the child processes' output
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not args.raw:  # a process per launcher: compiled-mode Triton, glibc keeping freed memory
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.update(KEEP_FREED_MEMORY)
        launchers = ("ours", "triton") if args.launcher == "both" else (args.launcher,)
        results = []
        for launcher in launchers:
            out = subprocess.run([sys.executable, "-m", "bench.host_time", *argv, "--launcher", launcher, "--raw"],
                                 env=env, capture_output=True, text=True)  # fmt: skip
            if out.returncode:
                sys.stderr.write(out.stdout + out.stderr)
                return out.returncode
            results.append({line.split()[0]: line.split()[1:] for line in out.stdout.splitlines() if line.strip()})
        print(f"Host time per eager call on this CPU ({args.shape}, {args.dtype}, median of {args.reps}); "
              f"ours: Triton's JITFunction.run stubbed; triton: Triton's launch path run, only the driver call stubbed:")
        print(f"{'op':<18}" + "".join(f"{name + ' µs':>12}" for name in launchers) + f"{'launches':>10}")
        for op in args.ops:
            print(f"{op:<18}" + "".join(f"{float(r[op][0]):>12.1f}" for r in results) + f"{float(results[0][op][1]):>10.2f}")
        return 0
    import torch

    rows, cols = (int(v) for v in args.shape.lower().split("x"))
    for op, us, n in measure(args.ops, rows, cols, getattr(torch, args.dtype), args.reps, args.launcher):
        print(f"{op} {us:.2f} {n:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
