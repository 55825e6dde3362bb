"""Keras-style categorical cross-entropy (per-sample losses), with from_logits."""
import torch

from .checks import check_floating, normalize_dim
from .kernels.cross_entropy import cross_entropy_kernel
from .layout import as_rows
from .ops.cross_entropy import cross_entropy
from .runtime import check_launchable

# Keras clips probabilities to [EPSILON, 1 - EPSILON] before the log when from_logits=False.
EPSILON = 1e-7


def categorical_crossentropy(
    y_true: torch.Tensor, y_pred: torch.Tensor, from_logits: bool = False, label_smoothing: float = 0.0, axis: int = -1
) -> torch.Tensor:
    """Per-sample -sum(y_true * log(softmax)) along `axis`, as keras.losses.categorical_crossentropy.

    y_true: one-hot rows or class probabilities; y_pred: probabilities (from_logits=False;
    renormalised along the axis and clipped to [1e-7, 1 - 1e-7] first, as Keras does) or
    logits (from_logits=True: the fused, overflow-free kernel computes log-softmax itself).
    label_smoothing: y_true -> y_true * (1 - eps) + eps / n_classes. Returns float32 losses
    shaped like y_pred without `axis`.
    """
    fn = "softmax_gpu.categorical_crossentropy"
    check_floating(fn, "y_true", y_true)
    check_floating(fn, "y_pred", y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{fn}(): y_true {tuple(y_true.shape)} and y_pred {tuple(y_pred.shape)} must have one shape")
    axis = normalize_dim(axis, y_pred.dim())
    if from_logits:
        check_launchable(fn, cross_entropy_kernel, y_pred)  # before cross_entropy() would, in its name
        logits = as_rows(y_pred, axis)
        target = as_rows(y_true, axis).to(torch.float32)
        loss = cross_entropy(logits, target, reduction="none", label_smoothing=label_smoothing)
        return loss.view(y_pred.movedim(axis, -1).shape[:-1])
    n_classes = y_pred.shape[axis]
    target = y_true.float() * (1 - label_smoothing) + (label_smoothing / n_classes if n_classes else 0.0)
    probs = y_pred.float() / y_pred.float().sum(axis, keepdim=True)
    return -(target * probs.clamp(EPSILON, 1 - EPSILON).log()).sum(axis)
