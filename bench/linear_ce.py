"""Linear cross-entropy: the scoreboard on a GPU (or its dry run); the memory table on CPU.

    python -m bench.linear_ce [--quick] [--dry-run] [--ops ...] [--providers ...] [--out DIR]
    (also python -m bench --ops linear_ce_fwd_bwd linear_ce_fwd)

Cases are (tokens N, hidden H, classes V) in bfloat16: language-model heads. Providers:
softmax_gpu, unfused torch (F.linear then F.cross_entropy), torch's chunked
F.linear_cross_entropy (torch 2.13 and later), torch.compile of the unfused pair,
Liger-Kernel's fused linear cross-entropy, Cut Cross-Entropy in its default mode (gradient
filtering) and in its exact mode (no filtering), and QuACK, each when importable (skipped
with the reason otherwise).

Inputs look like training, not like noise: with N(0, 1) hidden states and weights the
logits are all about N(0, 1), the loss is near log V, and a gradient filter that skips
tiles of negligible probability (Cut Cross-Entropy's default) skips nothing it would skip
in training while a kernel that skips nothing is charged the same. Here (make_inputs) each
token's hidden state leans toward its target's weight row: x = beta w_t + e, with W's
entries N(0, 1/H) and e's N(0, 1). The other logits are then about N(0, 1) and the
target's about beta + N(0, 1); beta = log(V - 1) + 1/2 - log(e^L - 1) puts the mean loss
near L = 2.5 nats (each run reports the loss it measured).

Figures per row, as in the main scoreboard (bench/gpu.py): gated against float64 first
(the loss, and for forward + backward dX and dW by relative Frobenius error), then device
time (CUDA graphs; eager time only where a call cannot be captured, with the reason) and
eager time, each with its timer, repetitions and spread, the card warmed first and its
clocks read after each case; TFLOP/s from device time (and, separately, from eager time)
counting 2 N H V for the forward's product and 3 x 2 N H V for forward + backward (logits,
dX and dW: the fewest products there are), and peak memory above the inputs and the
returned loss or gradients. The "cublas" row is the ceiling: those products alone, in
cuBLAS, in the same run (not gated: it computes no loss).

Without a GPU and without --dry-run: the largest single tensor and the total allocated
during one forward + backward at small sizes, from torch's CPU allocator (the profiler),
for softmax_gpu (kernels in Triton's interpreter) against the unfused and chunked torch
paths; plus the FLOP count of the real cases. No time is reported on CPU.
"""
import argparse
import math
import os
import statistics
import sys
import tempfile

import torch
import torch.nn.functional as F

OPS = ("linear_ce_fwd", "linear_ce_fwd_bwd")
SHAPES = ((8192, 4096, 128256), (8192, 2304, 256000), (4096, 4096, 32000))
QUICK_SHAPES = ((8192, 4096, 128256),)
DRY_RUN_SHAPES = ((64, 32, 500),)
CPU_SHAPES = ((128, 32, 1024), (256, 32, 2048))  # N x V grows 4x, H fixed: the interpreter's sizes
PROVIDERS = ("softmax_gpu", "softmax_gpu.fused", "softmax_gpu.skip", "softmax_gpu.low_memory",
             "softmax_gpu.low_memory.fused", "cublas", "torch", "torch.chunked", "torch.compile", "liger", "cce",
             "cce.exact", "quack")  # fmt: skip
# ".fused": the logits by linear_logits_kernel with the statistics in its epilogue
# (config.fused_logits), against the same mode with cuBLAS's logits: the measurement that
# decides which route ships (docs/linear-cross-entropy.md)
LABELS = {"cce": "cce (filtered)", "cce.exact": "cce (exact)", "softmax_gpu": "softmax_gpu (speed)",
          "softmax_gpu.fused": "ours (speed,fused)", "softmax_gpu.skip": "softmax_gpu (skip)",
          "softmax_gpu.low_memory": "softmax_gpu (low_mem)", "softmax_gpu.low_memory.fused": "ours (lowmem,fused)",
          "cublas": "cuBLAS products"}  # fmt: skip
