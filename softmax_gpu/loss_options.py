"""The options of the cross-entropy family in one place: cross_entropy, its split rows, and
the linear, vocab-parallel and DTensor forms take them, check them and hand them to their
kernels the same way.

LossOptions is a NamedTuple, so it is hashable (it keys the eager launch plans of
runtime.cached_plan), and it splats (`*options`) into the custom ops, whose schemas keep
the four as plain arguments in this order: ignore_index, label_smoothing, z_loss, softcap.
The reduction is not one of them: it is per call and changes the outputs' shapes.
"""
import functools
import math
from typing import NamedTuple, Optional

import numpy as np

REDUCTIONS = ("none", "mean", "sum")


class LossOptions(NamedTuple):
    """ignore_index: the class index whose rows count for nothing; label_smoothing in [0, 1];
    z_loss >= 0 (PaLM's lam * lse^2); softcap None or > 0 (logits -> s * tanh(logits / s))."""

    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: Optional[float] = None

    @classmethod
    def checked(cls, fn: str, ignore_index, label_smoothing, z_loss=0.0, softcap=None) -> "LossOptions":
        """The options from a user's call, validated as torch validates them (errors name
        `fn`), with the floats as Python floats."""
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"{fn}(): label_smoothing must be between 0.0 and 1.0, but got {label_smoothing}")
        if not (z_loss >= 0.0 and z_loss != float("inf")):
            raise ValueError(f"{fn}(): z_loss must be a finite number >= 0, but got {z_loss}")
        if softcap is not None and not (softcap > 0 and softcap != float("inf")):
            raise ValueError(f"{fn}(): softcap must be None or a finite number > 0, but got {softcap}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"{fn}(): ignore_index must be an int, but got {type(ignore_index).__name__}")
        return cls(int(ignore_index), float(label_smoothing), float(z_loss), None if softcap is None else float(softcap))

    def kernel_args(self, z_loss: bool = True, hi_lo: bool = True) -> dict:
        """The options as the Triton kernels take them: ignore_index, label_smoothing, softcap
        (0.0 for None), with z_loss the z-loss, the HAS_* flags, and with hi_lo each float's
        float32 remainder (*_lo), from which float64 kernels rebuild it. Memoised; the dict
        is shared, so pass it on with ** and never change it."""
        return _kernel_args(self, z_loss, hi_lo)


def check_reduction(fn: str, reduction) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}(): {reduction!r} is not a valid value for reduction (expected one of {REDUCTIONS})")


def hi_lo(x: float) -> tuple[float, float]:
    """x as float32 hi + float32 lo: Triton passes Python floats as float32, and float64
    kernels rebuild x from both (to about 2^-48 relative)."""
    hi = float(np.float32(x))
    return hi, (float(np.float32(x - hi)) if math.isfinite(hi) else 0.0)


@functools.lru_cache(maxsize=256)
def _kernel_args(options: LossOptions, with_z_loss: bool, with_lo: bool) -> dict:
    # float() and int(): the cache takes 1 and 1.0 for one key, and Triton compiles an int
    # argument (a constant, when it is 1) where a float is meant
    floats = {"label_smoothing": float(options.label_smoothing), "softcap": float(options.softcap or 0.0)}
    if with_z_loss:
        floats["z_loss"] = float(options.z_loss)
    args = {"ignore_index": int(options.ignore_index)}
    for name, value in floats.items():
        hi, lo = hi_lo(value) if with_lo else (value, None)
        args[name] = hi
        if with_lo:
            args[f"{name}_lo"] = lo
    args["HAS_SMOOTHING"] = options.label_smoothing > 0
    args["HAS_SOFTCAP"] = options.softcap is not None
    if with_z_loss:
        args["HAS_Z_LOSS"] = options.z_loss != 0
    return args
