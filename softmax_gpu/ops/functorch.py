"""Helpers for the ops' torch.func paths (grad, vjp, jacrev, vmap over them), and the
first-order guard of every backward whose kernel is not differentiable again.

torch.library's autograd for a custom op does not support the torch.func transforms, so
each op has a small autograd.Function with setup_context for them (FunctorchSoftmax,
FunctorchCrossEntropy, FunctorchTokenLogprobs), with generate_vmap_rule=True over custom
ops that have vmap rules (the vmapped dim joins the rows). Their backward kernels are not
differentiable again except softmax's: first_order_only() makes a second derivative raise
instead of coming out silently zero.
"""
import functools

import torch


class _FirstOrderOnly(torch.autograd.Function):
    """Passes `value` through; differentiating it again raises."""

    generate_vmap_rule = True

    @staticmethod
    def forward(value, name, *depends_on):
        return value.view_as(value)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.name = inputs[1]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(_message(ctx.name))

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(_message(ctx.name))


def _message(name):
    return (f"{name}: a second derivative (grad of grad, hessian, jacrev of jacrev) is not supported; the first "
            "derivative is (grad, vjp, jacrev, vmap of them)")  # fmt: skip


def first_order_only(value: torch.Tensor, name: str, *depends_on) -> torch.Tensor:
    """`value` (a gradient computed by a kernel from `depends_on`), tied to what it depends on
    so that differentiating it raises."""
    return _FirstOrderOnly.apply(value, name, *[t for t in depends_on if isinstance(t, torch.Tensor)])


def first_order(name: str):
    """Decorates an autograd.Function's backward whose kernels are not differentiable again:
    it runs without recording, and a backward that autograd would record (create_graph=True,
    for a Hessian-vector product or a grad of grad) raises at once. (A lazily raising node,
    as torch's once_differentiable attaches, is skipped by autograd whenever nothing upstream
    requires grad, and the second derivative then silently misses this op's term.)"""

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grad_outputs):
            if not torch.is_grad_enabled():  # autograd runs a backward without create_graph so
                return backward(ctx, *grad_outputs)
            if not torch.compiler.is_compiling():
                raise RuntimeError(
                    f"{name}: backward with create_graph=True is not supported: its gradient is not "
                    "differentiable again, so a second derivative would silently miss its term (first "
                    "derivatives only; softmax and log_softmax support second derivatives)"
                )
            with torch.no_grad():
                return backward(ctx, *grad_outputs)

        return wrapper

    return decorate