PRODUCTS = object()  # the "cublas" provider: the matrix products alone, not a loss (the ceiling)
# Host synchronisations inside the call (read in their sources): eager time only.
NO_GRAPH = {
    "liger": "host syncs: .item() in the forward, torch.equal on the upstream in the backward",
    "cce": "host sync: .nonzero() on every call",
    "cce.exact": "host sync: .nonzero() on every call",
}
TARGET_LOSS = 2.5  # nats: the mean loss the inputs are drawn for
REPEATS = 3
# The gate: the loss within 2^-7 relative; dX and dW within 2^-4 by relative Frobenius norm,
# since a path that materialises bfloat16 logits (torch's unfused one) rounds a logit of 10
# by up to 0.03, which moves its probability by 3%.
LOSS_TOL, GRAD_TOL = 2**-7, 2**-4
REFERENCE_ROWS = 1024  # float64 logits computed this many rows at a time


def flops(op: str, n: int, h: int, v: int) -> int:
    """Multiply-adds x 2 the fewest products need: 2NHV forward; 3 x 2NHV forward + backward
    (logits, dX, dW: the speed mode's count; the low-memory mode does 4)."""
    return 2 * n * h * v * (1 if op == "linear_ce_fwd" else 3)


def _torch_unfused(x, w, t):
    return F.cross_entropy(F.linear(x, w), t)


def _torch_chunked():
    options = torch.nn.LinearCrossEntropyOptions()  # AttributeError before torch 2.13
    return lambda x, w, t: F.linear_cross_entropy(x, w, t, options=options)


def _liger():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss()
    return lambda x, w, t: loss(w, x, t)  # Liger takes the weight first


def _cce(**options):
    def factory():
        from cut_cross_entropy import linear_cross_entropy

        return lambda x, w, t: linear_cross_entropy(x, w, t, **options)

    return factory


def _quack():
    from quack.linear_cross_entropy import chunked_linear_cross_entropy

    return lambda x, w, t: chunked_linear_cross_entropy(x, w, t)


def _ours(mode="speed", skip=False, fused=False):
    """softmax_gpu.linear_cross_entropy in `mode`; with skip, grad_skip_threshold at Cut
    Cross-Entropy's own default for the input's dtype (its machine epsilon / 32: 2^-12 for
    bfloat16), so that the two filtered rows filter alike; fused: the logits from
    linear_logits_kernel (forward and backward: the backward runs inside the switch too,
    since autograd calls it from the loss's backward() within the timed call)."""

    def factory():
        import softmax_gpu
        from softmax_gpu import config

        def loss(x, w, t):
            threshold = torch.finfo(x.dtype).eps / 32 if skip else None
            with config.fused_logits(fused):
                return softmax_gpu.linear_cross_entropy(x, w, t, mode=mode, grad_skip_threshold=threshold)

        return loss

    return factory


def products(op, x, w):
    """The ceiling: the matrix products of the speed mode alone, in cuBLAS, in the inputs'
    dtype: z = x W^T (forward); and dX = z W, dW = z^T x (forward + backward: 3 products; the
    low-memory mode's 4 take 4/3 of this)."""
    if op == "linear_ce_fwd":
        return lambda: torch.mm(x, w.t())

    def call():
        z = torch.mm(x, w.t())
        return torch.mm(z, w), torch.mm(z.t(), x)

    return call


