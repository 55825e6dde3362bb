"""CuPy backend: CUDA C kernels compiled by nvcc here; run against the reference on a GPU."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from softmax_gpu import config, reference
from softmax_gpu.cuda_source import (
    ITEMSIZES,
    NVRTC_OPTIONS,
    cuda_source,
    kernel_names,
    matching_shift,
    pack_width,
    vector_width,
)

ROOT = Path(__file__).resolve().parents[1]


def _cupy_backend():
    try:
        import softmax_gpu.cupy as sgc
    except (ImportError, RuntimeError) as exc:
        return None, str(exc)
    return sgc, ""


sgc, why_not = _cupy_backend()
needs_gpu = pytest.mark.skipif(sgc is None, reason=f"CuPy backend unavailable here: {why_not}")


def test_import_never_pulls_in_torch_and_says_what_is_missing():
    code = (
        "import sys\n"
        "try:\n    import softmax_gpu.cupy\n    print('OK')\n"
        "except (ImportError, RuntimeError) as e:\n    print('ERR', type(e).__name__, e)\n"
        "print('torch loaded:', 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "torch loaded: False" in out.stdout, out.stdout + out.stderr
    if "ERR ImportError" in out.stdout:
        assert "pip install 'softmax-gpu[cupy]'" in out.stdout
    elif "ERR RuntimeError" in out.stdout:
        assert "needs a CUDA GPU" in out.stdout
    else:
        assert "OK" in out.stdout


def test_header_constants_match_config():
    header = (ROOT / "kernels" / "softmax_common.cuh").read_text()
    assert int(re.search(r"#define CACHED_VALUES (\d+)", header).group(1)) == config.CUDA_CACHED_VALUES
    assert int(re.search(r"#define MAX_THREADS (\d+)", header).group(1)) == config.CUDA_MAX_THREADS
    assert int(re.search(r"#define WARP_ROW_COLS (\d+)", header).group(1)) == config.CUDA_WARP_ROW_COLS
    assert int(re.search(r"#define WARP_ROWS (\d+)", header).group(1)) == config.CUDA_WARP_ROWS


def _header_constant(name: str) -> int:
    header = (ROOT / "kernels" / "softmax_common.cuh").read_text()
    return int(re.search(rf"#define {name} (\d+)", header).group(1))


@pytest.mark.parametrize("arrays_cached", [1, 2])
@pytest.mark.parametrize("n_rows", [1, 3, 4, 5, 1001])
@pytest.mark.parametrize("n_cols", [1, 16, 511, 512, 513, 1000, 1024, 1025, 50257])
def test_cuda_launch_gives_short_rows_a_warp_each_and_covers_every_row(n_rows, n_cols, arrays_cached):
    """Rows up to WARP_ROW_COLS (half for the backward) take the warp kernels, WARP_ROWS to a
    block: enough blocks for every row, and the warp's registers hold the whole row (so the
    warp kernels' streaming path is never needed); longer rows a block each."""
    for vec in (1, 2, 4, 8):
        launch = config.cuda_launch(n_rows, n_cols, vec, arrays_cached)
        assert launch.warp_rows == (n_cols <= config.CUDA_WARP_ROW_COLS // arrays_cached)
        if launch.warp_rows:
            assert launch.block == 32 * config.CUDA_WARP_ROWS
            assert (launch.grid - 1) * config.CUDA_WARP_ROWS < n_rows <= launch.grid * config.CUDA_WARP_ROWS
            items = config.CUDA_CACHED_VALUES // (arrays_cached * vec)  # packs a lane caches
            assert n_cols // vec <= items * 32  # cached: n_packs <= ITEMS * 32 for any head
        else:
            assert (launch.grid, launch.block) == (n_rows, config.cuda_threads(n_cols, vec, arrays_cached))


# ---------------------------------------------------------------------------------------
# The index arithmetic of the vectorised kernels, replayed on the host
# ---------------------------------------------------------------------------------------


def row_split(address: int, n_cols: int, itemsize: int, vec: int) -> tuple:
    """softmax_common.cuh's split_row, step for step: (head, n_packs, edges)."""
    offset = address // itemsize % vec
    to_boundary = (vec - offset) % vec
    head = to_boundary if to_boundary < n_cols else n_cols
    n_packs = (n_cols - head) // vec
    return head, n_packs, n_cols - n_packs * vec


def edge_col(split: tuple, vec: int, e: int) -> int:
    head, n_packs, _ = split
    return e if e < head else head + n_packs * vec + (e - head)


def stream_packs(split: tuple, rank: int, size: int, unroll: int) -> list:
    """The packs read_row/write_row's streaming loop gives one thread, in order."""
    n_packs, packs = split[1], []
    first = rank
    while first < n_packs:
        packs += [p for p in (first + u * size for u in range(unroll)) if p < n_packs]
        first += unroll * size
    return packs


def cached_packs(split: tuple, rank: int, size: int, items: int, batch: int) -> list:
    """The packs read_row's cached path gives one thread: batches of `batch` of its ITEMS,
    item `it` taken while it < mine (RowSplit::cached_packs), i.e. while its pack is < n_packs."""
    n_packs = split[1]
    mine = (n_packs - 1 - rank) // size + 1 if rank < n_packs else 0
    packs = [(first + b) * size + rank for first in range(0, items, batch) for b in range(batch) if first + b < mine]
    assert packs == [p for p in range(rank, n_packs, size)][: len(packs)]  # the same as p < n_packs
    return packs


def thread_columns(address, n_cols, itemsize, vec, size, cached, arrays=1):
    """{rank: [(column, address of the access, width in elements)]} for one row."""
    split = row_split(address, n_cols, itemsize, vec)
    items = _header_constant("CACHED_VALUES") // (arrays * vec)
    batch = min(items, _header_constant("LOAD_BATCH") // arrays)
    unroll = max(1, min(4, _header_constant("STREAM_BYTES") // (arrays * vec * itemsize)))
    body = address + split[0] * itemsize
    columns = {}
    for rank in range(size):
        packs = cached_packs(split, rank, size, items, batch) if cached else stream_packs(split, rank, size, unroll)
        got = [(split[0] + p * vec, body + p * vec * itemsize, vec) for p in packs]
        if rank < split[2]:
            col = edge_col(split, vec, rank)
            got.append((col, address + col * itemsize, 1))
        columns[rank] = got
    return split, columns


WIDTHS = sorted(set(range(0, 40)) | {63, 64, 65, 1000, 1001, 1023, 1024, 1025, 4099, 16383, 16385, 50257})


@pytest.mark.parametrize("itemsize", [2, 4, 8])
def test_head_body_tail_cover_each_element_once_with_aligned_packs(itemsize):
    """For every start offset and many widths (0 to 39 and real vocabularies), for a warp and
    for blocks, on the cached and the streaming paths: every column in [0, n_cols) is read
    (and written) exactly once, nothing outside the row is addressed, every pack is 16-byte
    aligned, and each thread has at most one edge element (head + tail <= 2 (VEC - 1) < 32)."""
    vec = 16 // itemsize
    for offset in range(vec):
        address = (1 << 20) + offset * itemsize  # a row starting `offset` elements past a boundary
        for n_cols in WIDTHS:
            for size in (32, 64, 512):
                capacity = size * _header_constant("CACHED_VALUES") // vec  # packs the cache holds
                for cached in (True, False):
                    split, columns = thread_columns(address, n_cols, itemsize, vec, size, cached)
                    head, n_packs, edges = split
                    if cached and n_packs > capacity:
                        continue  # the kernel takes the streaming path for such rows
                    assert 0 <= head < vec and edges <= 2 * (vec - 1) < 32 and head + n_packs * vec <= n_cols
                    seen = np.zeros(n_cols, np.int64)
                    for accesses in columns.values():
                        assert sum(width == 1 for *_, width in accesses) <= 1
                        for col, at, width in accesses:
                            assert 0 <= col and col + width <= n_cols, (offset, n_cols, col, width)
                            assert at == address + col * itemsize
                            assert width == 1 or at % 16 == 0, (offset, n_cols, col)
                            seen[col : col + width] += 1
                    assert (seen == 1).all(), (offset, n_cols, size, cached, np.flatnonzero(seen != 1)[:5])
                    if n_cols >= head + vec and offset:
                        assert head == vec - offset  # the head ends exactly at the first boundary


@pytest.mark.parametrize("dtype", list(ITEMSIZES))
@pytest.mark.parametrize("n_cols", [1, 7, 1000, 1001, 50257])
def test_host_keeps_odd_widths_and_unaligned_views_vectorised(dtype, n_cols):
    """softmax_gpu.cupy's choice, replayed on addresses: a contiguous input at any element
    offset (a view starting at element 1 or 3 of a buffer) and any width gets an output that
    starts at the same offset from a 16-byte boundary (matching_shift) and the 128-bit kernel,
    and then row r of input and output split identically, with aligned packs in both. A
    column slice whose row stride breaks that (x[:, 1:]) or a second input at another offset
    falls back to packs of 1."""
    itemsize, vec = ITEMSIZES[dtype], pack_width(dtype)
    for offset in (0, 1, 3, vec - 1):
        for buffer_start in (0, 256, 256 + itemsize):  # where the output's allocation happens to start
            x = (4096 + offset * itemsize, n_cols)  # (address, row stride in elements)
            buffer = 1 << 24 + buffer_start
            shift = matching_shift(x[0], buffer, itemsize)
            assert 0 <= shift < 16 // itemsize
            out = (buffer + shift * itemsize, n_cols)
            assert vector_width(dtype, [x, out]) == vec
            for r in range(9):
                x_row, out_row = x[0] + r * x[1] * itemsize, out[0] + r * out[1] * itemsize
                assert row_split(x_row, n_cols, itemsize, vec) == row_split(out_row, n_cols, itemsize, vec)
                head = row_split(x_row, n_cols, itemsize, vec)[0]
                if head < n_cols:
                    assert (x_row + head * itemsize) % 16 == (out_row + head * itemsize) % 16 == 0
            if vec > 1:
                sliced = (x[0], n_cols + 1)  # rows of a wider buffer: another offset each row
                assert vector_width(dtype, [sliced, (out[0], n_cols)]) == 1
                other = (x[0] + itemsize, n_cols)
                assert vector_width(dtype, [x, other, out]) == 1
            padded = (x[0], n_cols + 16 // itemsize)  # a stride 16 bytes longer keeps the offsets
            assert vector_width(dtype, [padded, out]) == vec
    assert vector_width(dtype, [(4096 + 1, n_cols)]) == (1 if itemsize > 1 else vec)  # not element-aligned


@pytest.mark.parametrize("n_cols", [1, 31, 1000, 4099, 20000])
@pytest.mark.parametrize("vec", [1, 4, 8])
def test_reference_blockwise_with_cuda_block_and_warp_sizes(n_cols, vec):
    """The CUDA kernels' algorithm, block for block: each of `threads` lanes keeps its own
    running (max, sum) over the columns it owns, then the lanes merge in a tree as the warp
    shuffles and the block reduction do. Checked against the plain softmax."""
    threads = config.cuda_threads(n_cols, vec)
    x = 4 * np.random.default_rng(n_cols * 10 + vec).standard_normal((2, n_cols))
    x[1, ::7] = -np.inf
    got = reference.online_softmax(x, block=threads, lanes=threads)
    np.testing.assert_allclose(got, reference.softmax(x), rtol=1e-12, atol=1e-300)
    assert reference.online_softmax(x[0], block=threads, lanes=threads).shape == (n_cols,)  # 1-D in, 1-D out
    # threads are always whole warps, and the cached path holds the row when it can
    assert threads % 32 == 0 and threads <= config.CUDA_MAX_THREADS
    cached = -(-n_cols // vec) <= threads * (config.CUDA_CACHED_VALUES // vec)
    assert cached == (n_cols <= config.CUDA_MAX_THREADS * config.CUDA_CACHED_VALUES)


def test_nvcc_compiles_every_kernel_without_spills_and_vectorised():
    """Every kernel, block and warp-per-row, for sm_80 and sm_90: no spill, and in each
    vectorised kernel (which serves every width and offset whose arrays share pack boundaries:
    the unaligned-row path is the same code, with a runtime head) the body loads and stores
    are 128-bit, the only narrower accesses being the one edge element per array and the
    cross-entropy's scalars (bench.compile_report's allowances)."""
    from bench.compile_report import SCALAR_LOADS_ALLOWED, cuda_run, format_cuda_table

    reports = cuda_run((80, 90))
    if reports is None:
        pytest.skip("nvcc is not installed")
    table = format_cuda_table(reports)
    for arch in (80, 90):  # exactly the kernels the host code can launch
        assert sorted(r.kernel for r in reports if r.arch == arch) == kernel_names(), table
    assert {r.arch for r in reports} == {80, 90}
    assert all(r.local == 0 for r in reports), table
    assert all(r.unvectorised_loads == 0 and r.unvectorised_stores == 0 for r in reports), table
    for r in (r for r in reports if r.vector_width > 1):
        wide = sum(n for op, n in r.loads.items() if ".128" in op)
        narrow = sum(n for op, n in r.loads.items() if ".128" not in op)
        assert wide >= 4 and any(".128" in op for op in r.stores), (r.kernel, table)
        edges = next(v for k, v in SCALAR_LOADS_ALLOWED.items() if r.kernel.startswith(k))
        assert narrow == edges, (r.kernel, table)  # the edges are loaded once, not per path


def test_nvrtc_source_is_one_valid_translation_unit(tmp_path):
    """The exact text softmax_gpu.cupy gives NVRTC compiles on its own (here with nvcc)."""
    import shutil

    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed")
    source = tmp_path / "all_kernels.cu"
    source.write_text(cuda_source())
    out = subprocess.run(["nvcc", "-cubin", "-arch=sm_90", *NVRTC_OPTIONS, "-Werror", "all-warnings",
                          "-o", str(tmp_path / "k.cubin"), str(source)], capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert '#include "softmax_common.cuh"' not in source.read_text()


# What cupy.RawModule adds after the caller's options before NVRTC compiles (CuPy 13-14,
# cupy/cuda/compiler.py: _compile_with_cache_cuda and _compile_using_nvrtc_no_warning), for a
# card of compute capability `arch`. CuPy also puts -I options for its own headers around the
# caller's; the source includes nothing (checked below), so they change nothing and are left out.
def cupy_appended_options(arch: int) -> tuple:
    return ("-ftz=true", f"-arch=sm_{arch}", "--device-as-default-execution-space")


def nvrtc_libraries() -> list:
    """The NVRTC shared libraries found here: the nvidia-cuda-nvrtc wheels' (the test extra
    installs one on Linux), then the system's."""
    import ctypes.util
    import importlib.util

    found = []
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        found += sorted(str(p) for p in Path(root).glob("*/lib/libnvrtc.so*") if "builtins" not in p.name)
    system = ctypes.util.find_library("nvrtc")
    return found + ([system] if system else [])


class Nvrtc:
    """The few NVRTC calls CuPy makes to build a module, through ctypes (no GPU needed)."""

    def __init__(self, path: str):
        import ctypes

        self.ctypes, self.lib = ctypes, ctypes.CDLL(path)
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)))
        self.version = (major.value, minor.value)

    def _check(self, result):
        if result != 0:
            self.lib.nvrtcGetErrorString.restype = self.ctypes.c_char_p
            raise RuntimeError(f"NVRTC error {result}: {self.lib.nvrtcGetErrorString(result).decode()}")

    def _bytes(self, program, size_fn, get_fn) -> bytes:
        size = self.ctypes.c_size_t()
        self._check(size_fn(program, self.ctypes.byref(size)))
        buffer = self.ctypes.create_string_buffer(size.value)
        self._check(get_fn(program, buffer))
        return buffer.raw[: size.value]

    def compile(self, source: str, options) -> tuple:
        """(exit code, log, PTX, CUBIN); PTX and CUBIN are empty when compilation failed."""
        ct, lib = self.ctypes, self.lib
        program = ct.c_void_p()
        self._check(lib.nvrtcCreateProgram(ct.byref(program), source.encode(), b"kern.cu", 0, None, None))
        try:
            opts = (ct.c_char_p * len(options))(*[o.encode() for o in options])
            result = lib.nvrtcCompileProgram(program, len(options), opts)
            log = self._bytes(program, lib.nvrtcGetProgramLogSize, lib.nvrtcGetProgramLog).rstrip(b"\0").decode()
            if result != 0:
                return result, log, "", b""
            ptx = self._bytes(program, lib.nvrtcGetPTXSize, lib.nvrtcGetPTX).rstrip(b"\0").decode()
            cubin = self._bytes(program, lib.nvrtcGetCUBINSize, lib.nvrtcGetCUBIN)
            return result, log, ptx, cubin
        finally:
            lib.nvrtcDestroyProgram(ct.byref(program))


# float32 PTX instructions that have a flush-to-zero form; -ftz=true gives every one of them .ftz.
FTZ_CAPABLE = re.compile(r"^\s*((?:abs|neg|add|sub|mul|fma|div|rcp|sqrt|rsqrt|ex2|lg2|min|max|setp)(?:\.\w+)*\.f32)\s", re.M)


def test_ftz_is_chosen_explicitly_and_is_what_cupy_compiles_with():
    """NVRTC obeys the last -ftz it is given and CuPy appends -ftz=true after our options: our
    explicit choice must be that same value, or the module would silently get CuPy's."""
    ours = [o for o in NVRTC_OPTIONS if o.startswith("-ftz=")]
    effective = [o for o in NVRTC_OPTIONS + cupy_appended_options(90) if o.startswith("-ftz=")][-1]
    assert ours == [effective] == ["-ftz=true"]


@pytest.mark.parametrize("arch", [80, 90])
def test_nvrtc_library_builds_the_module_cupy_builds(arch, tmp_path):
    """The real NVRTC library compiles cuda_source() with NVRTC_OPTIONS plus what CuPy appends,
    as cupy.RawModule does on an sm_80 / sm_90 card: no warnings, every kernel the host code
    launches is in the module, the flush-to-zero choice shows on every float32 instruction
    that has the modifier, and the cubin keeps all in registers."""
    libraries = nvrtc_libraries()
    if not libraries:
        pytest.skip("no NVRTC library here (pip install nvidia-cuda-nvrtc; the test extra installs it on Linux)")
    source = cuda_source()
    assert "#include" not in source  # so CuPy's -I options cannot change the result
    options = NVRTC_OPTIONS + cupy_appended_options(arch)
    ftz = [o for o in options if o.startswith("-ftz=")][-1] == "-ftz=true"
    nvrtc = Nvrtc(libraries[0])
    result, log, ptx, cubin = nvrtc.compile(source, options)
    assert result == 0, log
    assert log.strip() == "", f"NVRTC {nvrtc.version} warned:\n{log}"
    assert f".target sm_{arch}" in ptx and cubin[:4] == b"\x7fELF"
    assert sorted(re.findall(r"\.entry (\w+)\(", ptx)) == kernel_names()
    ops = FTZ_CAPABLE.findall(ptx)
    assert any(op.startswith("ex2.") for op in ops) and any(op.startswith("fma.") for op in ops)
    wrong = sorted({op for op in ops if (".ftz." in op) != ftz})
    assert not wrong, f"{'-ftz=true' if ftz else '-ftz=false'} but these float32 instructions disagree: {wrong}"
    from bench.compile_report import _tool

    cuobjdump = _tool("cuobjdump")
    if not Path(cuobjdump).exists():
        return  # triton ships cuobjdump; without it, no resource check
    (tmp_path / "k.cubin").write_bytes(cubin)
    usage = subprocess.run([cuobjdump, "--dump-resource-usage", str(tmp_path / "k.cubin")], capture_output=True, text=True)
    functions = re.findall(r"Function (\w+):\s*\n\s*(.*)", usage.stdout)
    assert sorted(name for name, _ in functions) == kernel_names(), usage.stdout + usage.stderr
    spilled = [name for name, fields in functions if re.search(r"LOCAL:[1-9]|STACK:[1-9]", fields)]
    assert not spilled, usage.stdout


# ---------------------------------------------------------------------------------------
# On a GPU (bench/device_check.sh)
# ---------------------------------------------------------------------------------------

SHAPES = [(3, 1), (4, 7), (5, 100), (3, 1024), (2, 4099), (2, 20000)]  # 20000: the looped path


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("shape", SHAPES)
def test_gpu_softmax_forward_and_backward(dtype, shape):
    import cupy

    rng = np.random.default_rng(sum(shape))
    x = (3 * rng.standard_normal(shape)).astype(dtype)
    x[0, ::5] = -np.inf
    dy = rng.standard_normal(shape).astype(dtype)
    tol = {"float32": 2e-6, "float64": 1e-12, "float16": 2e-3}[dtype]
    x64 = x.astype(np.float64)
    for fn, ref_fn, atol in ((sgc.softmax, reference.softmax, tol), (sgc.log_softmax, reference.log_softmax, 8 * tol)):
        y = cupy.asnumpy(fn(cupy.asarray(x)))
        assert y.dtype == x.dtype
        np.testing.assert_allclose(y.astype(np.float64), ref_fn(x64), rtol=tol, atol=atol)
    y = reference.softmax(x64).astype(dtype)
    dx = cupy.asnumpy(sgc.softmax_backward(cupy.asarray(y), cupy.asarray(dy)))
    np.testing.assert_allclose(dx, reference.softmax_backward(y, dy), rtol=4 * tol, atol=4 * tol)
    ly = reference.log_softmax(x64).astype(dtype)
    dx = cupy.asnumpy(sgc.log_softmax_backward(cupy.asarray(ly), cupy.asarray(dy)))
    np.testing.assert_allclose(dx, reference.log_softmax_backward(ly, dy), rtol=4 * tol, atol=4 * tol)


@needs_gpu
def test_gpu_layouts_and_extremes():
    import cupy

    x = cupy.asarray(np.random.default_rng(0).standard_normal((3, 4, 37)))
    for axis in (0, 1, 2, -1):
        np.testing.assert_allclose(cupy.asnumpy(sgc.softmax(x, axis)), reference.softmax(cupy.asnumpy(x), axis), rtol=1e-12)
    t = x[:, 0, :].T  # non-contiguous
    np.testing.assert_allclose(cupy.asnumpy(sgc.softmax(t)), reference.softmax(cupy.asnumpy(t)), rtol=1e-12)
    huge = cupy.asarray(np.array([[1e4, -1e4, 0.0, 9990.0] * 8], np.float16))
    assert cupy.isfinite(sgc.softmax(huge)).all()
    row_of_minus_inf = cupy.full((1, 9), -np.inf, cupy.float32)
    assert cupy.isnan(sgc.softmax(row_of_minus_inf)).all()  # like torch
    assert sgc.softmax(cupy.empty((0, 5), cupy.float32)).shape == (0, 5)


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("n_cols", [61, 1024, 20000])  # odd (scalar packs), vectorised, looped
def test_gpu_nan_makes_its_row_nan(dtype, n_cols):
    """A NaN anywhere in a row, even among -inf only (where fmax would drop it), makes the
    whole row NaN for softmax, log_softmax and cross-entropy; clean rows are unaffected."""
    import cupy

    rng = np.random.default_rng(n_cols)
    x = (2 * rng.standard_normal((5, n_cols))).astype(dtype)
    x[0, 0] = np.nan
    x[1, n_cols - 1] = np.nan
    x[2, :] = -np.inf
    x[2, n_cols // 2] = np.nan
    x[3, 7] = np.nan  # its target is ignored: loss 0, gradient NaN (as torch)
    for fn in (sgc.softmax, sgc.log_softmax):
        y = cupy.asnumpy(fn(cupy.asarray(x)))
        assert np.isnan(y[:4]).all() and np.isfinite(y[4]).all()
    if dtype == "float64":
        return  # the cross-entropy kernels take 16- and 32-bit logits
    target = np.array([1, 2, 3, -100, 4])
    loss, grad = sgc.cross_entropy(cupy.asarray(x), cupy.asarray(target), reduction="none")
    loss, grad = cupy.asnumpy(loss), cupy.asnumpy(grad)
    assert np.isnan(loss[:3]).all() and loss[3] == 0 and np.isfinite(loss[4])
    assert np.isnan(grad[:4]).all() and np.isfinite(grad[4]).all()


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("n_cols", [7, 1000, 50257])
def test_gpu_cross_entropy(dtype, n_cols):
    import cupy

    rng = np.random.default_rng(n_cols)
    logits = (2 * rng.standard_normal((6, n_cols))).astype(dtype)
    target = rng.integers(0, n_cols, 6)
    target[2] = -100
    for reduction in ("mean", "sum", "none"):
        for smoothing in (0.0, 0.1):
            loss, grad = sgc.cross_entropy(cupy.asarray(logits), cupy.asarray(target), reduction=reduction,
                                           label_smoothing=smoothing)  # fmt: skip
            exp_loss, exp_grad = reference.cross_entropy(logits.astype(np.float64), target, reduction=reduction,
                                                         label_smoothing=smoothing)  # fmt: skip
            tol = 2e-5 if dtype == "float32" else 5e-3
            np.testing.assert_allclose(cupy.asnumpy(loss), exp_loss, rtol=tol, atol=tol)
            np.testing.assert_allclose(cupy.asnumpy(grad).astype(np.float64), exp_grad, rtol=tol, atol=tol / n_cols)
    bad = target.copy()
    bad[0] = n_cols  # out of range: NaN for its row, never an out-of-bounds read
    loss, grad = sgc.cross_entropy(cupy.asarray(logits), cupy.asarray(bad), reduction="none")
    assert cupy.isnan(loss[0]) and cupy.isnan(grad[0]).all() and cupy.isfinite(loss[1:]).all()


@needs_gpu
def test_gpu_accepts_dlpack_tensors():
    torch = pytest.importorskip("torch")
    x = torch.randn(4, 33, device="cuda")
    y = sgc.softmax(x)
    np.testing.assert_allclose(torch.from_dlpack(y).cpu().numpy(), torch.softmax(x, -1).cpu().numpy(), rtol=2e-6, atol=1e-7)


def _bfloat16():
    """CuPy's bfloat16 dtype (ml_dtypes.bfloat16, CuPy >= 14), or a skip that says why not."""
    import cupy

    if int(cupy.__version__.split(".")[0]) < 14:
        pytest.skip(f"CuPy {cupy.__version__} cannot hold bfloat16 arrays (CuPy >= 14 with ml_dtypes can)")
    return pytest.importorskip("ml_dtypes", reason="CuPy's bfloat16 arrays need ml_dtypes").bfloat16


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("n_cols", [70, 1024, 20000, 20001])  # scalar / vectorised; read once / streamed
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_gpu_confident_rows_keep_the_true_class_gradient(dtype, n_cols, smoothing):
    """The true class 30 above the rest: q_t - 1 is exactly 0 in float32, yet the exact
    gradient (about -C e^-30, or dominated by smoothing) must come out to ~1% relative."""
    import cupy

    np_dtype = _bfloat16() if dtype == "bfloat16" else np.float32
    rng = np.random.default_rng(n_cols)
    logits = rng.standard_normal((4, n_cols))
    target = np.array([3, n_cols - 1, n_cols // 2, 40])
    logits[np.arange(4), target] = logits.max() + 30.0
    logits[3, 41] = logits[3, 40] + 1  # one row where the target is not the maximum
    logits = logits.astype(np_dtype)
    _, grad = sgc.cross_entropy(cupy.asarray(logits), cupy.asarray(target), reduction="sum", label_smoothing=smoothing)
    _, exp_grad = reference.cross_entropy(logits.astype(np.float64), target, reduction="sum", label_smoothing=smoothing)
    got = cupy.asnumpy(grad)[np.arange(4), target].astype(np.float64)
    want = exp_grad[np.arange(4), target]
    if smoothing == 0:
        assert (want[:3] > -1e-6).all() and (got[:3] < 0).all(), got  # tiny, yet not 0
    np.testing.assert_allclose(got, want, rtol=1e-2 if dtype == "float32" else 2e-2)


@needs_gpu
def test_gpu_runs_on_the_input_device_not_the_current_one():
    import cupy

    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two GPUs")
    rng = np.random.default_rng(1)
    x_host = rng.standard_normal((5, 64)).astype(np.float32)
    target_host = np.array([1, 2, 3, -100, 63])
    with cupy.cuda.Device(1):
        x, target = cupy.asarray(x_host), cupy.asarray(target_host)
    with cupy.cuda.Device(0):
        y, ly = sgc.softmax(x), sgc.log_softmax(x)
        dx, ldx = sgc.softmax_backward(y, y), sgc.log_softmax_backward(ly, y)
        loss, grad = sgc.cross_entropy(x, target, reduction="none")
        assert cupy.cuda.runtime.getDevice() == 0  # the caller's device is left as it was
        assert [a.device.id for a in (y, ly, dx, ldx, loss, grad)] == [1] * 6
        x64 = x_host.astype(np.float64)
        np.testing.assert_allclose(cupy.asnumpy(y), reference.softmax(x64), rtol=2e-6, atol=1e-7)
        np.testing.assert_allclose(cupy.asnumpy(ly), reference.log_softmax(x64), rtol=2e-5, atol=2e-5)
        exp_loss, exp_grad = reference.cross_entropy(x64, target_host, reduction="none")
        np.testing.assert_allclose(cupy.asnumpy(loss), exp_loss, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(cupy.asnumpy(grad), exp_grad, rtol=2e-5, atol=2e-6)
        on_zero = cupy.asarray(target_host)
        with pytest.raises(ValueError, match="device"):
            sgc.cross_entropy(x, on_zero)
        with pytest.raises(ValueError, match="device"):
            sgc.softmax_backward(y, cupy.asarray(x_host))


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gpu_no_classes(dtype):
    """C == 0: every target but ignore_index is out of range (NaN loss), ignored rows give 0
    and "mean" over no counted rows NaN, as torch; nothing is launched or left uninitialised."""
    import cupy

    logits = cupy.empty((3, 0), dtype)
    target = cupy.asarray([0, -100, 2])
    stale = cupy.full(3, 7.0, cupy.float32)  # memory the pool may hand out again: not read back
    del stale
    loss, grad = sgc.cross_entropy(logits, target, reduction="none")
    assert grad.shape == (3, 0) and grad.dtype == logits.dtype
    loss = cupy.asnumpy(loss)
    assert np.isnan(loss[0]) and loss[1] == 0 and np.isnan(loss[2])
    assert np.isnan(float(sgc.cross_entropy(logits, target, reduction="sum")[0]))
    ignored = cupy.full(3, -100)
    assert float(sgc.cross_entropy(logits, ignored, reduction="sum")[0]) == 0.0
    assert np.isnan(float(sgc.cross_entropy(logits, ignored, reduction="mean")[0]))
    # label smoothing: NaN everywhere, as torch (eps / C = inf times 0), even summed over no rows
    assert np.isnan(cupy.asnumpy(sgc.cross_entropy(logits, ignored, reduction="none", label_smoothing=0.1)[0])).all()
    for rows in (ignored, ignored[:0]):
        assert np.isnan(float(sgc.cross_entropy(logits[: len(rows)], rows, reduction="sum", label_smoothing=0.1)[0]))
    for fn in (sgc.softmax, sgc.log_softmax):
        assert fn(logits).shape == (3, 0)
    for fn in (sgc.softmax_backward, sgc.log_softmax_backward):
        assert fn(logits, logits).shape == (3, 0)


@needs_gpu
def test_gpu_errors_name_the_function():
    calls = {
        "softmax": lambda: sgc.softmax([1.0]),
        "log_softmax": lambda: sgc.log_softmax([1.0]),
        "softmax_backward": lambda: sgc.softmax_backward([1.0], [1.0]),
        "log_softmax_backward": lambda: sgc.log_softmax_backward([1.0], [1.0]),
        "cross_entropy": lambda: sgc.cross_entropy([[1.0]], [0]),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=f"^softmax_gpu.cupy.{name}: '[a-z]+' must be a CuPy array"):
            call()


@needs_gpu
@pytest.mark.parametrize("n_cols", [7, 1024, 20000])  # scalar, vectorised, streamed
def test_gpu_bfloat16(n_cols):
    import cupy

    bf16 = _bfloat16()
    rng = np.random.default_rng(n_cols)
    x = (3 * rng.standard_normal((4, n_cols))).astype(bf16)
    x64 = x.astype(np.float64)
    y = sgc.softmax(cupy.asarray(x))
    assert y.dtype.name == "bfloat16"
    np.testing.assert_allclose(cupy.asnumpy(y).astype(np.float64), reference.softmax(x64), rtol=8e-3, atol=1e-6)
    ly = cupy.asnumpy(sgc.log_softmax(cupy.asarray(x))).astype(np.float64)
    np.testing.assert_allclose(ly, reference.log_softmax(x64), rtol=8e-3, atol=8e-3)
    y_in = reference.softmax(x64).astype(bf16)
    dy = rng.standard_normal((4, n_cols)).astype(bf16)
    dx = cupy.asnumpy(sgc.softmax_backward(cupy.asarray(y_in), cupy.asarray(dy))).astype(np.float64)
    want = reference.softmax_backward(y_in.astype(np.float64), dy.astype(np.float64))
    np.testing.assert_allclose(dx, want, rtol=1e-2, atol=1e-6)
    target = rng.integers(0, n_cols, 4)
    target[1] = -100
    loss, grad = sgc.cross_entropy(cupy.asarray(x), cupy.asarray(target), label_smoothing=0.1)
    exp_loss, exp_grad = reference.cross_entropy(x64, target, label_smoothing=0.1)
    assert loss.dtype == np.float32 and grad.dtype.name == "bfloat16"
    np.testing.assert_allclose(float(loss), exp_loss, rtol=1e-4)  # float32 math on exact bf16 inputs
    np.testing.assert_allclose(cupy.asnumpy(grad).astype(np.float64), exp_grad, rtol=1e-2, atol=1e-2 / n_cols)


@needs_gpu
def test_gpu_kernels_are_looked_up_once_per_device():
    import cupy

    x = cupy.asarray(np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32))
    sgc.softmax(x)
    before = sgc._function.cache_info()
    sgc.softmax(x)
    after = sgc._function.cache_info()
    assert (after.hits, after.misses) == (before.hits + 1, before.misses)
    kernel = sgc._kernel("softmax_fwd", x, 4)
    assert kernel is sgc._kernel("softmax_fwd", x, 4) and kernel.name == "softmax_fwd_f32_v4"
    assert sgc._module(x.device.id) is sgc._module(x.device.id)


# ---------------------------------------------------------------------------------------
# On a GPU: any width, any offset, short rows (issue 9). Outputs come NaN-poisoned inside a
# guard band of a sentinel, so an element the kernel forgets shows up as NaN and a write
# outside the rows as a changed sentinel; the kernels launched are recorded and checked.
# The sweeps are named test_on_gpu_* so that bench/device_check.sh's compute-sanitizer pass
# (-k test_gpu_, 90 s) runs only test_gpu_unaligned_rows_stay_in_bounds from this part.
# ---------------------------------------------------------------------------------------

TOLERANCES = {"float32": 2e-6, "float64": 1e-12, "float16": 2e-3, "bfloat16": 8e-3}
GUARD = 64  # sentinel elements on each side of every output (a multiple of 16 bytes)
SENTINEL = 7.0
WIDTHS_GPU = [1, 7, 16, 1000, 1001, 1025, 4099, 20001, 50257]  # warp / block, cached / streamed


def _np_dtype(dtype: str):
    return _bfloat16() if dtype == "bfloat16" else np.dtype(dtype)


@pytest.fixture
def poisoned():
    """Replaces softmax_gpu.cupy's output allocation and kernel lookup for one test (restored
    after): outputs NaN-filled between sentinel guards, at the offset the host asked for."""
    import types

    import cupy

    made, launched = [], []
    original_empty, original_kernel = sgc._empty_rows_like, sgc._kernel

    def empty_rows_like(a, shape):
        n = shape[0] * shape[1]
        host = np.full(n + 2 * GUARD + 16 // a.itemsize, SENTINEL, dtype=a.dtype)
        buffer = cupy.asarray(host)
        start = GUARD + matching_shift(a.data.ptr, buffer.data.ptr + GUARD * a.itemsize, a.itemsize)
        host[start : start + n] = np.nan
        buffer.set(host)
        made.append((buffer, start, n))
        return buffer[start : start + n].reshape(shape)

    def kernel(family, a, vec, warp_rows=False):
        launched.append((family, vec, warp_rows))
        return original_kernel(family, a, vec, warp_rows)

    def check_guards():
        for buffer, start, n in made:
            host = cupy.asnumpy(buffer).astype(np.float64)
            outside = np.concatenate([host[:start], host[start + n :]])
            wrote = np.flatnonzero(outside != SENTINEL)
            assert wrote.size == 0, f"a kernel wrote outside its rows: {wrote[:8]}"
        made.clear()

    sgc._empty_rows_like, sgc._kernel = empty_rows_like, kernel
    try:
        yield types.SimpleNamespace(launched=launched, check_guards=check_guards)
    finally:
        sgc._empty_rows_like, sgc._kernel = original_empty, original_kernel


def _at_offset(host: np.ndarray, offset: int):
    """A device copy of 2-D `host` whose data starts `offset` elements into a fresh buffer
    (rows contiguous): with CuPy's 256-byte-aligned allocations, offset elements past a
    16-byte boundary."""
    import cupy

    flat = np.zeros(host.size + offset, host.dtype)
    flat[offset:] = host.ravel()
    buffer = cupy.asarray(flat)
    view = buffer[offset:].reshape(host.shape)
    assert view.data.ptr % 16 == offset * host.itemsize % 16
    return view


def _bits(a) -> np.ndarray:
    """A CuPy array's bit patterns on the host: a bitwise comparison in which a NaN matches
    the same NaN (``array_equal`` says NaN != NaN) and -0 differs from 0."""
    import cupy

    host = cupy.asnumpy(a)
    return host.view(f"u{host.itemsize}")


def _expect_kernel(launched, family: str, dtype: str, n_cols: int, vectorised: bool, arrays_cached: int = 1):
    assert launched, "nothing launched"
    got = launched.pop()
    warp = n_cols <= config.CUDA_WARP_ROW_COLS // arrays_cached
    assert got == (family, pack_width(dtype) if vectorised else 1, warp), got


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("n_cols", WIDTHS_GPU)
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_on_gpu_softmax_any_width_at_any_offset(poisoned, dtype, n_cols, offset):
    """Odd widths and views starting at element 1 or 3 of a buffer take the 128-bit kernels
    (an aligned head, packed body, scalar tail; one warp a row up to 1024): forward and
    backward against the float64 reference, every output element written, nothing outside
    the rows, the same bits on a second run. 5 rows: not a multiple of 4 warp rows a block."""
    import cupy

    np_dtype, tol = _np_dtype(dtype), TOLERANCES[dtype]
    rng = np.random.default_rng(n_cols * 10 + offset)
    x = (3 * rng.standard_normal((5, n_cols))).astype(np_dtype)
    x[0, :: max(1, n_cols // 7)] = -np.inf  # -inf in the head, body and tail, not the whole row
    if n_cols > 1:
        x[0, 1] = 0.0
    x64 = x.astype(np.float64)
    xd = _at_offset(x, offset)
    for fn, ref_fn, atol in ((sgc.softmax, reference.softmax, tol), (sgc.log_softmax, reference.log_softmax, 8 * tol)):
        y = fn(xd)
        _expect_kernel(poisoned.launched, "softmax_fwd", dtype, n_cols, vectorised=True)
        got = cupy.asnumpy(y).astype(np.float64)
        np.testing.assert_allclose(got, ref_fn(x64), rtol=tol, atol=atol)
        np.testing.assert_array_equal(_bits(fn(xd)), _bits(y))  # bitwise, run to run (NaN too)
        poisoned.launched.pop()
    poisoned.check_guards()

    for ref_y, fn, ref_bwd in (
        (reference.softmax, sgc.softmax_backward, reference.softmax_backward),
        (reference.log_softmax, sgc.log_softmax_backward, reference.log_softmax_backward),
    ):
        y = ref_y(x64).astype(np_dtype)
        dy = rng.standard_normal((5, n_cols)).astype(np_dtype)
        want = ref_bwd(y.astype(np.float64), dy.astype(np.float64))
        for dy_offset, vectorised in ((offset, True), (offset + 1, pack_width(dtype) == 1)):
            dx = fn(_at_offset(y, offset), _at_offset(dy, dy_offset))  # another offset: packs of 1
            _expect_kernel(poisoned.launched, "softmax_bwd", dtype, n_cols, vectorised, arrays_cached=2)
            finite = np.isfinite(want)
            got = cupy.asnumpy(dx).astype(np.float64)
            np.testing.assert_allclose(got[finite], want[finite], rtol=4 * tol, atol=4 * tol)
    poisoned.check_guards()


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("n_cols", [16, 17, 255, 513, 1000, 1024])
@pytest.mark.parametrize("n_rows", [1, 5, 4097])
def test_on_gpu_many_short_rows_one_warp_each(poisoned, dtype, n_cols, n_rows):
    """Short rows, four to a block, row counts that leave the last block partly empty: every
    row right (the idle warps of the last block write nothing), forward, backward, loss."""
    import cupy

    np_dtype, tol = _np_dtype(dtype), TOLERANCES[dtype]
    rng = np.random.default_rng(n_cols * 7 + n_rows)
    x = (2 * rng.standard_normal((n_rows, n_cols))).astype(np_dtype)
    x64 = x.astype(np.float64)
    y = sgc.softmax(cupy.asarray(x))
    _expect_kernel(poisoned.launched, "softmax_fwd", dtype, n_cols, vectorised=True)
    np.testing.assert_allclose(cupy.asnumpy(y).astype(np.float64), reference.softmax(x64), rtol=tol, atol=tol)
    y_in = reference.softmax(x64).astype(np_dtype)
    dy = rng.standard_normal((n_rows, n_cols)).astype(np_dtype)
    dx = sgc.softmax_backward(cupy.asarray(y_in), cupy.asarray(dy))
    _expect_kernel(poisoned.launched, "softmax_bwd", dtype, n_cols, vectorised=True, arrays_cached=2)
    want = reference.softmax_backward(y_in.astype(np.float64), dy.astype(np.float64))
    np.testing.assert_allclose(cupy.asnumpy(dx).astype(np.float64), want, rtol=4 * tol, atol=4 * tol)
    if dtype == "float64":
        poisoned.check_guards()
        return  # the cross-entropy kernels take 16- and 32-bit logits
    target = rng.integers(0, n_cols, n_rows)
    target[::3] = -100
    loss, grad = sgc.cross_entropy(cupy.asarray(x), cupy.asarray(target), reduction="none", label_smoothing=0.1)
    _expect_kernel(poisoned.launched, "cross_entropy", dtype, n_cols, vectorised=True)
    exp_loss, exp_grad = reference.cross_entropy(x64, target, reduction="none", label_smoothing=0.1)
    ce_tol = {"float32": 2e-5, "float16": 5e-3, "bfloat16": 2e-2}[dtype]
    np.testing.assert_allclose(cupy.asnumpy(loss), exp_loss, rtol=ce_tol, atol=ce_tol)
    np.testing.assert_allclose(cupy.asnumpy(grad).astype(np.float64), exp_grad, rtol=ce_tol, atol=ce_tol / n_cols)
    poisoned.check_guards()


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("n_cols", [1, 7, 1000, 1001, 4099, 50257])
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_on_gpu_cross_entropy_any_width_at_any_offset(poisoned, dtype, n_cols, offset):
    """Every option of the CUDA C cross-entropy on unaligned logits of odd widths: reductions,
    label smoothing, ignore_index, targets in the head (0) and the tail (C - 1); an
    out-of-range target gives NaN for its row only; confident rows keep their true-class
    gradient wherever the target falls (head, body, tail)."""
    import cupy

    np_dtype = _np_dtype(dtype)
    tol = 2e-5 if dtype == "float32" else 5e-3 if dtype == "float16" else 2e-2
    rng = np.random.default_rng(n_cols + offset)
    logits = (2 * rng.standard_normal((7, n_cols))).astype(np_dtype)
    target = rng.integers(0, n_cols, 7)
    target[0], target[1], target[2] = 0, n_cols - 1, -100
    logits64 = logits.astype(np.float64)
    ld = _at_offset(logits, offset)
    for reduction in ("mean", "sum", "none"):
        for smoothing in (0.0, 0.1):
            loss, grad = sgc.cross_entropy(ld, cupy.asarray(target), reduction=reduction, label_smoothing=smoothing)
            _expect_kernel(poisoned.launched, "cross_entropy", dtype, n_cols, vectorised=True)
            exp_loss, exp_grad = reference.cross_entropy(logits64, target, reduction=reduction,
                                                         label_smoothing=smoothing)  # fmt: skip
            np.testing.assert_allclose(cupy.asnumpy(loss), exp_loss, rtol=tol, atol=tol)
            np.testing.assert_allclose(cupy.asnumpy(grad).astype(np.float64), exp_grad, rtol=tol, atol=tol / n_cols)
            again = sgc.cross_entropy(ld, cupy.asarray(target), reduction=reduction, label_smoothing=smoothing)
            poisoned.launched.pop()
            assert cupy.array_equal(again[0], loss) and cupy.array_equal(again[1], grad)  # bitwise
    bad = target.copy()
    bad[3] = n_cols
    loss, grad = sgc.cross_entropy(ld, cupy.asarray(bad), reduction="none")
    poisoned.launched.pop()
    loss, grad = cupy.asnumpy(loss), cupy.asnumpy(grad).astype(np.float64)
    assert np.isnan(loss[3]) and np.isnan(grad[3]).all()
    rows = [r for r in range(7) if r != 3]
    assert np.isfinite(loss[rows]).all() and np.isfinite(grad[rows]).all()
    poisoned.check_guards()

    if n_cols < 3 or dtype == "float16":
        return  # float16 cannot hold the true class's gradient (about -C e^-30): it rounds to -0
    confident = rng.standard_normal((3, n_cols))
    where = np.array([0, n_cols // 2, n_cols - 1])  # head, body, tail (at offsets 1 and 3)
    confident[np.arange(3), where] = confident.max() + 30.0
    confident = confident.astype(np_dtype)
    _, grad = sgc.cross_entropy(_at_offset(confident, offset), cupy.asarray(where), reduction="sum")
    poisoned.launched.pop()
    # q_t - 1 = -S / (1 + S), S = sum_{j != t} e^(z_j - z_t): exact in float64, where the
    # reference's q_t - 1 itself cancels (2% off for C = 7)
    z = confident.astype(np.float64)
    others = np.exp(z - z[np.arange(3), where][:, None]).sum(1) - 1.0
    got = cupy.asnumpy(grad)[np.arange(3), where].astype(np.float64)
    assert (got < 0).all(), got  # tiny, yet not 0
    np.testing.assert_allclose(got, -others / (1 + others), rtol=1e-2 if dtype == "float32" else 2e-2)
    poisoned.check_guards()


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("n_cols", [7, 1001, 50257])
@pytest.mark.parametrize("offset", [0, 3])
def test_on_gpu_nan_in_head_body_or_tail_makes_its_row_nan(poisoned, dtype, n_cols, offset):
    """A NaN at the first column (the unaligned head at offset 3), in the body, at the last
    column (the tail), or among -inf makes its whole row NaN; the clean row stays finite."""
    import cupy

    np_dtype = _np_dtype(dtype)
    rng = np.random.default_rng(n_cols + offset)
    x = rng.standard_normal((5, n_cols)).astype(np_dtype)
    x[0, 0] = np.nan
    x[1, n_cols // 2] = np.nan
    x[2, n_cols - 1] = np.nan
    x[3, :] = -np.inf
    x[3, n_cols - 1] = np.nan
    xd = _at_offset(x, offset)
    for fn in (sgc.softmax, sgc.log_softmax):
        y = cupy.asnumpy(fn(xd))
        assert np.isnan(y[:4]).all() and np.isfinite(y[4]).all()
    y_in = np.full(x.shape, 0.5, np_dtype)
    dy = np.where(np.isnan(x), np.nan, 1.0 / n_cols).astype(np_dtype)  # the NaN enters both backward sums
    for fn in (sgc.softmax_backward, sgc.log_softmax_backward):
        dx = cupy.asnumpy(fn(_at_offset(y_in, offset), _at_offset(dy, offset)))
        assert np.isnan(dx[:4]).all() and np.isfinite(dx[4]).all()
    if dtype != "float64":
        loss, grad = sgc.cross_entropy(xd, cupy.asarray([0, 1, -100, 2, 3]), reduction="none")
        loss, grad = cupy.asnumpy(loss), cupy.asnumpy(grad)
        assert np.isnan(loss[[0, 1, 3]]).all() and loss[2] == 0 and np.isfinite(loss[4])
        assert np.isnan(grad[:4]).all() and np.isfinite(grad[4]).all()
    poisoned.check_guards()


@needs_gpu
@pytest.mark.parametrize("n_cols", [7, 1000, 4099])
def test_gpu_column_slices_fall_back_to_scalar_packs(poisoned, n_cols):
    """x[:, 1:] of a float32 buffer: each row at another offset from the output's, so the
    host launches packs of 1 (still correct, never misaligned)."""
    import cupy

    wide = np.random.default_rng(n_cols).standard_normal((6, n_cols + 1)).astype(np.float32)
    x = cupy.asarray(wide)[:, 1:]
    y = sgc.softmax(x)
    _expect_kernel(poisoned.launched, "softmax_fwd", "float32", n_cols, vectorised=False)
    np.testing.assert_allclose(cupy.asnumpy(y), reference.softmax(wide[:, 1:].astype(np.float64)), rtol=2e-6, atol=1e-7)
    poisoned.check_guards()


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gpu_unaligned_rows_stay_in_bounds(poisoned, dtype):
    """A few launches of every new path for compute-sanitizer's memcheck: warp and block rows,
    cached and streamed, heads and tails at offset 3, forward, backward and cross-entropy."""
    import cupy

    for n_cols in (7, 1001, 20001):
        x = np.random.default_rng(n_cols).standard_normal((5, n_cols)).astype(dtype)
        xd = _at_offset(x, 3)
        y = sgc.softmax(xd)
        sgc.log_softmax_backward(sgc.log_softmax(xd), xd)
        sgc.softmax_backward(y, _at_offset(x, 3))
        loss, grad = sgc.cross_entropy(xd, cupy.asarray([0, n_cols - 1, -100, 3, n_cols]), reduction="none")
        assert np.isfinite(cupy.asnumpy(y).astype(np.float64)).all()
        assert np.isnan(cupy.asnumpy(loss)[4]) and np.isfinite(cupy.asnumpy(loss)[:4]).all()
        assert all(vec == pack_width(dtype) for _, vec, _ in poisoned.launched)
        poisoned.launched.clear()
    poisoned.check_guards()
