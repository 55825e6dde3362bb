"""Hugging Face causal language models on softmax_gpu.linear_cross_entropy, in one line.

    model = AutoModelForCausalLM.from_pretrained(...)
    softmax_gpu.transformers.apply(model)        # before Trainer(model=model, ...)

After apply(), a call with ``labels`` computes the loss from the final hidden states and the
LM head's weight (and bias, and Gemma 2's final logit soft cap) with
:func:`softmax_gpu.linear_cross_entropy`: the (tokens x vocabulary) logits, usually the
largest tensor of a training step, are never formed, and the output's ``logits`` is None.
Everything else is the model's own code: the decoder, ``logits_to_keep``, the label shift,
``ignore_index``, ``shift_labels`` and the Trainer's ``num_items_in_batch`` (sum over
tokens / items in the whole accumulated batch) mean what they mean without the patch.
Calls without labels, and calls that ask for logits (``return_logits=True``, or any call
in eval mode unless ``apply(..., eval_logits=False)``), run the unpatched forward.

How: apply() sets ``forward`` on that one model instance (not its class, not other
instances). For a fused call the wrapper runs the model's forward with ``labels=None`` while
the LM head, for that call only, hands back its input instead of the logits (an empty
(..., 0) tensor goes on in their place); the loss is then formed from that input exactly as
the model's ``ForCausalLMLoss`` forms it from the logits. So nothing of an architecture's
forward is copied here, and only architectures whose forward does nothing to the logits
between the LM head and the loss but a soft cap are accepted (SUPPORTED); others, mixture-of-
experts models among them (their auxiliary loss is added only when labels are passed), get
an error that lists the supported ones.

Optional: ``pip install "softmax-gpu[transformers]"``. Importing softmax_gpu never imports
this module or transformers.
"""
import inspect

import torch
import torch.nn.functional as F

from .ops.cross_entropy import _check_options
from .ops.linear_cross_entropy import check_linear_options, linear_cross_entropy

__all__ = ["apply", "revert", "is_applied", "SUPPORTED"]

FN = "softmax_gpu.transformers.apply"

# Model class -> the config attribute holding its final logit soft cap (None: it has none).
# Each is tested (tests/test_transformers.py) on a tiny random config.
SUPPORTED = {
    "LlamaForCausalLM": None,
    "MistralForCausalLM": None,
    "Qwen2ForCausalLM": None,
    "Qwen3ForCausalLM": None,
    "GemmaForCausalLM": None,
    "Gemma2ForCausalLM": "final_logit_softcapping",
    "Phi3ForCausalLM": None,
    "GPT2LMHeadModel": None,
}

# The transformers versions this module is written and tested for; the extra in
# pyproject.toml declares the same range.
VERSIONS = ((5, 0), (6, 0))  # [low, high)

def _check_version():
    import transformers

    release = tuple(int(p) for p in transformers.__version__.split("+")[0].split(".")[:2] if p.isdigit())
    low, high = VERSIONS
    if not low <= release < high:
        raise RuntimeError(
            f"{FN}(): transformers {transformers.__version__} is not supported (this softmax_gpu supports "
            f">= {'.'.join(map(str, low))}, < {'.'.join(map(str, high))}; pip install \"softmax-gpu[transformers]\")"
        )


class _FusedForward:
    """The forward apply() sets on one model instance.

    A callable object rather than a closure, so that copy.deepcopy(model) (TRL builds its
    reference models so) gives the copy a forward bound to the copy, not to the original."""

    def __init__(self, model, softcap_attr, options, eval_logits):
        self.model = model
        self.softcap_attr = softcap_attr
        self.options = options
        self.eval_logits = eval_logits
        # An instance-level forward set by someone else (accelerate's hooks do this) is kept
        # and called; revert() puts it back.
        self.own_forward = model.__dict__.get("forward")
        self.__wrapped__ = model.forward  # inspect.signature(model.forward) follows it: the Trainer reads it
        self.signature = inspect.signature(self.__wrapped__)
        self.var_keyword = next(p.name for p in self.signature.parameters.values() if p.kind == p.VAR_KEYWORD)

    def __call__(self, *args, return_logits=None, **kwargs):
        model, forward = self.model, self.__wrapped__
        bound = self.signature.bind_partial(*args, **kwargs)
        labels = bound.arguments.get("labels")
        if return_logits is None:
            return_logits = self.eval_logits and not model.training
        if labels is None or return_logits:
            return forward(*args, **kwargs)
        loss_kwargs = dict(bound.arguments.get(self.var_keyword) or {})
        # The loss goes into a ModelOutput: ask for one, and make the caller's tuple after.
        if "return_dict" in self.signature.parameters:
            return_dict = bound.arguments.get("return_dict")
            bound.arguments["return_dict"] = True
        else:
            return_dict = loss_kwargs.pop("return_dict", None)
            bound.arguments[self.var_keyword] = dict(loss_kwargs, return_dict=True)
        if return_dict is None:
            return_dict = getattr(model.config, "return_dict", True)
        bound.arguments["labels"] = None
        with _HeadCapture(model.get_output_embeddings()) as captured:
            outputs = forward(*bound.args, **bound.kwargs)
        if captured.hidden is None:
            raise RuntimeError(f"{FN}: {type(model).__name__}'s forward did not call its LM head; cannot form the loss")
        loss = _causal_lm_loss(model, self, captured.hidden, labels, **loss_kwargs)
        # A fresh output of the same class: a ModelOutput's keys (what to_tuple() and the
        # Trainer's outputs["loss"] read) cannot be dropped or added by attribute.
        fields = {key: value for key, value in outputs.items() if key not in ("loss", "logits")}
        outputs = type(outputs)(loss=loss, **fields)
        return outputs if return_dict else outputs.to_tuple()


