"""softmax-gpu: online (single-pass) softmax, log_softmax and fused softmax cross-entropy.

Triton kernels registered as PyTorch custom ops with autograd (this package), the same
algorithms in CUDA C for CuPy arrays (``softmax_gpu.cupy``), and a float64 NumPy oracle
(``softmax_gpu.reference``). Importing needs neither a GPU nor CuPy, and the PyTorch side
loads on first use, so ``import softmax_gpu.cupy`` never imports torch. Set
TRITON_INTERPRET=1 before the first use to run the kernels on CPU tensors (slow; for tests).
"""
import importlib
import importlib.machinery
import importlib.util
import os
import sys

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
_SUBMODULES = ("nn", "config", "traffic", "ops", "transformers")  # transformers: imports Hugging Face's

__all__ = [
    "softmax", "log_softmax", "hardmax", "cross_entropy", "linear_cross_entropy", "token_logprobs",
    "linear_token_logprobs", "categorical_crossentropy", "nn", "reference",
]


def _map_device_code():
    """Make ``softmax_gpu.kernels`` the top-level kernels/ folder when it is not inside this package.

    kernels/ has no ``__init__.py`` on purpose: a regular package there would shadow PyPI's
    ``kernels`` (which transformers imports) whenever Python runs from the repository root.
    Installed from a wheel, the folder sits at softmax_gpu/kernels and imports as any
    namespace subpackage. An editable install maps it too, but setuptools' editable finder
    resolves a mapped folder only through its ``__init__.py`` and serves namespace folders
    only at the top level, so ``import softmax_gpu.kernels`` fails there; the mapping the
    project declares (package-dir in pyproject.toml) is then made here, as it is for a
    checkout on PYTHONPATH."""
    name = f"{__name__}.kernels"
    here = os.path.dirname(os.path.abspath(__file__))
    source = os.path.join(os.path.dirname(here), "kernels")
    if name in sys.modules or os.path.isdir(os.path.join(here, "kernels")) or not os.path.isdir(source):
        return
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [source]
    sys.modules[name] = importlib.util.module_from_spec(spec)
    globals()["kernels"] = sys.modules[name]


_map_device_code()


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
