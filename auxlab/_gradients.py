"""Gradient arithmetic written once: the combined model-step gradient, the norm of norms, the
surrogate that attaches a gradient to a value."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

#: A scale of the auxiliary gradient: a number, or a 0-d tensor (differentiable for a meta-learned rule).
Scale = float | Tensor


def combined_gradients(
    primary: Mapping[str, Tensor | None], aux: Mapping[str, Tensor | None], aux_weight: float, scales: Mapping[str, Scale], names: Iterable[str]
) -> dict[str, Tensor | None]:
    """``g_pri + aux_weight * scale * g_aux`` for each parameter of ``names`` (a scale left out is 1);
    None where neither loss reaches the parameter."""
    combined: dict[str, Tensor | None] = {}
    for name in names:
        g_pri, g_aux = primary[name], aux[name]
        if g_aux is None:
            combined[name] = g_pri
            continue
        weighted = g_aux * (aux_weight * scales.get(name, 1.0))
        combined[name] = weighted if g_pri is None else g_pri + weighted
    return combined


def named_dot(a: Mapping[str, Tensor | None], b: Mapping[str, Tensor]) -> Tensor:
    """``sum_name <a[name], b[name]>`` over the names of ``a`` whose entry is not None (a 0-d tensor like ``b``'s
    entries; 0 if none is), keeping ``a``'s and ``b``'s graphs."""
    start = next(iter(b.values())).new_zeros(())
    return sum(((t * b[name]).sum() for name, t in a.items() if t is not None), start)


def detached(scales: Mapping[str, Scale]) -> dict[str, Scale]:
    """``scales`` without their graph (a meta-learned weighting's are differentiable)."""
    return {name: scale.detach() if isinstance(scale, Tensor) else scale for name, scale in scales.items()}


def global_norm(tensors: Iterable[Tensor | None]) -> Tensor | None:
    """The 2-norm of all the tensors together (the norm of their norms); None if there are none."""
    present = [t for t in tensors if t is not None]
    if not present:
        return None
    norm: Tensor = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in present]))
    return norm


def all_finite(tensors: Iterable[Tensor | None]) -> bool:
    """Whether every element of every tensor is finite (None entries are skipped)."""
    present = [t for t in tensors if t is not None]
    return not present or bool(torch.stack([torch.isfinite(t).all() for t in present]).all())


def attach_gradient(value: Tensor, inputs: Sequence[Tensor], gradients: Sequence[Tensor | None]) -> Tensor:
    """A scalar equal to ``value`` whose gradient with respect to each of ``inputs`` is the matching
    entry of ``gradients`` (0 where None).

    Unlike ``value + (inputs * gradients).sum() - (...).detach()``, its value stays ``value`` when a
    gradient is not finite (a scaled gradient that overflowed), so that a non-finite gradient is
    found as such and not as a non-finite value.
    """
    pairs = [(x, g) for x, g in zip(inputs, gradients) if g is not None]
    return _AttachedGradient.apply(value.detach(), [g for _, g in pairs], *(x for x, _ in pairs))  # type: ignore[no-untyped-call,no-any-return]


class _AttachedGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, value: Tensor, gradients: list[Tensor], *inputs: Tensor) -> Tensor:
        ctx.gradients = gradients
        return value.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        return (None, None, *(grad_output * g for g in ctx.gradients))
