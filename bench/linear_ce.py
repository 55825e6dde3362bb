"""Fused linear cross-entropy: time, peak memory and TFLOP/s on a GPU; the memory table on CPU.

    python -m bench --ops linear_ce_fwd_bwd linear_ce_fwd      (or python -m bench.linear_ce)

Cases are (tokens N, hidden H, classes V) in bfloat16: the LM heads of the issue. Providers:
softmax_gpu, unfused torch (F.linear then F.cross_entropy), torch 2.13's chunked
F.linear_cross_entropy, torch.compile of the unfused pair, and Liger-Kernel's
FusedLinearCrossEntropy, Cut Cross-Entropy and QuACK when importable (skipped with the reason
otherwise). Figures: median milliseconds, peak memory above the inputs, and TFLOP/s counting
2 N H V for the forward's product and 4 x 2 N H V for forward + backward (the forward, the
logits recomputed once, dX and dW: what an ideal fused kernel must multiply; ours multiplies
5 x 2 N H V, recomputing the logits in each backward kernel to stay deterministic).

Without a GPU: the largest single tensor and the total allocated during one forward +
backward at small sizes, from torch's CPU allocator (the profiler), for softmax_gpu (kernels
in Triton's interpreter) against the unfused and chunked torch paths; plus the FLOP count of
the real cases. No time is reported on CPU.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

OPS = ("linear_ce_fwd", "linear_ce_fwd_bwd")
SHAPES = ((8192, 4096, 128256), (8192, 2304, 256000), (4096, 4096, 32000))
CPU_SHAPES = ((128, 32, 1024), (256, 32, 2048))  # N x V grows 4x, H fixed: the interpreter's sizes
PROVIDERS = ("softmax_gpu", "torch", "torch.chunked", "torch.compile", "liger", "cce", "quack")


def flops(op: str, n: int, h: int, v: int) -> int:
    """Multiply-adds x 2 an ideal fused kernel needs: 2NHV forward; 4 x 2NHV forward + backward."""
    return 2 * n * h * v * (1 if op == "linear_ce_fwd" else 4)


def _torch_unfused(x, w, t):
    return F.cross_entropy(F.linear(x, w), t)


def _torch_chunked():
    options = torch.nn.LinearCrossEntropyOptions()  # AttributeError before torch 2.13
    return lambda x, w, t: F.linear_cross_entropy(x, w, t, options=options)


def _liger():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss()
    return lambda x, w, t: loss(w, x, t)  # Liger takes the weight first


def _cce():
    from cut_cross_entropy import linear_cross_entropy

    return lambda x, w, t: linear_cross_entropy(x, w, t)


def _quack():
    from quack.linear_cross_entropy import chunked_linear_cross_entropy

    return lambda x, w, t: chunked_linear_cross_entropy(x, w, t)


def _ours():
    import softmax_gpu

    return lambda x, w, t: softmax_gpu.linear_cross_entropy(x, w, t)


FACTORIES = {
    "softmax_gpu": _ours,
    "torch": lambda: _torch_unfused,
    "torch.chunked": _torch_chunked,
    "torch.compile": lambda: torch.compile(_torch_unfused, dynamic=False),
    "liger": _liger,
    "cce": _cce,
    "quack": _quack,
}


def load(names):
    """{name: loss(x, w, target)} for the providers that import, {name: reason} for the others."""
    loaded, missing = {}, {}
    for name in names:
        try:
            loaded[name] = FACTORIES[name]()
        except Exception as exc:  # optional dependencies fail in many ways
            missing[name] = f"{type(exc).__name__}: {exc}"
    return loaded, missing


def make_inputs(n, h, v, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, h, device=device, generator=g).to(dtype)
    w = (torch.randn(v, h, device=device, generator=g) / h**0.5).to(dtype)
    t = torch.randint(0, v, (n,), device=device, generator=g)
    return x, w, t


def runner(op, loss_fn, x, w, t):
    """One run of op: the loss (forward only, no grad) or the gradients of x and w."""
    if op == "linear_ce_fwd":

        def forward():
            with torch.no_grad():
                return loss_fn(x, w, t)

        return forward
    xl, wl = x.detach().requires_grad_(), w.detach().requires_grad_()
    return lambda: torch.autograd.grad(loss_fn(xl, wl, t), (xl, wl))


# ---------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------


def measure_gpu(ops, providers):
    import triton.testing

    loaded, missing = load(providers)
    for name, reason in missing.items():
        print(f"skipping provider {name}: not importable ({reason})")
    rows = []
    for op in ops:
        for n, h, v in SHAPES:
            x, w, t = make_inputs(n, h, v, torch.bfloat16, "cuda")
            reference = None
            for name, loss_fn in loaded.items():
                row = dict(op=op, shape=f"{n}x{h}x{v}", provider=name, ms=None, tflops=None, peak_extra_gb=None,
                           note="")  # fmt: skip
                try:
                    run = runner(op, loss_fn, x, w, t)
                    loss = runner("linear_ce_fwd", loss_fn, x, w, t)().float()
                    reference = loss if reference is None else reference
                    if not torch.allclose(loss, reference, rtol=2e-2, atol=2e-2):
                        row["note"] = f"loss {loss.item():.4f} differs from {reference.item():.4f}"
                    row["ms"] = triton.testing.do_bench(run, warmup=10, rep=50, return_mode="median")
                    row["tflops"] = flops(op, n, h, v) / (row["ms"] * 1e-3) / 1e12
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    out = run()
                    torch.cuda.synchronize()
                    del out
                    row["peak_extra_gb"] = (torch.cuda.max_memory_allocated() - base) / 1e9
                except torch.cuda.OutOfMemoryError:
                    row["note"] = "out of memory"
                except Exception as exc:
                    row["note"] = f"{type(exc).__name__}: {str(exc)[:120]}"
                finally:
                    torch.cuda.empty_cache()
                rows.append(row)
    print(f"{'op':<19}{'N x H x V':<20}{'provider':<15}{'ms':>9}{'TFLOP/s':>9}{'peak+ GB':>10}  note")
    for r in rows:
        fmt = lambda value, spec: format(value, spec) if value is not None else "-"  # noqa: E731
        print(f"{r['op']:<19}{r['shape']:<20}{r['provider']:<15}{fmt(r['ms'], '9.2f'):>9}{fmt(r['tflops'], '9.1f'):>9}"
              f"{fmt(r['peak_extra_gb'], '10.2f'):>10}  {r['note']}")  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------
# CPU: the allocation tracker
# ---------------------------------------------------------------------------------------


def allocations(fn):
    """(largest single tensor, total) bytes allocated by torch's CPU allocator while fn() runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes = [e.cpu_memory_usage for e in prof.events() if not e.cpu_children and e.cpu_memory_usage > 0]
    return max(sizes, default=0), sum(sizes)


