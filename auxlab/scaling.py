"""Loss scaling for float16 autocast, and its do-nothing stand-in: every gradient of a step is taken
through one of these, so no algorithm asks whether there is a ``GradScaler``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import cast

import torch
from torch import Tensor
from torch.profiler import record_function

from auxlab._gradients import all_finite, global_norm

__all__ = ["GradScaling", "LossScaling"]


class LossScaling:
    """No loss scaling, the stand-in for a step without a ``GradScaler``: every method is the plain operation."""

    #: The loss scale; None without a scaler.
    scale: float | None = None

    def grad(self, loss: Tensor, inputs: Sequence[Tensor], *, label: str, retain_graph: bool = False) -> tuple[Tensor | None, ...]:
        """``torch.autograd.grad(loss, inputs)`` (None for an input the loss does not reach), in a
        profiler range named ``label``."""
        with record_function(label):
            return torch.autograd.grad(loss, inputs, retain_graph=retain_graph, allow_unused=True)

    def as_grad(self, grad: Tensor | None) -> Tensor | None:
        """``grad`` as the ``.grad`` that :meth:`step` expects."""
        return grad

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()``."""
        optimizer.step()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Before clipping: ``.grad`` holds true gradients already."""

    def overflowed(self, grads: Sequence[Tensor | None]) -> bool:
        """Whether a gradient overflowed; never without loss scaling."""
        return False

    def meta_check(self, objective: Tensor, grads: Sequence[Tensor | None], terms: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """What the finite guard checks of a meta step, and the parts it names: the objective plus the
        gradient's norm, since a non-finite meta gradient is an error here."""
        norm = global_norm(grads)
        norm = objective.new_zeros(()) if norm is None else norm
        return objective + norm, {**terms, "hypergradient norm": norm}

    def update(self, *, stepped: bool) -> None:
        """The end of a step; nothing to do without a scaler."""


class GradScaling(LossScaling):
    """Loss scaling by a ``torch.amp.GradScaler``, for float16 autocast.

    Every gradient is taken on the loss times the scale and divided by it again (the same gradient,
    exactly, unless it overflowed: then it is not finite), optimizers are stepped by ``scaler.step``
    (which skips a step whose gradient overflowed), and ``scaler.update()`` runs once per call.

    Args:
        scaler: an enabled GradScaler.
        device: where the scale lives (``scaler.scale`` also creates it on its first call).
    """

    def __init__(self, scaler: torch.amp.GradScaler, device: torch.device) -> None:
        self.scaler = scaler
        self.scale = float(scaler.scale(torch.ones((), device=device)))

    def grad(self, loss: Tensor, inputs: Sequence[Tensor], *, label: str, retain_graph: bool = False) -> tuple[Tensor | None, ...]:
        scale = cast(float, self.scale)
        grads = super().grad(loss * scale, inputs, label=label, retain_graph=retain_graph)
        return tuple(None if g is None else g / scale for g in grads)

    def as_grad(self, grad: Tensor | None) -> Tensor | None:
        """``grad`` times the scale, which ``scaler.step`` divides out again."""
        return grad if grad is None else grad * cast(float, self.scale)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.step(optimizer)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.unscale_(optimizer)

    def overflowed(self, grads: Sequence[Tensor | None]) -> bool:
        return not all_finite(grads)

    def meta_check(self, objective: Tensor, grads: Sequence[Tensor | None], terms: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The objective alone: a gradient that overflowed is the scaler's to skip."""
        return objective, dict(terms)

    def update(self, *, stepped: bool) -> None:
        if stepped:
            self.scaler.update()
