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

How: apply() moves that one instance (not its class, not other instances) to a subclass of
its class, created once per class, of the same name, whose ``forward`` is the only change;
revert() moves it back. A class-level forward (not an attribute on the instance) stays
right through copy.deepcopy, nn.DataParallel's replicas and accelerate's wrappers of
``model.forward``. For a fused call the subclass runs the class's own forward with
``labels=None`` while a forward pre-hook on the LM head (registered once, active only
inside that call, on that thread) keeps the head's input and hands the head zero tokens
of it, so the logits come out (..., 0, V); the loss is then formed from the kept input
exactly as transformers' ``ForCausalLMLoss`` forms it from the logits. Nothing of an
architecture's forward is copied here, so only architectures whose forward does nothing to
the logits between the head and the loss but a soft cap are accepted (SUPPORTED); others,
mixture-of-experts models among them (their auxiliary loss is added only with labels), get
an error that lists the supported ones. A head that is not a plain nn.Linear at call time
(a LoRA wrapper, a quantised layer), or that carries other hooks or an instance forward
(accelerate's offload hooks), and a model whose loss function is not ForCausalLMLoss, raise
instead of being skipped over.

Optional: ``pip install "softmax-gpu[transformers]"``. Importing softmax_gpu never imports
this module or transformers.
"""
import contextvars
import copy
import functools
import inspect

import torch
import torch.nn.functional as F

from .loss_options import LossOptions
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

_OPTIONS = "_softmax_gpu_options"  # the instance attribute holding apply()'s options
_HOOKED = "_softmax_gpu_capture_hook"  # the LM head's attribute holding our pre-hook's handle
_FUSED_CLASSES: dict = {}  # transformers class -> its fused subclass
_CAPTURE = contextvars.ContextVar("softmax_gpu_transformers_capture", default=None)


def _check_version():
    import transformers
    from packaging.version import Version

    release = Version(transformers.__version__).release[:2]
    low, high = VERSIONS
    if not low <= release < high:
        raise RuntimeError(
            f"{FN}(): transformers {transformers.__version__} is not supported (this softmax_gpu supports "
            f">= {'.'.join(map(str, low))}, < {'.'.join(map(str, high))}; pip install \"softmax-gpu[transformers]\")"
        )


def _check_loss_function(model, fn):
    from transformers.loss.loss_utils import ForCausalLMLoss

    if model.loss_function is not ForCausalLMLoss:
        raise TypeError(
            f"{fn}: {type(model).__name__}'s loss_function is {getattr(model.loss_function, '__name__', model.loss_function)!r}, "
            "not transformers' ForCausalLMLoss; the fused loss would replace it (call revert(model), or leave "
            "loss_function and loss_type at their defaults)"
        )


class _Capture:
    """One fused call's state: the model whose head to catch, and the head's input once caught."""

    def __init__(self, model):
        self.model = model
        self.hidden = None


def _capture_hook(head, args):
    """The LM head's pre-hook: inside a fused call of its model, keep the input and give the
    head zero tokens of it; anywhere else, nothing."""
    capture = _CAPTURE.get()
    if capture is None or capture.model.get_output_embeddings() is not head:
        return None
    capture.hidden = args[0]
    return (args[0][..., :0, :],) + tuple(args[1:])


def _checked_head(model):
    """The LM head, with our pre-hook on it; raises if the fused loss would skip part of it."""
    head = model.get_output_embeddings()
    name = type(model).__name__
    if type(head) is not torch.nn.Linear:
        raise RuntimeError(
            f"softmax_gpu.transformers: {name}'s LM head is a {type(head).__module__}.{type(head).__name__}, not a "
            "torch.nn.Linear (wrapped or quantised after apply()?); the fused loss reads only its weight and bias, "
            "so it refuses: revert(model) first"
        )
    if _HOOKED not in head.__dict__:
        head.__dict__[_HOOKED] = head.register_forward_pre_hook(_capture_hook)
    others = [h for h in head._forward_pre_hooks.values() if h is not _capture_hook]
    if others or head._forward_hooks or "forward" in head.__dict__:
        raise RuntimeError(
            f"softmax_gpu.transformers: {name}'s LM head has forward hooks or an instance-level forward (accelerate's "
            "device or offload hooks, for example); the fused loss would skip them, so it refuses: revert(model) first"
        )
    return head


def _fused_class(cls):
    """The subclass apply() moves instances of cls to: the same name, module and qualified name
    (save_pretrained records the class name), one new forward."""
    fused = _FUSED_CLASSES.get(cls)
    if fused is not None:
        return fused
    base_forward = cls.forward
    signature = inspect.signature(base_forward)
    var_keyword = next(p.name for p in signature.parameters.values() if p.kind == p.VAR_KEYWORD)

    @functools.wraps(base_forward)  # inspect.signature follows it: the Trainer reads it
    def forward(self, *args, return_logits=None, **kwargs):
        options = self.__dict__.get(_OPTIONS)
        bound = signature.bind_partial(self, *args, **kwargs)
        labels = bound.arguments.get("labels")
        if return_logits is None:
            return_logits = options is not None and options["eval_logits"] and not self.training
        # Reverted (accelerate may still hold this function), no labels, or logits wanted.
        if options is None or labels is None or return_logits:
            return base_forward(self, *args, **kwargs)
        _check_loss_function(self, "softmax_gpu.transformers")
        head = _checked_head(self)
        loss_kwargs = dict(bound.arguments.get(var_keyword) or {})
        # The loss goes into a ModelOutput: ask for one, and make the caller's tuple after.
        if "return_dict" in signature.parameters:
            return_dict = bound.arguments.get("return_dict")
            bound.arguments["return_dict"] = True
        else:
            return_dict = loss_kwargs.pop("return_dict", None)
            bound.arguments[var_keyword] = dict(loss_kwargs, return_dict=True)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        bound.arguments["labels"] = None
        capture = _Capture(self)
        token = _CAPTURE.set(capture)
        try:
            outputs = base_forward(*bound.args, **bound.kwargs)
        finally:
            _CAPTURE.reset(token)
        if capture.hidden is None:
            raise RuntimeError(f"softmax_gpu.transformers: {type(self).__name__}'s forward did not call its LM head")
        loss = _causal_lm_loss(self, head, options, capture.hidden, labels, **loss_kwargs)
        fields = {key: value for key, value in outputs.items() if key not in ("loss", "logits")}
        if return_dict:
            # A fresh output of the same class: a ModelOutput's keys (what to_tuple() and the
            # Trainer's outputs["loss"] read) cannot be dropped or added by attribute.
            return type(outputs)(loss=loss, **fields)
        # A tuple keeps the unpatched positions (loss, logits, ...): the logits' slot holds the
        # head's (..., 0, V) output, an empty tensor, not the next field.
        return type(outputs)(loss=loss, logits=outputs.logits, **fields).to_tuple()

    def __reduce_ex__(self, protocol):
        # pickle (torch.save of the whole model): as the transformers class, unpatched; apply()
        # again after loading. (The class is found by its name, which is the base class's.)
        _constructor, _args, state, *rest = object.__reduce_ex__(self, protocol)
        state = {k: v for k, v in state.items() if k != _OPTIONS}
        return (_new_instance, (cls,), state, *rest)

    def __deepcopy__(self, memo):
        # copy.deepcopy: the default copy, patch included (TRL makes reference models so)
        return copy._reconstruct(self, memo, *object.__reduce_ex__(self, 4))

    namespace = {"forward": forward, "__reduce_ex__": __reduce_ex__, "__deepcopy__": __deepcopy__,
                 "__module__": cls.__module__, "__qualname__": cls.__qualname__, "_softmax_gpu_base": cls}  # fmt: skip
    fused = type(cls.__name__, (cls,), namespace)
    _FUSED_CLASSES[cls] = fused
    return fused


def _new_instance(cls):
    """Unpickling: an empty instance of cls (its state is set after)."""
    return cls.__new__(cls)


def is_applied(model) -> bool:
    """Whether apply() has patched this model instance (and revert() has not undone it)."""
    return type(model) in _FUSED_CLASSES.values()


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
            logits (the Trainer's evaluation hands them to compute_metrics) and runs
            unpatched; False: eval calls with labels take the fused loss too, logits None.
            A call's own ``return_logits=`` overrides this either way.
    Returns:
        The model (patched in place). Applying again replaces the options; revert() undoes it.
    """
    import transformers

    _check_version()
    cls = type(model)
    if is_applied(model):
        cls = cls._softmax_gpu_base
    name = cls.__name__
    if name not in SUPPORTED or cls is not getattr(transformers, name, None):
        raise TypeError(
            f"{FN}(): {cls.__module__}.{name} is not supported; supported causal-LM classes (transformers' own): "
            f"{', '.join(sorted(SUPPORTED))} (others may do more to the logits than the fused loss does; nothing "
            "was patched)"
        )
    _check_loss_function(model, f"{FN}()")
    _checked_head(model)
    LossOptions.checked(FN, -100, label_smoothing, z_loss)
    check_linear_options(FN, mode, buffer_bytes, grad_skip_threshold)
    model.__dict__[_OPTIONS] = dict(
        z_loss=float(z_loss), label_smoothing=float(label_smoothing), mode=mode, buffer_bytes=buffer_bytes,
        grad_skip_threshold=grad_skip_threshold, eval_logits=bool(eval_logits), softcap_attr=SUPPORTED[name],
    )  # fmt: skip
    model.__class__ = _fused_class(cls)
    return model


def revert(model):
    """Undoes apply() on this instance (nothing happens if it is not patched). Returns the model."""
    if is_applied(model):
        model.__class__ = type(model)._softmax_gpu_base
        model.__dict__.pop(_OPTIONS, None)
        head = model.get_output_embeddings()
        handle = head.__dict__.pop(_HOOKED, None) if head is not None else None
        if handle is not None:
            handle.remove()
    return model


def _causal_lm_loss(model, head, options, hidden, labels, num_items_in_batch=None, ignore_index=-100,
                    shift_labels=None, **_):  # fmt: skip
    """transformers' ForCausalLMLoss, on the LM head's input instead of its output."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]  # tokens < n predict n
    weight, bias = head.weight, head.bias
    if torch.is_autocast_enabled(hidden.device.type):
        # nn.Linear would have run in the autocast dtype: so do the fused products.
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    attr = options["softcap_attr"]
    softcap = None if attr is None else getattr(model.config, attr, None)
    reduction = "mean" if num_items_in_batch is None else "sum"
    lce_options = {k: options[k] for k in ("z_loss", "label_smoothing", "mode", "buffer_bytes", "grad_skip_threshold")}
    loss = linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), weight, shift_labels.reshape(-1).to(hidden.device),
        linear_bias=bias, reduction=reduction, ignore_index=ignore_index, softcap=softcap, **lce_options,
    )  # fmt: skip
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss
