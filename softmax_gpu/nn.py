"""torch.nn modules: thin wrappers that hold hyper-parameters and call the functional ops."""
import torch

from . import softmax as _softmax


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
