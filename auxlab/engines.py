"""Hypergradient engines: the meta objective's dependence on the auxiliary targets.

Every engine takes a :class:`MetaProblem` and returns a scalar whose value is the primary loss
after the virtual step, ``L_pri(f_theta'(x_meta), y_meta)`` with
``theta' = theta - inner_lr * grad_theta [L_pri + aux_weight * L_aux](theta, t)``, and whose
gradient with respect to the targets ``t`` is that loss's gradient (exactly, or approximately for
``"finite_difference"``). The wrapper adds the entropy term and backpropagates into the generator.
No engine changes a parameter, a buffer (BatchNorm statistics) or ``.grad`` of the network.

- ``"functional"``: exact; ``torch.func.functional_call`` and ``autograd.grad(create_graph=True)``.
- ``"higher"``: exact; the ``higher`` library's differentiable SGD.
- ``"jvp"``: exact without a second-order graph. The auxiliary loss is linear in the targets,
  ``L_aux = sum_bk t_bk c_bk(theta)`` (:func:`~auxlab.losses.soft_target_coefficients`), so
  ``dL_pri(theta')/dt_bk = -inner_lr * aux_weight * (J_c(theta) u)_bk`` with
  ``u = grad L_pri(theta')``: one forward-mode Jacobian-vector product.
- ``"finite_difference"``: the same identity with ``J_c u`` replaced by the central difference
  ``(c(theta + eps u) - c(theta - eps u)) / (2 eps)``, ``eps = 0.01 / ||u||`` (as in DARTS):
  two extra forward passes, first order only, error O(eps^2).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.func import functional_call

from auxlab.distributed import Reducer
from auxlab.losses import classification_loss, model_step_losses, soft_target_coefficients
from auxlab.multitask import MultiTaskNet

__all__ = [
    "ENGINES", "FINITE_DIFFERENCE_SCALE", "SHARED_DERIVATIVES", "GradientsAtTheta", "MetaProblem", "SharedStep", "get_engine", "gradient_at_theta", "gradients_at_theta",
    "linearised_step", "meta_loss_after", "scaled_grad", "separate_gradients", "virtual_step",
]

#: ``eps * ||u||`` of the finite-difference engine (DARTS's choice).
FINITE_DIFFERENCE_SCALE = 0.01


@dataclass(frozen=True)
class MetaProblem:
    """One meta step's inputs.

    Attributes:
        net: the multi-task network (classifier + auxiliary head).
        x, y: ``(B, ...)`` inputs and ``(B,)`` labels of the virtual step.
        targets: ``(B, K)`` auxiliary targets, differentiable with respect to the generator.
        x_meta, y_meta: the batch of the meta loss.
        inner_lr, aux_weight, focal_gamma: the wrapper's hyper-parameters.
        virtual_params: names of the parameters that take the virtual step; None for every
            trainable parameter. The others are held fixed.
        reducer: in data-parallel training, the ranks' collective operations: the gradients at
            theta and at theta' are averaged over the ranks (:mod:`auxlab.distributed`). Only
            :func:`linearised_step` supports it.
    """

    net: MultiTaskNet
    x: Tensor
    y: Tensor
    targets: Tensor
    x_meta: Tensor
    y_meta: Tensor
    inner_lr: float
    aux_weight: float
    focal_gamma: float
    virtual_params: frozenset[str] | None = None
    reducer: Reducer | None = None

    def parameters(self) -> dict[str, Tensor]:
        """The parameters of the virtual step, by name."""
        return {
            name: p
            for name, p in self.net.named_parameters()
            if p.requires_grad and (self.virtual_params is None or name in self.virtual_params)
        }

    def buffer_copies(self) -> dict[str, Tensor]:
        """Copies of the network's buffers, so that no forward here moves its running statistics."""
        return {name: b.clone() for name, b in self.net.named_buffers()}

    def inner_loss(self, primary: Tensor, aux: Tensor | None, targets: Tensor) -> Tensor:
        """``L_pri + aux_weight * L_aux`` of the virtual step."""
        primary_loss, aux_loss = self.loss_terms(primary, aux, targets)
        return primary_loss + self.aux_weight * aux_loss

    def loss_terms(self, primary: Tensor, aux: Tensor | None, targets: Tensor) -> tuple[Tensor, Tensor]:
        """``(L_pri, L_aux)`` on ``(x, y)``, as in the model step."""
        assert aux is not None
        return model_step_losses(primary, self.y, aux, targets, focal_gamma=self.focal_gamma)

    def primary_loss(self, logits: Tensor, y: Tensor) -> Tensor:
        return classification_loss(logits, y, focal_gamma=self.focal_gamma)


