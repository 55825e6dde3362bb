"""Train a tiny decoder-only language model twice from the same initial weights: once with
its head as nn.Linear + F.cross_entropy, once with softmax_gpu.linear_cross_entropy (the
logits never stored), and compare the losses step by step.

    python examples/train_tiny_lm.py [--steps 20] [--batch 4] [--seq 32] [--vocab 1000] [--tol 1e-4]

The data is random but structured: each sequence follows a fixed random successor table
(token t is followed by succ[t] most of the time), so the loss falls well below log(V).
Runs on a CUDA GPU when there is one; otherwise on the CPU through Triton's interpreter
(slow: the defaults take one to two minutes there). Exits 1 if any step's losses differ by more
than --tol.
"""
import argparse
import copy
import os
import sys
import warnings

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # must be decided before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The interpreter evaluates masked-off lanes too (0 * -inf padding and the like) and NumPy
    # warns; compiled kernels discard those lanes (pyproject's pytest filter is the same).
    warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning, "triton.runtime.interpreter")

import softmax_gpu  # noqa: E402


class Block(torch.nn.Module):
    """Pre-norm transformer block: causal self-attention, then an MLP."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.attn = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))

    def forward(self, x):
        seq = x.shape[1]
        causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool, device=x.device), 1)
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyLM(torch.nn.Module):
    """Embedding, positions, two blocks, a final norm; the head's weight is `head`."""

    def __init__(self, vocab, dim, seq, heads=4, layers=2):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.pos = torch.nn.Parameter(0.02 * torch.randn(seq, dim))
        self.blocks = torch.nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)

    def hidden(self, tokens):
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)  # (batch, seq, dim)


def make_data(n_seqs, seq, vocab, generator):
    """Sequences that follow a random successor table 80% of the time (else a random token)."""
    succ = torch.randint(0, vocab, (vocab,), generator=generator)
    tokens = torch.empty(n_seqs, seq + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (n_seqs,), generator=generator)
    for i in range(1, seq + 1):
        follow = torch.rand(n_seqs, generator=generator) < 0.8
        tokens[:, i] = torch.where(follow, succ[tokens[:, i - 1]], torch.randint(0, vocab, (n_seqs,), generator=generator))
    return tokens[:, :-1], tokens[:, 1:]


def unfused_loss(model, tokens, targets):
    logits = model.head(model.hidden(tokens))  # (batch, seq, vocab): the tensor the fused loss never makes
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def fused_loss(model, tokens, targets):
    return softmax_gpu.linear_cross_entropy(model.hidden(tokens), model.head.weight, targets)  # (batch, seq, H) input


def train(model, loss_fn, inputs, targets, steps, batch, lr):
    """AdamW over fixed batches; returns the loss of every step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        start = (step * batch) % (len(inputs) - batch + 1)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, inputs[start : start + batch], targets[start : start + batch])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--tol", type=float, default=1e-4)
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":  # float32 products on both sides must be the same products
        torch.backends.cuda.matmul.allow_tf32 = False
    generator = torch.Generator().manual_seed(0)
    inputs, targets = make_data(max(256, args.batch), args.seq, args.vocab, generator)
    inputs, targets = inputs.to(device), targets.to(device)
    torch.manual_seed(0)
    model = TinyLM(args.vocab, args.dim, args.seq).to(device)
    twin = copy.deepcopy(model)

    theirs = train(model, unfused_loss, inputs, targets, args.steps, args.batch, args.lr)
    ours = train(twin, fused_loss, inputs, targets, args.steps, args.batch, args.lr)

    worst = max(abs(a - b) for a, b in zip(ours, theirs))
    every = max(1, args.steps // 10)
    print(f"device: {device}; {args.steps} steps of {args.batch} x {args.seq} tokens, vocabulary {args.vocab}")
    print(f"{'step':>6} {'linear_cross_entropy':>21} {'linear + F.cross_entropy':>25} {'|diff|':>10}")
    for step in list(range(0, args.steps, every)) + [args.steps - 1]:
        print(f"{step:>6} {ours[step]:>21.6f} {theirs[step]:>25.6f} {abs(ours[step] - theirs[step]):>10.2e}")
    print(f"largest per-step difference: {worst:.3e} (tolerance {args.tol:g})")
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
