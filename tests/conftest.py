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


if os.environ.get("TRITON_INTERPRET") == "1":
    from softmax_gpu.interpreter import apply_fixes

    apply_fixes()
