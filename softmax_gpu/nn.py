"""torch.nn modules: thin wrappers that hold hyper-parameters and call the functional ops."""
from typing import Optional

import torch

from .ops import cross_entropy as _cross_entropy
from .ops import linear_cross_entropy as _linear_cross_entropy
from .ops import softmax as _softmax


class Softmax(torch.nn.Module):
    """Drop-in for torch.nn.Softmax backed by the online Triton kernel."""

    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _softmax.softmax(x, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class LogSoftmax(torch.nn.Module):
    """Drop-in for torch.nn.LogSoftmax backed by the online Triton kernel."""

    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _softmax.log_softmax(x, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class CrossEntropyLoss(torch.nn.Module):
    """Drop-in for torch.nn.CrossEntropyLoss backed by the fused kernel, plus z_loss, softcap
    and inplace_backward (see softmax_gpu.cross_entropy)."""

    def __init__(
        self,
        weight: Optional[torch.Tensor] = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: Optional[float] = None,
        inplace_backward: bool = False,
    ):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.inplace_backward = inplace_backward

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return _cross_entropy.cross_entropy(
            input,
            target,
            self.weight,
            self.ignore_index,
            self.reduction,
            self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            inplace_backward=self.inplace_backward,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, label_smoothing={self.label_smoothing}, "
            f"z_loss={self.z_loss}, softcap={self.softcap}, inplace_backward={self.inplace_backward}"
        )


class LinearCrossEntropyLoss(torch.nn.Module):
    """The loss of an LM head without its logits: holds the options of
    softmax_gpu.linear_cross_entropy; forward(input, linear_weight, target, linear_bias=None)."""

    def __init__(
        self,
        weight: Optional[torch.Tensor] = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: Optional[float] = None,
        grad_skip_threshold: Optional[float] = None,
        mode: str = "speed",
        buffer_bytes: Optional[int] = None,
    ):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.grad_skip_threshold = grad_skip_threshold  # None: exact gradients (see linear_cross_entropy)
        self.mode = mode  # "speed" or "low_memory" (see linear_cross_entropy)
        self.buffer_bytes = buffer_bytes

    def forward(
        self,
        input: torch.Tensor,
        linear_weight: torch.Tensor,
        target: torch.Tensor,
        linear_bias: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return _linear_cross_entropy.linear_cross_entropy(
            input,
            linear_weight,
            target,
            linear_bias=linear_bias,
            weight=self.weight,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            grad_skip_threshold=self.grad_skip_threshold,
            mode=self.mode,
            buffer_bytes=self.buffer_bytes,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, label_smoothing={self.label_smoothing}, "
            f"z_loss={self.z_loss}, softcap={self.softcap}, mode={self.mode!r}"
        )
