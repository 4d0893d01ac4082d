"""The multi-task network f_theta: the user's classifier plus an auxiliary head on its features."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn


def find_head(model: nn.Module, num_classes: int, head: str | None) -> str:
    """The name of the ``nn.Linear`` of ``model`` that produces its ``num_classes`` logits.

    With ``head=None`` it is the model's final ``nn.Linear`` (the last in ``named_modules()``
    order) when that has ``num_classes`` outputs, else the only ``nn.Linear`` that has; otherwise
    the named one. Raises a ValueError that lists the candidates when none or several fit.
    """
    linears: dict[str, nn.Linear] = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    listing = ", ".join(f"{name!r} ({m.in_features}->{m.out_features})" for name, m in linears.items()) or "none"
    if head is not None:
        if head not in linears:
            raise ValueError(f"head={head!r} is not an nn.Linear of the model; its nn.Linear layers are: {listing}")
        if linears[head].out_features != num_classes:
            raise ValueError(
                f"head={head!r} has {linears[head].out_features} outputs but num_classes={num_classes}; "
                "the head must be the layer that produces the primary logits"
            )
        return head
    if linears and list(linears.values())[-1].out_features == num_classes:
        return list(linears)[-1]
    fits = [name for name, m in linears.items() if m.out_features == num_classes]
    if len(fits) == 1:
        return fits[0]
    if not fits:
        raise ValueError(
            f"the model has no nn.Linear with num_classes={num_classes} outputs to read features from "
            f"(its nn.Linear layers: {listing}); the model must end in an nn.Linear producing the (B, C) "
            "logits, or check num_classes"
        )
    raise ValueError(f"the final nn.Linear {list(linears)[-1]!r} does not have num_classes={num_classes} outputs and several others do: "
        f"{fits}; pick the primary head with head='name'")


#: ``(features, differentiable) -> features``: what the auxiliary head reads, made from the primary head's input
#: (a strategy's :meth:`~auxlab.AuxLabelGenerator.auxiliary_features`); ``differentiable``: with the gradient
#: to the strategy's own parameters.
AuxiliaryInput = Callable[[Tensor, bool], Tensor]


class MultiTaskNet(nn.Module):
    """Runs the user's ``model`` and feeds the input of its head to ``aux_head``.

    The head's input is captured by a forward pre-hook that exists only for the duration of one
    call, so ``model`` is never changed and stays usable on its own. Works under
    ``torch.func.functional_call`` and ``higher`` alike. ``aux_input``, if given, maps the head's
    input to what the auxiliary head reads (DTG-AuxL's generated features); it is a function, not a
    submodule, so its parameters are not the network's.
    """

    def __init__(self, model: nn.Module, head_name: str, aux_head: nn.Linear | None, aux_input: AuxiliaryInput | None = None) -> None:
        super().__init__()
        self.model = model
        self.aux_head = aux_head
        self.head_name = head_name
        self.aux_input = aux_input

    def forward(
        self, x: Tensor, with_aux: bool = True, with_features: bool = False, aux_input_grad: bool = False
    ) -> tuple[Tensor | None, ...]:
        """Returns ``(primary, aux)``: ``(B, C)`` logits and ``(B, K)`` auxiliary logits (or None);
        with ``with_features``, ``(primary, aux, features)`` with ``features`` the head's ``(B, d)`` input.
        ``aux_input_grad``: the auxiliary logits carry the gradient to ``aux_input``'s own parameters
        (otherwise they are held fixed)."""
        head_input = with_features or (self.aux_head is not None and with_aux)
        if not head_input:
            return cast(Tensor, self.model(x)), None
        captured: list[Tensor] = []
        head = self.model.get_submodule(self.head_name)
        handle = head.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
        try:
            primary = cast(Tensor, self.model(x))
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(
                f"the head {self.head_name!r} ran {len(captured)} times in one forward pass; "
                "auxlab reads its input and needs it to run exactly once"
            )
        aux = None
        if self.aux_head is not None and with_aux:
            aux_features = captured[0] if self.aux_input is None else self.aux_input(captured[0], aux_input_grad)
            aux = self.aux_head(aux_features)
        return (primary, aux, captured[0]) if with_features else (primary, aux)


def buffer_copies(module: nn.Module) -> dict[str, Tensor]:
    """Copies of ``module``'s buffers by name, for a forward pass that must not move its running statistics."""
    return {name: b.clone() for name, b in module.named_buffers()}


def call_on_buffer_copies(module: nn.Module, *args: Any, method: str = "forward", **kwargs: Any) -> tuple[Any, dict[str, Tensor]]:
    """Run ``module`` (its ``method``) on copies of its buffers (BatchNorm statistics); return the
    output and the updated copies, so that the caller commits them (:func:`commit_buffers`) only once
    the step succeeded.

    A module without floating-point buffers (no running statistics; e.g. a fixed label table)
    runs as it is.
    """
    if method != "forward":
        module = _MethodCall(module, method)
    named = dict(module.named_buffers())
    buffers = {name: b.clone() for name, b in named.items()} if any(b.is_floating_point() for b in named.values()) else {}
    if not buffers:
        return module(*args, **kwargs), {}
    output = torch.func.functional_call(module, buffers, args, kwargs)
    if isinstance(module, _MethodCall):
        buffers = {name.removeprefix("module."): b for name, b in buffers.items()}
    return output, buffers


def commit_buffers(module: nn.Module, updated: Mapping[str, Tensor]) -> None:
    """Copy the buffers updated by :func:`call_on_buffer_copies` into ``module``."""
    if not updated:
        return
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            if name in updated:
                buffer.copy_(updated[name])


class _MethodCall(nn.Module):
    """Calls ``module.<method>`` as its forward, so that ``functional_call`` can run a method other than ``forward``."""

    def __init__(self, module: nn.Module, method: str) -> None:
        super().__init__()
        self.module = module
        self.method = method

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.module, self.method)(*args, **kwargs)


def head_input(model: nn.Module, head_name: str, x: Tensor) -> Tensor:
    """``(B, d)``: the input of ``model.<head_name>`` on ``x``, without gradient, detached.

    The classifier runs in its current mode on copies of its buffers (:func:`call_on_buffer_copies`):
    no running statistic, parameter or ``.grad`` of it changes.
    """
    net = MultiTaskNet(model, head_name, None)  # captures the head's input, checks it ran once
    with torch.no_grad():
        (_, _, features), _ = call_on_buffer_copies(net, x, with_aux=False, with_features=True)
    return cast(Tensor, features).detach()
