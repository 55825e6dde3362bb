"""Token log-probabilities and entropy (RL fine-tuning): the scoreboard on a GPU, or its dry run.

    python -m bench.logprobs [--quick] [--dry-run] [--ops ...] [--providers ...] [--out DIR]
    (also python -m bench --ops logprobs_fwd logprobs_fwd_bwd)

Cases are (tokens N, vocabulary V) of bfloat16 logits at RL shapes (16 x 1024 tokens at V =
32000, 128256 and 151936, and 64 x 2048 tokens at V = 32000), sampling temperature 0.8.
Each call returns every position's log-probability and entropy; for forward + backward,
both flow back with random upstream gradients. linear_logprobs_fwd_bwd starts from the
policy's last hidden states instead (N x H bfloat16, a Llama-3-8B head: H 4096, V 128256):
softmax_gpu.linear_token_logprobs against F.linear followed by the same trainer code, eager
and compiled; the gradients of the hidden states and the head are gated, and the row gives
TFLOP/s for the 3 products the work needs at least (logits, dX, dW). Providers: softmax_gpu.token_logprobs; the
usual trainer code in torch (log_softmax of the logits over T, gather, -(p log p).sum),
eager and under torch.compile; TRL's selective_log_softmax when importable (it gives the
log-probabilities only, so its row does less work: no entropy, and its backward carries only
the log-probabilities' gradient; the label says so).

Figures per row, as in the other scoreboards: gated against float64 first (logprobs and
entropy per position; the gradient by relative Frobenius error), then device time (CUDA
graphs) and eager time, 3 repetitions interleaved, the spread, the percentage of the copy
rate for the bytes the work needs at least (the logits once forward; once more and the
gradient written backward), and peak memory above the inputs and returned outputs.
"""
import argparse
import tempfile

import torch

OPS = ("logprobs_fwd", "logprobs_fwd_bwd")
LINEAR_OPS = ("linear_logprobs_fwd_bwd",)
ALL_OPS = OPS + LINEAR_OPS
SHAPES = ((16 * 1024, 32000), (16 * 1024, 128256), (16 * 1024, 151936), (64 * 2048, 32000))
QUICK_SHAPES = ((16 * 1024, 128256),)
DRY_RUN_SHAPES = ((64, 500),)
LINEAR_SHAPES = ((16 * 1024, 128256, 4096),)  # tokens, vocabulary, hidden
QUICK_LINEAR_SHAPES = ((4096, 128256, 4096),)
DRY_RUN_LINEAR_SHAPES = ((64, 500, 32),)
PROVIDERS = ("softmax_gpu", "torch", "torch.compile", "trl")
TEMPERATURE = 0.8
REPEATS = 3
TOL = {"logprobs": 2e-2, "entropy": 2e-2, "grad": 2**-5}  # absolute (nats) and relative Frobenius
REFERENCE_ROWS = 1024


