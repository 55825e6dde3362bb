"""Cross-entropy and token log-probabilities over a vocabulary sharded across the ranks of a
torch.distributed group.

    vocab_parallel_cross_entropy(logits, target, *, group=None, vocab_start=None, ...)
    vocab_parallel_linear_cross_entropy(input, linear_weight, target, *, group=None, ...)
    vocab_parallel_token_logprobs(logits, tokens, *, group=None, vocab_start=None, temperature=1.0, ...)

Each rank passes the logits (or the LM head's weight rows) of its own slice of the classes;
every rank gets the loss of the full, unsharded problem and the gradient for its slice.
Importing this module needs neither an initialised process group nor a GPU; the kernels
and custom ops live in softmax_gpu/ops/vocab_parallel_cross_entropy.py,
softmax_gpu/ops/vocab_parallel_linear_cross_entropy.py and
softmax_gpu/ops/vocab_parallel_token_logprobs.py.
"""
from typing import Optional

import torch
import torch.distributed as dist

from .checks import check_floating, check_same_device, check_tensor
from .loss_options import LossOptions, check_reduction
from .ops.cross_entropy import row_weights
from .ops.linear_cross_entropy import _check_operands
from .ops.vocab_parallel_cross_entropy import VocabParallelCrossEntropyFunction
from .ops.vocab_parallel_linear_cross_entropy import VocabParallelLinearCrossEntropyFunction

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy", "vocab_parallel_token_logprobs"]

FN = "softmax_gpu.vocab_parallel_cross_entropy"

# Validated shard layouts: (group, this rank's V_local, its vocab_start or None) ->
# (this rank's first class, V). Filled by the first call per key; later calls with the same
# key exchange nothing for validation.
_LAYOUTS: dict = {}


def _resolve_group(group, fn=FN):
    if not dist.is_available():
        raise RuntimeError(f"{fn}(): this build of torch has no torch.distributed")
    if not dist.is_initialized():
        raise RuntimeError(f"{fn}(): the default process group is not initialised (call init_process_group first)")
    group = dist.group.WORLD if group is None else group
    if dist.get_rank(group) < 0:
        raise ValueError(f"{fn}(): this rank is not a member of the given process group")
    return group


def _tiling_error(table) -> Optional[str]:
    """Why the gathered (explicit, start, V_local) rows, one per group rank, do not tile
    [0, V) (None when they do). Every rank sees the same table, so every rank gets the same
    message and raises at the same point: nobody is left waiting in a later collective."""
    explicit = [row[0] for row in table]
    if any(explicit) and not all(explicit):
        given = [r for r, e in enumerate(explicit) if e]
        return f"vocab_start must be given on every rank or on none; ranks {given} of {len(table)} gave it"
    sizes = [row[2] for row in table]
    if not any(explicit):
        if len(set(sizes)) > 1:
            return (
                f"with vocab_start=None every rank must hold the same number of classes (equal shards in rank "
                f"order), but the ranks hold {sizes}; pass vocab_start for uneven shards"
            )
        return None
    covered = 0
    for start, size, rank in sorted((row[1], row[2], r) for r, row in enumerate(table) if row[2] > 0):
        if start > covered:
            return f"the shards leave classes [{covered}, {start}) to no rank (rank {rank}'s shard starts at {start})"
        if start < covered:
            return f"the shards overlap: rank {rank}'s shard [{start}, {start + size}) starts before {covered}"
        covered = start + size
    return None if covered > 0 else "no rank holds any class"


def _shard_layout(group, n_local: int, vocab_start: Optional[int], device, fn=FN) -> tuple[int, int]:
    """(this rank's first class, V), checking once per (group, V_local, vocab_start) that the
    ranks' shards tile [0, V): one all-gather of 3 int64 per rank and one device-to-host copy
    on that first call, nothing afterwards. Raises ValueError on every rank when they do not."""
    key = (group, n_local, vocab_start)
    layout = _LAYOUTS.get(key)
    if layout is not None:
        return layout
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    mine = torch.tensor([vocab_start is not None, vocab_start or 0, n_local], dtype=torch.int64, device=device)
    rows = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(rows, mine, group=group)
    table = torch.stack(rows).tolist()
    error = _tiling_error(table)
    if error is not None:
        raise ValueError(f"{fn}(): the vocabulary shards do not tile [0, V): {error}")
    if vocab_start is None:
        layout = (rank * n_local, world * n_local)
    else:
        layout = (vocab_start, max(row[1] + row[2] for row in table))
    _LAYOUTS[key] = layout
    return layout


