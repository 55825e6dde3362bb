"""The one place that decides block sizes, warps and which path a row takes.

A row of n_cols elements runs on the single-block path (read once) when it fits in
one block of at most ``max_block_n`` elements; longer rows loop over column blocks.
The limits are chosen so that no shipped configuration spills registers on sm_80 or
sm_90 (``python -m bench.compile_report`` checks every one of them).
"""
import contextlib
import dataclasses

import triton

# Largest single block, in elements, per kernel family (each block lives in registers).
MAX_BLOCK_SOFTMAX_FWD = 16384
MAX_BLOCK_SOFTMAX_BWD = 8192  # holds y and dy at once
MAX_BLOCK_CROSS_ENTROPY = 16384
MIN_BLOCK_N = 16

_block_limit = None  # set only by block_limit(), for tests that force the looped path


@dataclasses.dataclass(frozen=True)
class RowConfig:
    """How one program walks a row: block width, warps, and whether one block holds the row."""

    block_n: int
    num_warps: int
    single_block: bool


def warps_for(block_n: int, itemsize: int = 4) -> int:
    """1-32 warps, giving wide blocks 64 bytes of accumulator per thread: 16 float32 elements
    (four 128-bit loads of float32, two of 16-bit types) or 8 float64 ones."""
    return max(1, min(32, block_n * max(itemsize, 4) // 2048))


def block_cap(max_block_n: int, itemsize: int) -> int:
    """The family's limit; a quarter of it for float64, whose elements take two registers each
    (at half the width the looped path still spills once 32 warps cap a thread at 64 registers)."""
    return max_block_n if itemsize <= 4 else max_block_n // 4


def row_config(n_cols: int, max_block_n: int, itemsize: int = 4) -> RowConfig:
    """Picks the launch configuration for rows of n_cols elements of `itemsize` bytes."""
    limit = block_cap(max_block_n, itemsize)
    limit = limit if _block_limit is None else min(limit, _block_limit)
    block_n = max(MIN_BLOCK_N, min(triton.next_power_of_2(max(n_cols, 1)), limit))
    return RowConfig(block_n=block_n, num_warps=warps_for(block_n, itemsize), single_block=n_cols <= block_n)


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
