"""Vocab-parallel token log-probabilities and entropy: a custom op, the collectives, autograd.

Each rank of a process group holds the logits of a contiguous slice of the classes (a
tensor-parallel LM head, as verl and Megatron shard it). Layers, top to bottom:
  softmax_gpu::token_logprobs_partials   this shard's (m, d, s) per row and chunk: the split
                                         rows' partial kernel (kernels/token_logprobs.py)
  merge_partials                         the two all-reduces (the only communication)
  VocabParallelTokenLogprobsFunction     autograd; the backward is the single-device
                                         backward kernel on the shard, with no communication
The public function and its checks are softmax_gpu.distributed.vocab_parallel_token_logprobs.

Per forward, per rank: one read of the shard; one all-reduce MAX of the row maxima (N
float32) and one all-reduce SUM of (d, s, z_t / T) per row (N x 3 float32, N x 2 without
the entropy). Per backward: one read and one write of the shard, nothing exchanged. Nothing
of size N x V is exchanged, nothing is read back to the host.
"""
import torch
import torch.distributed as dist

from .cross_entropy import _plain_eager
from .functorch import first_order
from .token_logprobs import _config, launch_partials, saved_logits_gradient, split_config

VP_FN = "softmax_gpu.vocab_parallel_token_logprobs"


def _partials(logits: torch.Tensor, temperature: float, compute_entropy: bool) -> torch.Tensor:
    """(N, C, 3) float32: (m, d, s) of each chunk of this shard's rows (C = 1 unless split)."""
    n_rows, n_cols = logits.shape
    split = split_config(logits)
    if split is not None:
        chunk_cols, chunks, block_n, num_warps = split.chunk_cols, split.chunks, split.block_n, split.num_warps
    else:
        cfg = _config(max(n_cols, 1))
        chunk_cols, chunks, block_n, num_warps = n_cols, 1, cfg.block_n, cfg.num_warps
    partials = torch.empty(n_rows, chunks, 3, dtype=torch.float32, device=logits.device)
    if n_rows and n_cols:
        launch_partials(logits, partials, temperature, compute_entropy, chunk_cols, block_n, num_warps, VP_FN)
    elif n_rows:  # a shard with no classes: nothing seen
        partials[..., 0] = float("-inf")
        partials[..., 1:] = 0.0
    return partials


token_logprobs_partials = torch.library.custom_op("softmax_gpu::token_logprobs_partials", _partials, mutates_args=())


@token_logprobs_partials.register_fake
def _(logits, temperature, compute_entropy):
    split = split_config(logits)
    chunks = split.chunks if split is not None else 1
    return logits.new_empty(logits.shape[0], chunks, 3, dtype=torch.float32)


def merge_partials(partials, logits, tokens, group, n_classes, col_start, temperature, ignore_index, compute_entropy):
    """(logprobs, entropy or an empty tensor, (m, log d) per row interleaved in (2 N,)), float32,
    of the full rows, from this shard's partials: the two all-reduces, then O(N) math.

    MAX of the row maxima; each rank moves its chunks' d and s to the global maximum M
    (d e^(m - M); e^(m - M) (s + (m - M) d)) and adds the token's z_t / T where it holds
    the token; SUM. A NaN on a shard makes its own factor NaN, so the SUM carries it to every
    rank whatever the backend's MAX does with NaN."""
    m, d, s = partials.unbind(-1)
    global_max = m.amax(1) if m.shape[1] else torch.full_like(m[:, 0], float("-inf"))
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    shift = m - global_max[:, None]
    scale = torch.where(m == float("-inf"), 0.0, torch.exp(shift))
    n_local = logits.shape[1]
    local = tokens.long() - col_start
    held = (local >= 0) & (local < n_local)
    if n_local:
        z_t = logits.gather(1, local.clamp(0, n_local - 1)[:, None])[:, 0].float() * (1.0 / temperature)
    else:
        z_t = torch.zeros_like(global_max)
    columns = [(d * scale).sum(1), torch.where(held, z_t, 0.0)]
    if compute_entropy:
        columns.append((scale * (s + torch.where(d == 0.0, 0.0, shift * d))).sum(1))
    packed = torch.stack(columns, 1)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    log_d = torch.log(packed[:, 0])
    counted = tokens != ignore_index
    in_range = (tokens >= 0) & (tokens < n_classes)
    logprobs = torch.where(counted, torch.where(in_range, packed[:, 1] - global_max - log_d, float("nan")), 0.0)
    if compute_entropy:
        entropy = log_d - packed[:, 2] / packed[:, 0]
        entropy = torch.where(counted, torch.where(in_range, entropy, float("nan")), 0.0)
    else:
        entropy = logprobs.new_empty(0)
    return logprobs, entropy, torch.stack([global_max, log_d], 1).reshape(-1)


class VocabParallelTokenLogprobsFunction(torch.autograd.Function):
    """Forward: partials of the shard, two all-reduces, O(N) math; saves the shard and O(N)
    floats. Backward: the shard's gradient from the global statistics, with whichever
    upstream gradients arrived; no communication (every rank gets the same upstream
    gradients: the outputs are replicated)."""

    @staticmethod
    def forward(ctx, logits, tokens, group, n_classes, col_start, temperature, ignore_index, compute_entropy):
        op = _partials if _plain_eager(logits) else token_logprobs_partials
        partials = op(logits, temperature, compute_entropy)
        logprobs, entropy, stats = merge_partials(partials, logits, tokens, group, n_classes, col_start, temperature,
                                                  ignore_index, compute_entropy)  # fmt: skip
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, tokens, stats, entropy)
        ctx.options = (temperature, ignore_index, col_start, n_classes)
        ctx.mark_non_differentiable(stats)
        return logprobs, entropy, stats

    @staticmethod
    @first_order(VP_FN)
    def backward(ctx, grad_logprobs, grad_entropy, _grad_stats):
        return (saved_logits_gradient(ctx, grad_logprobs, grad_entropy),) + (None,) * 7

