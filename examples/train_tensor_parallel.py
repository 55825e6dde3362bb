"""Train a tiny language model whose output layer is sharded by vocabulary across the ranks,
with softmax_gpu.distributed.vocab_parallel_cross_entropy, and compare every step's loss
with the same model trained in one process with softmax_gpu.cross_entropy.

    torchrun --nproc-per-node 2 examples/train_tensor_parallel.py [--steps 20] [--batch 4]
        [--seq 16] [--vocab 96] [--hidden 32] [--tol 1e-4]

On CUDA each rank takes one GPU and talks NCCL; otherwise the ranks talk gloo on the CPU and
the kernels run in Triton's interpreter (slow, so keep the sizes tiny there). Rank 0 prints
the two loss curves and the process exits 1 if any step's losses differ by more than --tol.

The model: token embedding -> one pre-norm MLP block -> output layer. Every rank holds the
embedding and the block (replicated) and only its rows of the output layer's weight
(classes [start, stop)), so it computes only its slice of the logits. The loss needs no
gathered logits; the one collective a step adds outside the loss is the all-reduce of the
gradient at the output layer's input (each rank's slice contributes a part of it), which
also keeps the replicated weights identical on every rank.
"""
import argparse
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

if not torch.cuda.is_available():  # must be decided before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The interpreter evaluates masked-off lanes too (0 * -inf padding and the like) and NumPy
    # warns; compiled kernels discard those lanes (pyproject's pytest filter is the same).
    warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning, "triton.runtime.interpreter")

import softmax_gpu  # noqa: E402
from softmax_gpu.distributed import vocab_parallel_cross_entropy  # noqa: E402


class SumGradAcrossRanks(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over the group. Put in front of a
    vocabulary-sharded layer: each rank's shard gives only its part of d loss / d input."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class TinyLM(torch.nn.Module):
    """Embedding, one pre-norm MLP block with a residual, and an output layer over the rows
    [start, stop) of the vocabulary (all of it when not sharded)."""

    def __init__(self, vocab, hidden, start=0, stop=None):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.norm = torch.nn.LayerNorm(hidden)
        self.up = torch.nn.Linear(hidden, 4 * hidden)
        self.down = torch.nn.Linear(4 * hidden, hidden)
        self.final_norm = torch.nn.LayerNorm(hidden)
        full = torch.nn.init.normal_(torch.empty(vocab, hidden), std=hidden**-0.5)  # same draw on every rank
        self.out_weight = torch.nn.Parameter(full[start:stop].clone())
        self.sharded = stop is not None and (start, stop) != (0, vocab)

    def forward(self, tokens, group=None):
        h = self.embed(tokens)
        h = h + self.down(F.gelu(self.up(self.norm(h))))
        h = self.final_norm(h).reshape(-1, h.shape[-1])
        if self.sharded:
            h = SumGradAcrossRanks.apply(h, group)
        return F.linear(h, self.out_weight)  # (batch * seq, this rank's classes)


def make_batches(steps, batch, seq, vocab, generator):
    """Token sequences from a fixed random Markov chain (a few likely successors per token),
    so there is something to learn; the same on every rank."""
    successors = torch.randint(0, vocab, (vocab, 4), generator=generator)
    batches = []
    for _ in range(steps):
        tokens = torch.empty(batch, seq + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, vocab, (batch,), generator=generator)
        for i in range(seq):
            pick = torch.randint(0, 4, (batch,), generator=generator)
            tokens[:, i + 1] = successors[tokens[:, i], pick]
        batches.append(tokens)
    return batches


def train(model, loss_fn, batches, device, lr):
    """Plain SGD with momentum; returns every step's loss."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for tokens in batches:
        tokens = tokens.to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, tokens[:, :-1], tokens[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def shard_bounds(vocab, world, rank):
    """Contiguous shards whose sizes differ by at most one (uneven when world does not divide vocab)."""
    base, extra = divmod(vocab, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=96)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--z-loss", type=float, default=1e-4)
    parser.add_argument("--tol", type=float, default=1e-4)
    args = parser.parse_args(argv)

    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    start, stop = shard_bounds(args.vocab, world, rank)
    options = dict(label_smoothing=args.label_smoothing, z_loss=args.z_loss)
    batches = make_batches(args.steps, args.batch, args.seq, args.vocab, torch.Generator().manual_seed(0))

    def sharded_loss(model, inputs, target):
        return vocab_parallel_cross_entropy(model(inputs), target, vocab_start=start, **options)

    torch.manual_seed(0)
    model = TinyLM(args.vocab, args.hidden, start, stop).to(device)
    ours = train(model, sharded_loss, batches, device, args.lr)

    status = 0
    if rank == 0:  # the same model, whole, in this one process
        def full_loss(model, inputs, target):
            return softmax_gpu.cross_entropy(model(inputs), target, **options)

        torch.manual_seed(0)
        whole = TinyLM(args.vocab, args.hidden).to(device)
        theirs = train(whole, full_loss, batches, device, args.lr)
        worst = max(abs(a - b) for a, b in zip(ours, theirs))
        every = max(1, args.steps // 10)
        print(f"device: {device}, {world} ranks; vocab {args.vocab} sharded {[shard_bounds(args.vocab, world, r) for r in range(world)]}")
        print(f"{'step':>6} {'vocab-parallel':>16} {'one process':>14} {'|diff|':>10}")
        for step in sorted(set(range(0, args.steps, every)) | {args.steps - 1}):
            print(f"{step:>6} {ours[step]:>16.8f} {theirs[step]:>14.8f} {abs(ours[step] - theirs[step]):>10.2e}")
        print(f"largest per-step difference: {worst:.3e} (tolerance {args.tol:g})")
        status = 0 if worst <= args.tol else 1
    dist.barrier()  # every rank past its last collective
    return status


if __name__ == "__main__":
    code = main()
    # Out without tearing gloo down: a rank's destroy_process_group() or interpreter exit while
    # a peer's gloo threads still talk to it aborts now and then ("terminate called without an
    # active exception", SIGABRT) after everything has passed; the barrier's sends are done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