def _patch(model):
    forward = model.__dict__.get("forward")
    return forward if isinstance(forward, _FusedForward) else None


def is_applied(model) -> bool:
    """Whether apply() has patched this model instance (and revert() has not undone it)."""
    return _patch(model) is not None


def apply(
    model,
    *,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    mode: str = "speed",
    buffer_bytes=None,
    grad_skip_threshold=None,
    eval_logits: bool = True,
):
    """Patches this causal-LM instance so that its loss comes from linear_cross_entropy.

    Args:
        model: an instance of one of SUPPORTED (transformers 5.x).
        z_loss, label_smoothing, mode, buffer_bytes, grad_skip_threshold: passed to
            softmax_gpu.linear_cross_entropy (its docstring); z_loss and label_smoothing
            change the loss from the model's own, the rest change only speed and memory
            (grad_skip_threshold: the gradient too, as documented there).
        eval_logits: True (the default): in eval mode a call with labels still returns the
            logits (the Trainer's evaluation and compute_metrics read them) and runs
            unpatched; False: eval calls with labels take the fused loss too, logits None.
            A call's own ``return_logits=`` overrides this either way.
    Returns:
        The model (patched in place). Applying again replaces the options; revert() undoes it.
    """
    _check_version()
    name = type(model).__name__
    if name not in SUPPORTED:
        raise TypeError(
            f"{FN}(): {name} is not supported; supported causal-LM classes: {', '.join(sorted(SUPPORTED))} "
            "(others may do more to the logits than the fused loss does; nothing was patched)"
        )
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"{FN}(): {name}'s output embedding is a {type(head).__name__}, not a torch.nn.Linear")
    parameters = inspect.signature(model.forward).parameters
    if "labels" not in parameters or not any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        raise TypeError(f"{FN}(): {name}.forward takes no labels= or no **kwargs; this transformers is not supported")
    _check_options(FN, "mean", label_smoothing, z_loss, None, -100)
    check_linear_options(FN, mode, buffer_bytes, grad_skip_threshold)
    options = dict(z_loss=float(z_loss), label_smoothing=float(label_smoothing), mode=mode,
                   buffer_bytes=buffer_bytes, grad_skip_threshold=grad_skip_threshold)  # fmt: skip
    patch = _patch(model)
    if patch is not None:
        patch.options, patch.eval_logits = options, bool(eval_logits)
    else:
        model.forward = _FusedForward(model, SUPPORTED[name], options, bool(eval_logits))
    return model


def revert(model):
    """Undoes apply() on this instance (nothing happens if it is not patched). Returns the model."""
    patch = _patch(model)
    if patch is not None:
        if patch.own_forward is None:
            del model.forward
        else:
            model.forward = patch.own_forward
    return model


class _HeadCapture:
    """For one call: the LM head returns an empty (..., 0) tensor and keeps its input."""

    def __init__(self, head):
        self.head = head
        self.hidden = None

    def __enter__(self):
        self.own_forward = self.head.__dict__.get("forward")

        def capture(hidden, *args, **kwargs):
            self.hidden = hidden
            return hidden.new_empty(*hidden.shape[:-1], 0)

        self.head.forward = capture
        return self

    def __exit__(self, *exc):
        if self.own_forward is None:
            del self.head.forward
        else:
            self.head.forward = self.own_forward
        return False


def _causal_lm_loss(model, patch, hidden, labels, num_items_in_batch=None, ignore_index=-100,
                    shift_labels=None, **_):  # fmt: skip
    """transformers' ForCausalLMLoss, on the LM head's input instead of its output."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]  # tokens < n predict n
    head = model.get_output_embeddings()
    weight, bias = head.weight, head.bias
    if torch.is_autocast_enabled(hidden.device.type):
        # nn.Linear would have run in the autocast dtype: so do the fused products.
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    softcap = None if patch.softcap_attr is None else getattr(model.config, patch.softcap_attr, None)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), weight, shift_labels.reshape(-1).to(hidden.device),
        linear_bias=bias, reduction=reduction, ignore_index=ignore_index, softcap=softcap, **patch.options,
    )  # fmt: skip
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss
