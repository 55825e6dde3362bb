"""Test set-up: without a CUDA GPU the kernels run in Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is first imported, so this runs before any
test module imports softmax_gpu.
"""
import os
import random
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Fresh inputs every run, reproducible on demand: SOFTMAX_GPU_TEST_SEED=<n> pytest ...
BASE_SEED = int(os.environ.get("SOFTMAX_GPU_TEST_SEED", random.randrange(2**31)))


def pytest_report_header(config):
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (Triton interpreter)"
    return f"softmax_gpu tests on {device}; SOFTMAX_GPU_TEST_SEED={BASE_SEED}"


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed((BASE_SEED + zlib.crc32(request.node.nodeid.encode())) % (2**31))


def _round_bf16_to_nearest_even():
    """Workaround: triton's interpreter (3.9) truncates float32 -> bfloat16 casts (its
    InterpreterBuilder.cast_impl calls _convert_float with rounding_mode=None), while the GPU
    rounds to nearest even. Without this, every bfloat16 store in the tests would carry up to
    one ulp of error that the compiled kernels do not have."""
    import numpy as np
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == interpreter.tl.float32 and dst_type.scalar == interpreter.tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16).view(torch.int16)
            return interpreter.TensorHandle(rounded.numpy().view(np.uint16), dst_type.scalar)
        return original(self, src, dst_type)

    interpreter.InterpreterBuilder.cast_impl = cast_impl


def _dot_bfloat16_as_values():
    """Workaround: triton's interpreter (3.9) stores bfloat16 as its uint16 bit patterns and its
    InterpreterBuilder.create_dot hands those straight to np.matmul, so a bfloat16 tl.dot
    multiplies integers. Widen both operands to float32 first (exact), which is what the
    tensor cores compute too: exact products, float32 sums."""
    import numpy as np
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def widen(handle):
        if handle.dtype.scalar != interpreter.tl.bfloat16:
            return handle
        bits = np.ascontiguousarray(handle.data).astype(np.uint32) << 16
        return interpreter.TensorHandle(bits.view(np.float32), interpreter.tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot


if os.environ.get("TRITON_INTERPRET") == "1":
    _round_bf16_to_nearest_even()
    _dot_bfloat16_as_values()