Engine = Callable[[MetaProblem], Tensor]


def scaled_grad(loss: Tensor, inputs: Sequence[Tensor], loss_scale: float | None = None, *, retain_graph: bool = False) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad(loss, inputs)`` (None for an input the loss does not reach).

    With ``loss_scale`` (a ``GradScaler``'s scale, a power of two) the backward pass runs on
    ``loss * loss_scale``, so that half-precision gradients do not underflow, and the result is
    divided by it again: the same gradient, exactly, unless it overflowed (then it is not finite).
    """
    if loss_scale is None:
        return torch.autograd.grad(loss, inputs, retain_graph=retain_graph, allow_unused=True)
    grads = torch.autograd.grad(loss * loss_scale, inputs, retain_graph=retain_graph, allow_unused=True)
    return tuple(None if g is None else g / loss_scale for g in grads)


def virtual_step(params: Mapping[str, Tensor], grads: Sequence[Tensor | None], inner_lr: float) -> dict[str, Tensor]:
    """``theta' = theta - inner_lr * grad``; a parameter without gradient stays as it is."""
    return {name: p if g is None else p - inner_lr * g for (name, p), g in zip(params.items(), grads)}


def functional_engine(problem: MetaProblem) -> Tensor:
    """Exact second order on ``torch.func.functional_call`` and ``autograd.grad(create_graph=True)``."""
    params, buffers = problem.parameters(), problem.buffer_copies()
    primary, aux = functional_call(problem.net, (params, buffers), (problem.x,))
    inner = problem.inner_loss(primary, aux, problem.targets)
    grads = torch.autograd.grad(inner, list(params.values()), create_graph=True, allow_unused=True)
    moved = virtual_step(params, grads, problem.inner_lr)
    primary_meta, _ = functional_call(problem.net, (moved, buffers), (problem.x_meta,), {"with_aux": False})
    return problem.primary_loss(primary_meta, problem.y_meta)


def higher_engine(problem: MetaProblem) -> Tensor:
    """Exact second order on the ``higher`` library's differentiable SGD (``innerloop_ctx``)."""
    import higher  # type: ignore[import-untyped]

    optimizer = torch.optim.SGD(list(problem.parameters().values()), lr=problem.inner_lr)
    with higher.innerloop_ctx(problem.net, optimizer, copy_initial_weights=False, track_higher_grads=True) as (fnet, diffopt):
        primary, aux = fnet(problem.x)
        diffopt.step(problem.inner_loss(primary, aux, problem.targets))
        primary_meta, _ = fnet(problem.x_meta, with_aux=False)
        loss: Tensor = problem.primary_loss(primary_meta, problem.y_meta)
        return loss


DirectionalDerivative = Callable[[Callable[[dict[str, Tensor]], Tensor], dict[str, Tensor], dict[str, Tensor]], Tensor]


def forward_mode(function: Callable[[dict[str, Tensor]], Tensor], at: dict[str, Tensor], direction: dict[str, Tensor]) -> Tensor:
    """``J_function(at) direction`` by forward-mode automatic differentiation (exact).

    Uses ``torch.autograd.forward_ad`` dual tensors: on the small CNN on CPU (batch 64) they took
    13-23% less time than ``torch.func.jvp`` for the same product (benchmarks/results/jvp_variants_cpu.md).
    """
    with forward_ad.dual_level():
        duals = {name: forward_ad.make_dual(p, direction[name]) for name, p in at.items()}  # type: ignore[no-untyped-call]
        try:
            primal, tangent = forward_ad.unpack_dual(function(duals))  # type: ignore[no-untyped-call]
        except NotImplementedError as error:
            raise NotImplementedError(
                f"engine='jvp' needs a forward-mode derivative of every operation of the model, and one has none: {error} "
                "Pass engine='functional' (exact, second order) or engine='finite_difference' to MetaAuxWrapper"
            ) from error
        return torch.zeros_like(primal) if tangent is None else cast(Tensor, tangent)


def central_difference(function: Callable[[dict[str, Tensor]], Tensor], at: dict[str, Tensor], direction: dict[str, Tensor]) -> Tensor:
    """``J_function(at) direction`` by ``(f(at + eps d) - f(at - eps d)) / (2 eps)``, ``eps = 0.01 / ||d||``."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d) for d in direction.values()]))
    if norm == 0:
        return torch.zeros_like(function(at))
    eps = FINITE_DIFFERENCE_SCALE / norm
    plus = function({name: p + eps * direction[name] for name, p in at.items()})
    minus = function({name: p - eps * direction[name] for name, p in at.items()})
    difference: Tensor = (plus - minus) / (2 * eps)
    return difference


@dataclass(frozen=True)
class SharedStep:
    """A model step and a meta step computed together (:func:`linearised_step`).

    Attributes:
        primary: ``(B, C)`` primary logits at theta, detached.
        primary_loss, aux_loss: the model step's loss terms at theta (targets detached).
        grads: gradient of ``primary_loss + aux_weight * aux_loss`` for every trainable parameter
            of the network, by name (None where a parameter is unused): the model step's gradient.
        buffers: the network's buffers after the forward pass at theta (BatchNorm statistics), for
            the caller to commit.
        surrogate: as an engine's result: value ``L_pri(theta')``, gradient with respect to the
            targets that of ``L_pri(theta')``.
    """

    primary: Tensor
    primary_loss: Tensor
    aux_loss: Tensor
    grads: dict[str, Tensor | None]
    buffers: dict[str, Tensor]
    surrogate: Tensor


def linearised_step(
    problem: MetaProblem,
    derivative: DirectionalDerivative,
    *,
    at_theta: tuple[Tensor, Tensor, dict[str, Tensor]] | None = None,
    loss_scale: float | None = None,
) -> SharedStep:
    """The hypergradient through the targets from ``-inner_lr * aux_weight * J_c(theta) u``.

    First-order gradients only: ``g`` at theta (which is also the model step's gradient), ``u``
    at theta', then one directional derivative of the auxiliary loss's coefficients ``c(theta)``
    along ``u``. ``at_theta``: the network's forward pass on ``x`` at theta, if the caller has it
    (``(primary, aux, buffers)``, with the graph to the parameters and the updated buffer copies).

    ``loss_scale``: a ``GradScaler``'s scale, by which both backward passes run on scaled losses
    (:func:`scaled_grad`); nothing returned depends on it. The directional derivative runs in
    float32 (outside autocast), where ``u`` does not underflow.
    """
    every: dict[str, Tensor] = {name: p for name, p in problem.net.named_parameters() if p.requires_grad}
    virtual = problem.parameters()
    with torch.enable_grad():
        if at_theta is None:
            step_buffers = problem.buffer_copies()
            primary, aux = functional_call(problem.net, (every, step_buffers), (problem.x,))
        else:
            primary, aux, step_buffers = at_theta
        primary_loss, aux_loss = problem.loss_terms(primary, aux, problem.targets.detach())
        gradients = scaled_grad(primary_loss + problem.aux_weight * aux_loss, list(every.values()), loss_scale)
        primary_loss, aux_loss = primary_loss.detach(), aux_loss.detach()
        if problem.reducer is not None:  # the gradient of the mean loss over every rank's batch
            problem.reducer.average_([primary_loss, aux_loss, *(g for g in gradients if g is not None)])
        grads: dict[str, Tensor | None] = dict(zip(every, gradients))
        params = {name: p.detach() for name, p in virtual.items()}
        moved = {
            name: p.requires_grad_()
            for name, p in virtual_step(params, [grads[name] for name in params], problem.inner_lr).items()
        }
        primary_meta, _ = functional_call(problem.net, (moved, problem.buffer_copies()), (problem.x_meta,), {"with_aux": False})
        meta_loss = problem.primary_loss(primary_meta, problem.y_meta)
        u_list = scaled_grad(meta_loss, list(moved.values()), loss_scale)
    u = {name: torch.zeros_like(p) if g is None else g for (name, p), g in zip(params.items(), u_list)}
    meta_loss = meta_loss.detach()
    share = 1.0
    if problem.reducer is not None:  # u of the mean meta loss; each rank's targets carry 1/R of the batch
        problem.reducer.average_([meta_loss, *u.values()])
        share = 1.0 / problem.reducer.world_size

    def coefficients(at: dict[str, Tensor]) -> Tensor:
        _, aux_at = functional_call(problem.net, (at, problem.buffer_copies()), (problem.x,))
        assert aux_at is not None
        return soft_target_coefficients(aux_at, focal_gamma=problem.focal_gamma)

    # in float32 even under autocast: a difference quotient in half precision is noise (off by more
    # than 100% under bfloat16), and float32 tangents are more precise (docs/performance.md)
    with torch.no_grad(), torch.autocast(problem.x.device.type, enabled=False):
        target_gradient = -problem.inner_lr * problem.aux_weight * share * derivative(coefficients, params, u)
    return SharedStep(
        primary=primary.detach(),
        primary_loss=primary_loss,
        aux_loss=aux_loss,
        grads=grads,
        buffers=step_buffers,
        surrogate=_LinearSurrogate.apply(meta_loss, problem.targets, target_gradient),  # type: ignore[no-untyped-call]
    )


class _LinearSurrogate(torch.autograd.Function):
    """``value``, with gradient ``gradient`` with respect to ``inputs``.

    Unlike ``value + (inputs * gradient).sum() - (...).detach()``, its value stays ``value`` when
    ``gradient`` is not finite (a scaled gradient that overflowed), so that a non-finite
    hypergradient is found as such and not as a non-finite meta loss.
    """

    @staticmethod
    def forward(ctx: Any, value: Tensor, inputs: Tensor, gradient: Tensor) -> Tensor:
        ctx.save_for_backward(gradient)
        return value.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[None, Tensor, None]:
        (gradient,) = ctx.saved_tensors
        return None, grad_output * gradient, None


class GradientsAtTheta(NamedTuple):
    """The two losses' gradients on ``(x, y)`` at theta (:func:`gradients_at_theta`), all detached.

    Attributes:
        primary: ``(B, C)`` primary logits.
        primary_loss, aux_loss: ``L_pri`` and ``L_aux``.
        primary_grads, aux_grads: their gradients for every trainable parameter of the network, by
            name (None where a loss does not reach the parameter).
        buffers: the network's buffers after the forward pass (BatchNorm statistics), for the caller
            to commit.
    """

    primary: Tensor
    primary_loss: Tensor
    aux_loss: Tensor
    primary_grads: dict[str, Tensor | None]
    aux_grads: dict[str, Tensor | None]
    buffers: dict[str, Tensor]


def _losses_at_theta(problem: MetaProblem) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """``(primary logits, L_pri, L_aux, parameters, buffers)`` on ``(x, y)`` at theta, with the graph
    to every trainable parameter; the forward pass runs on buffer copies, returned updated."""
    every: dict[str, Tensor] = {name: p for name, p in problem.net.named_parameters() if p.requires_grad}
    buffers = problem.buffer_copies()
    primary, aux = functional_call(problem.net, (every, buffers), (problem.x,))
    primary_loss, aux_loss = problem.loss_terms(primary, aux, problem.targets.detach())
    return primary, primary_loss, aux_loss, every, buffers


def gradients_at_theta(problem: MetaProblem, loss_scale: float | None = None) -> GradientsAtTheta:
    """The gradients of ``L_pri`` and of ``L_aux`` on ``(x, y)`` at theta, apart (two backward passes,
    on scaled losses with ``loss_scale``: :func:`scaled_grad`)."""
    with torch.enable_grad():
        primary, primary_loss, aux_loss, every, buffers = _losses_at_theta(problem)
        g_pri, g_aux = separate_gradients(primary_loss, aux_loss, every, loss_scale)
    return GradientsAtTheta(primary.detach(), primary_loss.detach(), aux_loss.detach(), g_pri, g_aux, buffers)


def separate_gradients(
    primary_loss: Tensor, aux_loss: Tensor, params: Mapping[str, Tensor], loss_scale: float | None = None
) -> tuple[dict[str, Tensor | None], dict[str, Tensor | None]]:
    """``(grad L_pri, grad L_aux)`` for ``params`` by name, apart: two backward passes through one graph
    (None where a loss does not reach a parameter; on scaled losses with ``loss_scale``:
    :func:`scaled_grad`). The graph is freed afterwards."""
    values = list(params.values())
    g_pri = scaled_grad(primary_loss, values, loss_scale, retain_graph=True)
    g_aux = scaled_grad(aux_loss, values, loss_scale)
    return dict(zip(params, g_pri)), dict(zip(params, g_aux))


def gradient_at_theta(problem: MetaProblem, loss_scale: float | None = None) -> dict[str, Tensor | None]:
    """``grad (L_pri + aux_weight * L_aux)`` on ``(x, y)`` at theta by parameter name, in one backward
    pass (on the scaled loss with ``loss_scale``: :func:`scaled_grad`)."""
    with torch.enable_grad():
        _, primary_loss, aux_loss, every, _ = _losses_at_theta(problem)
        grads = scaled_grad(primary_loss + problem.aux_weight * aux_loss, list(every.values()), loss_scale)
    return dict(zip(every, grads))


def meta_loss_after(problem: MetaProblem, step: Mapping[str, Tensor]) -> Tensor:
    """``L_pri(f_theta'(x_meta), y_meta)`` at ``theta' = theta - inner_lr * step``.

    ``step`` gives the update direction of the virtual parameters by name (a parameter it leaves
    out stays at theta; an empty ``step`` gives the meta loss at theta). Differentiable with
    respect to ``step``, not to theta; no buffer of the network changes.
    """
    params = {name: p.detach() for name, p in problem.parameters().items()}
    moved = virtual_step(params, [step.get(name) for name in params], problem.inner_lr)
    primary_meta, _ = functional_call(problem.net, (moved, problem.buffer_copies()), (problem.x_meta,), {"with_aux": False})
    return problem.primary_loss(primary_meta, problem.y_meta)


def linearised_engine(problem: MetaProblem, derivative: DirectionalDerivative) -> Tensor:
    """An engine on :func:`linearised_step`."""
    return linearised_step(problem, derivative).surrogate


def jvp_engine(problem: MetaProblem) -> Tensor:
    """Exact, without a second-order graph: one forward-mode Jacobian-vector product."""
    return linearised_engine(problem, forward_mode)


def finite_difference_engine(problem: MetaProblem) -> Tensor:
    """Approximate (O(eps^2)): two extra forward passes instead of the Jacobian-vector product."""
    return linearised_engine(problem, central_difference)


#: Engines whose work can be shared with the model step (``MetaAuxWrapper.step``), by their derivative.
SHARED_DERIVATIVES: dict[str, DirectionalDerivative] = {"jvp": forward_mode, "finite_difference": central_difference}

ENGINES: dict[str, Engine] = {
    "functional": functional_engine,
    "higher": higher_engine,
    "jvp": jvp_engine,
    "finite_difference": finite_difference_engine,
}


def get_engine(name: str) -> Engine:
    """The engine registered as ``name``; a ValueError listing the choices otherwise."""
    if name not in ENGINES:
        raise ValueError(f"engine={name!r} is not known; choose one of {sorted(ENGINES)}")
    return ENGINES[name]
