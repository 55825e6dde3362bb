"""Minimum bytes each benchmarked op must move: the denominator of every GB/s figure.

M rows of N classes, s bytes an element. Per-row extras (targets, losses) are the O(M) terms.

ours() is softmax_gpu's own side of that figure: the path its dispatch picks for a case, the
kernel launches one call makes and the bytes they move (below min_bytes).
"""
import dataclasses
import math

OPS = ("softmax_fwd", "softmax_bwd", "log_softmax_fwd", "ce_fwd", "ce_fwd_bwd")

TARGET_BYTES = 8  # an int64 class index per row
LOSS_BYTES = 4  # a float32 loss per row


def min_bytes(op: str, rows: int, cols: int, itemsize: int) -> int:
    """Bytes an ideal kernel moves for `op` on a rows x cols input of `itemsize`-byte elements.

    softmax / log_softmax forward: read x, write y           2 M N s
    softmax backward:              read y and dy, write dx   3 M N s
    cross-entropy forward:         read the logits once      M N s + M (8 + 4)
    cross-entropy fwd+bwd:         read logits, write grad   2 M N s + M (8 + 4)
    """
    element = rows * cols * itemsize
    per_row = rows * (TARGET_BYTES + LOSS_BYTES)
    if op in ("softmax_fwd", "log_softmax_fwd"):
        return 2 * element
    if op == "softmax_bwd":
        return 3 * element
    if op == "ce_fwd":
        return element + per_row
    if op == "ce_fwd_bwd":
        return 2 * element + per_row
    raise ValueError(f"unknown op {op!r}; expected one of {OPS}")


# ---------------------------------------------------------------------------------------
# softmax_gpu's own implementation: the path it takes, its launches and the bytes it moves
# ---------------------------------------------------------------------------------------
# Each op is modelled as bench/gpu.py's runner calls it on a contiguous rows x cols tensor:
# softmax / log_softmax along the last dim; the softmax backward alone (y computed
# beforehand); cross_entropy with int64 class indices, reduction="mean" and no options, under
# no_grad (ce_fwd) or forward with grad plus torch.autograd.grad (ce_fwd_bwd). The path is
# decided by the package's own dispatch (config.row_config, short_rows, vectors, split_rows,
# cross_entropy_config, DEFERRED_GRAD_DTYPES), so config overrides active at the call
# (config.block_limit, force_split, no_split) apply here as in the launchers. Bytes count
# every active lane of every load and store the kernels make, as softmax_gpu.traffic's
# TrafficCounter does in the interpreter (tests/test_traffic_model.py checks each path
# against it exactly): no L2 reuse is discounted (a split chunk's read of its row's
# statistics counts each time), and the reduction's done-counter atomic (one 4-byte atomic
# a program, resolved in L2) is not counted. The targets are assumed valid class indices, as
# the benchmark draws them (an ignored row skips its target's logit). Launches are Triton
# launches; autograd's own seed for a scalar loss (torch.ones_like in
# torch.autograd.grad: one fill kernel, 4 bytes) is torch's and not counted.

ACC_BYTES = 4  # float32: the loss, lse, row statistics, partials, the mean's total, the upstream gradient
COUNTER_BYTES = 4  # the int32 done-counter the reduction's last program is found by
PATHS = ("tiles", "single", "looped", "split", "cooperative")


@dataclasses.dataclass(frozen=True)
class Traffic:
    """softmax_gpu's cost for one call of an op, as the benchmark makes it.

    path: "tiles" (short rows, several to a program, each read once), "single" (a row in
        one block, read once), "looped" (one program a row stepping through it in blocks:
        the body read twice where a second pass is needed, the few head/tail elements
        outside whole 16-byte vectors once), "split" (few long rows, each cut into chunks
        over several programs), or "cooperative" (many long rows, each held by a group of
        resident programs: the softmax forward and backward with SOFTMAX_GPU_COOPERATIVE=1). For ce_fwd_bwd with the gradient deferred to the backward
        (float16, split rows) and a backward path unlike the forward's: "forward+backward",
        e.g. "single+looped" (the backward kernel always streams its row).
    launches: Triton kernel launches in the call.
    bytes: bytes those launches' loads and stores move (see the notes above).
    """

    path: str
    launches: int
    bytes: int