FACTORIES = {
    "softmax_gpu": _ours("speed"),
    "softmax_gpu.skip": _ours("speed", skip=True),
    "softmax_gpu.low_memory": _ours("low_memory"),
    "softmax_gpu.fused": _ours("speed", fused=True),
    "softmax_gpu.low_memory.fused": _ours("low_memory", fused=True),
    "cublas": lambda: PRODUCTS,
    "torch": lambda: _torch_unfused,
    "torch.chunked": _torch_chunked,
    "torch.compile": lambda: torch.compile(_torch_unfused, dynamic=False),
    "liger": _liger,
    "cce": _cce(),
    "cce.exact": _cce(filter_eps=None),  # no gradient filtering: every tile's gradient computed
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


def make_inputs(n, h, v, dtype, device, seed=0, target_loss=TARGET_LOSS):
    """Hidden states, classifier and targets whose logits have a trained model's spread (module docstring)."""
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(v, h, device=device, generator=g) / h**0.5
    t = torch.randint(0, v, (n,), device=device, generator=g)
    beta = math.log(v - 1) + 0.5 - math.log(math.expm1(target_loss))
    x = beta * w[t] + torch.randn(n, h, device=device, generator=g)
    return x.to(dtype), w.to(dtype), t


def runner(op, loss_fn, x, w, t):
    """One run of op: the loss (forward only, no grad) or the gradients of x and w."""
    if op == "linear_ce_fwd":

        def forward():
            with torch.no_grad():
                return loss_fn(x, w, t)

        return forward
    xl, wl = x.detach().requires_grad_(), w.detach().requires_grad_()
    return lambda: torch.autograd.grad(loss_fn(xl, wl, t), (xl, wl))


def reference(x, w, t, with_grads: bool):
    """float64 loss, and dX, dW of the mean loss, computed REFERENCE_ROWS rows at a time."""
    x64, w64 = x.double(), w.double()
    n = x.shape[0]
    loss = torch.zeros((), dtype=torch.float64, device=x.device)
    dx = torch.empty_like(x64) if with_grads else None
    dw = torch.zeros_like(w64) if with_grads else None
    for r0 in range(0, n, REFERENCE_ROWS):
        xs, ts = x64[r0 : r0 + REFERENCE_ROWS], t[r0 : r0 + REFERENCE_ROWS]
        z = xs @ w64.T
        lse = torch.logsumexp(z, -1)
        loss += (lse - z.gather(1, ts[:, None])[:, 0]).sum()
        if with_grads:
            dz = torch.exp(z - lse[:, None])
            dz[torch.arange(len(ts), device=x.device), ts] -= 1
            dz /= n
            dx[r0 : r0 + REFERENCE_ROWS] = dz @ w64
            dw += dz.T @ xs
    return loss / n, dx, dw


def gate(op, out, ref) -> tuple:
    """(ok, text): the loss, or dX and dW, against the float64 reference."""
    loss64, dx64, dw64 = ref
    if op == "linear_ce_fwd":
        if not isinstance(out, torch.Tensor) or out.numel() != 1:
            return False, f"wrong: loss of shape {getattr(out, 'shape', type(out).__name__)}"
        err = float((out.double().reshape(()) - loss64).abs() / loss64.abs().clamp_min(1))
        tol = LOSS_TOL
        what = "loss"
    else:
        errs = []
        for name, got, want in (("dX", out[0], dx64), ("dW", out[1], dw64)):
            if got is None or tuple(got.shape) != tuple(want.shape):
                return False, f"wrong: {name} of shape {getattr(got, 'shape', None)}"
            e = float(torch.linalg.vector_norm(got.double() - want) / torch.linalg.vector_norm(want))
            errs.append((e if math.isfinite(e) else math.inf, name))
        err, what = max(errs)
        tol = GRAD_TOL
    if not err <= tol:
        return False, f"wrong: {what} err {err:.2e} > {tol:.1e}"
    return True, f"ok (max err {err:.1e} <= {tol:.1e})"


# ---------------------------------------------------------------------------------------
# The scoreboard (GPU, or the dry run on CPU)
# ---------------------------------------------------------------------------------------


def measure(platform, ops, shapes, providers, repeats=REPEATS, save=None):
    """Rows for every (shape, op, provider); `save(rows)` is called after each op, so a run
    cut short keeps what it measured."""
    timers = list(platform.timers)

    loaded, missing = load(providers)
    for name, reason in missing.items():
        print(f"skipping provider {name}: not importable ({reason})")
    rows = []
    for n, h, v in shapes:
        x, w, t = make_inputs(n, h, v, torch.bfloat16, platform.device)
        for op in ops:
            ref = reference(x, w, t, with_grads=op == "linear_ce_fwd_bwd")
            print(f"{op} {n}x{h}x{v}: float64 mean loss {float(ref[0]):.3f} nats", flush=True)
            runs = []
            for name, loss_fn in loaded.items():
                row = dict(op=op, shape=f"{n}x{h}x{v}", provider=name, label=LABELS.get(name, name), status="ok",
                           gate=None, loss=None, reference_loss=float(ref[0]), device_ms=None, device_ms_min=None,
                           device_ms_max=None, device_timer=None, device_repeats=0, eager_ms=None,
                           eager_ms_min=None, eager_ms_max=None, eager_timer=None, repeats=0, tflops=None,
                           tflops_eager=None, peak_extra_bytes=None, note="")  # fmt: skip
                if name in NO_GRAPH:
                    row["note"] = f"eager_ms only: not capturable in a CUDA graph ({NO_GRAPH[name]})"
                if loss_fn is PRODUCTS:
                    runs.append((row, products(op, x, w), [], []))
                    row["gate"] = "not gated: the products alone, the ceiling"
                    try:
                        row["peak_extra_bytes"] = platform.peak_extra_bytes(_Prepared(runs[-1][1], x, w))
                    except Exception as exc:
                        row.update(status="oom" if isinstance(exc, torch.cuda.OutOfMemoryError) else "error",
                                   note=f"{type(exc).__name__}: {str(exc)[:160]}")  # fmt: skip
                    continue
                runs.append((row, runner(op, loss_fn, x, w, t), [], []))
                try:
                    out = runs[-1][1]()
                    if op == "linear_ce_fwd":
                        row["loss"] = float(out)
                    ok, row["gate"] = gate(op, out, ref)
                    del out
                    if not ok:
                        row["status"] = "wrong"
                        continue
                    row["peak_extra_bytes"] = platform.peak_extra_bytes(_Prepared(runs[-1][1], x, w))
                except Exception as exc:
                    row.update(status="oom" if isinstance(exc, torch.cuda.OutOfMemoryError) else "error",
                               note=f"{type(exc).__name__}: {str(exc)[:160]}")  # fmt: skip
            time_interleaved(platform, runs, repeats)
            for row, call, device, eager in runs:
                if record_times(row, device, eager, timers):
                    row["tflops_eager"] = flops(op, n, h, v) / (row["eager_ms"] * 1e-3) / 1e12
                    if device and row["device_ms"] > 0:
                        row["tflops"] = flops(op, n, h, v) / (row["device_ms"] * 1e-3) / 1e12
                rows.append(row)
            if save is not None:
                save(rows)
            del runs, ref
            if platform.device == "cuda":
                torch.cuda.empty_cache()
        del x, w, t
    return rows


def time_interleaved(platform, runs, repeats):
    """Times each (row, call, device samples, eager samples) of `runs` `repeats` times, the
    providers interleaved (each repetition starts one provider later), appending to the
    sample lists; rows whose status is not "ok" are skipped. A call that cannot be captured
    keeps eager samples only (all repetitions on one clock or none) and says why; any other
    error marks the row."""
    from bench import timing

    for r in range(repeats):
        for row, call, device, eager in runs[r % len(runs):] + runs[: r % len(runs)]:
            if row["status"] != "ok":
                continue
            try:
                eager.append(platform.eager_ms(call, None, reps=3))
                if "not capturable" not in row["note"]:
                    device.append(platform.device_ms(call, None, eager[-1], replays=3))
                row.update(platform.clocks())
            except timing.NotCapturable as exc:
                dropped = f" after {len(device)} captured repetitions" if device else ""
                device.clear()  # all repetitions on one clock or none
                row["note"] = f"eager_ms only: not capturable in a CUDA graph{dropped} ({exc})"
            except Exception as exc:
                row.update(status="error", note=f"{type(exc).__name__}: {str(exc)[:160]}")


def record_times(row, device, eager, timers) -> bool:
    """The medians and spreads of an "ok" row's samples, with their timers; False (nothing
    recorded) for a row that is not ok or has no sample."""
    if row["status"] != "ok" or not eager:
        return False
    row.update(eager_ms=statistics.median(eager), eager_ms_min=min(eager), eager_ms_max=max(eager),
               eager_timer=timers[-1], repeats=len(eager), device_repeats=len(device))  # fmt: skip
    if device:
        row.update(device_ms=statistics.median(device), device_ms_min=min(device), device_ms_max=max(device),
                   device_timer=timers[0])  # fmt: skip
    return True


class _Prepared:
    """What the platform's memory probe reads: the call, and the inputs it must not count."""

    def __init__(self, call, *inputs):
        self.call, self.prepare, self.owned = call, None, frozenset()
        self.gate_inputs = {str(i): t for i, t in enumerate(inputs)}


def format_rows(rows) -> str:
    fmt = lambda value, spec: format(value, spec) if value is not None else "-"  # noqa: E731
    lines = [f"{'op':<19}{'N x H x V':<19}{'provider':<17}{'dev ms':>9}{'eager ms':>9}{'TFLOP/s':>9}{'(eager)':>9}"
             f"{'peak+ GB':>9}  gate / note"]  # fmt: skip
    for r in rows:
        peak = r["peak_extra_bytes"] / 1e9 if r.get("peak_extra_bytes") is not None else None
        note = "; ".join(x for x in (r.get("gate") or "", r.get("note") or "") if x)
        lines.append(f"{r['op']:<19}{r['shape']:<19}{r['label']:<17}{fmt(r['device_ms'], '9.2f')}{fmt(r['eager_ms'], '9.2f')}"
                     f"{fmt(r['tflops'], '9.1f')}{fmt(r.get('tflops_eager'), '9.1f')}{fmt(peak, '9.2f')}  "
                     f"{r['status'] if r['status'] != 'ok' else ''}{note}")  # fmt: skip
    return "\n".join(lines)


def run_scoreboard(args) -> int:
    from bench import gpu, results

    platform = gpu.dry_run_platform() if args.dry_run else gpu.gpu_platform()
    if platform.dry_run:
        print(gpu.DRY_RUN_WARNING)
    platform.warm()
    meta = gpu.card_meta(platform, copy_gbps=None)
    meta.update(target_loss=TARGET_LOSS, inputs=make_inputs.__doc__, repeats=args.repeats)
    shapes = DRY_RUN_SHAPES if args.dry_run else (QUICK_SHAPES if args.quick else SHAPES)
    out = args.out or (tempfile.mkdtemp(prefix="softmax-gpu-dry-run-") if args.dry_run else results.run_folder(meta))
    rows = measure(platform, args.ops, shapes, args.providers, repeats=args.repeats,
                   save=lambda rows: results.write_results(rows, meta, out, name="linear_ce"))  # fmt: skip
    print(format_rows(rows))
    paths = results.write_results(rows, meta, out, name="linear_ce")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


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
    """Rows (N, H, V, provider, largest, total, logits bytes) for forward + backward on CPU.
    softmax_gpu runs with a buffer budget of a quarter of the logits (the default budgets,
    hundreds of MiB, would hold these small problems whole)."""
    import softmax_gpu

    rows = []
    for n, h, v in shapes:
        budget = n * v * torch.tensor([], dtype=dtype).element_size() // 4
        providers = {
            f"softmax_gpu.{mode}": (lambda mode: lambda x, w, t: softmax_gpu.linear_cross_entropy(
                x, w, t, mode=mode, buffer_bytes=budget))(mode)
            for mode in ("speed", "low_memory")
        }  # fmt: skip
        providers["torch"] = _torch_unfused
        try:
            providers["torch.chunked"] = _torch_chunked()
        except AttributeError:
            pass
        x, w, t = make_inputs(n, h, v, dtype, "cpu")
        for name, loss_fn in providers.items():
            largest, total = allocations(runner("linear_ce_fwd_bwd", loss_fn, x, w, t))
            rows.append((n, h, v, name, largest, total, n * v * x.element_size()))
    return rows


def format_memory_table(rows) -> str:
    lines = ["Allocations during one forward + backward (float32, torch's CPU allocator; kernels in the interpreter;",
             "softmax_gpu with a buffer budget of a quarter of the logits):",
             f"{'N x H x V':<18}{'provider':<24}{'largest tensor':>15}{'total':>12}{'logits N x V':>14}"]  # fmt: skip
    for n, h, v, name, largest, total, logits in rows:
        lines.append(f"{f'{n}x{h}x{v}':<18}{name:<24}{largest:>15,}{total:>12,}{logits:>14,}")
    return "\n".join(lines)


# The cards the predictions are for: copy bandwidth (bytes/s) and the dense 16-bit matrix rate
# taken for them (FLOP/s; the H100's datasheet says 989 TFLOP/s, 790 is what cuBLAS-class
# products sustain), as in every kernel docstring.
CARDS = {"H100": (3.0e12, 790e12), "H200": (4.3e12, 790e12)}
ROUTES = (("speed", False), ("speed", True), ("low_memory", False), ("low_memory", True))


def route_model(mode: str, fused: bool, n: int, h: int, v: int, itemsize: int = 2, width: int = 2) -> dict:
    """FLOPs and the HBM bytes of the passes over the logits that no product hides, for one
    forward + backward of `mode` with cuBLAS's logits (fused False) or linear_logits_kernel's
    (fused True), class-index targets with `width` packed statistics (2: the plain loss),
    and the time they predict on each card at its peak (CARDS): products / rate + bytes /
    bandwidth. The products' own operand reads and result writes are inside their time.
      speed, cuBLAS: cross_entropy_kernel over the chunk: rows wider than its single block
        read twice (the second read partly from L2: counted in full) and G written: 3 N V s.
      speed, fused: the statistics in the product's epilogue (N x V/128 x (1 + width) x 4,
        written and read), then vocab_parallel_loss_kernel reads z once and writes G: 2 N V s.
      low_memory, cuBLAS: the forward's statistics pass reads each slab (N V s); the
        backward's loss kernel reads the slab again and writes G (2 N V s).
      low_memory, fused: the forward stores no logits, only tile statistics; the backward's
        product writes G from its epilogue (inside the product, as any product's result): 0."""
    products = 3 if mode == "speed" else 4
    flop = products * 2 * n * h * v
    logits = n * v * itemsize
    tiles = 2 * n * -(-v // 128) * (1 + width) * 4 if fused else 0
    passes = {("speed", False): 3, ("speed", True): 2, ("low_memory", False): 3, ("low_memory", True): 0}[mode, fused]
    moved = passes * logits + tiles
    times = {card: 1e3 * (flop / rate + moved / bandwidth) for card, (bandwidth, rate) in CARDS.items()}
    return dict(mode=mode, fused=fused, products=products, flop=flop, bytes=moved, ms=times)


def format_route_model(shapes=SHAPES) -> str:
    lines = ["Forward + backward, bfloat16, the plain loss: products, FLOPs, bytes of the passes over the",
             "logits outside the products, and the time they predict at each card's peak (bench/linear_ce.py,",
             "route_model; nothing here is measured):",
             f"  {'N x H x V':<20}{'mode':<12}{'logits':<9}{'products':>9}{'TFLOP':>8}{'GB':>7}"
             + "".join(f"{card + ' ms':>10}" for card in CARDS)]  # fmt: skip
    for n, h, v in shapes:
        for mode, fused in ROUTES:
            m = route_model(mode, fused, n, h, v)
            lines.append(f"  {f'{n}x{h}x{v}':<20}{mode:<12}{'Triton' if fused else 'cuBLAS':<9}{m['products']:>9}"
                         f"{m['flop'] / 1e12:>8.1f}{m['bytes'] / 1e9:>7.2f}"
                         + "".join(f"{m['ms'][card]:>10.1f}" for card in CARDS))  # fmt: skip
    return "\n".join(lines)


def cpu_report(ops) -> None:
    print("No CUDA GPU: linear cross-entropy's memory table and FLOP counts (no timings).\n")
    print(format_memory_table(memory_table(CPU_SHAPES)))
    print("\nFLOPs of the fewest products (3 for forward + backward) at the benchmark's cases:")
    for op in ops:
        for n, h, v in SHAPES:
            print(f"  {op:<19}{n} x {h} x {v}: {flops(op, n, h, v):.3e}")
    print()
    print(format_route_model())


def main(argv=None, ops=OPS) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.linear_ce", description=__doc__.splitlines()[0])
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(ops))
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--quick", action="store_true", help=f"one shape, {QUICK_SHAPES[0]}")
    parser.add_argument("--dry-run", action="store_true", help="the GPU scoreboard's code on CPU: measures nothing")
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
        return run_scoreboard(args)
    if torch.cuda.is_available():
        return run_scoreboard(args)
    os.environ["TRITON_INTERPRET"] = "1"
    cpu_report(args.ops)
    return 0


if __name__ == "__main__":
    sys.exit(main())
