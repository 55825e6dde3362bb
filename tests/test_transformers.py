"""softmax_gpu.transformers: one line patches a Hugging Face causal LM onto linear_cross_entropy.

Tiny causal LMs built from their config classes with random weights (nothing is downloaded),
float32 on CPU (the Triton interpreter): the patched model's loss and every parameter's
gradient against the unpatched model's own, with padding labels, with the Trainer's
num_items_in_batch, with logits_to_keep and shift_labels; no (tokens x vocabulary) tensor;
revert(); and the guards (unsupported classes, versions, other instances untouched).
"""
import copy
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import softmax_gpu.transformers as sgt  # noqa: E402

from test_linear_cross_entropy import largest_allocation  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 101  # odd on purpose: no power-of-two rows


def _decoder(**extra):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    common.update(extra)
    return common


# class name -> config kwargs; the tied-embedding cases are GPT-2 (always tied), Gemma and
# Gemma 2 (tied by default) and a tied Qwen2.
FAMILIES = {
    "LlamaForCausalLM": ("LlamaConfig", _decoder()),
    "MistralForCausalLM": ("MistralConfig", _decoder(sliding_window=None)),
    "Qwen2ForCausalLM": ("Qwen2Config", _decoder(tie_word_embeddings=True)),
    "Qwen3ForCausalLM": ("Qwen3Config", _decoder(head_dim=8)),
    "GemmaForCausalLM": ("GemmaConfig", _decoder(head_dim=8)),
    "Gemma2ForCausalLM": ("Gemma2Config", _decoder(head_dim=8, final_logit_softcapping=2.0, attn_logit_softcapping=None)),
    "Phi3ForCausalLM": ("Phi3Config", _decoder(pad_token_id=0)),
    "GPT2LMHeadModel": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                          bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                          attn_pdrop=0.0)),
}


def tiny(name, **overrides):
    config_name, kwargs = FAMILIES[name]
    config = getattr(transformers, config_name)(**{**kwargs, **overrides})
    config._attn_implementation = "eager"
    model = getattr(transformers, name)(config)
    with torch.no_grad():  # Gemma-style zero-initialised norms would hide half the model
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.train()


def batch(b=2, s=12, pad=True):
    ids = torch.randint(0, VOCAB, (b, s))
    labels = ids.clone()
    if pad:
        labels[0, :4] = -100  # a prompt that is not trained on
        labels[1, -3:] = -100  # padding at the end
    return ids, labels


def attention_mask(labels):
    """1 except the right padding of batch(): what a collator sends with it."""
    mask = torch.ones_like(labels)
    mask[1, -3:] = 0
    return mask


def assert_same_training_step(patched, ref, **call):
    ours, theirs = patched(**call), ref(**call)
    assert ours.logits is None and theirs.logits is not None
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-6)
    ours.loss.backward()
    theirs.loss.backward()
    for (name, p), q in zip(patched.named_parameters(), ref.parameters()):
        assert p.grad is not None, name
        scale = q.grad.abs().max().clamp_min(1e-12)
        assert ((p.grad - q.grad).abs().max() / scale) < 2e-5, name


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_loss_and_every_gradient_match_the_unpatched_model(name):
    """Padding and prompt labels (-100) with the attention mask, the label shift, soft cap
    (Gemma 2), tied embeddings; then a batch with no ignored label."""
    ref = tiny(name)
    patched = sgt.apply(copy.deepcopy(ref))
    ids, labels = batch()
    assert_same_training_step(patched, ref, input_ids=ids, labels=labels, attention_mask=attention_mask(labels))
    for model in (patched, ref):
        model.zero_grad()
    ids, labels = batch(pad=False)
    assert_same_training_step(patched, ref, input_ids=ids, labels=labels)


@pytest.mark.parametrize("name", ["LlamaForCausalLM", "Gemma2ForCausalLM"])
def test_num_items_in_batch_logits_to_keep_and_shift_labels(name):
    """The Trainer's gradient-accumulation normalisation (a tensor and an int), the last k
    positions only, and labels already shifted by the caller: each as the model's own loss."""
    ref = tiny(name)
    patched = sgt.apply(copy.deepcopy(ref))
    ids, labels = batch()
    assert_same_training_step(patched, ref, input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(37))
    for model in (patched, ref):
        model.zero_grad()
    assert_same_training_step(patched, ref, input_ids=ids, labels=labels[:, -5:], logits_to_keep=5,
                              num_items_in_batch=11)  # fmt: skip
    for model in (patched, ref):
        model.zero_grad()
    shifted = torch.roll(labels, -1, dims=1)
    assert_same_training_step(patched, ref, input_ids=ids, labels=labels, shift_labels=shifted)


