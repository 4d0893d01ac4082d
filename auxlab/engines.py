"""Hypergradient engines: differentiable evaluation of the primary loss after a virtual SGD step.

Every engine computes ``L_pri(f_theta'(x_meta), y_meta)`` with
``theta' = theta - inner_lr * grad_theta L_inner(theta)`` over all trainable parameters of the
multi-task network, keeping the graph so that the result can be differentiated with respect to the
label generator (through the targets inside ``inner_loss``). None of them changes a parameter, a
buffer (BatchNorm running statistics) or ``.grad`` of the network.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor
from torch.func import functional_call

from auxlab.multitask import MultiTaskNet

InnerLoss = Callable[[Tensor, "Tensor | None"], Tensor]
"""``(primary, aux) -> L_inner``, the training loss of the virtual step."""
OuterLoss = Callable[[Tensor], Tensor]
"""``primary logits at theta' -> L_pri``."""
Engine = Callable[..., Tensor]


def virtual_step(params: Mapping[str, Tensor], grads: Sequence[Tensor | None], inner_lr: float) -> dict[str, Tensor]:
    """``theta' = theta - inner_lr * grad``; a parameter without gradient stays as it is."""
    return {name: p if g is None else p - inner_lr * g for (name, p), g in zip(params.items(), grads)}


def functional_engine(
    net: MultiTaskNet, x: Tensor, x_meta: Tensor, *, inner_loss: InnerLoss, outer_loss: OuterLoss, inner_lr: float
) -> Tensor:
    """Exact second order on ``torch.func.functional_call`` and ``autograd.grad(create_graph=True)``."""
    params: dict[str, Tensor] = {name: p for name, p in net.named_parameters() if p.requires_grad}
    buffers = {name: b.clone() for name, b in net.named_buffers()}  # the running statistics stay untouched
    primary, aux = functional_call(net, (params, buffers), (x,))
    grads = torch.autograd.grad(inner_loss(primary, aux), list(params.values()), create_graph=True, allow_unused=True)
    primary_meta, _ = functional_call(net, (virtual_step(params, grads, inner_lr), buffers), (x_meta,), {"with_aux": False})
    return outer_loss(primary_meta)


def higher_engine(
    net: MultiTaskNet, x: Tensor, x_meta: Tensor, *, inner_loss: InnerLoss, outer_loss: OuterLoss, inner_lr: float
) -> Tensor:
    """Exact second order on the ``higher`` library's differentiable SGD (``innerloop_ctx``)."""
    import higher  # type: ignore[import-untyped]

    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=inner_lr)
    with higher.innerloop_ctx(net, optimizer, copy_initial_weights=False, track_higher_grads=True) as (fnet, diffopt):
        primary, aux = fnet(x)
        diffopt.step(inner_loss(primary, aux))
        primary_meta, _ = fnet(x_meta, with_aux=False)
        return outer_loss(primary_meta)


ENGINES: dict[str, Engine] = {"functional": functional_engine, "higher": higher_engine}


def get_engine(name: str) -> Engine:
    """The engine registered as ``name``; a ValueError listing the choices otherwise."""
    if name not in ENGINES:
        raise ValueError(f"engine={name!r} is not known; choose one of {sorted(ENGINES)}")
    return ENGINES[name]


__all__ = ["ENGINES", "functional_engine", "get_engine", "higher_engine", "virtual_step"]