def _torch_ops(z, t):
    """The common trainer code: float32 log_softmax over the full logits, gather, entropy."""
    logp = torch.log_softmax(z.float() / TEMPERATURE, -1)
    return logp.gather(-1, t[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def _ours():
    import softmax_gpu

    return lambda z, t: softmax_gpu.token_logprobs(z, t, temperature=TEMPERATURE, return_entropy=True)


def _trl():
    from trl.trainer.utils import selective_log_softmax

    return lambda z, t: (selective_log_softmax(z / TEMPERATURE, t), None)


FACTORIES = {
    "softmax_gpu": _ours,
    "torch": lambda: _torch_ops,
    "torch.compile": lambda: torch.compile(_torch_ops, dynamic=False),
    "trl": _trl,
}
LABELS = {"trl": "trl (logprobs only)"}


def _linear_torch(x, w, t):
    """The trainer code from hidden states: the full logits by F.linear, then as above."""
    return _torch_ops(torch.nn.functional.linear(x, w), t)


def _linear_ours():
    import softmax_gpu

    return lambda x, w, t: softmax_gpu.linear_token_logprobs(x, w, t, temperature=TEMPERATURE, return_entropy=True)


LINEAR_FACTORIES = {
    "softmax_gpu": _linear_ours,
    "torch": lambda: _linear_torch,
    "torch.compile": lambda: torch.compile(_linear_torch, dynamic=False),
}


def load(names, factories=None):
    factories = FACTORIES if factories is None else factories
    loaded, missing = {}, {}
    for name in names:
        if name not in factories:
            continue
        try:
            loaded[name] = factories[name]()
        except Exception as exc:  # optional dependencies fail in many ways
            missing[name] = f"{type(exc).__name__}: {exc}"
    return loaded, missing


def make_inputs(n, v, device, seed=0):
    """bfloat16 logits with a trained model's spread (N(0, 2)), tokens drawn from them, and
    the two upstream gradients of a policy loss with an entropy bonus."""
    g = torch.Generator(device=device).manual_seed(seed)
    z = (2 * torch.randn(n, v, device=device, generator=g)).bfloat16()
    t = torch.randint(0, v, (n,), device=device, generator=g)
    u_lp = torch.randn(n, device=device, generator=g)
    u_h = 0.01 * torch.randn(n, device=device, generator=g)
    return z, t, u_lp, u_h


def make_linear_inputs(n, v, h, device, seed=0):
    """bfloat16 hidden states N(0, 1) and a head N(0, 4 / H), so the logits spread as in
    make_inputs; tokens and the two upstream gradients as there."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, h, device=device, generator=g).bfloat16()
    w = (2 / h**0.5 * torch.randn(v, h, device=device, generator=g)).bfloat16()
    t = torch.randint(0, v, (n,), device=device, generator=g)
    u_lp = torch.randn(n, device=device, generator=g)
    u_h = 0.01 * torch.randn(n, device=device, generator=g)
    return x, w, t, u_lp, u_h


def linear_runner(fn, x, w, t, u_lp, u_h):
    leaves = [x.detach().requires_grad_(), w.detach().requires_grad_()]

    def forward_backward():
        lp, ent = fn(*leaves, t)
        return torch.autograd.grad((lp * u_lp).sum() + (ent * u_h).sum(), leaves)

    return forward_backward


def linear_reference(x, w, t, u_lp, u_h):
    """float64 (dX, dW) of u_lp . logprobs + u_h . entropy, REFERENCE_ROWS tokens at a time."""
    w64 = w.double()
    dx, dw = [], torch.zeros_like(w64)
    for r0 in range(0, x.shape[0], REFERENCE_ROWS):
        rows = slice(r0, r0 + REFERENCE_ROWS)
        zs = (x[rows].double() @ w64.T).requires_grad_()
        logp = torch.log_softmax(zs / TEMPERATURE, -1)
        total = (logp.gather(-1, t[rows, None]).squeeze(-1) * u_lp[rows]).sum() - \
            ((logp.exp() * logp).sum(-1) * u_h[rows]).sum()
        (g,) = torch.autograd.grad(total, zs)
        dx.append(g @ w64)
        dw += g.T @ x[rows].double()
    return torch.cat(dx), dw


def linear_gate(out, ref):
    errs = [float(torch.linalg.vector_norm(o.double() - r) / torch.linalg.vector_norm(r)) for o, r in zip(out, ref)]
    err = max(errs)
    if err <= TOL["grad"]:
        return True, f"ok (dX, dW max err {err:.1e} <= {TOL['grad']:.1e})"
    return False, f"wrong: dX err {errs[0]:.2e}, dW err {errs[1]:.2e} > {TOL['grad']:.1e}"


def runner(op, fn, z, t, u_lp, u_h):
    if op == "logprobs_fwd":

        def forward():
            with torch.no_grad():
                return fn(z, t)

        return forward
    leaf = z.detach().requires_grad_()

    def forward_backward():
        lp, ent = fn(leaf, t)
        total = (lp * u_lp).sum() + ((ent * u_h).sum() if ent is not None else 0)
        return torch.autograd.grad(total, leaf)[0]

    return forward_backward


def reference(z, t, u_lp, u_h, with_grad):
    """float64 logprobs, entropy and (with_grad) d(u_lp . lp + u_h . H)/dz, REFERENCE_ROWS at a time."""
    lps, ents, grads = [], [], []
    for r0 in range(0, z.shape[0], REFERENCE_ROWS):
        zs = z[r0 : r0 + REFERENCE_ROWS].double().requires_grad_(with_grad)
        logp = torch.log_softmax(zs / TEMPERATURE, -1)
        lp = logp.gather(-1, t[r0 : r0 + REFERENCE_ROWS, None]).squeeze(-1)
        ent = -(logp.exp() * logp).sum(-1)
        if with_grad:
            total = (lp * u_lp[r0 : r0 + REFERENCE_ROWS]).sum() + (ent * u_h[r0 : r0 + REFERENCE_ROWS]).sum()
            grads.append(torch.autograd.grad(total, zs)[0])
        lps.append(lp.detach())
        ents.append(ent.detach())
    return torch.cat(lps), torch.cat(ents), (torch.cat(grads) if with_grad else None)


def gate(op, out, ref, has_entropy=True):
    lp64, ent64, g64 = ref
    if op == "logprobs_fwd":
        lp, ent = out
        err = float((lp.double() - lp64).abs().max())
        if has_entropy and ent is not None:
            err = max(err, float((ent.double() - ent64).abs().max()))
        ok = err <= TOL["logprobs"]
    else:
        if g64 is None or out is None:
            return False, "wrong: no gradient"
        err = float(torch.linalg.vector_norm(out.double() - g64) / torch.linalg.vector_norm(g64))
        ok = err <= TOL["grad"]
    tol = TOL["logprobs"] if op == "logprobs_fwd" else TOL["grad"]
    return (True, f"ok (max err {err:.1e} <= {tol:.1e})") if ok else (False, f"wrong: err {err:.2e} > {tol:.1e}")


def min_bytes(op, n, v, itemsize=2):
    """The least traffic: the logits read once (forward); read once more and the gradient written (backward)."""
    return n * v * itemsize * (1 if op == "logprobs_fwd" else 3)


def _empty_row(op, shape, name, **extra):
    return dict(op=op, shape=shape, provider=name, label=LABELS.get(name, name), status="ok", gate=None,
                device_ms=None, device_ms_min=None, device_ms_max=None, device_timer=None, device_repeats=0,
                eager_ms=None, eager_ms_min=None, eager_ms_max=None, eager_timer=None, repeats=0, min_bytes=None,
                pct_copy=None, peak_extra_bytes=None, note="", **extra)  # fmt: skip


def _gate_and_time(platform, cases, inputs, repeats):
    """One case's providers, each (row, call, check): the call's output gated by check
    (status "wrong" when it fails, "error"/"oom" when it raises), its peak memory above
    `inputs`, then all of them timed, interleaved. Returns (row, whether a device time was
    recorded) per provider, in order."""
    from bench.linear_ce import _Prepared, record_times, time_interleaved

    runs = []
    for row, call, check in cases:
        runs.append((row, call, [], []))
        try:
            ok, row["gate"] = check(call())
            if not ok:
                row["status"] = "wrong"
                continue
            row["peak_extra_bytes"] = platform.peak_extra_bytes(_Prepared(call, *inputs))
        except Exception as exc:
            row.update(status="oom" if isinstance(exc, torch.cuda.OutOfMemoryError) else "error",
                       note=f"{type(exc).__name__}: {str(exc)[:160]}")  # fmt: skip
    time_interleaved(platform, runs, repeats)
    timers = list(platform.timers)
    return [(row, record_times(row, device, eager, timers) and bool(device) and row["device_ms"] > 0)
            for row, _call, device, eager in runs]  # fmt: skip


def measure_linear(platform, shapes, providers, repeats=REPEATS, rows=None, save=None):
    """linear_logprobs_fwd_bwd rows: gated on dX and dW, timed, TFLOP/s for 3 products."""
    loaded, missing = load(providers, LINEAR_FACTORIES)
    for name, reason in missing.items():
        print(f"skipping provider {name} (linear form): not importable ({reason})")
    rows = [] if rows is None else rows
    for n, v, h in shapes:
        x, w, t, u_lp, u_h = make_linear_inputs(n, v, h, platform.device)
        ref = linear_reference(x, w, t, u_lp, u_h)
        cases = [(_empty_row("linear_logprobs_fwd_bwd", f"{n}x{h}x{v}", name, min_flops=3 * 2 * n * v * h, tflops=None),
                  linear_runner(fn, x, w, t, u_lp, u_h), lambda out: linear_gate(out, ref))
                 for name, fn in loaded.items()]  # fmt: skip
        for row, timed in _gate_and_time(platform, cases, (x, w, t, u_lp, u_h), repeats):
            if timed:
                row["tflops"] = row["min_flops"] / (row["device_ms"] * 1e-3) / 1e12
                row["note"] = f"{row['tflops']:.0f} TFLOP/s (3 products)"
            rows.append(row)
        if save is not None:
            save(rows)
        del cases, ref, x, w
        if platform.device == "cuda":
            torch.cuda.empty_cache()
    return rows


def measure(platform, ops, shapes, providers, repeats=REPEATS, copy_gbps=None, save=None):
    loaded, missing = load(providers)
    for name, reason in missing.items():
        print(f"skipping provider {name}: not importable ({reason})")
    rows = []
    for n, v in shapes:
        z, t, u_lp, u_h = make_inputs(n, v, platform.device)
        for op in ops:
            ref = reference(z, t, u_lp, u_h, with_grad=op == "logprobs_fwd_bwd")
            ref_lp_only = None
            if "trl" in loaded and op == "logprobs_fwd_bwd":
                ref_lp_only = reference(z, t, u_lp, torch.zeros_like(u_h), with_grad=True)
            cases = []
            for name, fn in loaded.items():
                row = _empty_row(op, f"{n}x{v}", name)
                row["min_bytes"] = min_bytes(op, n, v)
                own_ref = ref_lp_only if name == "trl" and ref_lp_only is not None else ref
                check = lambda out, own_ref=own_ref, name=name: gate(op, out, own_ref, has_entropy=name != "trl")  # noqa: E731
                cases.append((row, runner(op, fn, z, t, u_lp, u_h), check))
            for row, timed in _gate_and_time(platform, cases, (z, t, u_lp, u_h), repeats):
                if timed and copy_gbps:
                    row["pct_copy"] = 100 * row["min_bytes"] / (row["device_ms"] * 1e-3) / (copy_gbps * 1e9)
                rows.append(row)
            if save is not None:
                save(rows)
            del cases, ref
            if platform.device == "cuda":
                torch.cuda.empty_cache()
        del z, t, u_lp, u_h
    return rows


def format_rows(rows) -> str:
    fmt = lambda value, spec: format(value, spec) if value is not None else format("-", f">{spec[0]}")  # noqa: E731
    lines = [f"{'op':<25}{'N x (H x) V':<20}{'provider':<21}{'dev ms':>9}{'eager ms':>9}{'% copy':>8}{'peak+ GB':>9}"
             "  gate / note"]  # fmt: skip
    for r in rows:
        peak = r["peak_extra_bytes"] / 1e9 if r.get("peak_extra_bytes") is not None else None
        note = "; ".join(x for x in (r.get("gate") or "", r.get("note") or "") if x)
        lines.append(f"{r['op']:<25}{r['shape']:<20}{r['label']:<21}{fmt(r['device_ms'], '9.3f')}"
                     f"{fmt(r['eager_ms'], '9.3f')}{fmt(r['pct_copy'], '8.1f')}{fmt(peak, '9.2f')}  "
                     f"{r['status'] if r['status'] != 'ok' else ''}{note}")  # fmt: skip
    return "\n".join(lines)


def main(argv=None, ops=ALL_OPS) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", nargs="+", choices=ops, default=list(ops))  # the linear form included
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--quick", action="store_true", help=f"one shape, {QUICK_SHAPES[0]}")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: the flow, no GPU figure")
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("No CUDA GPU: the token log-probability scoreboard needs one (or --dry-run). Allocation figures "
              "measured on the CPU are in docs/token-logprobs.md.")  # fmt: skip
        return 0
    if args.dry_run:
        import os
        import warnings

        os.environ["TRITON_INTERPRET"] = "1"
        # the interpreter evaluates masked-off lanes too (compiled kernels discard them)
        warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning, "triton.runtime.interpreter")
    from bench import gpu, results

    platform = gpu.dry_run_platform() if args.dry_run else gpu.gpu_platform()
    if platform.dry_run:
        print(gpu.DRY_RUN_WARNING)
    platform.warm()
    copy_gbps = platform.copy_gbps()
    meta = gpu.card_meta(platform, copy_gbps=copy_gbps)
    meta.update(temperature=TEMPERATURE, inputs=make_inputs.__doc__, repeats=args.repeats)
    shapes = DRY_RUN_SHAPES if args.dry_run else (QUICK_SHAPES if args.quick else SHAPES)
    out = args.out or (tempfile.mkdtemp(prefix="softmax-gpu-dry-run-") if args.dry_run else results.run_folder(meta))
    save = lambda rows: results.write_results(rows, meta, out, name="logprobs")  # noqa: E731
    logit_ops = [op for op in args.ops if op in OPS]
    rows = measure(platform, logit_ops, shapes, args.providers, repeats=args.repeats, copy_gbps=copy_gbps,
                   save=save) if logit_ops else []  # fmt: skip
    if any(op in LINEAR_OPS for op in args.ops):
        linear_shapes = DRY_RUN_LINEAR_SHAPES if args.dry_run else (QUICK_LINEAR_SHAPES if args.quick else LINEAR_SHAPES)
        measure_linear(platform, linear_shapes, args.providers, repeats=args.repeats, rows=rows, save=save)
    print(format_rows(rows))
    paths = results.write_results(rows, meta, out, name="logprobs")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0 if all(r["status"] == "ok" for r in rows if r["provider"] == "softmax_gpu") else 1


if __name__ == "__main__":
    raise SystemExit(main())