def ours(op: str, rows: int, cols: int, dtype, sm_count: int) -> Traffic:
    """Path, launches and bytes of softmax_gpu's `op` (one of OPS) on a rows x cols input of
    `dtype` (torch.float32, torch.bfloat16 or torch.float16) on a GPU of sm_count
    multiprocessors (the split decision depends on it), under the config overrides active now."""
    import torch

    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"ours: dtype must be float32, bfloat16 or float16, got {dtype}")
    if rows < 1 or cols < 1:
        raise ValueError(f"ours: needs at least one row and one column, got {rows} x {cols}")
    size = dtype.itemsize
    if op in ("softmax_fwd", "log_softmax_fwd"):  # log_softmax moves the same bytes
        return _softmax_forward(rows, cols, size, sm_count)
    if op == "softmax_bwd":
        return _softmax_backward(rows, cols, size, sm_count)
    if op == "ce_fwd":
        return _cross_entropy(rows, cols, size, sm_count, grad=False, deferred=False)
    if op == "ce_fwd_bwd":
        from softmax_gpu.ops.cross_entropy import DEFERRED_GRAD_DTYPES

        deferred = dtype in DEFERRED_GRAD_DTYPES or _cross_entropy_split(rows, cols, size, sm_count) is not None
        return _cross_entropy(rows, cols, size, sm_count, grad=True, deferred=deferred)
    raise ValueError(f"unknown op {op!r}; expected one of {OPS}")


def edge_elements(rows: int, cols: int, vec: int) -> int:
    """Elements of contiguous rows x cols rows outside their aligned bodies of whole
    vec-element vectors (the heads and tails of kernels/softmax.py's row_layout), which the
    looped paths read once where they read the body twice. Row r starts at element r * cols
    of a 16-byte aligned allocation; the pattern repeats every vec / gcd(cols, vec) rows."""

    def edge(row):
        head = min(-(row * cols) % vec, cols)
        return head + (cols - head) % vec

    period = vec // math.gcd(cols, vec)
    whole, rest = divmod(rows, period)
    return whole * sum(edge(r) for r in range(period)) + sum(edge(r) for r in range(rest))


def _row_path(cfg) -> str:
    """The path of a one-program-per-row-or-tile RowConfig."""
    if cfg.single_block:
        return "tiles" if cfg.rows > 1 else "single"
    return "looped"


def _looped_edge_bytes(cfg, rows: int, cols: int, size: int) -> int:
    """Bytes of the head/tail elements of every row under cfg (0 without an edge)."""
    return edge_elements(rows, cols, cfg.vec) * size if cfg.edge else 0


def _softmax_forward(rows: int, cols: int, size: int, sms: int) -> Traffic:
    """launch_softmax_fwd: 1 read + 1 write a row in one block; 2 reads (the edge once) + 1
    write looped; split: the looped bytes with the edge read twice, plus 2 partials a chunk
    (written, then read by each chunk of the row); cooperative (with SOFTMAX_GPU_COOPERATIVE=1):
    1 read + 1 write and the split's partials, in one launch (the groups' counters, zeroed
    by torch and counted like the done-counter, are not in the bytes)."""
    from softmax_gpu import config

    element = rows * cols * size
    split = config.split_rows(rows, cols, size, config.MAX_BLOCK_SOFTMAX_FWD, config.LOOP_BLOCK_SOFTMAX_FWD, sms=sms)
    if split is not None:
        partials = rows * split.chunks * 2 * ACC_BYTES
        return Traffic("split", 2, 3 * element + partials * (1 + split.chunks))
    coop = config.cooperative_rows(rows, cols, size, config.MAX_BLOCK_SOFTMAX_FWD, config.COOPERATIVE_SOFTMAX_FWD, sms=sms)
    if coop is not None:  # the GPU's one launch (the interpreter runs two halves, reading the rows twice)
        partials = rows * coop.chunks * 2 * ACC_BYTES
        return Traffic("cooperative", 1, 2 * element + partials * (1 + coop.chunks))
    cfg = config.vectors(
        config.short_rows(
            config.row_config(cols, config.MAX_BLOCK_SOFTMAX_FWD, size, loop_block_n=config.LOOP_BLOCK_SOFTMAX_FWD),
            rows, size,
        ),
        rows, cols, [(size, cols)] * 2,
    )  # fmt: skip
    if cfg.single_block:
        return Traffic(_row_path(cfg), 1, 2 * element)
    return Traffic("looped", 1, 3 * element - _looped_edge_bytes(cfg, rows, cols, size))


