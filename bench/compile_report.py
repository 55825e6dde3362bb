"""Compile every shipped Triton kernel configuration for sm_80 and sm_90 with no GPU present.

For each kernel, dtype and launch configuration the row_config() can produce, this
compiles through triton.compile with an explicit GPUTarget, then reads the cubin with
the cuobjdump and nvdisasm that ship inside the triton wheel: registers, local
(spilled) bytes, shared memory (static, plus the dynamic amount Triton requests at launch:
pipeline buffers, reduction scratch), whether the global loads and stores are 128-bit
(LDG.E.128 / STG.E.128) and how many load and store instructions are narrower ("narrow":
a row kernel's few scalar loads, its head/tail edge, or a hot loop that did not vectorise). Pointers and row strides are assumed 16-byte aligned, as they
are for rows whose length is a multiple of 16 elements (the common case the runtime
specialises on). Then, where nvcc is installed, the CUDA C kernels for CuPy
(kernels/*.cu) are compiled with every warning an error, and each kernel's registers,
spills and global load and store widths are listed. Exits 1 if anything spills, if a
configuration needs more shared memory than its arch gives one block, if nvcc fails, or if
a vectorised CUDA C kernel makes loads or stores narrower than 128 bits beyond its few
scalar ones (the unaligned head / tail element and the cross-entropy's scalars).

    python -m bench.compile_report [--arch 80 90] [--quick] [--dtypes bfloat16 float32] [--out FILE]
    python -m bench.compile_report --op ce_fwd_bwd --shape 4096x50257 --dtype bfloat16

Each configuration's figures are cached on disk ($SOFTMAX_GPU_COMPILE_CACHE, else
~/.cache/softmax-gpu/compile-report), in a file named by a hash of everything that decides
them besides the configuration itself (source_key(): the kernels' sources, softmax_gpu's
config, this file, triton's version and TRITON_* settings, nvcc's version), so a cached
figure is never stale; concurrent reports over the same sources wait for each other's
compiles instead of repeating them. --no-cache compiles everything afresh.

With --op, it compiles exactly the kernels the launchers would launch for those calls
(found by running them on meta tensors with the kernels replaced by recorders), with
triton's own specialisation of the integer arguments, and exits 1 on any spill.
"""
import argparse
import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional

from softmax_gpu.cuda_source import NVRTC_OPTIONS, SOURCES, kernels_folder

DTYPES = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16", "fp64": "*fp64"}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One kernel configuration to compile: the kernel's module and name, typed signature, constexprs."""

    module: str
    kernel: str
    dtype: str
    signature: tuple  # ((arg name, triton type), ...): "constexpr" for meta-parameters
    constexprs: tuple  # ((name, value), ...)
    num_warps: int
    aligned: tuple = ()  # argument names assumed divisible by 16
    num_stages: int = 3  # triton's default software-pipeline depth
    maxnreg: Optional[int] = None  # the register cap the launcher passes (config.max_registers)

    @property
    def label(self) -> str:
        meta = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.constexprs)
        return f"{meta} warps={self.num_warps}"


def block_plan(max_block: int, quick: bool, loop_block=None):
    """(block_n, single_block) pairs row_config() can return: every power of two up to the
    limit on the single-block path, and the loop block (default: the limit) on the looped path."""
    from softmax_gpu import config

    sizes, b = [], config.MIN_BLOCK_N
    while b <= max_block:
        sizes.append(b)
        b *= 2
    if quick:
        sizes = [sizes[0], min(1024, max_block), max_block]
    return [(b, True) for b in sizes] + [(loop_block or max_block, False)]


def vector_plan(itemsize: int, block: int, single: bool):
    """(VEC, HAS_EDGE) pairs to compile for a row kernel of `itemsize`-byte elements
    (config.vectors): the aligned body with the head/tail edge everywhere; and for the
    widest single blocks and the looped ones, where registers run short, also the edge-free
    variant (widths that are whole vectors) and VEC=1 (row strides that disagree modulo a
    vector). `python -m bench.compile_report --op` compiles the exact variant of a call."""
    vec = 16 // itemsize
    pairs = [(vec, True)]
    if block >= 8192 or not single:
        pairs += [(vec, False), (1, False)]
    return pairs