def test_options_reach_the_loss_and_tuples_keep_their_positions():
    """apply()'s z_loss and label_smoothing are linear_cross_entropy's; return_dict=False
    gives (loss, logits, cache) as the unpatched model does, the logits' slot holding an
    empty (batch, 0, V) tensor."""
    ref = tiny("LlamaForCausalLM")
    patched = sgt.apply(copy.deepcopy(ref), z_loss=1e-2, label_smoothing=0.1)
    ids, labels = batch()
    ours = patched(input_ids=ids, labels=labels, return_dict=False)
    theirs = ref(input_ids=ids, labels=labels, return_dict=False)
    hidden = ref.model(input_ids=ids).last_hidden_state[:, :-1]
    expected = softmax_gpu_ce(ref.lm_head(hidden), labels[:, 1:], z_loss=1e-2, label_smoothing=0.1)
    assert isinstance(ours, tuple) and len(ours) == len(theirs) and ours[0].ndim == 0
    torch.testing.assert_close(ours[0], expected, rtol=1e-5, atol=1e-6)
    assert ours[1].shape == (2, 0, VOCAB) and type(ours[2]) is type(theirs[2])


def softmax_gpu_ce(logits, labels, **options):
    import softmax_gpu

    return softmax_gpu.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), **options)


def test_autocast_runs_the_products_in_its_dtype():
    """Under bfloat16 autocast (the Trainer's bf16=True) the fused loss takes the LM head in
    bfloat16, as nn.Linear does there: float32 loss and gradients close to the model's own."""
    ref = tiny("Qwen3ForCausalLM")
    patched = sgt.apply(copy.deepcopy(ref))
    ids, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = patched(input_ids=ids, labels=labels), ref(input_ids=ids, labels=labels)
    assert ours.loss.dtype == theirs.loss.dtype == torch.float32
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-3, atol=1e-4)
    ours.loss.backward()
    theirs.loss.backward()
    for (name, p), q in zip(patched.named_parameters(), ref.parameters()):
        assert p.grad.dtype == torch.float32 and ((p.grad - q.grad).abs().max() / q.grad.abs().max()) < 1e-2, name


