"""The one place that decides block sizes, warps and which path a row takes.

A row of n_cols elements runs on the single-block path (read once) when it fits in
one block of at most ``max_block_n`` elements; longer rows loop over column blocks.
The limits are chosen so that no shipped configuration spills registers on sm_80 or
sm_90 (``python -m bench.compile_report`` checks every one of them).
"""
import contextlib
import dataclasses
import os
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
# thread under 32 warps' 64-register cap) the gradient-writing variants still spill on sm_90
# (checked 2026-11-27 with triton 3.9: float32 8-88 bytes, the most with a head/tail edge),
# so float32 32000-class rows still loop, 8192 wide.
# With a soft cap, whose gradient keeps the capped logits, 16384 took 64 registers and spilled
# 8-24 bytes on sm_90: the soft-capped plain variant single-blocks to MAX_BLOCK_CROSS_ENTROPY.
# float64 keeps the general limits (its plain looped block spilled 8 bytes on sm_90).
MAX_BLOCK_CROSS_ENTROPY_PLAIN = 16384
LOOP_BLOCK_CROSS_ENTROPY_PLAIN = 8192
# 16-bit logits hold 32768 classes: the kernel keeps the loaded 16-bit row (16 registers for
# 32 values) and converts it afresh in each pass instead of holding its float32 copy
# (kernels/cross_entropy.py, fresh()): 64 registers, no spill on sm_80/sm_90.
MAX_BLOCK_CROSS_ENTROPY_PLAIN_16BIT = 32768


# The loss kernel without the gradient reads a looped row once too, keeping one running
# (max, sum) a row instead of two float32 registers a lane: its loop block is narrower, with
# four 16-byte loads a thread (32 16-bit or 16 float32 values), so that more programs fit an
# SM and more bytes are in flight: at 4096 x 128256 on sm_90, 6 programs of 4 warps (16-bit,
# 48 KiB) or 4 of 8 (float32, 64 KiB) against 1 of 32 warps and 16 KiB with the gradient's
# per-lane loop (python -m bench.compile_report --op ce_fwd prints these).
LOOP_BLOCK_CROSS_ENTROPY_FORWARD = 4096
# Wider rows than this take that loop even where one block would hold them: the single block
# holds one program an SM from 16384 16-bit or float32 values (32 warps), which then has
# nothing in flight while it reduces its row, against 4-6 streaming programs.
FORWARD_SINGLE_BLOCK_MAX = 8192
FORWARD_STREAM_ROWS_PER_SM = 2  # ... where there are at least this many rows an SM


def forward_stream_rows(device) -> int:
    """The fewest rows for which the gradient-free forward streams rows its single block would
    hold (config above); fewer rows keep the block: one program a row, read in one step."""
    return FORWARD_STREAM_ROWS_PER_SM * sm_count(device)