def memory_table(shapes, dtype=torch.float32):
    """Rows (N, H, V, provider, largest, total, logits bytes) for forward + backward on CPU."""
    providers = {"softmax_gpu": _ours(), "torch": _torch_unfused}
    try:
        providers["torch.chunked"] = _torch_chunked()
    except AttributeError:
        pass
    rows = []
    for n, h, v in shapes:
        x, w, t = make_inputs(n, h, v, dtype, "cpu")
        for name, loss_fn in providers.items():
            largest, total = allocations(runner("linear_ce_fwd_bwd", loss_fn, x, w, t))
            rows.append((n, h, v, name, largest, total, n * v * x.element_size()))
    return rows


def format_memory_table(rows) -> str:
    lines = ["Allocations during one forward + backward (float32, torch's CPU allocator; kernels in the interpreter):",
             f"{'N x H x V':<18}{'provider':<15}{'largest tensor':>15}{'total':>12}{'logits N x V':>14}"]  # fmt: skip
    for n, h, v, name, largest, total, logits in rows:
        lines.append(f"{f'{n}x{h}x{v}':<18}{name:<15}{largest:>15,}{total:>12,}{logits:>14,}")
    return "\n".join(lines)


def cpu_report(ops) -> None:
    print("No CUDA GPU: the fused linear cross-entropy's memory table and FLOP counts (no timings).\n")
    print(format_memory_table(memory_table(CPU_SHAPES)))
    print("\nFLOPs an ideal kernel needs at the benchmark's cases (softmax_gpu multiplies 5/4 of the fwd+bwd figure):")
    for op in ops:
        for n, h, v in SHAPES:
            print(f"  {op:<19}{n} x {h} x {v}: {flops(op, n, h, v):.3e}")


def main(argv=None, ops=OPS) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.linear_ce", description=__doc__.splitlines()[0])
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(ops))
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    args = parser.parse_args(argv)
    if torch.cuda.is_available():
        measure_gpu(args.ops, args.providers)
    else:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
        cpu_report(args.ops)
    return 0


if __name__ == "__main__":
    sys.exit(main())
