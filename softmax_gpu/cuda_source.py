"""The CUDA C source that softmax_gpu.cupy hands to NVRTC, assembled from kernels/*.cu.

NVRTC gets one translation unit: the shared header (without its #pragma once, which
compilers warn about in a main file), then each .cu file with its #include of the header
removed. Pure Python (no torch, no CuPy), so CI can compile the exact same
text with nvcc.
"""
import importlib
import os

HEADER = "softmax_common.cuh"
SOURCES = ("online_softmax.cu", "cross_entropy.cu")


def kernels_folder() -> str:
    return os.path.dirname(importlib.import_module("softmax_gpu.kernels").__file__)


def cuda_source() -> str:
    folder = kernels_folder()

    def read(name):
        with open(os.path.join(folder, name)) as f:
            return f.read()

    include = f'#include "{HEADER}"'
    header = read(HEADER).replace("#pragma once", "")
    return "\n".join([header] + [read(name).replace(include, "") for name in SOURCES])
