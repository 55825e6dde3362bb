"""A tiny Llama-style model trained with transformers.Trainer, twice from the same weights:
once as is, once after the one line `softmax_gpu.transformers.apply(model)`. Both loss
curves are printed side by side, with the peak memory of a training step on a GPU.

    python examples/hf_trainer.py [--steps 8] [--batch 4] [--accumulate 2] [--seq 64]
                                  [--vocab 1024] [--hidden 64] [--tol 1e-4]

The data is synthetic: sequences that repeat one of four short motifs (so the loss falls),
right-padded to --seq with the padding's labels at -100, and the first few tokens of each
sequence masked as a prompt. Gradient accumulation (--accumulate) makes the Trainer pass
num_items_in_batch to the model, which the patched loss honours. Runs on a CUDA GPU when
there is one, otherwise on the CPU through Triton's interpreter (the defaults take about
25 seconds there). Needs `pip install "softmax-gpu[transformers]"`. Exits 1 if any logged
loss differs by more than --tol (relative).
"""
import argparse
import copy
import os
import sys
import tempfile
import warnings

import torch

if not torch.cuda.is_available():  # must be decided before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
    warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning, "triton.runtime.interpreter")

import transformers  # noqa: E402

import softmax_gpu.transformers  # noqa: E402

IGNORE = -100


class MotifData(torch.utils.data.Dataset):
    """Right-padded sequences, each repeating one of a few motifs; labels -100 on the prompt
    and the padding."""

    def __init__(self, n, seq, vocab, seed=0, motifs=4):
        g = torch.Generator().manual_seed(seed)
        pool = [torch.randint(1, vocab, (int(torch.randint(3, 8, (), generator=g)),), generator=g)
                for _ in range(motifs)]  # fmt: skip
        self.items = []
        for _ in range(n):
            length = int(torch.randint(seq // 2, seq + 1, (), generator=g))
            motif = pool[int(torch.randint(0, motifs, (), generator=g))]
            ids = motif.repeat(seq // len(motif) + 1)[:seq].clone()
            mask = torch.zeros(seq, dtype=torch.long)
            mask[:length] = 1
            ids[length:] = 0  # the pad token
            labels = ids.masked_fill(mask == 0, IGNORE)
            labels[:4] = IGNORE  # the prompt is not trained on
            self.items.append({"input_ids": ids, "attention_mask": mask, "labels": labels})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def make_model(args):
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    return transformers.LlamaForCausalLM(config)


def train(model, data, args, out_dir):
    training_args = transformers.TrainingArguments(
        output_dir=out_dir, max_steps=args.steps, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.accumulate, learning_rate=1e-2, lr_scheduler_type="constant",
        logging_steps=1, save_strategy="no", report_to=[], seed=args.seed, disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=training_args, train_dataset=data)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def step_peak_bytes(model, data, args):
    """Peak CUDA memory above what was allocated before, for one forward + backward."""
    if not torch.cuda.is_available():
        return None
    model = model.cuda().train()
    batch = {k: torch.stack([data[i][k] for i in range(args.batch)]).cuda() for k in data[0]}
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model(**batch).loss.backward()
    torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    return torch.cuda.max_memory_allocated() - base


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--accumulate", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tol", type=float, default=1e-4)
    args = parser.parse_args(argv)

    data = MotifData(args.steps * args.batch * args.accumulate, args.seq, args.vocab, args.seed)
    plain = make_model(args)
    patched = softmax_gpu.transformers.apply(copy.deepcopy(plain))  # the one line
    peaks = [step_peak_bytes(m, data, args) for m in (plain, patched)]
    fused = []  # per call of the patched model: did it take the fused loss (no logits)?
    patched.register_forward_hook(lambda module, inputs, outputs: fused.append(outputs.logits is None))
    with tempfile.TemporaryDirectory() as out_dir:
        curves = [train(m, data, args, out_dir) for m in (plain, patched)]

    print(f"{'step':>4}  {'transformers':>12}  {'softmax_gpu':>12}")
    for i, (a, b) in enumerate(zip(*curves), 1):
        print(f"{i:>4}  {a:>12.6f}  {b:>12.6f}")
    if peaks[0] is not None:
        tokens = args.batch * args.seq
        print(f"peak memory of a training step above the model ({tokens} tokens x {args.vocab} classes, "
              f"{torch.cuda.get_device_name()}): transformers {peaks[0] / 2**20:.1f} MiB, "
              f"softmax_gpu {peaks[1] / 2**20:.1f} MiB")  # fmt: skip
    else:
        print("peak memory: measured on a CUDA GPU only (this run is on the CPU)")
    print(f"fused calls: {sum(fused)} of {len(fused)} calls of the patched model")
    worst = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(*curves))
    print(f"largest difference between the curves: {worst:.2e} (relative; tolerance {args.tol:g})")
    if len(curves[0]) != args.steps or len(curves[1]) != args.steps:
        print(f"expected {args.steps} logged losses, got {len(curves[0])} and {len(curves[1])}")
        return 1
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