def _softmax_backward(rows: int, cols: int, size: int, sms: int) -> Traffic:
    """launch_softmax_bwd (softmax, not log_softmax): y and dy read once + dx written in one
    block; looped, y and dy read twice (the edge once); split: the looped bytes with the edge
    read twice, plus a partial sum a chunk (written, then read by each chunk of the row);
    cooperative (SOFTMAX_GPU_COOPERATIVE=1): y and dy read once, dx written, and the split's
    partials, in one launch."""
    from softmax_gpu import config

    element = rows * cols * size
    split = config.split_rows(rows, cols, size, config.MAX_BLOCK_SOFTMAX_BWD, config.LOOP_BLOCK_SOFTMAX_BWD, sms=sms)
    if split is not None:
        partials = rows * split.chunks * ACC_BYTES
        return Traffic("split", 2, 5 * element + partials * (1 + split.chunks))
    coop = config.cooperative_rows(rows, cols, size, config.MAX_BLOCK_SOFTMAX_BWD, config.COOPERATIVE_SOFTMAX_BWD, sms=sms)
    if coop is not None:  # the GPU's one launch (the interpreter's halves read dy and y twice)
        partials = rows * coop.chunks * ACC_BYTES
        return Traffic("cooperative", 1, 3 * element + partials * (1 + coop.chunks))
    cfg = config.vectors(
        config.short_rows(
            config.row_config(cols, config.MAX_BLOCK_SOFTMAX_BWD, size, loop_block_n=config.LOOP_BLOCK_SOFTMAX_BWD),
            rows, size,
        ),
        rows, cols, [(size, cols)] * 3,
    )  # fmt: skip
    if cfg.single_block:
        return Traffic(_row_path(cfg), 1, 3 * element)
    return Traffic("looped", 1, 5 * element - 2 * _looped_edge_bytes(cfg, rows, cols, size))


def _cross_entropy_split(rows: int, cols: int, size: int, sms: int, streaming: bool = False):
    """ops/cross_entropy.py's cross_entropy_split for the plain variant (class indices, no
    weights, smoothing or soft cap) at `sms` multiprocessors (the op asks the device; tests
    check that the two agree): the forward's split, or with streaming=True the backward's."""
    from softmax_gpu import config

    if streaming:
        max_block = loop_block = config.LOOP_BLOCK_CROSS_ENTROPY
    else:
        max_block, loop_block = config.max_block_cross_entropy_plain(size), config.LOOP_BLOCK_CROSS_ENTROPY_PLAIN
    return config.split_rows(rows, cols, size, max_block, loop_block, config.ELEMENTS_PER_THREAD_CROSS_ENTROPY,
                             sms=sms)  # fmt: skip


def _cross_entropy_cooperative(rows: int, cols: int, size: int, sms: int):
    """ops/cross_entropy.py's _cooperative_plan's layout for the plain loss with its gradient
    on contiguous rows (whole vectors always agree), or None."""
    from softmax_gpu import config

    return config.cooperative_rows(rows, cols, size, config.max_block_cross_entropy_plain(size),
                                   config.COOPERATIVE_CROSS_ENTROPY, sms=sms)  # fmt: skip


