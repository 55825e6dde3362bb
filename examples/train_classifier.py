"""Train a small classifier twice from the same initial weights, once with
softmax_gpu.nn.CrossEntropyLoss and once with torch.nn.CrossEntropyLoss, and compare the
loss curves step by step.

    python examples/train_classifier.py [--steps 300] [--batch 64] [--tol 1e-5]

Runs on a CUDA GPU when there is one; otherwise on the CPU through Triton's interpreter
(slow, so keep --steps small there). Exits 1 if any step's losses differ by more than --tol.
"""
import argparse
import copy
import os
import sys
import warnings

import torch

if not torch.cuda.is_available():  # must be decided before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The interpreter evaluates masked-off lanes too (0 * -inf padding and the like) and NumPy
    # warns; compiled kernels discard those lanes (pyproject's pytest filter is the same).
    warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning, "triton.runtime.interpreter")

import softmax_gpu  # noqa: E402


def make_data(n_samples, n_features, n_classes, generator):
    """Gaussian clusters, one per class, with overlap so the loss does not reach zero."""
    centers = 0.4 * torch.randn(n_classes, n_features, generator=generator)
    labels = torch.randint(0, n_classes, (n_samples,), generator=generator)
    features = centers[labels] + torch.randn(n_samples, n_features, generator=generator)
    return features, labels


def train(model, loss_fn, features, labels, steps, batch, lr):
    """Plain SGD over fixed batches; returns the loss of every step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for step in range(steps):
        start = (step * batch) % (len(features) - batch + 1)
        x, y = features[start : start + batch], labels[start : start + batch]
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--tol", type=float, default=1e-5)
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator().manual_seed(0)
    features, labels = make_data(4096, args.features, args.classes, generator)
    features, labels = features.to(device), labels.to(device)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(args.features, 64), torch.nn.ReLU(), torch.nn.Linear(64, args.classes)
    ).to(device)
    twin = copy.deepcopy(model)

    ours = train(model, softmax_gpu.nn.CrossEntropyLoss(), features, labels, args.steps, args.batch, args.lr)
    theirs = train(twin, torch.nn.CrossEntropyLoss(), features, labels, args.steps, args.batch, args.lr)

    worst = max(abs(a - b) for a, b in zip(ours, theirs))
    every = max(1, args.steps // 10)
    print(f"device: {device}; {args.steps} steps of batch {args.batch}, {args.classes} classes")
    print(f"{'step':>6} {'softmax_gpu':>14} {'torch':>14} {'|diff|':>10}")
    for step in list(range(0, args.steps, every)) + [args.steps - 1]:
        print(f"{step:>6} {ours[step]:>14.8f} {theirs[step]:>14.8f} {abs(ours[step] - theirs[step]):>10.2e}")
    print(f"largest per-step difference: {worst:.3e} (tolerance {args.tol:g})")
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
