"""softmax-gpu: online (single-pass) softmax, log_softmax and fused softmax cross-entropy.

Triton kernels registered as PyTorch custom ops with autograd (this package), the same
algorithms in CUDA C for CuPy arrays (``softmax_gpu.cupy``), and a float64 NumPy oracle
(``softmax_gpu.reference``). Importing needs neither a GPU nor CuPy. Set
TRITON_INTERPRET=1 before importing to run the kernels on CPU tensors (slow; for tests).
"""
from . import nn, reference
from .cross_entropy import cross_entropy
from .keras import categorical_crossentropy
from .softmax import hardmax, log_softmax, softmax

__all__ = ["softmax", "log_softmax", "hardmax", "cross_entropy", "categorical_crossentropy", "nn", "reference"]
__version__ = "0.1.0"