def _cross_entropy(rows: int, cols: int, size: int, sms: int, grad: bool, deferred: bool) -> Traffic:
    """cross_entropy(x, target) with reduction="mean": the forward (prepare + loss kernel, or
    the split stats + combine), and with grad the backward: the stored route's scale kernel
    (each of its programs reads the 0-d upstream once and, that being 1, nothing else), or
    the deferred route's backward kernel (one read of the logits, one write of the gradient)."""
    from softmax_gpu import config
    from softmax_gpu.ops.cross_entropy import cross_entropy_config

    element = rows * cols * size
    store_grad = grad and not deferred
    # Per row, every path: the target's logit read (size), the loss and lse written, and the
    # reduction's last program reading every row's loss; once: the counter and the mean's
    # total written, the total read by the reduction, the mean written.
    per_row = size + 3 * ACC_BYTES
    once = COUNTER_BYTES + 3 * ACC_BYTES
    if deferred:
        per_row += 4 * ACC_BYTES  # the 4 statistics a row the backward needs
    split = _cross_entropy_split(rows, cols, size, sms)
    reduce_launches = False  # the reduction in a launch of its own (config.reduce_launch)
    if split is not None:
        # Stats launch: the row's target in each chunk's program, the logits once, the
        # partials (max, sum) a chunk; chunk 0's program also writes the target's logit, and
        # program (0, 0) reads the targets for the mean's total. Combine, a program a row: the
        # target, the target's logit and the partials read.
        partials = rows * split.chunks * 2 * ACC_BYTES
        fwd_path = "split"
        forward = (element + rows * split.chunks * TARGET_BYTES + 2 * partials + rows * 2 * ACC_BYTES
                   + rows * 2 * TARGET_BYTES)  # fmt: skip
    elif store_grad and _cross_entropy_cooperative(rows, cols, size, sms) is not None:
        # Cooperative rows (SOFTMAX_GPU_COOPERATIVE=1), the GPU's one launch: the prepare
        # kernel's targets; in the loss kernel every program a row reads the class index and
        # the mean's total, the logits are read once and the gradient written once; 3
        # partials a chunk written, each read by the row's chunks; the target's logit travels
        # in them (no scalar load of it). The interpreter's two halves read the logits and
        # the class indices once more.
        coop = _cross_entropy_cooperative(rows, cols, size, sms)
        partials = rows * coop.chunks * 3 * ACC_BYTES
        fwd_path = "cooperative"
        # (per_row below counts a load of the target's logit, which this path does not make)
        forward = (2 * element + rows * TARGET_BYTES + rows * coop.chunks * (TARGET_BYTES + ACC_BYTES)
                   + partials * (1 + coop.chunks) - rows * size)  # fmt: skip
    else:
        # Prepare: the targets read for the mean's total. Loss kernel: the targets read, the
        # logits once (twice for the body when it loops and writes the gradient), the gradient
        # written with the mean's total read once a program.
        cfg = config.vectors(
            config.short_rows(cross_entropy_config(cols, size, plain=True, forward_only=not store_grad,
                                                   many_rows=rows >= config.FORWARD_STREAM_ROWS_PER_SM * sms), rows, size,
                              config.ELEMENTS_PER_THREAD_CROSS_ENTROPY),
            rows, cols, [(size, cols)] * (2 if store_grad else 1),
        )  # fmt: skip
        fwd_path = _row_path(cfg)
        forward = element + rows * 2 * TARGET_BYTES
        if store_grad:
            programs = -(-rows // cfg.rows)
            # with many tiles the reduction is a launch of its own: the same bytes, one launch more
            reduce_launches = config.reduce_launch(True, False, programs, sms)
            forward += element + programs * ACC_BYTES
            if not cfg.single_block:
                forward += element - _looped_edge_bytes(cfg, rows, cols, size)
    forward += rows * per_row + once
    if not grad:
        return Traffic(fwd_path, 2, forward)
    if store_grad:  # scale_grad_kernel: the upstream, 1, read once a program
        scale = config.short_rows(cross_entropy_config(cols), rows, size, config.ELEMENTS_PER_THREAD_CROSS_ENTROPY)
        programs = min(-(-rows // scale.rows), config.SCALE_GRAD_PROGRAMS_PER_SM * sms)
        return Traffic(fwd_path, 3 + reduce_launches, forward + programs * ACC_BYTES)
    # The backward kernel, a program a row or a chunk: the target, the 4 statistics, the
    # upstream and the mean's total; the logits read once and the gradient written.
    bwd_split = _cross_entropy_split(rows, cols, size, sms, streaming=True)
    programs = rows * bwd_split.chunks if bwd_split is not None else rows
    backward = 2 * element + programs * (TARGET_BYTES + 6 * ACC_BYTES)
    bwd_path = "split" if bwd_split is not None else "looped"
    path = fwd_path if bwd_path == fwd_path else f"{fwd_path}+{bwd_path}"
    return Traffic(path, 3, forward + backward)
