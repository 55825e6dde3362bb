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
# Set in the environment, the one seed reaches pytest-xdist's workers too (they inherit it).
os.environ.setdefault("SOFTMAX_GPU_TEST_SEED", str(random.randrange(2**31)))
BASE_SEED = int(os.environ["SOFTMAX_GPU_TEST_SEED"])

# The longest tests first, so the two workers of `pytest -n 2 --maxschedchunk 1` finish
# together (longest-first scheduling); measured on 2 CPU cores, seconds. The full compile
# report compiles in a pool of its own and fills the compile cache (bench.compile_report.
# ResultCache); the CPU report's test runs last and reads its sm_90 figures from there.
FIRST = (
    "tests/test_tools.py::test_compile_report_has_no_spills",  # ~10 minutes cold, both cores
    "tests/test_bench.py::test_device_check_dry_run",  # ~65
    "tests/test_softmax.py::test_split_gradcheck_float64",  # ~60
    "tests/test_cupy.py::test_nvcc_compiles_every_kernel_without_spills_and_vectorised",  # ~55
    "tests/test_tools.py::test_compile_report_on_exact_launches",  # ~40 cold
    "tests/test_cupy.py::test_nvrtc_library_builds_the_module_cupy_builds",  # ~30 each
    "tests/test_cupy.py::test_nvrtc_source_is_one_valid_translation_unit",  # ~30
)
LAST = ("tests/test_bench.py::test_cpu_report_without_gpu",)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        node = item.nodeid.split("[")[0]
        if node in FIRST:
            return FIRST.index(node) - len(FIRST)
        return 1 if node in LAST else 0

    items.sort(key=rank)  # stable: the rest keep their order


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