def softmax_variants(quick: bool):
    from softmax_gpu import config

    for kernel, max_block, loop_block, ptrs, strides in (
        (
            "softmax_fwd_kernel",
            config.MAX_BLOCK_SOFTMAX_FWD,
            config.LOOP_BLOCK_SOFTMAX_FWD,
            ("x_ptr", "y_ptr"),
            ("x_row_stride", "y_row_stride"),
        ),
        (
            "softmax_bwd_kernel",
            config.MAX_BLOCK_SOFTMAX_BWD,
            config.LOOP_BLOCK_SOFTMAX_BWD,
            ("y_ptr", "dy_ptr", "dx_ptr"),
            ("y_row_stride", "dy_row_stride", "dx_row_stride"),
        ),
    ):
        for dtype, ptr_type in DTYPES.items():
            for log in (False, True):
                itemsize = 8 if dtype == "fp64" else 4  # as row_config() sees the accumulation width
                # Every width for softmax in bfloat16, float32 and float64; float16 (bfloat16's
                # code but for its conversions) and log_softmax (a subtraction for a multiply)
                # at the widths --quick samples: the smallest, 1024, the widest and the loop's.
                plan = block_plan(
                    config.block_cap(max_block, itemsize), quick or dtype == "fp16" or log,
                    config.block_cap(loop_block, itemsize),
                )
                # short single-block rows take several rows a program (config.short_rows); --quick:
                # the tile of the narrowest rows only
                plan = [(b, single, 1) for b, single in plan] + [
                    (b, True, config.SHORT_ROWS_TILE // b) for b, single in plan
                    if single and b < config.SHORT_ROWS_TILE and not (quick and b > plan[0][0])
                ]
                for block, single, rows in plan:
                    for vec, edge in vector_plan(int(ptr_type[-2:]) // 8, block * rows, single):
                        sig = tuple((p, ptr_type) for p in ptrs) + tuple((s, "i64") for s in strides) + (
                            ("n_rows", "i32"), ("n_cols", "i32"))
                        meta = (("LOG", log), ("BLOCK_N", block), ("SINGLE_BLOCK", single),
                                ("ACC_FP64", dtype == "fp64"), ("ROWS", rows), ("VEC", vec), ("HAS_EDGE", edge))
                        warps = config.warps_for(block * rows, itemsize)
                        yield Variant(
                            "softmax_gpu.kernels.softmax",
                            kernel,
                            dtype,
                            sig + tuple((k, "constexpr") for k, _ in meta),
                            meta,
                            warps,
                            aligned=ptrs + strides + ("n_cols",),
                            maxnreg=config.max_registers(warps),
                        )


# Feature sets of the cross-entropy kernel worth compiling: the plain training case (with
# and without the gradient) and every option at once, for class indices and probabilities;
# register pressure is highest with everything on.
CE_FLAG_SETS = (
    dict(SOFT_TARGET=False, HAS_WEIGHT=False, HAS_SMOOTHING=False, HAS_Z_LOSS=False, HAS_SOFTCAP=False),
    # the plain variant's widest block (softmax_gpu.ops.cross_entropy.is_plain) with its options on
    dict(SOFT_TARGET=False, HAS_WEIGHT=False, HAS_SMOOTHING=False, HAS_Z_LOSS=True, HAS_SOFTCAP=True),
    dict(SOFT_TARGET=False, HAS_WEIGHT=True, HAS_SMOOTHING=True, HAS_Z_LOSS=True, HAS_SOFTCAP=True),
    dict(SOFT_TARGET=True, HAS_WEIGHT=True, HAS_SMOOTHING=True, HAS_Z_LOSS=True, HAS_SOFTCAP=True),
)


def cross_entropy_variants(quick: bool):
    from softmax_gpu import config

    module = "softmax_gpu.kernels.cross_entropy"
    aligned = ("logits_ptr", "target_ptr", "grad_ptr", "logits_row_stride", "target_row_stride",
               "grad_row_stride", "n_cols", "weight_ptr")  # fmt: skip
    for dtype in ("fp32", "bf16", "fp16", "fp64"):
        ptr = DTYPES[dtype]
        acc = "*fp64" if dtype == "fp64" else "*fp32"
        itemsize = 8 if dtype == "fp64" else 4  # as row_config() sees the accumulation width
        # bf16 and fp32 write the gradient in the forward; fp16 and fp64 save row stats and
        # write it in cross_entropy_backward_kernel (softmax_gpu.ops.cross_entropy.DEFERRED_GRAD_DTYPES).
        deferred = dtype in ("fp16", "fp64")
        for index, flags in enumerate(CE_FLAG_SETS):
            for grad in (False, True):
                # (probability targets without the gradient: only the forward's own loop below)
                soft_no_grad = flags["SOFT_TARGET"] and not grad
                plain = not (flags["SOFT_TARGET"] or flags["HAS_WEIGHT"] or flags["HAS_SMOOTHING"]) and itemsize <= 4
                wide = plain and not flags["HAS_SOFTCAP"]  # as softmax_gpu.ops.cross_entropy.cross_entropy_config
                plan = block_plan(
                    config.block_cap(
                        config.max_block_cross_entropy_plain(int(ptr[-2:]) // 8) if wide
                        else config.MAX_BLOCK_CROSS_ENTROPY, itemsize,
                    ),
                    # every width for the plain gradient-writing variant in bfloat16, float32 and
                    # float64; the option-heavy sets, the forward without a gradient and float16
                    # (bfloat16's code but for conversions) at the widths --quick samples
                    quick or flags["HAS_WEIGHT"] or flags["HAS_Z_LOSS"] or not grad or dtype == "fp16",
                    config.block_cap(
                        config.LOOP_BLOCK_CROSS_ENTROPY_PLAIN if plain else config.LOOP_BLOCK_CROSS_ENTROPY, itemsize
                    ),
                )
                # without the gradient, rows past config.FORWARD_SINGLE_BLOCK_MAX stream in the
                # forward's own loop (ROW_SCALARS; cross_entropy_config(forward_only=True)); its
                # wide single blocks stay for few rows and, with the gradient's loop, for
                # SOFTMAX_GPU_CE_FORWARD_PATH=0
                forward_only = not (grad and not deferred)
                plan = [] if soft_no_grad else plan
                # short single-block rows take several rows a program (config.short_rows); --quick:
                # the tile of the narrowest rows only
                plan = [(b, single, 1, False) for b, single in plan] + [
                    (b, True, config.SHORT_ROWS_TILE // b, False) for b, single in plan
                    if single and b < config.SHORT_ROWS_TILE and not (quick and b > plan[0][0])
                ]
                if forward_only:
                    plan.append((config.block_cap(config.LOOP_BLOCK_CROSS_ENTROPY_FORWARD, itemsize), False, 1, True))
                for block, single, rows, row_scalars in plan:
                    per_thread = (config.elements_per_thread_forward(int(ptr[-2:]) // 8) if row_scalars
                                  else config.ELEMENTS_PER_THREAD_CROSS_ENTROPY)  # fmt: skip
                    warps = config.warps_for(block * rows, itemsize, per_thread)
                    sig = (
                        ("logits_ptr", ptr),
                        ("target_ptr", ptr if flags["SOFT_TARGET"] else "*i64"),
                        ("weight_ptr", "*fp32"),
                        ("loss_ptr", acc),
                        ("lse_ptr", acc),
                        ("grad_ptr", ptr),
                        ("stats_ptr", acc),
                        ("reduced_ptr", acc),
                        ("counter_ptr", "*i32"),
                        ("logits_row_stride", "i64"),
                        ("target_row_stride", "i64"),
                        ("grad_row_stride", "i64"),
                        ("grad_divisor_ptr", acc),
                        ("n_rows", "i32"),
                        ("n_cols", "i32"),
                        ("ignore_index", "i64"),
                        ("label_smoothing", "fp32"),
                        ("z_loss", "fp32"),
                        ("softcap", "fp32"),
                        ("label_smoothing_lo", "fp32"),
                        ("z_loss_lo", "fp32"),
                        ("softcap_lo", "fp32"),
                        ("zero", "i32"),
                    )
                    for vec, edge in vector_plan(int(ptr[-2:]) // 8, block * rows, single):
                        if vec == 1 and block > config.MAX_BLOCK_CROSS_ENTROPY_PLAIN:
                            continue  # launch_cross_entropy takes float32's limits there
                        meta = tuple(flags.items()) + (
                            # DIVIDE_GRAD (the mean) only adds a scalar load: alternate it over the flag sets so
                            # both values compile, without doubling the report's time.
                            ("COMPUTE_GRAD", grad and not deferred), ("DIVIDE_GRAD", grad and index % 2 == 0),
                            ("SAVE_STATS", grad and deferred),
                            # the reduction (the last program's sum) alternates like DIVIDE_GRAD: mean, none, sum
                            ("REDUCE", (2, 0, 1)[index % 3]), ("ACC_FP64", dtype == "fp64"),
                            ("BLOCK_N", block), ("SINGLE_BLOCK", single),
                            ("REDUCE_BLOCK", config.reduce_block(warps)), ("VEC", vec), ("HAS_EDGE", edge),
                            ("ROWS", rows), ("ROW_SCALARS", row_scalars),
                            ("PERSISTENT", forward_only and dtype != "fp64"
                             and (row_scalars or (single and block <= config.FORWARD_SINGLE_BLOCK_MAX))),
                        )  # fmt: skip
                        # (zero, the int 0, is divisible by 16 as triton specialises it)
                        yield Variant(module, "cross_entropy_kernel", dtype,
                                      sig + tuple((k, "constexpr") for k, _ in meta), meta, warps,
                                      aligned=aligned + ("zero",), maxnreg=config.max_registers(warps))
            if deferred and (index == 0 or not quick):
                block = config.block_cap(config.LOOP_BLOCK_CROSS_ENTROPY, itemsize)
                sig = (
                    ("logits_ptr", ptr), ("target_ptr", ptr if flags["SOFT_TARGET"] else "*i64"),
                    ("weight_ptr", "*fp32"), ("stats_ptr", acc), ("upstream_ptr", acc), ("grad_divisor_ptr", acc),
                    ("grad_ptr", ptr), ("logits_row_stride", "i64"), ("target_row_stride", "i64"),
                    ("grad_row_stride", "i64"), ("upstream_stride", "i64"), ("n_cols", "i32"),
                    ("ignore_index", "i64"), ("label_smoothing", "fp32"), ("softcap", "fp32"),
                    ("label_smoothing_lo", "fp32"), ("softcap_lo", "fp32"),
                )  # fmt: skip
                for vec, edge in vector_plan(int(ptr[-2:]) // 8, block, False):
                    meta = tuple((k, v) for k, v in flags.items() if k != "HAS_Z_LOSS") + (
                        ("DIVIDE_GRAD", index % 2 == 0), ("ACC_FP64", dtype == "fp64"), ("BLOCK_N", block),
                        ("VEC", vec), ("HAS_EDGE", edge),
                    )  # fmt: skip
                    warps = config.warps_for(block, itemsize, config.ELEMENTS_PER_THREAD_CROSS_ENTROPY)
                    yield Variant(module, "cross_entropy_backward_kernel", dtype,
                                  sig + tuple((k, "constexpr") for k, _ in meta), meta, warps, aligned=aligned,
                                  maxnreg=config.max_registers(warps))
        for soft, has_weight in ((False, False), (False, True), (True, False)):
            sig = (
                ("target_ptr", ptr if soft else "*i64"), ("weight_ptr", "*fp32"), ("total_ptr", acc),
                ("counter_ptr", "*i32"), ("target_row_stride", "i64"), ("n_rows", "i32"), ("n_cols", "i32"),
                ("ignore_index", "i64"),
            )  # fmt: skip
            meta = (("SOFT_TARGET", soft), ("HAS_WEIGHT", has_weight), ("COMPUTE_TOTAL", True),
                    ("ACC_FP64", dtype == "fp64"), ("BLOCK", config.PREPARE_BLOCK))  # fmt: skip
            yield Variant(module, "cross_entropy_prepare_kernel", dtype, sig + tuple((k, "constexpr") for k, _ in meta),
                          meta, config.PREPARE_WARPS)
        for divide in (False, True):  # the reduction's own launch after a loss kernel with the gradient
            sig = (("loss_ptr", acc), ("reduced_ptr", acc), ("divisor_ptr", acc), ("n_rows", "i32"))
            meta = (("DIVIDE", divide), ("ACC_FP64", dtype == "fp64"), ("BLOCK", config.PREPARE_BLOCK))
            yield Variant(module, "cross_entropy_reduce_kernel", dtype, sig + tuple((k, "constexpr") for k, _ in meta),
                          meta, config.PREPARE_WARPS, aligned=("loss_ptr", "reduced_ptr", "divisor_ptr"))
        if deferred:
            continue
        # one row a program (looped, or one block), and short rows in config.short_rows() tiles
        # (every tile is SHORT_ROWS_TILE elements on the same warps: the narrowest, the widest
        # and attention-sized rows stand for the others)
        tiles = {(b, config.SHORT_ROWS_TILE // b) for b in (config.MIN_BLOCK_N, 128, config.SHORT_ROWS_TILE // 2)}
        for block, rows in sorted({(1024, 1), (config.MAX_BLOCK_CROSS_ENTROPY, 1),
                                   (config.LOOP_BLOCK_CROSS_ENTROPY, 1)} | tiles):
            sig = (("grad_ptr", ptr), ("upstream_ptr", "*fp32"), ("grad_row_stride", "i64"),
                   ("upstream_stride", "i64"), ("n_rows", "i32"), ("n_cols", "i32"), ("BLOCK_N", "constexpr"),
                   ("VEC", "constexpr"), ("HAS_EDGE", "constexpr"), ("ROWS", "constexpr"),
                   ("SCALAR", "constexpr"))  # fmt: skip
            warps = config.warps_for(block * rows, 4, config.ELEMENTS_PER_THREAD_CROSS_ENTROPY)
            for (vec, edge), scalar in itertools.product(vector_plan(int(ptr[-2:]) // 8, block, False), (True, False)):
                yield Variant(module, "scale_grad_kernel", dtype, sig, (("BLOCK_N", block), ("VEC", vec),
                              ("HAS_EDGE", edge), ("ROWS", rows), ("SCALAR", scalar)), warps,
                              aligned=("grad_ptr", "grad_row_stride", "n_cols"),
                              maxnreg=config.max_registers(warps))  # fmt: skip


def linear_cross_entropy_variants(quick: bool):
    """Linear cross-entropy's own kernels: grad_skip_threshold's tile filter at the shipped
    tile, and the backward's products over the tiles it keeps, on 16-bit and float32
    gradients (its other products are cuBLAS's; its row math is the cross-entropy and
    vocab-parallel kernels, compiled above and below)."""
    from softmax_gpu import config

    tile_m, tile_n = config.LINEAR_CE_SKIP_TILE
    for dtype in ("bf16",) if quick else ("bf16", "fp16", "fp32"):
        sig = (("grad_ptr", DTYPES[dtype]), ("scale_ptr", "*fp32"), ("n_rows", "i32"), ("n_cols", "i32"),
               ("grad_row_stride", "i64"), ("scale_stride", "i64"), ("threshold", "fp32"))  # fmt: skip
        for live in (False, True):
            meta = (("BLOCK_M", tile_m), ("BLOCK_N", tile_n), ("WRITE_LIVE", live))
            yield Variant("softmax_gpu.kernels.linear_cross_entropy", "skip_small_tiles_kernel", dtype,
                          sig + (("live_ptr", "*i8"),) + tuple((k, "constexpr") for k, _ in meta), meta,
                          config.LINEAR_CE_SKIP_WARPS, aligned=("grad_ptr", "grad_row_stride", "n_cols"))  # fmt: skip
        # the backward's products over the kept tiles, as launch_live_tiles_products launches them
        # (V and H multiples of 16, as in every language model's head)
        import torch

        from softmax_gpu.ops.linear_cross_entropy import live_tiles_blocks

        ptr = DTYPES[dtype]
        shape = (("n_rows", "i32"), ("n_cols", "i32"), ("hidden", "i32"), ("g_row_stride", "i64"))
        block_m, block_h, block_v, block_k, warps = live_tiles_blocks(
            torch.float32 if dtype == "fp32" else torch.bfloat16, tile_m)
        precisions = ("ieee", "tf32") if dtype == "fp32" else ("tf32",)  # fp32: torch's "highest", "high"/"medium"
        for accumulate, precision in itertools.product((False, True), precisions):
            common = (("TILE_M", tile_m), ("TILE_N", tile_n), ("BLOCK_H", block_h), ("INPUT_PRECISION", precision))
            out = "*fp32" if accumulate else ptr
            sig = (("g_ptr", ptr), ("w_ptr", ptr), ("out_ptr", out), ("live_ptr", "*i8")) + shape + (
                ("w_row_stride", "i64"), ("out_row_stride", "i64"), ("n_col_tiles", "i32"))
            meta = common + (("BLOCK_M", block_m), ("BLOCK_K", min(block_k, tile_n)), ("ACCUMULATE", accumulate))
            yield Variant("softmax_gpu.kernels.linear_cross_entropy", "live_tiles_grad_input_kernel", dtype,
                          sig + tuple((k, "constexpr") for k, _ in meta), meta, warps,
                          aligned=("g_ptr", "w_ptr", "out_ptr", "g_row_stride", "w_row_stride", "out_row_stride",
                                   "n_cols", "hidden"))  # fmt: skip
            sig = (("g_ptr", ptr), ("x_ptr", ptr), ("out_ptr", out), ("live_ptr", "*i8")) + shape + (
                ("x_row_stride", "i64"), ("out_row_stride", "i64"), ("n_row_tiles", "i32"), ("n_col_tiles", "i32"))
            meta = common + (("BLOCK_V", min(block_v, tile_n)), ("BLOCK_K", min(block_k, tile_m)),
                             ("ACCUMULATE", accumulate))
            yield Variant("softmax_gpu.kernels.linear_cross_entropy", "live_tiles_grad_weight_kernel", dtype,
                          sig + tuple((k, "constexpr") for k, _ in meta), meta, warps,
                          aligned=("g_ptr", "x_ptr", "out_ptr", "g_row_stride", "x_row_stride", "out_row_stride",
                                   "n_cols", "hidden"))  # fmt: skip


def linear_logits_variants(quick: bool):
    """The opt-in Triton logits product (config.LINEAR_CE_FUSED): linear_logits_kernel at the
    shipped tiles with the statistics epilogue (logits stored, as the speed chunks; or not, as
    the low-memory forward) and with the gradient epilogue (the low-memory backward), for the
    plain loss and every option at once; H a multiple of 64 (every language model's head)
    and not; and merge_tile_stats_kernel. Tensor-core instructions (HGMMA on sm_90) show in
    the "mma" column."""
    import torch

    from softmax_gpu import config
    from softmax_gpu.ops.linear_cross_entropy import logits_blocks

    module = "softmax_gpu.kernels.linear_cross_entropy"
    for dtype in ("bf16",) if quick else ("bf16", "fp16", "fp32"):
        ptr = DTYPES[dtype]
        blocks = logits_blocks(torch.float32 if dtype == "fp32" else torch.bfloat16)
        sig = (("x_ptr", ptr), ("w_ptr", ptr), ("bias_ptr", ptr), ("z_ptr", ptr), ("target_ptr", "*i64"),
               ("weight_ptr", "*fp32"), ("tile_max_ptr", "*fp32"), ("tile_stats_ptr", "*fp32"), ("max_ptr", "*fp32"),
               ("stats_ptr", "*fp32"), ("grad_divisor_ptr", "*fp32"), ("upstream_ptr", "*fp32"), ("n_rows", "i32"),
               ("n_cols", "i32"), ("hidden", "i32"), ("x_row_stride", "i32"), ("w_row_stride", "i32"),
               ("z_row_stride", "i32"), ("target_stride", "i32"), ("upstream_stride", "i32"), ("bias_stride", "i32"),
               ("n_classes", "i32"),
               ("col_start", "i32"), ("ignore_index", "i32"), ("label_smoothing", "fp32"), ("z_loss", "fp32"),
               ("softcap", "fp32"), ("zero", "i32"))  # fmt: skip
        tiles = tuple((k, blocks[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"))
        precisions = ("ieee", "tf32") if dtype == "fp32" else ("tf32",)
        # (epilogue, bias, all options, even K): "stats" stores the logits, "stats0" does not
        shapes = [("stats", False, False, True), ("stats", True, True, True), ("stats0", False, False, True),
                  ("stats0", True, True, True), ("grad", False, False, True), ("grad", True, True, True),
                  ("stats", False, False, False), ("grad", False, False, False)]  # fmt: skip
        if quick:
            shapes = shapes[:6]
        for (epilogue, bias, everything, even_k), precision in itertools.product(shapes, precisions):
            grad = epilogue == "grad"
            meta = (("HAS_BIAS", bias), ("STORE_LOGITS", epilogue == "stats"), ("STATS", not grad), ("GRAD", grad),
                    ("HAS_Z_LOSS", grad and everything), ("DIVIDE_GRAD", grad),
                    ("HAS_UPSTREAM", grad), ("HAS_WEIGHT", everything), ("HAS_SMOOTHING", everything),
                    ("HAS_SOFTCAP", everything), ("N_STATS", 5 if everything else 2), ("EVEN_K", even_k)) + tiles + (
                        ("INPUT_PRECISION", precision),)  # fmt: skip
            yield Variant(module, "linear_logits_kernel", dtype, sig + tuple((k, "constexpr") for k, _ in meta), meta,
                          blocks["WARPS"], num_stages=blocks["STAGES"],
                          aligned=("x_ptr", "w_ptr", "z_ptr", "x_row_stride", "w_row_stride", "z_row_stride",
                                   "hidden", "n_cols"))  # fmt: skip
    sig = (("tile_max_ptr", "*fp32"), ("tile_stats_ptr", "*fp32"), ("max_ptr", "*fp32"), ("stats_ptr", "*fp32"),
           ("n_tiles", "i32"))  # fmt: skip
    for accumulate, width in itertools.product((False, True), (2,) if quick else (2, 3, 4, 5)):  # every packing
        meta = (("ACCUMULATE", accumulate), ("N_STATS", width), ("BLOCK_T", config.LINEAR_CE_MERGE_BLOCK))
        yield Variant(module, "merge_tile_stats_kernel", "fp32", sig + tuple((k, "constexpr") for k, _ in meta), meta,
                      config.LINEAR_CE_MERGE_WARPS)  # fmt: skip


def token_logprobs_variants(quick: bool):
    """Token log-probabilities and entropy: forward (with and without the entropy), split
    rows' partial and combine kernels, and backward (each upstream gradient alone and both),
    at the narrowest block and the streaming one, in every dtype."""
    from softmax_gpu import config

    module = "softmax_gpu.kernels.token_logprobs"
    for dtype in ("bf16", "fp32") if quick else tuple(DTYPES):
        ptr = DTYPES[dtype]
        for block in (16, config.LOOP_BLOCK_CROSS_ENTROPY):
            warps = config.warps_for(block, 4, config.ELEMENTS_PER_THREAD_CROSS_ENTROPY)
            sig = (("logits_ptr", ptr), ("tokens_ptr", "*i64"), ("logprobs_ptr", "*fp32"), ("entropy_ptr", "*fp32"),
                   ("stats_ptr", "*fp32"), ("logits_row_stride", "i64"), ("tokens_stride", "i64"), ("n_cols", "i32"),
                   ("inv_temperature", "fp32"), ("ignore_index", "i64"))  # fmt: skip
            for entropy in (False, True):
                meta = (("COMPUTE_ENTROPY", entropy), ("BLOCK_N", block))
                yield Variant(module, "token_logprobs_fwd_kernel", dtype, sig + tuple((k, "constexpr") for k, _ in meta),
                              meta, warps, aligned=("logits_ptr", "logits_row_stride", "n_cols"))  # fmt: skip
            sig = (("logits_ptr", ptr), ("partial_ptr", "*fp32"), ("logits_row_stride", "i64"), ("n_cols", "i32"),
                   ("chunk_cols", "i32"), ("inv_temperature", "fp32"))  # fmt: skip
            for entropy in (False, True):
                meta = (("COMPUTE_ENTROPY", entropy), ("BLOCK_N", block))
                yield Variant(module, "token_logprobs_partial_kernel", dtype,
                              sig + tuple((k, "constexpr") for k, _ in meta), meta, warps,
                              aligned=("logits_ptr", "logits_row_stride", "n_cols", "chunk_cols"))  # fmt: skip
            sig = (("logits_ptr", ptr), ("tokens_ptr", "*i64"), ("stats_ptr", "*fp32"), ("entropy_ptr", "*fp32"),
                   ("grad_logprobs_ptr", "*fp32"), ("grad_entropy_ptr", "*fp32"), ("grad_ptr", ptr),
                   ("logits_row_stride", "i64"), ("tokens_stride", "i64"), ("grad_row_stride", "i64"),
                   ("grad_logprobs_stride", "i64"), ("grad_entropy_stride", "i64"), ("n_cols", "i32"),
                   ("chunk_cols", "i32"), ("col_start", "i32"), ("n_classes", "i32"), ("inv_temperature", "fp32"),
                   ("ignore_index", "i64"))  # fmt: skip
            for grad_lp, grad_h in ((True, False), (False, True), (True, True)):
                meta = (("HAS_GRAD_LOGPROBS", grad_lp), ("HAS_GRAD_ENTROPY", grad_h), ("BLOCK_N", block))
                yield Variant(module, "token_logprobs_bwd_kernel", dtype, sig + tuple((k, "constexpr") for k, _ in meta),
                              meta, warps, aligned=("logits_ptr", "grad_ptr", "logits_row_stride", "grad_row_stride",
                                                    "n_cols", "chunk_cols"))  # fmt: skip
        sig = (("partial_ptr", "*fp32"), ("logits_ptr", ptr), ("tokens_ptr", "*i64"), ("logprobs_ptr", "*fp32"),
               ("entropy_ptr", "*fp32"), ("stats_ptr", "*fp32"), ("n_chunks", "i32"), ("logits_row_stride", "i64"),
               ("tokens_stride", "i64"), ("n_cols", "i32"), ("inv_temperature", "fp32"), ("ignore_index", "i64"))  # fmt: skip
        for entropy in (False, True):
            meta = (("COMPUTE_ENTROPY", entropy), ("CHUNKS_BLOCK", config.SPLIT_MAX_CHUNKS))
            yield Variant(module, "token_logprobs_combine_kernel", dtype, sig + tuple((k, "constexpr") for k, _ in meta),
                          meta, config.SPLIT_COMBINE_WARPS)  # fmt: skip


def vocab_parallel_variants(quick: bool):
    """The two vocab-parallel kernels (float32 accumulation for every dtype) for the
    cross-entropy flag sets: the stats kernel at the widths stats_config() gives (up to the
    looped path's 1024), the loss kernel at 16, 1024 and 8192 with the gradient, and once
    without it. A few widths only: neither kernel has a path that depends on the width."""
    from softmax_gpu import config

    module = "softmax_gpu.kernels.vocab_parallel_cross_entropy"
    for dtype in ("fp32", "bf16", "fp16"):
        ptr = DTYPES[dtype]
        for index, flags in enumerate(CE_FLAG_SETS):
            soft, weighted, smoothed = flags["SOFT_TARGET"], flags["HAS_WEIGHT"], flags["HAS_SMOOTHING"]
            n_stats = 3 if soft else 2 + weighted + 2 * smoothed
            target = ptr if soft else "*i64"
            stats_flags = tuple((k, v) for k, v in flags.items() if k != "HAS_Z_LOSS")
            for block in (16, config.LOOP_BLOCK_CROSS_ENTROPY) if index == 0 else (config.LOOP_BLOCK_CROSS_ENTROPY,):
                sig = (("logits_ptr", ptr), ("target_ptr", target), ("weight_ptr", "*fp32"), ("max_ptr", "*fp32"),
                       ("stats_ptr", "*fp32"), ("logits_row_stride", "i64"), ("target_row_stride", "i64"),
                       ("n_cols", "i32"), ("n_classes", "i32"), ("col_start", "i32"), ("ignore_index", "i64"),
                       ("label_smoothing", "fp32"), ("softcap", "fp32"))  # fmt: skip
                meta = stats_flags + (("N_STATS", n_stats), ("BLOCK_N", block))
                warps = config.warps_for(block, 4, config.ELEMENTS_PER_THREAD_CROSS_ENTROPY)
                yield Variant(module, "vocab_parallel_stats_kernel", dtype, sig + tuple((k, "constexpr") for k, _ in meta),
                              meta, warps, aligned=("logits_ptr", "logits_row_stride", "n_cols"))  # fmt: skip
            # (block, gradient, upstream factor): the linear cross-entropy's low-memory backward
            # forms every dtype's gradient with the upstream factor; float16 always does.
            loss_plan = [(b, True, dtype == "fp16") for b in (16, 1024, config.MAX_BLOCK_CROSS_ENTROPY)]
            loss_plan += [(1024, False, False)] * (index == 0) + [(1024, True, True)] * (dtype != "fp16")
            for block, grad, upstream in loss_plan:
                sig = (("logits_ptr", ptr), ("target_ptr", target), ("weight_ptr", "*fp32"), ("max_ptr", "*fp32"),
                       ("stats_ptr", "*fp32"), ("loss_ptr", "*fp32"), ("lse_ptr", "*fp32"), ("grad_ptr", ptr),
                       ("grad_divisor_ptr", "*fp32"), ("upstream_ptr", "*fp32"), ("logits_row_stride", "i64"),
                       ("target_row_stride", "i64"), ("grad_row_stride", "i64"), ("upstream_stride", "i64"),
                       ("n_cols", "i32"), ("n_classes", "i32"), ("col_start", "i32"), ("ignore_index", "i64"),
                       ("label_smoothing", "fp32"), ("z_loss", "fp32"), ("softcap", "fp32"))  # fmt: skip
                # float16 forms its gradient in the backward, with the upstream factor (HAS_UPSTREAM).
                meta = tuple(flags.items()) + (("COMPUTE_GRAD", grad), ("DIVIDE_GRAD", grad and index % 2 == 0),
                                               ("HAS_UPSTREAM", upstream),
                                               ("N_STATS", n_stats), ("BLOCK_N", block))  # fmt: skip
                warps = config.warps_for(block, 4, config.ELEMENTS_PER_THREAD_CROSS_ENTROPY)
                yield Variant(module, "vocab_parallel_loss_kernel", dtype, sig + tuple((k, "constexpr") for k, _ in meta),
                              meta, warps, aligned=("logits_ptr", "grad_ptr", "logits_row_stride", "grad_row_stride",
                                                    "n_cols"))  # fmt: skip


def split_blocks(loop_block: int, itemsize: int, quick: bool):
    """The block widths config.split_rows() can give a split row: powers of two from
    SPLIT_MIN_CHUNK (or the family's float64 cap, if lower) up to the family's loop block."""
    from softmax_gpu import config

    cap = config.block_cap(loop_block, itemsize)
    sizes, b = [], min(config.SPLIT_MIN_CHUNK, cap)
    while b <= cap:
        sizes.append(b)
        b *= 2
    return sorted({sizes[0], sizes[-1]}) if quick else sizes


def split_vectors(itemsize: int, widest: bool, worst: bool):
    """(VEC, HAS_EDGE) pairs of a split kernel (config.vectors): the aligned body with the edge
    in chunk 0's program everywhere (the edge-free variant only drops it), and VEC=1 (row
    strides that disagree modulo a vector) at a kernel's widest block, where the register cap
    is lowest, for its register-heaviest options only."""
    return [(16 // itemsize, True)] + [(1, False)] * (widest and worst)


def split_variants(quick: bool):
    """The split-row kernels (few long rows), lean: the per-chunk kernels at every block width
    split_rows() can give (warps, and so the register cap, grow with the width), merging the
    row's partials at their widest (config.SPLIT_MAX_CHUNKS a step), and cross-entropy's
    one-program-a-row combine.
    Softmax in float32, bfloat16 and float64 (float16 compiles to bfloat16's code);
    cross-entropy in every dtype and every CE_FLAG_SETS entry (the plain ones at the plain
    variant's widths), its gradient (always deferred for split rows) at the backward's block."""
    from softmax_gpu import config

    chunks_block = config.SPLIT_MAX_CHUNKS
    dims = (("n_cols", "i32"), ("chunk_cols", "i32"))
    n_chunks = (("n_chunks", "i32"),)

    def variant(module, kernel, dtype, sig, meta, warps, aligned):
        """A Variant; `aligned` names what is 16-byte aligned among the split kernels' arguments."""
        return Variant(module, kernel, dtype, sig + tuple((k, "constexpr") for k, _ in meta), meta, warps,
                       aligned=tuple(a for a in aligned if any(a == n for n, _ in sig)),
                       maxnreg=config.max_registers(warps))  # fmt: skip

    for dtype, ptr in DTYPES.items():
        bits = int(ptr[-2:])
        itemsize = 8 if dtype == "fp64" else 4  # as split_rows() sees the accumulation width
        acc = "*fp64" if dtype == "fp64" else "*fp32"
        fp64 = dtype == "fp64"
        module = "softmax_gpu.kernels.softmax"
        if dtype != "fp16":
            blocks = split_blocks(config.LOOP_BLOCK_SOFTMAX_FWD, itemsize, quick)
            aligned = ("x_ptr", "y_ptr", "x_row_stride", "y_row_stride", "n_cols", "chunk_cols")
            for block in blocks:
                warps = config.warps_for(block, itemsize)
                for vec, edge in split_vectors(bits // 8, block == blocks[-1], True):
                    sig = (("x_ptr", ptr), ("part_ptr", acc), ("x_row_stride", "i64")) + dims + n_chunks
                    meta = (("BLOCK_N", block), ("ACC_FP64", fp64), ("VEC", vec), ("HAS_EDGE", edge))
                    yield variant(module, "softmax_split_stats_kernel", dtype, sig, meta, warps, aligned)
                    for log in (False, True) if edge else (False,):
                        sig = (("x_ptr", ptr), ("y_ptr", ptr), ("part_ptr", acc), ("x_row_stride", "i64"),
                               ("y_row_stride", "i64")) + dims + n_chunks  # fmt: skip
                        meta = (("LOG", log), ("BLOCK_N", block), ("ACC_FP64", fp64), ("CHUNKS_BLOCK", chunks_block),
                                ("VEC", vec), ("HAS_EDGE", edge))  # fmt: skip
                        yield variant(module, "softmax_split_fwd_kernel", dtype, sig, meta, warps, aligned)
            blocks = split_blocks(config.LOOP_BLOCK_SOFTMAX_BWD, itemsize, quick)
            aligned = ("y_ptr", "dy_ptr", "dx_ptr", "y_row_stride", "dy_row_stride", "dx_row_stride", "n_cols",
                       "chunk_cols")  # fmt: skip
            for block in blocks:
                warps = config.warps_for(block, itemsize)
                for vec, edge in split_vectors(bits // 8, block == blocks[-1], True):
                    for log in (False, True) if edge else (False,):
                        sig = (("y_ptr", ptr), ("dy_ptr", ptr), ("part_ptr", acc), ("y_row_stride", "i64"),
                               ("dy_row_stride", "i64")) + dims + n_chunks  # fmt: skip
                        meta = (("LOG", log), ("BLOCK_N", block), ("ACC_FP64", fp64), ("VEC", vec), ("HAS_EDGE", edge))
                        yield variant(module, "softmax_split_bwd_stats_kernel", dtype, sig, meta, warps, aligned)
                        sig = (("y_ptr", ptr), ("dy_ptr", ptr), ("dx_ptr", ptr), ("part_ptr", acc),
                               ("y_row_stride", "i64"), ("dy_row_stride", "i64"), ("dx_row_stride", "i64")) + dims
                        sig += n_chunks
                        meta = (("LOG", log), ("BLOCK_N", block), ("ACC_FP64", fp64), ("CHUNKS_BLOCK", chunks_block),
                                ("VEC", vec), ("HAS_EDGE", edge))  # fmt: skip
                        yield variant(module, "softmax_split_bwd_kernel", dtype, sig, meta, warps, aligned)
        module = "softmax_gpu.kernels.cross_entropy"
        aligned = ("logits_ptr", "target_ptr", "grad_ptr", "logits_row_stride", "target_row_stride",
                   "grad_row_stride", "n_cols", "chunk_cols", "weight_ptr")  # fmt: skip
        for index, flags in enumerate(CE_FLAG_SETS):
            plain = not (flags["SOFT_TARGET"] or flags["HAS_WEIGHT"] or flags["HAS_SMOOTHING"]) and itemsize <= 4
            loop = config.LOOP_BLOCK_CROSS_ENTROPY_PLAIN if plain else config.LOOP_BLOCK_CROSS_ENTROPY
            target = ptr if flags["SOFT_TARGET"] else "*i64"
            reduce = (2, 0, 1)[index % 3]
            # the register-heaviest: the plain variant with its options (the widest blocks) and
            # probability targets with every option
            worst = index in (1, 3)
            blocks = split_blocks(loop, itemsize, quick)
            for block in blocks:
                warps = config.warps_for(block, itemsize, config.ELEMENTS_PER_THREAD_CROSS_ENTROPY)
                for vec, edge in split_vectors(bits // 8, block == blocks[-1], worst):
                    sig = (("logits_ptr", ptr), ("target_ptr", target), ("weight_ptr", "*fp32"), ("part_ptr", acc),
                           ("total_ptr", acc), ("counter_ptr", "*i32"), ("logits_row_stride", "i64"),
                           ("target_row_stride", "i64"), ("n_rows", "i32")) + dims + n_chunks + (
                           ("ignore_index", "i64"), ("label_smoothing", "fp32"), ("softcap", "fp32"),
                           ("label_smoothing_lo", "fp32"), ("softcap_lo", "fp32"))  # fmt: skip
                    meta = tuple((k, v) for k, v in flags.items() if k != "HAS_Z_LOSS") + (
                        ("REDUCE", reduce), ("ACC_FP64", fp64), ("BLOCK_N", block),
                        ("PREPARE_BLOCK", config.reduce_block(warps)), ("VEC", vec), ("HAS_EDGE", edge))  # fmt: skip
                    yield variant(module, "cross_entropy_split_stats_kernel", dtype, sig, meta, warps, aligned)
            if dtype in ("fp32", "fp64"):  # the combine sees the accumulation dtype (and the targets)
                sig = (("target_ptr", target), ("weight_ptr", "*fp32"), ("part_ptr", acc), ("loss_ptr", acc),
                       ("lse_ptr", acc), ("stats_ptr", acc), ("reduced_ptr", acc), ("counter_ptr", "*i32"),
                       ("total_ptr", acc), ("target_row_stride", "i64"), ("n_rows", "i32"), ("n_cols", "i32")) + (
                       n_chunks + (("ignore_index", "i64"), ("label_smoothing", "fp32"), ("z_loss", "fp32"),
                       ("label_smoothing_lo", "fp32"), ("z_loss_lo", "fp32")))  # fmt: skip
                for save_stats in (True, False):
                    meta = tuple((k, v) for k, v in flags.items() if k != "HAS_SOFTCAP") + (
                        ("SAVE_STATS", save_stats), ("REDUCE", reduce), ("ACC_FP64", fp64),
                        ("CHUNKS_BLOCK", chunks_block),
                        ("REDUCE_BLOCK", config.reduce_block(config.SPLIT_COMBINE_WARPS)))  # fmt: skip
                    yield variant(module, "cross_entropy_split_combine_kernel", dtype, sig, meta,
                                  config.SPLIT_COMBINE_WARPS, ())  # fmt: skip
            block = config.block_cap(config.LOOP_BLOCK_CROSS_ENTROPY, itemsize)
            warps = config.warps_for(block, itemsize, config.ELEMENTS_PER_THREAD_CROSS_ENTROPY)
            for vec, edge in split_vectors(bits // 8, True, worst):
                # with the upstream gradient (the backward) and without (a forward given grad)
                for upstream in (True, False) if index == 0 and edge else (True,):
                    sig = (
                        ("logits_ptr", ptr), ("target_ptr", target), ("weight_ptr", "*fp32"), ("stats_ptr", acc),
                        ("upstream_ptr", acc), ("grad_divisor_ptr", acc), ("grad_ptr", ptr),
                        ("logits_row_stride", "i64"), ("target_row_stride", "i64"), ("grad_row_stride", "i64"),
                        ("upstream_stride", "i64"), ("n_cols", "i32"), ("chunk_cols", "i32"), ("ignore_index", "i64"),
                        ("label_smoothing", "fp32"), ("softcap", "fp32"), ("label_smoothing_lo", "fp32"),
                        ("softcap_lo", "fp32"),
                    )  # fmt: skip
                    meta = tuple((k, v) for k, v in flags.items() if k != "HAS_Z_LOSS") + (
                        ("DIVIDE_GRAD", index % 2 == 0), ("ACC_FP64", fp64), ("BLOCK_N", block), ("VEC", vec),
                        ("HAS_EDGE", edge), ("HAS_UPSTREAM", upstream))  # fmt: skip
                    yield variant(module, "cross_entropy_split_backward_kernel", dtype, sig, meta, warps, aligned)


def cooperative_variants(quick: bool):
    """The cooperative softmax forward and backward (SOFTMAX_GPU_COOPERATIVE=1;
    config.cooperative_rows): each one's block (every row they take is cut into chunks of at
    most its family's chunk (config.COOPERATIVE_*), so BLOCK_N is that width, as the
    widest rows with the most chunks give it here) under the cap that fits the family's per_sm programs
    an SM, softmax and log_softmax, with and without the head/tail edge (rows whose strides
    disagree modulo a vector loop instead: unvectorised, it spilled), merging the most partials a step
    (SPLIT_MAX_CHUNKS). The GPU's one launch (PHASE 0) only: the halves are the interpreter's.
    float32 and bfloat16 (float16 compiles to bfloat16's code)."""
    from softmax_gpu import config

    def widest(family, max_block):  # the most chunks a row, whatever SOFTMAX_GPU_COOPERATIVE says
        with config.force_cooperative(family.chunk, 10**6):
            return config.cooperative_rows(10**4, config.SPLIT_MAX_CHUNKS * family.chunk, 4, max_block, family)

    cfg = widest(config.COOPERATIVE_SOFTMAX_FWD, config.MAX_BLOCK_SOFTMAX_FWD)
    bwd = widest(config.COOPERATIVE_SOFTMAX_BWD, config.MAX_BLOCK_SOFTMAX_BWD)
    ce = widest(config.COOPERATIVE_CROSS_ENTROPY, config.MAX_BLOCK_CROSS_ENTROPY_PLAIN)
    for dtype in ("fp32", "bf16"):
        ptr = DTYPES[dtype]
        vec = 16 // (int(ptr[-2:]) // 8)
        sig = (("x_ptr", ptr), ("y_ptr", ptr), ("part_ptr", "*fp32"), ("counter_ptr", "*i32"), ("x_row_stride", "i64"),
               ("y_row_stride", "i64"), ("n_rows", "i32"), ("n_cols", "i32"), ("chunk_cols", "i32"),
               ("n_chunks", "i32"))  # fmt: skip
        bwd_sig = (("y_ptr", ptr), ("dy_ptr", ptr), ("dx_ptr", ptr), ("part_ptr", "*fp32"), ("counter_ptr", "*i32"),
                   ("y_row_stride", "i64"), ("dy_row_stride", "i64"), ("dx_row_stride", "i64"), ("n_rows", "i32"),
                   ("n_cols", "i32"), ("chunk_cols", "i32"), ("n_chunks", "i32"))  # fmt: skip
        layouts = [(vec, True)] if quick else [(vec, False), (vec, True)]
        for log in (False, True):
            for v, edge in layouts:
                meta = (("LOG", log), ("BLOCK_N", cfg.block_n), ("CHUNKS_BLOCK", cfg.chunks_block), ("PHASE", 0),
                        ("VEC", v), ("HAS_EDGE", edge))  # fmt: skip
                whole = v > 1 and not edge  # every row whole vectors: strides and width multiples of 16
                aligned = ("x_ptr", "y_ptr", "part_ptr", "counter_ptr", "chunk_cols")
                aligned += ("x_row_stride", "y_row_stride", "n_cols") if whole else ()
                yield Variant("softmax_gpu.kernels.softmax", "softmax_cooperative_fwd_kernel", dtype,
                              sig + tuple((k, "constexpr") for k, _ in meta), meta, cfg.num_warps, aligned=aligned,
                              maxnreg=cfg.maxnreg)  # fmt: skip
                meta = (("LOG", log), ("BLOCK_N", bwd.block_n), ("CHUNKS_BLOCK", bwd.chunks_block), ("PHASE", 0),
                        ("VEC", v), ("HAS_EDGE", edge))  # fmt: skip
                aligned = ("y_ptr", "dy_ptr", "dx_ptr", "part_ptr", "counter_ptr", "chunk_cols")
                aligned += ("y_row_stride", "dy_row_stride", "dx_row_stride", "n_cols") if whole else ()
                yield Variant("softmax_gpu.kernels.softmax", "softmax_cooperative_bwd_kernel", dtype,
                              bwd_sig + tuple((k, "constexpr") for k, _ in meta), meta, bwd.num_warps,
                              aligned=aligned, maxnreg=bwd.maxnreg)  # fmt: skip
        # cross-entropy with its gradient (the plain loss): every option set it takes and every
        # reduction, with and without the edge; int64 class indices (int32 for the default set)
        for (z_loss, softcap), reduce, (v, edge), target in itertools.product(
                ((True, True),) if quick else ((False, False), (True, False), (False, True), (True, True)),
                (2,) if quick else (0, 1, 2), layouts, ("*i64", "*i32")):  # fmt: skip
            if target == "*i32" and (z_loss or softcap or reduce != 2):
                continue
            ce_sig = (("logits_ptr", ptr), ("target_ptr", target), ("loss_ptr", "*fp32"), ("lse_ptr", "*fp32"),
                      ("grad_ptr", ptr), ("reduced_ptr", "*fp32"), ("counter_ptr", "*i32"),
                      ("grad_divisor_ptr", "*fp32"), ("part_ptr", "*fp32"), ("group_counter_ptr", "*i32"),
                      ("logits_row_stride", "i64"), ("target_row_stride", "constexpr"), ("grad_row_stride", "i64"),
                      ("n_rows", "i32"), ("n_cols", "i32"), ("chunk_cols", "i32"), ("n_chunks", "i32"),
                      ("ignore_index", "i32"), ("z_loss", "fp32"), ("softcap", "fp32"))  # fmt: skip
            meta = (("target_row_stride", 1), ("HAS_Z_LOSS", z_loss), ("HAS_SOFTCAP", softcap),
                    ("DIVIDE_GRAD", reduce == 2), ("REDUCE", reduce), ("BLOCK_N", ce.block_n),
                    ("CHUNKS_BLOCK", ce.chunks_block), ("REDUCE_BLOCK", config.reduce_block(ce.num_warps)),
                    ("PHASE", 0), ("VEC", v), ("HAS_EDGE", edge))  # fmt: skip
            whole = not edge
            aligned = ("logits_ptr", "target_ptr", "grad_ptr", "part_ptr", "counter_ptr", "group_counter_ptr",
                       "chunk_cols") + (("logits_row_stride", "grad_row_stride", "n_cols") if whole else ())
            yield Variant("softmax_gpu.kernels.cross_entropy", "cross_entropy_cooperative_kernel", dtype,
                          ce_sig + tuple((k, "constexpr") for k, _ in meta[1:]), meta, ce.num_warps, aligned=aligned,
                          maxnreg=ce.maxnreg)  # fmt: skip


def all_variants(quick: bool):
    yield from softmax_variants(quick)
    yield from cross_entropy_variants(quick)
    yield from split_variants(quick)
    yield from cooperative_variants(quick)
    yield from linear_cross_entropy_variants(quick)
    yield from linear_logits_variants(quick)
    yield from token_logprobs_variants(quick)
    yield from vocab_parallel_variants(quick)


@dataclasses.dataclass
class Report:
    variant: Variant
    arch: int
    regs: int
    local: int
    shared: int
    ldg128: bool
    stg128: bool
    mma: str  # tensor-core instructions in the SASS: "HGMMA" (wgmma, sm_90), "HMMA" (mma.sync), or "-"
    narrow: tuple = (0, 0)  # global loads and stores narrower than 128 bits in the SASS (instructions)


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_one(job):
    """Compiles one variant for one arch and reads its resource usage (runs in a worker process)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    variant, arch = job
    fn = getattr(importlib.import_module(variant.module), variant.kernel)
    names = [name for name, _ in variant.signature]
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in variant.aligned}
    src = ASTSource(fn, dict(variant.signature), dict(variant.constexprs), attrs)
    options = {"num_warps": variant.num_warps, "num_stages": variant.num_stages}
    if variant.maxnreg is not None:
        options["maxnreg"] = variant.maxnreg
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True)
        sass = subprocess.run([_tool("nvdisasm"), "-c", "-ndf", f.name], capture_output=True, text=True).stdout
    fields = dict(re.findall(r"(REG|LOCAL|SHARED|STACK):(\d+)", usage.stdout))
    return Report(
        variant,
        arch,
        regs=int(fields["REG"]),
        local=int(fields["LOCAL"]) + int(fields.get("STACK", 0)),
        # static shared memory (cuobjdump) and the dynamic amount Triton asks for at launch
        # (pipeline buffers, reduction scratch): a launch needs both
        shared=int(fields["SHARED"]) + int(compiled.metadata.shared),
        # 128-bit global loads and stores, eviction hints included (LDG.E.EL.128, LDG.E.EF.128)
        ldg128=re.search(r"\bLDG\.E[.A-Z0-9_]*\.128\b", sass) is not None,
        stg128=re.search(r"\bSTG\.E[.A-Z0-9_]*\.128\b", sass) is not None,
        mma=next((op for op in ("HGMMA", "HMMA") if op in sass), "-"),
        narrow=tuple(sum(".128" not in o for o in re.findall(rf"\b{op}\.E[.A-Z0-9_]*", sass)) for op in ("LDG", "STG")),
    )


TORCH_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}
CACHE_ENV = "SOFTMAX_GPU_COMPILE_CACHE"


def cache_folder() -> Path:
    """$SOFTMAX_GPU_COMPILE_CACHE, else softmax-gpu/compile-report under $XDG_CACHE_HOME or ~/.cache."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "softmax-gpu" / "compile-report"


def source_key(triton_settings: bool = True) -> str:
    """sha256 of everything a configuration's figures depend on besides the configuration (a
    Variant and an arch): the kernels' sources (kernels/*.py, *.cu, *.cuh), softmax_gpu's
    config.py and cuda_source.py (NVRTC options), this file (how it compiles and reads a
    cubin), triton's version (its ptxas, cuobjdump and nvdisasm ship in the wheel), the TRITON_*
    environment (TRITON_INTERPRET and TRITON_CACHE_DIR aside; left out with triton_settings=False,
    for the CUDA C kernels, which nvcc compiles) and nvcc's path and version."""
    import shutil

    import triton

    from softmax_gpu import config, cuda_source

    h = hashlib.sha256()
    folder = Path(kernels_folder())
    files = sorted(p for p in folder.iterdir() if p.suffix in (".py", ".cu", ".cuh"))
    for path in files + [Path(config.__file__), Path(cuda_source.__file__), Path(__file__)]:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(f"triton {triton.__version__}\0".encode())
    for name in sorted(os.environ) if triton_settings else ():
        if name.startswith("TRITON_") and name not in ("TRITON_INTERPRET", "TRITON_CACHE_DIR"):
            h.update(f"{name}={os.environ[name]}\0".encode())
    nvcc = shutil.which("nvcc")
    if nvcc:
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        h.update(f"nvcc {nvcc} {version}".encode())
    return h.hexdigest()


class ResultCache:
    """Figures per configuration in <cache_folder>/<name>-<source_key>.json, under a file lock
    held from load to save: a second report over the same sources waits, then finds the
    first's results. Disabled (a plain dict) with enabled=False or where the folder cannot be
    written."""

    def __init__(self, name: str, enabled: bool = True):
        self.entries, self.path, self._lock = {}, None, contextlib.nullcontext()
        if not enabled:
            return
        try:
            folder = cache_folder()
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            return
        self.path = folder / f"{name}-{source_key(triton_settings=name != 'cuda')[:32]}.json"
        try:
            from filelock import FileLock  # a dependency of torch

            self._lock = FileLock(str(self.path) + ".lock")
        except ImportError:
            pass

    def __enter__(self):
        self._lock.__enter__()
        if self.path is not None and self.path.exists():
            try:
                self.entries = json.loads(self.path.read_text())
            except ValueError:  # a torn file: start afresh
                self.entries = {}
        return self

    def save(self):
        if self.path is None:
            return
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.entries))
        os.replace(tmp, self.path)

    def __exit__(self, *exc):
        try:
            self.save()
        finally:
            self._lock.__exit__(*exc)


def _progress(total: int, desc: str):
    """A progress bar on stderr (tqdm when installed, else a line every 10%)."""
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="config", file=sys.stderr, mininterval=1, dynamic_ncols=True)
    except ImportError:

        class Lines:
            n = 0

            def update(self, k=1):
                step = max(1, total // 10)
                before, self.n = self.n, self.n + k
                if self.n // step != before // step or self.n == total:
                    print(f"{desc}: {self.n}/{total}", file=sys.stderr, flush=True)

            def close(self):
                pass

        return Lines()


_REPORT_FIELDS = ("regs", "local", "shared", "ldg128", "stg128", "mma", "narrow")


def compile_all(work, name="sweep", jobs=None, cache=True, desc="compiling"):
    """Reports for (Variant, arch) jobs, in order: cached ones read, the rest compiled in
    parallel (with a progress bar) and cached."""
    with ResultCache(name, cache) as stored:
        keys = [repr(job) for job in work]
        missing = list({k: job for k, job in zip(keys, work) if k not in stored.entries}.items())
        if missing:
            bar = _progress(len(missing), f"{desc} ({len(work) - len(missing)} of {len(work)} cached)")
            with ProcessPoolExecutor(max_workers=jobs or os.cpu_count()) as pool:
                for i, ((key, _), report) in enumerate(zip(missing, pool.map(compile_one, [j for _, j in missing]))):
                    stored.entries[key] = [getattr(report, f) for f in _REPORT_FIELDS]
                    bar.update(1)
                    if i % 100 == 99:
                        stored.save()  # a run cut short keeps what it compiled
            bar.close()
        reports = []
        for key, (variant, arch) in zip(keys, work):
            fields = dict(zip(_REPORT_FIELDS, stored.entries[key]))
            fields["narrow"] = tuple(fields["narrow"])
            reports.append(Report(variant, arch, **fields))
        return reports


def run(archs=(80, 90), quick=False, jobs=None, dtypes=None, cache=True):
    """Compiles every variant (of `dtypes`, triton codes such as "bf16"; default all) for every
    arch; returns the list of Reports. Needs a process in which triton was not imported under
    TRITON_INTERPRET=1 (main() sees to it)."""
    work = [(v, a) for v in all_variants(quick) if dtypes is None or v.dtype in dtypes for a in archs]
    return compile_all(work, "sweep", jobs, cache, desc=f"compiling for sm {' '.join(map(str, archs))}")


def format_table(reports) -> str:
    lines = [f"{'kernel':<26}{'sm':>4} {'dtype':<6}{'regs':>5}{'local':>6}{'smem':>7}  {'128-bit ld/st':<14}"
             f"{'narrow':<8}{'mma':<6}config"]  # fmt: skip
    for r in reports:
        wide = f"{'yes' if r.ldg128 else 'no'}/{'yes' if r.stg128 else 'no'}"
        narrow = f"{r.narrow[0]}/{r.narrow[1]}"
        lines.append(
            f"{r.variant.kernel:<26}{r.arch:>4} {r.variant.dtype:<6}{r.regs:>5}{r.local:>6}{r.shared:>7}  "
            f"{wide:<14}{narrow:<8}{r.mma:<6}{r.variant.label}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# CUDA C kernels for CuPy (kernels/*.cu), compiled with nvcc
# ---------------------------------------------------------------------------------------

# Scalar accesses a vectorised kernel may make outside its 128-bit body: one edge element (a
# row's unaligned head or its tail, softmax_common.cuh's RowSplit) per array read or written,
# and the cross-entropy row's target index, gradient scale and target logit (loads) and its
# loss and lse (stores). Any more means a body access was split.
SCALAR_LOADS_ALLOWED = {"softmax_fwd": 1, "softmax_bwd": 2, "cross_entropy": 1 + 3}
SCALAR_STORES_ALLOWED = {"softmax_fwd": 1, "softmax_bwd": 1, "cross_entropy": 1 + 2}


@dataclasses.dataclass
class CudaReport:
    kernel: str
    arch: int
    regs: int
    local: int
    shared: int
    loads: dict  # LDG opcode -> count
    stores: dict = dataclasses.field(default_factory=dict)  # STG opcode -> count

    @property
    def vector_width(self) -> int:
        return int(self.kernel.rsplit("_v", 1)[1])

    def _narrow(self, ops: dict, allowances: dict) -> int:
        if self.vector_width == 1:
            return 0
        narrow = sum(n for op, n in ops.items() if ".128" not in op)
        allowed = next(v for k, v in allowances.items() if self.kernel.startswith(k))
        return max(0, narrow - allowed)

    @property
    def unvectorised_loads(self) -> int:
        """Loads narrower than 128 bits beyond the allowance, in a kernel meant to be vectorised."""
        return self._narrow(self.loads, SCALAR_LOADS_ALLOWED)

    @property
    def unvectorised_stores(self) -> int:
        """Stores narrower than 128 bits beyond the allowance, in a kernel meant to be vectorised."""
        return self._narrow(self.stores, SCALAR_STORES_ALLOWED)


def compile_cuda(source: str, arch: int, nvcc: str = "nvcc"):
    """nvcc -cubin for one arch, with the options CuPy's NVRTC gets (-ftz included) and every
    warning an error (ptxas spill warnings included); returns the CudaReports of its kernels.
    Raises CalledProcessError with nvcc's output on failure."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        cmd = [nvcc, "-cubin", f"-arch=sm_{arch}", *NVRTC_OPTIONS, "-O3", "-Werror", "all-warnings",
               "-Xptxas", "-warn-spills,-warn-lmem-usage,--warning-as-error", "-o", cubin,
               os.path.join(kernels_folder(), source)]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", cubin], capture_output=True, text=True)
        sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True).stdout
    reports, loads, stores = [], {}, {}
    current = None
    for function, load, store in re.findall(r"Function : (\w+)|(LDG\.E[.\w]*)|(STG\.E[.\w]*)", sass):
        if function:
            current = function
            loads[current], stores[current] = {}, {}
        elif load:
            loads[current][load] = loads[current].get(load, 0) + 1
        else:
            stores[current][store] = stores[current].get(store, 0) + 1
    for name, fields in re.findall(r"Function (\w+):\s*\n\s*(.*)", usage.stdout):
        f = dict(re.findall(r"(REG|LOCAL|SHARED|STACK):(\d+)", fields))
        reports.append(CudaReport(name, arch, int(f["REG"]), int(f["LOCAL"]) + int(f.get("STACK", 0)),
                                  int(f["SHARED"]), loads.get(name, {}), stores.get(name, {})))  # fmt: skip
    return sorted(reports, key=lambda r: r.kernel)


def cuda_run(archs=(80, 90), cache=True):
    """CudaReports for every .cu source and arch, or None when nvcc is not installed; cached
    like the Triton reports (ResultCache "cuda"; source_key() covers the sources and nvcc)."""
    import shutil

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    work = [(source, arch) for source in SOURCES for arch in archs]
    with ResultCache("cuda", cache) as stored:
        missing = [job for job in work if repr(job) not in stored.entries]
        if missing:
            print(f"compiling the CUDA C kernels with nvcc ({len(missing)} source x arch)...", file=sys.stderr, flush=True)
            with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
                batches = pool.map(compile_cuda, *zip(*missing), [nvcc] * len(missing))
                for job, batch in zip(missing, batches):
                    stored.entries[repr(job)] = [dataclasses.asdict(r) for r in batch]
        return [CudaReport(**fields) for job in work for fields in stored.entries[repr(job)]]


def format_cuda_table(reports) -> str:
    lines = [f"{'CUDA C kernel':<28}{'sm':>4} {'regs':>5}{'local':>6}{'smem':>7}  global loads | stores"]
    for r in reports:
        loads = " ".join(f"{op}x{n}" for op, n in sorted(r.loads.items()))
        stores = " ".join(f"{op}x{n}" for op, n in sorted(r.stores.items()))
        flag = "  UNVECTORISED" if r.unvectorised_loads or r.unvectorised_stores else ""
        lines.append(f"{r.kernel:<28}{r.arch:>4} {r.regs:>5}{r.local:>6}{r.shared:>7}  {loads} | {stores}{flag}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Exact launches: the kernels the launchers would launch for one call
# ---------------------------------------------------------------------------------------

OPS = ("softmax_fwd", "softmax_bwd", "ce_fwd", "ce_fwd_bwd")
_TYPE_CODES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64", "int64": "i64",
               "int32": "i32"}  # fmt: skip


class _Capture:
    """Stands in for a JIT kernel in a launcher module: records (kernel, kwargs) per launch."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda **kwargs: self.launches.append((self.kernel, grid, kwargs))


def _variant(kernel, kwargs) -> Variant:
    """The Variant triton would compile for these launch arguments: tensors as typed pointers,
    16-byte aligned where their offset is (fresh allocations are); ints equal to 1 as
    constexprs and multiples of 16 marked divisible, as triton specialises them."""
    fn = kernel.fn
    constexpr_names = {p.name for p in kernel.params if p.is_constexpr}
    signature, constexprs, aligned = [], [], []
    for name in kernel.arg_names:
        value = kwargs[name]
        if name in constexpr_names or (isinstance(value, int) and not isinstance(value, bool) and value == 1):
            signature.append((name, "constexpr"))
            constexprs.append((name, value))
        elif hasattr(value, "dtype") and hasattr(value, "storage_offset"):
            signature.append((name, "*" + _TYPE_CODES[str(value.dtype).split(".")[-1]]))
            if value.storage_offset() * value.element_size() % 16 == 0:
                aligned.append(name)
        elif isinstance(value, bool):
            signature.append((name, "i1"))
        elif isinstance(value, int):
            signature.append((name, "i32" if -(2**31) <= value < 2**31 else "i64"))
            if value % 16 == 0:
                aligned.append(name)
        elif isinstance(value, float):
            signature.append((name, "fp32"))
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {name}={value!r}")
    dtype = next((_TYPE_CODES[str(v.dtype).split(".")[-1]] for v in kwargs.values() if hasattr(v, "dtype")), "-")
    return Variant(fn.__module__, fn.__name__, dtype, tuple(signature), tuple(constexprs),
                   kwargs.get("num_warps", 4), aligned=tuple(aligned), maxnreg=kwargs.get("maxnreg"))  # fmt: skip


def exact_launches(op: str, shape: tuple, dtype: str) -> list:
    """The kernels (as Variants) that softmax_gpu launches for `op` on a (rows, cols) input of
    `dtype`, found by running the real launchers on meta tensors with every kernel replaced by
    a recorder. ce_fwd_bwd lists the backward's launches too; softmax_bwd only the backward's."""
    import torch

    import softmax_gpu
    from softmax_gpu.ops import cross_entropy as ce
    from softmax_gpu.ops import softmax as sm

    launches, patched = [], []
    for module in (sm, ce):
        for name in dir(module):
            if name.endswith("_kernel"):
                patched.append((module, name, getattr(module, name)))
                setattr(module, name, _Capture(getattr(module, name), launches))
        patched.append((module, "check_launchable", module.check_launchable))
        module.check_launchable = lambda *args: None
    patched.append((ce, "_check_class_indices", ce._check_class_indices))
    ce._check_class_indices = lambda *args: None
    try:
        x = torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
        target = torch.empty(shape[0], dtype=torch.int64, device="meta")
        # softmax always dispatches through its custom op, whose meta kernel is the fake one:
        # call what the op calls for a contiguous (rows, cols) input, its launchers.
        if op == "softmax_fwd":
            sm.launch_softmax_fwd(x, torch.empty_like(x), False)
        elif op == "softmax_bwd":
            sm.launch_softmax_bwd(torch.empty_like(x), torch.empty_like(x), torch.empty_like(x), False)
        elif op == "ce_fwd":
            with torch.no_grad():
                softmax_gpu.cross_entropy(x, target)
        elif op == "ce_fwd_bwd":
            softmax_gpu.cross_entropy(x.requires_grad_(), target).backward()
        else:
            raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    finally:
        for module, name, original in patched:
            setattr(module, name, original)
    return [(_variant(kernel, kwargs), tuple(grid)) for kernel, grid, kwargs in launches]


# Residency on sm_80 / sm_90 (the CUDA occupancy rules): 64 warps, 32 blocks and 64K registers
# an SM, registers allocated a warp at a time in 256s (8 a thread), 1 KiB of shared memory
# reserved a block. Shared memory an SM: 164 KiB (sm_80), 228 KiB (sm_90).
SM_LIMITS = {80: 164 << 10, 86: 100 << 10, 89: 100 << 10, 90: 228 << 10}  # (other archs: sm_80's)
# The most shared memory one block may have (opt-in): 163 KiB on sm_80, 227 KiB on sm_90,
# 99 KiB on sm_86 and sm_89 (RTX 30 / 40, L40), which also run sm_80's code. An arch not
# listed is not checked.
SM86_BLOCK_SHARED = 99 << 10
BLOCK_SHARED = {80: 163 << 10, 86: SM86_BLOCK_SHARED, 89: SM86_BLOCK_SHARED, 90: 227 << 10}


def over_block_shared(reports) -> list:
    """The reports whose shared memory (static and dynamic) exceeds what their arch gives a block."""
    return [r for r in reports if r.shared > BLOCK_SHARED.get(r.arch, float("inf"))]
_ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8, "i64": 8, "i32": 4}


def resident_programs(report: "Report") -> int:
    """How many programs of this compiled kernel one SM holds at once (softmax_gpu.runtime's
    rule, which the cooperative launchers apply to the kernel they compiled)."""
    from softmax_gpu.runtime import resident_programs as rule

    return rule(report.regs, report.shared, report.variant.num_warps, shared_per_sm=SM_LIMITS.get(report.arch, SM_LIMITS[80]))


def occupancy(report: "Report", grid: tuple) -> str:
    """The launch's grid, programs resident an SM, and for row kernels the bytes of logits an
    SM has in flight while every resident program loads one block (ROWS x BLOCK_N elements
    of the row dtype): the figure a memory-bound row kernel needs to be large enough
    (Little's law: about 3.0 TB/s x ~0.8 us / 132 SMs = 18 KiB an SM on an H100, 26 KiB on
    an H200 at 4.3 TB/s) to stream at the copy rate."""
    programs = 1
    for g in grid:
        programs *= g
    resident = resident_programs(report)
    meta = dict(report.variant.constexprs)
    text = f"grid {programs}, {resident} resident/SM"
    if "BLOCK_N" in meta and report.variant.dtype in _ITEMSIZE:
        block = meta.get("ROWS", 1) * meta["BLOCK_N"] * _ITEMSIZE[report.variant.dtype]
        text += f", {resident * block / 1024:g} KiB in flight/SM"
    return text


def _parse_shape(text: str) -> tuple:
    rows, cols = text.lower().split("x")
    return int(rows), int(cols)


def exact_main(args) -> int:
    """--op: compile exactly the launches of each (op, shape, dtype) and report them."""
    variants = []
    for op in args.op:
        for shape in args.shape:
            for dtype in args.dtype:
                for v, grid in exact_launches(op, _parse_shape(shape), dtype):
                    variants.append((f"{op} {shape} {dtype}", v, grid))
    unique = list(dict.fromkeys(v for _, v, _ in variants))
    work = [(v, a) for v in unique for a in args.arch]
    reports = dict(zip(work, compile_all(work, "exact", cache=not args.no_cache, desc="compiling the launches")))
    lines = []
    for what, v, grid in variants:
        resident = "; ".join(f"sm_{a}: {occupancy(reports[(v, a)], grid)}" for a in args.arch)
        lines.append(f"# {what}: {v.kernel} {v.label} | {resident}")
    print("\n".join(lines))
    ordered = [reports[(v, a)] for _, v, _ in variants for a in args.arch]
    print(format_table(ordered))
    spills = [r for r in ordered if r.local]
    oversized = over_block_shared(ordered)
    print(f"\n{len(unique)} distinct launches compiled for sm {' '.join(map(str, args.arch))}, {len(spills)} spill, "
          f"{len(oversized)} over their arch's shared memory a block")  # fmt: skip
    return 1 if spills or oversized else 0


def format_summary(reports, cuda) -> str:
    """One line per kernel module: configurations, most registers, most shared memory, how
    many load and store 128 bits at a time, how many spill; and one for the CUDA C kernels."""
    lines = [f"  {'kernels':<30}{'configs':>8}{'max regs':>9}{'max smem':>9}{'128-bit ld':>11}{'128-bit st':>11}{'spill':>6}"]
    groups = {}
    for r in reports:
        groups.setdefault(r.variant.module.rsplit(".", 1)[-1], []).append(r)
    for module, rs in groups.items():
        lines.append(
            f"  {module + '.py':<30}{len(rs):>8}{max(r.regs for r in rs):>9}{max(r.shared for r in rs):>9}"
            f"{sum(r.ldg128 for r in rs):>11}{sum(r.stg128 for r in rs):>11}{sum(bool(r.local) for r in rs):>6}"
        )
    if cuda:
        narrow = sum(bool(r.unvectorised_loads or r.unvectorised_stores) for r in cuda)
        lines.append(f"  {'CUDA C (nvcc, kernels/*.cu)':<30}{len(cuda):>8}{max(r.regs for r in cuda):>9}"
                     f"{max(r.shared for r in cuda):>9}{'':>11}{'':>11}{sum(bool(r.local) for r in cuda):>6}"
                     f"   {narrow} with narrow loads or stores")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="SM versions (default 80 90)")
    parser.add_argument("--quick", action="store_true", help="a few block sizes per kernel instead of all")
    parser.add_argument("--dtypes", nargs="+", choices=tuple(TORCH_DTYPES), default=None,
                        help="only the configurations of these dtypes (default: all)")  # fmt: skip
    parser.add_argument("--out", default=None,
                        help="write the full tables to this file and print a summary instead")  # fmt: skip
    parser.add_argument("--no-cache", action="store_true", help="compile everything afresh (see cache_folder())")
    parser.add_argument("--op", nargs="+", choices=OPS, help="compile exactly the launches of these ops ...")
    parser.add_argument("--shape", nargs="+", default=["4096x50257"], help="... on these ROWSxCOLS inputs ...")
    parser.add_argument("--dtype", nargs="+", default=["bfloat16"], help="... of these dtypes (torch names)")
    args = parser.parse_args(argv)
    # The interpreter cannot compile: this report needs real JIT functions.
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if args.op:
        return exact_main(args)
    dtypes = None if args.dtypes is None else {TORCH_DTYPES[d] for d in args.dtypes}
    reports = run(tuple(args.arch), args.quick, dtypes=dtypes, cache=not args.no_cache)
    table = [format_table(reports)]
    spills = [r for r in reports if r.local]
    try:
        cuda = cuda_run(tuple(args.arch), cache=not args.no_cache)
    except subprocess.CalledProcessError as exc:
        print(f"\nnvcc failed on a CUDA C kernel:\n{exc.stdout}{exc.stderr}")
        return 1
    if cuda is None:
        table.append("nvcc not found: the CUDA C kernels (kernels/*.cu) were not compiled")
        cuda = []
    else:
        table.append(format_cuda_table(cuda))
    spills += [r for r in cuda if r.local]
    narrow = [r for r in cuda if r.unvectorised_loads or r.unvectorised_stores]
    oversized = over_block_shared(reports)
    total = len(reports) + len(cuda)
    table.append(f"{total} configurations compiled, {len(spills)} spill registers to local memory, "
                 f"{len(narrow)} vectorised CUDA C kernels with narrow loads or stores, "
                 f"{len(oversized)} over their arch's shared memory a block")  # fmt: skip
    if args.out:
        Path(args.out).write_text("\n\n".join(table) + "\n")
        print(format_summary(reports, cuda))
        if not cuda:
            print("  " + table[1])
        for r in spills + narrow:
            print(f"  SPILL or NARROW: {r}")
        for r in oversized:
            print(f"  SHARED MEMORY over {BLOCK_SHARED[r.arch]} bytes: {r}")
        print(table[-1])
        print(f"full tables: {args.out}")
    else:
        print("\n\n".join(table))
    return 1 if spills or narrow or oversized else 0


if __name__ == "__main__":
    sys.exit(main())
