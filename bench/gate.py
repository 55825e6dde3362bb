"""The scoreboard's correctness gate: the timed call's own output, full size, against float64.

Before a provider is timed on a case, the output of the very call that will be timed (same
shape, same inputs, same code path) is compared with float64 on the same device, every row,
in chunks of rows so the reference never needs more than CHUNK_ELEMENTS float64 values at
once. A provider that fails is reported `wrong` with its largest error and is not timed.

Errors are measured against each row's own scale, because a fixed absolute tolerance passes
nonsense: at 128256 classes the largest probability of a random row is about 0.02, so an
all-zero softmax sits within 5e-2 of the truth.

    softmax_fwd       max |y - p| / max p, per row; and |sum(y) - 1|
    log_softmax_fwd   max |y_j - log p_j| / max(1, |log p_j|), per row; and |sum(exp y) - 1| / H
                      with H = max(1, the row's entropy): rounding log p_j to 16 bits moves
                      e^y_j by up to the dtype's step times |log p_j|
    softmax_bwd       max |dx - r| / max |r| with r = y (dy - sum(y dy)) from the forward
                      output y the provider saved (its rounding is the forward's business)
    ce_fwd            |loss - L| / max(1, |L|) for the mean loss L
    ce_fwd_bwd        with g = M * grad (mean over M rows): the target entries against p_t - 1
                      on the row's scale, the other entries against p_j on the scale of the
                      row's largest other p, separately (an all-zero off-target gradient
                      would hide under |p_t - 1| ~ 1 otherwise); and |sum(g)| per row

Tolerances (TOLERANCE) are about the dtype's output rounding, with two exceptions where
torch's own 16-bit path needs more and the gate allows twice torch's error, the rule our unit
tests use: the softmax backward (torch's bfloat16 reached 7.5e-3 of the row's scale), and
the cross-entropy gradient, where torch's eager path saves bfloat16 log-probabilities and
exponentiates them in the backward, an error of up to 2^-6 of the largest off-target
probability.
"""
import dataclasses
import math

import torch

CHUNK_ELEMENTS = 2**26  # float64 reference values held at once (512 MiB)
_BASE = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-9}
TOLERANCE = {
    "softmax_fwd": _BASE,
    "log_softmax_fwd": _BASE,
    # torch's own bfloat16 backward reached 7.5e-3 of the row's scale on an H200 (32768 x 4096):
    # twice that, as the unit tests allow.
    "softmax_bwd": {torch.float32: 1e-5, torch.bfloat16: 2**-6, torch.float16: 2**-8},
    "ce_fwd": _BASE,
    "ce_fwd_bwd": {torch.float32: 1e-5, torch.bfloat16: 2**-5, torch.float16: 2**-7},
}


@dataclasses.dataclass
class Verdict:
    ok: bool
    max_err: float  # the largest error found, on its row's scale (inf for NaN or a wrong shape)
    where: str  # which check and row gave max_err
    tol: float

    def __str__(self) -> str:
        if self.ok:
            return f"ok (max err {self.max_err:.1e} <= {self.tol:.1e})"
        return f"wrong: {self.where}: err {self.max_err:.2e} > {self.tol:.1e}"


class _Worst:
    """The largest error seen so far and where; NaN counts as infinite."""

    def __init__(self):
        self.err, self.where = 0.0, "no rows"

    def update(self, errors: torch.Tensor, what: str, row0: int):
        if errors.numel() == 0:
            return
        errors = torch.nan_to_num(errors.double(), nan=math.inf)
        value, index = errors.max(0)
        value = float(value)
        if value > self.err or self.where == "no rows":
            self.err, self.where = value, f"{what}, row {row0 + int(index)}"


def _row_max(t: torch.Tensor) -> torch.Tensor:
    return t.abs().amax(-1) if t.shape[-1] else t.new_zeros(t.shape[:-1])


def _safe(scale: torch.Tensor) -> torch.Tensor:
    return scale.clamp_min(torch.finfo(torch.float64).tiny)


