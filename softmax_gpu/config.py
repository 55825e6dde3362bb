"""The one place that decides block sizes, warps and which path a row takes.

A row of n_cols elements runs on the single-block path (read once) when it fits in
one block of at most ``max_block_n`` elements; longer rows loop over column blocks.
The limits are chosen so that no shipped configuration spills registers on sm_80 or
sm_90 (``python -m bench.compile_report`` checks every one of them).
"""
import contextlib
import dataclasses
from typing import Optional

# Largest single block, in elements, per kernel family (each block lives in registers).
# The forward holds up to 32768 (32 warps, 32 values a thread: 46-60 registers, no spill), so
# 32000-class rows are read once; its looped path, which keeps two per-lane vectors besides
# the block, spills at that width and loops 16384 wide instead.
MAX_BLOCK_SOFTMAX_FWD = 32768
LOOP_BLOCK_SOFTMAX_FWD = 16384
# The backward holds y and dy at once: 16 of each a thread at 16384 (32 warps), no spill.
MAX_BLOCK_SOFTMAX_BWD = 16384
LOOP_BLOCK_SOFTMAX_BWD = 8192
# Cross-entropy keeps up to five per-lane accumulators beside the logits, so it runs with
# half the elements per thread (8) of the softmax kernels. Its looped path streams the row in
# 1024-wide blocks on 4 warps: at 2048 and 4096 wide (8 and 16 warps) ptxas held the
# all-options probability-target variant to 64 registers and spilled on sm_80.
MAX_BLOCK_CROSS_ENTROPY = 8192
LOOP_BLOCK_CROSS_ENTROPY = 1024
# The plain variant (class indices, no class weights, no smoothing; z-loss and softcap
# allowed) keeps no per-lane sums of weights or logits, so one block holds 16384 classes
# (32 warps, 16 values a thread, 47-55 registers with the gradient). At 32768 (32 values a
# thread under 32 warps' 64-register cap) the gradient-writing variants spill 8-32 bytes
# (144 with z-loss and softcap) on sm_80/sm_90, so 32000-class rows still loop, 8192 wide.
MAX_BLOCK_CROSS_ENTROPY_PLAIN = 16384
LOOP_BLOCK_CROSS_ENTROPY_PLAIN = 8192
# Cross-entropy's reductions ("sum", "mean"): the one-program prepare kernel (the mean's total)
# and the last program of the loss kernel (the sum of the row losses) step through rows
# REDUCE_BLOCK at a time; the prepare kernel runs on REDUCE_WARPS warps.
REDUCE_BLOCK = 1024
REDUCE_WARPS = 4
ELEMENTS_PER_THREAD = 16
ELEMENTS_PER_THREAD_CROSS_ENTROPY = 8
MIN_BLOCK_N = 16

_block_limit = None  # set only by block_limit(), for tests that force the looped path


# CUDA C kernels (kernels/softmax_common.cuh must agree): each thread caches CACHED_VALUES
# values of its row in registers, and a block has at most MAX_THREADS threads.
CUDA_CACHED_VALUES = 32
CUDA_MAX_THREADS = 512


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def cuda_threads(n_cols: int, vec: int, arrays_cached: int = 1) -> int:
    """Threads per block for a CUDA C row kernel with packs of `vec` elements: the fewest
    (a power of two from 32 to CUDA_MAX_THREADS) whose registers hold the whole row, so it is
    read once; longer rows get CUDA_MAX_THREADS and loop. The backward caches two arrays."""
    packs_per_thread = CUDA_CACHED_VALUES // (arrays_cached * vec)
    packs = -(-n_cols // vec)
    threads = 32
    while threads < CUDA_MAX_THREADS and threads * packs_per_thread < packs:
        threads *= 2
    return threads


@dataclasses.dataclass(frozen=True)
class RowConfig:
    """How one program walks a row: block width, warps, and whether one block holds the row."""

    block_n: int
    num_warps: int
    single_block: bool


def warps_for(block_n: int, itemsize: int = 4, elements_per_thread: int = ELEMENTS_PER_THREAD) -> int:
    """1-32 warps, giving wide blocks elements_per_thread float32 accumulators a thread
    (half as many for float64, whose elements take two registers). At 16, fp32 rows load
    with four 128-bit loads a thread and 16-bit rows with two; at 8, one of each."""
    per_thread = elements_per_thread if itemsize <= 4 else elements_per_thread // 2
    return max(1, min(32, block_n // (32 * per_thread)))


def block_cap(max_block_n: int, itemsize: int) -> int:
    """The family's limit; a quarter of it for float64, whose elements take two registers each
    (at half the width the looped path still spills once 32 warps cap a thread at 64 registers)."""
    return max_block_n if itemsize <= 4 else max_block_n // 4


def row_config(
    n_cols: int,
    max_block_n: int,
    itemsize: int = 4,
    loop_block_n: Optional[int] = None,
    elements_per_thread: int = ELEMENTS_PER_THREAD,
) -> RowConfig:
    """Picks the launch configuration for rows of n_cols elements of `itemsize` bytes.

    Rows up to the family's limit take one block; longer ones loop in blocks of
    loop_block_n (default: the limit itself)."""
    limit = block_cap(max_block_n, itemsize)
    if n_cols > limit and loop_block_n is not None:
        limit = block_cap(loop_block_n, itemsize)
    limit = limit if _block_limit is None else min(limit, _block_limit)
    block_n = max(MIN_BLOCK_N, min(next_power_of_2(n_cols), limit))
    warps = warps_for(block_n, itemsize, elements_per_thread)
    return RowConfig(block_n=block_n, num_warps=warps, single_block=n_cols <= block_n)


@contextlib.contextmanager
def block_limit(block_n: int):
    """Caps every kernel's block width at block_n (a power of two >= 16) inside the block.

    Meant for tests: small rows then take the looped, multi-block path.
    """
    global _block_limit
    if block_n < MIN_BLOCK_N or block_n & (block_n - 1):
        raise ValueError(f"block_limit: block_n must be a power of two >= {MIN_BLOCK_N}, got {block_n}")
    previous, _block_limit = _block_limit, block_n
    try:
        yield
    finally:
        _block_limit = previous