def _check_vocab_start(fn, vocab_start):
    if vocab_start is not None and (isinstance(vocab_start, bool) or not isinstance(vocab_start, int)):
        raise TypeError(f"{fn}(): vocab_start must be None or an int, but got {type(vocab_start).__name__}")
    if vocab_start is not None and vocab_start < 0:
        raise ValueError(f"{fn}(): vocab_start must be >= 0, but got {vocab_start}")


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    group=None,
    vocab_start: Optional[int] = None,
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    _layout: Optional[tuple] = None,
) -> torch.Tensor:
    """softmax_gpu.cross_entropy of the full problem, with the classes sharded across a group.

    Args:
        logits: (N, V_local), this rank's logits for classes [vocab_start, vocab_start + V_local).
        target: (N,) global class indices (int64/int32), the same on every rank; or (N, V_local)
            probabilities for this rank's classes.
        group: the process group holding the shards (default: the world).
        vocab_start: this rank's first class. None: equal shards in rank order, rank * V_local
            (every rank must then hold the same V_local). Explicit starts allow uneven shards.
        weight: (V_local,) this rank's shard of the class weights.
        ignore_index, reduction, label_smoothing, z_loss, softcap: as in cross_entropy, over
            all V classes (smoothing puts eps / V, not eps / V_local, on every class).
    Returns:
        float32 loss, identical on every rank: a scalar, or (N,) for reduction="none". Its
        gradient with respect to `logits` is this rank's shard of the full gradient.

    Communication per forward: one all-reduce MAX of N float32 and one all-reduce SUM of
    N x (2 to 5) float32; none in the backward; no host synchronisation. The first call for
    a given (group, V_local, vocab_start) also all-gathers 3 int64 per rank and reads them on
    the host, to check that the shards tile [0, V) (ValueError on every rank otherwise); the
    result is cached. Ranks that change their shards inconsistently after that first call
    are not detected (like any mismatched collective, they would wait on each other).
    A class index outside [0, V) behaves as in cross_entropy: IndexError for CPU tensors,
    a NaN row on CUDA (checked eagerly with SOFTMAX_GPU_CHECK_TARGETS=1).
    """
    check_floating(FN, "logits", logits)
    if logits.dim() != 2:
        raise ValueError(f"{FN}(): logits must be (N, V_local), got shape {tuple(logits.shape)}")
    check_tensor(FN, "target", target)
    if target.is_floating_point():
        if target.shape != logits.shape:
            raise ValueError(
                f"{FN}(): probability targets must have the logits' shape {tuple(logits.shape)}, "
                f"got {tuple(target.shape)}"
            )
    elif target.dtype in (torch.int64, torch.int32):
        if target.shape != logits.shape[:1]:
            raise ValueError(
                f"{FN}(): expected class-index target of shape ({logits.shape[0]},), got {tuple(target.shape)}"
            )
    else:
        raise TypeError(f"{FN}(): target must hold class indices (int64 or int32) or probabilities, got {target.dtype}")
    if weight is not None:
        check_floating(FN, "weight", weight)
        if weight.shape != logits.shape[1:]:
            raise ValueError(f"{FN}(): weight must have shape ({logits.shape[1]},), got {tuple(weight.shape)}")
        weight = weight.contiguous()  # the kernels read weight[j] at unit stride
    check_same_device(FN, logits=logits, target=target, weight=weight)
    check_reduction(FN, reduction)
    options = LossOptions.checked(FN, ignore_index, label_smoothing, z_loss, softcap)
    if target.is_floating_point() and ignore_index != -100:
        raise RuntimeError(f"{FN}(): ignore_index is not supported for floating point target (as in torch)")
    _check_vocab_start(FN, vocab_start)
    group = _resolve_group(group)
    # (_layout: (first class, V) known to the caller, a DTensor's: nothing to check or cache)
    col_start, n_classes = _layout or _shard_layout(group, logits.shape[1], vocab_start, logits.device)

    if logits.stride(1) != 1:
        logits = logits.contiguous()  # the kernels need unit column stride; any row stride is fine
    if target.is_floating_point() and target.stride(1) != 1:
        target = target.contiguous()
    loss, _lse = VocabParallelCrossEntropyFunction.apply(logits, target, weight, group, n_classes, col_start, options,
                                                         reduction)  # fmt: skip
    return loss


LINEAR_FN = "softmax_gpu.vocab_parallel_linear_cross_entropy"