def check(op: str, out, inputs: dict) -> Verdict:
    """The gate's verdict on `out`, the output of one call of `op` on `inputs` (x: the logits or
    the softmax input; dy for softmax_bwd, with y the forward output the backward used;
    target for cross-entropy). Outputs other than the loss must have x's dtype and device."""
    x = inputs["x"]
    tol = TOLERANCE[op][x.dtype]
    worst = _Worst()
    if not isinstance(out, torch.Tensor):
        return Verdict(False, math.inf, f"output is a {type(out).__name__}, not a tensor", tol)
    expected_shape = () if op == "ce_fwd" else tuple(x.shape)
    if tuple(out.shape) != expected_shape:
        return Verdict(False, math.inf, f"shape {tuple(out.shape)} != {expected_shape}", tol)
    if op != "ce_fwd" and (out.dtype != x.dtype or out.device != x.device):
        # a float32 result for 16-bit input would also be timed against 16-bit bytes
        return Verdict(False, math.inf, f"{out.dtype} on {out.device}, not {x.dtype} on {x.device}", tol)
    if op == "ce_fwd":
        _check_loss(out, x, inputs["target"], worst)
    else:
        rows, cols = x.shape
        step = max(1, CHUNK_ELEMENTS // max(cols, 1))
        for r0 in range(0, rows, step):
            sl = slice(r0, min(rows, r0 + step))
            _check_rows(op, out[sl], x[sl], inputs, sl, worst)
    return Verdict(worst.err <= tol, worst.err, worst.where, tol)


def _check_rows(op, out, x, inputs, sl, worst):
    got = out.double()
    x64 = x.double()
    r0 = sl.start
    if op == "softmax_fwd":
        p = torch.softmax(x64, -1)
        worst.update(_row_max(got - p) / _safe(_row_max(p)), "values", r0)
        worst.update((got.sum(-1) - 1).abs(), "row sum", r0)
    elif op == "log_softmax_fwd":
        logp = torch.log_softmax(x64, -1)
        # each value on its own scale: an offset that moves every probability by 5% fails
        worst.update(_row_max((got - logp) / logp.abs().clamp_min(1)), "values", r0)
        # Rounding log p_j to the dtype moves e^y_j by up to that dtype's relative step
        # times |log p_j|, so the sum moves by up to that times the row's entropy.
        entropy = -(logp.exp() * logp).sum(-1)
        worst.update((got.exp().sum(-1) - 1).abs() / entropy.clamp_min(1), "row sum of exp / entropy", r0)
    elif op == "softmax_bwd":
        y, dy = inputs["y"][sl].double(), inputs["dy"][sl].double()
        ref = y * (dy - (y * dy).sum(-1, keepdim=True))
        worst.update(_row_max(got - ref) / _safe(_row_max(ref)), "values", r0)
    elif op == "ce_fwd_bwd":
        target = inputs["target"][sl]
        n_rows = inputs["x"].shape[0]
        g = got * n_rows  # the mean's 1/M undone
        ref = torch.softmax(x64, -1)
        rows = torch.arange(ref.shape[0], device=ref.device)
        ref_t = ref[rows, target] - 1
        off = ref.clone()
        off[rows, target] = 0
        g_off = g.clone()
        g_off[rows, target] = 0
        err_t = (g[rows, target] - ref_t).abs()
        worst.update(err_t / _safe(torch.maximum(ref_t.abs(), _row_max(off))), "target entries", r0)
        worst.update(_row_max(g_off - off) / _safe(_row_max(off)), "non-target entries", r0)
        worst.update(g.sum(-1).abs(), "row sum", r0)
    else:
        raise ValueError(f"the gate has no check for op {op!r}")


def _check_loss(out, x, target, worst):
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    rows, cols = x.shape
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    for r0 in range(0, rows, step):
        x64 = x[r0 : r0 + step].double()
        t = target[r0 : r0 + step]
        total += (torch.logsumexp(x64, -1) - x64.gather(1, t[:, None])[:, 0]).sum()
    loss = total / rows
    worst.update(((out.double() - loss).abs() / loss.abs().clamp_min(1)).reshape(1), "mean loss", 0)
