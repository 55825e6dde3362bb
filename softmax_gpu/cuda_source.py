"""The CUDA C source that softmax_gpu.cupy hands to NVRTC, assembled from kernels/*.cu.

NVRTC gets one translation unit: the shared header (without its #pragma once, which
compilers warn about in a main file), then each .cu file with its #include of the header
removed, compiled with NVRTC_OPTIONS. The kernel names the host code launches come from
kernel_name() here too. Pure Python (no torch, no CuPy), so CI can compile the exact same
text with the same options, through the NVRTC library and with nvcc.
"""
import importlib
import os

HEADER = "softmax_common.cuh"
SOURCES = ("online_softmax.cu", "cross_entropy.cu")

# The options softmax_gpu.cupy passes to cupy.RawModule, and CI to the NVRTC library. CuPy
# itself appends "-ftz=true" after the caller's options on every RawModule compile (as it has
# since its first compile_with_cache), and NVRTC obeys the last -ftz it is given, so
# "-ftz=false" here would be overridden, with a warning. Flush-to-zero is therefore chosen on
# purpose and written out, so the binary CI inspects is the one CuPy builds. What it costs:
# float32 operations read and write subnormals (|x| < 2^-126 = 1.2e-38) as 0. A softmax
# probability or gradient entry below 1.2e-38 comes back 0 where torch (built without ftz) can
# return a float32/bfloat16 subnormal; float16 results are unaffected (its smallest subnormal is
# 6e-8), float64 is never flushed, and lse and the loss are unaffected (the row sum is >= 1). The
# Triton kernels' exp (ex2.approx.ftz.f32) flushes the same way.
NVRTC_OPTIONS = ("-std=c++17", "-ftz=true")

# dtype name -> the type suffix of the kernels; the dtypes each kernel family takes.
TYPE_NAMES = {"float32": "f32", "float64": "f64", "float16": "f16", "bfloat16": "bf16"}
ITEMSIZES = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}
FAMILIES = {
    "softmax_fwd": ("float32", "float64", "float16", "bfloat16"),
    "softmax_bwd": ("float32", "float64", "float16", "bfloat16"),
    "cross_entropy": ("float32", "float16", "bfloat16"),
}


def pack_width(dtype_name: str) -> int:
    """Elements in a 128-bit pack, the width of a vectorised kernel."""
    return 16 // ITEMSIZES[dtype_name]


def vector_width(dtype_name: str, arrays) -> int:
    """Elements a pack for a launch over arrays given as (address in bytes, row stride in
    elements): pack_width() when row r of every array starts at the same offset from a 16-byte
    boundary (the same start offset and the same row stride modulo 16 bytes, every address a
    whole element), else 1. The vectorised kernels walk each row as a scalar head up to its
    first 16-byte boundary, 128-bit packs, and a scalar tail, so any width and offset works as
    long as every array's packs are aligned together."""
    itemsize = ITEMSIZES[dtype_name]
    if any(address % itemsize for address, _ in arrays):
        return 1
    offsets = {address % 16 for address, _ in arrays}
    strides = {stride * itemsize % 16 for _, stride in arrays}
    return pack_width(dtype_name) if len(offsets) == 1 and len(strides) == 1 else 1


def matching_shift(address: int, buffer_address: int, itemsize: int) -> int:
    """Elements to skip at the start of a buffer (fewer than 16 // itemsize) so that it starts
    at `address`'s offset from a 16-byte boundary; both addresses whole elements."""
    return (address - buffer_address) % 16 // itemsize


def kernel_name(family: str, dtype_name: str, vec: int, warp_rows: bool = False) -> str:
    """The extern "C" name of one kernel, e.g. softmax_fwd_f32_v4 (a block per row) or
    softmax_fwd_warp_f32_v4 (a warp per row, several rows to a block)."""
    if dtype_name not in FAMILIES[family] or vec not in (1, pack_width(dtype_name)):
        raise ValueError(f"no {family} kernel for {dtype_name} with packs of {vec}")
    return f"{family}_{'warp_' if warp_rows else ''}{TYPE_NAMES[dtype_name]}_v{vec}"


def kernel_names() -> list:
    """Every kernel name softmax_gpu.cupy can launch."""
    return sorted(
        kernel_name(family, dtype, vec, warp_rows)
        for family, dtypes in FAMILIES.items()
        for dtype in dtypes
        for vec in (1, pack_width(dtype))
        for warp_rows in (False, True)
    )


def kernels_folder() -> str:
    # A namespace package (kernels/ has no __init__.py): its one folder is its path.
    return list(importlib.import_module("softmax_gpu.kernels").__path__)[0]


def cuda_source() -> str:
    folder = kernels_folder()

    def read(name):
        with open(os.path.join(folder, name)) as f:
            return f.read()

    include = f'#include "{HEADER}"'
    header = read(HEADER).replace("#pragma once", "")
    return "\n".join([header] + [read(name).replace(include, "") for name in SOURCES])
