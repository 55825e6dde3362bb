"""softmax-gpu: online (single-pass) softmax, log_softmax and fused softmax cross-entropy.

Triton kernels registered as PyTorch custom ops with autograd (this package), the same
algorithms in CUDA C for CuPy arrays (``softmax_gpu.cupy``), and a float64 NumPy oracle
(``softmax_gpu.reference``). Importing needs neither a GPU nor CuPy, and the PyTorch side
loads on first use, so ``import softmax_gpu.cupy`` never imports torch. Set
TRITON_INTERPRET=1 before the first use to run the kernels on CPU tensors (slow; for tests).
"""
import importlib

from . import reference

__version__ = "0.1.0"

# Public name -> module that defines it; loaded on first access (PEP 562).
_FUNCTIONS = {
    "softmax": "softmax_gpu.ops.softmax",
    "log_softmax": "softmax_gpu.ops.softmax",
    "hardmax": "softmax_gpu.ops.softmax",
    "cross_entropy": "softmax_gpu.ops.cross_entropy",
    "linear_cross_entropy": "softmax_gpu.ops.linear_cross_entropy",
    "token_logprobs": "softmax_gpu.ops.token_logprobs",
    "linear_token_logprobs": "softmax_gpu.ops.token_logprobs",
    "categorical_crossentropy": "softmax_gpu.keras",
}
_SUBMODULES = ("nn", "config", "traffic", "ops")

__all__ = [
    "softmax", "log_softmax", "hardmax", "cross_entropy", "linear_cross_entropy", "token_logprobs",
    "linear_token_logprobs", "categorical_crossentropy", "nn", "reference",
]


def __getattr__(name):
    if name in _FUNCTIONS:
        value = getattr(importlib.import_module(_FUNCTIONS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_FUNCTIONS) | set(_SUBMODULES))