def vocab_parallel_linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    group=None,
    vocab_start: Optional[int] = None,
    linear_bias: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    _layout: Optional[tuple] = None,
) -> torch.Tensor:
    """softmax_gpu.linear_cross_entropy of the full problem, with the LM head sharded by class.

    Args:
        input: (N, H) or (..., H) features, float32, float16 or bfloat16; the same on every rank.
        linear_weight: (V_local, H), this rank's rows of the head: classes
            [vocab_start, vocab_start + V_local); linear_bias: (V_local,) or None.
        target: global class indices (int64/int32) shaped like input without its last dim,
            the same on every rank. (Probability targets are not supported here.)
        group, vocab_start: as in vocab_parallel_cross_entropy (None: equal shards in rank order).
        weight: (V_local,) this rank's shard of the class weights.
        ignore_index, reduction, label_smoothing, z_loss, softcap: as in linear_cross_entropy,
            over all V classes.
    Returns:
        float32 loss, identical on every rank: a scalar, or the target's shape for
        reduction="none". Gradients: this rank's shard of d/d linear_weight and
        d/d linear_bias, and the full d/d input (summed over the ranks) on every rank.

    Communication: forward, one all-reduce MAX of N float32 and one all-reduce SUM of
    N x (2 to 5) float32 (plus, on the first call per layout, the cached shard check of
    vocab_parallel_cross_entropy); backward, one all-reduce SUM of dX, N x H float32, when
    the input needs a gradient (every rank must then ask for it), none otherwise. No tensor
    of size N x V_local is made beyond a slab of config.LINEAR_CE_BUFFER_BYTES["low_memory"];
    no host synchronisation. The upstream gradient (for
    reduction="none") must be the same on every rank, as the loss is.
    """
    fn = LINEAR_FN
    if ignore_index is None:
        ignore_index = -100
    check_tensor(fn, "target", target)
    if target.is_floating_point():
        raise TypeError(f"{fn}(): target must hold class indices (int64 or int32); probability targets are not "
                        f"supported, got {target.dtype}")  # fmt: skip
    # A rank may hold no classes (a vocabulary shorter than torch.chunk's parts): it still
    # takes part in every collective.
    _check_operands(fn, input, linear_weight, target, linear_bias, weight, allow_no_classes=True,
                    dtypes=(torch.float32, torch.float16, torch.bfloat16))  # fmt: skip
    check_reduction(fn, reduction)
    options = LossOptions.checked(fn, ignore_index, label_smoothing, z_loss, softcap)
    _check_vocab_start(fn, vocab_start)
    group = _resolve_group(group, fn)
    n_local, hidden = linear_weight.shape
    col_start, n_classes = _layout or _shard_layout(group, n_local, vocab_start, input.device, fn)

    x = input.reshape(input.shape[:-1].numel(), hidden)  # a view when it can be: the kernels take both strides
    tgt = target.reshape(-1)
    if weight is not None:
        weight = weight.contiguous()  # the kernels read weight[j] and linear_bias[j] at unit stride
    if linear_bias is not None:
        linear_bias = linear_bias.contiguous()
    loss, _lse = VocabParallelLinearCrossEntropyFunction.apply(
        x, linear_weight, linear_bias, tgt, weight, group, n_classes, col_start, options, reduction
    )
    if reduction == "none":
        return loss.view(input.shape[:-1])
    return loss


TOKENS_FN = "softmax_gpu.vocab_parallel_token_logprobs"


