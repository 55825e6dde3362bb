"""Token log-probabilities and entropy (RL fine-tuning): the scoreboard on a GPU, or its dry run.

    python -m bench.logprobs [--quick] [--dry-run] [--ops ...] [--providers ...] [--out DIR]
    (also python -m bench --ops logprobs_fwd logprobs_fwd_bwd)

Cases are (tokens N, vocabulary V) of bfloat16 logits at RL shapes (16 x 1024 tokens at V =
32000, 128256 and 151936, and 64 x 2048 tokens at V = 32000), sampling temperature 0.8.
Each call returns every position's log-probability and entropy; for forward + backward,
both flow back with random upstream gradients. Providers: softmax_gpu.token_logprobs; the
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
SHAPES = ((16 * 1024, 32000), (16 * 1024, 128256), (16 * 1024, 151936), (64 * 2048, 32000))
QUICK_SHAPES = ((16 * 1024, 128256),)
DRY_RUN_SHAPES = ((64, 500),)
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


def load(names):
    loaded, missing = {}, {}
    for name in names:
        try:
            loaded[name] = FACTORIES[name]()
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


def measure(platform, ops, shapes, providers, repeats=REPEATS, copy_gbps=None, save=None):
    from bench.linear_ce import _Prepared, record_times, time_interleaved

    loaded, missing = load(providers)
    for name, reason in missing.items():
        print(f"skipping provider {name}: not importable ({reason})")
    timers = list(platform.timers)
    rows = []
    for n, v in shapes:
        z, t, u_lp, u_h = make_inputs(n, v, platform.device)
        for op in ops:
            ref = reference(z, t, u_lp, u_h, with_grad=op == "logprobs_fwd_bwd")
            ref_lp_only = None
            if "trl" in loaded and op == "logprobs_fwd_bwd":
                ref_lp_only = reference(z, t, u_lp, torch.zeros_like(u_h), with_grad=True)
            runs = []
            for name, fn in loaded.items():
                row = dict(op=op, shape=f"{n}x{v}", provider=name, label=LABELS.get(name, name), status="ok", gate=None,
                           device_ms=None, device_ms_min=None, device_ms_max=None, device_timer=None,
                           device_repeats=0, eager_ms=None, eager_ms_min=None, eager_ms_max=None, eager_timer=None,
                           repeats=0, min_bytes=min_bytes(op, n, v), pct_copy=None, peak_extra_bytes=None, note="")  # fmt: skip
                call = runner(op, fn, z, t, u_lp, u_h)
                runs.append((row, call, [], []))
                try:
                    own_ref = ref_lp_only if name == "trl" and ref_lp_only is not None else ref
                    ok, row["gate"] = gate(op, call(), own_ref, has_entropy=name != "trl")
                    if not ok:
                        row["status"] = "wrong"
                        continue
                    row["peak_extra_bytes"] = platform.peak_extra_bytes(_Prepared(call, z, t, u_lp, u_h))
                except Exception as exc:
                    row.update(status="oom" if isinstance(exc, torch.cuda.OutOfMemoryError) else "error",
                               note=f"{type(exc).__name__}: {str(exc)[:160]}")  # fmt: skip
            time_interleaved(platform, runs, repeats)
            for row, call, device, eager in runs:
                if record_times(row, device, eager, timers) and device and copy_gbps and row["device_ms"] > 0:
                    row["pct_copy"] = 100 * row["min_bytes"] / (row["device_ms"] * 1e-3) / (copy_gbps * 1e9)
                rows.append(row)
            if save is not None:
                save(rows)
            del runs, ref
            if platform.device == "cuda":
                torch.cuda.empty_cache()
        del z, t, u_lp, u_h
    return rows


def format_rows(rows) -> str:
    fmt = lambda value, spec: format(value, spec) if value is not None else "-"  # noqa: E731
    lines = [f"{'op':<18}{'N x V':<14}{'provider':<21}{'dev ms':>9}{'eager ms':>9}{'% copy':>8}{'peak+ GB':>9}  gate / note"]
    for r in rows:
        peak = r["peak_extra_bytes"] / 1e9 if r.get("peak_extra_bytes") is not None else None
        note = "; ".join(x for x in (r.get("gate") or "", r.get("note") or "") if x)
        lines.append(f"{r['op']:<18}{r['shape']:<14}{r['label']:<21}{fmt(r['device_ms'], '9.3f')}"
                     f"{fmt(r['eager_ms'], '9.3f')}{fmt(r['pct_copy'], '8.1f')}{fmt(peak, '9.2f')}  "
                     f"{r['status'] if r['status'] != 'ok' else ''}{note}")  # fmt: skip
    return "\n".join(lines)


def main(argv=None, ops=OPS) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", nargs="+", choices=ops, default=list(ops))
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
    rows = measure(platform, args.ops, shapes, args.providers, repeats=args.repeats, copy_gbps=copy_gbps,
                   save=lambda rows: results.write_results(rows, meta, out, name="logprobs"))  # fmt: skip
    print(format_rows(rows))
    paths = results.write_results(rows, meta, out, name="logprobs")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0 if all(r["status"] == "ok" for r in rows if r["provider"] == "softmax_gpu") else 1


if __name__ == "__main__":
    raise SystemExit(main())
