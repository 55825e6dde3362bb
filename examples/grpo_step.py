"""A few GRPO-style policy updates of a tiny language model, run twice from the same weights:
once with torch ops (log_softmax over the full logits, gather, the entropy of the softmax),
once with softmax_gpu.linear_token_logprobs (the policy's logits never stored) and
softmax_gpu.token_logprobs (the frozen reference's). The per-step losses are compared.

    python examples/grpo_step.py [--steps 4] [--groups 2] [--group-size 4] [--seq 16] [--vocab 500]
                                 [--temperature 0.8] [--tol 1e-4]

Each step: for each prompt token, a group of completions sampled at the temperature (from the
initial policy, drawn once before training so both runs see the same tokens: a rollout
buffer, where a live trainer samples from the current policy); a made-up reward (how many tokens are even); group-normalised advantages;
then the clipped policy-ratio objective against the log-probabilities at sampling time, a
KL penalty to a frozen reference (the k3 estimator) and an entropy bonus, all per token,
masked past the completion. Runs on a CUDA GPU when there is one, otherwise on the CPU
through Triton's interpreter (the defaults take well under two minutes there). Exits 1 if
any step's losses differ by more than --tol.
"""
import argparse
import copy
import os
import sys
import warnings

import torch

if not torch.cuda.is_available():  # must be decided before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
    warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning, "triton.runtime.interpreter")
    warnings.filterwarnings("ignore", "divide by zero", RuntimeWarning, "triton.runtime.interpreter")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import softmax_gpu  # noqa: E402
from train_tiny_lm import TinyLM  # noqa: E402

IGNORE = -100
CLIP, KL_COEF, ENTROPY_COEF = 0.2, 0.05, 0.01


def torch_logprobs(model, tokens, targets, temperature):
    """The usual trainer code: the full logits, log_softmax at the temperature, gather, entropy."""
    logits = model.head(model.hidden(tokens)).float() / temperature
    logp = torch.log_softmax(logits, -1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return picked, entropy


def fused_logprobs(model, tokens, targets, temperature):
    return softmax_gpu.linear_token_logprobs(model.hidden(tokens), model.head.weight, targets,
                                             temperature=temperature, ignore_index=IGNORE, return_entropy=True)


def reference_logprobs(model, tokens, targets, temperature, fused):
    """The frozen reference's log-probabilities (no gradient)."""
    with torch.no_grad():
        if fused:
            return softmax_gpu.token_logprobs(model.head(model.hidden(tokens)), targets, temperature=temperature,
                                              ignore_index=IGNORE)
        return torch_logprobs(model, tokens, targets, temperature)[0]


def sample(policy, prompts, group_size, seq, temperature, generator):
    """Completions of length seq - 1 after each prompt token, group_size per prompt."""
    tokens = prompts.repeat_interleave(group_size)[:, None]
    with torch.no_grad():
        for _ in range(seq - 1):
            logits = policy.head(policy.hidden(tokens))[:, -1].float() / temperature
            probs = torch.softmax(logits, -1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(tokens.device)
            tokens = torch.cat([tokens, nxt], 1)
    return tokens


def grpo_loss(policy, reference, tokens, old_logp, advantages, mask, temperature, fused):
    inputs, targets = tokens[:, :-1], torch.where(mask, tokens[:, 1:], IGNORE)
    if fused:
        logp, entropy = fused_logprobs(policy, inputs, targets, temperature)
    else:
        logp, entropy = torch_logprobs(policy, inputs, targets, temperature)
    ref_logp = reference_logprobs(reference, inputs, targets, temperature, fused)
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.minimum(ratio * advantages[:, None], ratio.clamp(1 - CLIP, 1 + CLIP) * advantages[:, None])
    kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
    per_token = -surrogate + KL_COEF * kl - ENTROPY_COEF * entropy
    return (per_token * mask).sum() / mask.sum()


def rollouts(policy, args, device):
    """Every step's sampled groups, drawn once from the initial policy."""
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(args.steps):
        prompts = torch.randint(0, args.vocab, (args.groups,), generator=generator).to(device)
        batches.append(sample(policy, prompts, args.group_size, args.seq, args.temperature, generator))
    return batches


def train(policy, reference, batches, args, fused, device):
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-3)
    losses = []
    for tokens in batches:
        rewards = (tokens[:, 1:] % 2 == 0).float().sum(1)
        grouped = rewards.view(args.groups, args.group_size)
        advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)
        mask = torch.ones(tokens.shape[0], args.seq - 1, dtype=torch.bool, device=device)
        mask[: args.group_size, -2:] = False  # a completion that ended early: its last positions are padding
        with torch.no_grad():  # the log-probabilities at sampling time (the same weights here)
            targets = torch.where(mask, tokens[:, 1:], IGNORE)
            old = (fused_logprobs if fused else torch_logprobs)(policy, tokens[:, :-1], targets, args.temperature)[0]
        loss = grpo_loss(policy, reference, tokens, old, advantages, mask, args.temperature, fused)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--vocab", type=int, default=500)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--tol", type=float, default=1e-4)
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    policy = TinyLM(args.vocab, args.dim, args.seq).to(device)
    reference = copy.deepcopy(policy).requires_grad_(False)
    batches = rollouts(policy, args, device)
    results = {fused: train(copy.deepcopy(policy), reference, batches, args, fused, device) for fused in (False, True)}
    print(f"{'step':>5} {'torch ops':>12} {'softmax_gpu':>12} {'|diff|':>10}")
    worst = 0.0
    for i, (a, b) in enumerate(zip(results[False], results[True])):
        worst = max(worst, abs(a - b))
        print(f"{i:>5} {a:>12.6f} {b:>12.6f} {abs(a - b):>10.2e}")
    print(f"largest difference {worst:.2e} (tolerance {args.tol:g})")
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