def vocab_parallel_token_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    group=None,
    vocab_start: Optional[int] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """softmax_gpu.token_logprobs of the full rows, with the classes sharded across a group.

    Args:
        logits: (..., V_local), this rank's logits for classes [vocab_start, vocab_start +
            V_local); float32, bfloat16, float16 or float64 (accumulated in float32).
        tokens: (...) global token ids (int64/int32), the same on every rank.
        group, vocab_start: as in vocab_parallel_cross_entropy (equal shards in rank order
            by default; explicit starts allow uneven shards).
        temperature, ignore_index, return_entropy: as in token_logprobs, over all V classes.
    Returns:
        logprobs, or (logprobs, entropy): float32, shaped like tokens, identical on every
        rank. Their gradients with respect to `logits` are this rank's shard of the full
        gradients (the upstream gradients must be the same on every rank, as they are when
        every rank computes the same loss from them).

    Communication per forward: one all-reduce MAX of N float32 and one all-reduce SUM of
    N x 2 float32 (N x 3 with the entropy); none in the backward; no host synchronisation
    (the first call per shard layout checks it, as vocab_parallel_cross_entropy's does). A
    token outside [0, V) gives NaN at its position, as in token_logprobs.
    """
    from .ops.token_logprobs import check_logits_and_tokens
    from .ops.vocab_parallel_token_logprobs import VocabParallelTokenLogprobsFunction

    fn = TOKENS_FN
    check_logits_and_tokens(fn, logits, tokens, temperature, ignore_index)
    _check_vocab_start(fn, vocab_start)
    group = _resolve_group(group, fn)
    col_start, n_classes = _shard_layout(group, logits.shape[-1], vocab_start, logits.device, fn)
    rows = logits.reshape(-1, logits.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()  # the kernels stream rows at unit stride
    logprobs, entropy, _ = VocabParallelTokenLogprobsFunction.apply(
        rows, tokens.reshape(-1), group, n_classes, col_start, float(temperature), ignore_index, bool(return_entropy)
    )  # fmt: skip
    logprobs = logprobs.view(tokens.shape)
    return (logprobs, entropy.view(tokens.shape)) if return_entropy else logprobs


# ---------------------------------------------------------------------------------------
# DTensor inputs: cross_entropy() and linear_cross_entropy() hand them here
# ---------------------------------------------------------------------------------------


def _local(t):
    """A DTensor's local tensor (differentiable), anything else as it is."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _one_placement(fn, mesh, *tensors):
    """The single placement of each DTensor among tensors (None for plain tensors and None);
    raises for meshes of more than one dim and for mixed meshes."""
    from torch.distributed.tensor import DTensor

    placements = []
    for t in tensors:
        if not isinstance(t, DTensor):
            placements.append(None)
            continue
        if t.device_mesh != mesh or mesh.ndim != 1:
            raise NotImplementedError(f"{fn}(): DTensors on one 1-D device mesh are supported, got {t.device_mesh}")
        placements.append(t.placements[0])
    return placements


def _chunk_start(n: int, parts: int, index: int) -> int:
    """Where torch.chunk (and so Shard) starts part `index` of n elements in `parts`."""
    return min(index * -(-n // parts), n)


def _replicated(loss, mesh):
    from torch.distributed.tensor import DTensor, Replicate

    return DTensor.from_local(loss, mesh, [Replicate()], run_check=False)


def _batch_reduced(rows, counted_weight, mesh, reduction, shape):
    """Per-row losses sharded on the batch dim (global `shape`, the shards torch.chunk's, so
    possibly uneven): reduced over every rank's rows, a Replicate DTensor (DTensor's own
    differentiable reductions), or the Shard(0) per-row DTensor for reduction="none"."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    stride = torch.empty(shape, device="meta").stride()

    def sharded(local):
        return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)

    loss = sharded(rows)
    if reduction == "none":
        return loss
    total = loss.sum().redistribute(mesh, [Replicate()])
    if reduction == "sum":
        return total
    return total / sharded(counted_weight).sum().redistribute(mesh, [Replicate()])


def dtensor_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap):
    """softmax_gpu.cross_entropy of DTensor logits (N, C) on a 1-D mesh:

    Shard(1) (the classes, as tensor parallelism's loss_parallel() leaves them): the
        vocab-parallel path on the mesh's group, each rank's first class from the Shard
        layout (torch.chunk's); the target replicated;
    Replicate: the local call on every rank;
    Shard(0) (the batch): per-row losses on each rank's rows, then DTensor's reductions.
    Returns a DTensor: Replicate for a reduced loss and for every loss of Shard(1) and
    Replicate logits, Shard(0) per-row losses for batch-sharded ones."""
    from torch.distributed.tensor import Replicate, Shard

    from .ops.cross_entropy import cross_entropy

    fn = "softmax_gpu.cross_entropy"
    mesh = input.device_mesh
    placement, target_placement, weight_placement = _one_placement(fn, mesh, input, target, weight)
    logits, tgt, w = _local(input), _local(target), _local(weight)
    options = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    if target_placement is not None and target_placement != (placement if placement == Shard(0) else Replicate()):
        raise NotImplementedError(f"{fn}(): a {target_placement} target with {placement} logits is not supported")
    if weight_placement not in (None, Replicate()):
        raise NotImplementedError(f"{fn}(): class weights must be a plain tensor or a Replicate DTensor")
    if placement == Replicate():
        return _replicated(cross_entropy(logits, tgt, w, reduction=reduction, **options), mesh)
    if placement == Shard(0) and input.dim() >= 2:  # (a 1-D input's dim 0 is its classes)
        rows = cross_entropy(logits, tgt, w, reduction="none", **options)
        counted = None if reduction != "mean" else row_weights(tgt, w, ignore_index, rows.dtype)
        return _batch_reduced(rows, counted, mesh, reduction, input.shape[:1] + input.shape[2:])
    if placement == Shard(1) and input.dim() == 2 and not tgt.is_floating_point():
        n_classes = input.shape[1]
        start = _chunk_start(n_classes, mesh.size(), mesh.get_local_rank())
        w = None if w is None else w[start : start + logits.shape[1]]
        loss = vocab_parallel_cross_entropy(logits, tgt, group=mesh.get_group(), weight=w, reduction=reduction,
                                            _layout=(start, n_classes), **options)  # fmt: skip
        return _replicated(loss, mesh)
    raise NotImplementedError(
        f"{fn}(): DTensor logits placed {placement} (dim {input.dim()}) are not supported: Shard(1) of (N, C) logits "
        "with class-index targets, Replicate, or Shard(0)"
    )