def test_no_tokens_by_vocabulary_tensor():
    """Forward + backward of the patched model allocate nothing of tokens x vocabulary (with a
    linear_cross_entropy buffer of a quarter of it); the unpatched model, measured the same
    way, allocates its float32 logits."""
    vocab, b, s = 4096, 2, 64
    ref = tiny("LlamaForCausalLM", vocab_size=vocab)
    logits_bytes = b * s * vocab * 4
    patched = sgt.apply(copy.deepcopy(ref), buffer_bytes=logits_bytes // 4)
    ids = torch.randint(0, vocab, (b, s))

    def step(model):
        return lambda: model(input_ids=ids, labels=ids).loss.backward()

    embedding_bytes = vocab * 32 * 4  # the largest parameter, and its gradient
    assert largest_allocation(step(patched)) <= max(logits_bytes // 4, embedding_bytes)
    assert largest_allocation(step(ref)) >= logits_bytes


def test_calls_without_labels_or_asking_for_logits_run_unpatched():
    ref = tiny("Qwen3ForCausalLM")
    patched = sgt.apply(copy.deepcopy(ref))
    ids, labels = batch()
    torch.testing.assert_close(patched(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=0)
    greedy = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(patched.generate(ids[:, :5], **greedy), ref.generate(ids[:, :5], **greedy))
    asked = patched(input_ids=ids, labels=labels, return_logits=True)
    torch.testing.assert_close(asked.logits, ref(input_ids=ids).logits, rtol=0, atol=0)
    patched.eval()
    assert patched(input_ids=ids, labels=labels).logits is not None  # eval_logits=True: for compute_metrics
    assert patched(input_ids=ids, labels=labels, return_logits=False).logits is None
    sgt.apply(patched, eval_logits=False)
    fused = patched(input_ids=ids, labels=labels)
    assert fused.logits is None
    torch.testing.assert_close(fused.loss, ref.eval()(input_ids=ids, labels=labels).loss, rtol=1e-5, atol=1e-6)


def test_revert_apply_twice_and_other_instances():
    """The patch is on one instance: apply twice wraps once, revert restores the class's
    forward and the unpatched outputs, and another instance of the class never changes."""
    model, other = tiny("LlamaForCausalLM"), tiny("LlamaForCausalLM")
    ids, labels = batch()
    before = model(input_ids=ids, labels=labels)
    sgt.apply(model)
    sgt.apply(model, z_loss=1e-3)
    assert sgt.is_applied(model) and not sgt.is_applied(other) and type(other) is transformers.LlamaForCausalLM
    assert type(model).__mro__[1] is transformers.LlamaForCausalLM  # one subclass, not two
    assert type(model).__name__ == "LlamaForCausalLM" and "forward" not in model.__dict__
    assert model(input_ids=ids, labels=labels).logits is None
    assert other(input_ids=ids, labels=labels).logits is not None
    assert sgt.revert(model) is model and not sgt.is_applied(model) and type(model) is transformers.LlamaForCausalLM
    assert not model.lm_head._forward_pre_hooks
    after = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(after.logits, before.logits, rtol=0, atol=0)
    torch.testing.assert_close(after.loss, before.loss, rtol=0, atol=0)
    sgt.revert(model)  # harmless when not patched


def test_a_deep_copy_runs_on_its_own_weights():
    """copy.deepcopy of a patched model (how TRL makes a reference model) is patched too, and
    its forward is the copy's, not the original's."""
    ref = tiny("LlamaForCausalLM")
    patched = sgt.apply(copy.deepcopy(ref))
    twin = copy.deepcopy(patched)
    with torch.no_grad():
        patched.lm_head.weight.mul_(3.0)
        patched.model.norm.weight.mul_(2.0)
    ids, labels = batch()
    assert sgt.is_applied(twin)
    twin_out = twin(input_ids=ids, labels=labels)
    assert twin_out.logits is None
    torch.testing.assert_close(twin_out.loss, ref(input_ids=ids, labels=labels).loss, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(patched(input_ids=ids, labels=labels).loss, twin_out.loss)


def test_refuses_what_it_cannot_patch_correctly(monkeypatch):
    """Other architectures, look-alike classes, a custom loss function, and a head wrapped or
    hooked after apply(): errors, never a loss that skips part of the model."""
    moe = transformers.MixtralForCausalLM(transformers.MixtralConfig(**_decoder(num_local_experts=2)))
    with pytest.raises(TypeError, match=r"MixtralForCausalLM is not supported; supported .*LlamaForCausalLM"):
        sgt.apply(moe)
    assert not sgt.is_applied(moe)

    class LlamaForCausalLM(transformers.LlamaForCausalLM):  # e.g. remote code that scales its logits
        pass

    with pytest.raises(TypeError, match="is not supported"):
        sgt.apply(LlamaForCausalLM(transformers.LlamaConfig(**_decoder())))
    ids, labels = batch()
    custom = tiny("LlamaForCausalLM")
    custom.loss_function = lambda logits, labels, vocab_size, **kw: 2 * torch.ones(())
    with pytest.raises(TypeError, match="not transformers' ForCausalLMLoss"):
        sgt.apply(custom)
    model = sgt.apply(tiny("LlamaForCausalLM"))
    model.loss_function = lambda logits, labels, vocab_size, **kw: 2 * torch.ones(())
    with pytest.raises(TypeError, match="not transformers' ForCausalLMLoss"):
        model(input_ids=ids, labels=labels)
    model = sgt.apply(tiny("LlamaForCausalLM"))
    handle = model.lm_head.register_forward_hook(lambda module, args, out: out * 2)
    with pytest.raises(RuntimeError, match="forward hooks or an instance-level forward"):
        model(input_ids=ids, labels=labels)
    handle.remove()
    head = model.lm_head
    model.lm_head = type("LoraLinear", (torch.nn.Linear,), {})(32, VOCAB, bias=False)
    with pytest.raises(RuntimeError, match="not a torch.nn.Linear"):
        model(input_ids=ids, labels=labels)
    model.lm_head = head
    assert model(input_ids=ids, labels=labels).logits is None  # and nothing was left half-patched
    assert model(input_ids=ids).logits.shape == (2, 12, VOCAB)
    model = tiny("LlamaForCausalLM")
    with pytest.raises(ValueError, match="mode must be one of"):
        sgt.apply(model, mode="fast")
    with pytest.raises(ValueError, match="label_smoothing must be between"):
        sgt.apply(model, label_smoothing=2.0)
    # sys.modules' entry: building a model can leave another module object there
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.57.1")
    with pytest.raises(RuntimeError, match=r"transformers 4.57.1 is not supported .*>= 5.0, < 6.0"):
        sgt.apply(model)
    assert not sgt.is_applied(model)


def test_compile_checkpointing_and_pickling():
    """torch.compile of the patched model, gradient checkpointing (the decoder's forward runs
    again in the backward), and torch.save of the whole model (it loads as the transformers
    class, unpatched, with the same weights)."""
    import io

    ref = tiny("Qwen2ForCausalLM")
    patched = sgt.apply(copy.deepcopy(ref))
    ids, labels = batch()
    buffer = io.BytesIO()
    torch.save(patched, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is transformers.Qwen2ForCausalLM and sgt.is_applied(patched)
    torch.testing.assert_close(loaded(input_ids=ids, labels=labels).loss, ref(input_ids=ids, labels=labels).loss)
    compiled = torch.compile(patched, backend="eager")
    assert_same_training_step(compiled, ref, input_ids=ids, labels=labels)
    for model in (patched, ref):
        model.zero_grad()
        with warnings.catch_warnings():  # renamed activation_checkpointing_enable in later 5.x
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert_same_training_step(patched, ref, input_ids=ids, labels=labels)


def test_trainer_bf16_then_revert(tmp_path):
    """After a bfloat16 Trainer run (accelerate wraps model.forward for autocast), the model
    is still patched, revert() still undoes it, and the wrapper then runs unpatched."""
    model = sgt.apply(tiny("LlamaForCausalLM"))
    ids, labels = batch(b=4)
    data = [{"input_ids": i, "labels": l} for i, l in zip(ids, labels)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4,
                                          bf16=True, use_cpu=True, report_to=[], save_strategy="no",
                                          disable_tqdm=True)  # fmt: skip
    transformers.Trainer(model=model, args=args, train_dataset=data).train()
    assert sgt.is_applied(model) and model(input_ids=ids, labels=labels).logits is None
    sgt.revert(model)
    assert model(input_ids=ids, labels=labels).logits.shape == (4, 12, VOCAB)


def test_the_kernels_folder_never_shadows_pypi_kernels():
    """Run from the repository root (as `python -m pytest` runs), `kernels` is PyPI's package
    (transformers imports it) or nothing, never our device-code folder, which still imports
    as softmax_gpu.kernels."""
    assert not (ROOT / "kernels" / "__init__.py").exists()
    code = ("import importlib.util, softmax_gpu.kernels.softmax as k; s = importlib.util.find_spec('kernels'); "
            "print(s is not None and s.origin is not None and s.origin); "
            "print(s is not None and list(s.submodule_search_locations or [])); print(k.__file__)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    origin, locations, softmax_file = out.stdout.split("\n")[:3]
    ours = str(ROOT / "kernels")
    assert not origin.startswith(ours), origin  # not a regular package of ours
    if origin == "False":  # no installed `kernels`: a namespace at most, which transformers skips
        assert "__init__" not in locations
    assert Path(softmax_file).name == "softmax.py"


def test_importing_softmax_gpu_never_imports_transformers():
    code = ("import sys, softmax_gpu, softmax_gpu.nn, softmax_gpu.distributed; softmax_gpu.linear_cross_entropy; "
            "sys.exit('transformers' in sys.modules)")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120).returncode == 0


def test_hf_trainer_example_runs_tiny():
    """examples/hf_trainer.py at a tiny size: both runs train, and their loss curves agree."""
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "hf_trainer.py"), "--steps", "3", "--seq", "16",
                          "--vocab", "128"], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "largest difference" in out.stdout
    fused, calls = map(int, re.search(r"fused calls: (\d+) of (\d+)", out.stdout).groups())
    assert fused == calls >= 3  # the patched run really took the fused loss, every step