def elements_per_thread_forward(itemsize: int) -> int:
    """Values a thread of the gradient-free looped cross-entropy: four 16-byte loads."""
    return max(4, 64 // itemsize)


def max_block_cross_entropy_plain(itemsize: int) -> int:
    """The plain cross-entropy variant's single-block limit for logits of `itemsize` bytes."""
    return MAX_BLOCK_CROSS_ENTROPY_PLAIN_16BIT if itemsize == 2 else MAX_BLOCK_CROSS_ENTROPY_PLAIN


# Cross-entropy's reductions ("sum", "mean"): the last program of the loss kernel (the sum of
# the row losses) steps through rows reduce_block() at a time, and the one-program prepare
# kernel (the mean's total) PREPARE_BLOCK at a time on PREPARE_WARPS warps. Each step is a
# dependent memory round trip of one program, on the critical path before the loss kernel:
# at 32768 rows the prepare kernel's 1024-row steps on 4 warps made 32 of them (~1 us each
# from DRAM), 4096-row steps on 16 warps make 8. (The loss kernel keeps 1024: wider steps
# cost its 16-warp variants registers, 30 -> 40 at 4096 bf16 on sm_90.)
REDUCE_BLOCK = 1024
PREPARE_BLOCK = 4096
PREPARE_WARPS = 16


def reduce_block(num_warps: int) -> int:
    """The loss kernel's row-sum step: 4 values a thread. The whole kernel pays for the
    registers of its last program's sum, so a short-row program on 1 warp sums 128 rows at
    a time (1024 doubled its registers: 35 -> 70 in float32 on sm_90)."""
    return min(REDUCE_BLOCK, 32 * num_warps * 4)
ELEMENTS_PER_THREAD = 16
ELEMENTS_PER_THREAD_CROSS_ENTROPY = 8
MIN_BLOCK_N = 16

_block_limit = None  # set only by block_limit(), for tests that force the looped path


# CUDA C kernels (kernels/softmax_common.cuh must agree, tests/test_cupy.py checks): each
# thread caches CACHED_VALUES values of its row in registers, and a block has at most
# MAX_THREADS threads. Rows of up to CUDA_WARP_ROW_COLS elements (half in the backward, which
# caches y and dy) run one warp a row, CUDA_WARP_ROWS rows a block (WARP_ROW_COLS, WARP_ROWS):
# 1024 is the most a warp's registers hold (32 lanes x 32 values), so every short row is still
# read once, and these are exactly the rows that got a single-warp block before, paying a
# shared-memory round trip and __syncthreads per reduction with at most 32 blocks (32 warps)
# resident an SM. Four rows a block: 128 threads, 7 blocks (28 warps) an SM at the warp
# kernels' 72-register budget, and a partial last block wastes at most 3 warps.
CUDA_CACHED_VALUES = 32
CUDA_MAX_THREADS = 512
CUDA_WARP_ROW_COLS = 1024
CUDA_WARP_ROWS = 4


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
class CudaLaunch:
    """How a CUDA C row kernel is launched: the warp-per-row kernel (warp_rows) or the
    block-per-row one, and its grid and block sizes (1-D)."""

    warp_rows: bool
    grid: int
    block: int


def cuda_launch(n_rows: int, n_cols: int, vec: int, arrays_cached: int = 1) -> CudaLaunch:
    """Short rows (up to CUDA_WARP_ROW_COLS // arrays_cached) one warp each, CUDA_WARP_ROWS to
    a block; longer ones a block each, of cuda_threads()."""
    if n_cols <= CUDA_WARP_ROW_COLS // arrays_cached:
        return CudaLaunch(warp_rows=True, grid=-(-n_rows // CUDA_WARP_ROWS), block=32 * CUDA_WARP_ROWS)
    return CudaLaunch(warp_rows=False, grid=n_rows, block=cuda_threads(n_cols, vec, arrays_cached))


@dataclasses.dataclass(frozen=True)
class RowConfig:
    """How one program walks a row: block width, warps, whether one block holds the row, and
    how many rows a program takes (a [rows, block_n] tile; single-block softmax only)."""

    block_n: int
    num_warps: int
    single_block: bool
    rows: int = 1
    vec: int = 1  # elements per 16-byte vector of the row's aligned body (1: no split)
    edge: bool = False  # rows have a head or tail outside whole vectors (see vectors())

    @property
    def maxnreg(self) -> int:
        return max_registers(self.num_warps)


# The register file of an SM (sm_80, sm_90): 64K 32-bit registers.
REGISTERS_PER_SM = 65536


def max_registers(num_warps: int) -> int:
    """The register cap (.maxnreg) the row kernels are compiled with: a thread's share of the
    register file when one program fills it (64 at 32 warps; 255, ptxas's own limit, at 8 or
    fewer). Stating it changes nothing for most kernels, but without it ptxas compiled some
    32-warp cross-entropy variants to 32 registers and spilled, to fit two programs per SM on
    sm_80."""
    return min(255, REGISTERS_PER_SM // (32 * num_warps))


# 128-bit loads at every width: the row kernels cut each row into an aligned body of whole
# VECTOR_BYTES vectors and a head and tail of a few elements (kernels/softmax.py). Triton only
# proves alignment for integers it specialised as multiples of 16, so without the cut a row of
# 50257 or 1000 elements compiles to one narrow load per element.
VECTOR_BYTES = 16


def vectors(cfg, n_rows: int, n_cols: int, tensors):
    """cfg (a RowConfig or SplitConfig) with the body/edge split for rows read and written
    through `tensors`, a sequence of (itemsize, row_stride) of every row tensor the kernel
    vectorises. vec is the element count of a 16-byte vector of the narrowest dtype; the rows
    of every tensor must then start at the same column modulo vec (their row strides agree
    modulo vec, or there is one row), else vec = 1. edge is False when every row is whole vectors from column 0 (the width and the
    row strides are multiples of vec): the kernel then skips the head and tail."""
    vec = VECTOR_BYTES // min(itemsize for itemsize, _ in tensors)
    strides = [0 if n_rows <= 1 else stride for _, stride in tensors]
    if len({stride % vec for stride in strides}) > 1:
        return dataclasses.replace(cfg, vec=1, edge=False)
    edge = n_cols % vec != 0 or strides[0] % vec != 0
    return dataclasses.replace(cfg, vec=vec, edge=edge)


# Short rows: the softmax and cross-entropy kernels give a program several rows until its tile
# holds SHORT_ROWS_TILE elements (softmax: 16 a thread on 4 warps, two or four 16-byte loads a
# thread; cross-entropy: 8 a thread on 8 warps), instead of one short row on one warp with a
# few narrow loads.
SHORT_ROWS_TILE = 2048


def short_rows(
    cfg: RowConfig, n_rows: int, itemsize: int = 4, elements_per_thread: int = ELEMENTS_PER_THREAD
) -> RowConfig:
    """cfg with several rows per program when its single block is narrower than
    SHORT_ROWS_TILE (never more rows than there are, rounded up to a power of two)."""
    if not cfg.single_block or cfg.block_n >= SHORT_ROWS_TILE or n_rows <= 1:
        return cfg
    rows = min(SHORT_ROWS_TILE // cfg.block_n, next_power_of_2(n_rows))
    return dataclasses.replace(
        cfg, rows=rows, num_warps=warps_for(rows * cfg.block_n, itemsize, elements_per_thread)
    )


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


# ---------------------------------------------------------------------------------------
# Linear cross-entropy (softmax_gpu/ops/linear_cross_entropy.py): buffers from a budget
# ---------------------------------------------------------------------------------------
# The matrix products go to cuBLAS (torch.mm / addmm); between them the cross-entropy row
# kernels work on a bounded buffer of logits, sized from a memory budget, never from N x V:
#   "speed"       the tokens in chunks of `rows`; the chunk's logits (rows x V) are the buffer.
#                 When all N rows fit in V*H*4 + budget bytes (the fp32 dW accumulator a
#                 chunked run would need, plus the budget) they are one chunk and dW is one
#                 product; otherwise chunks of budget / (V * itemsize) rows and an fp32 dW.
#                 Extra memory: at most V*H*4 + budget.
#   "low_memory"  the vocabulary in slabs of `cols` classes; the slab's logits (N x cols) are
#                 the buffer, and dX accumulates in an N x H fp32 tensor.
#                 Extra memory: at most N*H*4 + budget (+ O(N) statistics).
LINEAR_CE_MODES = ("speed", "low_memory")
LINEAR_CE_BUFFER_BYTES = {"speed": 512 << 20, "low_memory": 256 << 20}
LINEAR_CE_ALIGN = 256  # chunk rows and slab classes are multiples of this (when there are more)
# grad_skip_threshold's unit: [rows x classes] tiles of the logits' gradient, aligned to the
# chunks and slabs (they are multiples of it).
LINEAR_CE_SKIP_TILE = (128, 256)
# mm_accumulate's fallback (no 16-bit x 16-bit -> float32 product in this torch): the 16-bit
# partial product is made this many bytes at a time.
LINEAR_CE_FALLBACK_BYTES = 32 << 20
LINEAR_CE_SKIP_WARPS = 32  # the filter kernel: 32 values a thread at that tile (16 warps spilled float32 on sm_90)
# The backward's products over the kept tiles (kernels/linear_cross_entropy.py): output
# blocks of (the skip tile's rows, or LIVE_BLOCK_V classes) x LIVE_BLOCK_H hidden columns, stepping
# LIVE_BLOCK_K at a time through each kept tile, on LIVE_WARPS warps. A tile side under
# LIVE_MIN_TILE (tl.dot's smallest) keeps cuBLAS's dense products.
LINEAR_CE_LIVE_BLOCK_H = 128
LINEAR_CE_LIVE_BLOCK_V = 128
LINEAR_CE_LIVE_BLOCK_K = 64
# float32 operands (tf32 products take three times the registers, exact ones are FMAs from
# registers): output blocks of a quarter the area and a shorter step, else they spill
LINEAR_CE_LIVE_FP32 = dict(BLOCK_M=32, BLOCK_H=64, BLOCK_V=32, BLOCK_K=16, WARPS=4)
LINEAR_CE_LIVE_WARPS = 8
LINEAR_CE_LIVE_MIN_TILE = 16

# The logits product in Triton with the row statistics in its epilogue
# (kernels/linear_cross_entropy.py, linear_logits_kernel), instead of cuBLAS's product and
# a pass of the row kernel over the logits. Off unless SOFTMAX_GPU_LINEAR_CE_FUSED=1: the
# roofline makes it the faster route only if Triton's product comes within a few percent of
# cuBLAS's, which no GPU has measured yet (bench/linear_ce.py times both). Class-index
# targets only; probability targets keep cuBLAS's route. fused_logits() switches it inside
# a block (tests, the benchmark).
LINEAR_CE_FUSED = os.environ.get("SOFTMAX_GPU_LINEAR_CE_FUSED", "0") == "1"
# Its tiles: (BLOCK_M rows x BLOCK_N classes), BLOCK_K of the hidden dim a step, STAGES
# steps in flight, GROUP_M row tiles sharing their class tiles. 16-bit: 128 x 128 on 8 warps
# (a 64-register float32 accumulator a thread, wgmma on sm_90; 182-254 registers with the
# statistics, no spill). At 128 x 256 the epilogue spilled on sm_90 (8 bytes plain, 104-1400
# with the options). float32 (TF32 wgmma, or exact FMAs for "highest"): 64 x 64 on 4 warps.
# 3 stages: 96 KiB of operand buffers for 16-bit, within the ~99 KiB a block gets on sm_86
# and sm_89 as well as on sm_80 and sm_90 (4 stages, 128 KiB, would not launch there).
# merge_tile_stats_kernel holds LINEAR_CE_MERGE_BLOCK tiles a pass.
LINEAR_CE_LOGITS = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, WARPS=8, STAGES=3)
LINEAR_CE_LOGITS_FP32 = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, WARPS=4, STAGES=3)
LINEAR_CE_MERGE_BLOCK = 512
LINEAR_CE_MERGE_WARPS = 4

_linear_limit = None  # (rows, cols) caps, set only by linear_limit(), for tests
_linear_ce_fused = None  # fused_logits()'s setting, over LINEAR_CE_FUSED


@dataclasses.dataclass(frozen=True)
class LinearPlan:
    """How linear cross-entropy cuts its work: chunks of `rows` tokens ("speed"; all N in
    one chunk when they fit) or slabs of `cols` classes ("low_memory"); skip_tile: the
    (rows, classes) tile of grad_skip_threshold."""

    mode: str
    rows: int
    cols: int
    skip_tile: tuple


def linear_cross_entropy_plan(mode: str, n_rows: int, n_cols: int, hidden: int, itemsize: float,
                              buffer_bytes: Optional[int] = None, accumulator: bool = True) -> LinearPlan:  # fmt: skip
    """The chunk rows / slab columns for an (n_rows, hidden) input, n_cols classes and
    `itemsize` buffer bytes a logit (the logit's own bytes, and with fused_logits the tile
    statistics' share, which may be all there is), within `buffer_bytes` (None:
    LINEAR_CE_BUFFER_BYTES[mode]). accumulator (speed): whether a chunked run would need dW's
    float32 accumulator, whose V*H*4 bytes a single chunk may then use instead; without it
    the chunks keep to the budget."""
    if mode not in LINEAR_CE_MODES:
        raise ValueError(f"linear_cross_entropy_plan: mode must be one of {LINEAR_CE_MODES}, got {mode!r}")
    budget = LINEAR_CE_BUFFER_BYTES[mode] if buffer_bytes is None else buffer_bytes
    tile_m, tile_v = LINEAR_CE_SKIP_TILE
    if _linear_limit is not None:
        tile_m, tile_v = min(tile_m, _linear_limit[0]), min(tile_v, _linear_limit[1])

    def aligned(count: int, total: int, align: int) -> int:
        count = max(1, min(count, total))
        if count < total and count > align:
            count -= count % align
        return count

    rows, cols = max(n_rows, 1), max(n_cols, 1)
    if mode == "speed":
        if n_rows * n_cols * itemsize > n_cols * hidden * 4 * accumulator + budget:
            rows = aligned(int(budget // (cols * itemsize)), rows, LINEAR_CE_ALIGN)
    else:
        cols = aligned(int(budget // (rows * itemsize)), cols, LINEAR_CE_ALIGN)
    if _linear_limit is not None:
        rows, cols = min(rows, _linear_limit[0]), min(cols, _linear_limit[1])
    return LinearPlan(mode, rows, cols, (tile_m, tile_v))


def linear_ce_fused() -> bool:
    """Whether linear cross-entropy makes its logits with linear_logits_kernel (see LINEAR_CE_FUSED)."""
    return LINEAR_CE_FUSED if _linear_ce_fused is None else _linear_ce_fused


@contextlib.contextmanager
def fused_logits(enabled: bool = True):
    """Linear cross-entropy's logits from linear_logits_kernel (True) or cuBLAS (False) inside
    the block, whatever SOFTMAX_GPU_LINEAR_CE_FUSED says. For tests and the benchmark."""
    global _linear_ce_fused
    previous, _linear_ce_fused = _linear_ce_fused, bool(enabled)
    try:
        yield
    finally:
        _linear_ce_fused = previous


@contextlib.contextmanager
def linear_limit(rows: int, cols: int):
    """Caps linear cross-entropy's chunk rows and slab classes, and its skip tile, inside the
    block. Meant for tests: small problems then take several chunks, slabs and tiles."""
    global _linear_limit
    for name, value in (("rows", rows), ("cols", cols)):
        if value < 1:
            raise ValueError(f"linear_limit: {name} must be >= 1, got {value}")
    previous, _linear_limit = _linear_limit, (rows, cols)
    try:
        yield
    finally:
        _linear_limit = previous


# ---------------------------------------------------------------------------------------
# Split rows (issue 9, "few long rows"): a (rows, chunks) grid instead of one program a row
# ---------------------------------------------------------------------------------------
# A handful of long rows on the looped path leaves most SMs idle while each busy program
# steps through its row block after dependent block. Such rows are cut into chunks: one
# launch writes each chunk's partial statistics ((max, sum), or the backward's partial
# sum), one program a row merges them in a fixed order (softmax: a launch of its own;
# cross-entropy: its combine kernel, which also writes the loss), and a last launch writes
# every chunk from the row's statistics: 2 reads + 1 write of the row, as looped, plus
# O(rows x chunks) values.
DEFAULT_SM_COUNT = 132  # an H100 SXM: assumed where no GPU is visible (meta tensors, the interpreter)
SPLIT_MIN_CHUNK = 1024  # elements: narrower chunks would cost more in partials than they save in steps
# At most this many chunks a row: the combine holds them CHUNKS_BLOCK (<= this) at a time, in
# one program of SPLIT_COMBINE_WARPS warps (4 values a thread at 128).
SPLIT_MAX_CHUNKS = 128
SPLIT_COMBINE_WARPS = 1

_split_chunk = None  # set only by force_split() (chunk columns) and no_split() (0), for tests


@dataclasses.dataclass(frozen=True)
class SplitConfig:
    """A split row: chunks of chunk_cols columns (a multiple of block_n, the last one partial),
    each walked by one program in block_n-wide steps on num_warps warps; the combine reads the
    row's partials chunks_block at a time. With vec > 1 (vectors()) the chunks cut the row's
    aligned body and chunk 0 also takes the head/tail edge; `chunks` counts n_cols, so when
    the body is shorter the last chunk may hold nothing (its partial is (-inf, 0))."""

    block_n: int
    num_warps: int
    chunk_cols: int
    chunks: int
    chunks_block: int
    vec: int = 1  # as RowConfig: chunks cut the row's aligned body, chunk 0 takes the edge
    edge: bool = False

    @property
    def maxnreg(self) -> int:
        return max_registers(self.num_warps)


def sm_count(device) -> int:
    """The device's multiprocessor count (cached by torch: no sync), DEFAULT_SM_COUNT off CUDA."""
    if getattr(device, "type", device) == "cuda":
        import torch

        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SM_COUNT


# The cross-entropy loss kernel's grid without the gradient (kernels/cross_entropy.py,
# cross_entropy_kernel): at most as many programs as an SM holds by warps
# (RESIDENT_WARPS_PER_SM, sm_80 and sm_90; at most RESIDENT_PROGRAMS_PER_SM), each striding
# over the row tiles. With a reduction every program ends on a fenced atomic (the
# done-counter); once a row, it held each row's program a memory round trip past its last
# load.
RESIDENT_WARPS_PER_SM = 64
RESIDENT_PROGRAMS_PER_SM = 32
# The gradient-free forward's own path: this persistent grid, and rows wider than
# FORWARD_SINGLE_BLOCK_MAX streamed with one running (max, sum) a row
# (LOOP_BLOCK_CROSS_ENTROPY_FORWARD). SOFTMAX_GPU_CE_FORWARD_PATH=0 gives that forward the
# gradient's configurations instead (one program a tile, per-lane sums), for before/after
# timings on one card.
CROSS_ENTROPY_FORWARD_PATH = os.environ.get("SOFTMAX_GPU_CE_FORWARD_PATH", "1") != "0"


# The loss kernel that writes the gradient runs one program a tile, and each used to end on
# the reduction's done-counter: a fenced atomic, which waits for the program's gradient
# stores to land, one more memory round trip a row with nothing in flight on its SM slot.
# Where there are many tiles (at least REDUCE_LAUNCH_TILES_PER_SM an SM), a one-program
# reduce kernel launched after it sums the losses instead (cross_entropy_reduce_kernel): one
# launch more, no atomic. SOFTMAX_GPU_CE_REDUCE_LAUNCH=0 keeps the done-counter, for a
# before/after timing on one card.
CROSS_ENTROPY_REDUCE_LAUNCH = os.environ.get("SOFTMAX_GPU_CE_REDUCE_LAUNCH", "1") != "0"
REDUCE_LAUNCH_TILES_PER_SM = 2


def reduce_launch(compute_grad: bool, persistent: bool, n_tiles: int, sms: int) -> bool:
    """Whether a loss kernel's reduction runs as its own launch (above): with the gradient, one
    program a tile, and at least REDUCE_LAUNCH_TILES_PER_SM tiles an SM of `sms`."""
    return (CROSS_ENTROPY_REDUCE_LAUNCH and compute_grad and not persistent
            and n_tiles >= REDUCE_LAUNCH_TILES_PER_SM * sms)  # fmt: skip


def cross_entropy_programs(n_tiles: int, num_warps: int, device, persistent: bool = True) -> int:
    """The loss kernel's grid for n_tiles row tiles of programs on num_warps warps; one
    program a tile unless `persistent` (cross_entropy_persistent)."""
    if not persistent:
        return n_tiles
    per_sm = max(1, min(RESIDENT_PROGRAMS_PER_SM, RESIDENT_WARPS_PER_SM // num_warps))
    return max(1, min(n_tiles, per_sm * sm_count(device)))


def cross_entropy_persistent(compute_grad: bool, cfg, float64: bool = False) -> bool:
    """Whether the loss kernel strides over its row tiles (PERSISTENT): only without the
    gradient, on this forward's own path, and in the configurations where its loop costs no
    registers: the streamed rows (ROW_SCALARS: every looped row here) and single blocks up
    to FORWARD_SINGLE_BLOCK_MAX, not in float64 (for checking, not speed). Inside the loop the
    wide single blocks, kept for few rows, spilled (float16's 32768-wide statistics variant),
    and so did float64's weighted short-row tiles (24-56 bytes on sm_90)."""
    if compute_grad or float64 or not CROSS_ENTROPY_FORWARD_PATH:
        return False
    return not cfg.single_block or cfg.block_n <= FORWARD_SINGLE_BLOCK_MAX


SCALE_GRAD_PROGRAMS_PER_SM = 2


def scale_grad_programs(n_blocks: int, device) -> int:
    """The gradient rescale's grid: its n_blocks row blocks on at most SCALE_GRAD_PROGRAMS_PER_SM
    programs per SM, each striding over the blocks (kernels/cross_entropy.py, scale_grad_kernel):
    with an upstream factor of 1 each program reads one value and returns, so the launch costs
    a fixed few microseconds instead of one program per row."""
    return max(1, min(n_blocks, SCALE_GRAD_PROGRAMS_PER_SM * sm_count(device)))


def _prev_power_of_2(n: int) -> int:
    return 1 << max(n.bit_length() - 1, 0)


def split_rows(
    n_rows: int,
    n_cols: int,
    itemsize: int,
    max_block_n: int,
    loop_block_n: int,
    elements_per_thread: int = ELEMENTS_PER_THREAD,
    sms: int = DEFAULT_SM_COUNT,
) -> Optional[SplitConfig]:
    """How to split rows of n_cols elements of a kernel family (max_block_n: its single-block
    limit, loop_block_n: its looped block), or None to run one program a row.

    Rows split when they would loop (wider than the single block) and are so few that one
    program each would leave at least half of the `sms` multiprocessors idle (n_rows <=
    sms / 2). Chunks aim at one program per multiprocessor (rows x chunks ~ sms), at most
    SPLIT_MAX_CHUNKS a row, each at least SPLIT_MIN_CHUNK wide and a whole number of blocks."""
    if _split_chunk == 0:
        return None
    loop_cap = block_cap(loop_block_n, itemsize)
    if _block_limit is not None:
        loop_cap = min(loop_cap, _block_limit)
    if _split_chunk is not None:
        block = max(MIN_BLOCK_N, min(_prev_power_of_2(_split_chunk), loop_cap))
        chunk_cols = -(-_split_chunk // block) * block
    else:
        if n_cols <= block_cap(max_block_n, itemsize) or 2 * n_rows > sms:
            return None
        target = min(-(-sms // n_rows), SPLIT_MAX_CHUNKS)
        block = max(MIN_BLOCK_N, min(loop_cap, max(SPLIT_MIN_CHUNK, _prev_power_of_2(n_cols // target))))
        blocks_per_chunk = max(-(-SPLIT_MIN_CHUNK // block), -(-(-(-n_cols // block)) // target))
        chunk_cols = blocks_per_chunk * block
    chunks = -(-n_cols // chunk_cols)
    if chunks < 2:
        return None
    chunks_block = min(next_power_of_2(chunks), SPLIT_MAX_CHUNKS)
    if _block_limit is not None:  # tests: several combine steps too
        chunks_block = min(chunks_block, _block_limit)
    return SplitConfig(block, warps_for(block, itemsize, elements_per_thread), chunk_cols, chunks, chunks_block)


@contextlib.contextmanager
def force_split(chunk_cols: int):
    """Splits every row longer than chunk_cols (rounded up to whole blocks) into chunks of
    that width inside the block, whatever the row count. Meant for tests: small rows then
    take the split path (with block_limit, several blocks a chunk)."""
    global _split_chunk
    if chunk_cols < MIN_BLOCK_N:
        raise ValueError(f"force_split: chunk_cols must be >= {MIN_BLOCK_N}, got {chunk_cols}")
    previous, _split_chunk = _split_chunk, chunk_cols
    try:
        yield
    finally:
        _split_chunk = previous


# ---------------------------------------------------------------------------------------
# Cooperative rows (issue 21, item 2): many long rows, each held on chip by a group of programs
# ---------------------------------------------------------------------------------------
# A row wider than the single block loops, reading it twice (the second read partly from L2:
# 75% of copy at 4096 x 128256 bf16 on the H200 of 2026-12-04, against QuACK's 99% with
# thread-block clusters). The cooperative kernels (kernels/softmax.py: softmax_cooperative_fwd_kernel,
# _bwd_kernel; kernels/cross_entropy.py: cross_entropy_cooperative_kernel) cut each row into
# `chunks` chunks of at most the family's `chunk` elements and give each chunk a program that
# keeps it in registers: the grid is `groups` groups of `chunks` programs, every program
# resident at once (a cooperative launch: the driver refuses a grid that cannot be), and
# group g takes rows g, g + groups, ... in turn; its programs exchange only their chunks'
# statistics through global memory, each waiting on the group's counter. 1 read + 1 write of
# the row. Rows whose strides disagree modulo a 16-byte vector loop instead (unvectorised,
# the block spilled on sm_90).
# Off unless SOFTMAX_GPU_COOPERATIVE=1: its spin-wait has not run on a GPU yet, and its
# speed against the looped path is for a GPU run to measure (bench/before_after.sh).


@dataclasses.dataclass(frozen=True)
class CooperativeFamily:
    """A cooperative kernel's shape: chunks of at most `chunk` elements, `values` of them a
    thread (so chunk / (32 values) warps), `per_sm` programs an SM (the register cap leaves
    room for exactly that many)."""

    chunk: int
    values: int
    per_sm: int


# softmax forward: 32 values a thread on 8 warps (four 16-byte loads in 16-bit, eight in
# float32) under 80 registers, 3 programs an SM (at 4, 64 registers, the block spilled 8-56
# bytes): 48 KiB of 16-bit rows in flight an SM, 96 KiB of float32.
COOPERATIVE_SOFTMAX_FWD = CooperativeFamily(chunk=8192, values=32, per_sm=3)
# softmax backward: y and dy, 16 values of each a thread on 8 warps, 80 registers.
COOPERATIVE_SOFTMAX_BWD = CooperativeFamily(chunk=4096, values=16, per_sm=3)
# cross-entropy with its gradient keeps more a value (about 4.5 registers each against the
# softmax's 2.5): 32 values a thread on 4 warps under 168 registers, 3 programs an SM, 24 KiB
# of 16-bit logits in flight an SM (16 values on 8 warps under 80 spilled 8 bytes in 9 of 52
# variants on sm_90; 32 on 8 warps under 128, in 43).
COOPERATIVE_CROSS_ENTROPY = CooperativeFamily(chunk=4096, values=32, per_sm=3)
COOPERATIVE = os.environ.get("SOFTMAX_GPU_COOPERATIVE", "0") == "1"

_cooperative = None  # (chunk columns, programs) set only by force_cooperative(), for tests


@dataclasses.dataclass(frozen=True)
class CooperativeConfig:
    """Cooperative rows: each row in `chunks` chunks of chunk_cols columns (a multiple of 16;
    the last one partial, or empty when the aligned body is shorter), each held by one program
    in a block_n-wide block on num_warps warps; `groups` groups of `chunks` programs, group g
    taking rows g, g + groups, ...; the row's partials are merged chunks_block at a time.
    vec / edge as SplitConfig: chunks cut the aligned body, chunk 0 takes the head/tail edge."""

    block_n: int
    num_warps: int
    chunk_cols: int
    chunks: int
    chunks_block: int
    groups: int
    vec: int = 1
    edge: bool = False
    per_sm: int = COOPERATIVE_SOFTMAX_FWD.per_sm  # programs an SM the register cap leaves room for

    @property
    def programs(self) -> int:
        return self.groups * self.chunks

    @property
    def maxnreg(self) -> int:
        """The cap that fits per_sm programs on an SM's registers (a multiple of 8: registers
        are allocated 8 a thread at a time, so 85 would take 88)."""
        return min(255, REGISTERS_PER_SM // (self.per_sm * 32 * self.num_warps) // 8 * 8)


def cooperative_rows(n_rows: int, n_cols: int, itemsize: int, max_block_n: int, family: CooperativeFamily,
                     sms: int = DEFAULT_SM_COUNT) -> Optional[CooperativeConfig]:  # fmt: skip
    """The cooperative layout for rows of n_cols elements of a kernel family whose single
    block holds max_block_n (config above), or None: only with SOFTMAX_GPU_COOPERATIVE=1 (or
    force_cooperative), for rows that would loop, in 16-bit or float32 (float64 is for
    checking), when there are more than sms / 2 of them (fewer split: split_rows), and in at
    most SPLIT_MAX_CHUNKS chunks of at most family.chunk that all fit the grid (family.per_sm
    x sms programs)."""
    if itemsize > 4:
        return None
    if _cooperative is not None:
        chunk_target, programs = _cooperative
    else:
        if not COOPERATIVE or n_cols <= block_cap(max_block_n, itemsize) or 2 * n_rows <= sms:
            return None
        chunk_target, programs = family.chunk, family.per_sm * sms
    chunks = -(-n_cols // chunk_target)
    chunk_cols = -(-(-(-n_cols // chunks)) // 16) * 16  # as even as whole 16-element steps allow
    chunks = -(-n_cols // chunk_cols)
    if chunks < 2 or chunks > min(programs, SPLIT_MAX_CHUNKS) or n_rows < 1:
        return None
    block_n = next_power_of_2(chunk_cols)
    warps = max(1, min(32, block_n // (32 * family.values)))
    groups = min(n_rows, programs // chunks)
    return CooperativeConfig(block_n, warps, chunk_cols, chunks, min(next_power_of_2(chunks), SPLIT_MAX_CHUNKS), groups,
                             per_sm=family.per_sm)  # fmt: skip


@contextlib.contextmanager
def force_cooperative(chunk_cols: int, programs: int):
    """Runs every 16-bit or float32 row longer than chunk_cols cooperatively inside the block, on
    a grid of at most `programs` programs, whatever the row count or SOFTMAX_GPU_COOPERATIVE
    (where split_rows does not split it: no_split() to be sure; rows whose strides disagree
    modulo a 16-byte vector still take the one-program-a-row path). Meant for
    tests: small rows then take the cooperative path, several rounds of rows a group."""
    global _cooperative
    if chunk_cols < MIN_BLOCK_N or programs < 2:
        raise ValueError(f"force_cooperative: chunk_cols must be >= {MIN_BLOCK_N} and programs >= 2, "
                         f"got {chunk_cols} and {programs}")  # fmt: skip
    previous, _cooperative = _cooperative, (chunk_cols, programs)
    try:
        yield
    finally:
        _cooperative = previous


@contextlib.contextmanager
def no_split():
    """Runs every row on one program inside the block (tests of the one-program paths)."""
    global _split_chunk
    previous, _split_chunk = _split_chunk, 0
    try:
        yield
    finally:
        _split_chunk = previous