def dtensor_linear_cross_entropy(input, linear_weight, target, linear_bias, weight, ignore_index, reduction,
                                 label_smoothing, z_loss, softcap, **linear_options):  # fmt: skip
    """softmax_gpu.linear_cross_entropy with DTensors on a 1-D mesh:

    the head Shard(0) (its classes: a column-parallel LM head), the input Replicate (or a
        plain tensor, the same on every rank): vocab_parallel_linear_cross_entropy on the
        mesh's group;
    the head Replicate, the input Replicate: the local call; the input Shard(0) (the
        batch): per-row losses on each rank's rows, then DTensor's reductions.
    Returns a DTensor, as dtensor_cross_entropy."""
    from torch.distributed.tensor import Replicate, Shard

    from .ops.linear_cross_entropy import linear_cross_entropy

    from torch.distributed.tensor import Partial

    from .ops.linear_cross_entropy import check_linear_options

    fn = "softmax_gpu.linear_cross_entropy"
    linear_options["grad_skip_threshold"] = check_linear_options(
        fn, linear_options["mode"], linear_options["buffer_bytes"], linear_options["grad_skip_threshold"]
    )  # (normalised: 0.0 is off, None)
    mesh = next(t.device_mesh for t in (input, linear_weight) if hasattr(t, "device_mesh"))
    x_place, w_place, b_place, t_place, cw_place = _one_placement(fn, mesh, input, linear_weight, linear_bias, target,
                                                                  weight)  # fmt: skip
    tgt, cw = _local(target), _local(weight)
    options = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    if cw_place not in (None, Replicate()) or (b_place is not None and b_place != w_place):
        raise NotImplementedError(f"{fn}(): the bias must be placed as the head, class weights replicated")
    if w_place == Shard(0) and x_place in (None, Replicate()) and t_place in (None, Replicate()):
        if linear_options["grad_skip_threshold"] is not None:
            raise NotImplementedError(f"{fn}(): grad_skip_threshold is not supported for a vocab-sharded head")
        n_classes = linear_weight.shape[0]
        x, w, b = (_local(t) for t in (input, linear_weight, linear_bias))
        start = _chunk_start(n_classes, mesh.size(), mesh.get_local_rank())
        cw = None if cw is None else cw[start : start + w.shape[0]]
        loss = vocab_parallel_linear_cross_entropy(x, w, tgt, group=mesh.get_group(), linear_bias=b, weight=cw,
                                                   reduction=reduction, _layout=(start, n_classes), **options)  # fmt: skip
        return _replicated(loss, mesh)
    if w_place == Replicate() and x_place == Replicate():
        x, w, b = (_local(t) for t in (input, linear_weight, linear_bias))
        return _replicated(linear_cross_entropy(x, w, tgt, linear_bias=b, weight=cw, reduction=reduction, **options,
                                                **linear_options), mesh)  # fmt: skip
    if w_place == Replicate() and x_place == Shard(0) and t_place in (None, Shard(0)) and input.dim() >= 2:
        # Each rank's rows give a partial gradient of the replicated head: summed over the ranks.
        x = input.to_local()
        w = linear_weight.to_local(grad_placements=[Partial()])
        b = None if linear_bias is None else linear_bias.to_local(grad_placements=[Partial()])
        rows = linear_cross_entropy(x, w, tgt, linear_bias=b, weight=cw, reduction="none", **options, **linear_options)
        counted = None if reduction != "mean" else row_weights(tgt, cw, ignore_index, rows.dtype)
        return _batch_reduced(rows, counted, mesh, reduction, input.shape[:-1])
    raise NotImplementedError(
        f"{fn}(): DTensor input placed {x_place} with the head placed {w_place} is not supported: the head Shard(0) "
        "with the input Replicate, or the head Replicate with the input Replicate or Shard(0)"
    )
